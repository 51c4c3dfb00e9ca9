"""GWHES against a direct loop over groups, completions and tokens, and against the linearised step it comes from."""

from __future__ import annotations

import math

import pytest
import torch

from trl_ntk.ntk.gwhes import gwhes


def _direct(hidden, mask, advantages, group_size, aggregation):
    """Oracle: per group, (1/|P|) sum_{i in P} sum_j sgn-weighted |A_j| sum_{k, k'} <h_ik, h_jk'> / norm_j, split by
    the sign of A_j, with plain Python loops over tokens."""
    out = []
    for start in range(0, hidden.shape[0], group_size):
        rows = range(start, start + group_size)
        pos = [i for i in rows if advantages[i] > 0]
        neg = [j for j in rows if advantages[j] < 0]
        if not pos or not neg:
            out.append((math.nan, math.nan, math.nan))
            continue
        parts = {}
        for name, sources in (("negative", neg), ("positive", pos)):
            total = 0.0
            for i in pos:
                for j in sources:
                    norm = float(mask[j].sum()) if aggregation == "sequence_mean" else 1.0
                    for k in range(hidden.shape[1]):
                        for kk in range(hidden.shape[1]):
                            if mask[i, k] and mask[j, kk]:
                                total += abs(float(advantages[j])) * float(hidden[i, k] @ hidden[j, kk]) / norm
            parts[name] = total / len(pos)
        out.append((parts["negative"] - parts["positive"], parts["negative"], parts["positive"]))
    return torch.tensor(out, dtype=torch.float64)


def _batch(seed, groups=3, group_size=4, length=5, dim=6):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(groups * group_size, length, dim, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (groups * group_size,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (groups, group_size), generator=generator).double()
    rewards[0] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # at least one mixed group
    rewards[-1] = 1.0  # and one all-correct group
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    return hidden, mask, advantages.flatten()


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gwhes_matches_a_direct_loop(seed, aggregation):
    hidden, mask, advantages = _batch(seed)
    scores = gwhes(hidden, mask, advantages, 4, aggregation=aggregation)
    expected = _direct(hidden, mask, advantages, 4, aggregation)
    got = torch.stack([scores.gwhes, scores.negative, scores.positive], 1)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(scores.gwhes[-1])
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=1e-10)


def test_gwhes_ignores_padding_contents():
    hidden, mask, advantages = _batch(3)
    noisy = hidden.clone()
    noisy[mask == 0] = 1e3
    a = gwhes(hidden, mask, advantages, 4).gwhes
    b = gwhes(noisy, mask, advantages, 4).gwhes
    assert torch.allclose(a, b, equal_nan=True)


def test_gwhes_by_hand_in_one_dimension():
    # One group: completion 0 correct (A=+1, hidden 1 and 1), completion 1 wrong (A=-1, hidden 2), 1-d embeddings.
    hidden = torch.tensor([[[1.0], [1.0]], [[2.0], [0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([1.0, -1.0])
    scores = gwhes(hidden, mask, advantages, 2)
    # S_0 = 2, W_0 = 1, W_1 = 2: negative = 1 * 2 * 2 = 4, positive = 1 * 2 * 1 = 2.
    assert scores.negative.item() == pytest.approx(4.0)
    assert scores.positive.item() == pytest.approx(2.0)
    assert scores.gwhes.item() == pytest.approx(2.0)


def test_minus_gwhes_is_the_alpha_free_linearised_change_of_the_correct_completions():
    """Exact identity behind the formula: for a linear score f(y) = sum_k <u, h_k> trained from u = 0 on the GRPO
    sequence-mean loss -sum_j A_j f(y_j) / |y_j|, one gradient step of size lr changes f of the correct completions
    by -lr * GWHES on average."""
    hidden, mask, advantages = (t[:4] for t in _batch(4, groups=2))  # the first, mixed group
    u = torch.zeros(hidden.shape[-1], dtype=torch.float64, requires_grad=True)
    per_token = (hidden @ u) * mask
    loss = -(advantages * per_token.sum(1) / mask.sum(1)).sum()
    (grad,) = torch.autograd.grad(loss, u)
    lr = 0.1
    change = (hidden @ (-lr * grad) * mask).sum(1)
    positive = advantages > 0
    scores = gwhes(hidden, mask, advantages, hidden.shape[0])
    assert change[positive].mean().item() == pytest.approx(-lr * scores.gwhes.item(), rel=1e-10)


def test_gwhes_rejects_bad_shapes():
    hidden, mask, advantages = _batch(0)
    with pytest.raises(ValueError, match="multiple"):
        gwhes(hidden, mask, advantages, 5)
    with pytest.raises(ValueError, match="advantages"):
        gwhes(hidden, mask, advantages[:-1], 4)
    with pytest.raises(ValueError, match="aggregation"):
        gwhes(hidden, mask, advantages, 4, aggregation="mean")
