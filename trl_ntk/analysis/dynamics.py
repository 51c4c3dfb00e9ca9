"""One analysis step, trainer-free: why each probe token's log-prob moved in one optimizer update.

Inputs: the probe token batch, the captured training micro-batches with their gradient coefficients `c_l`, the
adapter's token labels, the optimizer, and a backend holding the model at `w_t` (gradients of the step in `.grad`).
With `g = sum_l c_l grad lp_l` (times the clip and cross-rank factor `s`) and the optimizer's split of its update
`dw = -P g + history` (`optim.optimizer_step_split`), every probe token m gets

    predicted_m         = < grad lp~_m, dw >                                       (JVP along the real update)
    current_m           = - s * sum_l c_l < grad lp~_m, P grad lp_l >              (= sum over cells below)
    cell_m[sign, group] = - s * sum_{l in cell} c_l < grad lp~_m, P grad lp_l >    (one backward + one JVP each)
    history_m           = < grad lp~_m, history >                                  (momentum, weight decay)
    sgd_m               = - lr * < grad lp~_m, g >                                 (the plain-SGD view)

and, at the "tokens" level, the matrix `a_{m,l} = - s * c_l * < grad lp~_m, P grad lp_l >` whose row sums are
`current_m`. The observed change comes from scoring the probes again after the optimizer step.

The algorithm is written once over a `StepBackend`: `dense.DenseBackend` (autograd and `torch.func` JVPs on the
full parameters; one process or DDP) or `sharded.ShardedBackend` (finite differences on FSDP2 shards).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from trl_ntk import _dist
from trl_ntk._model import TensorDict
from trl_ntk.analysis.dense import DenseBackend
from trl_ntk.analysis.results import SIGN_NAMES, GradientCheck, Prediction, UpdateExplanation
from trl_ntk.batches import CapturedMicroBatch, TokenBatch, TokenLabels, concat_token_batches, select_rows, target_rows
from trl_ntk.ntk import gwhes, logprobs, optim

__all__ = ["StepBackend", "UpdateExplanation", "explain_update"]


class StepBackend(Protocol):
    """What the step analysis needs from the parameters: gradients, JVPs, dot products and cross-rank sums.

    Parameter dicts (`TensorDict`) hold what this process holds of each trainable parameter (all of it, or its
    shard). `weighted_gradient` and `residual_gradient` return this process's part of a gradient; `reduce` turns
    a quantity linear in such parts (a JVP row, the raw gradient) into its value for the whole step; `dot` is the
    global inner product of two parameter dicts that already hold whole-step values.
    """

    path: str

    def applied_gradient(self) -> TensorDict: ...

    def step_split(self, optimizer: torch.optim.Optimizer) -> optim.StepSplit: ...

    def weighted_gradient(self, micro_batches: list[CapturedMicroBatch], weights: list[Tensor]) -> TensorDict: ...

    def residual_gradient(self, micro_batches: list[CapturedMicroBatch], coeff_scale: float) -> TensorDict: ...

    def jvps(self, batches: dict[str, TokenBatch], directions: list[TensorDict]) -> dict[str, Tensor]: ...

    def reduce(self, tensor: Tensor) -> Tensor: ...

    def dot(self, a: TensorDict, b: TensorDict) -> float: ...

    def token_attribution(self, *args: Any, **kwargs: Any) -> Any: ...

    def kernel_norms(self, probe_batch: TokenBatch, micro_batches: list[CapturedMicroBatch]) -> dict[str, float]: ...


def step_cells(
    labels: list[TokenLabels], coeffs: list[Tensor], num_groups: int, device: torch.device | str = "cpu"
) -> list[tuple[int, int]]:
    """The (sign index, group index) cells holding at least one training token with a non-zero coefficient, in a
    fixed order; across ranks the union, so that every rank runs the same cells for the collectives that follow."""
    present = torch.zeros(2, num_groups, device=device)
    for lab, c in zip(labels, coeffs):
        for sign_index, sign_mask in enumerate((c < 0, c > 0)):
            present[sign_index, lab.group[sign_mask.cpu()].unique().to(device)] = 1.0
    _dist.all_reduce(present)
    return [(s, g) for s in range(2) for g in range(num_groups) if present[s, g] > 0]


def cell_weights(labels: list[TokenLabels], coeffs: list[Tensor], sign_index: int, group_index: int) -> list[Tensor]:
    """Per micro-batch `[M_i]`: `c_l` on the training tokens of one (sign, group) cell, 0 elsewhere."""
    weights = []
    for lab, c in zip(labels, coeffs):
        in_sign = (c < 0) if sign_index == 0 else (c > 0)
        in_cell = in_sign & (lab.group.to(c.device) == group_index)
        weights.append(torch.where(in_cell, c, torch.zeros_like(c)))
    return weights


def _scaled(part: TensorDict, preconditioner: Mapping[str, Tensor]) -> TensorDict:
    """`part <- -P * part` in place (no new parameter-sized tensor); returns `part`."""
    for n in part:
        part[n].mul_(-preconditioner[n].to(part[n].dtype))
    return part


def in_some_cell(coeffs: list[Tensor]) -> list[Tensor]:
    """Per micro-batch `[M_i]`: `c_l` where some (sign, group) cell holds token `l` (`c_l < 0` or `c_l > 0`), 0
    elsewhere (NaN coefficients fall in no cell). Its weighted gradient is the sum of every cell's."""
    return [torch.where((c < 0) | (c > 0), c, torch.zeros_like(c)) for c in coeffs]


