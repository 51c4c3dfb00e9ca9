"""Two remedies for DPO's squeezing effect, as options next to a plain `DPOTrainer`.

1. `extended_sft_dataset`: the dataset extension of Ren & Sutherland, "Learning Dynamics of LLM Finetuning" (ICLR
   2025): supervised fine-tuning on the chosen AND the rejected responses before DPO, so that DPO's negative
   gradient does not hit rejected responses that sit in a low-probability valley (where it squeezes probability
   mass onto the model's argmax instead of lowering the rejected response).
2. `DPONTHRCallback`: the negative token hidden reward rule of Deng et al., "On the Effect of Negative Gradient in
   Group Relative Deep Reinforcement Optimization" (NeurIPS 2025), applied to a DPO pair as a group of two (the
   chosen response positive, the rejected one negative): the rejected tokens whose hidden reward (the inner product
   of their lm-head gradient with the chosen tokens') exceeds the threshold get their gradient scaled by `eta`, in
   the trainer's real backward (`capture.LogProbGradientScaling`), with no loss re-implemented.

Usage:

```python
from trl import DPOTrainer, SFTConfig, SFTTrainer
from trl_ntk.integration.dpo_fixes import DPONTHRCallback, extended_sft_dataset

SFTTrainer(model=model, args=SFTConfig(...), train_dataset=extended_sft_dataset(preferences)).train()  # fix 1
trainer = DPOTrainer(model=model, args=dpo_config, train_dataset=preferences, processing_class=tokenizer)
trainer.add_callback(DPONTHRCallback(trainer, beta=1.0, eta=0.5))  # fix 2
trainer.train()
```
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from trl_ntk.batches import TokenBatch
from trl_ntk.integration.adapters import adapter_for
from trl_ntk.integration.capture import LogProbGradientScaling
from trl_ntk.ntk import logprobs
from trl_ntk.ntk.nthr import NTHRStats, Vocab, check_weight_options, token_weights

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

SUPPORTED_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
"""DPO `loss_type`s (TRL 1.16) whose gradient factors per token: each is a function of the pair's summed (or
length-normalised) sequence log-probs, so every rejected token of a pair receives the same `dL/d lp`, and scaling
some of them by `eta` is the gradient of the loss with the rejected log-likelihood `sum_t w_t lp_t`."""

REFUSED_LOSS_TYPES = {
    "aot": "it sorts the batch's log-ratios, so a rejected response is compared with another pair's chosen one, not "
    "the one its hidden reward is computed against",
    "aot_unpaired": "it sorts chosen and rejected log-ratios separately, so the pairs the rule reads are not the "
    "pairs the loss compares",
    "sft": "it trains on the chosen responses only: no gradient reaches the rejected tokens",
}


# ------------------------------------------------------------------------------------------------------------------
# Fix 1: the dataset extension.
# ------------------------------------------------------------------------------------------------------------------


def extended_sft_dataset(preferences: Dataset, *, include_chosen: bool = True, shuffle_seed: int | None = 0) -> Dataset:
    """The SFT dataset of the dataset extension (Ren & Sutherland, ICLR 2025): every preference row `(prompt,
    chosen, rejected)` becomes the prompt-completion rows `(prompt, chosen)` and `(prompt, rejected)`, for
    `SFTTrainer` before DPO.

    Fine-tuning on the rejected responses too lifts them out of the low-probability region where DPO's negative
    gradient mostly squeezes mass onto the already-likely tokens; DPO then lowers them from a higher starting point.
    Standard and conversational rows both work (the columns are passed through as they are).

    Args:
        preferences (`datasets.Dataset`): columns `prompt`, `chosen`, `rejected` (other columns are dropped).
        include_chosen (`bool`, *optional*, defaults to `True`): also keep the chosen responses (the recipe);
            `False` gives the rejected ones only.
        shuffle_seed (`int` or `None`, *optional*, defaults to `0`): shuffle the rows with this seed (`None`: chosen
            and rejected rows of each pair stay next to each other, in the input order).

    Returns:
        `datasets.Dataset` with columns `prompt`, `completion` and `source` (`"chosen"` / `"rejected"`), `2 n` rows
        (`n` without the chosen ones).
    """
    from datasets import Dataset

    missing = {"prompt", "chosen", "rejected"} - set(preferences.column_names)
    if missing:
        raise ValueError(f"a preference dataset needs the columns prompt, chosen, rejected; missing {sorted(missing)}")
    sources = ("chosen", "rejected") if include_chosen else ("rejected",)
    rows = [
        {"prompt": row["prompt"], "completion": row[source], "source": source}
        for row in preferences
        for source in sources
    ]
    dataset = Dataset.from_list(rows)
    return dataset if shuffle_seed is None else dataset.shuffle(seed=shuffle_seed)


# ------------------------------------------------------------------------------------------------------------------
# Fix 2: NTHR on DPO pairs.
# ------------------------------------------------------------------------------------------------------------------


def check_dpo_nthr_supported(args: Any) -> None:
    """Raise `ValueError` with the reason for a `DPOConfig` whose gradient does not factor per token."""
    loss_types = args.loss_type if isinstance(args.loss_type, list | tuple) else [args.loss_type]
    for loss_type in loss_types:
        if loss_type in REFUSED_LOSS_TYPES and not (loss_type == "sft" and len(loss_types) > 1):
            raise ValueError(f"NTHR for DPO does not support loss_type={loss_type!r}: {REFUSED_LOSS_TYPES[loss_type]}")
        if loss_type not in SUPPORTED_LOSS_TYPES + ("sft",):
            raise ValueError(
                f"NTHR for DPO does not support loss_type={loss_type!r}; supported: {', '.join(SUPPORTED_LOSS_TYPES)}"
            )
    if getattr(args, "ld_alpha", None) is not None:
        raise ValueError(
            "NTHR for DPO does not support ld_alpha: the shared and the tail tokens of a rejected response get "
            "different gradient coefficients, so the per-token weights would not act on one pair-level coefficient"
        )


@torch.no_grad()
def pair_token_weights(
    hidden: Tensor,
    logits: Any,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    beta: float = 1.0,
    eta: float = 0.5,
    vocab: Vocab = "group",
    temperature: float = 1.0,
) -> tuple[Tensor, NTHRStats]:
    """NTHR token weights of DPO's concatenated batch, each pair a group of two.

    Rows `0 .. P-1` are the chosen responses and `P .. 2P-1` the rejected ones (TRL's layout). Pair `i` is the
    group `(chosen_i: advantage +1, rejected_i: advantage -1)` of `trl_ntk.ntk.nthr.token_weights`: with `s` the
    hidden reward against the chosen tokens, `tau = beta * mean_k s(chosen_i, k)`, and the rejected tokens with
    `s > tau` get weight `eta`; every other token 1. (`eta="auto"`, `2 |0.5 - p|`, would be 0 for every pair.)

    Args:
        hidden (`Tensor[2P, T, d]`): final hidden states at the positions that predict `completion_ids`.
        logits (`Tensor[2P, T, V]` or callable): logits there, or a head `[n, d] -> [n, V]`.
        completion_ids (`Tensor[2P, T]`), completion_mask (`Tensor[2P, T]`): the trained tokens and where they are.

    Returns:
        `(weights [2P, T] float32, NTHRStats)`.
    """
    rows = hidden.shape[0]
    if rows % 2:
        raise ValueError(f"a DPO batch has chosen and rejected halves; got {rows} rows")
    pairs = rows // 2
    order = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], dim=1).flatten().to(hidden.device)
    advantages = torch.tensor([1.0, -1.0], device=hidden.device).repeat(pairs)
    ordered_logits = logits[order] if isinstance(logits, Tensor) else logits
    weights, stats = token_weights(
        hidden[order],
        ordered_logits,
        completion_ids[order],
        completion_mask[order],
        advantages,
        2,
        beta=beta,
        eta=eta,
        vocab=vocab,
        temperature=temperature,
        return_stats=True,
    )
    out = torch.empty_like(weights)
    out[order] = weights
    return out, stats


class DPONTHRCallback(TrainerCallback):
    """NTHR for `DPOTrainer`: on every training forward, the rejected tokens whose hidden reward correlates with
    the chosen response's tokens get their gradient scaled by `eta` (see `pair_token_weights`).

    The final hidden states come from one no-grad forward of the decoder body per training forward
    (`trl_ntk.ntk.logprobs.final_hidden`, in the model's current mode), the weights multiply `dL/d log_probs` of the
    trainer's fused head in its own backward (`capture.LogProbGradientScaling`), so the loss stays TRL's. Works
    beside `LearningDynamicsCallback`, which then explains the reweighted update.

    Args:
        trainer (`DPOTrainer`): with a `loss_type` in `SUPPORTED_LOSS_TYPES` and no `ld_alpha`.
        beta (`float`, *optional*, defaults to `1.0`): threshold multiplier, `tau = beta * mean s(chosen)`.
        eta (`float`, *optional*, defaults to `0.5`): the weight of the selected rejected tokens, in `[0, 1]`.
        vocab (`str`, *optional*, defaults to `"group"`): `"group"` (the pair's token ids) or `"full"`.

    Attributes:
        stats (`NTHRStats`): sums over every reweighted forward so far (`stats.frac_downweighted`, ...).
    """

    def __init__(self, trainer: Any, *, beta: float = 1.0, eta: float = 0.5, vocab: Vocab = "group") -> None:
        if adapter_for(trainer).kind != "dpo":
            raise ValueError(f"DPONTHRCallback needs a DPOTrainer, got {type(trainer).__name__}")
        check_dpo_nthr_supported(trainer.args)
        adapter_for(trainer).validate(trainer)
        check_weight_options(beta, eta)
        if eta == "auto":
            raise ValueError("eta='auto' (2 |0.5 - p|) is 0 for every DPO pair; give eta as a number in [0, 1]")
        self.trainer, self.beta, self.eta, self.vocab = trainer, float(beta), float(eta), vocab
        self.stats = NTHRStats()
        self._scaling = LogProbGradientScaling(trainer.model, self._weights)

    def remove(self) -> None:
        """Stop reweighting (removes the hook)."""
        self._scaling.remove()

    def _weights(self, module: nn.Module, batch: TokenBatch) -> Tensor:
        """`[B, T-1]` weights of the fused log-probs (position `t-1` scores token `t`); 1 off the targets."""
        positions = batch.target_mask[:, 1:]
        with torch.no_grad():
            hidden_targets = logprobs.final_hidden(module, batch)
        hidden = hidden_targets.new_zeros(*positions.shape, hidden_targets.shape[-1])
        hidden[positions] = hidden_targets
        ids = torch.zeros(positions.shape, dtype=torch.long, device=positions.device)
        ids[positions] = batch.targets
        weights, stats = pair_token_weights(
            hidden,
            lambda h: logprobs.head_logits(module, h),
            ids,
            positions,
            beta=self.beta,
            eta=self.eta,
            vocab=self.vocab,
        )
        self.stats = self.stats + stats
        return weights

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add `nthr/frac_downweighted` (cumulative) to the trainer's logs."""
        if logs is not None and self.stats.num_negative_tokens:
            logs["nthr/frac_downweighted"] = self.stats.frac_downweighted
