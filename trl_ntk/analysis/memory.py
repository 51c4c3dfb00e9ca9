"""Pre-flight estimate of an analysis step's peak extra memory, and the plan that fits the device.

An analysis step holds, on top of training, parameter-sized buffers (float32, or the parameters' dtype if wider;
`B` = trainable parameters x that element size) and, one at a time, the activations of one of its forwards or the
temporaries of the optimizer's split of one parameter:

    level    buffers alive at the peak                                activations (largest of)
    none     0                                                        no-grad forward of a probe scoring batch
    sums     1 B: one direction at a time (history; the raw gradient  backward graph of one training micro-batch;
             of the gradient check; one cell's gradient,              JVP of the probe batch (one direction);
             preconditioned in place), micro-batch backwards added    the split of the largest parameter
             into it in place (`dynamics.explain_update`); + P for a
             parameter dtype narrower than the buffers
    tokens   t B: `t` per-target gradients, `t` the tangents per      backward graph of a training micro-batch;
             batched JVP (`Workload.jvp_chunk_size`, the whole        the probe batch's backward graph plus
             chunk by default; see `dense.DenseBackend`)              `t` JVPs of a training micro-batch; the split
                                                                      of the largest parameter

Measured on CPU (`benchmarks/bench_memory.py`): the buffers as counted here, the activations within the estimate.

Activations of a decoder with hidden size `h`, MLP width `i`, `L` layers, `H` heads, vocabulary `V`, for `R` rows
of `T` tokens at `e` bytes an element (the model's dtype; the log-softmax in float32; `s = max(e, 4)`), with
`M <= R T` target tokens (counted as `R T`: the estimate does not know which tokens are targets):

    backward graph    R T L (10 h + 4 i + 2 H T a) e + head(M) + grads
    no-grad forward   R T [(4 h + 2 i + H T a) e + 3 V 4]
    JVP (forward AD)  R T [2 (4 h + 2 i) e + 6 H T s] + head(M) + 2 h i e: primal and tangent of one layer alive;
                      SDPA runs its MATH backend, whose scores, softmax and their tangents (with the temporaries of
                      the softmax tangent) hold about 6 `H T^2` tensors per row (measured 5.2-5.4 on CPU, float32);
                      `2 h i e`: a weight-sized tangent product of the MLP
    finite difference no-grad forward in float32 with the model's own kernel, plus one saved copy of the
                      parameters (`B`)
    head(M)           `HEAD_COPIES` `[m, V]` tensors (float32, or the model's dtype if wider) of the per-target head
                      (`logprobs._head_outputs`), `m = min(M, logprobs.head_chunk_rows(V, h, s))` rows at once when
                      the head is a plain linear unembedding, which runs in row chunks (`logprobs.LogitGrads`),
                      `m = M` otherwise (a wrapped head, e.g. LoRA on `lm_head`, runs through its own forward)
    grads             `BACKWARD_GRADIENTS` gradients of the largest trainable parameter, in the buffers' dtype (per
                      tangent of a batched backward): autograd forms a parameter's gradient before adding it into
                      the running sum (the head weight's `[V, h]` gradient from the chunked head's backward), and a
                      tied embedding's head gradient waits for the embedding's own to be summed with it
    split             the optimizer's split, read one parameter at a time (`dense.LazySplit`), of the largest
                      trainable parameter: `SPLIT_RESULTS` float32 copies of it plus `SPLIT_SLICE_COPIES`
                      temporaries of one slice (`optim.SPLIT_CHUNK_ELEMENTS`); `SPLIT_COPIES` whole copies for a
                      DTensor shard, computed whole (`optim.optimizer_step_split`)

with `a = 1` when attention forms the `T x T` scores (eager, MATH) and `a = 0` for fused kernels (flash,
memory-efficient SDPA). The JVP term grows like `T^2` per head; the finite-difference path like a forward. These
are upper bounds of the tensor bytes alive (no allocator fragmentation, no caching): against `torch.profiler`'s
tensor peak of a JVP on small Llamas (T = 128-2048) the JVP term is 1.1-1.6x the measure, and against the
benchmarks' resident-set peaks (`benchmarks/bench_long.py`) the exact path's "sums" estimate is 1.2-1.3x the
measure at T = 1024 and 2048. The check keeps a safety margin (`SAFETY`).

The estimate is the analysis step's peak above the training state (parameters, gradients, optimizer state), which
is what must fit in the free memory measured before training; the trainer's own forward and backward peak is not
alive then. `Estimate.training` is a lower bound of a plain training step's activations above the same state: the
layers' saved tensors of a training micro-batch, `R T L (4 h + 2 i) e` (`R T L h e` with gradient checkpointing),
and nothing for its loss head, which a fused or chunked head (TRL's `fused_lm_head`) keeps to a tile.
`Estimate.above_training`, the total less that bound, is therefore an upper bound of the analysis step's peak
above a plain step's peak whatever the trainer's loss forms; where the loss forms full `[R, T, V]` logits the plain
step's own peak is higher and the measured difference smaller.

`plan` picks the highest level not above the requested one whose estimate fits, preferring exact JVPs and falling
back to finite differences along the update direction when only those fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from trl_ntk._model import compute_dtype, decoder_and_head, trainable_parameters
from trl_ntk.ntk import logprobs, optim

SAFETY = 0.8
"""Fraction of the free memory an analysis step may plan to use."""

LEVELS = ("none", "sums", "tokens")

RUNTIME = 16 * 2**20
"""Bytes a first analysis step adds to the process besides its tensors (code paths loaded at first use, allocator
state), counted with the activations: on CPU the resident-set peak of `benchmarks/bench_long.py` at T = 256 lies
7 MiB above the tensor peak `torch.profiler` measures for the same step."""

HEAD_COPIES = 7
"""`[rows, V]` tensors (float32 or wider) the per-target head (`logprobs._head_outputs`) holds at its peak, `rows`
the targets of one chunk (`ModelShape.head_rows`). Measured (`torch.profiler`, float32) in row chunks: 2.0-2.1 in
the differentiable forward, 2.9-3.0 in a backward besides the weight's gradient, 3.1-3.4 in a JVP (`V` 4,096 to
151,936, `h` 64 to 896), and 4 alive at the peak of a training micro-batch's backward in an analysis step (the last
chunk's logit gradients still referenced while the next chunk forms; hidden 128, vocabulary 32,768); the earlier
unchunked head held 5.7 (backward) and 6.0 (JVP) `[M, V]`. Kept at 7 as a margin over the measured 4."""

BACKWARD_GRADIENTS = 2
"""Parameter-sized gradients of the largest trainable parameter a backward holds besides the buffer it adds into:
autograd forms each parameter's gradient before adding it in place (`jvp.Backward.accumulate`; the chunked head's
`[V, h]` weight gradient, `logprobs._HeadParameterTerm.backward`), and with tied embeddings the head's gradient is
held until the input embedding's own is formed and summed with it. Measured (`torch.profiler`, tied, full
fine-tuning, one layer): at hidden 128, vocabulary 32,768, one `[V, h]` gradient at the head's backward (with 4
`[rows, V]` head tensors) and two at the embedding's; at hidden 256 (T 128, 2 rows) a training backward's peak of
67.4 MB is mostly those two 33.5 MB gradients. Counting the head for all targets at once covered them (its `[M, V]`
term was larger); with its row chunks credited they must be counted: without them `backward_bytes` is 63.4 MB there,
below the measure (130.6 MB with them)."""

JVP_SMALL_MODEL_BYTES = 2**30
"""What the tangents of one batched JVP of the "tokens" level and their activations may take by default
(`jvp_budget(mode="auto")`) when one chunk of parameter-sized buffers plus one is less: on a model of fewer than
about 16M float32 parameters the whole chunk then runs in one JVP (1 GiB at most), while on larger models the step
stays within `P` plus one chunk of buffers."""

SPLIT_COPIES = 7
"""Parameter-sized float32 temporaries of the optimizer's split of one parameter computed whole (a tensor subclass
such as a DTensor shard; plain tensors run in slices, `SPLIT_SLICE_COPIES`) at its peak: measured
(`torch.profiler`, whole parameters) 6 for AdamW with decoupled weight decay (`v_t`, the denominator, `P`, the
momentum term, the decay term and the history), with amsgrad too, and 7 for Adam with L2 decay."""

SPLIT_SLICE_COPIES = 10
"""Float32 temporaries of one slice (`optim.SPLIT_CHUNK_ELEMENTS` elements, 4 MiB) of a split that runs in slices,
at its peak beside the results (`SPLIT_RESULTS`): measured (`torch.profiler`, a parameter of 3 slices) 7 for AdamW
and 8 for Adam with L2 decay; 2 more as a margin (8 MiB)."""

SPLIT_RESULTS = 3
"""Parameter-sized float32 results of the split alive at once when it runs in slices: the parameter's `P` and
history being filled, and the part a caller still holds from the previous read (`dense.LazySplit` computes both
parts at each read and returns one)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: trainable parameter count, buffer and activation element sizes, and the
    decoder's widths (0 when the config does not name them: activations are then not estimated)."""

    num_params: int
    buffer_bytes: int  # bytes of one element of a parameter-sized analysis buffer (float32 or wider)
    param_bytes: int  # bytes of one trainable parameter element (`P` = num_params x this)
    act_bytes: int
    hidden: int = 0
    intermediate: int = 0
    layers: int = 0
    heads: int = 0
    vocab: int = 0
    fused_attention: bool = False
    largest: int = 0  # elements of the largest trainable parameter
    checkpointing: bool = False  # gradient checkpointing in the training forward
    chunked_head: bool = False  # a plain linear unembedding: the per-target head runs in row chunks
    sliced_split: bool = False  # plain tensors: the optimizer's split runs in slices (`optim._adam_split`)

    @property
    def buffer(self) -> int:
        """`B`: bytes of one parameter-sized float32 (or wider) buffer."""
        return self.num_params * self.buffer_bytes

    @property
    def parameters(self) -> int:
        """`P`: trainable-parameter bytes."""
        return self.num_params * self.param_bytes

    @property
    def head_element(self) -> int:
        """Bytes of one element of the per-target head's `[rows, V]` tensors: float32, or the model's dtype if
        wider (`compute_dtype`)."""
        return max(self.act_bytes, 4)

    @property
    def head_rows(self) -> int | None:
        """Targets whose `[rows, V]` tensors the per-target head forms at once: the row chunk the head runs
        (`logprobs.head_chunk_rows`) when `chunked_head`, `None` (all targets of a batch) otherwise."""
        if not (self.chunked_head and self.vocab and self.hidden):
            return None
        return logprobs.head_chunk_rows(self.vocab, self.hidden, self.head_element)