def gradient_check(
    backend: StepBackend,
    micro_batches: list[CapturedMicroBatch],
    coeffs: list[Tensor],
    applied: TensorDict,
    coeff_scale: float,
) -> GradientCheck:
    """`GradientCheck` of the raw gradient `g = sum_k g_k (+ g_r)` (every cell's tokens, and the logit residual's
    pull-back when a rank has one) against the applied one.

    `g` comes from one weighted backward of its own (not the sum of the cells' gradients), so that it is never
    alive next to a cell's gradient: 1 parameter-sized buffer (2 while a logit residual's gradient or a second
    micro-batch's is added), freed on return. Cost: one more backward of the step's batch."""
    raw = backend.weighted_gradient(micro_batches, in_some_cell(coeffs))
    if _dist.any_rank(any(mb.logit_residual is not None for mb in micro_batches)):
        residual = backend.residual_gradient(micro_batches, coeff_scale)
        for n in raw:
            raw[n] += residual[n].to(raw[n].dtype)
        del residual
    for n in raw:
        backend.reduce(raw[n])
    return GradientCheck.from_dots(backend.dot(raw, raw), backend.dot(applied, applied), backend.dot(applied, raw))


def _current_rows(
    backend: StepBackend,
    batches: dict[str, TokenBatch],
    micro_batches: list[CapturedMicroBatch],
    labels: list[TokenLabels],
    coeffs: list[Tensor],
    cell_ids: list[tuple[int, int]],
    preconditioner: Mapping[str, Tensor],
    coeff_scale: float,
) -> tuple[dict[str, list[Tensor]], dict[str, Tensor] | None]:
    """Per batch, this process's JVP rows along `-P g_k` for every cell `k` (and along `-P g_r` for the logit
    residual gradient `g_r`, `None` when no rank has one).

    One cell at a time: its gradient, the JVPs of every batch, then the gradient is dropped."""
    cell_rows: dict[str, list[Tensor]] = {name: [] for name in batches}
    for sign_index, group_index in cell_ids:
        gradient = backend.weighted_gradient(micro_batches, cell_weights(labels, coeffs, sign_index, group_index))
        rows = backend.jvps(batches, [_scaled(gradient, preconditioner)])
        del gradient  # one cell's gradient (preconditioned in place) alive at a time
        for name in batches:
            cell_rows[name].append(rows[name][0])
    if not _dist.any_rank(any(mb.logit_residual is not None for mb in micro_batches)):
        return cell_rows, None
    gradient = backend.residual_gradient(micro_batches, coeff_scale)
    rows = backend.jvps(batches, [_scaled(gradient, preconditioner)])
    return cell_rows, {name: value[0] for name, value in rows.items()}


