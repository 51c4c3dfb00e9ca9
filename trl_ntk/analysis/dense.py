"""The dense backend of the step analysis: every process holds all parameters (one process, or DDP).

Weighted gradients by autograd (`kernels.logprob_grad`, one backward per micro-batch), JVPs by `torch.func` (or
the path `jvp.select_jvp_path` picks). Under DDP each rank captures its own micro-batches: a weighted gradient is
this rank's term of the sum over ranks, and anything linear in it (its JVPs, the raw gradient) is summed across
ranks by `reduce` (`all_reduce`). The "tokens" level gathers its columns (training tokens) in rank order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from trl_ntk import _dist
from trl_ntk._model import TensorDict, compute_dtype, float64_dot, trainable_parameters
from trl_ntk.analysis import memory, sharded
from trl_ntk.analysis.guard import replayed_randomness
from trl_ntk.analysis.results import TokenAttribution
from trl_ntk.batches import CapturedMicroBatch, TokenBatch, TokenLabels, select_rows, target_rows
from trl_ntk.ntk import attributions, jvp, kernels, logprobs, optim

JVP_CHUNK_MODES = ("auto", "buffer")
DEFAULT_JVP_CHUNK_SIZE: int | str = "auto"
"""`DenseBackend`'s `jvp_chunk_size` when none is given (process-wide; e.g. `"buffer"` to bound the "tokens"
level's memory by `chunk_size + 1` parameter-sized buffers, JVP activations included)."""


