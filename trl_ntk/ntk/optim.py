"""The exact split of the update an optimizer is about to take, `dw = -P * g + history`.

`P` is the part linear in this step's gradient `g` (elementwise), `history` the rest (momentum, weight decay);
torch.optim.SGD (momentum, dampening, Nesterov), Adam and AdamW (amsgrad), first step included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from trl_ntk._model import TensorDict, compute_dtype


class StepSplit(NamedTuple):
    """The update the optimizer is about to take, `dw = -preconditioner * g + history`, per parameter name."""

    preconditioner: TensorDict
    """`P`, broadcastable to each parameter (0-dim for SGD), so that `-P * g` is the part linear in this step's
    gradient `g`."""
    history: TensorDict
    """The rest of the update: momentum carried over from earlier steps, and weight decay."""


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that expose it as `.optimizer` (accelerate)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer, other wrappers
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"expected a torch optimizer (or a wrapper with .optimizer), got {type(optimizer).__name__}")
    return optimizer


def _number(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _sgd_split(group: Mapping[str, Any], state: Mapping[str, Any], param: Tensor) -> tuple[Tensor, Tensor]:
    lr, momentum = _number(group["lr"]), _number(group["momentum"])
    dampening, decay = _number(group["dampening"]), _number(group["weight_decay"])
    weights = param.detach().to(compute_dtype(param.dtype))
    gradient_coeff, carried = 1.0, decay * weights  # direction d = gradient_coeff * g + carried
    if momentum != 0:
        buffer = state.get("momentum_buffer")
        if buffer is None:  # first step: buf = g + decay * w
            buffer_coeff, buffer_carried = 1.0, carried
        else:  # buf = momentum * buf + (1 - dampening) * (g + decay * w)
            buffer_coeff = 1.0 - dampening
            buffer_carried = momentum * buffer.to(weights.dtype) + (1.0 - dampening) * carried
        if group["nesterov"]:  # d = (g + decay * w) + momentum * buf
            gradient_coeff, carried = 1.0 + momentum * buffer_coeff, carried + momentum * buffer_carried
        else:
            gradient_coeff, carried = buffer_coeff, buffer_carried
    preconditioner = torch.tensor(lr * gradient_coeff, device=param.device, dtype=weights.dtype)
    return preconditioner, -lr * carried


SPLIT_CHUNK_ELEMENTS = 2**20
"""Elements per slice of the Adam split's temporaries (`_adam_split`): 4 MiB each in float32."""


def _adam_split(
    group: Mapping[str, Any], state: Mapping[str, Any], param: Tensor, grad: Tensor, decoupled: bool
) -> tuple[Tensor, Tensor]:
    """`(P, history)` of one parameter (formulas in `optimizer_step_split`), computed `SPLIT_CHUNK_ELEMENTS`
    elements at a time: the two results plus slice-sized temporaries, whatever the parameter's size. A tensor
    subclass (a DTensor shard under FSDP2) is computed whole, its operations dispatched as they come."""
    lr, eps, decay = _number(group["lr"]), _number(group["eps"]), _number(group["weight_decay"])
    beta1, beta2 = (_number(b) for b in group["betas"])
    step = _number(state["step"]) + 1 if "step" in state else 1.0
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    dtype = compute_dtype(param.dtype)

    def terms(weights: Tensor, grad_part: Tensor, part: Callable[[str], Tensor | None]) -> tuple[Tensor, Tensor]:
        weights, grad_part = weights.to(dtype), grad_part.to(dtype)
        first, second = part("exp_avg"), part("exp_avg_sq")
        first = torch.zeros_like(weights) if first is None else first.to(dtype)
        second = torch.zeros_like(weights) if second is None else second.to(dtype)
        effective_grad = grad_part + decay * weights if (decay and not decoupled) else grad_part  # Adam's L2 term
        second = beta2 * second + (1 - beta2) * effective_grad.square()  # v_t includes this step's gradient
        if group["amsgrad"]:
            running_max = part("max_exp_avg_sq")
            second = torch.maximum(torch.zeros_like(weights) if running_max is None else running_max.to(dtype), second)
        denom = second.sqrt() / math.sqrt(bias2) + eps
        part_history = -lr / bias1 * beta1 * first / denom
        if decay:
            if decoupled:  # AdamW: w <- w * (1 - lr * decay) before the Adam step
                part_history = part_history - lr * decay * weights
            else:
                part_history = part_history - lr / bias1 * (1 - beta1) * decay * weights / denom
        return lr * (1 - beta1) / bias1 / denom, part_history

    if type(param.detach()) is not Tensor:
        return terms(param.detach(), grad.detach(), lambda key: state.get(key))
    preconditioner = torch.empty(param.shape, dtype=dtype, device=param.device)
    history = torch.empty_like(preconditioner)
    flat = {
        "weights": param.detach().reshape(-1),
        "grad": grad.detach().reshape(-1),
        **{key: state[key].reshape(-1) for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if key in state},
    }
    for start in range(0, param.numel(), SPLIT_CHUNK_ELEMENTS):
        rows = slice(start, start + SPLIT_CHUNK_ELEMENTS)
        part_preconditioner, part_history = terms(
            flat["weights"][rows],
            flat["grad"][rows],
            lambda key, rows=rows: flat[key][rows] if key in flat else None,
        )
        preconditioner.view(-1)[rows] = part_preconditioner
        history.view(-1)[rows] = part_history
    return preconditioner, history


