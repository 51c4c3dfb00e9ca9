"""LookaheadCallback: training is identical with and without it, its scores are those of a fresh look-ahead at the
same weights and optimizer state, and its drift figures match independent rank statistics."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tests.trainer_factory import dpo_trainer
from trl_ntk.analysis import lookahead
from trl_ntk.integration import lookahead_callback as driver
from trl_ntk.integration.lookahead import score_trainer
from trl_ntk.integration.lookahead_callback import LookaheadCallback
from trl_ntk.output.schema import read_records

_TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time")


def _trainer(tmp_path, **overrides):
    args = {"optim": "adamw_torch", "learning_rate": 1e-3, "per_device_train_batch_size": 2, "max_steps": 4}
    args["lr_scheduler_type"] = "constant"  # a linear decay would score the last step at lr 0
    return dpo_trainer(tmp_path, n=12, dtype=torch.float64, **{**args, **overrides})


def _history(trainer) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in _TIMING} for entry in trainer.state.log_history]


def test_training_is_identical_with_the_callback_and_records_are_written(tmp_path):
    plain = _trainer(tmp_path / "plain")
    plain.train()
    watched = _trainer(tmp_path / "watched")
    callback = LookaheadCallback(watched, every_n_steps=2, sample_size=8, top_k=3, strict=True)
    watched.add_callback(callback)
    watched.train()
    assert _history(watched) == _history(plain)  # losses and every logged DPO metric, bit for bit
    for (name, p), q in zip(plain.model.named_parameters(), watched.model.parameters()):
        assert torch.equal(p, q), name
    records = read_records(tmp_path / "watched" / "lookahead" / "dynamics.jsonl", types=["lookahead"])
    assert [r["step"] for r in records] == [0, 2, 4]
    assert [r["view"] for r in records] == ["sgd", "adam", "adam"]  # AdamW has no state before its first step
    assert all(v is None for v in records[0]["spearman"].values())
    assert all(-1 <= v <= 1 for v in records[2]["spearman"].values())  # adam view at step 4 against step 2
    for record in records:
        assert record["num_examples"] == 8 and record["optimizer_step"] in (None, record["step"])
        for name in record["objectives"]:
            harmful = record["top_harmful"][name]
            assert len(harmful) == 3 and [h["effect"] for h in harmful] == sorted(h["effect"] for h in harmful)
            assert set(h["index"] for h in harmful) <= set(callback.rows)
            assert record["quantiles"][name][0] == pytest.approx(harmful[0]["effect"])
            assert record["quantiles"][name][0] < record["quantiles"][name][-1]


def test_scores_are_a_fresh_lookahead_at_the_current_weights_and_optimizer_state(tmp_path):
    watched = _trainer(tmp_path / "watched", max_steps=2)
    callback = LookaheadCallback(watched, every_n_steps=2, sample_size=6, strict=True)
    watched.add_callback(callback)
    watched.train()
    fresh = _trainer(tmp_path / "fresh", max_steps=2)
    fresh.train()
    reference = score_trainer(fresh, callback.probes, view="adam", rows=callback.rows)
    assert callback.previous.meta["view"] == "adam" and callback.previous.indices == callback.rows
    assert reference.effects.total.abs().min() > 0
    torch.testing.assert_close(callback.previous.effects.total, reference.effects.total, rtol=1e-9, atol=0)


def test_drift_statistics_match_scipy_and_a_hand_count():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    b = a + 0.5 * b
    assert lookahead.spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    x = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0])
    y = torch.tensor([-3.0, 5.0, -1.0, -2.0, 1.0])  # most harmful two: {0, 1} vs {0, 3}
    assert lookahead.top_k_overlap(x, y, 2) == 0.5 and lookahead.top_k_overlap(x, y, 5) == 1.0


def test_a_failing_scoring_is_counted_and_training_goes_on(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=2)
    callback = LookaheadCallback(trainer, every_n_steps=1, sample_size=2)
    trainer.add_callback(callback)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(driver, "score_trainer", broken)
    with pytest.warns(UserWarning, match="look-ahead scoring failed"):
        trainer.train()
    assert trainer.state.global_step == 2 and callback.failures == 3


def _grpo(tmp_path, noisy: bool = True, **overrides):
    from tests.trainer_factory import grpo_trainer

    args = {"optim": "adamw_torch", "learning_rate": 1e-5, "lr_scheduler_type": "constant", "max_steps": 2}
    args.update({"num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 12})
    trainer = grpo_trainer(tmp_path, n=6, **{**args, **overrides})
    trainer.model.to(torch.float64)
    if noisy:
        trainer.reward_funcs = [_noisy_math_reward]  # rewards that draw from Python's and numpy's RNG too
    return trainer


def _noisy_math_reward(**kwargs):
    from trl_ntk.demo import toy

    exact = toy.math_reward(**kwargs)
    return [r + 0.1 * random.random() + 0.1 * float(np.random.rand()) for r in exact]


def test_grpo_is_served_and_its_training_is_identical_with_the_callback(tmp_path):
    """Scoring samples groups with the trainer's own generation between steps; the RNGs, logs and buffers it touches
    are restored, so losses, rewards, completions and weights are bit-identical to training without it."""
    plain = _grpo(tmp_path / "plain")
    plain.train()
    watched = _grpo(tmp_path / "watched")
    callback = LookaheadCallback(watched, every_n_steps=1, sample_size=4, top_k=2, strict=True, num_generations=4)
    watched.add_callback(callback)
    watched.train()
    assert _history(watched) == _history(plain)  # loss, reward, completion lengths, ... bit for bit
    assert list(watched._logs["completion"]) == list(plain._logs["completion"])
    for (name, p), q in zip(plain.model.named_parameters(), watched.model.parameters()):
        assert torch.equal(p, q), name
    records = read_records(tmp_path / "watched" / "lookahead" / "dynamics.jsonl", types=["lookahead"])
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["view"] for r in records] == ["sgd", "adam", "adam"]
    for record in records:
        assert record["num_examples"] == 4 and record["num_generations"] == 4 and record["seed"] == 0
        assert "Monte-Carlo" in record["estimate"] and "G=4" in record["estimate"]
        for name in record["objectives"]:
            assert record["quantiles"][name][-1] - record["quantiles"][name][0] > 0  # four prompts, real scores
    assert all(-1 <= v <= 1 for v in records[2]["spearman"].values())


def test_grpo_scores_are_a_fresh_lookahead_at_the_current_weights(tmp_path):
    watched = _grpo(tmp_path / "watched", noisy=False, max_steps=1)
    callback = LookaheadCallback(watched, every_n_steps=1, sample_size=3, strict=True)
    watched.add_callback(callback)
    watched.train()
    fresh = _grpo(tmp_path / "fresh", noisy=False, max_steps=1)
    fresh.train()
    reference = score_trainer(fresh, callback.probes, view="adam", rows=callback.rows, seed=0)
    assert callback.previous.indices == callback.rows and len(callback.rows) == 3
    assert reference.effects.total.abs().max() > 0
    torch.testing.assert_close(callback.previous.effects.total, reference.effects.total, rtol=1e-9, atol=0)
    assert [t["completions"] for t in callback.previous.texts] == [t["completions"] for t in reference.texts]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"entropy_coef": 0.01}, "entropy bonus"), ({"num_generations": 1}, "at least 2 completions")],
    ids=["entropy-bonus", "one-completion"],
)
def test_unsupported_grpo_configurations_are_refused_before_training(tmp_path, overrides, message):
    from tests.trainer_factory import grpo_trainer

    options = {k: overrides.pop(k) for k in list(overrides) if k == "num_generations"}
    trainer = grpo_trainer(tmp_path, n=2, **overrides)
    with pytest.raises(ValueError, match=f"LookaheadCallback cannot follow this GRPOTrainer: .*{message}"):
        LookaheadCallback(trainer, every_n_steps=1, **options)
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("use_vllm", True, "use_vllm=True"),
        ("rollout_func", lambda *args, **kwargs: None, "rollout_func"),
        ("environment_factories", [object], "tool environments"),
    ],
    ids=["vllm", "rollout_func", "environments"],
)
def test_grpo_generation_it_cannot_reproduce_is_refused_before_training(tmp_path, attribute, value, message):
    from tests.trainer_factory import grpo_trainer

    trainer = grpo_trainer(tmp_path, n=2)
    LookaheadCallback(trainer, every_n_steps=1)  # the plain trainer is served
    setattr(trainer, attribute, value)
    with pytest.raises(ValueError, match=f"LookaheadCallback cannot follow this GRPOTrainer: .*{message}"):
        LookaheadCallback(trainer, every_n_steps=1)
