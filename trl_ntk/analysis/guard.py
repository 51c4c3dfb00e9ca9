"""Whether a step's explanation can be trusted, and what in a trainer's set-up keeps the analysis from being exact.

Every analysed step reconstructs the gradient the optimizer applies from the captured signal (`GradientCheck`).
When the reconstruction misses, the explanation is about another update than the one applied: `judge` decides
from the check (dtype-aware thresholds) and from the set-up issues found before training (`diagnose`), and the
records carry the verdict. `replayed_randomness` lets the analysis forwards of a training micro-batch draw the
same dropout masks and embedding noise as the trainer's forward (as activation checkpointing does).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from trl_ntk.analysis.dynamics import GradientCheck


@dataclass(frozen=True)
class Thresholds:
    """Least cosine and largest relative error of a gradient reconstruction that is taken as exact."""

    min_cosine: float
    max_relative_error: float


# float32 / float64: a reconstruction differs from `.grad` only by summation order (cosine >= 1 - 2e-12 measured on
# eleven architectures); the known set-ups that break exactness give cosine 0.35-0.99 (packing, NEFTune, dropout) or,
# for terms the check cannot see at all (MoE load-balancing loss: 1 - 5e-9; entropy bonus), are flagged from the
# set-up. bf16: each gradient entry carries a rounding of up to eps/2 = 3.9e-3 that the float32 reconstruction does
# not; measured (bf16 weights and bf16 autocast; SFT, DPO, GRPO; toy, Llama, Gemma 2) cosine >= 1 - 7.5e-5 and
# relative error <= 1.2e-2, so the limits (1 - 1e-3, 4.5e-2; a consistent pair, rel^2 ~ 2 (1 - cos)) leave a margin
# of about 4 on the relative error. fp16 (eps 8 times smaller, not measured): the bf16 pair scaled down accordingly.
_THRESHOLDS = {
    torch.float64: Thresholds(1 - 1e-6, 1e-3),
    torch.float32: Thresholds(1 - 1e-6, 1e-3),
    torch.bfloat16: Thresholds(1 - 1e-3, 4.5e-2),
    torch.float16: Thresholds(1 - 5e-5, 1e-2),
}


def thresholds(dtype: torch.dtype) -> Thresholds:
    """The thresholds of `judge` for gradients computed in `dtype` (float32 for any other dtype)."""
    return _THRESHOLDS.get(dtype, _THRESHOLDS[torch.float32])


@dataclass(frozen=True)
class SetupIssue:
    """Something in the trainer's set-up that the analysis forwards may not reproduce.

    Args:
        name (`str`): short key (`"dropout"`, `"neftune"`, `"entropy_bonus"`, ...).
        detail (`str`): what was found and what it does to the explanation.
        handled (`bool`): the analysis reproduces it (replayed randomness, the applied update of half-precision
            weights); named only when the check fails.
    """

    name: str
    detail: str
    handled: bool = False


@dataclass(frozen=True)
class Verdict:
    """`trusted` and, when not, the reason (with the set-up's possible causes)."""

    trusted: bool
    reason: str | None = None


def judge(check: GradientCheck, dtype: torch.dtype, issues: Sequence[SetupIssue] = ()) -> Verdict:
    """Trust a step when `check.cosine >= min_cosine` and `check.relative_error <= max_relative_error` for `dtype`
    and no unhandled set-up issue makes the analysed loss differ from the trained one.

    Pure: no I/O, no state. The reason names the failing figure and the set-up's possible causes.
    """
    limits = thresholds(dtype)
    unhandled = [issue for issue in issues if not issue.handled]
    finite = math.isfinite(check.cosine) and math.isfinite(check.relative_error)
    if finite and check.cosine >= limits.min_cosine and check.relative_error <= limits.max_relative_error:
        if not unhandled:
            return Verdict(True)
        return Verdict(False, "not reproduced by the analysis: " + "; ".join(i.detail for i in unhandled))
    figures = (
        f"gradient check cosine {check.cosine:.9g} (needs >= {limits.min_cosine:.9g}), relative error "
        f"{check.relative_error:.3g} (needs <= {limits.max_relative_error:.3g}) for {_dtype_name(dtype)} gradients"
    )
    if not finite:
        return Verdict(
            False,
            f"{figures}: the gradient (or the weights) holds NaN or inf values, so the step cannot be explained; "
            "check the learning rate, the loss scale and the data of this step",
        )
    causes = "; ".join(i.detail for i in issues) if issues else "none of the known set-up causes was found"
    return Verdict(
        False, f"{figures}: the captured signal does not reconstruct the applied gradient. Possible causes: {causes}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gradient_dtype(model: nn.Module, args: Any = None) -> torch.dtype:
    """The dtype the step's gradients are computed in: bf16 / fp16 under autocast (`args.bf16` / `args.fp16`),
    else the lowest-precision dtype of the trainable parameters."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32


def dropout_modules(model: nn.Module) -> list[str]:
    """Names of the active sources of dropout: `nn.Dropout` modules with `p > 0` and modules with a positive
    float `attention_dropout` / `dropout` attribute (functional dropout, e.g. OPT's or attention dropout)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p > 0:
                found.append(name or type(module).__name__)
            continue
        for attribute in ("attention_dropout", "dropout"):
            rate = getattr(module, attribute, None)
            if isinstance(rate, float) and rate > 0:
                found.append(f"{name or type(module).__name__}.{attribute}")
                break
    return found


def diagnose(
    trainer: Any, model: nn.Module, replays_randomness: bool, applied_update: bool | None = None
) -> list[SetupIssue]:
    """What in the trainer's set-up makes the trained loss or forward differ from what the analysis computes.

    Args:
        trainer: the TRL trainer (its `args` and attributes are read).
        model (`nn.Module`): the unwrapped model the trainer calls.
        replays_randomness (`bool`): whether the analysis replays the training forward's dropout masks and NEFTune
            noise (then they are handled issues).
        applied_update (`bool`, *optional*): whether it predicts along the update the optimizer applied to
            half-precision weights (`analysis.applied`; then they are a handled issue). Defaults to
            `replays_randomness` (the callback does both, on unsharded parameters).
    """
    args = getattr(trainer, "args", None)
    applied_update = replays_randomness if applied_update is None else applied_update
    issues = []
    dropout = dropout_modules(model)
    if dropout:
        issues.append(
            SetupIssue(
                "dropout",
                f"dropout active in training mode ({', '.join(dropout[:3])}{', ...' if len(dropout) > 3 else ''})"
                + ("; its masks are replayed" if replays_randomness else ""),
                handled=replays_randomness,
            )
        )
    neftune = getattr(args, "neftune_noise_alpha", None)
    if neftune:
        issues.append(
            SetupIssue(
                "neftune",
                f"NEFTune noise on the embeddings (neftune_noise_alpha={neftune}) in the training forward"
                + ("; its noise is replayed" if replays_randomness else ""),
                handled=replays_randomness,
            )
        )
    entropy_coef = getattr(trainer, "entropy_coef", None) or getattr(args, "entropy_coef", None)
    if entropy_coef or getattr(trainer, "_entropy_bonus_enabled", False):
        issues.append(
            SetupIssue(
                "entropy_bonus",
                f"GRPO entropy bonus (entropy_coef={entropy_coef}); its gradient is captured as a logit residual",
                handled=True,
            )
        )
    if getattr(trainer, "aux_loss_enabled", False) or _moe_aux_loss(model, trainer):
        issues.append(
            SetupIssue(
                "moe_aux_loss",
                "MoE load-balancing loss (router outputs with router_aux_loss_coef > 0): its gradient is not "
                "captured; set router_aux_loss_coef=0.0 in the trainer's config to train without it",
            )
        )
    weights = {p.dtype for p in model.parameters() if p.requires_grad}
    if weights & {torch.bfloat16, torch.float16}:
        issues.append(
            SetupIssue(
                "half_precision_weights",
                "half-precision trainable weights: the optimizer's update is rounded to the weights' dtype, so the "
                "observed change is dominated by rounding at small learning rates"
                + (
                    "; the prediction follows the update the optimizer applied"
                    if applied_update
                    else "; train float32 weights (with bf16=True autocast) for an exact analysis"
                ),
                handled=applied_update,
            )
        )
    return issues


def _moe_aux_loss(model: nn.Module, trainer: Any) -> bool:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    coef = getattr(getattr(trainer, "args", None), "router_aux_loss_coef", None)
    coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return bool(getattr(text_config, "output_router_logits", False)) and bool(coef)


@dataclass(frozen=True)
class RngState:
    """The random-number generator states at the start of one training forward (CPU, and every CUDA device when
    CUDA is initialised) and whether the model was in training mode."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]
    training: bool

    @classmethod
    def capture(cls, model: nn.Module) -> RngState:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(cpu=torch.get_rng_state(), cuda=cuda, training=model.training)


@contextlib.contextmanager
def replayed_randomness(model: nn.Module, state: RngState | None) -> Iterator[None]:
    """Run the body with the RNG state and train/eval mode of a recorded training forward, so that its first forward
    draws the same dropout masks (and NEFTune noise) as the trainer's did; restore both afterwards, so the trainer's
    own random stream is untouched. `state=None`: the body runs as it is."""
    if state is None:
        yield
        return
    was_training = model.training
    cpu = torch.get_rng_state()
    cuda = tuple(torch.cuda.get_rng_state_all()) if state.cuda else ()
    torch.set_rng_state(state.cpu)
    if state.cuda:
        torch.cuda.set_rng_state_all(list(state.cuda))
    model.train(state.training)
    try:
        yield
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(list(cuda))