def optimizer_step_split(
    optimizer: Any,
    named_params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    grads: Mapping[str, Tensor] | None = None,
) -> StepSplit:
    """Split the step `optimizer.step()` is about to take into `dw = -P * g + history`, exactly.

    Call it before the step (TRL's `on_pre_optimizer_step`): the state still holds `m_{t-1}`, `v_{t-1}`, step
    `t - 1`, and `g` is `.grad` (after any clipping) unless `grads` is given. With `b1, b2, eps, lr, lambda` of the
    parameter's group and `t` the step about to be taken:

    - SGD: `P = lr * k`, `k = 1`, `(1 - dampening)` with a momentum buffer, `1 + momentum * k_buf` with Nesterov;
      `history` = `-lr` times the momentum and weight-decay terms (exact torch semantics, first step included).
    - AdamW: `v_t = b2 v_{t-1} + (1 - b2) g^2`, `v_hat = v_t / (1 - b2^t)` (running max with amsgrad),
      `P = lr (1 - b1) / (1 - b1^t) / (sqrt(v_hat) + eps)`,
      `history = -lr [b1 m_{t-1} / (1 - b1^t) / (sqrt(v_hat) + eps) + lambda w]`.
    - Adam (L2 decay `g + lambda w` enters `m` and `v`): same `P` with `v_t` from `g + lambda w`, and
      `history = -lr [b1 m_{t-1} + (1 - b1) lambda w] / (1 - b1^t) / (sqrt(v_hat) + eps)`.

    Parameters without a gradient are not updated by torch: `P = 0`, `history = 0`.

    Args:
        optimizer: `torch.optim.SGD`, `Adam` or `AdamW`, or a wrapper exposing it as `.optimizer` (accelerate).
        named_params: `name -> parameter` (e.g. `model.named_parameters()`), each managed by the optimizer.
        grads (*optional*): `name -> g` to use instead of `.grad`.

    Returns:
        `StepSplit(preconditioner, history)`, dicts keyed like `named_params`, in float32 (or the parameter's
        dtype if wider). Allocates two parameter-sized tensors per parameter (one for SGD), and for Adam slices of
        `SPLIT_CHUNK_ELEMENTS` elements as temporaries.
    """
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, torch.optim.Adam):
        kind = "adam"
    elif isinstance(inner, torch.optim.SGD):
        kind = "sgd"
    else:
        raise ValueError(
            f"unsupported optimizer {type(inner).__name__}: the step split is exact for torch.optim.SGD, Adam and "
            "AdamW only (optim='adamw_torch' or 'sgd' in TrainingArguments)"
        )
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    preconditioner, history = {}, {}
    for name, param in dict(named_params).items():
        group = group_of.get(id(param))
        if group is None:
            raise ValueError(f"parameter {name!r} is not managed by the optimizer; pass only its parameters")
        if group.get("maximize", False):
            raise ValueError("optimizer option maximize=True is not supported by the step split")
        grad = grads[name] if grads is not None else param.grad
        if grad is None:
            zero = torch.zeros((), device=param.device, dtype=compute_dtype(param.dtype))
            preconditioner[name], history[name] = zero, torch.zeros_like(param, dtype=zero.dtype)
            continue
        state = inner.state.get(param, {})
        if kind == "sgd":
            preconditioner[name], history[name] = _sgd_split(group, state, param)
        else:
            decoupled = bool(group.get("decoupled_weight_decay", isinstance(inner, torch.optim.AdamW)))
            preconditioner[name], history[name] = _adam_split(group, state, param, grad, decoupled)
    return StepSplit(preconditioner, history)


def sgd_preconditioner(named_params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], lr: float) -> TensorDict:
    """Plain-SGD preconditioner `P = lr` (0-dim per parameter): `-c_l K^P[m, l]` is then `a_{m,l} = -lr c_l K[m, l]`."""
    return {
        name: torch.tensor(float(lr), device=p.device, dtype=compute_dtype(p.dtype))
        for name, p in dict(named_params).items()
    }
