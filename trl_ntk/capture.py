"""Record the trainer's own gradient signal `c_l = dL / d lp_l` during the real training step.

TRL's trainers call the model with `fused_lm_head=True` and `labels`; the output carries per-token log-probs
`log_probs [B, T-1]` (position `t-1` scores the token at `t`). A forward hook keeps each micro-batch's inputs and
registers a tensor hook on that output; the trainer's own backward then hands over `dL/d log_probs` exactly, for
every loss variant, with gradient-accumulation scaling included. No loss is re-implemented here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .batches import TokenBatch

# Keyword inputs of the trainer's forward that are not model inputs of the token batch.
_NON_MODEL_KWARGS = {"labels", "fused_lm_head", "num_items_in_batch", "use_cache", "shift_labels", "return_dict"}


@dataclass
class CapturedMicroBatch:
    """One training forward of the step and the gradient the loss sent back through it.

    Args:
        batch (`TokenBatch`): the forward's inputs; targets are the positions with a label.
        grad_coeffs (`Tensor[M]`): `c_l = dL / d lp_l` for the `M` targets of `batch` (row-major), as the
            trainer's backward produced it (accumulation scaling included, before clipping and before any
            cross-rank averaging). `None` until the backward ran.
        loss_call (`int`): index of the `compute_loss` call (the trainer's micro-batch) this forward belongs to.
        row_offset (`int`): the first row of this forward within that call's inputs (trainers may split a
            micro-batch into several forwards).
        loss_inputs (`dict`): the inputs the trainer's `compute_loss` received (for the trainer adapters).
    """

    batch: TokenBatch
    grad_coeffs: Tensor | None = None
    loss_call: int = 0
    row_offset: int = 0
    loss_inputs: dict[str, Any] = field(default_factory=dict)


class GradientCapture:
    """Forward and tensor hooks that keep the micro-batches of one optimizer step and their `c_l`.

    Usage:
        capture = GradientCapture(model, temperature=1.0)
        capture.arm()            # before the step's first forward
        ...                      # the trainer's forward/backward
        micro_batches = capture.disarm()

    Nothing is kept while disarmed: the hook returns at its first line. Forwards that do not require grad
    (reference model, old-policy log-probs) are skipped, and so is everything run inside `capture.paused()`.

    Args:
        model (`nn.Module`): the model the trainer calls (unwrapped; PEFT models are fine).
        temperature (`float`, *optional*, defaults to `1.0`): the temperature of the trainer's fused head.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        self.model = model
        self.temperature = temperature
        self.micro_batches: list[CapturedMicroBatch] = []
        self._armed = False
        self._paused = 0
        self._loss_call = -1
        self._loss_inputs: dict[str, Any] = {}
        self._row_offset = 0
        self._handle = model.register_forward_hook(self._on_forward, with_kwargs=True)

    def remove(self) -> None:
        """Remove the hook from the model."""
        self._handle.remove()

    def arm(self) -> None:
        """Start recording: forget previous micro-batches."""
        self.micro_batches = []
        self._loss_call = -1
        self._loss_inputs = {}
        self._row_offset = 0
        self._armed = True

    def disarm(self) -> list[CapturedMicroBatch]:
        """Stop recording and return what was recorded."""
        self._armed = False
        missing = [i for i, mb in enumerate(self.micro_batches) if mb.grad_coeffs is None]
        if missing:
            # A forward that requires grad but whose output was never back-propagated (e.g. a metric forward).
            self.micro_batches = [mb for mb in self.micro_batches if mb.grad_coeffs is not None]
        return self.micro_batches

    @property
    def armed(self) -> bool:
        return self._armed

    def begin_loss_call(self, inputs: dict[str, Any]) -> None:
        """Mark the start of one `compute_loss` call (a trainer micro-batch) and remember its inputs."""
        if not self._armed:
            return
        self._loss_call += 1
        self._loss_inputs = inputs
        self._row_offset = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run the package's own forwards without recording them."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not self._armed or self._paused:
            return
        log_probs = getattr(output, "log_probs", None)
        if not kwargs.get("fused_lm_head") or log_probs is None:
            if torch.is_grad_enabled() and getattr(output, "logits", None) is not None and output.logits.requires_grad:
                raise RuntimeError(
                    "the trainer computed its loss from full logits (not TRL's fused log-prob head, e.g. a custom "
                    "compute_loss_func or label smoothing); only losses that reach the model through the fused "
                    "per-token log-probs can be attributed"
                )
            return
        if not log_probs.requires_grad:
            return  # reference model, old-policy log-probs: no gradient flows through these
        if kwargs.get("shift_labels") is not None:
            raise RuntimeError("pre-shifted labels (context/sequence parallelism) are not supported by the capture")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs["labels"]
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        expected = (input_ids.shape[0], input_ids.shape[1] - 1)
        if tuple(log_probs.shape) != expected:
            raise RuntimeError(
                f"fused log-probs have shape {tuple(log_probs.shape)}, expected {expected} (prompt-learning PEFT "
                "adapters that prepend virtual tokens are not supported)"
            )
        scored = labels[:, 1:] != -100
        if not torch.equal(labels[:, 1:][scored], input_ids[:, 1:][scored]):
            raise RuntimeError("the trainer's labels differ from its input ids at scored positions")
        extra = {
            k: v.detach()
            for k, v in kwargs.items()
            if k not in _NON_MODEL_KWARGS
            and k not in ("input_ids", "attention_mask", "position_ids")
            and isinstance(v, Tensor)
        }
        position_ids = kwargs.get("position_ids")
        batch = TokenBatch.from_labels(
            input_ids.detach(),
            attention_mask.detach(),
            labels.detach(),
            position_ids=None if position_ids is None else position_ids.detach(),
            temperature=self.temperature,
            model_kwargs=extra,
        )
        if self._loss_call < 0:
            self._loss_call = 0
        record = CapturedMicroBatch(
            batch=batch,
            loss_call=self._loss_call,
            row_offset=self._row_offset,
            loss_inputs=self._loss_inputs,
        )
        self._row_offset += input_ids.shape[0]
        self.micro_batches.append(record)
        target_positions = batch.target_mask[:, 1:]

        def keep_grad(grad: Tensor) -> None:
            coeffs = grad.detach()[target_positions].float()
            record.grad_coeffs = coeffs if record.grad_coeffs is None else record.grad_coeffs + coeffs

        log_probs.register_hook(keep_grad)
