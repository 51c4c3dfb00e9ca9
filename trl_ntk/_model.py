"""Access to a Hugging Face causal LM under its wrappers: the model itself, its text config, decoder body and head,
the logit post-processing of its head, its trainable parameters, and whether they are sharded.

One copy of each, used by the kernels, the probe scoring, the step analysis and NTHR.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

TensorDict = dict[str, Tensor]

ParamSelection = Sequence[str] | Callable[[str, Tensor], bool] | Mapping[str, Tensor] | None
"""Which parameters a computation is over: `None` = every parameter with `requires_grad=True` (a PEFT model gives
its adapter parameters); a list of names from `model.named_parameters()`; a predicate `(name, param) -> bool`; or
a mapping `name -> tensor`, the computation then being evaluated at those values instead of the model's own."""

_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)
"""Model types whose `logits_scaling` multiplies the logits (Granite and its relatives divide by it)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP / DataParallel / PEFT wrappers (the same module objects, so parameter
    names of the wrapper still address them)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def text_config(model_or_config: Any) -> Any:
    """The text part of a model's (or a config's) configuration: `config.get_text_config()` when it has one (vision
    language models), else the config itself; `None` for a module without config."""
    config = model_or_config
    if isinstance(model_or_config, nn.Module):
        config = getattr(unwrap_model(model_or_config), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """`(decoder body, output embedding)` of a causal LM: the body maps inputs to the final hidden states
    (`last_hidden_state`), the head maps those to the unembedding outputs before `LogitTransform`."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (lm_head); a causal LM is required")
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "base_model", None)
    if decoder is None or decoder is inner:
        raise ValueError(f"cannot find the decoder body of {type(inner).__name__} (get_decoder / base_model)")
    return decoder, head


@dataclass(frozen=True)
class LogitTransform:
    """The head's post-processing `z = softcap * tanh(scale * pre / softcap)` (no tanh when `softcap` is None) of
    the unembedding output `pre`, as the model's `forward` applies it.

    `scale` is the product of the config fields a head variant multiplies by: `logit_scale` (Cohere),
    `1 / logits_scaling` (Granite; HyperCLOVA X multiplies), `output_multiplier` (MuseGlimmer, MuseSpark, before the
    soft-cap), `lm_head_multiplier` (Falcon-H1); `softcap` is `final_logit_softcapping` (Gemma 2/3).
    """

    scale: float = 1.0
    softcap: float | None = None
    fields: tuple[str, ...] = ()
    """The config fields that make the transform differ from the identity."""

    @classmethod
    def of(cls, model: nn.Module) -> LogitTransform:
        """The transform of `model`'s head, read from its text config."""
        config = text_config(model)
        scale, fields = 1.0, []
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
            value = getattr(config, name, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                scale *= float(value)
                fields += [name] if value != 1 else []
        scaling = getattr(config, "logits_scaling", None)
        if isinstance(scaling, int | float) and not isinstance(scaling, bool) and scaling:
            model_type = str(getattr(config, "model_type", ""))
            multiplies = any(model_type.startswith(kind) for kind in _MULTIPLYING_LOGITS_SCALING)
            scale *= float(scaling) if multiplies else 1.0 / float(scaling)
            fields += ["logits_scaling"] if scaling != 1 else []
        softcap = getattr(config, "final_logit_softcapping", None)
        fields += ["final_logit_softcapping"] if softcap else []
        return cls(scale, float(softcap) if softcap else None, tuple(fields))

    @property
    def is_identity(self) -> bool:
        return self.softcap is None and math.isclose(self.scale, 1.0)

    def __call__(self, pre: Tensor) -> Tensor:
        """`z` from `pre` (any shape; standard differentiable ops)."""
        logits = pre * self.scale if self.scale != 1.0 else pre
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def slope(self, pre: Tensor) -> Tensor:
        """`dz / dpre` elementwise: `scale * (1 - tanh^2(scale * pre / softcap))`, or `scale`."""
        if self.softcap is None:
            return torch.full_like(pre, self.scale)
        return self.scale * (1 - torch.tanh(pre * self.scale / self.softcap).square())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tensors, their own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


DOT_CHUNK_ELEMENTS = 2**20
"""Elements per float64 slice in `float64_dot`: 8 MiB temporaries."""


def float64_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """`sum_n <a[n], b[n]>` accumulated in float64, a 0-dim float64 tensor on `a`'s device; each pair of tensors is
    upcast `DOT_CHUNK_ELEMENTS` elements at a time, never whole (a parameter can be most of the model: a tied
    embedding). Cost: one read of each tensor."""
    total = torch.zeros((), dtype=torch.float64, device=next(iter(a.values())).device if a else None)
    for name, left in a.items():
        left, right = left.reshape(-1), b[name].reshape(-1)
        for start in range(0, left.numel(), DOT_CHUNK_ELEMENTS):
            stop = start + DOT_CHUNK_ELEMENTS
            total += torch.dot(left[start:stop].double(), right[start:stop].double()).to(total.device)
    return total


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """`{name: parameter}` of the parameters with `requires_grad=True` (the adapters of a PEFT model)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def select_params(model: nn.Module, params: ParamSelection = None) -> TensorDict:
    """The parameters a computation is over, `name -> tensor` (detached, sharing storage), names as in
    `model.named_parameters()`. See `ParamSelection`."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = trainable_parameters(model)
        if not chosen:
            raise ValueError("the model has no parameter with requires_grad=True; pass `params` to choose some")
    elif isinstance(params, str):
        raise ValueError(f"params={params!r} is a single string; pass a list of parameter names")
    elif isinstance(params, Mapping):
        chosen = {}
        for name, value in params.items():
            if name not in named:
                raise ValueError(f"unknown parameter {name!r}; expected names from model.named_parameters()")
            if value.shape != named[name].shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(named[name].shape)}, got a value of shape "
                    f"{tuple(value.shape)}"
                )
            chosen[name] = value
    elif callable(params):
        chosen = {name: p for name, p in named.items() if params(name, p)}
    else:
        unknown = [name for name in params if name not in named]
        if unknown:
            raise ValueError(
                f"unknown parameter names {unknown[:5]}; expected names from model.named_parameters(), "
                f"e.g. {list(named)[:3]}"
            )
        chosen = {name: named[name] for name in params}
    if not chosen:
        raise ValueError("the parameter selection is empty")
    return {name: value.detach() for name, value in chosen.items()}