class DenseBackend:
    """`dynamics.StepBackend` on the full parameters of this process.

    Args:
        model: at `w_t`, in eval mode, with the step's gradient in `.grad`.
        chunk_size (*optional*): rows of parameter-sized tangents held at once by the "tokens" level kernels.
        jvp_chunk_size (*optional*, defaults to `DEFAULT_JVP_CHUNK_SIZE`): tangents per batched JVP at the
            "tokens" level, whose activations grow with it. An int; `"auto"` (gradients plus JVP activations within
            `chunk_size + 1` parameter-sized buffers, or within `memory.JVP_SMALL_MODEL_BYTES` and the device's
            free memory when that is more: the whole chunk on a small model, `P` plus one chunk on a large one);
            or `"buffer"` (always within `chunk_size + 1` parameter-sized buffers; where activations outweigh
            parameters it falls to 1-4 tangents, which cost 10-50% more time than 16 on small models).
        path (*optional*): `"auto"` (`jvp.select_jvp_path`) or a `jvp.JvpPath` value. `"finite_difference"`: the
            step's JVPs by the five-point stencil of `sharded.finite_difference_jvps` (float32 scoring forwards
            with the model's own attention kernel, the step chosen for accuracy), whose memory grows like a
            forward pass instead of the `T^2` per head of forward-mode AD through SDPA's MATH backend; the
            "tokens" level kernels then use central differences too. Recorded as the explanation's `path`.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int | None = None,
        path: str | None = None,
        jvp_chunk_size: int | str | None = None,
    ) -> None:
        self.model = model
        self.params = trainable_parameters(model)
        self.names = list(self.params)
        auto = path in (None, "auto")
        self.path = (jvp.select_jvp_path(model, self.names) if auto else jvp.JvpPath(path)).value
        self.chunking = {} if chunk_size is None else {"chunk_size": chunk_size}
        if not auto:
            self.chunking["path"] = self.path
        jvp_chunk_size = DEFAULT_JVP_CHUNK_SIZE if jvp_chunk_size is None else jvp_chunk_size
        if jvp_chunk_size not in JVP_CHUNK_MODES and not (isinstance(jvp_chunk_size, int) and jvp_chunk_size >= 1):
            raise ValueError(f"jvp_chunk_size must be an int >= 1 or one of {JVP_CHUNK_MODES}, got {jvp_chunk_size!r}")
        self.jvp_chunk_size = jvp_chunk_size

    def _jvp_chunking(self, batches: list[TokenBatch]) -> dict:
        """`self.chunking` plus the tangents per batched JVP of the "tokens" level: `jvp_chunk_size` when an int;
        `"auto"` / `"buffer"`: the most whose gradients and estimated JVP activations (`memory.jvp_tangents`, for
        each of the `batches` a JVP may run on) fit in `memory.jvp_budget`."""
        if isinstance(self.jvp_chunk_size, int):
            return {**self.chunking, "jvp_chunk_size": self.jvp_chunk_size}
        chunk = self.chunking.get("chunk_size", jvp.DEFAULT_CHUNK_SIZE)
        shape = memory.model_shape(self.model)
        device = next(iter(self.params.values())).device
        free = memory.free_bytes(device) if self.jvp_chunk_size == "auto" else 0
        budget = memory.jvp_budget(shape, self.jvp_chunk_size, chunk, free)
        path = "finite_difference" if self.path == jvp.JvpPath.FINITE_DIFFERENCE.value else "func"
        tangents = min(
            memory.jvp_tangents(shape, batch.input_ids.shape[0], batch.input_ids.shape[1], path, chunk, budget)
            for batch in batches
        )
        return {**self.chunking, "jvp_chunk_size": tangents}

    def applied_gradient(self) -> TensorDict:
        return {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p)) for n, p in self.params.items()}

    def step_split(self, optimizer: torch.optim.Optimizer) -> optim.StepSplit:
        """The optimizer's split, computed one parameter at a time on access (`LazySplit`): holds nothing
        parameter-sized."""
        return optim.StepSplit(LazySplit(optimizer, self.params, 0), LazySplit(optimizer, self.params, 1))

    def weighted_gradient(self, micro_batches: list[CapturedMicroBatch], weights: list[Tensor]) -> TensorDict:
        """`sum_l w_l grad lp_l` over this rank's micro-batches (one weighted backward per micro-batch with a
        non-zero weight), each forward with the dropout masks and noise of the training forward it reproduces.

        Holds the running sum only, and not before the first backward: the first micro-batch's gradient is the
        sum itself, built by its backward as it frees the graph (`_running_sum`), so that a parameter-sized buffer
        is never alive beside a whole graph; each later backward adds into it in place (`jvp.Backward.accumulate`)
        when the parameters are float32 or wider, otherwise one more gradient while it is added."""
        total: TensorDict | None = None
        in_place = all(compute_dtype(p.dtype) == p.dtype for p in self.params.values())
        for mb, w in zip(micro_batches, weights):
            if not bool((w != 0).any()):
                continue
            with replayed_randomness(self.model, mb.rng_state):
                if in_place and total is not None:
                    kernels.logprob_grad(self.model, mb.batch, w, params=self.names, into=total)
                    continue
                grad = kernels.logprob_grad(self.model, mb.batch, w, params=self.names)
            total = self._running_sum(total, grad)
            del grad
        return self._running_sum(total, None)

    def residual_gradient(self, micro_batches: list[CapturedMicroBatch], coeff_scale: float) -> TensorDict:
        """`coeff_scale * sum_l J_l^T r_l`: the logit residuals of this rank's micro-batches pulled back (one
        full-logits forward and backward per micro-batch with a residual; the first one's gradient is the running
        sum, `_running_sum`)."""
        total: TensorDict | None = None
        for mb in micro_batches:
            if mb.logit_residual is None:
                continue
            with replayed_randomness(self.model, mb.rng_state):
                gradient = kernels.logit_cotangent_grad(
                    self.model, mb.batch, mb.residual_positions, mb.logit_residual * coeff_scale, params=self.names
                )
            total = self._running_sum(total, gradient)
            del gradient
        return self._running_sum(total, None)

    def _running_sum(self, total: TensorDict | None, part: TensorDict | None) -> TensorDict:
        """`total + part` in `total`'s storage, in the parameters' compute dtypes (`compute_dtype`); with no `total`
        yet, `part` itself becomes it (`_owned`: bit for bit `0 + part`, and no zero-filled buffer waits beside the
        backward graph that makes `part`); with neither, zeros."""
        if part is None:
            if total is not None:
                return total
            return {n: torch.zeros_like(p, dtype=compute_dtype(p.dtype)) for n, p in self.params.items()}
        if total is None:
            owned: set[int] = set()
            return {n: _owned(part[n], p, owned) for n, p in self.params.items()}
        for n in self.names:
            total[n] += part[n]
        return total

    def jvps(self, batches: dict[str, TokenBatch], directions: list[TensorDict]) -> dict[str, Tensor]:
        """`name -> [len(directions), M]` JVPs of each batch's target log-probs along each direction (float32,
        float64 for a float64 model): one batched JVP per batch (`vmap` over stacked tangents,
        `jvp.DEFAULT_CHUNK_SIZE` at a time); all-zero directions are not run. Allocates one stacked copy of (a chunk
        of) the directions when a chunk holds more than one (a single direction is viewed, not copied)."""
        if self.path == jvp.JvpPath.FINITE_DIFFERENCE.value:
            device = next(iter(self.params.values())).device
            rows = sharded.finite_difference_jvps(self.model, batches, directions, self.names)
            return {name: value.to(device) for name, value in rows.items()}
        return {name: _batch_jvps(self.model, batch, directions, self.names) for name, batch in batches.items()}

    def reduce(self, tensor: Tensor) -> Tensor:
        """Sum over ranks of a quantity linear in this rank's weighted gradients (in place)."""
        return _dist.all_reduce(tensor)

    def dot(self, a: TensorDict, b: TensorDict) -> float:
        return float(float64_dot(a, b))

    def token_attribution(
        self,
        probe_batch: TokenBatch,
        micro_batches: list[CapturedMicroBatch],
        coeffs: list[Tensor],
        labels: TokenLabels | None,
        preconditioner: TensorDict,
        scale: float,
        matrix_rows: Tensor | None,
    ) -> TokenAttribution:
        """The "tokens" level: per micro-batch, the `[M_selected, L_i]` matrix (a kernel of the selected probe
        rows) and the response totals (one probe backward per response, one JVP of the micro-batch), the selected
        responses' totals read off the matrix (their row sums per response) instead of computed again; under DDP
        the columns of every rank, in rank order."""
        rows = target_rows(probe_batch)
        num_rows = probe_batch.input_ids.shape[0]
        response_weights = torch.zeros(num_rows, probe_batch.num_targets, device=rows.device)
        response_weights[rows, torch.arange(rows.numel(), device=rows.device)] = 1.0
        selected = torch.ones(num_rows, dtype=torch.bool) if matrix_rows is None else matrix_rows.cpu()
        matrix_batch = select_rows(probe_batch, selected) if bool(selected.any()) else None
        direct = ~selected if matrix_batch is not None else torch.ones(num_rows, dtype=torch.bool)
        direct_weights = response_weights[direct.to(rows.device)]
        # `[n_selected, M_selected]`: which matrix rows make up each selected response
        matrix_responses = (
            None
            if matrix_batch is None
            else nn.functional.one_hot(target_rows(matrix_batch), int(selected.sum())).T.to(torch.float64)
        )
        totals, columns = [], []
        for mb, c in zip(micro_batches, coeffs):
            chunking = self._jvp_chunking([mb.batch] if matrix_batch is None else [mb.batch, matrix_batch])
            response_totals = None
            if matrix_batch is not None:
                kernel = kernels.logprob_kernel(
                    self.model,
                    matrix_batch,
                    mb.batch,
                    params=self.names,
                    preconditioner=preconditioner,
                    **chunking,
                )
                column = -scale * kernel * c.to(kernel.dtype)[None, :]
                columns.append(column)
                response_totals = column.new_zeros(num_rows, column.shape[1])
                response_totals[selected.to(column.device)] = (matrix_responses.to(column.device) @ column.double()).to(
                    column.dtype
                )
            if bool(direct.any()):
                direct_totals = attributions.attribution_column_sums_direct(
                    self.model,
                    probe_batch,
                    mb.batch,
                    c,
                    lr=scale,
                    probe_weights=direct_weights,
                    params=self.names,
                    preconditioner=preconditioner,
                    **chunking,
                )
                if response_totals is None:
                    response_totals = direct_totals
                else:
                    response_totals[direct.to(direct_totals.device)] = direct_totals.to(response_totals.dtype)
            totals.append(response_totals)
        local = TokenAttribution(
            matrix=torch.cat(columns, dim=1) if columns else None,
            matrix_rows=selected,
            response_totals=torch.cat(totals, dim=1),
            train_targets=torch.cat([mb.batch.targets for mb in micro_batches]),
            train_coeffs=torch.cat(coeffs) * scale,
            train_batches=tuple(mb.batch for mb in micro_batches),
            train_labels=labels,
        )
        return _gather_columns(local) if _dist.is_distributed() else local

    def kernel_norms(self, probe_batch: TokenBatch, micro_batches: list[CapturedMicroBatch]) -> dict[str, float]:
        """Frobenius norms of the log-prob kernel and the pNTK between the probes and all the step's training
        targets (over every rank)."""
        squares = torch.zeros(2, dtype=torch.float64, device=next(iter(self.params.values())).device)
        for mb in micro_batches:
            logprob = kernels.logprob_kernel(self.model, probe_batch, mb.batch, params=self.names, **self.chunking)
            squares[0] += logprob.pow(2).sum()
            squares[1] += (
                kernels.pntk(self.model, probe_batch, mb.batch, params=self.names, **self.chunking).pow(2).sum()
            )
        _dist.all_reduce(squares)
        return {"logprob_norm": float(squares[0]) ** 0.5, "pntk_norm": float(squares[1]) ** 0.5}


