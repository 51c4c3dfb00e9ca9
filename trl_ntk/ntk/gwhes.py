"""GWHES: a group-level score of how prone a GRPO group is to lazy likelihood displacement (LLD), from the
final-layer hidden embeddings of its completions.

Deng, Ren, Li, Sutherland, Li, Thrampoulidis, "On the Effect of Negative Gradient in Group Relative Deep
Reinforcement Optimization" (NeurIPS 2025) define a group weighted hidden embedding score (GWHES) in the spirit of
the centered hidden embedding similarity (CHES) of Razin et al., "Unintentional Unalignment: Likelihood Displacement
in Direct Preference Optimization" (ICLR 2025): the more the hidden embeddings of a group's incorrect completions
align with those of its correct ones, relative to how the correct ones align among themselves, the more the negative
gradient drags the correct completions' likelihood down. This module computes that score in the form the
linearised learning dynamics give, with GRPO's own group weights (the advantages); see `gwhes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

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


@torch.no_grad()
def gwhes(
    hidden: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    group_size: int,
    *,
    aggregation: Aggregation = "sequence_mean",
) -> GroupScores:
    """Group weighted hidden embedding score of every group of `group_size` consecutive completions.

    With `h_{i,k}` the final-layer hidden state that predicts token `k` of completion `i`, `A_j` the advantages,
    `P` / `N` the completions of the group with `A > 0` / `A < 0`, `S_i = sum_k h_{i,k}` and `W_j = S_j / |y_j|`
    (`aggregation="sequence_mean"`, TRL's `loss_type="grpo"`, which averages each completion's token terms) or
    `W_j = S_j` (`"token_sum"`, losses that sum tokens, e.g. `"dapo"` / `"bnpo"` up to a constant):

        negative = (1/|P|) sum_{i in P} sum_{j in N} |A_j| <S_i, W_j>
        positive = (1/|P|) sum_{i in P} sum_{i' in P}  A_i' <S_i, W_i'>
        GWHES    = negative - positive

    Where it comes from: one gradient step on the GRPO objective, linearised, changes the summed log-likelihood of a
    correct completion `i` by `eta sum_j A_j sum_{k, k'} alpha((i,k),(j,k')) <h_{i,k}, h_{j,k'}> / |y_j|` when only
    the unembedding moves (the paper's analysis, and the hidden reward NTHR thresholds), with `alpha` the inner
    product of the two tokens' prediction errors `e_y - pi`. Dropping `alpha` (as CHES drops it for DPO) and
    averaging over the group's correct completions leaves `-(GWHES)`: the negative completions' advantage-weighted
    embedding similarity to the correct ones pulls their likelihood down, the positive completions' pushes it up.
    A group scores high (LLD-prone) when its wrong completions look like its right ones in hidden space. This is
    the form derived from the paper's linearised dynamics, with larger = more prone; it is not a transcription of
    the paper's printed equation, whose normalisation may differ by positive per-group factors.

    Cost: one pass over `[B, T, d]` plus `O(G^2 d)` per group; memory `O(B d)`.

    Args:
        hidden (`Tensor[B, T, d]`): final-layer hidden states at the positions that predict the completion tokens.
        completion_mask (`Tensor[B, T]`): 1 on completion tokens, 0 on padding.
        advantages (`Tensor[B]`): per-completion advantages (TRL's group-normalised rewards).
        group_size (`int`): completions per prompt; `B` is a multiple of it.
        aggregation (`str`, *optional*, defaults to `"sequence_mean"`): `"sequence_mean"` or `"token_sum"`.

    Returns:
        `GroupScores` with `[B / group_size]` tensors (float32, float64 for float64 `hidden`); NaN where a group has
        no positive or no negative completion.
    """
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
    targets, sources = _response_embeddings(hidden, completion_mask.bool(), aggregation)
    groups = batch // group_size
    targets = targets.view(groups, group_size, -1)
    sources = sources.view(groups, group_size, -1)
    adv = advantages.to(targets.dtype).view(groups, group_size)
    positive, negative = adv > 0, adv < 0
    similarity = targets @ sources.transpose(1, 2)  # [groups, i, j] = <S_i, W_j>
    count = positive.sum(1).to(targets.dtype)
    pull = similarity * adv[:, None, :].abs()  # |A_j| <S_i, W_j>
    rows = positive[:, :, None]
    negative_part = (pull * (rows & negative[:, None, :])).sum((1, 2)) / count.clamp_min(1)
    positive_part = (pull * (rows & positive[:, None, :])).sum((1, 2)) / count.clamp_min(1)
    mixed = positive.any(1) & negative.any(1)
    nan = torch.full_like(negative_part, float("nan"))
    negative_part = torch.where(mixed, negative_part, nan)
    positive_part = torch.where(mixed, positive_part, nan)
    return GroupScores(negative_part - positive_part, negative_part, positive_part)
