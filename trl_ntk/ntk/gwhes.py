"""GWHES: a group-level score of how prone a GRPO group is to lazy likelihood displacement (LLD), from the
final-layer hidden embeddings of its completions.

Deng, Ren, Li, Sutherland, Li, Thrampoulidis, "On the Effect of Negative Gradient in Group Relative Deep
Reinforcement Optimization" (NeurIPS 2025), Theorem 4.4, define the group weighted hidden embedding score (GWHES) of
a correct response `y+_i` as

    p- sum_k sum_{j in N} sum_k' alpha((i,k),(j,k')) <h_{i,k}, h_{j,k'}>
  - p+ sum_k sum_{i' in P} sum_k'' alpha((i,k),(i',k'')) <h_{i,k}, h_{i',k''}>

with `alpha` the inner product of the two tokens' prediction errors `e_y - pi`, `h` the final-layer hidden states and
`p+ = (1 - p) / sqrt(p (1 - p))`, `p- = p / sqrt(p (1 - p))` the group weights of their Lemma 4.2 (for binary
rewards: the advantages `A+` and `|A-|`); the larger it is, the lazier the correct response's likelihood change. It
is the Razin et al. CHES ("Unintentional Unalignment", ICLR 2025) carried to groups. `gwhes` computes it with
`logits` given (the paper's form) and, without them, an `alpha`-free variant that needs only hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trl_ntk.ntk.nthr import LogitsLike, Vocab, hidden_reward

Aggregation = Literal["sequence_mean", "token_sum"]


@dataclass
class GroupScores:
    """Per-group GWHES and its two parts, each `Tensor[num_groups]` (NaN for groups that are not mixed).

    Args:
        gwhes (`Tensor`): `negative - positive`; larger means more prone to LLD.
        negative (`Tensor`): the negative completions' similarity term (the displacing pull).
        positive (`Tensor`): the positive completions' similarity term (the lifting pull).
    """

    gwhes: Tensor
    negative: Tensor
    positive: Tensor


def _response_embeddings(hidden: Tensor, mask: Tensor, aggregation: Aggregation) -> tuple[Tensor, Tensor]:
    """`(S, W)`, each `[B, d]`: `S_i = sum_k h_{i,k}` (the target side: a completion's log-likelihood sums over its
    tokens) and `W_j` the source side, `S_j / |y_j|` for `"sequence_mean"` and `S_j` for `"token_sum"`."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    weights = mask.to(dtype)
    sums = (hidden.to(dtype) * weights[..., None]).sum(1)
    if aggregation == "token_sum":
        return sums, sums
    lengths = weights.sum(1).clamp_min(1.0)
    return sums, sums / lengths[:, None]


def _check(hidden: Tensor, completion_mask: Tensor, advantages: Tensor, group_size: int, aggregation: str) -> None:
    if hidden.dim() != 3 or completion_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [B, T, d] and completion_mask [B, T]; got {tuple(hidden.shape)}, "
            f"{tuple(completion_mask.shape)}"
        )
    batch = hidden.shape[0]
    if advantages.shape != (batch,):
        raise ValueError(f"advantages must be [B] = [{batch}], got {tuple(advantages.shape)}")
    if group_size < 1 or batch % group_size:
        raise ValueError(f"the batch has {batch} rows, not a multiple of group_size={group_size}")
    if aggregation not in ("sequence_mean", "token_sum"):
        raise ValueError(f"aggregation must be 'sequence_mean' or 'token_sum', got {aggregation!r}")


def _split(pull: Tensor, adv: Tensor) -> GroupScores:
    """`GroupScores` from `pull [groups, G]`, the summed similarity of each completion `j` to the group's correct
    completions (already weighted by `|A_j|` and divided by `|P|`)."""
    positive, negative = adv > 0, adv < 0
    negative_part = (pull * negative).sum(1)
    positive_part = (pull * positive).sum(1)
    mixed = positive.any(1) & negative.any(1)
    nan = torch.full_like(negative_part, float("nan"))
    negative_part = torch.where(mixed, negative_part, nan)
    positive_part = torch.where(mixed, positive_part, nan)
    return GroupScores(negative_part - positive_part, negative_part, positive_part)


def _alpha_free_pull(hidden: Tensor, mask: Tensor, adv: Tensor, group_size: int, aggregation: Aggregation) -> Tensor:
    """`[groups, G]`: `(|A_j| / |P|) sum_{i in P} <S_i, W_j>`; `adv [groups, G]`."""
    targets, sources = _response_embeddings(hidden, mask, aggregation)
    groups = hidden.shape[0] // group_size
    targets = targets.view(groups, group_size, -1)
    sources = sources.view(groups, group_size, -1)
    positive = (adv > 0).to(targets.dtype)
    anchor = (targets * positive[..., None]).sum(1)  # [groups, d] = sum_{i in P} S_i
    count = positive.sum(1).clamp_min(1)
    return (sources @ anchor[..., None])[..., 0] * adv.abs() / count[:, None]


