"""What one analysis step returns: frozen values, the same whichever backend (dense or sharded) computed them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from trl_ntk.batches import TokenBatch, TokenLabels

SIGN_NAMES = ("positive", "negative")
"""Cell signs: positive gradient = `c_l < 0` (the target's log-prob is pulled up); negative = `c_l > 0`."""


@dataclass(frozen=True)
class GradientCheck:
    """How well the captured signal reconstructs the gradient the optimizer applies.

    `clip_scale` is the least-squares factor `s` with `.grad ~= s * sum_l c_l grad lp_l` (the clip factor, 1 when
    no clipping applied); `cosine` and `relative_error` measure the reconstruction after scaling.
    """

    cosine: float
    relative_error: float
    clip_scale: float

    @classmethod
    def from_dots(cls, raw_norm_sq: float, applied_norm_sq: float, applied_dot_raw: float) -> GradientCheck:
        """From `||raw||^2`, `||applied||^2` and `<applied, raw>`: `s = <applied, raw> / ||raw||^2` and
        `||applied - s raw||^2 = ||applied||^2 - 2 s <applied, raw> + s^2 ||raw||^2`."""
        scale = applied_dot_raw / raw_norm_sq if raw_norm_sq > 0 else 1.0
        if raw_norm_sq == 0 and applied_norm_sq == 0:  # nothing to explain (e.g. GRPO groups without reward variance)
            return cls(cosine=1.0, relative_error=0.0, clip_scale=1.0)
        residual_sq = max(applied_norm_sq - 2 * scale * applied_dot_raw + scale**2 * raw_norm_sq, 0.0)
        return cls(
            cosine=applied_dot_raw / max((raw_norm_sq * applied_norm_sq) ** 0.5, 1e-300),
            relative_error=residual_sq**0.5 / max(applied_norm_sq**0.5, 1e-300),
            clip_scale=scale,
        )


@dataclass(frozen=True)
class Prediction:
    """The predicted first-order change of every target of one token batch over the step, `[M]` each.

    `predicted = current + history (+ rounding)`; `current` = the sum of `cells` (`[K, M]`, the current-gradient
    part by (sign, group) cell) plus `residual` (`[M]`, the part due to the logit residual of losses on the plain
    logits, `None` when the step has none). `rounding` (`[M]`, `None` for float32 weights): with half-precision
    weights, the prediction along the update the optimizer applied (rounded to the weights' dtype) minus the one
    along its float32 update (`analysis.applied`).
    """

    predicted: Tensor
    current: Tensor
    history: Tensor
    cells: Tensor
    residual: Tensor | None = None
    rounding: Tensor | None = None


@dataclass(frozen=True)
class TokenAttribution:
    """The "tokens" level: probe targets x training targets (under DDP, the training targets of every rank).

    Args:
        matrix: `[M_selected, L]` `a_{m,l}` of the probe rows in `matrix_rows`, `None` when no row is selected.
        matrix_rows: `[B]` bool, the probe rows (responses) of `matrix`.
        response_totals: `[B, L]` each probe response's attribution summed over its tokens.
        train_targets: `[L]` training target ids; `train_coeffs` `[L]` their effective `s * c_l`.
        train_batches: the training token batches, in column order.
        train_labels: the adapter labels of the columns (examples and groups renumbered per rank).
    """

    matrix: Tensor | None
    matrix_rows: Tensor
    response_totals: Tensor
    train_targets: Tensor
    train_coeffs: Tensor
    train_batches: tuple[TokenBatch, ...]
    train_labels: TokenLabels | None


@dataclass(frozen=True)
class UpdateExplanation:
    """Everything predicted before an optimizer step for the probe tokens (and other batches).

    Args:
        probe: the probe targets' `Prediction`.
        sgd: `[Mp]` the plain-SGD view `-lr <grad lp~_m, g>`.
        cell_names: `(sign, group)` of each row of the `cells`.
        gradient_check: the reconstruction of the applied gradient.
        path: the JVP path that ran (`jvp.JvpPath` value).
        grad_coeff_norm: `||s c||` over every training target of the step.
        train_labels: the step's adapter labels, concatenated over this rank's micro-batches.
        extra: a `Prediction` per other token batch predicted along the same directions (e.g. `"lld"`).
        tokens: the "tokens" level, `None` at the "sums" level.
        kernel_norms: `{"logprob_norm", "pntk_norm"}` Frobenius norms of the kernels between probe and training
            batches when asked for; empty otherwise.
    """

    probe: Prediction
    sgd: Tensor
    cell_names: tuple[tuple[str, str], ...]
    gradient_check: GradientCheck
    path: str
    grad_coeff_norm: float
    train_labels: TokenLabels | None = None
    extra: Mapping[str, Prediction] = field(default_factory=dict)
    tokens: TokenAttribution | None = None
    kernel_norms: Mapping[str, float] = field(default_factory=dict)
