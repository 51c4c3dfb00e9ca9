"""Token-level gradient kernels between two token batches, and single JVPs / weighted gradients.

`K[m, l] = <grad_w f~_m, P * grad_w f_l>` for the per-target outputs of `logprobs` (log-probs: the log-prob kernel;
scaled logit sums: the pNTK), the unembedding-only kernel, the JVP of one batch along one direction, the weighted
gradient of one batch, and the pull-back of a logit cotangent. Pure functions of (model, token batches, parameter
selection); the products come from `jvp`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor, nn

from trl_ntk._model import (
    LogitTransform,
    ParamSelection,
    TensorDict,
    compute_dtype,
    decoder_and_head,
    own_precision_forward,
    select_params,
)
from trl_ntk.batches import TokenBatch
from trl_ntk.ntk.jvp import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FD_STEP,
    Backward,
    JvpPath,
    contract,
    forward_mode_attention,
    jvp_rows,
    one_hot_chunks,
    precondition,
    resolve_path,
)
from trl_ntk.ntk.logprobs import (
    Output,
    TokenBatchLike,
    final_hidden,
    output_values_and_logit_grads,
    prepare,
    primal_values,
    score_fn,
)

logger = logging.getLogger(__name__)


class KernelImplementation(str, Enum):
    """How a full kernel matrix `K[Mp, Mt]` is assembled.

    - `JVP`: rows by backward, columns by forward mode. For a chunk of targets on the smaller side, per-target
      gradients `u_m` come from one batched backward (one-hot cotangents), then one batched JVP of every target
      of the other side along the `u_m` gives `K[m, :]`. Cost about `min(Mp, Mt)` backward + JVP pairs (a JVP is
      2-3 forwards); memory `chunk_size` parameter-sized tangents plus one batch's activations per tangent.
    - `GRADIENTS`: per-target gradients of both sides (batched backward, chunked) and their dot products. Needs no
      forward mode, so it is exact with any attention kernel; cost about `Mp + Mt * ceil(Mp / chunk_size)`
      backward passes, memory `2 * chunk_size` parameter-sized gradients.
    """

    JVP = "jvp"
    GRADIENTS = "gradients"


def _gradient_dot(
    model: nn.Module,
    probe: TokenBatch,
    train: TokenBatch,
    *,
    values: TensorDict,
    output: Output,
    preconditioner: Mapping[str, Tensor] | None,
    chunk_size: int,
) -> Tensor:
    probe_backward = Backward(score_fn(model, probe, output), values, model)
    train_backward = Backward(score_fn(model, train, output), values, model)
    device = probe_backward.outputs.device
    dtype = probe_backward.outputs.dtype
    kernel = torch.zeros(probe_backward.num_targets, train_backward.num_targets, device=device, dtype=dtype)
    for p_start, probe_weights in zip(
        range(0, kernel.shape[0], chunk_size), one_hot_chunks(kernel.shape[0], chunk_size, device), strict=True
    ):
        probe_grads = precondition(probe_backward(probe_weights), preconditioner)
        for t_start, train_weights in zip(
            range(0, kernel.shape[1], chunk_size), one_hot_chunks(kernel.shape[1], chunk_size, device), strict=True
        ):
            train_grads = train_backward(train_weights)
            block = sum(
                probe_grads[name].flatten(1).to(dtype) @ train_grads[name].flatten(1).to(dtype).T for name in values
            )
            kernel[p_start : p_start + probe_weights.shape[0], t_start : t_start + train_weights.shape[0]] = block
            del train_grads
        del probe_grads
    return kernel


def _kernel(
    model: nn.Module,
    probe: TokenBatchLike,
    train: TokenBatchLike,
    *,
    output: Output,
    params: ParamSelection,
    preconditioner: Mapping[str, Tensor] | None,
    implementation: KernelImplementation | str,
    path: JvpPath | str,
    chunk_size: int,
    fd_step: float,
    jvp_chunk_size: int | None = None,
) -> Tensor:
    if chunk_size < 1 or (jvp_chunk_size is not None and jvp_chunk_size < 1):
        raise ValueError(f"chunk_size and jvp_chunk_size must be >= 1, got {chunk_size}, {jvp_chunk_size}")
    probe, train = prepare(model, probe, train)
    values = primal_values(model, params)
    num_probe, num_train = probe.num_targets, train.num_targets
    device = next(iter(values.values())).device
    dtype = compute_dtype(next(iter(values.values())).dtype)
    if num_probe == 0 or num_train == 0:
        return torch.zeros(num_probe, num_train, device=device, dtype=dtype)
    implementation = KernelImplementation(implementation)
    if implementation is KernelImplementation.GRADIENTS:
        return _gradient_dot(
            model, probe, train, values=values, output=output, preconditioner=preconditioner, chunk_size=chunk_size
        )
    resolved = resolve_path(model, values, path)
    logger.debug("kernel %s: JVP path %s, Mp=%d, Mt=%d", output, resolved.value, num_probe, num_train)
    by_probe_rows = num_probe <= num_train
    row_batch, column_batch = (probe, train) if by_probe_rows else (train, probe)
    num_rows = row_batch.num_targets
    kernel = contract(
        model,
        row_batch,
        column_batch,
        one_hot_chunks(num_rows, chunk_size, device),
        values=values,
        output=output,
        preconditioner=preconditioner,
        path=resolved,
        fd_step=fd_step,
        jvp_chunk_size=jvp_chunk_size,
    )
    return kernel if by_probe_rows else kernel.T.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Public kernels
# ---------------------------------------------------------------------------------------------------------------


def logprob_kernel(
    model: nn.Module,
    probe: TokenBatchLike,
    train: TokenBatchLike,
    *,
    params: ParamSelection = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    implementation: KernelImplementation | str = KernelImplementation.JVP,
    path: JvpPath | str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fd_step: float = DEFAULT_FD_STEP,
    jvp_chunk_size: int | None = None,
) -> Tensor:
    """Token-level log-prob kernel `K[m, l] = <grad_w lp~_m, P * grad_w lp_l>` (`P = 1` without preconditioner).

    `lp~_m` = log-prob of probe target `m`, `lp_l` = of training target `l`, each `log_softmax(z / T)[y]` at its
    batch's temperature; gradients over the parameters in `params` only (a LoRA model: the LoRA kernel). With `P`
    a preconditioner `name -> tensor` broadcastable to each parameter (see `optimizer_step_split`), `-c_l K[m, l]`
    is the exact current-gradient attribution of an optimizer step.

    Args:
        model (`nn.Module`): Hugging Face causal LM, possibly PEFT/DDP wrapped.
        probe, train (`TokenBatch` or mapping): `[Bp, Tp]` and `[Bt, Tt]` batches with `Mp` and `Mt` targets.
        params (`ParamSelection`, *optional*): the parameters the kernel is over (default: all trainable).
        preconditioner (`dict[str, Tensor]`, *optional*): elementwise `P` per selected parameter.
        implementation (`KernelImplementation`, *optional*, defaults to `"jvp"`): `"jvp"` (rows by backward on the
            side with fewer targets, columns by a batched JVP of the other side) or `"gradients"` (per-target
            gradient dot products, no forward mode).
        path (`JvpPath` or `"auto"`): how JVPs run; `"auto"` = `select_jvp_path(model)`.
        chunk_size (`int`, *optional*, defaults to 16): rows of parameter-sized tangents held at once.
        fd_step (`float`, *optional*, defaults to 1e-3): relative step of the finite-difference path.
        jvp_chunk_size (`int`, *optional*): tangents per batched JVP of the larger side (default: a whole chunk).
            The JVP's activations grow with it; fewer trade a little time (the primal forward is repeated) for
            memory.

    Returns:
        `Tensor[Mp, Mt]` in float32 (float64 for a float64 model).

    Cost: `min(Mp, Mt)` per-target backward passes of the smaller side (batched by `chunk_size`) plus
    `min(Mp, Mt)` JVPs of the larger side (about 2-3 forwards each, batched). Never allocates `V x V`, `[B, T, V]`
    logits, or more than `chunk_size` parameter-sized rows.
    """
    return _kernel(
        model,
        probe,
        train,
        output="logprob",
        params=params,
        preconditioner=preconditioner,
        implementation=implementation,
        path=path,
        chunk_size=chunk_size,
        fd_step=fd_step,
        jvp_chunk_size=jvp_chunk_size,
    )


def pntk(
    model: nn.Module,
    probe: TokenBatchLike,
    train: TokenBatchLike,
    *,
    params: ParamSelection = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    implementation: KernelImplementation | str = KernelImplementation.JVP,
    path: JvpPath | str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fd_step: float = DEFAULT_FD_STEP,
    jvp_chunk_size: int | None = None,
) -> Tensor:
    """pNTK `K[m, l] = <grad_w s~_m, P * grad_w s_l>`, `s = (1/sqrt V) * sum_j z_j` at the target's position.

    `z` are the model's logits (after logit scaling/softcapping, temperature not applied). Arguments, shapes, cost
    and allocations as `logprob_kernel`.
    """
    return _kernel(
        model,
        probe,
        train,
        output="logit_sum",
        params=params,
        preconditioner=preconditioner,
        implementation=implementation,
        path=path,
        chunk_size=chunk_size,
        fd_step=fd_step,
        jvp_chunk_size=jvp_chunk_size,
    )


class LastLayerFactors(NamedTuple):
    """The factors of the unembedding-weight gradient of each target's output: `grad_W f_m = g_m h_m^T`."""

    hidden: Tensor
    """`[M, H]` final hidden state at the position that predicts target `m` (input of the unembedding)."""
    logit_grad: Tensor
    """`[M, V]` `g_m = d f_m / d pre_m`; for log-probs `(e_{y_m} - pi_m) / T` (times the logit post-processing
    slope when the model scales or softcaps its logits)."""


