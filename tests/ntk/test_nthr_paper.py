"""NTHR against the paper's equations written as plain loops (Deng et al., NeurIPS 2025, Section 5): the token hidden
reward, the anchor scores, the threshold, the selected set and the scaled advantages, over groups and tokens in
float64; a worked example by hand; and the defaults the paper states."""

from __future__ import annotations

import math

import pytest
import torch

from trl_ntk.config import NTHRConfig
from trl_ntk.ntk.gwhes import gwhes
from trl_ntk.ntk.nthr import token_weights


def _paper_nthr_loop(hidden, logits, ids, mask, rewards, group_size, beta, eta, group_vocab):
    """Per question: s-_{j,<k'} = sum_{i correct} sum_k alpha <h+_{i,<k}, h-_{j,<k'}> (Sec 5.1);
    s+bar_{i'} = (1/|y+_i'|) sum_k'' sum_{i correct} sum_k alpha <h+_{i,<k}, h+_{i',<k''}> (Sec 5.2);
    tau = beta min s+bar; tokens of wrong responses with s- > tau get eta A, eta = 2|0.5 - p| for "auto"."""
    probs = torch.softmax(logits.double(), -1)
    weights = torch.ones(ids.shape, dtype=torch.float64)
    length = ids.shape[1]
    for start in range(0, ids.shape[0], group_size):
        rows = list(range(start, start + group_size))
        correct = [i for i in rows if rewards[i] == 1]
        wrong = [j for j in rows if rewards[j] == 0]
        if not correct or not wrong:
            continue
        vocab = probs.shape[-1]
        if group_vocab:
            columns = sorted({int(ids[r, t]) for r in rows for t in range(length) if mask[r, t]})
        else:
            columns = list(range(vocab))

        def error(r, t, columns=columns):
            return [(1.0 if v == int(ids[r, t]) else 0.0) - float(probs[r, t, v]) for v in columns]

        def influence(r, t, correct=correct, error=error):
            total = 0.0
            for i in correct:
                for k in range(length):
                    if mask[i, k]:
                        alpha = sum(a * b for a, b in zip(error(i, k), error(r, t), strict=True))
                        total += alpha * float(hidden[i, k].double() @ hidden[r, t].double())
            return total

        anchors = [
            sum(influence(i, k) for k in range(length) if mask[i, k]) / float(mask[i].sum())
            for i in correct
            if mask[i].sum() > 0
        ]
        tau = beta * min(anchors)
        p = len(correct) / group_size
        scale = 2 * abs(0.5 - p) if eta == "auto" else eta
        for j in wrong:
            for k in range(length):
                if mask[j, k] and influence(j, k) > tau:
                    weights[j, k] = scale
    return weights


def _group_batch(seed, groups=3, group_size=4, length=4, dim=5, vocab=9):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(groups * group_size, length, dim, generator=generator, dtype=torch.float64)
    logits = 2 * torch.randn(groups * group_size, length, vocab, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, vocab, (groups * group_size, length), generator=generator)
    lengths = torch.randint(1, length + 1, (groups * group_size,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (groups, group_size), generator=generator).double()
    rewards[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rewards[1] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # as in worked reasoning, a wrong completion repeats a correct one's tokens (same ids, states, logits; only its
    # reward differs); with a single correct completion, the repeated tokens above its mean score are selected
    for group in (0, 1):
        right, wrong = group * group_size, group * group_size + 3
        mask[right], mask[wrong] = 1, 1
        for tensor in (hidden, logits, ids):
            tensor[wrong] = tensor[right]
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    return hidden, logits, ids, mask, rewards.flatten(), advantages.flatten()


@pytest.mark.parametrize("vocab", ["group", "full"])
@pytest.mark.parametrize(("beta", "eta"), [(1.0, "auto"), (1.0, 0.0), (0.1, "auto"), (0.0, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_token_weights_equal_the_papers_rule_as_a_loop(seed, beta, eta, vocab):
    hidden, logits, ids, mask, rewards, advantages = _group_batch(seed)
    weights = token_weights(hidden, logits, ids, mask, advantages, 4, beta=beta, eta=eta, vocab=vocab)
    expected = _paper_nthr_loop(hidden, logits, ids, mask, rewards, 4, beta, eta, vocab == "group")
    assert torch.equal(weights.double()[mask.bool()], expected[mask.bool()])
    # the test is not vacuous: some tokens are selected and some are not
    selected = (expected != 1)[mask.bool()]
    assert selected.any() and not selected.all()


def test_worked_example_by_hand():
    """One group, d = 1, vocabulary {0, 1}, uniform pi everywhere (logits 0). Correct completion: token 0 with h = 1.
    Wrong completion: token 0 with h = 2, then token 1 with h = 1. Prediction errors: (1/2, -1/2) for token 0,
    (-1/2, 1/2) for token 1, so alpha = 1/2 between equal tokens and -1/2 between different ones.
    s- = (1/2)(1)(2) = 1 for the wrong token 0 and (-1/2)(1)(1) = -1/2 for the wrong token 1;
    s+bar = (1/2)(1)(1) = 1/2, so tau = beta / 2; p = 1/2, eta = 2|0.5 - 0.5| = 0."""
    hidden = torch.tensor([[[1.0], [0.0]], [[2.0], [1.0]]], dtype=torch.float64)
    logits = torch.zeros(2, 2, 2, dtype=torch.float64)
    ids = torch.tensor([[0, 0], [0, 1]])
    mask = torch.tensor([[1, 0], [1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    weights, stats = token_weights(hidden, logits, ids, mask, advantages, 2, return_stats=True)
    assert weights.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert stats.tau == pytest.approx(0.5) and stats.eta == 0.0 and stats.s_neg_mean == pytest.approx(0.25)
    assert token_weights(hidden, logits, ids, mask, advantages, 2, beta=2.0).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    lower = token_weights(hidden, logits, ids, mask, advantages, 2, beta=0.0, eta=0.3)
    torch.testing.assert_close(lower, torch.tensor([[1.0, 1.0], [0.3, 1.0]]))
    # GWHES (Theorem 4.4): negative = |A| (1 - 1/2) = 1/2, positive = A * s+ = 1/2.
    scores = gwhes(hidden, mask, advantages, 2, logits=logits, completion_ids=ids)
    assert (scores.negative.item(), scores.positive.item(), scores.gwhes.item()) == pytest.approx((0.5, 0.5, 0.0))


def test_defaults_are_the_papers_main_setting():
    config = NTHRConfig()
    assert (config.beta, config.eta, config.vocab) == (1.0, "auto", "group")
    hidden, logits, ids, mask, rewards, advantages = _group_batch(3)
    default = token_weights(hidden, logits, ids, mask, advantages, 4)
    expected = _paper_nthr_loop(hidden, logits, ids, mask, rewards, 4, 1.0, "auto", True)
    assert torch.equal(default.double()[mask.bool()], expected[mask.bool()])
    assert not math.isclose(float(default.min()), 1.0)  # something was selected