def model_shape(model: nn.Module) -> ModelShape:
    """The `ModelShape` of a Hugging Face causal LM (its text config), trainable parameters only."""
    params = list(trainable_parameters(model).values())
    num = sum(p.numel() for p in params)
    dtype = params[0].dtype if params else torch.float32
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    first = next(model.parameters(), None)
    impl = getattr(config, "_attn_implementation", None)
    try:
        chunked = type(decoder_and_head(model)[1]) is nn.Linear  # as `logprobs._head_outputs` decides
    except Exception:  # noqa: BLE001 - no output embedding found: count the head unchunked, never fail the check
        chunked = False
    return ModelShape(
        num_params=num,
        buffer_bytes=torch.empty((), dtype=compute_dtype(dtype)).element_size(),
        param_bytes=torch.empty((), dtype=dtype).element_size(),
        act_bytes=first.element_size() if first is not None else 4,
        hidden=int(getattr(text, "hidden_size", 0) or 0),
        intermediate=int(getattr(text, "intermediate_size", 0) or 0),
        layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        heads=int(getattr(text, "num_attention_heads", 0) or 0),
        vocab=int(getattr(text, "vocab_size", 0) or 0),
        fused_attention=isinstance(impl, str) and impl not in ("eager",),
        largest=max((p.numel() for p in params), default=0),
        checkpointing=any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()),
        chunked_head=chunked,
        sliced_split=bool(params) and all(type(p.detach()) is torch.Tensor for p in params),
    )


