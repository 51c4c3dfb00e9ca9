"""Look-ahead: the first-order effect one training step on each example would have on the probe responses.

With a fixed probe direction `v_r = P * sum_m w[r, m] grad lp~_m` (one probe backward per direction `r`), a step on a
batch with the trainer's gradient signal `c_l = dL / d lp_l` changes the probe objective `sum_m w[r, m] lp~_m` by

    d_r = -sum_l c_l <grad lp_l, v_r>          (first order; `P` holds the learning rate)

and the share of example `i` is the sum over its tokens, `d_r(i) = -sum_{l in i} c_l <grad lp_l, v_r>`. One JVP of
the batch's token log-probs along `v_r` gives every example of the batch at once. `P` is the SGD step (`lr`) or the
Adam preconditioner of a given optimizer state (`adam_view`, the tangent at `g -> 0`). `exact_step_effect` takes the
optimizer's real step on one example's own gradient instead (one backward per example). `spearman` and
`top_k_overlap` measure how a ranking drifts between two scorings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from trl_ntk._model import ParamSelection, TensorDict, select_params, trainable_parameters
from trl_ntk.batches import TokenBatch, select_rows, target_rows
from trl_ntk.ntk.kernels import logprob_grad, logprob_jvp
from trl_ntk.ntk.optim import StepSplit, optimizer_step_split, sgd_preconditioner, unwrap_optimizer
from trl_ntk.probes.probe_set import EncodedProbes

View = Literal["sgd", "adam"]


@dataclass
class ProbeDirections:
    """The probe directions `v_r = P * sum_m w[r, m] grad lp~_m`, one per probe kind (or per probe).

    Args:
        names (`list[str]`): the `R` direction names (probe kinds, or probe ids).
        directions (`list[dict[str, Tensor]]`): `R` parameter-shaped tangents, `name -> Tensor[*param.shape]`.
        view (`str`): `"sgd"` (`P = lr`) or `"adam"` (the Adam preconditioner of an optimizer state).
    """

    names: list[str]
    directions: list[TensorDict]
    view: str


@dataclass
class ExampleEffects:
    """Predicted first-order change of each probe objective from one step on each example.

    Args:
        names (`list[str]`): the `R` probe objectives (kinds or probe ids).
        total (`Tensor[N, R]`): `-sum_{l in i} c_l <grad lp_l, v_r>`; negative = the step lowers the probes.
        positive (`Tensor[N, R]`): the part from tokens with `c_l < 0` (pulled up by the step).
        negative (`Tensor[N, R]`): the part from tokens with `c_l > 0` (pushed down, e.g. DPO's rejected).
    """

    names: list[str]
    total: Tensor
    positive: Tensor
    negative: Tensor

    def __len__(self) -> int:
        return self.total.shape[0]

    def column(self, name: str) -> int:
        """The column of objective `name`."""
        if name not in self.names:
            raise ValueError(f"unknown probe objective {name!r}; scored: {self.names}")
        return self.names.index(name)

    def ranks(self) -> Tensor:
        """`[N, R]` long: rank 1 = the most negative predicted change (the example that hurts the objective most)."""
        order = self.total.argsort(dim=0, stable=True)
        ranks = torch.empty_like(order)
        positions = torch.arange(1, len(self) + 1, device=order.device)[:, None].expand_as(order)
        return ranks.scatter_(0, order, positions)


def concat_effects(parts: Sequence[ExampleEffects]) -> ExampleEffects:
    """Stack the effects of consecutive example sets (same objectives) along `N`."""
    if not parts:
        raise ValueError("no effects to concatenate")
    names = parts[0].names
    if any(p.names != names for p in parts):
        raise ValueError("cannot concatenate effects on different probe objectives")
    return ExampleEffects(
        names=list(names),
        total=torch.cat([p.total for p in parts]),
        positive=torch.cat([p.positive for p in parts]),
        negative=torch.cat([p.negative for p in parts]),
    )


def probe_weights(encoded: EncodedProbes, *, by: Literal["kind", "probe"] = "kind") -> tuple[list[str], Tensor]:
    """`(names [R], weights [R, Mp])` over the probe targets (row-major in `encoded.batch`).

    `by="kind"`: one row per kind, `w[r, m] = 1 / n_r` on the tokens of the `n_r` responses of kind `r`, so the
    objective is the mean over those responses of the summed response log-prob. `by="probe"`: one row per response,
    `w[r, m] = 1` on its tokens (its summed log-prob).
    """
    token_rows = torch.cat([torch.full((n,), row) for row, n in enumerate(encoded.num_tokens)])
    if by == "probe":
        names = [r.probe_id for r in encoded.responses]
        membership = nn.functional.one_hot(token_rows, len(names)).T.float()
        return names, membership
    if by != "kind":
        raise ValueError(f"by must be 'kind' or 'probe', got {by!r}")
    names = list(dict.fromkeys(r.kind for r in encoded.responses))
    kind_of_row = torch.tensor([names.index(r.kind) for r in encoded.responses])
    counts = torch.bincount(kind_of_row, minlength=len(names)).float()
    weights = nn.functional.one_hot(kind_of_row[token_rows], len(names)).T.float()
    return names, weights / counts[:, None]


def sgd_view(model: nn.Module, lr: float, params: ParamSelection = None) -> TensorDict:
    """`P = lr` per selected parameter: the plain-SGD step `dw = -lr g`."""
    return sgd_preconditioner(select_params(model, params), lr)


def adam_view(optimizer: Any, model: nn.Module) -> StepSplit:
    """The step the optimizer would take from its current state, split as `dw = -P g + history` at `g -> 0`.

    `P = lr (1 - b1) / (1 - b1^t) / (sqrt(b2 v_{t-1} / (1 - b2^t)) + eps)` is the exact derivative of the Adam(W)
    step with respect to this step's gradient at `g = 0` (the `(1 - b2) g^2` term of `v_t` is second order), and
    `history` is the step taken regardless of the example (momentum, weight decay). For SGD (with momentum) `P`
    does not depend on `g`. Uses `optimizer_step_split` with zero gradients.

    Raises:
        ValueError: when an Adam optimizer has no second-moment state yet (before its first step `P` would be
            `lr / eps`): load a checkpoint's optimizer state or use the SGD view.
    """
    named = trainable_parameters(model)
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, torch.optim.Adam):
        missing = [name for name, p in named.items() if "exp_avg_sq" not in inner.state.get(p, {})]
        if missing:
            raise ValueError(
                f"the Adam optimizer has no state for {len(missing)} parameters (e.g. {missing[0]!r}): it has not "
                "stepped yet; load a checkpoint's optimizer state or use the SGD view"
            )
    zeros = {name: torch.zeros_like(p) for name, p in named.items()}
    return optimizer_step_split(optimizer, named, grads=zeros)


def exact_step_effect(
    optimizer: Any,
    named_params: Mapping[str, Tensor],
    gradient: Mapping[str, Tensor],
    probe_gradients: Sequence[Mapping[str, Tensor]],
    baseline: Mapping[str, Tensor],
) -> Tensor:
    """`[R]`: `<grad O_r, dw(g) - dw(0)>`, the first-order probe change of the optimizer's exact step on gradient `g`
    minus the step it takes without it (`baseline = dw(0)`, the `history` of `adam_view`).

    `dw(g) = -P(g) g + history(g)` from `optimizer_step_split(optimizer, named_params, grads=g)`: for Adam(W) `P` and
    `history` both carry `v_t = b2 v_{t-1} + (1 - b2) g^2`, so this is the real step, not its tangent at `g = 0`.
    The step is elementwise in `g`, so it needs the example's own gradient: one backward per example, no JVP form.
    Cost: two parameter-sized temporaries and `R` dot products.
    """
    split = optimizer_step_split(optimizer, named_params, grads=gradient)
    out = torch.zeros(len(probe_gradients), dtype=torch.float64)
    for name, g in gradient.items():
        change = -split.preconditioner[name] * g.to(split.history[name].dtype) + split.history[name] - baseline[name]
        for r, probe in enumerate(probe_gradients):
            out[r] += float((probe[name].to(change.dtype) * change).sum())
    return out


def probe_directions(
    model: nn.Module,
    probe_batch: TokenBatch,
    weights: Tensor,
    names: Sequence[str],
    preconditioner: Mapping[str, Tensor],
    *,
    view: View = "sgd",
    params: ParamSelection = None,
) -> ProbeDirections:
    """`v_r = P * sum_m weights[r, m] grad lp~_m` for every row of `weights [R, Mp]`.

    Each row back-propagates only the probe sequences it weighs (a row per probe kind touches that kind's rows), so
    the `R` rows together cost about one forward + backward of the probe batch, not `R`.

    Cost: one forward + backward of the weighted probe rows per row (`R` parameter-sized tangents are kept).
    """
    if weights.shape != (len(names), probe_batch.num_targets):
        raise ValueError(
            f"weights must have shape [R, Mp] = [{len(names)}, {probe_batch.num_targets}], got {tuple(weights.shape)}"
        )
    directions = []
    rows_of_targets = target_rows(probe_batch).cpu()
    for row in weights:
        used = torch.zeros(probe_batch.input_ids.shape[0], dtype=torch.bool)
        used[rows_of_targets[row.cpu() != 0]] = True
        if bool(used.all()) or not bool(used.any()) or probe_batch.model_kwargs:
            gradient = logprob_grad(model, probe_batch, row, params=params)
        else:
            gradient = logprob_grad(model, select_rows(probe_batch, used), row[used[rows_of_targets]], params=params)
        missing = [name for name in gradient if name not in preconditioner]
        if missing:
            raise ValueError(f"the preconditioner has no entry for parameters {missing[:5]}")
        directions.append(
            {
                name: (preconditioner[name].to(g.device) * g.to(preconditioner[name].dtype))
                for name, g in gradient.items()
            }
        )
    return ProbeDirections(names=list(names), directions=directions, view=view)


def direction_effect(model: nn.Module, probe_batch: TokenBatch, weights: Tensor, step: Mapping[str, Tensor]) -> Tensor:
    """`[R]`: `sum_m weights[r, m] <grad lp~_m, step>`, the first-order change of each probe objective along a
    parameter step (e.g. the optimizer's `history`). Cost: one probe JVP."""
    change = logprob_jvp(model, probe_batch, step)
    return weights.to(change) @ change


def batch_effects(
    model: nn.Module,
    batch: TokenBatch,
    grad_coeffs: Tensor,
    example: Tensor,
    num_examples: int,
    directions: ProbeDirections,
) -> ExampleEffects:
    """Per example, `-sum_{l in i} c_l <grad lp_l, v_r>`, split by the sign of `c_l`.

    Args:
        batch (`TokenBatch`): the training tokens (any number of examples, `Mt` targets).
        grad_coeffs (`Tensor[Mt]`): the trainer's `c_l`, row-major like the targets of `batch`.
        example (`Tensor[Mt]`, long): the example of each target, in `[0, num_examples)`.
        directions (`ProbeDirections`): `R` probe directions.

    Returns `ExampleEffects` with `[num_examples, R]` tensors. Cost: one JVP of `batch` per direction (about 2-3
    forwards each), for every example of the batch at once; never a per-example gradient.
    """
    if grad_coeffs.shape != (batch.num_targets,) or example.shape != grad_coeffs.shape:
        raise ValueError(
            f"grad_coeffs and example must have shape [Mt] = [{batch.num_targets}], got "
            f"{tuple(grad_coeffs.shape)} and {tuple(example.shape)}"
        )
    columns = []
    for direction in directions.directions:
        columns.append(logprob_jvp(model, batch, direction).double().cpu())
    jvps = torch.stack(columns, dim=1)  # [Mt, R]
    contributions = -grad_coeffs.double().cpu()[:, None] * jvps
    example = example.long().cpu()
    pulled_up = (grad_coeffs.cpu() < 0)[:, None]

    def by_example(values: Tensor) -> Tensor:
        out = torch.zeros(num_examples, values.shape[1], dtype=values.dtype)
        return out.index_add_(0, example, values)

    return ExampleEffects(
        names=list(directions.names),
        total=by_example(contributions),
        positive=by_example(torch.where(pulled_up, contributions, 0.0)),
        negative=by_example(torch.where(pulled_up, 0.0, contributions)),
    )


def harmful_examples(effects: ExampleEffects, objective: str, fraction: float) -> list[int]:
    """The `ceil(fraction * N)` examples with the most negative predicted change of `objective`, most harmful
    first (only examples whose predicted change is negative)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    column = effects.total[:, effects.column(objective)]
    count = int(torch.ceil(torch.tensor(fraction * len(effects))).item())
    order = column.argsort(stable=True)[:count]
    return [int(i) for i in order if column[i] < 0]


def curate(
    dataset: Any,
    effects: ExampleEffects,
    objective: str,
    *,
    fraction: float = 0.1,
    mode: Literal["drop", "downweight"] = "drop",
    repeat: int = 2,
    indices: Sequence[int] | None = None,
) -> Any:
    """A `datasets.Dataset` without (or with less weight on) the examples predicted to lower `objective` most.

    `mode="drop"`: the `harmful_examples(effects, objective, fraction)` rows are removed. `mode="downweight"`: they
    are kept once and every other row is repeated `repeat` times, so that an epoch gives them `1 / repeat` of the
    weight of the others (TRL's trainers take no per-example loss weight). Row order is kept otherwise.

    Args:
        dataset (`datasets.Dataset`): the rows the effects were computed for (e.g. the raw training dataset).
        indices (`Sequence[int]`, *optional*): the dataset row of each scored example (default: `0..N-1`).
    """
    rows = list(range(len(effects))) if indices is None else [int(i) for i in indices]
    if len(rows) != len(effects):
        raise ValueError(f"{len(rows)} indices for {len(effects)} scored examples")
    if max(rows, default=-1) >= len(dataset):
        raise ValueError(f"scored row {max(rows)} is outside the dataset of {len(dataset)} rows")
    harmful = {rows[i] for i in harmful_examples(effects, objective, fraction)}
    if mode == "drop":
        return dataset.select([i for i in range(len(dataset)) if i not in harmful])
    if mode != "downweight":
        raise ValueError(f"mode must be 'drop' or 'downweight', got {mode!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    return dataset.select([i for i in range(len(dataset)) for _ in range(1 if i in harmful else repeat)])


# ----------------------------------------------------------------------------------------------- ranking drift
def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two `[N]` score vectors (ties broken by position); NaN when `N < 2` or a vector
    is constant."""
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two [N] vectors, got {tuple(a.shape)} and {tuple(b.shape)}")

    def rank(x: Tensor) -> Tensor:
        r = x.argsort(stable=True).argsort().double()
        return r - r.mean()

    ra, rb = rank(a), rank(b)
    denominator = float(ra.norm() * rb.norm())
    if len(a) < 2 or denominator == 0 or float(a.max() - a.min()) == 0 or float(b.max() - b.min()) == 0:
        return float("nan")
    return float((ra * rb).sum()) / denominator


def top_k_overlap(a: Tensor, b: Tensor, k: int) -> float:
    """`|top_k(a) ∩ top_k(b)| / k` over the `k` most negative entries (the most harmful examples) of each."""
    k = min(k, len(a))
    if k < 1:
        return float("nan")
    first = set(a.argsort(stable=True)[:k].tolist())
    return len(first & set(b.argsort(stable=True)[:k].tolist())) / k
