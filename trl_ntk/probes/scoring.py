"""Per-token log-probs of probe responses and the squeezing diagnostics, from batched no-grad forwards.

The LM head is applied only at the scored positions, in chunks, so the `[B, T, V]` logits are never formed on the
default path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from trl_ntk.batches import TokenBatch
from trl_ntk.probes.probe_set import ProbeResponse, eval_mode

logger = logging.getLogger(__name__)

Strategy = Literal["auto", "backbone", "logits"]

_LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
"""Config fields of models whose causal-LM head does more than `lm_head(h)`; those are scored with `"logits"`."""

DIAGNOSTICS = ("logp_sum", "logp_mean", "argmax_logp", "max_prob_mean", "entropy_mean", "a_norm", "g_norm")
"""The per-response scalar fields of `ResponseScores`, in record order."""


@dataclass
class ResponseScores:
    """Teacher-forced log-probs and squeezing diagnostics of `N` responses (one per `TokenBatch` row).

    With `pi_m` the softmax (at the batch temperature) predicting response token `y_m`, `m = 1..M`:

    Args:
        logp_sum (`Tensor[N]`): `sum_m log pi_m(y_m)`.
        logp_mean (`Tensor[N]`): `logp_sum / M`.
        argmax_logp (`Tensor[N]`): `sum_m log max_v pi_m(v)`.
        max_prob_mean (`Tensor[N]`): `mean_m max_v pi_m(v)`.
        entropy_mean (`Tensor[N]`): `mean_m -sum_v pi_m(v) log pi_m(v)`.
        a_norm (`Tensor[N]`): peakiness `sqrt(V (mean_m ||pi_m||_2)^2 + V - 2)`.
        g_norm (`Tensor[N]`): `mean_m ||pi_m - e_{y_m}||_2`.
        num_tokens (`Tensor[N]`, long): `M` per response.
        token_logps (`list[Tensor[M_n]]`): `log pi_m(y_m)` per response, in order.
        strategy (`str`): how the logits were computed, `"backbone"` or `"logits"`.

    All tensors are float32 on CPU.
    """

    logp_sum: Tensor
    logp_mean: Tensor
    argmax_logp: Tensor
    max_prob_mean: Tensor
    entropy_mean: Tensor
    a_norm: Tensor
    g_norm: Tensor
    num_tokens: Tensor
    token_logps: list[Tensor]
    strategy: str

    def __len__(self) -> int:
        return len(self.token_logps)

    @property
    def flat_token_logps(self) -> Tensor:
        """`[M]` every response's per-token log-probs, row-major (the `TokenBatch` target order)."""
        return torch.cat(self.token_logps) if self.token_logps else torch.zeros(0)

    def to_records(self, responses: Sequence[ProbeResponse] | None = None) -> list[dict[str, Any]]:
        """The fields of the `type: "probe"` records (without `schema_version`, `type`, `step`, `time`).

        Args:
            responses (`Sequence[ProbeResponse]`, *optional*): the `N` responses, for `probe_id`, `prompt_id` and
                `kind` (e.g. `EncodedProbes.responses`).
        """
        if responses is not None and len(responses) != len(self):
            raise ValueError(f"got {len(responses)} responses for {len(self)} scored rows")
        records = []
        for row in range(len(self)):
            record: dict[str, Any] = {}
            if responses is not None:
                probe_response = responses[row]
                record.update(
                    probe_id=probe_response.probe_id, prompt_id=probe_response.prompt_id, kind=probe_response.kind
                )
            record.update({name: float(getattr(self, name)[row]) for name in DIAGNOSTICS})
            record["num_tokens"] = int(self.num_tokens[row])
            record["token_logps"] = self.token_logps[row].tolist()
            records.append(record)
        return records


