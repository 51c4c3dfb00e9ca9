"""Step analysis when the parameters are sharded across ranks (FSDP2 `fully_shard`): finite differences on shards.

Under FSDP2 every rank holds one slice of each parameter (a `DTensor`) and each forward all-gathers them, so the
single-process kernels, which swap parameter values by name, do not apply. Here every rank takes part in every
forward and backward, and works on its own slice only:

    gradient   g = sum_ranks sum_l w_l grad lp_l       one backward per captured micro-batch; FSDP reduce-scatters
                                                       it, each rank keeps its slice
    JVP        <grad lp~_m, d> ~= [8 (lp~_m(w + h d) - lp~_m(w - h d)) - (lp~_m(w + 2h d) - lp~_m(w - 2h d))] / 12h
                                                       every rank moves its slice in place, one forward per point,
                                                       then copies the saved slice back (bit for bit)
    dot        <a, b> = all_reduce(sum over the local slices)

with the step `h` of `finite_difference_jvps`. This gives the observed, predicted, optimizer-aware, history, SGD-view
and (sign, group) cell changes of `dynamics.explain_update` ("sums" level); the token-level matrix is not computed
on sharded parameters.

FSDP2 keeps the root module's parameters gathered after a forward that has no backward; `reshard` is called after
every forward here so that `model.named_parameters()` are the sharded parameters again and the next forward gathers
the current slices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trl_ntk import _dist
from trl_ntk._model import input_device, local_shard, trainable_parameters
from trl_ntk.analysis.dynamics import (
    SIGN_NAMES,
    GradientCheck,
    UpdateExplanation,
    cell_weights,
    concat_labels,
    learning_rate,
    step_cells,
)
from trl_ntk.batches import CapturedMicroBatch, TokenBatch, TokenLabels
from trl_ntk.ntk.jvp import DEFAULT_FD_STEP, JvpPath
from trl_ntk.ntk.logprobs import model_target_logits
from trl_ntk.ntk.optim import optimizer_step_split
from trl_ntk.probes.scoring import score_responses


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module (a no-op for other models)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def global_dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """`<a, b>` of two sharded parameter dicts given as local slices: the local sums, added across ranks."""
    local = sum(((a[n].double() * b[n].double()).sum() for n in a), torch.zeros((), dtype=torch.float64))
    return float(_dist.all_reduce(local.to(next(iter(a.values())).device)))


def target_logprobs(model: nn.Module, batch: TokenBatch) -> Tensor:
    """`[M]` `log_softmax(z / temperature)[y]` of the batch's targets from one full forward of the (root) model
    (`logprobs.model_target_logits`), with gradient when grad mode is on. Runs the whole model so that FSDP gathers
    every parameter it holds."""
    batch = batch.to(input_device(model))
    logits = model_target_logits(model, batch)
    return torch.log_softmax(logits / batch.temperature, dim=-1).gather(-1, batch.targets[:, None]).squeeze(-1)


def score_sharded(model: nn.Module, batch: TokenBatch, batch_size: int = 32):
    """`scoring.score_responses` through the full forward (every rank, same batch), then `reshard`."""
    try:
        return score_responses(model, batch, batch_size=batch_size, strategy="logits")
    finally:
        reshard(model)


def weighted_gradient(
    model: nn.Module, micro_batches: list[CapturedMicroBatch], weights: list[Tensor], names: list[str]
) -> dict[str, Tensor]:
    """This rank's slice of `sum_ranks sum_l w_l grad lp_l`, `name -> Tensor[*local shape]`.

    One forward and backward per micro-batch on every rank (also where all weights are 0, so that every rank runs
    the same collectives). FSDP averages the reduce-scattered gradient over ranks; the result is multiplied back by
    the world size. The step's own `.grad` is set aside and put back unchanged.

    Cost: one training forward + backward per micro-batch; allocates one gradient slice per parameter.
    """
    reshard(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {name: p.grad for name, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
        for mb, w in zip(micro_batches, weights):
            with torch.enable_grad():
                logprobs = target_logprobs(model, mb.batch)
                (logprobs * w.to(logprobs)).sum().backward()
        scale = float(_dist.world_size())
        return {
            name: local_shard(p.grad).detach() * scale if p.grad is not None else torch.zeros_like(local_shard(p))
            for name, p in params.items()
            if name in names
        }
    finally:
        for name, p in params.items():
            p.grad = saved[name]
        reshard(model)


MAX_CHANGE = 0.1
"""Largest log-prob change (nats) allowed at the first difference point; a steeper direction gets a shorter step."""


def finite_difference_jvps(
    model: nn.Module,
    batches: dict[str, TokenBatch],
    directions: list[dict[str, Tensor]],
    names: list[str],
    *,
    fd_step: float = DEFAULT_FD_STEP,
    max_change: float = MAX_CHANGE,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """`name -> [len(directions), M]`: JVPs of each batch's target log-probs along each direction, by the
    five-point central difference `[8 (f(w + h d) - f(w - h d)) - (f(w + 2h d) - f(w - 2h d))] / 12h` (error
    `O(h^4)`).

    The step starts at `||h d|| = fd_step * max(||w||, 1)`; when a log-prob then moves by more than `max_change`
    nats, `h` is shrunk so that the largest move is `max_change`. On the toy DPO run (AdamW), against the exact
    JVPs: the two-point difference with the fixed step was off by up to 4% of the cancelling cell terms along
    Adam-preconditioned directions (entries over five orders of magnitude) and by 12% along a steep gradient; this
    rule, by at most 0.3% and 0.01%.

    `directions` hold local slices (`name -> Tensor[*local shape]`). Every rank must call this with the same
    batches and directions in the same order (the step is agreed through `all_reduce`d norms and identical
    log-probs). Parameters are moved in place and restored from a saved copy, so the model is unchanged afterwards.
    A zero direction gives a zero row without a forward.

    Cost: four no-grad forwards of every batch per non-zero direction (six when the step is shrunk); holds one copy
    of the local slices.
    """
    reshard(model)
    params = {name: p for name, p in model.named_parameters() if name in set(names)}
    slices = {name: local_shard(p) for name, p in params.items()}
    saved = {name: value.detach().clone() for name, value in slices.items()}
    primal_norm = max(math.sqrt(global_dot(saved, saved)), 1.0)
    rows = {name: torch.zeros(len(directions), batch.num_targets) for name, batch in batches.items()}

    def logprobs_at(direction: dict[str, Tensor], shift: float) -> dict[str, Tensor]:
        with torch.no_grad():
            for name, value in slices.items():
                value.copy_(saved[name]).add_(direction[name].to(value.dtype), alpha=shift)
        return {name: _no_grad_logprobs(model, batch, batch_size) for name, batch in batches.items()}

    def difference(direction: dict[str, Tensor], step: float) -> dict[str, Tensor]:
        plus, minus = logprobs_at(direction, step), logprobs_at(direction, -step)
        return {name: plus[name] - minus[name] for name in batches}

    try:
        for k, direction in enumerate(directions):
            direction_norm = math.sqrt(global_dot(direction, direction))
            if direction_norm == 0:
                continue
            step = fd_step * primal_norm / direction_norm
            near = difference(direction, step)
            local = max(float(values.abs().max()) / 2 if values.numel() else 0.0 for values in near.values())
            (largest,) = _dist.max_over_ranks([local])  # every rank takes the same step
            if largest > max_change:  # a steep direction: shrink the step until no log-prob moves by more
                step *= max_change / largest
                near = difference(direction, step)
            far = difference(direction, 2 * step)
            for name in batches:
                rows[name][k] = ((8 * near[name] - far[name]) / (12 * step)).float().cpu()
    finally:
        with torch.no_grad():
            for name, value in slices.items():
                value.copy_(saved[name])
        reshard(model)
    return rows


def _no_grad_logprobs(model: nn.Module, batch: TokenBatch, batch_size: int) -> Tensor:
    scores = score_sharded(model, batch, batch_size=batch_size)
    return scores.flat_token_logps.double()


def explain_update(
    model: nn.Module,
    probe_batch: TokenBatch,
    micro_batches: list[CapturedMicroBatch],
    labels: list[TokenLabels],
    group_names: tuple[str, ...],
    optimizer: torch.optim.Optimizer,
    *,
    coeff_scale: float = 1.0,
    extra_batches: dict[str, TokenBatch] | None = None,
    fd_step: float = DEFAULT_FD_STEP,
    batch_size: int = 32,
) -> UpdateExplanation:
    """`dynamics.explain_update` at the "sums" level for sharded parameters (call on every rank, before the step).

    The same quantities, with `g_k` from `weighted_gradient` and every JVP from `finite_difference_jvps`:
    `predicted = current + history`, `current = sum_k cells_k`, `cells_k = - s <grad lp~_m, P g_k>`,
    `sgd = - lr <grad lp~_m, g>`, and the gradient check of `s * sum_k g_k` against the applied `.grad`. The cell
    and JVP values are global (every rank gets the same numbers); `coeff_scale` is `1 / world_size` as under DDP.

    Cost: `K` backward passes of the step's micro-batches (`K` cells, at most 2 x groups) and `4 (K + 2)` to
    `6 (K + 2)` no-grad forwards of the probe batch (and of each extra batch).
    """
    count = len(micro_batches)
    residual = float(any(mb.logit_residual is not None for mb in micro_batches))
    most, fewest, residual = _dist.max_over_ranks([count, -count, residual])  # decided together: no rank left waiting
    if most != -fewest:
        raise RuntimeError(
            f"the ranks captured different numbers of training forwards this step ({int(-fewest)} to {int(most)}); "
            "the sharded analysis runs one backward per forward on every rank"
        )
    if residual:
        raise ValueError(
            "the loss reaches the model through its plain logits with terms beyond the trained tokens' log-probs "
            "(label smoothing, a compute_loss_func, or bf16 round-off of a logit loss); that residual is not "
            "analysed on sharded parameters"
        )
    reshard(model)
    params = trainable_parameters(model)
    names = list(params)
    applied = {
        n: local_shard(p.grad).detach() if p.grad is not None else torch.zeros_like(local_shard(p))
        for n, p in params.items()
    }
    device = next(iter(applied.values())).device
    coeffs = [mb.grad_coeffs * coeff_scale for mb in micro_batches]
    cell_ids = step_cells(labels, coeffs, group_names, device=device)
    split = optimizer_step_split(optimizer, params)
    preconditioner = {n: local_shard(v) for n, v in split.preconditioner.items()}
    history = {n: local_shard(v) for n, v in split.history.items()}
    lr = learning_rate(optimizer)
    batches = {"probe": probe_batch, **(extra_batches or {})}

    raw = {n: torch.zeros_like(applied[n], dtype=torch.float64) for n in names}
    cell_rows: dict[str, list[Tensor]] = {name: [] for name in batches}
    for sign_index, group_index in cell_ids:
        weights = cell_weights(labels, coeffs, sign_index, group_index)
        gradient = weighted_gradient(model, micro_batches, weights, names)
        for n in names:
            raw[n] += gradient[n].double()
            gradient[n] = -preconditioner[n].to(gradient[n].dtype) * gradient[n]
        rows = finite_difference_jvps(model, batches, [gradient], names, fd_step=fd_step, batch_size=batch_size)
        for name in batches:
            cell_rows[name].append(rows[name][0])
        del gradient

    check = GradientCheck.from_dots(global_dot(raw, raw), global_dot(applied, applied), global_dot(applied, raw))
    scale = check.clip_scale
    del raw
    sgd_direction = {n: -lr * applied[n] for n in names}
    tail = finite_difference_jvps(
        model, batches, [history, sgd_direction], names, fd_step=fd_step, batch_size=batch_size
    )

    def parts(name: str) -> dict[str, Tensor]:
        history_change = tail[name][0]
        if cell_rows[name]:
            cells = torch.stack(cell_rows[name]) * scale
        else:
            cells = history_change.new_zeros(0, history_change.numel())
        current = cells.sum(0)
        return {"cells": cells, "current": current, "history": history_change, "predicted": current + history_change}

    probe = parts("probe")
    coeff_sq = sum((c.double().pow(2).sum() for c in coeffs), torch.zeros((), dtype=torch.float64)).to(device)
    return UpdateExplanation(
        predicted=probe["predicted"],
        current=probe["current"],
        history=probe["history"],
        sgd=tail["probe"][1],
        cells=probe["cells"],
        cell_names=[(SIGN_NAMES[s], group_names[g]) for s, g in cell_ids],
        gradient_check=check,
        path=JvpPath.FINITE_DIFFERENCE.value,
        grad_coeff_norm=float(_dist.all_reduce(coeff_sq)) ** 0.5 * abs(scale),
        train_labels=concat_labels(labels),
        extra={name: parts(name) for name in extra_batches or {}},
    )