def explain_update(
    model: nn.Module,
    probe_batch: TokenBatch,
    micro_batches: list[CapturedMicroBatch],
    labels: list[TokenLabels],
    group_names: tuple[str, ...],
    optimizer: torch.optim.Optimizer,
    *,
    attribution: str = "sums",
    coeff_scale: float = 1.0,
    chunk_size: int | None = None,
    kernel_summaries: bool = False,
    extra_batches: dict[str, TokenBatch] | None = None,
    matrix_rows: Tensor | None = None,
    backend: StepBackend | None = None,
    jvp_chunk_size: int | str | None = None,
) -> UpdateExplanation:
    """Predict the change of every probe token over the coming optimizer step (call before `optimizer.step()`, on
    every rank).

    Args:
        model (`nn.Module`): at `w_t`, in eval mode, with the step's gradient in `.grad` (clipped and averaged
            as the optimizer will apply it).
        probe_batch (`TokenBatch`): the probe responses; `Mp` targets.
        micro_batches, labels: the captured training forwards and their adapter labels.
        group_names (`tuple[str, ...]`): the adapter's group names.
        optimizer: the (possibly wrapped) torch optimizer about to step.
        attribution (`str`): `"sums"` (cells, about `K` batch backwards + `K` probe JVPs) or `"tokens"` (adds
            `TokenAttribution`, about `min(Mp, L)` batch JVPs; dense backend only).
        coeff_scale (`float`): factor on `c_l` before clipping (`1 / world_size` under DDP / FSDP averaging).
        chunk_size (`int`, *optional*): rows of parameter-sized tangents held at once ("tokens" level).
        kernel_summaries (`bool`): also compute the log-prob kernel and pNTK norms between probe and batch.
        extra_batches (`dict[str, TokenBatch]`, *optional*): other token batches whose changes are predicted along
            the same directions (GRPO's own completions for lazy likelihood displacement), in `explanation.extra`.
        matrix_rows (`Tensor[B]` bool, *optional*): at the "tokens" level, the probe rows whose full token x token
            matrix is computed; every response gets its per-training-token totals. `None`: all rows.
        backend (`StepBackend`, *optional*): defaults to `DenseBackend(model, chunk_size, jvp_chunk_size=...)`.
        jvp_chunk_size (`int` or `str`, *optional*): tangents per batched JVP at the "tokens" level (see
            `dense.DenseBackend`); ignored with an explicit `backend`.

    Returns:
        `UpdateExplanation`. Memory beyond the model's own (dense backend, float32 parameters, `P` = their bytes):
        one parameter-sized buffer at a time: the history direction, then the raw gradient of the gradient check
        (its own backward, `gradient_check`), then one cell's gradient at a time, preconditioned in place; the
        first micro-batch's backward builds the running gradient as it frees its graph (no buffer waits beside a
        whole graph), each later one adds into it in place (float32 parameters; one more gradient while it is
        added otherwise); the optimizer's `P` is computed one parameter at a time
        (`dense.LazySplit`); never `[Mp, P]`. Plus the activations of one backward or JVP. See `analysis.memory`.
    """
    backend = DenseBackend(model, chunk_size, jvp_chunk_size=jvp_chunk_size) if backend is None else backend
    applied = backend.applied_gradient()
    device = next(iter(applied.values())).device
    coeffs = [mb.grad_coeffs * coeff_scale for mb in micro_batches]
    cell_ids = step_cells(labels, coeffs, len(group_names), device=device)
    preconditioner, history = backend.step_split(optimizer)
    batches = {"probe": probe_batch, **(extra_batches or {})}

    # the parts that do not depend on the cells first, one direction at a time: history (materialised once),
    # then the applied gradient itself (the plain-SGD view `-lr g`, scaled after the JVP, no copy)
    lr = learning_rate(optimizer)
    history_rows = backend.jvps(batches, [history])
    del history
    sgd_rows = backend.jvps({"probe": probe_batch}, [applied])["probe"][0] * -lr

    check = gradient_check(backend, micro_batches, coeffs, applied, coeff_scale)
    scale = check.clip_scale
    cell_rows, residual_rows = _current_rows(
        backend, batches, micro_batches, labels, coeffs, cell_ids, preconditioner, coeff_scale
    )

    coeff_sq = sum((c.double().pow(2).sum() for c in coeffs), torch.zeros((), dtype=torch.float64))
    coeff_norm = float(_dist.all_reduce(coeff_sq.to(device))) ** 0.5 * abs(scale)

    def prediction(name: str) -> Prediction:
        history_change = history_rows[name][0]
        if cell_rows[name]:
            cells = backend.reduce(torch.stack(cell_rows[name]) * scale)
        else:
            cells = history_change.new_zeros(0, history_change.shape[-1])
        residual = None if residual_rows is None else backend.reduce(residual_rows[name] * scale)
        current = cells.sum(0) if residual is None else cells.sum(0) + residual
        if not math.isfinite(coeff_norm):  # NaN / inf coefficients fall in no cell: the split says nothing, not 0
            current = torch.full_like(current, math.nan)
        return Prediction(current + history_change, current, history_change, cells, residual)

    step_labels = concat_labels(labels)
    tokens_due = attribution == "tokens"
    return UpdateExplanation(
        probe=prediction("probe"),
        sgd=sgd_rows,
        cell_names=tuple((SIGN_NAMES[s], group_names[g]) for s, g in cell_ids),
        gradient_check=check,
        path=backend.path,
        grad_coeff_norm=coeff_norm,
        train_labels=step_labels,
        extra={name: prediction(name) for name in extra_batches or {}},
        tokens=backend.token_attribution(
            probe_batch, micro_batches, coeffs, step_labels, preconditioner, scale, matrix_rows
        )
        if tokens_due
        else None,
        kernel_norms=backend.kernel_norms(probe_batch, micro_batches) if kernel_summaries else {},
    )


