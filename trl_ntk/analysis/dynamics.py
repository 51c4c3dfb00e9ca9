"""One analysis step, trainer-free: why each probe token's log-prob moved in one optimizer update.

Inputs: the model at `w_t` (gradients of the step in `.grad`), the probe token batch, the captured training
micro-batches with their gradient coefficients `c_l`, the adapter's token labels and the optimizer. With
`g = sum_l c_l grad lp_l` (times the clip and cross-rank factor `s`) and the optimizer's split of its update
`dw = -P g + history` (`kernels.optimizer_step_split`), every probe token m gets

    predicted_m         = < grad lp~_m, dw >                                       (JVP along the real update)
    current_m           = - s * sum_l c_l < grad lp~_m, P grad lp_l >              (= sum over cells below)
    cell_m[sign, group] = - s * sum_{l in cell} c_l < grad lp~_m, P grad lp_l >    (one backward + one JVP each)
    history_m           = < grad lp~_m, history >                                  (momentum, weight decay)
    sgd_m               = - lr * < grad lp~_m, g >                                 (the seed's plain-SGD view)

and, at the "tokens" level, the matrix `a_{m,l} = - s * c_l * < grad lp~_m, P grad lp_l >` whose row sums are
`current_m`. The observed change comes from scoring the probes again after the optimizer step.

Under DDP every rank captures its own micro-batches: the cell JVPs and the raw gradient are summed across ranks
(`all_reduce`), and the matrix columns (with their training tokens, coefficients and labels) are gathered in rank
order (`all_gather`), so every rank holds the full `[Mp, L_all]` matrix and its row sums are the global `current_m`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from trl_ntk.analysis.guard import replayed_randomness
from trl_ntk.batches import CapturedMicroBatch, TokenBatch, TokenLabels, concat_token_batches, select_rows, target_rows
from trl_ntk.ntk import kernels

SIGN_NAMES = ("positive", "negative")  # positive gradient: c_l < 0 (pulled up); negative: c_l > 0 (pushed down)


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """`{name: parameter}` of the parameters with `requires_grad=True` (LoRA parameters for a PEFT model)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in a)