def _alpha_pull(
    hidden: Tensor,
    logits: LogitsLike,
    completion_ids: Tensor,
    mask: Tensor,
    adv: Tensor,
    group_size: int,
    aggregation: Aggregation,
    **options,
) -> Tensor:
    """`[groups, G]`: `(|A_j| / |P|) sum_k' s_{j,k'} / n_j` with `s` the NTHR hidden reward of the group;
    `adv [groups, G]`."""
    rows, flat = [], adv.reshape(-1)
    for start in range(0, hidden.shape[0], group_size):
        span = slice(start, start + group_size)
        group_logits = logits[span] if isinstance(logits, Tensor) else logits
        scores = hidden_reward(hidden[span], group_logits, completion_ids[span], mask[span], flat[span] > 0, **options)
        rows.append(scores.sum(1))
    sums = torch.stack(rows).view(-1)
    if aggregation == "sequence_mean":
        sums = sums / mask.sum(1).clamp_min(1).to(sums.dtype)
    sums = sums.view(-1, group_size)
    count = (adv > 0).sum(1).clamp_min(1).to(sums.dtype)
    return sums * adv.abs().to(sums.dtype) / count[:, None]


@torch.no_grad()
def gwhes(
    hidden: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    group_size: int,
    *,
    aggregation: Aggregation | None = None,
    logits: LogitsLike | None = None,
    completion_ids: Tensor | None = None,
    vocab: Vocab = "group",
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> GroupScores:
    """Group weighted hidden embedding score of every group of `group_size` consecutive completions.

    With `h_{j,k}` the final-layer hidden state that predicts token `k` of completion `j`, `A_j` the advantages,
    `P` / `N` the completions of the group with `A > 0` / `A < 0`, and `s_{j,k}` the NTHR hidden reward
    (`trl_ntk.ntk.nthr.hidden_reward`: `s_{j,k} = sum_{i in P} sum_m alpha((i,m),(j,k)) <h_{i,m}, h_{j,k}>`):

        negative = (1/|P|) sum_{j in N} |A_j| sum_k s_{j,k} / n_j
        positive = (1/|P|) sum_{j in P}  A_j  sum_k s_{j,k} / n_j
        GWHES    = negative - positive

    which is the paper's Theorem 4.4 score (see the module docstring) averaged over the group's correct responses
    (as the likelihood change `Delta(x)` it predicts is), with `n_j = 1` (`aggregation="token_sum"`, the paper's
    derivation, which drops GRPO's token normalisation) or `n_j = |y_j|` (`"sequence_mean"`, TRL's
    `loss_type="grpo"`, which averages each completion's token terms). This is the form used when `logits` (and
    `completion_ids`) are given; the default aggregation is then `"token_sum"`.

    Without `logits`, the `alpha`-free variant replaces `alpha` by 1 (as CHES does for DPO), so only hidden states
    are needed: with `S_i = sum_k h_{i,k}` and `W_j = S_j / n_j`,

        negative = (1/|P|) sum_{i in P} sum_{j in N} |A_j| <S_i, W_j>
        positive = (1/|P|) sum_{i in P} sum_{j in P}  A_j  <S_i, W_j>

    (default aggregation `"sequence_mean"`). `-GWHES` of this variant is exactly the mean change of `sum_k <u,
    h_{i,k}>` over the correct completions after one gradient step from `u = 0` on a linear score; the paper's form
    adds the per-token-pair weight `alpha`, which vanishes on tokens the model already predicts with certainty.

    Cost: `alpha`-free, one pass over `[B, T, d]` plus `O(G d)` per group; paper's form, one `hidden_reward` per
    group (about `3 N` rows through the head when `logits` is a head, `O(N U d)` flops).

    Args:
        hidden (`Tensor[B, T, d]`): final-layer hidden states at the positions that predict the completion tokens.
        completion_mask (`Tensor[B, T]`): 1 on completion tokens, 0 on padding.
        advantages (`Tensor[B]`): per-completion advantages (TRL's group-normalised rewards).
        group_size (`int`): completions per prompt; `B` is a multiple of it.
        aggregation (`str`, *optional*): `"sequence_mean"` or `"token_sum"`; defaults to `"token_sum"` with
            `logits` (the paper) and `"sequence_mean"` without.
        logits (`Tensor[B, T, V]` or callable, *optional*): the logits at the completion positions (before the
            temperature) or a head `[n, d] -> [n, V]`; given, the paper's `alpha`-weighted form is computed.
        completion_ids (`Tensor[B, T]`, *optional*): the sampled tokens; required with `logits`.
        vocab (`str`, *optional*, defaults to `"group"`): `alpha` over the group's token ids (`"group"`, as NTHR
            computes it) or the full vocabulary (`"full"`); see `hidden_reward`.
        temperature (`float`, *optional*, defaults to `1.0`): the sampling temperature `pi` is taken at.
        chunk_size (`int`, *optional*, defaults to `512`): tokens per chunk in `hidden_reward`.

    Returns:
        `GroupScores` with `[B / group_size]` tensors (float32, float64 for float64 `hidden`); NaN where a group has
        no positive or no negative completion.
    """
    if aggregation is None:
        aggregation = "sequence_mean" if logits is None else "token_sum"
    _check(hidden, completion_mask, advantages, group_size, aggregation)
    mask = completion_mask.bool()
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    adv = advantages.to(dtype).view(-1, group_size)
    if logits is None:
        pull = _alpha_free_pull(hidden, mask, adv, group_size, aggregation)
    else:
        if completion_ids is None or completion_ids.shape != mask.shape:
            raise ValueError("the paper's form (logits given) needs completion_ids [B, T]")
        options = {"vocab": vocab, "temperature": temperature, "chunk_size": chunk_size}
        pull = _alpha_pull(hidden, logits, completion_ids, mask, adv, group_size, aggregation, **options)
    return _split(pull.to(dtype), adv)
