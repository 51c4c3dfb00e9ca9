"""Token-level gradient kernels between two token batches, and the attributions built from them (DESIGN §2–3).

Pure functions of (model, token batches, parameter selection): the log-prob kernel `K`, the pNTK, the last-layer
kernel, JVPs and weighted gradients of per-target log-probs, the exact split of an optimizer step into a
preconditioned current-gradient part and a carried-over part, and the attribution sums `a_{m,l} = -lr c_l K_{m,l}`.

Per-target outputs are computed without the full `[B, T, V]` logits: the function runs the decoder body on input
embeddings, gathers the final hidden state at the position before each target and applies the unembedding there
only, with the model's logit post-processing (`logit_scale`, `logits_scaling`, `final_logit_softcapping`).
Forward hooks on the input-embedding module (`enable_input_require_grads`, NEFTune noise) are not run; the model's
`forward` (which TRL may patch) is never called. The model's train/eval mode is left as it is: call `model.eval()`
for deterministic kernels when the model has dropout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from trl_ntk.batches import TokenBatch, select_rows, target_rows

logger = logging.getLogger(__name__)

Output = Literal["logprob", "logit_sum"]
"""What is differentiated at each target: `"logprob"` = `log_softmax(z / temperature)[y]`; `"logit_sum"` =
`(1/sqrt V) sum_j z_j` (the pNTK output; the model's logits, temperature not applied)."""

ParamSelection = Sequence[str] | Callable[[str, Tensor], bool] | Mapping[str, Tensor] | None
"""Which parameters a kernel is over: `None` = every parameter with `requires_grad=True` (a PEFT model gives its
adapter parameters); a list of names from `model.named_parameters()`; a predicate `(name, param) -> bool`; or a
mapping `name -> tensor`, the kernel then being evaluated at those values instead of the model's own."""

TokenBatchLike = TokenBatch | Mapping[str, Any]
TensorDict = dict[str, Tensor]

DEFAULT_CHUNK_SIZE = 16
DEFAULT_FD_STEP = 1e-3

_FORWARD_MODE_ATTENTION = ("eager", "sdpa")
_SCORER_PREFIX = "model."


class JvpPath(str, Enum):
    """How Jacobian-vector products of per-target outputs are computed.

    - `FUNC`: `torch.func.jvp` under `torch.func.vmap` over a chunk of tangents (one batched forward per chunk).
      Needs an attention kernel with forward-mode AD: eager or SDPA (run with its MATH backend).
    - `FORWARD_AD`: `torch.autograd.forward_ad` dual tensors, one forward per tangent. Passes through gradient
      checkpointing wrappers, which `torch.func` transforms do not compose with in general (reentrant checkpoints
      are old-style autograd Functions).
    All paths run under `torch.no_grad()`: no autograd graph is kept, and Hugging Face layers skip checkpointing.
    - `FINITE_DIFFERENCE`: central differences `[f(w + h d) - f(w - h d)] / 2h`, two no-grad forwards per tangent,
      with `||h d|| = fd_step * max(||w||, 1)`. Works with any attention kernel; accurate to about `1e-3` relative
      in float32. The fallback and an independent oracle. Unlike backward (and the two paths above), it sees the
      input-embedding row of `padding_idx` as a variable: it differs where a padding token is attended to.
    """

    FUNC = "func"
    FORWARD_AD = "forward_ad"
    FINITE_DIFFERENCE = "finite_difference"


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


# ---------------------------------------------------------------------------------------------------------------
# Model access: parameters, decoder body, unembedding, logit post-processing
# ---------------------------------------------------------------------------------------------------------------


def select_params(model: nn.Module, params: ParamSelection = None) -> TensorDict:
    """The parameters a kernel is over, `name -> tensor` (detached, sharing storage), names as in
    `model.named_parameters()`. See `ParamSelection`."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = {name: p for name, p in named.items() if p.requires_grad}
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


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP / PEFT wrappers (same module objects, so parameter names of the
    wrapper still address them)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return model


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = _unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (lm_head); a causal LM is required")
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "base_model", None)
    if decoder is None or decoder is inner:
        raise ValueError(f"cannot find the decoder body of {type(inner).__name__} (get_decoder / base_model)")
    return decoder, head


class _LogitTransform(NamedTuple):
    """`z = softcap * tanh(scale * pre / softcap)` (no tanh when `softcap` is None), `pre` = unembedding output."""

    scale: float
    softcap: float | None


def _logit_transform(model: nn.Module) -> _LogitTransform:
    config = getattr(_unwrap_model(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(logit_scale, int | float):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(logits_scaling, int | float) and logits_scaling:
        scale /= float(logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return _LogitTransform(scale, float(softcap) if softcap else None)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models, the model's dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _final_hidden(model: nn.Module, batch: TokenBatch) -> Tensor:
    """`[M, H]` final hidden state at position `t - 1` for each target `(b, t)`, row-major."""
    decoder, _ = _decoder_and_head(model)
    embeddings = decoder.get_input_embeddings()
    # .forward: hooks on the embedding module are not run, except in training mode (a replayed training forward,
    # `analysis.guard.replayed_randomness`), where they add the trainer's embedding noise (NEFTune) as it did
    inputs_embeds = embeddings(batch.input_ids) if embeddings.training else embeddings.forward(batch.input_ids)
    padding_idx = getattr(getattr(embeddings, "base_layer", embeddings), "padding_idx", None)
    if padding_idx is not None:
        # Backward gives the padding row no gradient through the lookup; forward mode would: match backward.
        is_padding = (batch.input_ids == padding_idx)[..., None]
        inputs_embeds = torch.where(is_padding, inputs_embeds.detach(), inputs_embeds)
    kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "attention_mask": batch.attention_mask}
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids
    kwargs.update(batch.model_kwargs)
    kwargs["use_cache"] = False
    outputs = decoder(**kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden[:, :-1][batch.target_mask[:, 1:]]


def _output_values(pre: Tensor, targets: Tensor, output: Output, temperature: float, transform: _LogitTransform):
    """`[M]` outputs from unembedding outputs `pre [M, V]` (differentiable standard ops)."""
    logits = pre * transform.scale
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    if output == "logit_sum":
        return logits.sum(-1) / math.sqrt(logits.shape[-1])
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets[:, None])[:, 0]


def _output_values_and_logit_grads(
    pre: Tensor, targets: Tensor, output: Output, temperature: float, transform: _LogitTransform
) -> tuple[Tensor, Tensor]:
    """Outputs `[M]` and their gradients with respect to `pre`, `[M, V]`, in closed form (no autograd).

    logprob: `d lp / d pre = (e_y - softmax(z / T)) / T * dz/dpre`; logit_sum: `(1 / sqrt V) * dz/dpre`, with
    `dz/dpre = scale * (1 - tanh^2(scale * pre / softcap))` (just `scale` without softcapping).
    """
    scaled = pre * transform.scale
    if transform.softcap is not None:
        squashed = torch.tanh(scaled / transform.softcap)
        logits = transform.softcap * squashed
        slope = transform.scale * (1 - squashed.square())
    else:
        logits = scaled
        slope = torch.full_like(pre, transform.scale)
    if output == "logit_sum":
        norm = math.sqrt(pre.shape[-1])
        return logits.sum(-1) / norm, slope / norm
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    values = logprobs.gather(-1, targets[:, None])[:, 0]
    grads = -logprobs.exp()
    grads.scatter_add_(-1, targets[:, None], torch.ones_like(values)[:, None])
    return values, grads * slope / temperature


def _head_outputs(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    output: Output,
    temperature: float,
    transform: _LogitTransform,
    differentiable: bool,
) -> Tensor:
    """`[M]` per-target outputs from final hidden states `[M, H]`.

    For a plain `nn.Linear` unembedding (weight `W [V, H]`, bias `b`) the value is computed once, detached, and the
    derivatives enter through the first-order surrogate

        f = f(w) + <h - sg(h), sg(r)> + <sg(h), r - sg(r)> + <a, b - sg(b)>,   a = df/dpre [M, V],  r = a W [M, H]

    (`sg` = detach), whose value is exactly `f` and whose first derivatives are exactly those of `f`. A JVP then
    costs `M * H` for the hidden-state tangent and one `[M, V] x [V, H]` product for a head-weight tangent, instead
    of two `[M, H] x [H, V]` products and `[M, V]` softmax tangents per tangent; a backward likewise. Second
    derivatives of the surrogate are not those of `f`. Other heads (e.g. a LoRA-wrapped lm_head) are differentiated
    through their own forward.
    """
    compute_dtype = _compute_dtype(hidden.dtype)
    if type(head) is not nn.Linear:
        return _output_values(head(hidden).to(compute_dtype), targets, output, temperature, transform)
    weight, bias = head.weight, head.bias
    hidden_value = hidden.detach()
    pre = nn.functional.linear(hidden_value, weight.detach(), None if bias is None else bias.detach())
    values, logit_grads = _output_values_and_logit_grads(pre.to(compute_dtype), targets, output, temperature, transform)
    if not differentiable:
        return values
    projected = (logit_grads.to(weight.dtype) @ weight).to(compute_dtype)  # r = a W, [M, H]
    projected_value = projected.detach()
    result = (
        values
        + ((hidden - hidden_value).to(compute_dtype) * projected_value).sum(-1)
        + (hidden_value.to(compute_dtype) * (projected - projected_value)).sum(-1)
    )
    if bias is not None:
        result = result + (logit_grads * (bias - bias.detach()).to(compute_dtype)).sum(-1)
    return result


def _target_outputs(model: nn.Module, batch: TokenBatch, output: Output, differentiable: bool) -> Tensor:
    _, head = _decoder_and_head(model)
    hidden = _final_hidden(model, batch)
    return _head_outputs(
        head, hidden, batch.targets, output, batch.temperature, _logit_transform(model), differentiable
    )


class _TargetScorer(nn.Module):
    """Holds the model as its child `model`, so `torch.func.functional_call` can swap parameter values by name."""

    def __init__(self, model: nn.Module, batch: TokenBatch, output: Output, differentiable: bool) -> None:
        super().__init__()
        self.model = model
        self.batch = batch
        self.output = output
        self.differentiable = differentiable

    def forward(self) -> Tensor:
        return _target_outputs(self.model, self.batch, self.output, self.differentiable)


ScoreFn = Callable[[TensorDict], Tensor]


def _score_fn(model: nn.Module, batch: TokenBatch, output: Output, differentiable: bool = True) -> ScoreFn:
    """`values -> [M]` per-target outputs with the parameters in `values` replaced (the rest held fixed)."""
    scorer = _TargetScorer(model, batch, output, differentiable)

    def score(values: TensorDict) -> Tensor:
        prefixed = {_SCORER_PREFIX + name: value for name, value in values.items()}
        return torch.func.functional_call(scorer, prefixed, ())

    return score


def _prepare_batch(model: nn.Module, batch: TokenBatchLike) -> TokenBatch:
    batch = TokenBatch.coerce(batch)
    device = next(model.parameters()).device
    return batch if batch.input_ids.device == device else batch.to(device)


def _prepare(model: nn.Module, *batches: TokenBatchLike) -> list[TokenBatch]:
    """Coerce and move the batches; warn once when the model would compute stochastically (dropout in train mode)."""
    for module in model.modules():
        rate = module.p if isinstance(module, nn.Dropout) else getattr(module, "attention_dropout", 0.0)
        if module.training and isinstance(rate, int | float) and rate > 0:
            logger.warning(
                "%s is in train mode with dropout %.3g: results are stochastic; call model.eval() first",
                type(module).__name__,
                rate,
            )
            break
    return [_prepare_batch(model, batch) for batch in batches]


def target_logprobs(model: nn.Module, batch: TokenBatchLike, *, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """`[M]` per-target log-probs `log_softmax(z / temperature)[y]` (no grad), the function every kernel here
    differentiates; with `params` (`name -> tensor`), evaluated at those parameter values.

    Cost: one no-grad forward; allocates `[M, V]` logits at the targets only, never `[B, T, V]`.
    """
    (batch,) = _prepare(model, batch)
    values = {} if params is None else select_params(model, params)
    with torch.no_grad():
        return _score_fn(model, batch, "logprob", differentiable=False)(values)


# ---------------------------------------------------------------------------------------------------------------
# JVP path selection and the two primitive products
# ---------------------------------------------------------------------------------------------------------------


def _attention_implementations(model: nn.Module) -> dict[int, tuple[Any, str | None]]:
    """`id -> (config, attn_implementation)` for every config of the model's modules and their sub-configs,
    parents before children."""
    configs: dict[int, tuple[Any, str | None]] = {}
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop(0)
        if config is None or id(config) in configs or not hasattr(config, "_attn_implementation"):
            continue
        configs[id(config)] = (config, config._attn_implementation)
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return configs


def _checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose gradient checkpointing is enabled and would run (train mode)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and m.training]


def _uses_reentrant_checkpointing(module: nn.Module) -> bool:
    """torch.utils.checkpoint defaults to the reentrant variant when `use_reentrant` is not given."""
    checkpoint_fn = getattr(module, "_gradient_checkpointing_func", None)
    if checkpoint_fn is None:
        return False
    return bool(getattr(checkpoint_fn, "keywords", {}).get("use_reentrant", True))


def _has_sharded_params(values: TensorDict) -> bool:
    """DeepSpeed ZeRO-3 parameters carry `ds_id`; FSDP2 / tensor-parallel parameters are DTensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()  # noqa: N806
    return any(hasattr(v, "ds_id") or isinstance(v, DTensor) for v in values.values())


def select_jvp_path(model: nn.Module, params: ParamSelection = None) -> JvpPath:
    """The JVP path `path="auto"` runs for this model now (see `JvpPath`).

    `FINITE_DIFFERENCE` when the attention implementation has no forward-mode AD (flash, flex, ...) or the
    parameters are sharded (DTensor, ZeRO-3); `FORWARD_AD` when gradient checkpointing is enabled on a module in
    train mode; `FUNC` otherwise. Record the returned value next to results computed with it.
    """
    values = select_params(model, params)
    if _has_sharded_params(values):
        return JvpPath.FINITE_DIFFERENCE
    implementations = {impl for _, impl in _attention_implementations(model).values()}
    if any(isinstance(impl, str) and impl not in _FORWARD_MODE_ATTENTION for impl in implementations):
        return JvpPath.FINITE_DIFFERENCE
    if _checkpointing_layers(model):
        return JvpPath.FORWARD_AD
    return JvpPath.FUNC


def _resolve_path(model: nn.Module, values: TensorDict, path: JvpPath | str) -> JvpPath:
    if path == "auto":
        return select_jvp_path(model, values)
    try:
        return JvpPath(path)
    except ValueError:
        raise ValueError(f"unknown JVP path {path!r}; expected 'auto' or one of {[p.value for p in JvpPath]}") from None


@contextmanager
def _forward_mode_attention(model: nn.Module, path: JvpPath) -> Iterator[None]:
    """For forward-mode paths: attention kernels without forward AD are switched to SDPA for the duration (and
    switched back after), and SDPA runs its MATH backend."""
    if path is JvpPath.FINITE_DIFFERENCE:
        yield
        return
    saved = _attention_implementations(model)
    try:
        for config, impl in saved.values():
            if isinstance(impl, str) and impl not in _FORWARD_MODE_ATTENTION:
                logger.info("attention %r has no forward-mode AD; using 'sdpa' (MATH) for this JVP", impl)
                config._attn_implementation = "sdpa"
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for config, impl in saved.values():
            if config._attn_implementation != impl:
                config._attn_implementation = impl


def _global_norm(tensors: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _jvp_rows(score: ScoreFn, primals: TensorDict, tangents: TensorDict, path: JvpPath, fd_step: float) -> Tensor:
    """`[C, M]`: row `c` = `d/de f(primals + e * tangents[:, c])` at 0, for tangents `name -> [C, *shape]`."""
    num_rows = next(iter(tangents.values())).shape[0]
    tangents = {name: tangents[name].to(primals[name].dtype) for name in primals}
    with torch.no_grad():
        if path is JvpPath.FUNC:

            def directional(tangent: TensorDict) -> Tensor:
                return torch.func.jvp(score, (primals,), (tangent,))[1]

            return torch.func.vmap(directional, randomness="same")(tangents)  # one dropout mask per chunk
        rows = []
        if path is JvpPath.FORWARD_AD:
            for c in range(num_rows):
                with forward_ad.dual_level():
                    duals = {name: forward_ad.make_dual(value, tangents[name][c]) for name, value in primals.items()}
                    result = score(duals)
                    tangent_out = forward_ad.unpack_dual(result).tangent
                rows.append(torch.zeros_like(result) if tangent_out is None else tangent_out)
            return torch.stack(rows)
        primal_norm = max(_global_norm(primals.values()), 1.0)
        for c in range(num_rows):
            direction = {name: tangent[c] for name, tangent in tangents.items()}
            direction_norm = _global_norm(direction.values())
            if direction_norm == 0:
                rows.append(torch.zeros_like(score(primals)))
                continue
            step = fd_step * primal_norm / direction_norm
            plus = score({name: value + step * direction[name] for name, value in primals.items()})
            minus = score({name: value - step * direction[name] for name, value in primals.items()})
            rows.append((plus - minus) / (2 * step))
        return torch.stack(rows)


class _Backward:
    """One forward with gradients, then any number of batched vector-Jacobian products `sum_m w[r, m] grad f_m`."""

    def __init__(self, score: ScoreFn, primals: TensorDict, model: nn.Module) -> None:
        if any(_uses_reentrant_checkpointing(layer) for layer in _checkpointing_layers(model)):
            raise ValueError(
                "reentrant gradient checkpointing is active (model in train mode), and it cannot return "
                "per-target gradients; call model.eval() first (checkpointing then idles) or enable checkpointing "
                "with gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        self.names = list(primals)
        self.leaves = [primals[name].detach().requires_grad_(True) for name in self.names]
        with torch.enable_grad():
            self.outputs = score(dict(zip(self.names, self.leaves, strict=True)))

    @property
    def num_targets(self) -> int:
        return self.outputs.shape[0]

    def __call__(self, weights: Tensor) -> TensorDict:
        """`weights [R, M]` -> `name -> [R, *shape]`."""
        grads = torch.autograd.grad(
            self.outputs,
            self.leaves,
            grad_outputs=weights.to(self.outputs),
            retain_graph=True,
            is_grads_batched=True,
            materialize_grads=True,
        )
        return dict(zip(self.names, grads, strict=True))

    def single(self, weights: Tensor) -> TensorDict:
        """`weights [M]` -> `name -> [*shape]` (one backward, the graph freed)."""
        grads = torch.autograd.grad(
            self.outputs, self.leaves, grad_outputs=weights.to(self.outputs), materialize_grads=True
        )
        return dict(zip(self.names, grads, strict=True))


def _precondition(grads: TensorDict, preconditioner: Mapping[str, Tensor] | None) -> TensorDict:
    """`P * g` in place (the gradients are fresh), the product taken in float32 or wider."""
    if preconditioner is None:
        return grads
    missing = [name for name in grads if name not in preconditioner]
    if missing:
        raise ValueError(f"the preconditioner has no entry for parameters {missing[:5]}")
    for name, grad in grads.items():
        dtype = _compute_dtype(grad.dtype)
        grad.copy_(preconditioner[name].to(grad.device, dtype) * grad.to(dtype))
    return grads


def _one_hot_chunks(num_rows: int, chunk_size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        chunk = torch.zeros(stop - start, num_rows, device=device)
        chunk[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        yield chunk


def _contract(
    model: nn.Module,
    row_batch: TokenBatch,
    column_batch: TokenBatch,
    row_weights: Iterable[Tensor],
    *,
    values: TensorDict,
    output: Output,
    preconditioner: Mapping[str, Tensor] | None,
    path: JvpPath,
    fd_step: float,
) -> Tensor:
    """`[R, Mc]`: `sum_a W[r, a] <grad f_a(row batch), P grad f_b(column batch)>`, `W` given in row chunks.

    One batched backward per chunk of `W` rows, then one batched JVP of the column batch per chunk. A chunk whose
    weights touch at most half of the row batch's sequences (a few probe tokens, one response) runs its forward
    and backward on those sequences only; the other chunks share one forward of the whole row batch. Never forms
    the kernel when `W` is not the identity.
    """
    column_score = _score_fn(model, column_batch, output, differentiable=path is not JvpPath.FINITE_DIFFERENCE)
    row_of_target = target_rows(row_batch)
    num_sequences = row_batch.input_ids.shape[0]
    shared: _Backward | None = None
    rows = []
    for weights in row_weights:
        sequences = torch.zeros(num_sequences, dtype=torch.bool, device=row_of_target.device)
        sequences[row_of_target[(weights != 0).any(0).to(row_of_target.device)]] = True
        touched = int(sequences.sum())
        if not row_batch.model_kwargs and 0 < touched <= num_sequences // 2:
            sliced = _Backward(_score_fn(model, select_rows(row_batch, sequences), output), values, model)
            grads = sliced(weights[:, sequences[row_of_target].to(weights.device)])
            del sliced
        else:  # also an all-zero chunk: zero gradients, zero rows, as without slicing
            if shared is None:
                shared = _Backward(_score_fn(model, row_batch, output), values, model)
            grads = shared(weights)
        tangents = _precondition(grads, preconditioner)
        with _forward_mode_attention(model, path):  # the backward forwards above keep the model's own attention
            rows.append(_jvp_rows(column_score, values, tangents, path, fd_step))
        del grads, tangents  # one chunk of parameter-sized tangents alive at a time
    return torch.cat(rows)


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
    probe_backward = _Backward(_score_fn(model, probe, output), values, model)
    train_backward = _Backward(_score_fn(model, train, output), values, model)
    device = probe_backward.outputs.device
    dtype = probe_backward.outputs.dtype
    kernel = torch.zeros(probe_backward.num_targets, train_backward.num_targets, device=device, dtype=dtype)
    for p_start, probe_weights in zip(
        range(0, kernel.shape[0], chunk_size), _one_hot_chunks(kernel.shape[0], chunk_size, device), strict=True
    ):
        probe_grads = _precondition(probe_backward(probe_weights), preconditioner)
        for t_start, train_weights in zip(
            range(0, kernel.shape[1], chunk_size), _one_hot_chunks(kernel.shape[1], chunk_size, device), strict=True
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
) -> Tensor:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    probe, train = _prepare(model, probe, train)
    values = select_params(model, params)
    num_probe, num_train = probe.num_targets, train.num_targets
    device = next(iter(values.values())).device
    dtype = _compute_dtype(next(iter(values.values())).dtype)
    if num_probe == 0 or num_train == 0:
        return torch.zeros(num_probe, num_train, device=device, dtype=dtype)
    implementation = KernelImplementation(implementation)
    if implementation is KernelImplementation.GRADIENTS:
        return _gradient_dot(
            model, probe, train, values=values, output=output, preconditioner=preconditioner, chunk_size=chunk_size
        )
    resolved = _resolve_path(model, values, path)
    logger.debug("kernel %s: JVP path %s, Mp=%d, Mt=%d", output, resolved.value, num_probe, num_train)
    by_probe_rows = num_probe <= num_train
    row_batch, column_batch = (probe, train) if by_probe_rows else (train, probe)
    num_rows = row_batch.num_targets
    kernel = _contract(
        model,
        row_batch,
        column_batch,
        _one_hot_chunks(num_rows, chunk_size, device),
        values=values,
        output=output,
        preconditioner=preconditioner,
        path=resolved,
        fd_step=fd_step,
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
    (batch,) = _prepare(model, batch)
    _, head = _decoder_and_head(model)
    with torch.no_grad():
        hidden = _final_hidden(model, batch)
        pre = head(hidden).to(_compute_dtype(hidden.dtype))
        _, logit_grad = _output_values_and_logit_grads(
            pre, batch.targets, output, batch.temperature, _logit_transform(model)
        )
    return LastLayerFactors(hidden.to(logit_grad.dtype), logit_grad)


def _head_weight_name(model: nn.Module) -> str:
    _, head = _decoder_and_head(model)
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
    (batch,) = _prepare(model, batch)
    values = select_params(model, list(direction))
    for name, value in values.items():
        if direction[name].shape != value.shape:
            raise ValueError(
                f"direction[{name!r}] has shape {tuple(direction[name].shape)}, the parameter {tuple(value.shape)}"
            )
    resolved = _resolve_path(model, values, path)
    tangents = {name: direction[name].to(values[name].device)[None] for name in values}
    with _forward_mode_attention(model, resolved):
        score = _score_fn(model, batch, output, differentiable=resolved is not JvpPath.FINITE_DIFFERENCE)
        return _jvp_rows(score, values, tangents, resolved, fd_step)[0]


def logprob_grad(
    model: nn.Module,
    batch: TokenBatchLike,
    weights: Tensor,
    *,
    params: ParamSelection = None,
    output: Output = "logprob",
) -> TensorDict:
    """`sum_m weights[m] * grad_w lp_m` over the selected parameters, `name -> Tensor[*param.shape]`.

    `weights [M]`. Cost: one forward and one backward of the batch. Leaves `.grad` of the model untouched.
    """
    (batch,) = _prepare(model, batch)
    values = select_params(model, params)
    backward = _Backward(_score_fn(model, batch, output), values, model)
    if weights.shape != (backward.num_targets,):
        raise ValueError(f"weights must have shape [M] = [{backward.num_targets}], got {tuple(weights.shape)}")
    return backward.single(weights)


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
    (batch,) = _prepare(model, batch)
    values = select_params(model, params)
    named = dict(model.named_parameters())
    with torch.enable_grad():
        logits = model(**batch.forward_kwargs(), use_cache=False).logits[:, :-1]
        objective = (logits[positions.to(logits.device)].float() * cotangent.to(logits.device).float()).sum()
        grads = torch.autograd.grad(objective, [named[name] for name in values], allow_unused=True)
    return {
        name: torch.zeros_like(value) if grad is None else grad.detach()
        for (name, value), grad in zip(values.items(), grads)
    }


# ---------------------------------------------------------------------------------------------------------------
# Optimizer steps: dw = -P * g + history
# ---------------------------------------------------------------------------------------------------------------


class StepSplit(NamedTuple):
    """The update the optimizer is about to take, `dw = -preconditioner * g + history`, per parameter name."""

    preconditioner: TensorDict
    """`P`, broadcastable to each parameter (0-dim for SGD), so that `-P * g` is the part linear in this step's
    gradient `g`."""
    history: TensorDict
    """The rest of the update: momentum carried over from earlier steps, and weight decay."""


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
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
    weights = param.detach().to(_compute_dtype(param.dtype))
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


def _adam_split(
    group: Mapping[str, Any], state: Mapping[str, Any], param: Tensor, grad: Tensor, decoupled: bool
) -> tuple[Tensor, Tensor]:
    lr, eps, decay = _number(group["lr"]), _number(group["eps"]), _number(group["weight_decay"])
    beta1, beta2 = (_number(b) for b in group["betas"])
    dtype = _compute_dtype(param.dtype)
    weights, grad = param.detach().to(dtype), grad.detach().to(dtype)
    step = _number(state["step"]) + 1 if "step" in state else 1.0
    first = state["exp_avg"].to(dtype) if "exp_avg" in state else torch.zeros_like(weights)
    second = state["exp_avg_sq"].to(dtype) if "exp_avg_sq" in state else torch.zeros_like(weights)
    effective_grad = grad + decay * weights if (decay and not decoupled) else grad  # Adam's L2 term
    second = beta2 * second + (1 - beta2) * effective_grad.square()  # v_t includes this step's gradient
    if group["amsgrad"]:
        running_max = state["max_exp_avg_sq"].to(dtype) if "max_exp_avg_sq" in state else torch.zeros_like(weights)
        second = torch.maximum(running_max, second)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = second.sqrt() / math.sqrt(bias2) + eps
    preconditioner = lr * (1 - beta1) / bias1 / denom
    history = -lr / bias1 * beta1 * first / denom
    if decay:
        if decoupled:  # AdamW: w <- w * (1 - lr * decay) before the Adam step
            history = history - lr * decay * weights
        else:
            history = history - lr / bias1 * (1 - beta1) * decay * weights / denom
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
        dtype if wider). Allocates two parameter-sized tensors per parameter (one for SGD).
    """
    inner = _unwrap_optimizer(optimizer)
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
            zero = torch.zeros((), device=param.device, dtype=_compute_dtype(param.dtype))
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
    """Plain-SGD view `P = lr` (0-dim per parameter): `-c_l K^P[m, l]` is then the seed's `a_{m,l}`."""
    return {
        name: torch.tensor(float(lr), device=p.device, dtype=_compute_dtype(p.dtype))
        for name, p in dict(named_params).items()
    }


# ---------------------------------------------------------------------------------------------------------------
# Attributions a[m, l] = -lr * c_l * K[m, l], from a kernel or directly
# ---------------------------------------------------------------------------------------------------------------


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
) -> Tensor:
    """`attribution_group_sums` without the kernel: `[Mp, G]`.

    Per group `g`: `G_g = sum_{l in g} c_l grad lp_l` (one batched backward of the training batch for all groups),
    then `-lr <grad lp~_m, P * G_g>` for all `m` by one batched JVP of the probe batch. Cost about one training
    step plus one probe JVP per group; allocates `min(G, chunk_size)` parameter-sized gradients, never `K`.
    """
    probe, train = _prepare(model, probe, train)
    _check_coeffs(grad_coeffs, train.num_targets)
    values = select_params(model, params)
    num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
    coeffs = grad_coeffs.to(values[next(iter(values))].device)
    membership = nn.functional.one_hot(groups.long().to(coeffs.device), num_groups).T.to(coeffs.dtype)
    train_weights = membership * coeffs[None, :]  # [G, Mt]
    sums = _contract(
        model,
        train,
        probe,
        train_weights.split(chunk_size),
        values=values,
        output="logprob",
        preconditioner=preconditioner,
        path=_resolve_path(model, values, path),
        fd_step=fd_step,
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
) -> Tensor:
    """`attribution_column_sums` without the kernel: `u = sum_m grad lp~_m` (one probe backward; one per row of
    `probe_weights [R, Mp]`, batched), then one JVP of all training log-probs along `P * u`:
    `-lr * c_l * <grad lp_l, P * u>`. Returns `[Mt]` (`[R, Mt]` with `probe_weights`).

    Cost about one training step (forward + JVP of the training batch) for every training token at once.
    """
    probe, train = _prepare(model, probe, train)
    _check_coeffs(grad_coeffs, train.num_targets)
    values = select_params(model, params)
    device = next(iter(values.values())).device
    weights = torch.ones(1, probe.num_targets, device=device) if probe_weights is None else probe_weights.to(device)
    if weights.dim() != 2 or weights.shape[1] != probe.num_targets:
        raise ValueError(
            f"probe_weights must have shape [R, Mp] = [R, {probe.num_targets}], got {tuple(weights.shape)}"
        )
    sums = _contract(
        model,
        probe,
        train,
        weights.split(chunk_size),
        values=values,
        output="logprob",
        preconditioner=preconditioner,
        path=_resolve_path(model, values, path),
        fd_step=fd_step,
    )
    columns = -lr * grad_coeffs.to(sums)[None, :] * sums
    return columns[0] if probe_weights is None else columns
