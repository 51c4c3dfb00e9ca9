"""Multi-step look-ahead: the probes' change after `k` SGD steps on a small candidate set, from the empirical NTK.

Linearise every token log-prob around the start `w_0`: `lp(w) ~ lp(w_0) + J (w - w_0)` with `J = d lp / d w`. Then
`k` full-batch SGD steps of a loss `L(z)` of the training log-probs `z [Mt]` (learning rate `eta`) are, in function
space (kernel gradient descent, the "approximate retraining" of the eNTK),

    c_t     = dL/dz (z_t)                                  [Mt]
    z_{t+1} = z_t - eta K_tt c_t,      K_tt = J_t J_t^T    [Mt, Mt]   (training tokens x training tokens)
    O_{t+1} = O_t - eta K_pt c_t,      K_pt = W J_p J_t^T  [R, Mt]    (probe objectives x training tokens)

with `O = W lp~` the probe objectives (`W [R, Mp]`, `lookahead.probe_weights`). The weights move by
`w_k - w_0 = J_t^T a_k`, `a_k = -eta sum_{t<k} c_t`, so the prediction can be re-linearised: apply that step (one
backward), recompute the kernels at the new weights and go on. With `k = 1` it is the one-step look-ahead; the
difference from `k` times the one-step effect is the change of `c_t` along the way (e.g. DPO's sigmoid saturating),
seen through the kernel. What it leaves out is the change of the kernel itself (the curvature of `lp` in `w`).

`linearised_dynamics` is the pure recurrence; `linearised_training` computes the kernels of a model
(`ntk.kernels.logprob_kernel`) and runs it, re-linearising every `relinearise_every` steps; `real_training` takes the
`k` real steps of the same loss, for comparison. `sft_loss` and `dpo_sigmoid_loss` build `L(z)` for the two common
cases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trl_ntk.batches import TokenBatch
from trl_ntk.ntk.kernels import logprob_grad, logprob_kernel
from trl_ntk.ntk.logprobs import primal_values, score_fn, target_logprobs

LossFn = Callable[[Tensor], Tensor]


@dataclass
class Trajectory:
    """A predicted (or observed) training trajectory on the candidate set.

    Args:
        probe_change (`Tensor[k+1, R]`): `O_t - O_0` for `t = 0..k`.
        train_logprobs (`Tensor[k+1, Mt]`): `z_t`.
        coefficients (`Tensor[Mt]`): `a_k` with `w_k - w_0 = J_t^T a_k` (linearised form only; empty otherwise).
    """

    probe_change: Tensor
    train_logprobs: Tensor
    coefficients: Tensor


def linearised_dynamics(
    train_kernel: Tensor, probe_kernel: Tensor, train_logprobs: Tensor, loss_fn: LossFn, *, lr: float, steps: int
) -> Trajectory:
    """`steps` SGD steps of `loss_fn` in the linearised model (kernel gradient descent, see the module docstring).

    Args:
        train_kernel (`Tensor[Mt, Mt]`): `K_tt[l, l'] = <grad lp_l, grad lp_l'>`.
        probe_kernel (`Tensor[R, Mt]`): `K_pt[r, l] = sum_m W[r, m] <grad lp~_m, grad lp_l>`.
        train_logprobs (`Tensor[Mt]`): `z_0`.
        loss_fn (`Callable`): `z [Mt] -> scalar`, the training loss as a function of the training log-probs.

    Cost: `steps` gradients of `loss_fn` (autograd on `Mt` numbers) and matrix-vector products with the kernels.
    """
    mt = train_logprobs.shape[0]
    if train_kernel.shape != (mt, mt) or probe_kernel.dim() != 2 or probe_kernel.shape[1] != mt:
        raise ValueError(
            f"need K_tt [Mt, Mt] and K_pt [R, Mt] for Mt = {mt}, got {tuple(train_kernel.shape)} and "
            f"{tuple(probe_kernel.shape)}"
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    z = train_logprobs.detach().double()
    k_tt, k_pt = train_kernel.double(), probe_kernel.double()
    change = torch.zeros(probe_kernel.shape[0], dtype=torch.float64, device=z.device)
    coefficients = torch.zeros_like(z)
    changes, zs = [change], [z]
    for _ in range(steps):
        c = loss_gradient(loss_fn, z)
        z = z - lr * (k_tt @ c)
        change = change - lr * (k_pt @ c)
        coefficients = coefficients - lr * c
        changes.append(change)
        zs.append(z)
    return Trajectory(torch.stack(changes), torch.stack(zs), coefficients)


def loss_gradient(loss_fn: LossFn, z: Tensor) -> Tensor:
    """`dL/dz [Mt]` at `z` (autograd through `loss_fn`)."""
    point = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(loss_fn(point), point)
    return gradient.detach()


# ------------------------------------------------------------------------------------------------- losses of z
def sequence_sums(z: Tensor, sequence: Tensor, num_sequences: int) -> Tensor:
    """`[S]`: the summed log-prob of each sequence; `sequence [Mt]` (long) is the sequence of each target."""
    return torch.zeros(num_sequences, dtype=z.dtype, device=z.device).index_add(0, sequence.to(z.device), z)


def sft_loss(num_targets: int) -> LossFn:
    """The mean token negative log-likelihood over the `num_targets` training tokens (`SFTTrainer`'s default)."""

    def loss(z: Tensor) -> Tensor:
        return -z.sum() / num_targets

    return loss


def dpo_sigmoid_loss(sequence: Tensor, reference: Tensor, beta: float) -> LossFn:
    """DPO's sigmoid loss of `P` pairs as a function of the token log-probs (`DPOTrainer`, `loss_type="sigmoid"`):

        L(z) = mean_i -log sigmoid(beta * ((s_i^c - ref_i^c) - (s_i^r - ref_i^r))),   s = sequence_sums(z)

    Args:
        sequence (`Tensor[Mt]`, long): the sequence of each target; sequences `0..P-1` are the chosen answers and
            `P..2P-1` the rejected ones (the trainer's row order).
        reference (`Tensor[2P]`): the reference model's summed log-prob of each sequence.
    """
    num_sequences = reference.shape[0]
    if num_sequences % 2:
        raise ValueError(f"need chosen and rejected halves, got {num_sequences} reference sequences")
    pairs = num_sequences // 2

    def loss(z: Tensor) -> Tensor:
        margin = sequence_sums(z, sequence, num_sequences) - reference.to(z)
        return -nn.functional.logsigmoid(beta * (margin[:pairs] - margin[pairs:])).mean()

    return loss


# ------------------------------------------------------------------------------------------------- model drivers
def _probe_objectives(model: nn.Module, probe_batch: TokenBatch, weights: Tensor) -> Tensor:
    lp = target_logprobs(model, probe_batch)
    return weights.to(lp) @ lp


@contextlib.contextmanager
def _restored_parameters(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """The model's trainable parameters by name; their values are put back when the block exits (even on error)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        yield params
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def linearised_training(
    model: nn.Module,
    train_batch: TokenBatch,
    probe_batch: TokenBatch,
    weights: Tensor,
    loss_fn: LossFn,
    *,
    lr: float,
    steps: int,
    relinearise_every: int | None = None,
    chunk_size: int = 16,
) -> Trajectory:
    """The probes' predicted change over `steps` SGD steps of `loss_fn` on `train_batch`, from the eNTK at the start,
    re-linearised every `relinearise_every` steps when given (the model's weights are restored afterwards).

    Cost per linearisation: `K_tt` (`Mt` backwards and `Mt` JVPs of the training batch) and `K_pt` (`min(Mp, Mt)`
    of each), `Mt^2` numbers held; a re-linearisation adds one backward (`w += J^T a`). Meant for small candidate sets
    (`Mt` up to a few thousand tokens). `chunk_size`: parameter-sized rows held at once by the kernels.
    """
    period = steps if relinearise_every is None else int(relinearise_every)
    if period < 1 and steps > 0:
        raise ValueError(f"relinearise_every must be >= 1, got {relinearise_every}")
    start = _probe_objectives(model, probe_batch, weights)
    changes, zs, done = [torch.zeros_like(start, dtype=torch.float64)], [], 0
    with _restored_parameters(model) as params:
        while True:
            z = target_logprobs(model, train_batch).double()
            zs = zs or [z]
            if done >= steps:
                break
            offset = (_probe_objectives(model, probe_batch, weights) - start).double()
            k_tt = logprob_kernel(model, train_batch, train_batch, chunk_size=chunk_size)
            k_pt = weights.to(k_tt) @ logprob_kernel(model, probe_batch, train_batch, chunk_size=chunk_size)
            count = min(period, steps - done)
            part = linearised_dynamics(k_tt, k_pt, z, loss_fn, lr=lr, steps=count)
            changes.extend(offset + part.probe_change[1:])
            zs.extend(part.train_logprobs[1:])
            done += count
            if done < steps:
                step = logprob_grad(model, train_batch, part.coefficients.to(z.device), params=list(params))
                with torch.no_grad():
                    for name, p in params.items():
                        p += step[name].to(p.dtype)
    return Trajectory(torch.stack(changes), torch.stack(zs), torch.empty(0))


def real_training(
    model: nn.Module,
    train_batch: TokenBatch,
    probe_batch: TokenBatch,
    weights: Tensor,
    loss_fn: LossFn,
    *,
    lr: float,
    steps: int,
) -> Trajectory:
    """The observed change of the probes over `steps` real full-batch SGD steps `w -= lr * grad L(lp(w))` on
    `train_batch`; the model's weights are restored afterwards. Cost: `steps` forwards and backwards."""
    start = _probe_objectives(model, probe_batch, weights)
    changes, zs = [], []
    with _restored_parameters(model) as params:
        for step in range(steps + 1):
            changes.append((_probe_objectives(model, probe_batch, weights) - start).double())
            values = {name: v.detach().requires_grad_(True) for name, v in primal_values(model, list(params)).items()}
            with torch.enable_grad():
                z = score_fn(model, train_batch, "logprob")(values)
                zs.append(z.detach().double())
                if step == steps:
                    break
                grads = torch.autograd.grad(loss_fn(z), list(values.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p -= lr * g.to(p.dtype)
    return Trajectory(torch.stack(changes), torch.stack(zs), torch.empty(0))


def relative_error(predicted: Tensor, observed: Tensor) -> Tensor:
    """`[k+1]`: `||pred_t - obs_t|| / ||obs_t||` over the probe objectives, per step (NaN where nothing changed)."""
    norm = observed.norm(dim=-1)
    return (predicted - observed).norm(dim=-1) / torch.where(norm > 0, norm, torch.nan)
