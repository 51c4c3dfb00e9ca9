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


# ------------------------------------------------------------------------------------------------------------------
# The paper's form (Theorem 4.4): alpha-weighted token pairs.
# ------------------------------------------------------------------------------------------------------------------


def _paper_loop(hidden, logits, ids, mask, rewards, group_size, columns_of_group=False):
    """Oracle, written from the paper: per correct response i, p- sum_k sum_{j wrong} sum_k' alpha <h_ik, h_jk'> -
    p+ sum_k sum_{i' correct} sum_k'' alpha <h_ik, h_i'k''>, with p+ = (1-p)/sqrt(p(1-p)), p- = p/sqrt(p(1-p)), p
    the success rate; then the mean over the group's correct responses. Plain loops, float64."""
    probs = torch.softmax(logits.double(), -1)
    out = []
    for start in range(0, hidden.shape[0], group_size):
        rows = list(range(start, start + group_size))
        correct = [i for i in rows if rewards[i] == 1]
        wrong = [j for j in rows if rewards[j] == 0]
        if not correct or not wrong:
            out.append((math.nan, math.nan, math.nan))
            continue
        if columns_of_group:
            columns = sorted({int(ids[r, t]) for r in rows for t in range(ids.shape[1]) if mask[r, t]})
        else:
            columns = list(range(probs.shape[-1]))
        p = len(correct) / group_size
        weight = {1: (1 - p) / math.sqrt(p * (1 - p)), 0: p / math.sqrt(p * (1 - p))}

        def error(r, t, columns=columns):
            e = [-float(probs[r, t, v]) for v in columns]
            e[columns.index(int(ids[r, t]))] += 1.0
            return e

        def pair(i, k, j, kk, error=error):
            alpha = sum(a * b for a, b in zip(error(i, k), error(j, kk), strict=True))
            return alpha * float(hidden[i, k].double() @ hidden[j, kk].double())

        negative = positive = 0.0
        for i in correct:
            for k in range(ids.shape[1]):
                if not mask[i, k]:
                    continue
                for j in rows:
                    for kk in range(ids.shape[1]):
                        if mask[j, kk]:
                            term = weight[int(rewards[j])] * pair(i, k, j, kk)
                            if rewards[j] == 0:
                                negative += term
                            else:
                                positive += term
        negative, positive = negative / len(correct), positive / len(correct)
        out.append((negative - positive, negative, positive))
    return torch.tensor(out, dtype=torch.float64)


def _paper_batch(seed, groups=3, group_size=4, length=4, dim=5, vocab=7):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(groups * group_size, length, dim, generator=generator, dtype=torch.float64)
    logits = 2 * torch.randn(groups * group_size, length, vocab, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, vocab, (groups * group_size, length), generator=generator)
    lengths = torch.randint(1, length + 1, (groups * group_size,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (groups, group_size), generator=generator).double()
    rewards[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rewards[1] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    rewards[-1] = 0.0  # an all-wrong group
    p = rewards.mean(1, keepdim=True)
    # Lemma 4.2's population weights as advantages: +(1-p)/sqrt(p(1-p)) and -p/sqrt(p(1-p)).
    scale = (p * (1 - p)).sqrt().clamp_min(1e-12)
    advantages = torch.where(rewards == 1, (1 - p) / scale, -p / scale)
    advantages[(p == 0).expand_as(rewards) | (p == 1).expand_as(rewards)] = 0.0
    return hidden, logits, ids, mask, rewards.flatten(), advantages.flatten()


@pytest.mark.parametrize("vocab", ["full", "group"])
@pytest.mark.parametrize("seed", [0, 1])
def test_paper_gwhes_matches_theorem_4_4_written_as_a_loop(seed, vocab):
    hidden, logits, ids, mask, rewards, advantages = _paper_batch(seed)
    scores = gwhes(hidden, mask, advantages, 4, logits=logits, completion_ids=ids, vocab=vocab)
    expected = _paper_loop(hidden, logits, ids, mask, rewards, 4, columns_of_group=vocab == "group")
    got = torch.stack([scores.gwhes, scores.negative, scores.positive], 1)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(scores.gwhes[-1])
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-9, atol=1e-9)


def test_paper_gwhes_with_a_head_equals_with_logits_and_group_vocab_differs_from_full():
    hidden, _, ids, mask, _, advantages = _paper_batch(2)
    head = torch.nn.Linear(hidden.shape[-1], 7, bias=False).double()
    with torch.no_grad():
        logits = head(hidden)
    by_tensor = gwhes(hidden, mask, advantages, 4, logits=logits, completion_ids=ids, vocab="full")
    by_head = gwhes(hidden, mask, advantages, 4, logits=head, completion_ids=ids, vocab="full")
    torch.testing.assert_close(by_head.gwhes, by_tensor.gwhes, equal_nan=True)
    restricted = gwhes(hidden, mask, advantages, 4, logits=logits, completion_ids=ids, vocab="group")
    finite = ~torch.isnan(by_tensor.gwhes)
    assert not torch.allclose(restricted.gwhes[finite], by_tensor.gwhes[finite])


def test_minus_paper_gwhes_is_the_linearised_change_from_a_step_on_the_unembedding():
    """The identity Theorem 4.4's hidden-embedding terms come from: one gradient step of size lr on the unembedding
    `W` only, for the loss -sum_j A_j sum_k' ln softmax(W h_jk')_{y_jk'} (token sums), changes sum_k ln pi(y_ik) of
    the correct completions by -lr * GWHES on average, to first order (computed here exactly with autograd)."""
    hidden, _, ids, mask, _, advantages = (t[:4] for t in _paper_batch(3))
    weight = torch.randn(7, hidden.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    weight.requires_grad_(True)

    def sequence_logprobs(w):
        logprobs = torch.log_softmax(hidden @ w.T, -1).gather(-1, ids[..., None])[..., 0]
        return (logprobs * mask).sum(1)

    loss = -(advantages * sequence_logprobs(weight)).sum()
    (grad,) = torch.autograd.grad(loss, weight)
    lr = 0.05
    changes = []
    for i in torch.nonzero(advantages > 0)[:, 0].tolist():
        (own,) = torch.autograd.grad(sequence_logprobs(weight)[i], weight)
        changes.append(float((own * (-lr * grad)).sum()))
    scores = gwhes(hidden, mask, advantages, 4, logits=hidden @ weight.detach().T, completion_ids=ids, vocab="full")
    assert sum(changes) / len(changes) == pytest.approx(-lr * scores.gwhes.item(), rel=1e-9)


def test_paper_gwhes_needs_completion_ids():
    hidden, logits, _, mask, _, advantages = _paper_batch(0)
    with pytest.raises(ValueError, match="completion_ids"):
        gwhes(hidden, mask, advantages, 4, logits=logits)
