"""Per-target outputs of a causal LM: the one forward path every log-prob in the package goes through.

A target `(b, t)` of a `TokenBatch` is scored from the final hidden state at position `t - 1`. The decoder body runs
on input embeddings with exactly the inputs the trainer's forward had (`attention_mask`, `position_ids` only when
the batch carries them, any other model inputs): positions are never built here, so a batch without
`position_ids` gets the model's own default, as in training. The unembedding is applied at the targets only, then
the head's logit post-processing (`_model.LogitTransform`), never forming the `[B, T, V]` logits.

Forward hooks on the input-embedding module (`enable_input_require_grads`, NEFTune noise) are not run; the model's
`forward` (which TRL may patch) is never called, except by `model_target_logits`, the full forward for sharded
models. A half-precision model is evaluated in float32 on upcast copies of its weights. The model's train/eval mode
is left as it is: call `model.eval()` for deterministic values.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from trl_ntk._model import (
    LogitTransform,
    ParamSelection,
    TensorDict,
    compute_dtype,
    decoder_and_head,
    float32_state,
    own_precision_forward,
    select_params,
    upcast,
)
from trl_ntk.batches import TokenBatch

logger = logging.getLogger(__name__)

Output = Literal["logprob", "logit_sum"]
"""What is differentiated at each target: `"logprob"` = `log_softmax(z / temperature)[y]`; `"logit_sum"` =
`(1/sqrt V) sum_j z_j` (the pNTK output; the model's logits, temperature not applied)."""

TokenBatchLike = TokenBatch | Mapping[str, Any]
ScoreFn = Callable[[TensorDict], Tensor]

_SCORER_PREFIX = "model."


def final_hidden(model: nn.Module, batch: TokenBatch) -> Tensor:
    """`[M, H]` final hidden state at position `t - 1` for each target `(b, t)`, row-major.

    Cost: one forward of the decoder body (no unembedding)."""
    decoder, _ = decoder_and_head(model)
    embeddings = decoder.get_input_embeddings()
    # .forward: hooks on the embedding module are not run, except in training mode (a replayed training forward,
    # `analysis.guard.replayed_randomness`), where they add the trainer's embedding noise (NEFTune) as it did
    inputs_embeds = embeddings(batch.input_ids) if embeddings.training else embeddings.forward(batch.input_ids)
    padding_idx = getattr(getattr(embeddings, "base_layer", embeddings), "padding_idx", None)
    if padding_idx is not None:
        # Backward gives the padding row no gradient through the lookup; forward mode would: match backward.
        is_padding = (batch.input_ids == padding_idx)[..., None]
        inputs_embeds = torch.where(is_padding, inputs_embeds.detach(), inputs_embeds)
    kwargs = batch.forward_kwargs()
    del kwargs["input_ids"]
    outputs = decoder(inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden[:, :-1][batch.target_mask[:, 1:]]


def head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """`[n, V]` logits `z` (head and `LogitTransform`, in float32 or wider) from final hidden states `[n, H]`."""
    _, head = decoder_and_head(model)
    return LogitTransform.of(model)(head(hidden).to(compute_dtype(hidden.dtype)))


def model_target_logits(model: nn.Module, batch: TokenBatch) -> Tensor:
    """`[M, V]` the logits of the model's own full forward at the targets (float32 or wider), with the same inputs
    as `final_hidden`. For models whose root module must run (FSDP gathers its parameters there) or whose
    `forward` is patched (TRL's fused head). Holds `[B, T, V]` for the batch."""
    with own_precision_forward(model):  # never the trainer's autocast wrapper: float32 like `final_hidden`
        logits = model(**batch.forward_kwargs(), use_cache=False).logits[:, :-1][batch.target_mask[:, 1:]]
    return logits.to(compute_dtype(logits.dtype))


def _output_values(pre: Tensor, targets: Tensor, output: Output, temperature: float, transform: LogitTransform):
    """`[M]` outputs from unembedding outputs `pre [M, V]` (differentiable standard ops)."""
    logits = transform(pre)
    if output == "logit_sum":
        return logits.sum(-1) / math.sqrt(logits.shape[-1])
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets[:, None])[:, 0]


def output_values_and_logit_grads(
    pre: Tensor, targets: Tensor, output: Output, temperature: float, transform: LogitTransform
) -> tuple[Tensor, Tensor]:
    """Outputs `[M]` and their gradients with respect to `pre`, `[M, V]`, in closed form (no autograd).

    logprob: `d lp / d pre = (e_y - softmax(z / T)) / T * dz/dpre`; logit_sum: `(1 / sqrt V) * dz/dpre`, with
    `dz/dpre = LogitTransform.slope(pre)`. Memory: two or three `[M, V]` buffers at a time (the gradients are
    formed in place of the log-softmax).
    """
    logits = transform(pre)
    if output == "logit_sum":
        norm = math.sqrt(pre.shape[-1])
        return logits.sum(-1) / norm, transform.slope(pre) / norm
    logprobs = torch.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    del logits
    values = logprobs.gather(-1, targets[:, None])[:, 0]
    grads = logprobs.exp_().neg_()
    grads.scatter_add_(-1, targets[:, None], torch.ones_like(values)[:, None])
    if transform.softcap is not None:
        grads.mul_(transform.slope(pre))
    elif transform.scale != 1.0:
        grads.mul_(transform.scale)
    if temperature != 1:
        grads.div_(temperature)
    return values, grads


HEAD_CHUNK_BYTES = 32 * 2**20
"""Cap on one `[rows, V]` temporary of the head's closed form (`LogitGrads`)."""
HEAD_CHUNK_WEIGHT_FRACTION = 1 / 4
"""Cap on one `[rows, V]` temporary relative to the head weight `[V, H]` (at most `H / 4` rows): with a large
vocabulary `W` is most of the parameters, so the temporaries stay a fraction of them at any width. Fewer rows make
the chunk products slower (each streams all of `W`)."""
HEAD_CHUNK_MIN_BYTES = 4 * 2**20
"""Floor of that fraction cap: a small model's head runs in one chunk (its `[M, V]` buffers are a few MiB, and row
chunks of `H / 4` targets would multiply the passes' fixed costs)."""


def head_chunk_rows(vocab_size: int, hidden_size: int, itemsize: int) -> int:
    """Targets per row chunk of the head's closed form: `[rows, V]` within `HEAD_CHUNK_BYTES` and within
    `HEAD_CHUNK_WEIGHT_FRACTION` of the `[V, H]` weight or `HEAD_CHUNK_MIN_BYTES`, whichever is larger; at least
    one. About 55 rows at `V = 151936`, `H = 896` in float32; 144 at SmolLM2's `V = 49152`, `H = 576`; about 1,700
    (the whole batch) at a 600-word vocabulary."""
    fraction = HEAD_CHUNK_WEIGHT_FRACTION * vocab_size * hidden_size * itemsize
    budget = min(HEAD_CHUNK_BYTES, max(HEAD_CHUNK_MIN_BYTES, fraction))
    return max(1, int(budget // (vocab_size * itemsize)))


@dataclass(frozen=True)
class LogitGrads:
    """The head's closed form (`output_values_and_logit_grads`) evaluated in row chunks of the targets.

    Each chunk of `head_chunk_rows` targets forms `pre = h W^T + b` and its `[rows, V]` temporaries (two or three
    alive at a time: `pre`, the log-softmax turned in place into `a`); they are freed before the next chunk. Cost
    per pass: one `[M, H] x [H, V]` product and `M * V` elementwise work, as one unchunked pass, in `M / rows`
    products.
    """

    output: Output
    temperature: float
    transform: LogitTransform

    def chunks(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor
    ) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """`(rows, values [n], a [n, V])` per chunk of targets, `a = d f / d pre`, from detached `hidden [M, H]`,
        `weight [V, H]`, `bias [V]` and `targets [M]`."""
        dtype = compute_dtype(hidden.dtype)
        step = head_chunk_rows(*weight.shape, torch.empty((), dtype=dtype).element_size())
        for start in range(0, max(hidden.shape[0], 1), step):  # one empty chunk when there are no targets
            rows = slice(start, start + step)
            pre = nn.functional.linear(hidden[rows], weight, bias).to(dtype)
            values, logit_grads = output_values_and_logit_grads(
                pre, targets[rows], self.output, self.temperature, self.transform
            )
            del pre
            yield rows, values, logit_grads
            del values, logit_grads  # one chunk's temporaries alive at a time


class _HeadParameterTerm(torch.autograd.Function):
    """`t_m = <sg(h_m), a_m (W - sg W)> + <a_m, b - sg b>` (`sg` = detach), `a_m = d f_m / d pre_m` held fixed:
    value `0`, `d t_m / dW = a_m^T h_m`, `d t_m / db = a_m`.

    Neither pass keeps `a [M, V]`: backward (`grad_W = sum_m g_m a_m^T h_m`, `grad_b = sum_m g_m a_m`) and the JVP
    (`dt_m = <a_m dW, h_m> + <a_m, db>`) recompute `a` in row chunks (`LogitGrads`) from the saved `h`, `W`, `b`
    and targets. Cost of either: two `[M, H] x [H, V]` products (recomputing `pre`, then the product itself), one
    more than with `a` kept. Under `vmap` of the backward (batched cotangents) the in-place accumulation of
    `grad_W` has no batching rule and runs per batch entry: the same products, no `[V, H]` temporary per chunk.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        weight: Tensor, bias: Tensor | None, hidden: Tensor, targets: Tensor, logit_grads: LogitGrads
    ) -> Tensor:
        return hidden.new_zeros(hidden.shape[0], dtype=compute_dtype(hidden.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        weight, bias, hidden, targets, logit_grads = inputs
        ctx.logit_grads = logit_grads
        ctx.save_for_backward(weight, bias, hidden, targets)
        ctx.save_for_forward(weight, bias, hidden, targets)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, bias, hidden, targets = ctx.saved_tensors
        grad_weight = grad_bias = None
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None
        with warnings.catch_warnings():  # the per-entry fallback of addmm_ under vmap warns
            warnings.filterwarnings("ignore", message="There is a performance drop")
            for rows, _, logit_grads in ctx.logit_grads.chunks(hidden, weight, bias, targets):
                logit_grads = logit_grads.to(weight.dtype)
                if ctx.needs_input_grad[0]:
                    weighted = (grad[rows, None] * hidden[rows]).to(weight.dtype)  # g_m h_m, [n, H]
                    if grad_weight is None:
                        grad_weight = logit_grads.T @ weighted
                    else:
                        grad_weight.addmm_(logit_grads.T, weighted)
                if ctx.needs_input_grad[1]:
                    piece = grad[rows].to(bias.dtype) @ logit_grads.to(bias.dtype)
                    grad_bias = piece if grad_bias is None else grad_bias.add_(piece)
        return grad_weight, grad_bias, None, None, None

    @staticmethod
    def jvp(ctx: Any, weight_tangent: Tensor | None, bias_tangent: Tensor | None, *_: Any) -> Tensor:
        weight, bias, hidden, targets = ctx.saved_tensors
        dtype = compute_dtype(hidden.dtype)
        pieces = []
        for rows, values, logit_grads in ctx.logit_grads.chunks(hidden, weight, bias, targets):
            piece = torch.zeros_like(values)
            if weight_tangent is not None:  # <a_m dW, h_m>: a [n, H] product per tangent, never [n, V]
                piece = piece + ((logit_grads.to(weight.dtype) @ weight_tangent).to(dtype) * hidden[rows]).sum(-1)
            if bias_tangent is not None:
                piece = piece + logit_grads @ bias_tangent.to(dtype)
            pieces.append(piece)
        return torch.cat(pieces)


def _head_outputs(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    output: Output,
    temperature: float,
    transform: LogitTransform,
    differentiable: bool,
) -> Tensor:
    """`[M]` per-target outputs from final hidden states `[M, H]`.

    For a plain `nn.Linear` unembedding (weight `W [V, H]`, bias `b`) the value is computed once, detached, and the
    derivatives enter through the first-order surrogate

        f = f(w) + <h - sg(h), sg(r)> + <sg(h), r - sg(r)> + <a, b - sg(b)>,   a = df/dpre [M, V],  r = a W [M, H]

    (`sg` = detach), whose value is exactly `f` and whose first derivatives are exactly those of `f`. A JVP then
    costs `M * H` for the hidden-state tangent and `[M, V] x [V, H]` products for a head-weight tangent, instead
    of two `[M, H] x [H, V]` products and `[M, V]` softmax tangents per tangent; a backward likewise. The last two
    terms are `_HeadParameterTerm`, which recomputes `a` in row chunks: the value and `r` are formed chunk by chunk
    too (`LogitGrads`), so no `[M, V]` buffer is ever alive, only `[rows, V]` temporaries (`HEAD_CHUNK_BYTES`).
    Second derivatives of the surrogate are not those of `f`. Other heads (e.g. a LoRA-wrapped lm_head) are
    differentiated through their own forward.
    """
    dtype = compute_dtype(hidden.dtype)
    if type(head) is not nn.Linear:
        return _output_values(head(hidden).to(dtype), targets, output, temperature, transform)
    weight, bias = head.weight, head.bias
    hidden_value, weight_value = hidden.detach(), weight.detach()
    bias_value = None if bias is None else bias.detach()
    logit_grads = LogitGrads(output, temperature, transform)
    values, projected = [], []
    for _, chunk_values, chunk_grads in logit_grads.chunks(hidden_value, weight_value, bias_value, targets):
        values.append(chunk_values)
        if differentiable:
            projected.append((chunk_grads.to(weight.dtype) @ weight_value).to(dtype))  # r = a W, [n, H]
        del chunk_grads
    if not differentiable:
        return torch.cat(values)
    projected_value = torch.cat(projected)
    return (
        torch.cat(values)
        + ((hidden - hidden_value).to(dtype) * projected_value).sum(-1)
        + _HeadParameterTerm.apply(weight, bias, hidden_value, targets, logit_grads)
    )


class _Call(nn.Module):
    """`fn(model)` as the forward of a module holding the model as its child `model`, so that
    `torch.func.functional_call` can swap parameter values by name."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self) -> Any:
        return self.fn(self.model)


def call_with(model: nn.Module, values: Mapping[str, Tensor], fn: Callable[[nn.Module], Any]) -> Any:
    """`fn(model)` with the parameters and buffers named in `values` replaced by those values."""
    if not values:
        return fn(model)
    prefixed = {_SCORER_PREFIX + name: value for name, value in values.items()}
    return torch.func.functional_call(_Call(model, fn), prefixed, ())


def _target_outputs(model: nn.Module, batch: TokenBatch, output: Output, differentiable: bool) -> Tensor:
    _, head = decoder_and_head(model)
    hidden = final_hidden(model, batch)
    transform = LogitTransform.of(model)
    return _head_outputs(head, hidden, batch.targets, output, batch.temperature, transform, differentiable)


def score_fn(model: nn.Module, batch: TokenBatch, output: Output, differentiable: bool = True) -> ScoreFn:
    """`values -> [M]` per-target outputs with the parameters in `values` replaced (the rest held fixed). A
    half-precision model is evaluated on float32 copies of its weights (`float32_state`); pass `values` from
    `primal_values`."""
    state = float32_state(model)

    def score(values: TensorDict) -> Tensor:
        return call_with(model, {**state, **values}, lambda m: _target_outputs(m, batch, output, differentiable))

    return score


def primal_values(model: nn.Module, params: ParamSelection = None) -> TensorDict:
    """The selected parameters (`select_params`) as the point per-target outputs are evaluated and differentiated
    at: half-precision values upcast to float32 copies, so that kernels and JVPs compute in float32."""
    return upcast(select_params(model, params))


def prepare(model: nn.Module, *batches: TokenBatchLike) -> list[TokenBatch]:
    """Coerce the batches and move them to the model's device; warn once when the model would compute
    stochastically (dropout in train mode)."""
    for module in model.modules():
        rate = module.p if isinstance(module, nn.Dropout) else getattr(module, "attention_dropout", 0.0)
        if module.training and isinstance(rate, int | float) and rate > 0:
            logger.warning(
                "%s is in train mode with dropout %.3g: results are stochastic; call model.eval() first",
                type(module).__name__,
                rate,
            )
            break
    device = next(model.parameters()).device
    coerced = [TokenBatch.coerce(batch) for batch in batches]
    return [batch if batch.input_ids.device == device else batch.to(device) for batch in coerced]


def target_logprobs(model: nn.Module, batch: TokenBatchLike, *, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """`[M]` per-target log-probs `log_softmax(z / temperature)[y]` (no grad), the function every kernel
    differentiates and the probe scoring observes; with `params` (`name -> tensor`), evaluated at those values.

    Cost: one no-grad forward; allocates `[M, V]` logits at the targets only, never `[B, T, V]`.
    """
    (batch,) = prepare(model, batch)
    values = {} if params is None else primal_values(model, params)
    with torch.no_grad():
        return score_fn(model, batch, "logprob", differentiable=False)(values)