def forward_bytes(shape: ModelShape, rows: int, length: int, *, scores: bool, element: int | None = None) -> int:
    """Peak activations of one no-grad forward (one layer alive at a time, the logits in float32)."""
    e = shape.act_bytes if element is None else element
    per_token = (4 * shape.hidden + 2 * shape.intermediate + shape.heads * length * int(scores)) * e
    return rows * length * (per_token + 3 * shape.vocab * 4)


def head_bytes(shape: ModelShape, rows: int, chunk_rows: int | None = None) -> int:
    """Peak bytes of the per-target head on `rows` targets: `HEAD_COPIES` `[m, V]` tensors of `head_element` bytes,
    `m = min(rows, chunk_rows)` rows formed at once (`chunk_rows=None`: the shape's own, `ModelShape.head_rows`,
    all rows for an unchunked head)."""
    chunk = shape.head_rows if chunk_rows is None else chunk_rows
    alive = rows if chunk is None else min(rows, chunk)
    return HEAD_COPIES * alive * shape.vocab * shape.head_element


def gradient_bytes(shape: ModelShape, tangents: int = 1) -> int:
    """Bytes of the parameter gradients a backward forms besides the buffers it fills: `BACKWARD_GRADIENTS`
    gradients of the largest trainable parameter in the buffers' dtype, per tangent of a batched backward."""
    return BACKWARD_GRADIENTS * tangents * shape.largest * shape.buffer_bytes


