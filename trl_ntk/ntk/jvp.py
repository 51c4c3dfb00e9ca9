"""Jacobian-vector products and batched vector-Jacobian products of per-target outputs (`logprobs.score_fn`).

The two primitive products every kernel and step analysis is built from: `Backward` (one forward with gradients,
then `sum_m w[r, m] grad f_m` for any weight rows) and `jvp_rows` (`<grad f_m, d_c>` for a chunk of tangents,
by `torch.func`, forward-mode dual tensors or central differences, see `JvpPath`); `contract` chains them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from trl_ntk._model import ParamSelection, TensorDict, compute_dtype, is_sharded, select_params
from trl_ntk.batches import TokenBatch, select_rows, target_rows
from trl_ntk.ntk.logprobs import Output, ScoreFn, score_fn

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 16
DEFAULT_FD_STEP = 1e-3

_FORWARD_MODE_ATTENTION = ("eager", "sdpa")


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


def select_jvp_path(model: nn.Module, params: ParamSelection = None) -> JvpPath:
    """The JVP path `path="auto"` runs for this model now (see `JvpPath`).

    `FINITE_DIFFERENCE` when the attention implementation has no forward-mode AD (flash, flex, ...) or the
    parameters are sharded (DTensor, ZeRO-3); `FORWARD_AD` when gradient checkpointing is enabled on a module in
    train mode; `FUNC` otherwise. Record the returned value next to results computed with it.
    """
    values = select_params(model, params)
    if is_sharded(values):
        return JvpPath.FINITE_DIFFERENCE
    implementations = {impl for _, impl in _attention_implementations(model).values()}
    if any(isinstance(impl, str) and impl not in _FORWARD_MODE_ATTENTION for impl in implementations):
        return JvpPath.FINITE_DIFFERENCE
    if _checkpointing_layers(model):
        return JvpPath.FORWARD_AD
    return JvpPath.FUNC


def resolve_path(model: nn.Module, values: TensorDict, path: JvpPath | str) -> JvpPath:
    if path == "auto":
        return select_jvp_path(model, values)
    try:
        return JvpPath(path)
    except ValueError:
        raise ValueError(f"unknown JVP path {path!r}; expected 'auto' or one of {[p.value for p in JvpPath]}") from None


@contextmanager
def forward_mode_attention(model: nn.Module, path: JvpPath) -> Iterator[None]:
    """For forward-mode paths: attention kernels without forward AD are switched to SDPA for the duration, SDPA
    runs its MATH backend, and mixture-of-experts layers run their "eager" experts loop (the grouped matmul kernels
    have no forward-mode rule); every config is switched back after."""
    if path is JvpPath.FINITE_DIFFERENCE:
        yield
        return
    saved = _attention_implementations(model)
    experts = {key: getattr(config, "_experts_implementation_internal", None) for key, (config, _) in saved.items()}
    try:
        for key, (config, impl) in saved.items():
            if isinstance(impl, str) and impl not in _FORWARD_MODE_ATTENTION:
                logger.info("attention %r has no forward-mode AD; using 'sdpa' (MATH) for this JVP", impl)
                config._attn_implementation_internal = "sdpa"
            if experts[key] not in (None, "eager"):
                config._experts_implementation_internal = "eager"
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for key, (config, impl) in saved.items():
            config._attn_implementation_internal = impl
            if experts[key] is not None:
                config._experts_implementation_internal = experts[key]


def _global_norm(tensors: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def jvp_rows(score: ScoreFn, primals: TensorDict, tangents: TensorDict, path: JvpPath, fd_step: float) -> Tensor:
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


class Backward:
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

    def accumulate(self, weights: Tensor, into: TensorDict) -> None:
        """`into[name] += sum_m weights[m] grad f_m` in place, one backward (the graph freed): autograd adds each
        parameter's gradient into `into` as it is produced, so no second parameter-sized dict is ever alive (one
        parameter's gradient at a time). `into` must hold tensors of the parameters' dtypes and shapes."""
        for name, leaf in zip(self.names, self.leaves, strict=True):
            leaf.grad = into[name]
        try:
            torch.autograd.backward(self.outputs, grad_tensors=weights.to(self.outputs), inputs=self.leaves)
            for name, leaf in zip(self.names, self.leaves, strict=True):
                if leaf.grad is not into[name]:  # autograd replaced it instead of adding in place
                    into[name].copy_(leaf.grad)
        finally:
            for leaf in self.leaves:
                leaf.grad = None

    def single(self, weights: Tensor) -> TensorDict:
        """`weights [M]` -> `name -> [*shape]` (one backward, the graph freed)."""
        grads = torch.autograd.grad(
            self.outputs, self.leaves, grad_outputs=weights.to(self.outputs), materialize_grads=True
        )
        return dict(zip(self.names, grads, strict=True))


def precondition(grads: TensorDict, preconditioner: Mapping[str, Tensor] | None) -> TensorDict:
    """`P * g` in place (the gradients are fresh), the product taken in float32 or wider."""
    if preconditioner is None:
        return grads
    missing = [name for name in grads if name not in preconditioner]
    if missing:
        raise ValueError(f"the preconditioner has no entry for parameters {missing[:5]}")
    for name, grad in grads.items():
        dtype = compute_dtype(grad.dtype)
        if grad.dtype == dtype:  # in place: no temporary of the (batched) gradient's size
            grad.mul_(preconditioner[name].to(grad.device, dtype))
        else:
            grad.copy_(preconditioner[name].to(grad.device, dtype) * grad.to(dtype))
    return grads


def one_hot_chunks(num_rows: int, chunk_size: int, device: torch.device) -> Iterator[Tensor]:
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        chunk = torch.zeros(stop - start, num_rows, device=device)
        chunk[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        yield chunk


def contract(
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
    jvp_chunk_size: int | None = None,
) -> Tensor:
    """`[R, Mc]`: `sum_a W[r, a] <grad f_a(row batch), P grad f_b(column batch)>`, `W` given in row chunks.

    Per chunk of `W` rows, the row-side gradients, then, `jvp_chunk_size` rows at a time (`None`: the whole
    chunk), a batched JVP of the column batch along them. The row-side gradients come from the cheapest of:
    - a chunk whose rows each touch one sequence of their own (one probe response per row): per row, a forward
      and a backward of its sequence alone, so a row's backward never runs over other rows' sequences (`R`
      one-sequence backwards instead of `R` backwards of the chunk's sequences), one row's gradient alive beside
      the chunk's;
    - a chunk whose rows touch at most half of the row batch's sequences together: a forward and batched backward
      of those sequences only;
    - otherwise one forward of the whole row batch, shared by such chunks, and its batched backward.
    Memory: `jvp_chunk_size` (or chunk) parameter-sized gradients plus the activations of one JVP along them,
    both growing with it, plus one backward graph. (Tangents are never views into a larger chunk: forward-mode AD
    would copy the whole chunk's storage for each.) Never forms the kernel when `W` is not the identity.
    """
    column_score = score_fn(model, column_batch, output, differentiable=path is not JvpPath.FINITE_DIFFERENCE)
    row_of_target = target_rows(row_batch)
    num_sequences = row_batch.input_ids.shape[0]
    shared: Backward | None = None
    rows = []
    for weights in row_weights:
        touches = (weights != 0).to(row_of_target.device)
        sequences = torch.zeros(num_sequences, dtype=torch.bool, device=row_of_target.device)
        sequences[row_of_target[touches.any(0)]] = True
        touched = int(sequences.sum())
        sequence_of_row = _single_sequence_of_rows(touches, row_of_target)
        step = weights.shape[0] if jvp_chunk_size is None else jvp_chunk_size
        if not row_batch.model_kwargs and sequence_of_row is not None and touched == weights.shape[0] > 1:
            for start in range(0, weights.shape[0], step):
                stop = min(start + step, weights.shape[0])
                gradients = _per_sequence_gradients(
                    model, row_batch, output, values, weights[start:stop], sequence_of_row[start:stop], row_of_target
                )
                tangents = precondition(gradients, preconditioner)
                with forward_mode_attention(model, path):
                    rows.append(jvp_rows(column_score, values, tangents, path, fd_step))
                del tangents, gradients
            continue
        if not row_batch.model_kwargs and 0 < touched <= num_sequences // 2:
            backward = Backward(score_fn(model, select_rows(row_batch, sequences), output), values, model)
            weights = weights[:, sequences[row_of_target].to(weights.device)]
        else:  # also an all-zero chunk: zero gradients, zero rows, as without slicing
            if shared is None:
                shared = Backward(score_fn(model, row_batch, output), values, model)
            backward = shared
        for start in range(0, weights.shape[0], step):  # one backward of the chunk's graph per `step` rows
            tangents = precondition(backward(weights[start : start + step]), preconditioner)
            if start + step >= weights.shape[0] and backward is not shared:
                backward = None  # a sliced graph is freed before its last JVP
            with forward_mode_attention(model, path):  # the backward forwards above keep the model's attention
                rows.append(jvp_rows(column_score, values, tangents, path, fd_step))
            del tangents  # `step` parameter-sized tangents alive at a time, in storage of their own
        del backward
    return torch.cat(rows)


def _single_sequence_of_rows(touches: Tensor, row_of_target: Tensor) -> Tensor | None:
    """`[R]` the one sequence each weight row touches (`touches [R, M]` bool), or `None` when some row touches
    none or several."""
    if touches.shape[0] == 0 or touches.shape[1] == 0:
        return None
    per_row = torch.zeros(touches.shape[0], int(row_of_target.max()) + 1, dtype=torch.bool, device=touches.device)
    rows, targets = touches.nonzero(as_tuple=True)
    per_row[rows, row_of_target[targets]] = True
    if not bool((per_row.sum(1) == 1).all()):
        return None
    return per_row.float().argmax(1)


def _per_sequence_gradients(
    model: nn.Module,
    row_batch: TokenBatch,
    output: Output,
    values: TensorDict,
    weights: Tensor,
    sequence_of_row: Tensor,
    row_of_target: Tensor,
) -> TensorDict:
    """`name -> [R, *shape]`: `sum_a W[r, a] grad f_a` for rows that each touch one sequence, by one forward and
    one batched backward per sequence on that sequence alone (its graph freed before the next)."""
    gradients = {
        name: torch.empty((weights.shape[0], *value.shape), dtype=value.dtype, device=value.device)
        for name, value in values.items()
    }
    for sequence in sequence_of_row.unique().tolist():
        in_sequence = (sequence_of_row == sequence).to(weights.device)
        mask = torch.zeros(row_batch.input_ids.shape[0], dtype=torch.bool)
        mask[sequence] = True
        backward = Backward(score_fn(model, select_rows(row_batch, mask), output), values, model)
        part = backward(weights[in_sequence][:, (row_of_target == sequence).to(weights.device)])
        del backward
        for name, value in part.items():
            gradients[name][in_sequence.to(value.device)] = value.to(gradients[name].dtype)
        del part
    return gradients
