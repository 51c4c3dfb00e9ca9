"""Read the trainer's gradient signal `c_l = dL / d lp_l` of a batch without back-propagating through the model.

`c_l` depends on the loss downstream of the per-token log-probs only, so the backward that hands it to the capture
(`GradientCapture`) needs to run from the loss to the model's outputs and no further: `torch.autograd.grad(loss,
outputs)` with the outputs that require grad (the fused log-probs and entropies, or plain logits) as its inputs
executes only the part of the graph between them. The capture's tensor hooks on those outputs fire as in the
trainer's full backward and receive the same gradient, so `c_l` is the trainer's, for every loss the trainer writes
from its outputs; nothing is re-implemented and no `.grad` is written.

Cost: the trainer's loss forward (with its autograd graph) and the loss-side backward, which is a few element-wise
ops over `[B, T]` log-probs (or, for plain logits, over `[B, T, V]`), instead of a backward through every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from trl_ntk.batches import CapturedMicroBatch
from trl_ntk.integration.capture import GradientCapture

# Output fields the capture hooks: the fused head's per-token log-probs and entropies, or the plain logits.
_SIGNAL_FIELDS = ("log_probs", "entropy", "logits")


@contextlib.contextmanager
def graph_outputs(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect, for every forward of `model` run inside the block, its output tensors in `_SIGNAL_FIELDS` that
    require grad (a reference forward under `no_grad` adds nothing). The list is filled as forwards run."""
    collected: list[Tensor] = []

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        for name in _SIGNAL_FIELDS:
            value = getattr(output, name, None)
            if isinstance(value, Tensor) and value.requires_grad:
                collected.append(value)

    handle = model.register_forward_hook(keep)
    try:
        yield collected
    finally:
        handle.remove()


def capture_signal(
    trainer: Any, model: nn.Module, capture: GradientCapture, inputs: dict[str, Any]
) -> list[CapturedMicroBatch]:
    """Run `trainer.compute_loss(model, inputs)` and the backward from the loss to the model's outputs only; return
    the micro-batches the capture recorded, each with its `c_l` (`grad_coeffs [Mt]`).

    The capture must be attached to `model`. `c_l` equals what the trainer's full backward hands the capture (same
    autograd graph downstream of the outputs); the model's `.grad` is not touched.
    """
    capture.arm()
    capture.begin_loss_call(inputs)
    with torch.enable_grad(), graph_outputs(model) as outputs:
        loss = trainer.compute_loss(model, inputs)
    if outputs and loss.requires_grad:
        torch.autograd.grad(loss, outputs, allow_unused=True)
    return capture.disarm()