def _owned(gradient: Tensor, param: Tensor, owned: set[int]) -> Tensor:
    """`gradient` as a running sum of `param`'s gradients, in `param`'s compute dtype and layout: the tensor itself
    when it has them and owns its storage alone (autograd may hand out views, expanded or shared tensors, which
    in-place sums must not write through), else a copy. `owned`: the storages already taken, updated."""
    dtype = compute_dtype(param.dtype)
    storage = gradient.untyped_storage()
    alone = storage.nbytes() == gradient.numel() * gradient.element_size() and storage.data_ptr() not in owned
    if gradient.dtype == dtype and gradient.stride() == param.stride() and alone:
        owned.add(storage.data_ptr())
        return gradient
    return torch.empty_like(param, dtype=dtype).copy_(gradient)


def _batch_jvps(model: nn.Module, batch: TokenBatch, directions: list[TensorDict], names: list[str]) -> Tensor:
    """`[len(directions), M]` JVPs of the batch's target log-probs (see `DenseBackend.jvps`)."""
    path = jvp.select_jvp_path(model, names)
    (batch,) = logprobs.prepare(model, batch)
    values = logprobs.primal_values(model, names)
    first = next(iter(values.values()))
    rows = torch.zeros(len(directions), batch.num_targets, device=first.device, dtype=compute_dtype(first.dtype))
    nonzero = [k for k, d in enumerate(directions) if bool(torch.stack([d[n].any() for n in names]).any())]
    with jvp.forward_mode_attention(model, path):
        score = logprobs.score_fn(model, batch, "logprob", differentiable=path is not jvp.JvpPath.FINITE_DIFFERENCE)
        for start in range(0, len(nonzero), jvp.DEFAULT_CHUNK_SIZE):
            chunk = nonzero[start : start + jvp.DEFAULT_CHUNK_SIZE]
            tangents = {n: _stacked([directions[k][n].to(values[n]) for k in chunk]) for n in names}
            rows[chunk] = jvp.jvp_rows(score, values, tangents, path, jvp.DEFAULT_FD_STEP).detach().to(rows.dtype)
    return rows


