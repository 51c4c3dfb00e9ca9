"""Attributions `a[m, l] = -lr * c_l * K[m, l]` of an update's current-gradient part to training targets, from a
kernel matrix or directly (one weighted backward and one JVP per group, never forming `K`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trl_ntk._model import ParamSelection
from trl_ntk.ntk.jvp import DEFAULT_CHUNK_SIZE, DEFAULT_FD_STEP, JvpPath, contract, resolve_path
from trl_ntk.ntk.logprobs import TokenBatchLike, prepare, primal_values


@dataclass
class SignedRowSums:
    """Per probe target, the predicted change `sum_l a[m, l]` split by the sign of the gradient coefficient `c_l`."""

    positive_gradient: Tensor
    """`[Mp]` sum over training targets with `c_l < 0` (their log-prob is pulled up by the step)."""
    negative_gradient: Tensor
    """`[Mp]` sum over training targets with `c_l > 0` (pushed down)."""

    @property
    def total(self) -> Tensor:
        """`[Mp]` the full row sum."""
        return self.positive_gradient + self.negative_gradient


def _check_coeffs(grad_coeffs: Tensor, num_train: int) -> None:
    if grad_coeffs.shape != (num_train,):
        raise ValueError(f"grad_coeffs must have shape [Mt] = [{num_train}], got {tuple(grad_coeffs.shape)}")


def attribution_matrix(kernel: Tensor, grad_coeffs: Tensor, *, lr: float = 1.0) -> Tensor:
    """`a[m, l] = -lr * c_l * K[m, l]`, `[Mp, Mt]`. With a preconditioned kernel (P holds the learning rate) keep
    `lr = 1`. `sum_l a[m, l]` is the predicted change of probe log-prob `m` from this step's gradient."""
    _check_coeffs(grad_coeffs, kernel.shape[1])
    return -lr * kernel * grad_coeffs.to(kernel)[None, :]


def _sign_groups(grad_coeffs: Tensor) -> Tensor:
    return (grad_coeffs > 0).long()  # 0: c < 0 (positive gradient; c = 0 adds nothing), 1: c > 0


def attribution_group_sums(
    kernel: Tensor, grad_coeffs: Tensor, groups: Tensor, *, num_groups: int | None = None, lr: float = 1.0
) -> Tensor:
    """`[Mp, G]`: `sum_{l in group g} a[m, l]`, `groups [Mt]` long in `[0, G)`."""
    num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
    membership = nn.functional.one_hot(groups.long(), num_groups).to(kernel)
    return attribution_matrix(kernel, grad_coeffs, lr=lr) @ membership


def attribution_row_sums(kernel: Tensor, grad_coeffs: Tensor, *, lr: float = 1.0) -> SignedRowSums:
    """Row sums of `attribution_matrix` split by the sign of `c_l` (see `SignedRowSums`)."""
    sums = attribution_group_sums(kernel, grad_coeffs, _sign_groups(grad_coeffs), num_groups=2, lr=lr)
    return SignedRowSums(positive_gradient=sums[:, 0], negative_gradient=sums[:, 1])


def attribution_column_sums(
    kernel: Tensor, grad_coeffs: Tensor, *, lr: float = 1.0, probe_weights: Tensor | None = None
) -> Tensor:
    """`[Mt]`: `sum_m a[m, l]`, how much training target `l` moved the probe targets; with `probe_weights [R, Mp]`,
    `[R, Mt]`: `sum_m probe_weights[r, m] a[m, l]` (e.g. one row per probe response)."""
    attributions = attribution_matrix(kernel, grad_coeffs, lr=lr)
    if probe_weights is None:
        return attributions.sum(0)
    return probe_weights.to(attributions) @ attributions