def last_layer_factors(model: nn.Module, batch: TokenBatchLike, *, output: Output = "logprob") -> LastLayerFactors:
    """`LastLayerFactors` of a batch from one no-grad forward. Allocates `[M, V]`, never `[B, T, V]`."""
    (batch,) = prepare(model, batch)
    _, head = decoder_and_head(model)
    with torch.no_grad():
        hidden = final_hidden(model, batch)
        pre = head(hidden).to(compute_dtype(hidden.dtype))
        _, logit_grad = output_values_and_logit_grads(
            pre, batch.targets, output, batch.temperature, LogitTransform.of(model)
        )
    return LastLayerFactors(hidden.to(logit_grad.dtype), logit_grad)


def _head_weight_name(model: nn.Module) -> str:
    _, head = decoder_and_head(model)
    for name, param in model.named_parameters():
        if param is head.weight:
            return name
    raise ValueError("the unembedding weight is not a parameter of the model")


def last_layer_kernel(
    model: nn.Module,
    probe: TokenBatchLike,
    train: TokenBatchLike,
    *,
    output: Output = "logprob",
    preconditioner: Mapping[str, Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Unembedding-only kernel `K[m, l] = <h~_m, h_l> * <g~_m, g_l>` (see `LastLayerFactors`).

    For log-probs `g = (e_y - pi) / T`: this is `<grad_W lp~_m, grad_W lp_l>` over the unembedding weight `W [V, H]`
    alone (its bias, and for tied embeddings the input-embedding use of `W`, excluded). With a preconditioner entry
    `P` for `W` (name as in `model.named_parameters()`): `sum_{v,i} g~_mv h~_mi P_vi g_lv h_li`.

    Returns `Tensor[Mp, Mt]`. Cost: two no-grad forwards, `Mp * Mt * (H + V)` (times `H` more with a full `P`).
    Never allocates `V x V`; with a full `P`, at most `chunk_size` copies of `[V, H]`.
    """
    probe_factors = last_layer_factors(model, probe, output=output)
    train_factors = last_layer_factors(model, train, output=output)
    if preconditioner is None:
        return (probe_factors.hidden @ train_factors.hidden.T) * (probe_factors.logit_grad @ train_factors.logit_grad.T)
    name = _head_weight_name(model)
    if name not in preconditioner:
        raise ValueError(f"the preconditioner has no entry for the unembedding weight {name!r}")
    scale = preconditioner[name].to(probe_factors.hidden.device, probe_factors.hidden.dtype)
    if scale.numel() == 1:
        plain = (probe_factors.hidden @ train_factors.hidden.T) * (
            probe_factors.logit_grad @ train_factors.logit_grad.T
        )
        return scale.reshape(()) * plain
    rows = []
    for start in range(0, probe_factors.hidden.shape[0], chunk_size):
        probe_grads = probe_factors.logit_grad[start : start + chunk_size, :, None] * scale
        probe_grads = probe_grads * probe_factors.hidden[start : start + chunk_size, None, :]  # [c, V, H]
        rows.append(torch.einsum("lv,cvh,lh->cl", train_factors.logit_grad, probe_grads, train_factors.hidden))
    return torch.cat(rows)


def logprob_jvp(
    model: nn.Module,
    batch: TokenBatchLike,
    direction: Mapping[str, Tensor],
    *,
    output: Output = "logprob",
    path: JvpPath | str = "auto",
    fd_step: float = DEFAULT_FD_STEP,
) -> Tensor:
    """`[M]`: `<grad_w lp_m, direction>`, the first-order change of each target's log-prob along `direction`.

    `direction` maps parameter names (as in `model.named_parameters()`) to tensors of the parameters' shapes;
    other parameters are held fixed. E.g. the predicted change under an optimizer update `dw`.
    Cost: one JVP (about 2-3 forwards; two forwards on the finite-difference path). Allocates no parameter copy
    except on the finite-difference path (one perturbed copy of the named parameters at a time).
    """
    (batch,) = prepare(model, batch)
    values = primal_values(model, list(direction))
    for name, value in values.items():
        if direction[name].shape != value.shape:
            raise ValueError(
                f"direction[{name!r}] has shape {tuple(direction[name].shape)}, the parameter {tuple(value.shape)}"
            )
    resolved = resolve_path(model, values, path)
    tangents = {name: direction[name].to(values[name].device)[None] for name in values}
    with forward_mode_attention(model, resolved):
        score = score_fn(model, batch, output, differentiable=resolved is not JvpPath.FINITE_DIFFERENCE)
        return jvp_rows(score, values, tangents, resolved, fd_step)[0]


def logprob_grad(
    model: nn.Module,
    batch: TokenBatchLike,
    weights: Tensor,
    *,
    params: ParamSelection = None,
    output: Output = "logprob",
    into: TensorDict | None = None,
) -> TensorDict:
    """`sum_m weights[m] * grad_w lp_m` over the selected parameters, `name -> Tensor[*param.shape]`.

    `weights [M]`. Cost: one forward and one backward of the batch. Leaves `.grad` of the model untouched. With
    `into` (tensors of the parameters' dtypes and shapes), the gradient is added into it in place and `into` is
    returned: no second parameter-sized dict is allocated (`jvp.Backward.accumulate`).
    """
    (batch,) = prepare(model, batch)
    values = primal_values(model, params)
    backward = Backward(score_fn(model, batch, output), values, model)
    if weights.shape != (backward.num_targets,):
        raise ValueError(f"weights must have shape [M] = [{backward.num_targets}], got {tuple(weights.shape)}")
    if into is None:
        return backward.single(weights)
    backward.accumulate(weights, into)
    return into


def logit_cotangent_grad(
    model: nn.Module,
    batch: TokenBatchLike,
    positions: Tensor,
    cotangent: Tensor,
    *,
    params: ParamSelection = None,
) -> TensorDict:
    """`sum_n <cotangent[n], grad_w z_n>`: the model's logits at `positions` pulled back along a fixed cotangent,
    `name -> Tensor[*param.shape]` over the selected parameters.

    Args:
        positions (`Tensor[B, T-1]` bool): logit positions (position `t` predicts token `t + 1`), `N` of them.
        cotangent (`Tensor[N, V]`): one vector per position, row-major (e.g. `dL/dz` or a part of it).

    Cost: one forward with the full `[B, T, V]` logits (the model's own forward) and one backward. Leaves `.grad`
    of the model untouched.
    """
    (batch,) = prepare(model, batch)
    values = select_params(model, params)
    named = dict(model.named_parameters())
    with torch.enable_grad(), own_precision_forward(model):
        logits = model(**batch.forward_kwargs(), use_cache=False).logits[:, :-1]
        objective = (logits[positions.to(logits.device)].float() * cotangent.to(logits.device).float()).sum()
        grads = torch.autograd.grad(objective, [named[name] for name in values], allow_unused=True)
    return {
        name: torch.zeros_like(value) if grad is None else grad.detach()
        for (name, value), grad in zip(values.items(), grads)
    }
