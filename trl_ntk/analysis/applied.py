"""The prediction along the update the optimizer really applied, for half-precision trainable weights.

With bf16 / fp16 weights the optimizer computes its update `dw = -P g + history` and the weights move by that update
rounded to their dtype: `w_{t+1} = round(w_t + dw)`. At small learning rates the rounding dominates the change of the
probe log-probs, so the first-order prediction is taken along the applied update instead,

    dw_applied = w_{t+1} - w_t          (exact in float32: the difference of two half-precision values)
    predicted  = J(w_t) dw_applied       (float32 JVP on upcast copies of the weights)
    rounding   = predicted - J(w_t) dw   (the part due to the rounding; the cells + history + rounding = predicted)

Cost: one copy of the trainable parameters at `w_t` in their own dtype (`P` bytes, on the CPU by default), one
float32 update (twice the half-precision bytes, on the device) and one JVP of the probes per analysed step.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from trl_ntk._model import HALF_PRECISION, TensorDict, trainable_parameters
from trl_ntk.analysis.dense import DenseBackend
from trl_ntk.analysis.results import Prediction, UpdateExplanation
from trl_ntk.batches import TokenBatch


def has_half_precision(model: nn.Module) -> bool:
    """Whether any trainable parameter is bf16 / fp16 (its update is rounded to its dtype)."""
    return any(p.dtype in HALF_PRECISION for p in trainable_parameters(model).values())


def snapshot(model: nn.Module, device: str | torch.device = "cpu") -> TensorDict:
    """Copies of the trainable parameters in their own dtype on `device` (`P` bytes): the weights `w_t`."""
    return {name: p.detach().to(device, copy=True) for name, p in trainable_parameters(model).items()}


@torch.no_grad()
def applied_update(model: nn.Module, before: TensorDict) -> TensorDict:
    """`w_{t+1} - w_t` in float32 (float64 for a float64 parameter) for each trainable parameter, on its device."""
    params = trainable_parameters(model)
    out = {}
    for name, p in params.items():
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        out[name] = p.detach().to(dtype) - before[name].to(p.device, dtype)
    return out


@torch.no_grad()
def applied_update_jvps(
    model: nn.Module, batches: dict[str, TokenBatch], before: TensorDict, path: str | None = None
) -> dict[str, Tensor]:
    """`name -> [M]` JVPs of each batch's target log-probs at `w_t` along `w_{t+1} - w_t`.

    The model holds `w_{t+1}`; `w_t` is copied into its parameters for the JVP and `w_{t+1}` copied back afterwards
    (bit for bit, from a device copy of `w_{t+1}`: `P` more bytes while it runs). The JVP runs in eval mode (the
    model's mode is restored). `path`: as `DenseBackend`.
    """
    direction = applied_update(model, before)
    params = trainable_parameters(model)
    after = {name: p.detach().clone() for name, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for name, p in params.items():
            p.copy_(before[name])
        with torch.enable_grad():
            rows = DenseBackend(model, path=path).jvps(batches, [direction])
    finally:
        for name, p in params.items():
            p.copy_(after[name])
        model.train(was_training)
    return {name: value[0] for name, value in rows.items()}


def with_rounding(prediction: Prediction, applied: Tensor) -> Prediction:
    """`prediction` with `predicted` along the applied update and `rounding = applied - predicted` (`[M]`)."""
    applied = applied.to(prediction.predicted)
    return replace(prediction, predicted=applied, rounding=applied - prediction.predicted)


def explain_applied(
    model: nn.Module,
    explanation: UpdateExplanation,
    probe_batch: TokenBatch,
    before: TensorDict,
    extra_batches: dict[str, TokenBatch] | None = None,
    path: str | None = None,
) -> UpdateExplanation:
    """`explanation` with the probes' (and the extra batches') predictions along the applied update
    (`with_rounding`). The model holds `w_{t+1}` and is left holding it, bit for bit."""
    batches = {"probe": probe_batch, **(extra_batches or {})}
    rows = applied_update_jvps(model, batches, before, path)
    extra = {name: with_rounding(p, rows[name]) if name in rows else p for name, p in explanation.extra.items()}
    return replace(explanation, probe=with_rounding(explanation.probe, rows["probe"]), extra=extra)