def learning_rate(optimizer: Any) -> float:
    """The learning rate of the coming step (one value: the plain-SGD view needs a single `eta`)."""
    inner = optim.unwrap_optimizer(optimizer)
    rates = {float(group["lr"]) for group in inner.param_groups if any(p.requires_grad for p in group["params"])}
    if len(rates) != 1:
        raise ValueError(f"the plain-SGD view needs one learning rate; the optimizer has {sorted(rates)}")
    return rates.pop()


def concat_labels(labels: list[TokenLabels]) -> TokenLabels | None:
    if not labels:
        return None
    return TokenLabels(
        group=torch.cat([lab.group for lab in labels]),
        example=torch.cat([lab.example for lab in labels]),
        sequence_group=torch.cat([lab.sequence_group for lab in labels]),
    )


def positive_completion_batches(
    micro_batches: list[CapturedMicroBatch], labels: list[TokenLabels], positive_group: int = 0
) -> tuple[TokenBatch, TokenLabels]:
    """GRPO's positive-advantage completions of the step as one token batch at temperature 1, with their labels.

    Lazy likelihood displacement is about `ln pi(y_i | x)` of the correct completions, so these are scored at
    temperature 1 whatever temperature the trainer samples and scores at.
    """
    batches, kept = [], []
    for mb, lab in zip(micro_batches, labels):
        keep = lab.group == positive_group
        rows = target_rows(mb.batch).cpu()
        positive_rows = rows[keep].unique()
        if positive_rows.numel() == 0:
            continue
        row_keep = torch.zeros(mb.batch.input_ids.shape[0], dtype=torch.bool)
        row_keep[positive_rows] = True
        batches.append(replace(select_rows(mb.batch, row_keep), temperature=1.0, model_kwargs={}))
        kept.append(
            TokenLabels(group=lab.group[keep], example=lab.example[keep], sequence_group=lab.sequence_group[keep])
        )
    if not batches:
        raise ValueError("no positive-advantage completion in this step's batch")
    return concat_token_batches(batches), concat_labels(kept)


def lazy_likelihood_displacement(
    before: Tensor,
    after: Tensor,
    prediction: Prediction,
    labels: TokenLabels,
    cell_names: list[tuple[str, str]],
    all_labels: TokenLabels,
    group_scores: dict[int, dict[str, float | None]] | None = None,
) -> list[dict[str, Any]]:
    """Per GRPO group: `Delta = mean_{i in P} [lp(y_i|x) after - before]` (sequence log-probs), its prediction,
    the part of the current-gradient prediction due to negative-advantage completions, and the group's GWHES
    fields from `group_scores` (`group_hidden_scores`) when given.

    Args:
        before, after (`Tensor[M]`): log-probs of the positive completions' targets at `w_t`, `w_{t+1}`.
        prediction: the `Prediction` of the same targets (`explanation.extra[...]`).
        labels (`TokenLabels`): labels of those targets; `all_labels`: of every training target of the step
            (to count each group's negative completions).
    """
    negative_cells = [k for k, (_, group) in enumerate(cell_names) if group == "negative_advantage"]
    from_negative = prediction.cells[negative_cells].sum(0) if negative_cells else torch.zeros_like(before)
    out = []
    for group in labels.sequence_group.unique().tolist():
        in_group = labels.sequence_group == group
        examples = labels.example[in_group].unique()

        def mean_over_completions(values: Tensor, in_group: Tensor = in_group, examples: Tensor = examples) -> float:
            per_completion = [float(values[in_group & (labels.example == e)].sum()) for e in examples.tolist()]
            return sum(per_completion) / len(per_completion)

        group_all = all_labels.sequence_group == group
        out.append(
            {
                "group": int(group),
                "delta_observed": mean_over_completions((after - before).cpu()),
                "delta_predicted": mean_over_completions(prediction.predicted.cpu()),
                "delta_from_negative": mean_over_completions(from_negative.cpu()),
                "num_positive": int(examples.numel()),
                "num_negative": int(all_labels.example[group_all & (all_labels.group == 1)].unique().numel()),
                **({} if group_scores is None else group_scores.get(int(group), dict.fromkeys(GWHES_FIELDS))),
            }
        )
    return out