def score_responses(
    model: nn.Module,
    batch: TokenBatch,
    *,
    batch_size: int = 32,
    chunk_size: int = 256,
    strategy: Strategy = "auto",
) -> ResponseScores:
    """Per-token log-probs `log pi(y_m | x, y_<m)` and squeezing diagnostics of every row's target tokens.

    Each row of `batch` is one response; its targets are the response tokens. Rows are scored `batch_size` at a
    time under `torch.no_grad()` with every module in eval mode (modes restored afterwards). Padding on either side
    is handled: when `batch.position_ids` is `None`, positions are counted over the attention mask (`cumsum - 1`), so
    a row scores the same whatever its padding and its neighbours.

    Strategies (a named option; `"auto"` picks `"backbone"` when the model allows it):
    - `"backbone"`: run the decoder (`model.base_model`) for the final hidden states `[b, T, H]`, then the output
      embedding on the scored positions only, `chunk_size` tokens at a time: peak extra memory a few
      `chunk_size x V` floats, never `[b, T, V]`. Models whose head rescales or soft-caps logits (config
      `final_logit_softcapping`, `logit_scale`, ...) fall back to `"logits"`.
    - `"logits"`: the model's plain forward (`model(input_ids=..., attention_mask=...)`, also on a model patched by
      TRL's `add_fused_lm_head`); holds `[b, T, V]` logits for one micro-batch at a time.
    Log-softmax runs in float32 on `logits / batch.temperature`.

    Args:
        model (`PreTrainedModel`): a causal LM (PEFT-wrapped models are unwrapped to their base model).
        batch (`TokenBatch`): `[B, T]`; every row needs at least one target.
        batch_size (`int`, *optional*, defaults to `32`): rows per forward.
        chunk_size (`int`, *optional*, defaults to `256`): scored tokens per log-softmax (a few `chunk_size x V`
            float32 temporaries).
        strategy (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"backbone"` or `"logits"`.

    Returns:
        `ResponseScores` with `N = B` rows.
    """
    batch = TokenBatch.coerce(batch)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    if batch.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {batch.temperature}")
    counts = batch.target_mask.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no target tokens; every scored response needs at least one")
    if batch.model_kwargs and batch_size < batch.input_ids.shape[0]:
        raise ValueError(
            f"the batch carries extra model inputs {sorted(batch.model_kwargs)}, which cannot be split by row; pass "
            f"batch_size >= {batch.input_ids.shape[0]}"
        )
    causal_lm = _unwrap(model)
    chosen = _resolve_strategy(causal_lm, strategy)
    device = causal_lm.get_input_embeddings().weight.device
    vocab_size = 0

    per_token: dict[str, list[Tensor]] = {name: [] for name in _PER_TOKEN}
    with eval_mode(model), torch.no_grad():
        for start in range(0, batch.input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            hidden_or_logits, targets = _scored_positions(causal_lm, batch, rows, chosen, device)
            for chunk_start in range(0, targets.shape[0], chunk_size):
                chunk = slice(chunk_start, chunk_start + chunk_size)
                if chosen == "backbone":
                    logits = causal_lm.get_output_embeddings()(hidden_or_logits[chunk])
                else:
                    logits = hidden_or_logits[chunk]
                vocab_size = logits.shape[-1]
                stats = _token_statistics(logits.float() / batch.temperature, targets[chunk])
                for name, value in stats.items():
                    per_token[name].append(value)
    flat = {name: torch.cat(values).cpu() for name, values in per_token.items()}
    counts_list = counts.tolist()
    rows_of = {name: torch.split(value, counts_list) for name, value in flat.items()}
    num_tokens = counts.to(torch.long).cpu()
    num_tokens_float = num_tokens.to(torch.float32)

    def row_sum(name: str) -> Tensor:
        return torch.stack([v.sum() for v in rows_of[name]])

    logp_sum = row_sum("logp")
    prob_norm_mean = row_sum("prob_norm") / num_tokens_float
    return ResponseScores(
        logp_sum=logp_sum,
        logp_mean=logp_sum / num_tokens_float,
        argmax_logp=row_sum("max_logp"),
        max_prob_mean=row_sum("max_logp_exp") / num_tokens_float,
        entropy_mean=row_sum("entropy") / num_tokens_float,
        a_norm=torch.sqrt(vocab_size * prob_norm_mean**2 + vocab_size - 2),
        g_norm=row_sum("residual_norm") / num_tokens_float,
        num_tokens=num_tokens,
        token_logps=list(rows_of["logp"]),
        strategy=chosen,
    )


_PER_TOKEN = ("logp", "max_logp", "max_logp_exp", "entropy", "prob_norm", "residual_norm")


def _token_statistics(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per scored token, from float32 logits `[m, V]` and target ids `[m]`; each value is `[m]`.

    `logp = log pi(y)`, `max_logp = log max_v pi(v)`, `max_logp_exp = max_v pi(v)`, `entropy = -sum_v pi log pi`,
    `prob_norm = ||pi||_2`, `residual_norm = ||pi - e_y||_2 = sqrt(||pi||^2 - 2 pi(y) + 1)`.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    max_logp = logprobs.max(dim=-1).values
    entropy = torch.special.entr(probs).sum(dim=-1)
    norm = torch.linalg.vector_norm(probs, dim=-1)
    residual = (norm**2 - 2 * logp.exp() + 1).clamp(min=0)
    return {
        "logp": logp,
        "max_logp": max_logp,
        "max_logp_exp": max_logp.exp(),
        "entropy": entropy,
        "prob_norm": norm,
        "residual_norm": residual.sqrt(),
    }


def _scored_positions(
    causal_lm: nn.Module, batch: TokenBatch, rows: slice, strategy: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """`([m, H] hidden states or [m, V] logits predicting each target, [m] target ids)` for `rows`, row-major."""
    input_ids = batch.input_ids[rows]
    attention_mask = batch.attention_mask[rows]
    target_mask = batch.target_mask[rows]
    position_ids = batch.position_ids[rows] if batch.position_ids is not None else None
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    if not batch.model_kwargs:  # drop columns that are padding in every row of this slice
        used = attention_mask.bool().any(dim=0).nonzero().flatten()
        columns = slice(int(used[0]), int(used[-1]) + 1)
        input_ids, attention_mask = input_ids[:, columns], attention_mask[:, columns]
        target_mask, position_ids = target_mask[:, columns], position_ids[:, columns]
    inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
        **batch.model_kwargs,
    }
    predicts_target = target_mask[:, 1:].to(device)
    targets = input_ids.to(device)[:, 1:][predicts_target]
    if strategy == "backbone":
        hidden = causal_lm.base_model(**inputs, use_cache=False).last_hidden_state
        return hidden[:, :-1][predicts_target], targets
    logits = causal_lm(**inputs, use_cache=False).logits
    return logits[:, :-1][predicts_target], targets


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a PEFT wrapper (its LoRA layers stay in place), else the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _resolve_strategy(causal_lm: nn.Module, strategy: Strategy) -> str:
    if strategy not in ("auto", "backbone", "logits"):
        raise ValueError(f"strategy must be 'auto', 'backbone' or 'logits', got {strategy!r}")
    if strategy == "logits":
        return strategy
    reasons = []
    base_model = getattr(causal_lm, "base_model", causal_lm)
    if base_model is causal_lm:
        reasons.append("it exposes no separate decoder (base_model)")
    if not callable(getattr(causal_lm, "get_output_embeddings", None)) or causal_lm.get_output_embeddings() is None:
        reasons.append("it has no output embedding")
    config = getattr(causal_lm, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    transforms = [
        name for name in _LOGIT_TRANSFORM_FIELDS if _transforms_logits(name, getattr(text_config, name, None))
    ]
    if transforms:
        reasons.append(f"its head transforms the logits ({', '.join(transforms)})")
    if not reasons:
        return "backbone"
    if strategy == "backbone":
        raise ValueError(f"cannot score with strategy='backbone': {'; '.join(reasons)}; use 'logits'")
    logger.debug("scoring with full logits: %s", "; ".join(reasons))
    return "logits"


def _transforms_logits(name: str, value: Any) -> bool:
    """Whether config field `name` = `value` changes the logits (a soft-cap always does; a multiplier unless 1)."""
    if value is None:
        return False
    return name == "final_logit_softcapping" or not math.isclose(float(value), 1.0)