HALF_PRECISION = (torch.float16, torch.bfloat16)


def upcast(values: Mapping[str, Tensor]) -> TensorDict:
    """The values with half-precision floats as float32 copies, the others as they are."""
    return {name: v.float() if v.dtype in HALF_PRECISION else v for name, v in values.items()}


def float32_state(model: nn.Module) -> TensorDict:
    """Float32 copies of the model's half-precision parameters and buffers, `name -> tensor` (detached; empty for
    a float32 / float64 model and for sharded parameters). Evaluating the model with these in place of its own
    (`torch.func.functional_call`) computes in float32 at the same weights. Allocates twice the half-precision
    weights."""
    if is_sharded(model):
        return {}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: v.detach().float() for name, v in state.items() if v.dtype in HALF_PRECISION}


def _dtensor_type() -> type | tuple:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return ()
    return DTensor


def is_sharded(tensors: nn.Module | Mapping[str, Tensor]) -> bool:
    """Whether any parameter (of a module, or value of a mapping) is an FSDP2 / tensor-parallel `DTensor` or a
    DeepSpeed ZeRO-3 partition (`ds_id`)."""
    values = tensors.parameters() if isinstance(tensors, nn.Module) else tensors.values()
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) or hasattr(p, "ds_id") for p in values)


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's slice of a `DTensor` (a view sharing its storage); other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, _dtensor_type()) else tensor


@contextlib.contextmanager
def own_precision_forward(model: nn.Module) -> Iterator[None]:
    """Run the body with the model's own `forward` and autocast off, so that `model(...)` computes in the weights'
    dtype (float32, or float32 on upcast copies of half-precision weights), as the decoder-body forwards do.

    With `bf16=True` / `fp16=True`, accelerate replaces `model.forward` by a wrapper that runs it under
    `torch.autocast` (keeping the original as `model._original_forward`); an enclosing `autocast(enabled=False)`
    cannot undo that. Inside this context every module so wrapped (the model, its PEFT / DDP wrappers) calls its
    original forward, and any enclosing autocast is disabled. Restored afterwards.
    """
    swapped = []
    for module in model.modules():
        original = module.__dict__.get("_original_forward")
        if original is not None and "forward" in module.__dict__:
            swapped.append((module, module.__dict__["forward"]))
            module.forward = original
    device_type = next(iter(model.parameters()), torch.empty(0)).device.type
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        for module, forward in reversed(swapped):
            module.forward = forward


def input_device(model: nn.Module) -> torch.device:
    """The device of the model's input embedding (where token batches go)."""
    return unwrap_model(model).get_input_embeddings().weight.device
