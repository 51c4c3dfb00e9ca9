"""The worked-arithmetic GRPO task: solutions, reward, data properties, and the warm model's mixed groups."""

from __future__ import annotations

import random

import pytest
import torch

from trl_ntk.demo import reasoning


@pytest.fixture(scope="module")
def warm():
    """The warm reasoning model and tokenizer from the default cache (built once per machine, then loaded)."""
    return reasoning.model_and_tokenizer()


# ---- solutions and reward ------------------------------------------------------------------------------------------


def test_a_clean_solution_shows_correct_steps_in_some_order():
    rng = random.Random(0)
    orders = set()
    for _ in range(40):
        solution = reasoning.solve([7, 9, 8], rng)
        steps = reasoning.steps_of(solution.text)
        assert len(steps) == 2 and all(a + b == c for a, b, c in steps)
        assert steps[1][0] == steps[0][2]  # the second step starts from the first result
        assert sorted([steps[0][0], steps[0][1], steps[1][1]]) == [7, 8, 9]
        assert solution.correct and solution.answer == 24 and solution.slips == 0
        assert solution.text.endswith(". Answer 24")
        orders.add(solution.text)
    assert len(orders) >= 4  # correct completions vary


def test_a_slip_carries_on_from_the_slipped_value():
    rng = random.Random(1)
    slipped = [s for s in (reasoning.solve([7, 9, 8], rng, slip_prob=0.5) for _ in range(200)) if s.slips]
    assert slipped
    for solution in slipped:
        steps = reasoning.steps_of(solution.text)
        assert sum(a + b != c for a, b, c in steps) == solution.slips
        assert all(abs(c - a - b) in (0, 1, 2) for a, b, c in steps)
        assert steps[1][0] == steps[0][2]
        assert solution.answer == steps[-1][2] and solution.correct == (solution.answer == 24)
    assert not all(s.correct for s in slipped)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" 9+7=16, 16+8=24. Answer 24", 1.0),
        (" 7+8=15, 15+9=24. Answer 24", 1.0),  # another order, still right
        (" 9+7=17, 17+8=25. Answer 25", 0.0),  # a slip carried on
        (" 9+7=17, 17+8=23. Answer 24", 1.0),  # two slips that cancel: the outcome is what counts
        (" 9+7=16, 16+8=24. Answer 2", 0.0),
        (" 9+7=16, 16+8=24.", 0.0),  # malformed: no answer
        (" 24", 0.0),  # malformed: a bare number is not an answer
        ("", 0.0),
        (" Answer 20. Answer 24", 1.0),  # the last answer counts
    ],
)
def test_reward_by_hand(completion, expected):
    assert reasoning.reasoning_reward(["Q: 7+9+8\nA:"], [completion], [24]) == [expected]


def test_reward_accepts_message_lists_and_checks_lengths():
    messages = [[{"role": "assistant", "content": " 1+2=3, 3+3=6. Answer 6"}]]
    assert reasoning.reasoning_reward([None], messages, [6]) == [1.0]
    with pytest.raises(ValueError, match="answers"):
        reasoning.reasoning_reward([None, None], ["a", "b"], [1])


# ---- data ----------------------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_consistent():
    data = reasoning.reasoning_dataset(n=50, seed=3)
    assert data.to_list() == reasoning.reasoning_dataset(n=50, seed=3).to_list()
    assert data.to_list() != reasoning.reasoning_dataset(n=50, seed=4).to_list()
    for row in data:
        assert row["prompt"] == "Q: {}+{}+{}\nA:".format(*row["operands"])
        assert all(1 <= o <= reasoning.MAX_OPERAND for o in row["operands"])
        assert row["answer"] == sum(row["operands"])
        assert reasoning.reasoning_reward([row["prompt"]], [row["solution"]], [row["answer"]]) == [1.0]


def test_shared_token_fraction_by_hand():
    assert reasoning.shared_token_fraction([1, 2, 3, 4], [[1, 2, 0, 4], [9, 9]]) == 0.75
    assert reasoning.shared_token_fraction([1, 2], [[1]]) == 0.5
    assert reasoning.shared_token_fraction([1, 2], []) == 0.0


def test_wrong_solutions_share_most_tokens_with_right_ones(warm):
    """Data property the task is built for: a wrong worked solution shares most of its tokens (same position) with
    some right solution of the same prompt, and right solutions differ among themselves."""
    _, tokenizer = warm
    rng = random.Random(7)
    shares, distinct = [], []
    for _ in range(30):
        operands = [rng.randint(1, 9) for _ in range(3)]
        samples = [reasoning.solve(operands, rng, slip_prob=0.3) for _ in range(16)]
        right = [tokenizer(s.text)["input_ids"] for s in samples if s.correct]
        wrong = [tokenizer(s.text)["input_ids"] for s in samples if not s.correct]
        shares += [reasoning.shared_token_fraction(w, right) for w in wrong]
        distinct.append(len({tuple(r) for r in right}))
    assert len(shares) > 50
    mean_share = sum(shares) / len(shares)
    assert 0.6 <= mean_share < 1.0
    assert sum(d >= 2 for d in distinct) / len(distinct) > 0.8


# ---- warm model ----------------------------------------------------------------------------------------------------


def test_warm_model_samples_mixed_groups_in_the_task_format(warm):
    model, tokenizer = warm
    data = reasoning.reasoning_dataset(n=12, seed=11)
    prompts = [p for p in data["prompt"] for _ in range(8)]
    answers = [a for a in data["answer"] for _ in range(8)]
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = reasoning.reasoning_reward(prompts, completions, answers)
    groups = [sum(rewards[i : i + 8]) for i in range(0, len(rewards), 8)]
    assert 0.2 <= sum(rewards) / len(rewards) <= 0.7
    assert sum(0 < g < 8 for g in groups) >= 8  # of 12
    assert sum(reasoning.final_answer(c) is not None for c in completions) / len(completions) > 0.9
    assert sum(len(reasoning.steps_of(c)) == 2 for c in completions) / len(completions) > 0.9
