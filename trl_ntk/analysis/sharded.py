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

with the step `h` of `finite_difference_jvps`. `ShardedBackend` gives these to `dynamics.explain_update`, which then
computes the same predictions as on dense parameters ("sums" level); the token level is not computed on sharded
parameters.

FSDP2 keeps the root module's parameters gathered after a forward that has no backward; `reshard` is called after
every forward here so that `model.named_parameters()` are the sharded parameters again and the next forward gathers
the current slices.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from trl_ntk import _dist
from trl_ntk._model import TensorDict, float64_dot, input_device, local_shard, trainable_parameters
from trl_ntk.analysis.guard import replayed_randomness
from trl_ntk.batches import CapturedMicroBatch, TokenBatch
from trl_ntk.ntk.jvp import DEFAULT_FD_STEP, JvpPath
from trl_ntk.ntk.logprobs import model_target_logits
from trl_ntk.ntk.optim import StepSplit, optimizer_step_split
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
    return float(_dist.all_reduce(float64_dot(a, b).to(next(iter(a.values())).device)))


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
            with torch.enable_grad(), replayed_randomness(model, mb.rng_state):
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


class ShardedBackend:
    """`dynamics.StepBackend` on FSDP2 shards: every parameter dict holds this rank's slices; gradients are summed
    over ranks by FSDP's reduce-scatter and JVPs are global, so `reduce` is the identity.

    Cost of one step analysis: `K` backward passes of the step's micro-batches (`K` cells) and `4 (K + 2)` to
    `6 (K + 2)` no-grad forwards of the probe batch (and of each extra batch).
    """

    path = JvpPath.FINITE_DIFFERENCE.value

    def __init__(self, model: nn.Module, *, fd_step: float = DEFAULT_FD_STEP, batch_size: int = 32) -> None:
        reshard(model)
        self.model = model
        self.params = trainable_parameters(model)
        self.names = list(self.params)
        self.fd_step = fd_step
        self.batch_size = batch_size

    def applied_gradient(self) -> TensorDict:
        return {
            n: local_shard(p.grad).detach() if p.grad is not None else torch.zeros_like(local_shard(p))
            for n, p in self.params.items()
        }

    def step_split(self, optimizer: torch.optim.Optimizer) -> StepSplit:
        split = optimizer_step_split(optimizer, self.params)
        return StepSplit(
            {n: local_shard(v) for n, v in split.preconditioner.items()},
            {n: local_shard(v) for n, v in split.history.items()},
        )

    def weighted_gradient(self, micro_batches: list[CapturedMicroBatch], weights: list[Tensor]) -> TensorDict:
        """`weighted_gradient`, after checking that every rank captured as many forwards (each runs one backward
        per forward, and FSDP's collectives must pair up)."""
        most, fewest = _dist.max_over_ranks([len(micro_batches), -len(micro_batches)])
        if most != -fewest:
            raise RuntimeError(
                f"the ranks captured different numbers of training forwards this step ({int(-fewest)} to "
                f"{int(most)}); the sharded analysis runs one backward per forward on every rank"
            )
        return weighted_gradient(self.model, micro_batches, weights, self.names)

    def residual_gradient(self, micro_batches: list[CapturedMicroBatch], coeff_scale: float) -> TensorDict:
        raise ValueError(
            "the loss reaches the model through its plain logits with terms beyond the trained tokens' log-probs "
            "(label smoothing, a compute_loss_func, or bf16 round-off of a logit loss); that residual is not "
            "analysed on sharded parameters"
        )

    def jvps(self, batches: dict[str, TokenBatch], directions: list[TensorDict]) -> dict[str, Tensor]:
        return finite_difference_jvps(
            self.model, batches, directions, self.names, fd_step=self.fd_step, batch_size=self.batch_size
        )

    def reduce(self, tensor: Tensor) -> Tensor:
        return tensor

    def dot(self, a: TensorDict, b: TensorDict) -> float:
        return global_dot(a, b)

    def token_attribution(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("the 'tokens' level needs the full parameters on one process; FSDP shards them")

    def kernel_norms(self, probe_batch: TokenBatch, micro_batches: list[CapturedMicroBatch]) -> dict[str, float]:
        raise ValueError("kernel summaries need the full parameters on one process; FSDP shards them")
