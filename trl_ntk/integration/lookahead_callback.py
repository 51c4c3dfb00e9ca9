"""`LookaheadCallback`: re-score the training rows every N steps during training and write the ranking's drift.

The scoring is `trl_ntk.integration.lookahead.score_trainer` at the current weights and optimizer state; the drift
statistics are `trl_ntk.analysis.lookahead.spearman` and `top_k_overlap`; the record is `schema.lookahead_record`.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from trl_ntk._model import trainable_parameters
from trl_ntk.analysis import lookahead
from trl_ntk.integration import lookahead_grpo
from trl_ntk.integration.adapters import adapter_for
from trl_ntk.integration.lookahead import LookaheadConfig, LookaheadResult, _default_probes, score_trainer
from trl_ntk.output import schema
from trl_ntk.output.sinks import make_sinks
from trl_ntk.probes.probe_set import ProbeSet


class LookaheadCallback(TrainerCallback):
    """Re-score the training data every `every_n_steps` optimizer steps at the current weights and optimizer state,
    and write the ranking's drift to the sinks (a `lookahead` record per scoring, `docs/output-format.md`).

    Usage:
    ```python
    >>> trainer = DPOTrainer(...)
    >>> trainer.add_callback(LookaheadCallback(trainer, every_n_steps=50, sample_size=256))
    >>> trainer.train()  # <output_dir>/lookahead/dynamics.jsonl: one `lookahead` record per scoring
    ```

    The view is the optimizer's (`lookahead.adam_view`: AdamW's preconditioner, SGD's momentum) once it has state,
    the SGD view at the current learning rate before. Scoring runs between steps (`on_step_end`) with its own gradient
    capture and `torch.autograd.grad` (no `.grad` is touched), in eval mode, with the RNG states (torch CPU and CUDA,
    numpy, Python) and the trainer's logged metrics and buffers restored: training is the same with and without it.
    A failure is counted and warned about, never raised (unless `strict`).

    GRPO: an example is a prompt, and each scoring samples and rewards a group of `num_generations` completions per
    candidate prompt with the trainer's own generation (`lookahead_grpo`), seeded with `seed` at every scoring (the
    same random numbers each time, so the drift is not sampling noise alone). The effect is a Monte-Carlo estimate;
    the records state `G` and the seed. Each prompt costs a generation, so the candidates are a fixed sample of
    `sample_size` prompts (default 8). Configurations the look-ahead cannot predict (vLLM, a `rollout_func`, an
    entropy bonus, a MoE router loss, tool environments, `G < 2`) are refused here, before training.

    Args:
        trainer (`SFTTrainer`, `DPOTrainer` or `GRPOTrainer`): the trainer to follow (single process).
        probes (`ProbeSet`, *optional*): defaults to 8 prompts of the train dataset.
        every_n_steps (`int`, *optional*, defaults to `50`): scoring period in optimizer steps (and before step 1).
        sample_size (`int`, *optional*): score a fixed random sample of this many rows (default: every row; GRPO: 8).
        top_k (`int`, *optional*, defaults to `10`): size of the harmful set compared between scorings and logged.
        output_dir (`str`, *optional*): run folder, default `<args.output_dir>/lookahead`.
        report_to (`str` or `list[str]`, *optional*): the sinks, default `"none"` (the JSONL file only).
        seed, strict: sample seed (and GRPO sampling seed); raise scoring failures (tests).
        **options: `LookaheadConfig` fields (`batch_size`, `jvp_rows`, `by_probe`, `text_chars`, GRPO:
            `num_generations`).
    """

    def __init__(
        self,
        trainer: Any,
        probes: ProbeSet | None = None,
        *,
        every_n_steps: int = 50,
        sample_size: int | None = None,
        top_k: int = 10,
        output_dir: str | Path | None = None,
        report_to: Any = "none",
        seed: int = 0,
        strict: bool = False,
        **options: Any,
    ):
        if every_n_steps < 1 or top_k < 1 or (sample_size is not None and sample_size < 1):
            raise ValueError("every_n_steps, top_k and sample_size must be >= 1")
        adapter = adapter_for(trainer)
        if adapter.kind not in ("sft", "dpo", "grpo"):
            raise ValueError(f"look-ahead scores SFT, DPO and GRPO datasets; got a {adapter.kind} trainer")
        if getattr(trainer.args, "world_size", 1) > 1:
            raise ValueError("LookaheadCallback runs in a single process (it scores on the unwrapped model)")
        self.trainer, self.every_n_steps, self.top_k, self.strict = trainer, every_n_steps, top_k, strict
        self.config = LookaheadConfig(**{**options, "seed": seed})
        if adapter.kind == "grpo":
            _validate_grpo(trainer, self.config)
            sample_size = 8 if sample_size is None else sample_size
        size = len(trainer.train_dataset)
        rows = list(range(size))
        if sample_size is not None and sample_size < size:
            generator = torch.Generator().manual_seed(seed)
            rows = sorted(torch.randperm(size, generator=generator)[:sample_size].tolist())
        self.rows = rows
        self.probes = probes or _default_probes(trainer, adapter.kind)
        self.output_dir = Path(output_dir or Path(trainer.args.output_dir) / "lookahead")
        self.report_to = report_to
        self.sinks = None
        self.previous: LookaheadResult | None = None
        self.history: list[dict[str, Any]] = []
        self.failures = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.sinks = make_sinks(self.report_to, self.output_dir, trainer=self.trainer)
        if state.global_step % self.every_n_steps == 0:
            self._guarded(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._guarded(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None

    def _guarded(self, step: int) -> None:
        try:
            self._score(step)
        except Exception as error:  # noqa: BLE001 - the look-ahead must never stop training
            if self.strict:
                raise
            self.failures += 1
            warnings.warn(f"look-ahead scoring failed at step {step}: {type(error).__name__}: {error}", stacklevel=2)

    def _score(self, step: int) -> None:
        start = time.perf_counter()
        with _untouched_trainer(self.trainer):
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            view, lr = _live_view(self.trainer.optimizer, model, self.trainer.args.learning_rate)
            result = score_trainer(self.trainer, self.probes, self.config, view=view, lr=lr, rows=self.rows)
        record = drift_record(step, result, self.previous, self.top_k, time.perf_counter() - start)
        self.previous = result
        self.history.append(record)
        if self.sinks is not None:
            self.sinks.write_event(step, [record])


def _live_view(optimizer: Any, model: nn.Module, default_lr: float) -> tuple[str, float]:
    """`("adam", lr)` once the optimizer can give its step split (an Adam with state, or SGD), else `("sgd", lr)` at
    the optimizer's current learning rate (the scheduler's), or `default_lr` before it exists."""
    if optimizer is None:
        return "sgd", float(default_lr)
    inner = getattr(optimizer, "optimizer", optimizer)
    lr = float(inner.param_groups[0]["lr"])
    if isinstance(inner, torch.optim.Adam):
        ready = all("exp_avg_sq" in inner.state.get(p, {}) for p in trainable_parameters(model).values())
        return ("adam" if ready else "sgd"), lr
    return ("adam" if isinstance(inner, torch.optim.SGD) else "sgd"), lr


def _validate_grpo(trainer: Any, config: LookaheadConfig) -> None:
    """Refuse, before training, the GRPO configurations `score_trainer` would refuse at the first scoring
    (`lookahead_grpo.validate`, `G < 2`), and tool environments (their instances keep state across rollouts that a
    scoring would change and this callback cannot restore)."""
    try:
        lookahead_grpo.validate(trainer)
        if getattr(trainer, "environment_factories", None) is not None:
            raise ValueError("GRPO look-ahead cannot score with tool environments (their state would change)")
        lookahead_grpo.group_size(trainer, config.num_generations)
    except ValueError as error:
        raise ValueError(f"LookaheadCallback cannot follow this GRPOTrainer: {error}") from None


@contextlib.contextmanager
def _untouched_trainer(trainer: Any) -> Iterator[None]:
    """Restore afterwards every state a scoring can touch: the RNGs (torch CPU and CUDA, numpy, Python; GRPO sampling
    draws from them), the trainer's metric and completion-log buffers (`compute_loss` and the GRPO sampling append
    to them), its buffered generation batches and step counter, its eval group size and token count."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python, numpy = random.getstate(), np.random.get_state()
    saved = {name: copy.deepcopy(getattr(trainer, name)) for name in _TRAINER_STATE if hasattr(trainer, name)}
    tokens = getattr(trainer.state, "num_input_tokens_seen", None)
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        np.random.set_state(numpy)
        for name, value in saved.items():
            setattr(trainer, name, value)
        if tokens is not None:
            trainer.state.num_input_tokens_seen = tokens