def split_bytes(shape: ModelShape) -> int:
    """Peak bytes of the optimizer's split of the largest trainable parameter: `SPLIT_RESULTS` buffers of it plus
    `SPLIT_SLICE_COPIES` temporaries of one slice (`optim.SPLIT_CHUNK_ELEMENTS` elements) when the split runs in slices
    (`ModelShape.sliced_split`), `SPLIT_COPIES` buffers of the whole parameter otherwise."""
    if not shape.sliced_split:
        return SPLIT_COPIES * shape.largest * shape.buffer_bytes
    part = min(shape.largest, optim.SPLIT_CHUNK_ELEMENTS)
    return (SPLIT_RESULTS * shape.largest + SPLIT_SLICE_COPIES * part) * shape.buffer_bytes


def backward_bytes(shape: ModelShape, rows: int, length: int, tangents: int = 1) -> int:
    """Activations an analysis backward keeps (every layer's saved tensors, the attention scores unless fused, the
    per-target head on up to `rows x length` targets) and the parameter gradients it forms (`gradient_bytes`,
    `tangents` per-target gradients at once for a batched backward)."""
    scores = 2 * shape.heads * length * int(not shape.fused_attention)
    per_layer = (10 * shape.hidden + 4 * shape.intermediate + scores) * shape.act_bytes
    layers = rows * length * shape.layers * per_layer
    return layers + head_bytes(shape, rows * length) + gradient_bytes(shape, tangents)


def training_bytes(shape: ModelShape, rows: int, length: int) -> int:
    """A lower bound of a plain training step's activations on `rows x length` tokens: the layers' saved inputs of
    their projections, `4 h + 2 i` elements a token a layer (the layer inputs only, `h`, with gradient
    checkpointing); nothing for the loss head (a fused or chunked head holds a tile)."""
    per_layer = shape.hidden if shape.checkpointing else 4 * shape.hidden + 2 * shape.intermediate
    return rows * length * shape.layers * per_layer * shape.act_bytes


