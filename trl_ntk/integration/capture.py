"""Record the trainer's own gradient signal `c_l = dL / d lp_l` during the real training step.

TRL's trainers call the model with `fused_lm_head=True` and `labels`; the output carries per-token log-probs
`log_probs [B, T-1]` (position `t-1` scores the token at `t`). A forward hook keeps each micro-batch's inputs and
registers a tensor hook on that output; the trainer's own backward then hands over `dL/d log_probs` exactly, for
every loss variant, with gradient-accumulation scaling included. No loss is re-implemented here. The trained token
at a position is its label (a collator may set labels that differ from the inputs); the trainer's sequence layout
is kept as it was passed (position ids, and no attention mask where the trainer passed none).

Losses computed from the plain logits (SFT with label smoothing or a `compute_loss_func`) hand over
`e_l = dL/dz_l [V]` instead. It is split exactly into the part along the token's own log-prob and the rest:

    e_l = c_l * d_l + r_l,    d_l = grad_z lp_l = (onehot(y_l) - softmax(z_l / T)) / T,    c_l = <e_l, d_l> / ||d_l||^2

so `c_l` plays the same role as with the fused head (a plain cross-entropy leaves `r_l = 0`), and the residual
`r_l` (label smoothing's uniform push, extra logit terms, gradients at unlabelled positions) is kept beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from trl_ntk._model import own_precision_forward
from trl_ntk.analysis.guard import RngState, replayed_randomness
from trl_ntk.batches import CapturedMicroBatch, TokenBatch

# Keyword inputs of the trainer's forward that are not model inputs of the token batch.
_NON_MODEL_KWARGS = {"labels", "fused_lm_head", "num_items_in_batch", "use_cache", "shift_labels", "return_dict"}


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
        record_randomness (`bool`, *optional*, defaults to `False`): keep the RNG state at the start of each
            training forward (`CapturedMicroBatch.rng_state`), for models that draw random numbers in training mode.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, record_randomness: bool = False) -> None:
        self.model = model
        self.temperature = temperature
        self.record_randomness = record_randomness
        self._rng_state: RngState | None = None
        self.micro_batches: list[CapturedMicroBatch] = []
        self._armed = False
        self._paused = 0
        self._loss_call = -1
        self._loss_inputs: dict[str, Any] = {}
        self._row_offset = 0
        self.failures: list[str] = []
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._on_forward, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()

    def arm(self) -> None:
        """Start recording: forget previous micro-batches and failures."""
        self.micro_batches = []
        self.failures = []
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
        """Mark the start of one `compute_loss` call (a trainer micro-batch) and remember its inputs (plain
        bookkeeping: nothing here can raise)."""
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

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Keep the RNG state at the start of the forward (dropout, NEFTune draw from it during the forward)."""
        if not self._armed or self._paused or not self.record_randomness:
            return
        try:
            self._rng_state = RngState.capture(module)
        except Exception as error:  # noqa: BLE001 - never let the observer stop the trainer's forward
            self._rng_state = None
            self.failures.append(f"RNG-state capture failed: {type(error).__name__}: {error}")

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """Record one training forward. It runs inside the trainer's forward, where an exception would stop
        training: any failure is appended to `failures` instead, and the analysis of the step reports it."""
        if not self._armed or self._paused:
            return
        try:
            self._record_forward(args, kwargs, output)
        except Exception as error:  # noqa: BLE001 - never let the observer stop the trainer's forward
            self.failures.append(f"training-forward capture failed: {type(error).__name__}: {error}")

    def _record_forward(self, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        log_probs = getattr(output, "log_probs", None)
        fused = bool(kwargs.get("fused_lm_head")) and log_probs is not None
        logits = None if fused else getattr(output, "logits", None)
        if fused and not log_probs.requires_grad:
            return  # reference model, old-policy log-probs: no gradient flows through these
        if not fused and (logits is None or not logits.requires_grad or not torch.is_grad_enabled()):
            return
        if kwargs.get("shift_labels") is not None:
            raise RuntimeError("pre-shifted labels (context/sequence parallelism) are not supported by the capture")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels") if fused else self._labels_of_logits_forward(kwargs, input_ids)
        _check_shapes(input_ids, log_probs if fused else logits, fused)
        extra = {
            k: v.detach()
            for k, v in kwargs.items()
            if k not in _NON_MODEL_KWARGS
            and k not in ("input_ids", "attention_mask", "position_ids")
            and isinstance(v, Tensor)
        }
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:  # padding-free / packed: the model finds sequence boundaries from position_ids
            attention_mask = torch.ones_like(input_ids)
            extra["attention_mask"] = None
        position_ids = kwargs.get("position_ids")
        batch = TokenBatch.from_labels(
            input_ids.detach(),
            attention_mask.detach(),
            labels.detach(),
            position_ids=None if position_ids is None else position_ids.detach(),
            temperature=self.temperature,
            model_kwargs=extra,
        )
        if not torch.equal(labels[batch.target_mask], input_ids[batch.target_mask]):
            batch.label_ids = labels.detach().clamp(min=0)  # the trained token is the label (label-noise collators)
        if self._loss_call < 0:
            self._loss_call = 0
        record = CapturedMicroBatch(
            batch=batch,
            loss_call=self._loss_call,
            row_offset=self._row_offset,
            loss_inputs=self._loss_inputs,
            rng_state=self._rng_state if self.record_randomness else None,
        )
        target_positions = batch.target_mask[:, 1:]
        if not fused:
            hook = _logit_gradient_hook(record, logits.detach(), target_positions, self.temperature, self.failures)
        else:
            hook = _log_prob_gradient_hook(record, target_positions, self.failures)
            entropy = getattr(output, "entropy", None)
            if entropy is not None and entropy.requires_grad:
                entropy.register_hook(_entropy_gradient_hook(record, target_positions, self.failures))
        (log_probs if fused else logits).register_hook(hook)
        self._row_offset += input_ids.shape[0]
        self.micro_batches.append(record)

    def _labels_of_logits_forward(self, kwargs: dict[str, Any], input_ids: Tensor) -> Tensor:
        """The labels of a forward that returns plain logits: its own, or those of the `compute_loss` inputs
        (trainers drop them from the forward when they compute the loss themselves), rows of this forward only."""
        labels = kwargs.get("labels")
        if labels is None:
            labels = self._loss_inputs.get("labels")
            if labels is not None:
                labels = labels[self._row_offset : self._row_offset + input_ids.shape[0]]
        if labels is None or tuple(labels.shape) != tuple(input_ids.shape):
            raise RuntimeError(
                "the trainer computed its loss from plain logits, and neither the forward nor the compute_loss "
                "inputs carry `labels` matching its input ids, so the trained tokens are unknown"
            )
        return labels


def _check_shapes(input_ids: Tensor, output: Tensor, fused: bool) -> None:
    """The fused log-probs must be `[B, T-1]` and plain logits `[B, T, V]` for input ids `[B, T]`."""
    expected = (input_ids.shape[0], input_ids.shape[1] - 1) if fused else tuple(input_ids.shape)
    found = tuple(output.shape) if fused else tuple(output.shape[:2])
    if found != expected:
        raise RuntimeError(
            f"{'fused log-probs' if fused else 'logits'} have shape {tuple(output.shape)} for input ids of shape "
            f"{tuple(input_ids.shape)} (prompt-learning PEFT adapters that prepend virtual tokens are not supported)"
        )


def residual_tolerance(dtype: torch.dtype) -> float:
    """The fraction of `||dL/dz||` below which a logit residual counts as round-off of a plain cross-entropy and is
    dropped: `1e-5`, or a quarter of the machine epsilon of the gradient's dtype when that is coarser (bf16: 2e-3).

    Measured in bf16 (vocabularies of 50 to 32,000): a cross-entropy leaves at most 8e-4; label smoothing 0.1 leaves
    8e-4 to 5% (the low end with nearly uniform predictions, where what is dropped is that small part of the
    gradient, and the gradient check shows it)."""
    return max(1e-5, torch.finfo(dtype).eps / 4)


def logit_gradient_split(
    logit_grad: Tensor, logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """`(c [M], r [M, V])` with `e = c * d + r`, `d = (onehot(y) - softmax(z / T)) / T` (the gradient of
    `lp = log_softmax(z / T)[y]` with respect to `z`) and `c = <e, d> / ||d||^2`, in float32.

    Args:
        logit_grad (`Tensor[M, V]`): `e = dL/dz` at the `M` target positions.
        logits (`Tensor[M, V]`): `z` there; `targets` (`Tensor[M]`): `y`.
    """
    direction = -torch.softmax(logits.float() / temperature, dim=-1)
    direction.scatter_add_(-1, targets[:, None], torch.ones_like(direction[:, :1]))
    direction = direction / temperature
    gradient = logit_grad.float()
    coeffs = (gradient * direction).sum(-1) / direction.pow(2).sum(-1).clamp(min=1e-30)
    return coeffs, gradient - coeffs[:, None] * direction


def _log_prob_gradient_hook(record: CapturedMicroBatch, target_positions: Tensor, failures: list[str]):
    """The tensor hook on the fused log-probs `[B, T-1]`: `c_l` at the targets into `record.grad_coeffs`. It runs
    inside the trainer's backward: a failure is appended to `failures`, never raised."""

    def keep_grad(grad: Tensor) -> None:
        try:
            _accumulate_coeffs(record, grad.detach()[target_positions])
        except Exception as error:  # noqa: BLE001 - never let the observer stop the trainer's backward
            failures.append(f"log-prob gradient capture failed: {type(error).__name__}: {error}")

    return keep_grad


def _entropy_gradient_hook(record: CapturedMicroBatch, target_positions: Tensor, failures: list[str]):
    """The tensor hook on the fused per-token entropies `[B, T-1]`: `dL/dH_l` into `record.entropy_grads`."""

    def keep_grad(grad: Tensor) -> None:
        try:
            values = grad.detach()[target_positions].float()
            record.entropy_grads = values if record.entropy_grads is None else record.entropy_grads + values
        except Exception as error:  # noqa: BLE001 - never let the observer stop the trainer's backward
            failures.append(f"entropy gradient capture failed: {type(error).__name__}: {error}")

    return keep_grad


def entropy_logit_residual(logits: Tensor, entropy_grads: Tensor, temperature: float) -> Tensor:
    """`[M, V]` the logit gradient of an entropy term, `r = e * dH/dz` with `H = -sum_v p_v log p_v`,
    `p = softmax(z / T)`: `dH/dz = -p * (log p + H) / T`, in float32.

    Args:
        logits (`Tensor[M, V]`): `z` at the targets; `entropy_grads` (`Tensor[M]`): `e = dL/dH`.
    """
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum(-1, keepdim=True)
    return entropy_grads[:, None] * (-probs * (logprobs + entropy) / temperature)


def add_entropy_residuals(model: nn.Module, micro_batches: list[CapturedMicroBatch]) -> None:
    """Fold each micro-batch's captured entropy gradient into its logit residual (`entropy_logit_residual` at the
    targets), so that the analysis' residual term carries the entropy bonus' gradient.

    Cost: one no-grad forward with full logits per micro-batch with a non-zero entropy gradient, with the training
    forward's randomness replayed; allocates `[B, T, V]` logits for it. Call with the capture paused.
    """
    for mb in micro_batches:
        if mb.entropy_grads is None or not bool((mb.entropy_grads != 0).any()):
            continue
        batch = mb.batch
        with torch.no_grad(), replayed_randomness(model, mb.rng_state), own_precision_forward(model):
            logits = model(**batch.forward_kwargs(), use_cache=False).logits[:, :-1]
        positions = batch.target_mask[:, 1:]
        full = torch.zeros(*positions.shape, logits.shape[-1], dtype=torch.float32, device=logits.device)
        full[positions] = entropy_logit_residual(
            logits[positions], mb.entropy_grads.to(logits.device), batch.temperature
        )
        if mb.logit_residual is not None:
            full[mb.residual_positions] += mb.logit_residual.float()
            positions = positions | mb.residual_positions
        mb.logit_residual, mb.residual_positions = full[positions], positions
        mb.entropy_grads = None


def _accumulate_coeffs(record: CapturedMicroBatch, coeffs: Tensor) -> None:
    coeffs = coeffs.float()
    record.grad_coeffs = coeffs if record.grad_coeffs is None else record.grad_coeffs + coeffs


def _logit_gradient_hook(
    record: CapturedMicroBatch, logits: Tensor, target_positions: Tensor, temperature: float, failures: list[str]
):
    """The tensor hook on plain logits `[B, T, V]`: `c_l` into `record.grad_coeffs`, the residual (target positions
    and every other position the loss reached) into `record.logit_residual`, in the gradient's dtype.

    It runs inside the trainer's backward, where an exception would stop training: a failure (e.g. out of memory for
    the `[M, V]` temporaries) is appended to `failures` instead, and the analysis of the step reports it.
    """
    targets = record.batch.targets

    def keep_logit_grad(grad: Tensor) -> None:
        try:
            _split_into(record, grad.detach()[:, :-1], logits[:, :-1], target_positions, targets, temperature)
        except Exception as error:  # noqa: BLE001 - never let the observer stop the trainer's backward
            failures.append(f"logit-gradient capture failed: {type(error).__name__}: {error}")

    return keep_logit_grad


def _split_into(
    record: CapturedMicroBatch,
    gradient: Tensor,
    logits: Tensor,
    target_positions: Tensor,
    targets: Tensor,
    temperature: float,
) -> None:
    coeffs, residual = logit_gradient_split(gradient[target_positions], logits[target_positions], targets, temperature)
    full = gradient.float().clone()
    full[target_positions] = residual
    positions = full.abs().amax(-1) > 0
    values = full[positions]
    record.grad_coeffs = coeffs if record.grad_coeffs is None else record.grad_coeffs + coeffs
    if float(values.norm()) <= residual_tolerance(gradient.dtype) * float(gradient.float().norm()):
        return
    if record.logit_residual is None:
        record.logit_residual, record.residual_positions = values.to(gradient.dtype), positions
        return
    merged = torch.zeros_like(full)
    merged[record.residual_positions] = record.logit_residual.float()
    merged[positions] += values
    record.residual_positions = merged.abs().amax(-1) > 0
    record.logit_residual = merged[record.residual_positions].to(gradient.dtype)


class LogProbGradientScaling:
    """Scale the gradient the trainer's loss sends into its fused log-probs, token by token, during the real backward.

    A forward hook on the model (prepended, so that it runs before `GradientCapture`'s and the capture records the
    scaled gradient, the one the optimizer sees) calls `weights_fn(module, batch)` on every training forward of the
    fused head (`fused_lm_head=True`, log-probs that require grad); for a returned `Tensor[B, T-1]` `w`, a tensor hook
    on the log-probs `[B, T-1]` returns `w * dL/d log_probs` in the backward. The loss is not re-implemented: every
    term of it upstream of the per-token log-probs is kept as the trainer computes it, and

        grad = sum_l w_l * (dL/d lp_l) * grad lp_l.

    Unlike `GradientCapture`, a failure here raises: training on an unscaled gradient would silently not be the fix.

    Args:
        model (`nn.Module`): the model the trainer calls.
        weights_fn (`Callable`): `(module, batch: TokenBatch) -> Tensor[B, T-1] | None` (`None`: leave it as is);
            `batch` is the forward's inputs with the labelled positions as targets.
    """

    def __init__(self, model: nn.Module, weights_fn: Any) -> None:
        self.weights_fn = weights_fn
        self.enabled = True
        self._handle = model.register_forward_hook(self._on_forward, with_kwargs=True, prepend=True)

    def remove(self) -> None:
        self._handle.remove()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        log_probs = getattr(output, "log_probs", None)
        if not self.enabled or not kwargs.get("fused_lm_head") or log_probs is None or not log_probs.requires_grad:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        _check_shapes(input_ids, log_probs, fused=True)
        attention_mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        batch = TokenBatch.from_labels(
            input_ids.detach(),
            torch.ones_like(input_ids) if attention_mask is None else attention_mask.detach(),
            kwargs["labels"].detach(),
            position_ids=None if position_ids is None else position_ids.detach(),
        )
        weights = self.weights_fn(module, batch)
        if weights is None:
            return
        if tuple(weights.shape) != tuple(log_probs.shape):
            raise RuntimeError(f"weights of shape {tuple(weights.shape)} for log-probs {tuple(log_probs.shape)}")
        weights = weights.to(device=log_probs.device, dtype=log_probs.dtype)
        log_probs.register_hook(lambda grad: grad * weights)