def _axpy(scale: float, x: dict[str, Tensor], y: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`scale * x + y`, name by name."""
    if y is None:
        return {n: scale * v for n, v in x.items()}
    return {n: scale * v + y[n] for n, v in x.items()}


def sum_by_row(values: Tensor, batch: TokenBatch) -> Tensor:
    """`[..., M] -> [..., B]`: per-target values summed over each row's targets."""
    rows = target_rows(batch).to(values.device)
    out = values.new_zeros(*values.shape[:-1], batch.input_ids.shape[0])
    return out.index_add_(-1, rows, values)


@dataclass
class GradientCheck:
    """How well the captured signal reconstructs the gradient the optimizer applies.

    `clip_scale` is the least-squares factor `s` with `.grad ~= s * sum_l c_l grad lp_l` (the clip factor, 1 when
    no clipping applied); `cosine` and `relative_error` measure the reconstruction after scaling.
    """

    cosine: float
    relative_error: float
    clip_scale: float

    @classmethod
    def from_dots(cls, raw_norm_sq: float, applied_norm_sq: float, applied_dot_raw: float) -> GradientCheck:
        """From `||raw||^2`, `||applied||^2` and `<applied, raw>`: `s = <applied, raw> / ||raw||^2` and
        `||applied - s raw||^2 = ||applied||^2 - 2 s <applied, raw> + s^2 ||raw||^2`."""
        scale = applied_dot_raw / raw_norm_sq if raw_norm_sq > 0 else 1.0
        if raw_norm_sq == 0 and applied_norm_sq == 0:  # nothing to explain (e.g. GRPO groups without reward variance)
            return cls(cosine=1.0, relative_error=0.0, clip_scale=1.0)
        residual_sq = max(applied_norm_sq - 2 * scale * applied_dot_raw + scale**2 * raw_norm_sq, 0.0)
        return cls(
            cosine=applied_dot_raw / max((raw_norm_sq * applied_norm_sq) ** 0.5, 1e-300),
            relative_error=residual_sq**0.5 / max(applied_norm_sq**0.5, 1e-300),
            clip_scale=scale,
        )


@dataclass
class UpdateExplanation:
    """The pre-step half of an analysis: everything predicted for the probe tokens, `[Mp]` each.

    Args:
        predicted: `<grad lp~_m, dw>`.
        current: the optimizer-aware current-gradient part.
        history: the momentum / weight-decay part (`predicted = current + history`).
        sgd: `-lr <grad lp~_m, g>`.
        cells: `[K, Mp]` the current part by (sign, group) cell, named in `cell_names`.
        matrix: `[M_selected, L]` the token attribution matrix of the probe rows in `matrix_rows` ("tokens" level).
        response_totals: `[B, L]` each probe response's attribution summed over its tokens ("tokens" level).
        train_targets: `[L]` training target ids, `train_coeffs` `[L]` their effective `s * c_l`,
        train_labels: the adapter labels concatenated over micro-batches.
        residual: `[Mp]` for losses on the plain logits, the part of `current` due to the logit residual `r_l`
            (`capture.py`), `- s <grad lp~_m, P sum_l J_l^T r_l>`; not among the cells nor in the token matrix.
            `None` when the step has none (the fused head, a plain cross-entropy).
    """

    predicted: Tensor
    current: Tensor
    history: Tensor
    sgd: Tensor
    cells: Tensor
    cell_names: list[tuple[str, str]]
    gradient_check: GradientCheck
    path: str
    grad_coeff_norm: float
    matrix: Tensor | None = None
    matrix_rows: Tensor | None = None
    response_totals: Tensor | None = None
    kernel_norms: dict[str, Tensor] = field(default_factory=dict)
    train_targets: Tensor | None = None
    train_batches: list[TokenBatch] = field(default_factory=list)
    train_coeffs: Tensor | None = None
    train_labels: TokenLabels | None = None
    extra: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    residual: Tensor | None = None


def _cells(labels: list[TokenLabels], coeffs: list[Tensor], group_names: tuple[str, ...]) -> list[tuple[int, int]]:
    """(sign index, group index) pairs that hold at least one training token with a non-zero coefficient."""
    present = set()
    for lab, c in zip(labels, coeffs):
        for sign_index, sign_mask in enumerate((c < 0, c > 0)):
            for g in lab.group[sign_mask.cpu()].unique().tolist():
                present.add((sign_index, int(g)))
    return sorted(present)


def step_cells(
    labels: list[TokenLabels],
    coeffs: list[Tensor],
    group_names: tuple[str, ...],
    all_reduce: Any = None,
    device: torch.device | str = "cpu",
) -> list[tuple[int, int]]:
    """The (sign index, group index) cells of the step, in a fixed order; under DDP / FSDP (`all_reduce` given) the
    union over ranks, so that every rank runs the same cells in the same order for the collectives that follow."""
    cell_ids = _cells(labels, coeffs, group_names)
    if all_reduce is None:
        return cell_ids
    present = torch.zeros(2, len(group_names), device=device)
    for sign_index, group_index in cell_ids:
        present[sign_index, group_index] = 1.0
    all_reduce(present)
    return [(s, g) for s in range(2) for g in range(len(group_names)) if present[s, g] > 0]


def cell_weights(labels: list[TokenLabels], coeffs: list[Tensor], sign_index: int, group_index: int) -> list[Tensor]:
    """Per micro-batch `[M_i]`: `c_l` on the training tokens of one (sign, group) cell, 0 elsewhere."""
    weights = []
    for lab, c in zip(labels, coeffs):
        in_sign = (c < 0) if sign_index == 0 else (c > 0)
        in_cell = in_sign & (lab.group.to(c.device) == group_index)
        weights.append(torch.where(in_cell, c, torch.zeros_like(c)))
    return weights


def reconstruct_gradient(
    model: nn.Module,
    micro_batches: list[CapturedMicroBatch],
    weights: list[Tensor],
    params: dict[str, Tensor],
) -> dict[str, Tensor]:
    """`sum_l w_l grad lp_l` over all micro-batches (one weighted backward per micro-batch), each forward with the
    dropout masks and noise of the training forward it reproduces (`mb.rng_state`, when recorded)."""
    total: dict[str, Tensor] | None = None
    for mb, w in zip(micro_batches, weights):
        if not bool((w != 0).any()):
            continue
        with replayed_randomness(model, mb.rng_state):
            grad = kernels.logprob_grad(model, mb.batch, w, params=list(params))
        total = grad if total is None else {n: total[n] + grad[n] for n in total}
    if total is None:
        total = {n: torch.zeros_like(p) for n, p in params.items()}
    return total


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
    all_reduce: Any = None,
    all_gather: Any = None,
    chunk_size: int | None = None,
    kernel_summaries: bool = False,
    extra_batches: dict[str, TokenBatch] | None = None,
    matrix_rows: Tensor | None = None,
) -> UpdateExplanation:
    """Predict the change of every probe token over the coming optimizer step (call before `optimizer.step()`).

    Args:
        model (`nn.Module`): at `w_t`, in eval mode, with the step's gradient in `.grad` (clipped and averaged
            as the optimizer will apply it).
        probe_batch (`TokenBatch`): the probe responses; `Mp` targets.
        micro_batches, labels: the captured training forwards and their adapter labels.
        group_names (`tuple[str, ...]`): the adapter's group names.
        optimizer: the (possibly wrapped) torch optimizer about to step.
        attribution (`str`): `"sums"` (cells, about `K` batch backwards + `K` probe JVPs) or `"tokens"` (adds the
            `[Mp, L]` matrix, about `min(Mp, L)` batch JVPs).
        coeff_scale (`float`): factor on `c_l` before clipping (`1 / world_size` under DDP averaging).
        all_reduce (`callable`, *optional*): sums a tensor across ranks in place (DDP); `None` on one process.
        all_gather (`callable`, *optional*): `obj -> [obj of rank 0, obj of rank 1, ...]` (DDP); gathers the
            "tokens" level columns of every rank. Without it under DDP the matrix holds this rank's columns only.
        chunk_size (`int`, *optional*): rows of parameter-sized tangents held at once.
        kernel_summaries (`bool`): also compute the log-prob kernel and pNTK norms between probe and batch.
        extra_batches (`dict[str, TokenBatch]`, *optional*): other token batches whose changes are predicted along
            the same directions (GRPO's own completions for lazy likelihood displacement); results in
            `explanation.extra[name]` as `{"predicted", "current", "history", "cells"}`.
        matrix_rows (`Tensor[B]` bool, *optional*): at the "tokens" level, the probe rows (responses) whose full
            token x token matrix is computed (about `M_selected` batch JVPs); every response gets its per-training-
            token totals `response_totals [B, L]` from one probe backward + one batch JVP each. `None`: all rows.

    Returns:
        `UpdateExplanation`. Holds four parameter-sized dicts at once (`P`, history, the running raw gradient and
        one cell's gradient), never `[Mp, P]`.
    """
    params = trainable_parameters(model)
    names = list(params)
    applied = {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    coeffs = [mb.grad_coeffs * coeff_scale for mb in micro_batches]
    cell_ids = step_cells(labels, coeffs, group_names, all_reduce, device=next(iter(applied.values())).device)

    preconditioner, history = kernels.optimizer_step_split(optimizer, params)
    lr = learning_rate(optimizer)
    batches = {"probe": probe_batch, **(extra_batches or {})}

    # One cell at a time: its gradient g_k (one backward per micro-batch), the JVPs of every batch along -P * g_k,
    # then g_k is dropped. Alive at once: P, history, the running raw gradient and one g_k.
    raw = {n: torch.zeros_like(applied[n]) for n in names}
    cell_rows: dict[str, list[Tensor]] = {name: [] for name in batches}
    for sign_index, group_index in cell_ids:
        weights = cell_weights(labels, coeffs, sign_index, group_index)
        direction = reconstruct_gradient(model, micro_batches, weights, params)
        for n in names:
            raw[n] += direction[n]
            direction[n].mul_(-preconditioner[n].to(direction[n].dtype))
        for name, batch in batches.items():
            cell_rows[name].append(_probe_jvps(model, batch, [direction], names)[0][0])
        del direction

    residual_rows = _logit_residual_rows(
        model, micro_batches, batches, params, preconditioner, coeff_scale, raw, all_reduce
    )
    if all_reduce is not None:
        for n in names:
            all_reduce(raw[n])
    raw_norm_sq = float(_dot(raw, raw))
    applied_norm_sq = float(_dot(applied, applied))
    applied_dot_raw = float(_dot(applied, raw))
    del raw
    check = GradientCheck.from_dots(raw_norm_sq, applied_norm_sq, applied_dot_raw)
    scale = check.clip_scale

    sgd_direction = {n: -lr * applied[n] for n in names}
    tail, path = _probe_jvps(model, probe_batch, [history, sgd_direction], names)
    del sgd_direction
    history_change, sgd_change = tail[0], tail[1]

    def cells_of(name: str, like: Tensor) -> Tensor:
        """`[K, M]` scaled cell predictions of one batch, summed across ranks."""
        if not cell_rows[name]:
            return like.new_zeros(0, like.shape[-1])
        values = torch.stack(cell_rows[name]) * scale
        if all_reduce is not None:
            all_reduce(values)
        return values

    def residual_of(name: str) -> Tensor | None:
        if residual_rows is None:
            return None
        values = residual_rows[name] * scale
        if all_reduce is not None:
            all_reduce(values)
        return values

    cells = cells_of("probe", history_change)
    residual = residual_of("probe")
    current = cells.sum(0) if len(cell_ids) else torch.zeros_like(history_change)
    current = current if residual is None else current + residual
    extra = {}
    for name, batch in (extra_batches or {}).items():
        extra_history = _probe_jvps(model, batch, [history], names)[0][0]
        extra_cells = cells_of(name, extra_history)
        extra_current = extra_cells.sum(0) if len(cell_ids) else torch.zeros_like(extra_history)
        extra_residual = residual_of(name)
        if extra_residual is not None:
            extra_current = extra_current + extra_residual
        extra[name] = {
            "cells": extra_cells,
            "current": extra_current,
            "history": extra_history,
            "predicted": extra_current + extra_history,
        }

    coeff_sq = torch.cat(coeffs).double().pow(2).sum() if coeffs else torch.zeros((), dtype=torch.float64)
    coeff_sq = coeff_sq.to(next(iter(applied.values())).device) if applied else coeff_sq
    if all_reduce is not None:
        all_reduce(coeff_sq)

    explanation = UpdateExplanation(
        predicted=current + history_change,
        current=current,
        history=history_change,
        sgd=sgd_change,
        cells=cells,
        cell_names=[(SIGN_NAMES[s], group_names[g]) for s, g in cell_ids],
        gradient_check=check,
        path=path,
        grad_coeff_norm=float(coeff_sq) ** 0.5 * abs(scale),
        train_labels=concat_labels(labels),
        extra=extra,
        residual=residual,
    )
    chunking = {} if chunk_size is None else {"chunk_size": chunk_size}
    if attribution == "tokens":
        rows = target_rows(probe_batch)
        response_weights = torch.zeros(probe_batch.input_ids.shape[0], probe_batch.num_targets, device=rows.device)
        response_weights[rows, torch.arange(rows.numel(), device=rows.device)] = 1.0
        matrix_mask = (
            torch.ones(probe_batch.input_ids.shape[0], dtype=torch.bool) if matrix_rows is None else matrix_rows.cpu()
        )
        matrix_batch = select_rows(probe_batch, matrix_mask) if bool(matrix_mask.any()) else None
        totals, columns = [], []
        for mb, c in zip(micro_batches, coeffs):
            totals.append(
                kernels.attribution_column_sums_direct(
                    model,
                    probe_batch,
                    mb.batch,
                    c,
                    lr=scale,
                    probe_weights=response_weights,
                    params=names,
                    preconditioner=preconditioner,
                    **chunking,
                )
            )
            if matrix_batch is not None:
                kernel = kernels.logprob_kernel(
                    model, matrix_batch, mb.batch, params=names, preconditioner=preconditioner, **chunking
                )
                columns.append(-scale * kernel * c.to(kernel.dtype)[None, :])
        explanation.response_totals = torch.cat(totals, dim=1)
        explanation.matrix = torch.cat(columns, dim=1) if columns else None
        explanation.matrix_rows = matrix_mask
        explanation.train_targets = torch.cat([mb.batch.targets for mb in micro_batches])
        explanation.train_coeffs = torch.cat(coeffs) * scale
        explanation.train_batches = [mb.batch for mb in micro_batches]
        if all_gather is not None:
            _gather_columns(explanation, all_gather)
    if kernel_summaries:
        squares = torch.zeros(2, dtype=torch.float64, device=coeff_sq.device)
        for mb in micro_batches:
            squares[0] += kernels.logprob_kernel(model, probe_batch, mb.batch, params=names, **chunking).pow(2).sum()
            squares[1] += kernels.pntk(model, probe_batch, mb.batch, params=names, **chunking).pow(2).sum()
        if all_reduce is not None:
            all_reduce(squares)
        explanation.kernel_norms = {"logprob_norm": float(squares[0]) ** 0.5, "pntk_norm": float(squares[1]) ** 0.5}
    return explanation


def _logit_residual_rows(
    model: nn.Module,
    micro_batches: list[CapturedMicroBatch],
    batches: dict[str, TokenBatch],
    params: dict[str, Tensor],
    preconditioner: dict[str, Tensor],
    coeff_scale: float,
    raw: dict[str, Tensor],
    all_reduce: Any,
) -> dict[str, Tensor] | None:
    """For losses on the plain logits: the gradient of the logit residuals `g_r = coeff_scale * sum_l J_l^T r_l`
    (added into `raw`) and each batch's unscaled JVPs `[M]` along `-P g_r`; `None` when no rank has a residual.

    Cost: one full-logits forward and backward per micro-batch with a residual, one batched JVP per batch.
    """
    flag = torch.tensor([float(any(mb.logit_residual is not None for mb in micro_batches))])
    if all_reduce is not None:
        device = next(iter(raw.values())).device
        flag = flag.to(device)
        all_reduce(flag)
    if float(flag.sum()) == 0:
        return None
    names = list(params)
    direction = {n: torch.zeros_like(raw[n]) for n in names}
    for mb in micro_batches:
        if mb.logit_residual is None:
            continue
        with replayed_randomness(model, mb.rng_state):
            gradient = kernels.logit_cotangent_grad(
                model, mb.batch, mb.residual_positions, mb.logit_residual * coeff_scale, params=names
            )
        for n in names:
            direction[n] += gradient[n]
    for n in names:
        raw[n] += direction[n]
        direction[n].mul_(-preconditioner[n].to(direction[n].dtype))
    return {name: _probe_jvps(model, batch, [direction], names)[0][0] for name, batch in batches.items()}


def _gather_columns(explanation: UpdateExplanation, all_gather: Any) -> None:
    """Replace this rank's "tokens" level columns by those of every rank, in rank order (DDP).

    Examples and sequence groups are renumbered so that they stay distinct across ranks (rank r's numbers follow
    those of ranks < r). Moves `[Mp, L_rank]` floats per rank through the CPU; every rank must call it.
    """
    device = explanation.response_totals.device
    labels = explanation.train_labels
    local = (
        None if explanation.matrix is None else explanation.matrix.cpu(),
        explanation.train_targets.cpu(),
        explanation.train_coeffs.cpu(),
        [batch.to("cpu") for batch in explanation.train_batches],
        None if labels is None else (labels.group.cpu(), labels.example.cpu(), labels.sequence_group.cpu()),
        explanation.response_totals.cpu(),
    )
    gathered = all_gather(local)
    if explanation.matrix is not None:
        explanation.matrix = torch.cat([part[0] for part in gathered], dim=1).to(device)
    explanation.response_totals = torch.cat([part[5] for part in gathered], dim=1).to(device)
    explanation.train_targets = torch.cat([part[1] for part in gathered])
    explanation.train_coeffs = torch.cat([part[2] for part in gathered])
    explanation.train_batches = [batch for part in gathered for batch in part[3]]
    if labels is None:
        return
    groups, examples, sequence_groups = [], [], []
    example_offset = sequence_offset = 0
    for part in gathered:
        group, example, sequence_group = part[4]
        groups.append(group)
        examples.append(example + example_offset)
        sequence_groups.append(sequence_group + sequence_offset)
        example_offset += int(example.max()) + 1 if example.numel() else 0
        sequence_offset += int(sequence_group.max()) + 1 if sequence_group.numel() else 0
    explanation.train_labels = TokenLabels(
        group=torch.cat(groups), example=torch.cat(examples), sequence_group=torch.cat(sequence_groups)
    )


def _probe_jvps(
    model: nn.Module, batch: TokenBatch, directions: list[dict[str, Tensor]], names: list[str]
) -> tuple[Tensor, str]:
    """`[len(directions), M]` JVPs of the batch's target log-probs, and the JVP path that ran.

    The directions run as one batched JVP (`vmap` over stacked tangents, `kernels.DEFAULT_CHUNK_SIZE` at a time), so
    the primal forward is shared; an all-zero direction (e.g. `history` without momentum or weight decay) is not run.
    Allocates one stacked copy of (at most a chunk of) the directions, in the parameters' dtype.
    """
    path = kernels.select_jvp_path(model, names)
    (batch,) = kernels._prepare(model, batch)
    values = kernels.select_params(model, names)
    rows = torch.zeros(len(directions), batch.num_targets, device=next(iter(values.values())).device)
    nonzero = [
        k for k, direction in enumerate(directions) if bool(torch.stack([direction[n].any() for n in names]).any())
    ]
    with kernels._forward_mode_attention(model, path):
        score = kernels._score_fn(model, batch, "logprob", differentiable=path is not kernels.JvpPath.FINITE_DIFFERENCE)
        for start in range(0, len(nonzero), kernels.DEFAULT_CHUNK_SIZE):
            chunk = nonzero[start : start + kernels.DEFAULT_CHUNK_SIZE]
            tangents = {n: torch.stack([directions[k][n].to(values[n]) for k in chunk]) for n in names}
            jvps = kernels._jvp_rows(score, values, tangents, path, kernels.DEFAULT_FD_STEP)
            rows[chunk] = jvps.detach().float()
    return rows, path.value


def learning_rate(optimizer: Any) -> float:
    """The learning rate of the coming step (one value: the plain-SGD view needs a single `eta`)."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
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
    prediction: dict[str, Tensor],
    labels: TokenLabels,
    cell_names: list[tuple[str, str]],
    all_labels: TokenLabels,
) -> list[dict[str, Any]]:
    """Per GRPO group: `Delta = mean_{i in P} [lp(y_i|x) after - before]` (sequence log-probs), its prediction,
    and the part of the current-gradient prediction due to negative-advantage completions.

    Args:
        before, after (`Tensor[M]`): log-probs of the positive completions' targets at `w_t`, `w_{t+1}`.
        prediction: `explanation.extra[...]` for the same targets.
        labels (`TokenLabels`): labels of those targets; `all_labels`: of every training target of the step
            (to count each group's negative completions).
    """
    negative_cells = [k for k, (_, group) in enumerate(cell_names) if group == "negative_advantage"]
    from_negative = prediction["cells"][negative_cells].sum(0) if negative_cells else torch.zeros_like(before)
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
                "delta_predicted": mean_over_completions(prediction["predicted"].cpu()),
                "delta_from_negative": mean_over_completions(from_negative.cpu()),
                "num_positive": int(examples.numel()),
                "num_negative": int(all_labels.example[group_all & (all_labels.group == 1)].unique().numel()),
            }
        )
    return out