# Trainer attributes a scoring may change: metric buffers (every trainer), and GRPO's completion logs, generation
# buffer and step counter, eval group size, entropy-bonus state.
_TRAINER_STATE = (
    "_metrics",
    "_total_train_tokens",
    "_stored_metrics",
    "_logs",
    "_pending_extra_logs",
    "_pending_metrics",
    "_buffered_inputs",
    "_step",
    "num_generations_eval",
    "entropy_coef",
    "_entropy_window_stats",
    "_last_world_entropy",
)


def drift_record(
    step: int, result: LookaheadResult, previous: LookaheadResult | None, top_k: int, seconds: float
) -> dict[str, Any]:
    """The `lookahead` record of one scoring: per objective, the Spearman correlation and the top-`k` harmful
    overlap with the previous scoring (None the first time), the `top_k` most harmful rows, the effect quantiles
    (0, 10, 50, 90, 100%) and the fraction of negative effects; for GRPO, the Monte-Carlo estimate (`estimate`,
    `num_generations` = G, `seed`)."""
    effects, names = result.effects, result.effects.names
    spearman, overlap, harmful, quantiles, negative = {}, {}, {}, {}, {}
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    for col, name in enumerate(names):
        values = effects.total[:, col]
        same = previous is not None and previous.indices == result.indices and name in previous.effects.names
        before = previous.effects.total[:, previous.effects.column(name)] if same else None
        spearman[name] = lookahead.spearman(before, values) if before is not None else None
        overlap[name] = lookahead.top_k_overlap(before, values, top_k) if before is not None else None
        order = values.argsort(stable=True)[:top_k].tolist()
        harmful[name] = [
            {"index": result.indices[i], "effect": float(values[i]), "text": result.texts[i]} for i in order
        ]
        quantiles[name] = torch.quantile(values.double(), levels).tolist()
        negative[name] = float((values < 0).double().mean())
    return schema.lookahead_record(
        step,
        view=str(result.meta.get("view")),
        num_examples=len(result.indices),
        spearman=spearman,
        top_k_overlap=overlap,
        top_k=top_k,
        objectives=names,
        top_harmful=harmful,
        quantiles=quantiles,
        negative_fraction=negative,
        optimizer_step=result.meta.get("optimizer_step"),
        lr=result.meta.get("lr"),
        seconds=seconds,
        **{key: result.meta[key] for key in _GRPO_FIELDS if key in result.meta},
    )


# The Monte-Carlo estimate of a GRPO scoring, stated in its record (`lookahead_grpo.meta`).
_GRPO_FIELDS = ("estimate", "num_generations", "seed", "loss_type", "temperature")
