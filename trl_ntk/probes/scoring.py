"""Per-token log-probs of probe responses and the squeezing diagnostics, from batched no-grad forwards.

Rows go through the same forward as the kernels (`trl_ntk.ntk.logprobs`): the trainer's inputs exactly, with
`position_ids` only when the batch carries them. The LM head is applied only at the scored positions, in chunks,
so the `[B, T, V]` logits are never formed on the default path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from trl_ntk._model import LogitTransform, float32_state, input_device, own_precision_forward, unwrap_model
from trl_ntk.batches import TokenBatch, select_rows
from trl_ntk.ntk.logprobs import call_with, final_hidden, head_logits, model_target_logits
from trl_ntk.probes import prefix
from trl_ntk.probes.probe_set import ProbeResponse, eval_mode

logger = logging.getLogger(__name__)

Strategy = Literal["auto", "backbone", "logits"]

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
    share_prefix: bool = True,
) -> ResponseScores:
    """Per-token log-probs `log pi(y_m | x, y_<m)` and squeezing diagnostics of every row's target tokens.

    Each row of `batch` is one response; its targets are the response tokens. Rows are scored under
    `torch.no_grad()` with every module in eval mode (modes restored afterwards). The forward gets the batch's
    inputs as the trainer's forward got them: `position_ids` when the batch carries them, else the model's default
    positions (for learned absolute positions, a left-padded row then counts its padding, as in training; give
    `position_ids` to score it independently of its padding).

    Strategies (a named option; `"auto"` picks `"backbone"` when the model allows it):
    - `"backbone"`: `logprobs.final_hidden` (the decoder body) for the hidden states at the scored positions, then
      the output embedding on those only, `chunk_size` tokens at a time: peak extra memory a few `chunk_size x V`
      floats, never `[b, T, V]`. Models whose head rescales or soft-caps logits (`LogitTransform`) are scored with
      `"logits"`: their own forward is the reference the kernels' transform is checked against.
    - `"logits"`: the model's plain forward (`model(input_ids=..., attention_mask=...)`, also on a model patched by
      TRL's `add_fused_lm_head`); holds `[b, T, V]` logits for one micro-batch at a time.
    With `"backbone"` and `share_prefix`, rows that share their prompt are scored after one forward of it
    (`probes.prefix`: a KV cache per prompt, the responses as a batch after it; same values up to float rounding),
    where the model supports it; other rows run plainly.
    Log-softmax runs in float32 on `logits / batch.temperature`; a half-precision model runs in float32 on upcast
    copies of its weights (twice its half-precision weights in extra memory), as the kernels do. The forward never
    runs under the trainer's mixed-precision autocast (`bf16=True` wraps `model.forward`; `own_precision_forward`):
    scores before and after an update are float32 numbers, like the predictions.

    Args:
        model (`PreTrainedModel`): a causal LM (PEFT-wrapped models are unwrapped to their base model).
        batch (`TokenBatch`): `[B, T]`; every row needs at least one target.
        batch_size (`int`, *optional*, defaults to `32`): rows per plain forward; after a shared prefix, as many
            rows as fill the same `batch_size x T` positions.
        chunk_size (`int`, *optional*, defaults to `256`): scored tokens per log-softmax (a few `chunk_size x V`
            float32 temporaries).
        strategy (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"backbone"` or `"logits"`.
        share_prefix (`bool`, *optional*, defaults to `True`): score rows with a common prompt after one forward of
            it (`"backbone"` only); `False` runs every row through the plain forward.

    Returns:
        `ResponseScores` with `N = B` rows.
    """
    batch = TokenBatch.coerce(batch)
    counts = _check_scoring_inputs(batch, batch_size, chunk_size)
    causal_lm = unwrap_model(model)
    chosen = _resolve_strategy(causal_lm, strategy)
    offsets = torch.cumsum(counts, 0) - counts
    flat = {name: torch.zeros(int(counts.sum())) for name in _PER_TOKEN}
    vocab_size = 0
    state = float32_state(causal_lm)  # a half-precision model is scored in float32 on upcast weights
    with eval_mode(model), torch.no_grad(), own_precision_forward(model):
        batch = batch.to(input_device(causal_lm))
        targets = batch.targets
        for rows, hidden_or_logits in _forwards(causal_lm, state, batch, chosen, batch_size, share_prefix):
            index = torch.cat([offsets[r] + torch.arange(int(counts[r])) for r in rows])
            for chunk_start in range(0, index.shape[0], chunk_size):
                chunk = hidden_or_logits[chunk_start : chunk_start + chunk_size]
                chunk_index = index[chunk_start : chunk_start + chunk_size]
                if chosen == "backbone":
                    chunk = call_with(causal_lm, state, lambda m, h=chunk: head_logits(m, h))
                vocab_size = chunk.shape[-1]
                stats = _token_statistics(chunk.float() / batch.temperature, targets[chunk_index.to(targets.device)])
                for name, value in stats.items():
                    flat[name][chunk_index] = value.cpu()
    return _response_scores(flat, counts, vocab_size, chosen)


def _check_scoring_inputs(batch: TokenBatch, batch_size: int, chunk_size: int) -> Tensor:
    """`[B]` targets per row (CPU), after checking the options and that every row has a target."""
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    if batch.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {batch.temperature}")
    counts = batch.target_mask.sum(dim=1).cpu()
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no target tokens; every scored response needs at least one")
    if batch.model_kwargs and batch_size < batch.input_ids.shape[0]:
        raise ValueError(
            f"the batch carries extra model inputs {sorted(batch.model_kwargs)}, which cannot be split by row; pass "
            f"batch_size >= {batch.input_ids.shape[0]}"
        )
    return counts


def _response_scores(flat: dict[str, Tensor], counts: Tensor, vocab_size: int, chosen: str) -> ResponseScores:
    """Per-response sums and means of the per-token statistics (`flat`, row-major)."""
    num_tokens = counts.to(torch.long)
    num_tokens_float = num_tokens.to(torch.float32)
    rows = torch.repeat_interleave(torch.arange(counts.shape[0]), num_tokens)

    def row_sum(name: str) -> Tensor:
        return torch.zeros(counts.shape[0]).index_add_(0, rows, flat[name])

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
        token_logps=list(torch.split(flat["logp"], num_tokens.tolist())),
        strategy=chosen,
    )


def _forwards(
    causal_lm: nn.Module, state: dict, batch: TokenBatch, chosen: str, batch_size: int, share_prefix: bool
) -> Iterator[tuple[list[int], Tensor]]:
    """`(rows, [m, H] hidden states or [m, V] logits)` per forward, covering every row once; the values are those
    of the rows' targets, in the order of `rows` then position."""
    groups = _prefix_groups(causal_lm, batch, chosen, share_prefix)
    plain_rows = list(range(batch.input_ids.shape[0])) if groups is None else groups.plain_rows
    if groups is not None:
        shared_rows = groups.shared_rows
        if prefix.verified(causal_lm) is None:
            _verify_prefix_sharing(causal_lm, state, batch, groups, shared_rows[:2])
        if prefix.verified(causal_lm):
            width = batch.input_ids.shape[1]
            per_forward = max(batch_size, batch_size * width // _longest_suffix(batch, groups, shared_rows))
            for start in range(0, len(shared_rows), per_forward):
                rows = shared_rows[start : start + per_forward]
                try:
                    hidden = call_with(
                        causal_lm, state, lambda m, r=rows: prefix.shared_prefix_hidden(m, batch, groups, r)
                    )
                except Exception:  # noqa: BLE001 - never fail a scoring: these rows and the rest go plainly
                    prefix.disable(causal_lm)
                    plain_rows = sorted([*plain_rows, *shared_rows[start:]])
                    break
                yield rows, hidden
        else:
            plain_rows = list(range(batch.input_ids.shape[0]))
    for start in range(0, len(plain_rows), batch_size):
        rows = plain_rows[start : start + batch_size]
        sub_batch = _row_subset(batch, rows)
        if chosen == "backbone":
            yield rows, call_with(causal_lm, state, lambda m, b=sub_batch: final_hidden(m, b))
        else:
            yield rows, call_with(causal_lm, state, lambda m, b=sub_batch: model_target_logits(m, b))


def _prefix_groups(causal_lm: nn.Module, batch: TokenBatch, chosen: str, share_prefix: bool):
    """The shared-prefix groups of the batch, or `None` when prefix sharing is off, unsupported or of no use."""
    if not share_prefix or chosen != "backbone" or batch.model_kwargs or prefix.verified(causal_lm) is False:
        return None
    if prefix.cache_argument(causal_lm) is None:
        return None
    groups = prefix.group_prefixes(batch)
    return groups if groups.lengths else None


def _longest_suffix(batch: TokenBatch, groups: prefix.PrefixGroups, rows: list[int]) -> int:
    ends = batch.attention_mask[rows].bool().cpu().cumsum(1).argmax(1) + 1
    starts = torch.tensor([groups.lengths[g] for g in groups.group_of[rows].tolist()])
    return max(int((ends - starts).max()), 1)


def _verify_prefix_sharing(causal_lm, state, batch: TokenBatch, groups, rows: list[int]) -> None:
    """The one-time check of the shared-prefix forward against the plain one, on two rows of one group."""
    sub_batch = _row_subset(batch, rows)
    targets = sub_batch.targets

    def logps(hidden: Tensor) -> Tensor:
        logits = call_with(causal_lm, state, lambda m: head_logits(m, hidden))
        return torch.log_softmax(logits.float() / batch.temperature, -1).gather(-1, targets[:, None])[:, 0]

    plain = logps(call_with(causal_lm, state, lambda m: final_hidden(m, sub_batch)))
    try:
        shared = logps(call_with(causal_lm, state, lambda m: prefix.shared_prefix_hidden(m, batch, groups, rows)))
    except Exception:  # noqa: BLE001 - a model whose cache cannot be shared this way: score it plainly, never fail
        shared = plain.new_full((0,), float("nan"))
    prefix.verify(causal_lm, plain.cpu(), shared.cpu())


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
    # -sum p log p from the log-probs already at hand (no second log); -inf logits give p = 0 and a finite factor
    entropy = -torch.linalg.vecdot(probs, logprobs.clamp(min=torch.finfo(logprobs.dtype).min))
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


def _row_subset(batch: TokenBatch, rows: list[int]) -> TokenBatch:
    """Rows `rows` (in increasing order) of the batch, without the trailing columns that are padding in all of them
    (causal attention: dropping them changes nothing before them). Extra model inputs cannot be split: the batch is
    kept whole."""
    if batch.model_kwargs:
        return batch
    keep = torch.zeros(batch.input_ids.shape[0], dtype=torch.bool)
    keep[rows] = True
    sub_batch = select_rows(batch, keep)
    used = sub_batch.attention_mask.bool().any(dim=0).nonzero().flatten()
    end = int(used[-1]) + 1 if used.numel() else sub_batch.input_ids.shape[1]
    return TokenBatch(
        input_ids=sub_batch.input_ids[:, :end],
        attention_mask=sub_batch.attention_mask[:, :end],
        target_mask=sub_batch.target_mask[:, :end],
        position_ids=None if sub_batch.position_ids is None else sub_batch.position_ids[:, :end],
        temperature=sub_batch.temperature,
        label_ids=None if sub_batch.label_ids is None else sub_batch.label_ids[:, :end],
    )


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
    transform = LogitTransform.of(causal_lm)
    if not transform.is_identity:
        reasons.append(f"its head transforms the logits ({', '.join(transform.fields)})")
    if not reasons:
        return "backbone"
    if strategy == "backbone":
        raise ValueError(f"cannot score with strategy='backbone': {'; '.join(reasons)}; use 'logits'")
    logger.debug("scoring with full logits: %s", "; ".join(reasons))
    return "logits"
