"""GRPO look-ahead: a training example is a prompt, and its effect is that of one step on a sampled group.

For a prompt `x`, the trainer samples `G` completions `y_1..y_G` with its own generation settings, scores them with
its reward functions and turns the rewards into advantages (`scale_rewards`, `multi_objective_aggregation`, ... as
configured). One step on that group changes the probe objective `O_r` by, to first order,

    d_r(x) = -sum_{g, l in y_g} c_l <grad lp_l, v_r>

with `c_l` read from the trainer's own loss on the group (every `loss_type`, `beta`, clipping). The expected effect of
a step on `x`, `E_{y ~ pi}[d_r(x)]`, is estimated by one group of `G` completions drawn with a fixed seed: a
Monte-Carlo estimate whose noise shrinks with `G`. Everything here calls the trainer's own
`_generate_and_score_completions`; nothing of GRPO is re-implemented.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Trainer attributes that `_generate_and_score_completions` and `compute_loss` append to (restored after scoring).
_LOG_BUFFERS = ("_metrics", "_logs", "_pending_extra_logs", "_pending_metrics")


def validate(trainer: Any) -> None:
    """Raise `ValueError` for GRPO configurations whose step the look-ahead cannot predict.

    Refused: vLLM generation (the completions come from another engine, with an importance-sampling correction), a
    `rollout_func` (the rollout is the user's, not the trainer's sampling), an entropy bonus or a MoE router loss (their
    gradients do not go through the completion tokens' log-probs, so `c_l` does not carry them), and several processes
    (the rewards would be normalised over every process' groups).
    """
    reasons = []
    if getattr(trainer, "use_vllm", False):
        reasons.append("use_vllm=True (completions sampled by vLLM; use the transformers generation to score)")
    if getattr(trainer, "rollout_func", None) is not None:
        reasons.append("a rollout_func (the rollout is not the trainer's own sampling)")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        reasons.append("an entropy bonus (entropy_coef != 0 or adaptive entropy: its gradient is not along grad lp)")
    if getattr(trainer, "aux_loss_enabled", False):
        reasons.append("a MoE router auxiliary loss (router_aux_loss_coef != 0)")
    if getattr(trainer.args, "world_size", 1) > 1:
        reasons.append("several processes (the look-ahead scores in a single process)")
    if reasons:
        raise ValueError("GRPO look-ahead cannot predict a step with " + "; ".join(reasons))


def group_size(trainer: Any, num_generations: int | None) -> int:
    """`G`: `num_generations` when given (>= 2), else the trainer's `num_generations`."""
    size = int(trainer.num_generations if num_generations is None else num_generations)
    if size < 2:
        raise ValueError(f"a GRPO group needs at least 2 completions to have advantages, got {size}")
    return size


@contextlib.contextmanager
def scoring_mode(trainer: Any, num_generations: int) -> Iterator[None]:
    """Run the trainer's sampling and loss as for one prompt group outside training, then undo every side effect.

    The model is expected in eval mode (the trainer then normalises the loss of the group alone, without gradient
    accumulation); its group size for eval (`num_generations_eval`) is set to `num_generations` meanwhile, and its
    metric and completion-log buffers are restored afterwards.
    """
    saved = {name: copy.deepcopy(getattr(trainer, name)) for name in _LOG_BUFFERS if hasattr(trainer, name)}
    group = trainer.num_generations_eval
    trainer.num_generations_eval = num_generations
    try:
        yield
    finally:
        trainer.num_generations_eval = group
        for name, value in saved.items():
            setattr(trainer, name, value)


def sample_groups(trainer: Any, rows: Sequence[int], num_generations: int, seed: int) -> dict[str, Any]:
    """The trainer's training inputs for one step on the prompts `rows`: `num_generations` completions each, sampled
    with the trainer's generation settings from the RNG seeded with `seed`, rewarded and turned into advantages by
    the trainer (`_generate_and_score_completions`). Rows are prompt-major: completion `j` belongs to prompt
    `j // num_generations`. Python's and numpy's RNGs are seeded too (a reward function may draw from them); every
    global RNG state is left as it was.

    Call inside `scoring_mode` with the model in eval mode.
    """
    device = trainer.accelerator.device
    examples = [copy.deepcopy(trainer.train_dataset[int(r)]) for r in rows for _ in range(num_generations)]
    devices = [device] if device.type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            random.seed(seed)  # reward functions may draw from Python's or numpy's RNG
            np.random.seed(seed % 2**32)
            return trainer._generate_and_score_completions(examples)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def group_seed(seed: int, rows: Sequence[int]) -> int:
    """The sampling seed of the step on `rows`: `seed + 100003 * rows[0]`, so a prompt's group does not depend on
    which other prompts are scored."""
    return int(seed) + 100003 * int(rows[0])


def group_texts(trainer: Any, inputs: dict[str, Any], num_generations: int, chars: int) -> list[dict[str, str]]:
    """Per prompt of `inputs`, the advantages of its group and the decoded completions (each cut to `chars`)."""
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    advantages: Tensor = inputs["advantages"]
    if advantages.dim() == 2:
        advantages = advantages.sum(dim=1)
    ids, mask = inputs["completion_ids"].cpu(), inputs["completion_mask"].cpu().bool()
    out = []
    for start in range(0, ids.shape[0], num_generations):
        rows = range(start, start + num_generations)
        texts = [tokenizer.decode(ids[j][mask[j]], skip_special_tokens=True) for j in rows]
        cut = [t if len(t) <= chars else t[: chars - 3] + "..." for t in texts]
        out.append(
            {
                "advantages": " ".join(f"{float(advantages[j]):+.2f}" for j in rows),
                "completions": " || ".join(cut),
            }
        )
    return out


def meta(trainer: Any, num_generations: int, seed: int) -> dict[str, Any]:
    """The header fields of a GRPO look-ahead: the estimate's nature and the trainer settings it depends on."""
    return {
        "estimate": (
            f"Monte-Carlo: one group of G={num_generations} completions sampled per prompt (seed {seed}); the effect "
            "is that of one step on that group, an unbiased sample of the expected effect of a step on the prompt"
        ),
        "num_generations": num_generations,
        "seed": seed,
        "loss_type": str(trainer.loss_type),
        "scale_rewards": str(trainer.scale_rewards),
        "beta": float(trainer.beta),
        "temperature": float(trainer.temperature),
    }