GWHES_FIELDS = ("gwhes", "gwhes_negative", "gwhes_positive")
"""The `lld` record fields of `group_hidden_scores`: `GroupScores.gwhes`, `.negative`, `.positive`."""


def target_advantages(micro_batch: CapturedMicroBatch) -> Tensor:
    """`[M]` GRPO advantage of the completion of every target of a captured micro-batch (row-major); per-token
    advantages `[B, C]` are averaged over the completion's tokens."""
    inputs = micro_batch.loss_inputs
    advantages = inputs["advantages"].detach().float()
    if advantages.dim() == 2:
        mask = inputs["completion_mask"].to(advantages.dtype)
        advantages = (advantages * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    num_rows = micro_batch.batch.input_ids.shape[0]
    rows = torch.arange(num_rows) + micro_batch.row_offset
    return advantages.cpu()[rows][target_rows(micro_batch.batch).cpu()]


@torch.no_grad()
def group_hidden_scores(
    model: nn.Module,
    micro_batches: list[CapturedMicroBatch],
    labels: list[TokenLabels],
    aggregation: gwhes.Aggregation = "token_sum",
    temperature: float = 1.0,
) -> dict[int, dict[str, float | None]]:
    """GWHES (`trl_ntk.ntk.gwhes.gwhes`) of every GRPO group of the step, at the current weights, keyed by the
    group's `sequence_group`: `{"gwhes", "gwhes_negative", "gwhes_positive"}`, `None` where the group is not mixed.

    The score is the paper's `alpha`-weighted form (Deng et al. 2025, Theorem 4.4; `gwhes.gwhes` with the model's
    head as `logits`, `alpha` over the group's token ids at the sampling `temperature`). The final-layer hidden
    states of the completions come from one no-grad forward per micro-batch through the shared forward path
    (`logprobs.final_hidden`, the trainer's own inputs); each group's completions are packed into `[n, T_max, d]`
    with their sampled token ids and scored with their advantages and `group_size = n`.

    Cost: one forward of the decoder body per micro-batch, plus the head on about `3 n` rows per group (the NTHR
    hidden reward); memory `O(M d)`.
    """
    hidden = torch.cat([logprobs.final_hidden(model, mb.batch).cpu() for mb in micro_batches])
    token_ids = torch.cat([mb.batch.input_ids[:, 1:][mb.batch.target_mask[:, 1:]].cpu() for mb in micro_batches])
    device = next(model.parameters()).device

    def head(rows: torch.Tensor) -> torch.Tensor:
        return logprobs.head_logits(model, rows.to(device)).cpu()

    advantages = torch.cat([target_advantages(mb) for mb in micro_batches])
    step_labels = concat_labels(labels)
    out = {}
    for group in step_labels.sequence_group.unique().tolist():
        in_group = step_labels.sequence_group == group
        rows = [in_group & (step_labels.example == e) for e in step_labels.example[in_group].unique().tolist()]
        length = max(int(row.sum()) for row in rows)
        packed = hidden.new_zeros(len(rows), length, hidden.shape[-1])
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for k, row in enumerate(rows):
            n = int(row.sum())
            packed[k, :n], ids[k, :n], mask[k, :n] = hidden[row], token_ids[row], True
        completion_advantages = torch.stack([advantages[row][0] for row in rows])
        scores = gwhes.gwhes(
            packed,
            mask,
            completion_advantages,
            len(rows),
            aggregation=aggregation,
            logits=head,
            completion_ids=ids,
            temperature=temperature,
        )
        values = (scores.gwhes, scores.negative, scores.positive)
        out[int(group)] = {
            name: None if bool(value.isnan().any()) else float(value[0])
            for name, value in zip(GWHES_FIELDS, values, strict=True)
        }
    return out


def renumbered_group_scores(parts: list[tuple[dict[int, dict[str, Any]], int]]) -> dict[int, dict[str, Any]]:
    """Per-rank `group_hidden_scores` merged with the group numbering of `_dist.concat_renumbered`: part `r`'s
    groups shifted by the group counts (`parts[r][1]`, the rank's largest sequence group + 1) of parts `< r`."""
    merged, offset = {}, 0
    for scores, count in parts:
        merged.update({group + offset: value for group, value in scores.items()})
        offset += count
    return merged
