"""NTHR (negative token hidden reward) maths: the per-token hidden reward of a GRPO batch and the token weights it
implies (Deng, Ren, Li, Sutherland, Li, Thrampoulidis 2025, "On the Effect of Negative Gradient in Group Relative
Deep RL"). Pure functions of hidden states, logits (or a head), completion ids and advantages; the trainer plumbing
is `trl_ntk.integration.nthr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

Vocab = Literal["full", "group"]
LogitsLike = Tensor | Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------------------------
# Hidden reward.
# ------------------------------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logit_rows(logits: LogitsLike, hidden_rows: Tensor, mask: Tensor) -> Callable[[int, int], Tensor]:
    """`rows(start, end) -> [end - start, V]` logits of the flattened completion tokens `start:end`.

    `logits` is either the `[B, T, V]` tensor (indexed) or a head mapping hidden states `[n, d]` to logits `[n, V]`
    (evaluated on the chunk only, so `[B, T, V]` is never formed).
    """
    if isinstance(logits, Tensor):
        if logits.shape[:2] != mask.shape:
            raise ValueError(f"logits must be [B, T, V] with [B, T] = {tuple(mask.shape)}, got {tuple(logits.shape)}")
        flat = logits[mask]
        return lambda start, end: flat[start:end]
    if not callable(logits):
        raise TypeError(f"logits must be a [B, T, V] tensor or a callable head, got {type(logits).__name__}")
    return lambda start, end: logits(hidden_rows[start:end])


def _prediction_errors(
    logits: Tensor, targets: Tensor, columns: Tensor | None, temperature: float, dtype: torch.dtype
) -> Tensor:
    """`g = e_y - pi` with `pi = softmax(logits / temperature)` over the full vocabulary, then kept on `columns`
    (not renormalized). `logits [n, V]`, `targets [n]` (indices into `columns` when given) -> `[n, U]`."""
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)
    errors = -(probs if columns is None else probs[:, columns])
    errors[torch.arange(errors.shape[0], device=errors.device), targets] += 1.0
    return errors


@dataclass
class _FlatTokens:
    """Completion tokens flattened row-major over a `[B, T]` mask."""

    hidden: Tensor  # [N, d] in the accumulation dtype
    logit_rows: Callable[[int, int], Tensor]  # (start, end) -> [end - start, V]
    targets: Tensor  # [N] token ids, or their indices into the group's columns


def _flatten(hidden: Tensor, logits: LogitsLike, completion_ids: Tensor, mask: Tensor, columns: Tensor | None):
    raw_hidden = hidden[mask]
    ids = completion_ids[mask]
    return _FlatTokens(
        hidden=raw_hidden.to(_accumulation_dtype(hidden.dtype)),
        logit_rows=_logit_rows(logits, raw_hidden, mask),
        targets=ids if columns is None else torch.searchsorted(columns, ids),
    )


def _positive_moment(tokens: _FlatTokens, columns: Tensor | None, temperature: float, chunk_size: int) -> Tensor | None:
    """`M+ = sum_{positive tokens} (e_y - pi) h^T`, `[U, d]` (U = V for the full vocabulary), in chunks."""
    moment = None
    for start in range(0, tokens.hidden.shape[0], chunk_size):
        end = min(start + chunk_size, tokens.hidden.shape[0])
        errors = _prediction_errors(
            tokens.logit_rows(start, end), tokens.targets[start:end], columns, temperature, tokens.hidden.dtype
        )
        term = errors.T @ tokens.hidden[start:end]
        moment = term if moment is None else moment + term
    return moment


def _token_scores(
    tokens: _FlatTokens, moment: Tensor, columns: Tensor | None, temperature: float, chunk_size: int
) -> Tensor:
    """`s_t = (e_{y_t} - pi_t)^T M+ h_t` for every token, `[N]`."""
    count = tokens.hidden.shape[0]
    scores = tokens.hidden.new_zeros(count)
    for start in range(0, count, chunk_size):
        end = min(start + chunk_size, count)
        errors = _prediction_errors(
            tokens.logit_rows(start, end), tokens.targets[start:end], columns, temperature, tokens.hidden.dtype
        )
        scores[start:end] = ((errors @ moment) * tokens.hidden[start:end]).sum(-1)
    return scores


@torch.no_grad()
def hidden_reward(
    hidden: Tensor,
    logits: LogitsLike,
    completion_ids: Tensor,
    completion_mask: Tensor,
    positive: Tensor,
    *,
    vocab: Vocab = "full",
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> Tensor:
    """NTHR's hidden reward of every completion token of one group, through the final-layer representation.

    For the token `(j, k')` (completion `j`, position `k'`):

        s_{j,k'} = sum_{i in positive} sum_k alpha((i,k),(j,k')) <h_{i,k}, h_{j,k'}>
        alpha(a, b) = <e_{y_a} - pi_a, e_{y_b} - pi_b>,      pi = softmax(logits / temperature)

    computed in matrix form: `M+ = sum_{positive tokens} (e_y - pi) h^T` (`[V, d]`), then
    `s_t = (e_{y_t} - pi_t)^T M+ h_t`, both in chunks of `chunk_size` tokens with float32 (or float64) accumulation;
    no `[tokens, tokens, V]` or `[tokens, tokens]` array is ever formed. Positive tokens get their score too (the
    `i' = i` self terms included): it is what the threshold of `token_weights` averages.

    Exact oracle: with an unembedding `W` (`logits = W h`, no bias), `grad_W log softmax(W h / T)_y =
    (e_y - pi) h^T / T`, so `s_t = T^2 <grad_W lp_t, sum_{positive tokens} grad_W lp_i>`. `s` leaves out the `1/T^2`
    (the paper's formula); thresholds on `s` are invariant to that positive factor.

    `vocab="group"` restricts `alpha` to the token ids present in the group's completions (the paper's saving): `pi`
    is still the full softmax, only its coordinates outside those ids are dropped (not renormalized), so
    `alpha(a, b) = [y_a = y_b] - pi_a[y_b] - pi_b[y_a] + sum_{v in group} pi_a[v] pi_b[v]`. `M+` is then `[U, d]`
    with `U` the number of distinct ids. `vocab="full"` is exact.

    Cost: about `2 N_pos + N` rows through `logits` (when it is a head) plus `2 (N_pos + N) U d` flops; memory
    `U d + chunk_size * V` floats.

    Args:
        hidden (`Tensor[B, T, d]`): final-layer hidden states at the positions that predict `completion_ids`.
        logits (`Tensor[B, T, V]` or callable): the logits at those positions (before the temperature), or a head
            mapping hidden states `[n, d]` to logits `[n, V]` (e.g. the model's `lm_head`), applied in chunks.
        completion_ids (`Tensor[B, T]`, long): the sampled tokens.
        completion_mask (`Tensor[B, T]`): 1 on completion tokens, 0 on padding.
        positive (`Tensor[B]`, bool): which completions are positive (advantage > 0).
        vocab (`str`, *optional*, defaults to `"full"`): `"full"` or `"group"`, see above.
        temperature (`float`, *optional*, defaults to `1.0`): the sampling temperature `pi` is taken at.
        chunk_size (`int`, *optional*, defaults to `512`): tokens per chunk.

    Returns:
        `Tensor[B, T]` in float32 (float64 for float64 `hidden`): `s` on completion tokens, 0 on padding; all zeros
        when no completion is positive.
    """
    if hidden.dim() != 3 or completion_ids.shape != hidden.shape[:2] or completion_mask.shape != hidden.shape[:2]:
        raise ValueError(
            "hidden must be [B, T, d] and completion_ids, completion_mask [B, T]; got "
            f"{tuple(hidden.shape)}, {tuple(completion_ids.shape)}, {tuple(completion_mask.shape)}"
        )
    if positive.shape != hidden.shape[:1]:
        raise ValueError(f"positive must be [B] = [{hidden.shape[0]}], got {tuple(positive.shape)}")
    if vocab not in ("full", "group"):
        raise ValueError(f"vocab must be 'full' or 'group', got {vocab!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    mask = completion_mask.bool()
    positive_mask = mask & positive.bool()[:, None]
    scores = torch.zeros(mask.shape, dtype=_accumulation_dtype(hidden.dtype), device=hidden.device)
    if not positive_mask.any():
        return scores
    columns = torch.unique(completion_ids[mask]) if vocab == "group" else None
    moment = _positive_moment(
        _flatten(hidden, logits, completion_ids, positive_mask, columns), columns, temperature, chunk_size
    )
    tokens = _flatten(hidden, logits, completion_ids, mask, columns)
    scores[mask] = _token_scores(tokens, moment, columns, temperature, chunk_size)
    return scores


# ------------------------------------------------------------------------------------------------------------------
# Token weights.
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class NTHRStats:
    """What one `token_weights` call did, as sums (so ranks and batches add up); the means are properties.

    Args:
        num_groups (`int`): groups seen.
        num_mixed_groups (`int`): groups with both a positive- and a negative-advantage completion (reweighted).
        num_negative_tokens (`int`): negative-advantage completion tokens, in all groups.
        num_downweighted (`int`): of those, how many got weight `eta`.
        tau_sum (`float`): sum over mixed groups of the threshold `tau = beta * min s+bar`.
        eta_sum (`float`): sum over mixed groups of the weight `eta` applied.
        s_neg_sum (`float`): sum of the hidden reward `s` of the negative-advantage tokens of mixed groups.
        s_neg_count (`int`): how many tokens that sum has.
    """

    num_groups: int = 0
    num_mixed_groups: int = 0
    num_negative_tokens: int = 0
    num_downweighted: int = 0
    tau_sum: float = 0.0
    eta_sum: float = 0.0
    s_neg_sum: float = 0.0
    s_neg_count: int = 0

    def __add__(self, other: NTHRStats) -> NTHRStats:
        return NTHRStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple:
        return tuple(asdict(self).values())

    @property
    def frac_downweighted(self) -> float:
        """Fraction of negative-advantage tokens set to `eta` (0 when there are none)."""
        return self.num_downweighted / self.num_negative_tokens if self.num_negative_tokens else 0.0

    @property
    def tau(self) -> float:
        """Mean threshold over mixed groups (NaN without any)."""
        return self.tau_sum / self.num_mixed_groups if self.num_mixed_groups else math.nan

    @property
    def eta(self) -> float:
        """Mean weight applied over mixed groups (NaN without any)."""
        return self.eta_sum / self.num_mixed_groups if self.num_mixed_groups else math.nan

    @property
    def s_neg_mean(self) -> float:
        """Mean hidden reward of negative-advantage tokens of mixed groups (NaN without any)."""
        return self.s_neg_sum / self.s_neg_count if self.s_neg_count else math.nan

    def metrics(self) -> dict[str, float]:
        """The logged means, keyed as in the `nthr` record."""
        return {
            "frac_downweighted": self.frac_downweighted,
            "tau": self.tau,
            "eta": self.eta,
            "s_neg_mean": self.s_neg_mean,
        }


def check_weight_options(beta: float, eta: float | str) -> None:
    if isinstance(beta, bool) or not (isinstance(beta, int | float) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if eta != "auto" and (isinstance(eta, bool) or not (isinstance(eta, int | float) and 0.0 <= eta <= 1.0)):
        raise ValueError(f"eta must be 'auto' or a number in [0, 1], got {eta!r}")


@dataclass
class GroupResult:
    """One group's outcome: `weights [G, T]`; for a mixed group also `scores [G, T]`, `selected [G, T]`, `tau`,
    `eta`."""

    weights: Tensor
    scores: Tensor | None = None
    selected: Tensor | None = None
    tau: float | None = None
    eta: float | None = None

    def stats(self, completion_mask: Tensor, advantages: Tensor, rows: slice, count_group: bool) -> NTHRStats:
        """`NTHRStats` of the group's `rows`; `count_group=False` leaves out the group-level counts (groups, mixed
        groups, tau, eta), for a group another rank counts."""
        negative_tokens = completion_mask[rows].bool() & (advantages[rows] < 0)[:, None]
        stats = NTHRStats(num_groups=int(count_group), num_negative_tokens=int(negative_tokens.sum()))
        if self.tau is None:
            return stats
        if count_group:
            stats.num_mixed_groups, stats.tau_sum, stats.eta_sum = 1, self.tau, self.eta
        stats.num_downweighted = int(self.selected[rows].sum())
        stats.s_neg_sum = float(self.scores[rows][negative_tokens].sum())
        stats.s_neg_count = int(negative_tokens.sum())
        return stats


@torch.no_grad()
def group_weights(
    hidden: Tensor,
    logits: LogitsLike,
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    *,
    beta: float,
    eta: float | str,
    vocab: Vocab,
    temperature: float,
    chunk_size: int,
) -> GroupResult:
    """The rule of `token_weights` on one group (all its `G` rows)."""
    mask = completion_mask.bool()
    weights = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    positive, negative = advantages > 0, advantages < 0
    negative_tokens = mask & negative[:, None]
    lengths = mask.sum(-1)
    anchors = positive & (lengths > 0)
    if not anchors.any() or not negative_tokens.any():
        return GroupResult(weights)
    scores = hidden_reward(
        hidden, logits, completion_ids, mask, positive, vocab=vocab, temperature=temperature, chunk_size=chunk_size
    )
    mean_positive = (scores * mask).sum(-1)[anchors] / lengths[anchors]
    tau = beta * float(mean_positive.min())
    group_eta = 2.0 * abs(0.5 - float(positive.float().mean())) if eta == "auto" else float(eta)
    selected = negative_tokens & (scores > tau)
    weights[selected] = group_eta
    return GroupResult(weights, scores, selected, tau, group_eta)


@torch.no_grad()
def token_weights(
    hidden: Tensor,
    logits: LogitsLike,
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    group_size: int,
    *,
    beta: float = 1.0,
    eta: float | Literal["auto"] = "auto",
    vocab: Vocab = "group",
    temperature: float = 1.0,
    chunk_size: int = 512,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, NTHRStats]:
    """NTHR's per-token weights of the policy-gradient advantages, one group of `group_size` rows at a time
    (the paper's Section 5.2 and Algorithm 1; `docs/nthr.md` maps every equation to the code).

    Per group (rows `g * group_size ... (g + 1) * group_size - 1`): `P` = completions with advantage `> 0`, `N` =
    with advantage `< 0`. With `s` the `hidden_reward` of the group (positives `P`),

        s+bar_{i'} = mean over the tokens of completion i' in P of s          (empty completions skipped)
        tau        = beta * min_{i' in P} s+bar_{i'}
        w          = eta on the tokens of N with s > tau (strictly), 1 everywhere else

    `eta="auto"` is `2 |0.5 - p|` with `p = |P| / group_size`, the fraction of the group's completions with positive
    advantage: for binary rewards the group's success rate; for graded rewards the fraction rewarded above the
    group's mean (the baseline GRPO subtracts). Groups without both a positive and a negative completion get weight
    1 everywhere. The reweighted advantage is `A_i * w_{i,t}`: since `w >= 0`, `min(c1 A w, c2 A w) =
    w min(c1 A, c2 A)`, so every clipped GRPO surrogate is reweighted token by token.

    Cost: one `hidden_reward` per mixed group (see there); memory per group only.

    Args:
        hidden (`Tensor[B, T, d]`): final-layer hidden states at the positions that predict `completion_ids`.
        logits (`Tensor[B, T, V]` or callable): logits there (before the temperature), or a head `[n, d] -> [n, V]`.
        completion_ids (`Tensor[B, T]`, long): sampled tokens; `B` is a multiple of `group_size`.
        completion_mask (`Tensor[B, T]`): 1 on completion tokens, 0 on padding.
        advantages (`Tensor[B]`): per-completion advantages.
        group_size (`int`): completions per prompt (TRL's `num_generations`).
        beta (`float`, *optional*, defaults to `1.0`): threshold multiplier, `>= 0`. The paper's main setting
            (appendix, implementation details; ablation in its Table 4).
        eta (`float` or `"auto"`, *optional*, defaults to `"auto"`): the weight of selected tokens, in `[0, 1]`.
            `"auto"` is the paper's training setting (appendix, implementation details; ablation in its Table 5);
            its one-step likelihood experiment (Section 5.3) uses `eta=0.0`.
        vocab (`str`, *optional*, defaults to `"group"`): `"group"` or `"full"`, see `hidden_reward`; `"group"` is
            the paper's restriction (appendix, complexity discussion).
        temperature (`float`, *optional*, defaults to `1.0`): the sampling temperature.
        chunk_size (`int`, *optional*, defaults to `512`): tokens per chunk.
        return_stats (`bool`, *optional*, defaults to `False`): also return the `NTHRStats`.

    Returns:
        `Tensor[B, T]` float32 weights (1 on padding), and the `NTHRStats` when `return_stats`.
    """
    check_weight_options(beta, eta)
    batch = completion_ids.shape[0]
    if group_size < 1 or batch % group_size:
        raise ValueError(f"the batch has {batch} rows, not a multiple of group_size={group_size}")
    if advantages.shape != (batch,):
        raise ValueError(f"advantages must be [B] = [{batch}], got {tuple(advantages.shape)}")
    weights = torch.ones(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    stats = NTHRStats()
    for start in range(0, batch, group_size):
        rows = slice(start, start + group_size)
        group_logits = logits[rows] if isinstance(logits, Tensor) else logits
        result = group_weights(
            hidden[rows],
            group_logits,
            completion_ids[rows],
            completion_mask[rows],
            advantages[rows],
            beta=beta,
            eta=eta,
            vocab=vocab,
            temperature=temperature,
            chunk_size=chunk_size,
        )
        weights[rows] = result.weights
        stats = stats + result.stats(completion_mask[rows], advantages[rows], slice(None), count_group=True)
    return (weights, stats) if return_stats else weights