def jvp_bytes(shape: ModelShape, rows: int, length: int, path: str) -> int:
    """Activations of one batched JVP of `rows x length` tokens along one direction (see the module table)."""
    if path == "finite_difference":
        return forward_bytes(shape, rows, length, scores=not shape.fused_attention, element=4)
    e, scores = shape.act_bytes, max(shape.act_bytes, 4)
    linear = 2 * rows * length * (4 * shape.hidden + 2 * shape.intermediate) * e + head_bytes(shape, rows * length)
    return linear + rows * length * 6 * shape.heads * length * scores + 2 * shape.hidden * shape.intermediate * e


def jvp_tangents(shape: ModelShape, rows: int, length: int, path: str, chunk_size: int, budget: int) -> int:
    """Tangents per batched JVP of a `rows x length` batch (the "tokens" level): the most, between 1 and
    `chunk_size`, whose gradients and estimated JVP activations (`B + jvp_bytes` each) fit in `budget` bytes."""
    per_tangent = shape.buffer + jvp_bytes(shape, rows, length, path)
    return max(1, min(chunk_size, budget // max(per_tangent, 1)))


def jvp_budget(shape: ModelShape, mode: str, chunk_size: int, free: int) -> int:
    """Bytes the tangents of one batched JVP of the "tokens" level and its activations may take: `mode="buffer"`,
    one chunk of parameter-sized buffers plus one (`(chunk_size + 1) B`); `"auto"`, that or, when it is less,
    `min(JVP_SMALL_MODEL_BYTES, SAFETY x free)`: a small model runs its whole chunk per JVP when the device has the
    room, and a large one stays within one chunk of buffers plus one, so that the step's extra memory is about
    `P` plus one chunk."""
    if mode not in ("auto", "buffer"):
        raise ValueError(f"unknown jvp_chunk_size mode {mode!r}; expected an int, 'auto' or 'buffer'")
    floor = (chunk_size + 1) * shape.buffer
    return floor if mode == "buffer" else max(floor, min(JVP_SMALL_MODEL_BYTES, int(SAFETY * free)))


@dataclass(frozen=True)
class Workload:
    """The batches of one analysis step: rows x longest length of a training micro-batch and of the probe batch
    (or of a probe scoring batch of `score_rows` rows), and the chunk of the "tokens" level."""

    train_rows: int
    train_length: int
    probe_rows: int
    probe_length: int
    score_rows: int = 32
    chunk_size: int = 16
    jvp_chunk_size: int | None = None  # tangents per batched JVP ("tokens"); None: the whole chunk


@dataclass(frozen=True)
class Estimate:
    """Peak extra bytes of one analysis step above the training state: `buffers` (parameter-sized) +
    `activations` (the largest of its forwards' activations and the optimizer split's temporaries), each an upper
    bound of what is alive at the step's peak; `training`, a lower bound of the activations of the plain training
    step it is compared with (`training_bytes`; not alive at the same time)."""

    level: str
    path: str
    buffers: int
    activations: int
    training: int = 0

    @property
    def total(self) -> int:
        return self.buffers + self.activations

    @property
    def above_training(self) -> int:
        """An upper bound of the analysis step's peak above a plain training step's peak: `max(0, total -
        training)`, `training` being a lower bound of the plain step's own activations."""
        return max(0, self.total - self.training)


def estimate(shape: ModelShape, level: str, work: Workload, path: str = "func") -> Estimate:
    """The estimate of the module table for one level and JVP path (`"func"` / `"forward_ad"`: exact JVPs;
    `"finite_difference"`: forward-pass memory, one more buffer for the saved parameters)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    fd = path == "finite_difference"
    scoring = forward_bytes(shape, min(work.probe_rows, work.score_rows), work.probe_length, scores=True)
    train_graph = backward_bytes(shape, work.train_rows, work.train_length)
    training = training_bytes(shape, work.train_rows, work.train_length)
    if level == "none":
        return Estimate(level, path, 0, RUNTIME + scoring, training)
    probe_jvp = jvp_bytes(shape, work.probe_rows, work.probe_length, path)
    split = split_bytes(shape)
    if level == "sums":
        narrow = shape.parameters if shape.param_bytes < shape.buffer_bytes else 0  # a gradient while it is added
        buffers = (1 + int(fd)) * shape.buffer + narrow
        return Estimate(level, path, buffers, RUNTIME + max(train_graph, probe_jvp, scoring, split), training)
    tangents = min(work.jvp_chunk_size or work.chunk_size, work.chunk_size)
    tangents = 1 if fd else tangents  # finite differences run one tangent at a time
    train_jvps = tangents * jvp_bytes(shape, work.train_rows, work.train_length, path)
    probe_graph = backward_bytes(shape, work.probe_rows, work.probe_length, tangents)
    buffers = (tangents + int(fd)) * shape.buffer
    largest = max(train_graph, probe_graph + train_jvps, probe_jvp, scoring, split)
    return Estimate(level, path, buffers, RUNTIME + largest, training)


def pending_training_bytes(model: nn.Module, optimizer: object | None) -> int:
    """Bytes training itself has yet to allocate before its first step, to be set aside from the free memory measured
    at the start: the gradients (`.grad` still `None`) and, for Adam / AdamW without state yet, its two moments."""
    params = list(trainable_parameters(model).values())
    grads = sum(p.numel() * p.element_size() for p in params if p.grad is None)
    inner = getattr(optimizer, "optimizer", optimizer)
    stateless = isinstance(inner, torch.optim.Adam) and not any(p in inner.state for p in params)
    return grads + (2 * sum(p.numel() * p.element_size() for p in params) if stateless else 0)


def free_bytes(device: torch.device | str) -> int:
    """Free memory of the device: `torch.cuda.mem_get_info` on CUDA, the available system memory otherwise
    (`psutil`, or `MemAvailable` of `/proc/meminfo`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 2**62  # unknown: assume it fits


@dataclass(frozen=True)
class Plan:
    """What the analysis will run: `level` and JVP `path` (`"auto"`: the model's exact path), the estimate, the
    free memory it was checked against, and a message when it differs from the request (empty otherwise)."""

    level: str
    path: str
    estimate: Estimate
    free: int
    message: str = ""
    needed: int = 0  # the requested level's estimate on the exact path

    def refusal(self, requested: str) -> str:
        """The error text when the request may not be downgraded (`memory_check="refuse"`)."""
        gib = 2**30
        return (
            f"the '{requested}' analysis step needs about {self.needed / gib:.2f} GiB beyond training, more than "
            f"{SAFETY:.0%} of the device's free {self.free / gib:.2f} GiB (analysis.memory); the largest that fits is "
            f"'{self.level}'" + (" with finite-difference JVPs" if self.path == "finite_difference" else "") + ". "
            "Lower attribution, the sequence length, chunk_size or the probe set, set low_memory=True, or "
            "memory_check='downgrade' to downgrade with a warning"
        )


def plan(shape: ModelShape, level: str, work: Workload, free: int, *, low_memory: bool = False) -> Plan:
    """The highest level not above `level` whose estimate fits in `SAFETY x free`; at each level the exact JVP
    path first (for "tokens", with the tangents per JVP that `jvp_chunk_size="auto"` picks (`jvp_chunks`), then
    one tangent per JVP: `dense.DenseBackend` picks the tangents that fit when it runs), then finite differences.
    With `low_memory`: "sums" by finite differences only; "tokens" with the tangents per JVP of
    `jvp_chunk_size="buffer"` (gradients plus JVP activations within `chunk_size + 1` parameter-sized buffers),
    then finite differences. `level="none"` or nothing fitting: the returned plan is `"none"`, with a message when
    `level` was higher."""
    budget = int(SAFETY * free)
    requested = LEVELS.index(level)
    needed = estimate(shape, level, work).total
    for candidate in reversed(LEVELS[1 : requested + 1]):
        exact = not low_memory or candidate == "tokens"
        paths = ("auto", "finite_difference") if exact else ("finite_difference",)
        for path in paths:
            mode = "buffer" if low_memory else "auto"
            guess = estimate(shape, candidate, jvp_chunks(shape, work, mode, free), _func(path))
            retry = candidate == "tokens" and path == "auto" and not low_memory  # "buffer" fixes the tangents
            if guess.total > budget and retry:  # fewer tangents per JVP
                guess = estimate(shape, candidate, replace(work, jvp_chunk_size=1), "func")
            if guess.total <= budget:
                message = "" if (candidate == level and path in ("auto", paths[0])) else _message(level, guess, free)
                return Plan(candidate, path, guess, free, message, needed)
    none = estimate(shape, "none", work)
    return Plan("none", "auto", none, free, "" if level == "none" else _message(level, none, free), needed)


def _func(path: str) -> str:
    return "func" if path == "auto" else path


def jvp_chunks(shape: ModelShape, work: Workload, mode: str, free: int) -> Workload:
    """`work` with the tangents per JVP of the "tokens" level that `dense.DenseBackend(jvp_chunk_size=mode)` picks
    for its training batch (`jvp_tangents` within `jvp_budget(shape, mode, chunk_size, free)`)."""
    budget = jvp_budget(shape, mode, work.chunk_size, free)
    tangents = jvp_tangents(shape, work.train_rows, work.train_length, "func", work.chunk_size, budget)
    return replace(work, jvp_chunk_size=tangents)


def workload(trainer: object, kind: str, probe_shape: tuple[int, int] | None, chunk_size: int | None) -> Workload:
    """The `Workload` of a TRL trainer's analysis step, from its arguments: a training micro-batch of
    `per_device_train_batch_size` rows (twice that for DPO's chosen + rejected) of `max_length` tokens (GRPO:
    `max_prompt_length + max_completion_length`), and the probe batch's `(rows, length)` (`None`: as long as a
    training sequence, `num_prompts` rows unknown, 8 assumed)."""
    args = getattr(trainer, "args", None)
    rows = int(getattr(args, "per_device_train_batch_size", 8) or 8) * (2 if kind == "dpo" else 1)
    length = getattr(args, "max_length", None)
    if not length:
        prompt = getattr(args, "max_prompt_length", None) or 0
        length = prompt + (getattr(args, "max_completion_length", None) or 0) or 1024
    probe_rows, probe_length = probe_shape if probe_shape is not None else (8, int(length))
    return Workload(
        train_rows=rows,
        train_length=int(length),
        probe_rows=probe_rows,
        probe_length=probe_length,
        score_rows=32,
        chunk_size=chunk_size or 16,
    )


def _message(level: str, chosen: Estimate, free: int) -> str:
    gib = 2**30
    how = " with finite-difference JVPs" if chosen.path == "finite_difference" else ""
    return (
        f"the '{level}' analysis step does not fit in the device's free memory ({free / gib:.2f} GiB, "
        f"{SAFETY:.0%} usable); running '{chosen.level}'{how} instead (estimated {chosen.total / gib:.2f} GiB: "
        f"{chosen.buffers / gib:.2f} GiB of parameter-sized buffers, {chosen.activations / gib:.2f} GiB of "
        "activations). Lower the sequence length, the chunk_size or the probe set, or set low_memory=True"
    )


def preflight(
    trainer: object,
    model: nn.Module,
    kind: str,
    probe_shape: tuple[int, int] | None,
    level: str,
    chunk_size: int | None,
    low_memory: bool,
) -> Plan:
    """`plan` for a trainer before its first step: its `workload`, the model's shape, and the device's free memory
    less what training has yet to allocate (`pending_training_bytes`)."""
    work = workload(trainer, kind, probe_shape, chunk_size)
    device = next(model.parameters()).device
    free = free_bytes(device) - pending_training_bytes(model, getattr(trainer, "optimizer", None))
    return plan(model_shape(model), level, work, max(free, 0), low_memory=low_memory)