def _stacked(tensors: list[Tensor]) -> Tensor:
    """`[len(tensors), *shape]`; one tensor is viewed (`unsqueeze`), not copied."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class LazySplit(Mapping[str, Tensor]):
    """One part of the optimizer's split `dw = -P g + history` (`part` 0: `P`, 1: `history`), computed for one
    parameter at a time when it is read (`optim.optimizer_step_split` on that parameter alone, from the optimizer
    state and `.grad` as they are at the moment of reading: read it before `optimizer.step()`).

    Holds nothing parameter-sized: reading an entry allocates that parameter's `P` and `history` (about two
    parameter-sized tensors of that one parameter), freed when the caller drops the value. An unsupported
    optimizer is refused at construction.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: TensorDict, part: int) -> None:
        self.optimizer = optimizer
        self.params = params
        self.part = part
        if params:
            first = next(iter(params))
            optim.optimizer_step_split(optimizer, {first: params[first]})  # raises for an unsupported optimizer

    def __getitem__(self, name: str) -> Tensor:
        return optim.optimizer_step_split(self.optimizer, {name: self.params[name]})[self.part][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def _gather_columns(local: TokenAttribution) -> TokenAttribution:
    """The columns of every rank, in rank order (DDP); examples and sequence groups renumbered so that they stay
    distinct across ranks. Moves `[Mp, L_rank]` floats per rank through the CPU; every rank must call it."""
    device = local.response_totals.device
    labels = local.train_labels
    cpu_labels = (
        None if labels is None else TokenLabels(labels.group.cpu(), labels.example.cpu(), labels.sequence_group.cpu())
    )
    gathered = _dist.gather_objects(
        (
            None if local.matrix is None else local.matrix.cpu(),
            local.response_totals.cpu(),
            local.train_targets.cpu(),
            local.train_coeffs.cpu(),
            [batch.to("cpu") for batch in local.train_batches],
            cpu_labels,
        )
    )
    return TokenAttribution(
        matrix=None if local.matrix is None else torch.cat([part[0] for part in gathered], dim=1).to(device),
        matrix_rows=local.matrix_rows,
        response_totals=torch.cat([part[1] for part in gathered], dim=1).to(device),
        train_targets=torch.cat([part[2] for part in gathered]),
        train_coeffs=torch.cat([part[3] for part in gathered]),
        train_batches=tuple(batch for part in gathered for batch in part[4]),
        train_labels=None if labels is None else _dist.concat_renumbered([part[5] for part in gathered]),
    )
