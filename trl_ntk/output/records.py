"""Turn scores and step explanations into the records of `docs/output-format.md` (through the builders of
`schema.py`; plain dicts, no I/O)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from trl_ntk.analysis.dynamics import UpdateExplanation
from trl_ntk.batches import select_rows, target_rows
from trl_ntk.output import schema
from trl_ntk.output.schema import run_record, status_record

__all__ = [
    "attribution_arrays",
    "dynamics_records",
    "lld_records",
    "matrix_probe_ids",
    "one_line_summary",
    "probe_records",
    "probes_record",
    "run_record",
    "status_record",
]

_SCORE_FIELDS = ("logp_sum", "logp_mean", "argmax_logp", "max_prob_mean", "entropy_mean", "a_norm", "g_norm")


def probes_record(step: int, encoded: Any, tokenizer: Any, decoded: dict | None = None) -> dict:
    """The `probes` record: every response with its decoded response tokens (`decoded`: see
    `EncodedProbes.describe`)."""
    return schema.probes_record(step, encoded.describe(tokenizer, decoded))


def probe_records(step: int, encoded: Any, scores: Any) -> list[dict]:
    """One `probe` record per response."""
    out = []
    columns = {name: getattr(scores, name).tolist() for name in _SCORE_FIELDS}  # Python floats, one conversion
    for i, response in enumerate(encoded.responses):
        fields = {name: values[i] for name, values in columns.items()}
        fields["num_tokens"] = int(scores.token_logps[i].numel())
        fields["token_logps"] = [round(v, 6) for v in scores.token_logps[i].tolist()]
        out.append(
            schema.probe_record(
                step, probe_id=response.probe_id, prompt_id=response.prompt_id, kind=response.kind, **fields
            )
        )
    return out


def _per_response(values: Tensor, batch: Any) -> list[Tensor]:
    """Split `[..., Mp]` per-target values into one `[..., M_i]` tensor per probe row."""
    rows = target_rows(batch).cpu()
    return [values[..., rows == i] for i in range(batch.input_ids.shape[0])]


def dynamics_records(
    step: int,
    encoded: Any,
    before: Any,
    after: Any,
    explanation: UpdateExplanation,
    tokenizer: Any,
    *,
    top_k: int = 5,
    trusted: bool | None = None,
    trust_reason: str | None = None,
) -> list[dict]:
    """One `dynamics` record per probe response: observed vs predicted change and its splits.

    `trusted` / `trust_reason` (the step's gradient-check verdict; None when not judged) go on every record.
    """
    batch = encoded.batch
    fields = {
        "predicted": _per_response(explanation.probe.predicted, batch),
        "current": _per_response(explanation.probe.current, batch),
        "history": _per_response(explanation.probe.history, batch),
        "sgd": _per_response(explanation.sgd, batch),
    }
    cells = _per_response(explanation.probe.cells, batch)
    residual = None if explanation.probe.residual is None else _per_response(explanation.probe.residual, batch)
    rounding = None if explanation.probe.rounding is None else _per_response(explanation.probe.rounding, batch)
    totals = None if explanation.tokens is None else explanation.tokens.response_totals  # [B, L], tokens level
    contexts = _train_token_contexts(explanation) if totals is not None else []
    out = []
    for i, response in enumerate(encoded.responses):
        observed_tokens = (after.token_logps[i] - before.token_logps[i]).float()
        predicted = float(fields["predicted"][i].sum())
        observed = float(observed_tokens.sum())
        split = {"positive": 0.0, "negative": 0.0}
        groups: dict[str, float] = {}
        by_cell = {}
        for k, (sign, group) in enumerate(explanation.cell_names):
            value = float(cells[i][k].sum())
            split[sign] += value
            groups[group] = groups.get(group, 0.0) + value
            by_cell[f"{sign}/{group}"] = value
        record = schema.dynamics_record(
            step,
            probe_id=response.probe_id,
            prompt_id=response.prompt_id,
            kind=response.kind,
            observed=observed,
            predicted=predicted,
            trusted=trusted,
            trust_reason=trust_reason,
            predicted_sgd=float(fields["sgd"][i].sum()),
            predicted_current=float(fields["current"][i].sum()),
            history=float(fields["history"][i].sum()),
            split=split,
            groups=groups,
            cells=by_cell,
            token_observed=[round(float(v), 6) for v in observed_tokens],
            token_predicted=[round(float(v), 6) for v in fields["predicted"][i]],
            path=explanation.path,
            kernel={"grad_coeff_norm": explanation.grad_coeff_norm, **explanation.kernel_norms},
            gradient_check={
                "cosine": explanation.gradient_check.cosine,
                "relative_error": explanation.gradient_check.relative_error,
                "clip_scale": explanation.gradient_check.clip_scale,
            },
        )
        if residual is not None:  # losses on the plain logits: the part beyond the trained tokens' log-probs
            record["logit_residual"] = float(residual[i].sum())
        if rounding is not None:  # half-precision weights: the part due to rounding the update to their dtype
            record["rounding"] = float(rounding[i].sum())
        if totals is not None:  # each training token's total push on this response
            record["attributed"] = float(totals[i].sum())
            record["top_up"] = _top_tokens(totals[i], explanation, contexts, tokenizer, top_k, largest=True)
            record["top_down"] = _top_tokens(totals[i], explanation, contexts, tokenizer, top_k, largest=False)
        out.append(record)
    return out


def _top_tokens(
    totals: Tensor,
    explanation: UpdateExplanation,
    contexts: list[tuple[int, list[int]]],
    tokenizer: Any,
    k: int,
    largest: bool,
) -> list[dict]:
    """The `k` training tokens with the largest positive (or negative) total push, with their text and context."""
    k = min(k, totals.numel())
    if k == 0:
        return []
    values, index = torch.topk(totals if largest else -totals, k)
    out = []
    for value, l in zip(values.tolist(), index.tolist()):
        signed = value if largest else -value
        if (signed <= 0) if largest else (signed >= 0):
            break
        row, prefix = contexts[l]
        out.append(
            {
                "text": tokenizer.decode([int(explanation.tokens.train_targets[l])]),
                "context": tokenizer.decode(prefix[-8:]),
                "row": int(explanation.tokens.train_labels.example[l])
                if explanation.tokens.train_labels is not None
                else row,
                "group": int(explanation.tokens.train_labels.group[l])
                if explanation.tokens.train_labels is not None
                else 0,
                "value": signed,
            }
        )
    return out


def _train_token_contexts(explanation: UpdateExplanation) -> list[tuple[int, list[int]]]:
    """For every training target: (micro-batch row, the token ids before it in its sequence)."""
    out = []
    for batch in explanation.tokens.train_batches:
        rows, positions = torch.nonzero(batch.target_mask, as_tuple=True)
        for row, t in zip(rows.tolist(), positions.tolist()):
            prefix = batch.input_ids[row, :t][batch.attention_mask[row, :t].bool()]
            out.append((row, prefix.tolist()))
    return out


def matrix_probe_ids(encoded: Any, explanation: UpdateExplanation) -> list[str]:
    """The probe responses whose full token matrix was computed this step (`matrix_rows`), in batch order."""
    if explanation.tokens is None or explanation.tokens.matrix is None:
        return []
    return [r.probe_id for r, keep in zip(encoded.responses, explanation.tokens.matrix_rows.tolist()) if keep]


def attribution_arrays(encoded: Any, explanation: UpdateExplanation, tokenizer: Any) -> dict[str, np.ndarray]:
    """Arrays of `attributions/step_<step>.npz`: per selected probe response its `[M, L]` block and decoded tokens."""
    selected = select_rows(encoded.batch, explanation.tokens.matrix_rows)
    blocks = _per_response(explanation.tokens.matrix.T, selected)
    probe_targets = _per_response(selected.targets, selected)
    arrays: dict[str, np.ndarray] = {
        "train.tokens": np.array([tokenizer.decode([int(t)]) for t in explanation.tokens.train_targets]),
        "train.row": explanation.tokens.train_labels.example.numpy()
        if explanation.tokens.train_labels is not None
        else np.zeros(len(explanation.tokens.train_targets), dtype=np.int64),
        "train.group": explanation.tokens.train_labels.group.numpy()
        if explanation.tokens.train_labels is not None
        else np.zeros(len(explanation.tokens.train_targets), dtype=np.int64),
        "train.coeff": explanation.tokens.train_coeffs.float().cpu().numpy(),
    }
    for probe_id, block, targets in zip(matrix_probe_ids(encoded, explanation), blocks, probe_targets):
        arrays[probe_id] = block.T.float().cpu().numpy()
        arrays[f"{probe_id}.tokens"] = np.array([tokenizer.decode([int(t)]) for t in targets])
    return arrays


def lld_records(
    step: int, groups: list[dict], *, trusted: bool | None = None, trust_reason: str | None = None
) -> list[dict]:
    """One `lld` record per GRPO group (`trusted` / `trust_reason` as for `dynamics_records`)."""
    return [schema.lld_record(step, trusted=trusted, trust_reason=trust_reason, **group) for group in groups]


def one_line_summary(step: int, batch: list[dict], seconds: float) -> str:
    """`step 40 | chosen obs -1.23 pred -1.19 (neg -1.50) | rejected ... | 2.1s`."""
    by_kind: dict[str, list[dict]] = {}
    for record in batch:
        if record["type"] == "dynamics":
            by_kind.setdefault(record["kind"], []).append(record)
    parts = [f"step {step}"]
    for kind, rows in by_kind.items():
        obs = sum(r["observed"] for r in rows) / len(rows)
        pred = sum(r["predicted"] for r in rows) / len(rows)
        neg = sum(r["split"]["negative"] for r in rows) / len(rows)
        parts.append(f"{kind} obs {obs:+.3f} pred {pred:+.3f} (neg {neg:+.3f})")
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)