def attribution_group_sums_direct(
    model: nn.Module,
    probe: TokenBatchLike,
    train: TokenBatchLike,
    grad_coeffs: Tensor,
    groups: Tensor,
    *,
    num_groups: int | None = None,
    lr: float = 1.0,
    params: ParamSelection = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    path: JvpPath | str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fd_step: float = DEFAULT_FD_STEP,
    jvp_chunk_size: int | None = None,
) -> Tensor:
    """`attribution_group_sums` without the kernel: `[Mp, G]`.

    Per group `g`: `G_g = sum_{l in g} c_l grad lp_l` (one batched backward of the training batch for all groups),
    then `-lr <grad lp~_m, P * G_g>` for all `m` by one batched JVP of the probe batch. Cost about one training
    step plus one probe JVP per group; allocates `min(G, chunk_size)` parameter-sized gradients, never `K`;
    `jvp_chunk_size` tangents per batched JVP (`None`: a whole chunk), whose activations grow with it.
    """
    probe, train = prepare(model, probe, train)
    _check_coeffs(grad_coeffs, train.num_targets)
    values = primal_values(model, params)
    num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
    coeffs = grad_coeffs.to(values[next(iter(values))].device)
    membership = nn.functional.one_hot(groups.long().to(coeffs.device), num_groups).T.to(coeffs.dtype)
    train_weights = membership * coeffs[None, :]  # [G, Mt]
    sums = contract(
        model,
        train,
        probe,
        train_weights.split(chunk_size),
        values=values,
        output="logprob",
        preconditioner=preconditioner,
        path=resolve_path(model, values, path),
        fd_step=fd_step,
        jvp_chunk_size=jvp_chunk_size,
    )
    return -lr * sums.T


def attribution_row_sums_direct(
    model: nn.Module,
    probe: TokenBatchLike,
    train: TokenBatchLike,
    grad_coeffs: Tensor,
    *,
    lr: float = 1.0,
    params: ParamSelection = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    path: JvpPath | str = "auto",
    fd_step: float = DEFAULT_FD_STEP,
) -> SignedRowSums:
    """`attribution_row_sums` without the kernel: one backward of the training batch with the two sign-masked
    coefficient vectors (batched) and one probe JVP along each of the two gradients. See
    `attribution_group_sums_direct`."""
    sums = attribution_group_sums_direct(
        model,
        probe,
        train,
        grad_coeffs,
        _sign_groups(grad_coeffs),
        num_groups=2,
        lr=lr,
        params=params,
        preconditioner=preconditioner,
        path=path,
        fd_step=fd_step,
    )
    return SignedRowSums(positive_gradient=sums[:, 0], negative_gradient=sums[:, 1])


def attribution_column_sums_direct(
    model: nn.Module,
    probe: TokenBatchLike,
    train: TokenBatchLike,
    grad_coeffs: Tensor,
    *,
    lr: float = 1.0,
    probe_weights: Tensor | None = None,
    params: ParamSelection = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    path: JvpPath | str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fd_step: float = DEFAULT_FD_STEP,
    jvp_chunk_size: int | None = None,
) -> Tensor:
    """`attribution_column_sums` without the kernel: `u = sum_m grad lp~_m` (one probe backward; one per row of
    `probe_weights [R, Mp]`, batched), then one JVP of all training log-probs along `P * u`:
    `-lr * c_l * <grad lp_l, P * u>`. Returns `[Mt]` (`[R, Mt]` with `probe_weights`).

    Cost about one training step (forward + JVP of the training batch) for every training token at once, per
    row of `probe_weights`. Memory: `chunk_size` parameter-sized gradients plus the activations of a JVP of the
    training batch along `jvp_chunk_size` of them (`None`: the whole chunk) at once.
    """
    probe, train = prepare(model, probe, train)
    _check_coeffs(grad_coeffs, train.num_targets)
    values = primal_values(model, params)
    device = next(iter(values.values())).device
    weights = torch.ones(1, probe.num_targets, device=device) if probe_weights is None else probe_weights.to(device)
    if weights.dim() != 2 or weights.shape[1] != probe.num_targets:
        raise ValueError(
            f"probe_weights must have shape [R, Mp] = [R, {probe.num_targets}], got {tuple(weights.shape)}"
        )
    sums = contract(
        model,
        probe,
        train,
        weights.split(chunk_size),
        values=values,
        output="logprob",
        preconditioner=preconditioner,
        path=resolve_path(model, values, path),
        fd_step=fd_step,
        jvp_chunk_size=jvp_chunk_size,
    )
    columns = -lr * grad_coeffs.to(sums)[None, :] * sums
    return columns[0] if probe_weights is None else columns
