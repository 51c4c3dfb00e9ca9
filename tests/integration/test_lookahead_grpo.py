"""GRPO look-ahead against independent references: the trainer's own `.grad` on the same sampled group with autograd
probe gradients (float64, several loss types), and the observed change of the probe log-probs after really taking one
SGD step on each prompt's sampled group."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tests.trainer_factory import grpo_trainer
from trl_ntk.analysis import lookahead
from trl_ntk.integration import lookahead_grpo
from trl_ntk.integration.lookahead import _default_probes, score_trainer

KINDS = ["completion", "irrelevant_train"]


def _trainer(tmp_path, n: int, **overrides):
    args = {"num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 20, **overrides}
    trainer = grpo_trainer(tmp_path, n=n, **args)
    trainer.model.to(torch.float64)
    return trainer


def _probes(trainer):
    probes = _default_probes(trainer, "grpo").select(KINDS)
    encoded = probes.encode(trainer.processing_class)
    names, weights = lookahead.probe_weights(encoded, by="kind")
    return probes, encoded.batch, names, weights


def _probe_objectives(model, batch, weights) -> torch.Tensor:
    """`[R]` `weights @ lp~` from the model's own logits (no package code)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logprobs = torch.log_softmax(logits.double(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return weights.to(logprobs) @ logprobs[batch.target_mask[:, 1:]]


def _group(trainer, row: int, seed: int = 0) -> dict:
    """The same sampled group the look-ahead steps on (same seed, same weights, eval mode)."""
    trainer.model.eval()
    size = trainer.num_generations
    with lookahead_grpo.scoring_mode(trainer, size):
        return lookahead_grpo.sample_groups(trainer, [row], size, lookahead_grpo.group_seed(seed, [row]))


def _group_grad(trainer, inputs) -> dict[str, torch.Tensor]:
    """The trainer's own `.grad` of its loss on the group alone."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    with lookahead_grpo.scoring_mode(trainer, trainer.num_generations):
        trainer.compute_loss(model, inputs).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # dapo, scale_rewards="group"
        {"loss_type": "grpo", "scale_rewards": "batch"},
        {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.04},
        {"loss_type": "cispo"},
        {"loss_type": "sapo", "temperature": 0.7},
    ],
    ids=["dapo", "grpo-batch", "dr_grpo-beta", "cispo", "sapo-T0.7"],
)
def test_grpo_effects_match_the_trainer_grad_on_the_same_group_float64(tmp_path, overrides):
    trainer = _trainer(tmp_path, n=4, **overrides)
    model = trainer.model
    probes, probe_batch, names, weights = _probes(trainer)
    lr = 1e-3
    result = score_trainer(trainer, probes, lr=lr, jvp_rows=3)
    assert result.effects.names == names and result.meta["trainer"] == "grpo"
    assert result.meta["num_generations"] == 4 and "Monte-Carlo" in result.meta["estimate"]
    assert result.meta["loss_type"] == trainer.loss_type
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    objectives = _probe_objectives(model, probe_batch, weights)
    probe_grads = [
        dict(zip(named, torch.autograd.grad(o, list(named.values()), retain_graph=True))) for o in objectives
    ]
    nonzero = 0
    for row in range(4):
        inputs = _group(trainer, row)
        advantages = [f"{float(a):+.2f}" for a in inputs["advantages"]]
        assert result.texts[row]["advantages"] == " ".join(advantages)
        grads = _group_grad(trainer, inputs)
        for col in range(len(names)):
            expected = -lr * sum(float((grads[n] * probe_grads[col][n]).sum()) for n in grads)
            got = float(result.effects.total[row, col])
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-12), (names[col], row)
            nonzero += abs(expected) > 1e-9
    assert nonzero > 0
    torch.testing.assert_close(result.effects.positive + result.effects.negative, result.effects.total)


def test_grpo_sgd_prediction_matches_the_real_step_on_each_prompts_group(tmp_path):
    """One SGD step (lr 1e-5) on each of 24 prompts' sampled group of 8: Spearman >= 0.9 against the observed change,
    and 10% relative error on the prompts whose effect is above 10% of the largest."""
    n, lr = 24, 1e-5
    trainer = _trainer(tmp_path, n=n, num_generations=8, per_device_train_batch_size=8)
    model = trainer.model
    probes, probe_batch, names, weights = _probes(trainer)
    result = score_trainer(trainer, probes, lr=lr)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        before = _probe_objectives(model, probe_batch, weights)
    observed = []
    for row in range(n):
        grads = _group_grad(trainer, _group(trainer, row))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in grads:
                    p -= lr * grads[name]
            observed.append(_probe_objectives(model, probe_batch, weights) - before)
            for name, p in model.named_parameters():
                p.copy_(saved[name])
    observed = torch.stack(observed)
    for col, name in enumerate(names):
        pred, obs = result.effects.total[:, col], observed[:, col]
        assert spearmanr(pred.numpy(), obs.numpy()).statistic >= 0.9, name
        large = obs.abs() >= 0.1 * obs.abs().max()
        assert int(large.sum()) >= 10, name
        relative = ((pred - obs).abs() / obs.abs())[large]
        assert relative.max() <= 0.1, (name, float(relative.max()))


def test_grpo_scoring_is_seeded_and_leaves_the_trainer_untouched(tmp_path):
    trainer = _trainer(tmp_path, n=3)
    probes = _default_probes(trainer, "grpo").select(KINDS)
    torch.manual_seed(123)
    state, python_state, numpy_state = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    metrics, logs, group = repr(trainer._metrics), repr(trainer._logs), trainer.num_generations_eval
    first = score_trainer(trainer, probes, lr=1e-3, rows=[2, 0])
    assert torch.equal(torch.random.get_rng_state(), state) and random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))
    assert repr(trainer._metrics) == metrics and repr(trainer._logs) == logs
    assert trainer.num_generations_eval == group
    again = score_trainer(trainer, probes, lr=1e-3, rows=[0, 2])
    torch.testing.assert_close(first.effects.total[[1, 0]], again.effects.total, rtol=0, atol=0)
    assert first.texts[0]["completions"] == again.texts[1]["completions"]
    other = score_trainer(trainer, probes, lr=1e-3, rows=[0, 2], seed=1)
    assert other.texts[0]["completions"] != again.texts[0]["completions"] or not torch.equal(
        other.effects.total, again.effects.total
    )


def test_a_reward_drawing_from_python_and_numpy_rngs_gets_the_same_group_whatever_their_state(tmp_path):
    """The group's rewards come from the seeded RNGs, not from the global state at scoring time."""

    def noisy_reward(completions, **kwargs):
        return [float(random.random() < 0.5) + float(np.random.rand()) for _ in completions]

    trainer = _trainer(tmp_path, n=2)
    trainer.reward_funcs[0] = noisy_reward
    probes = _default_probes(trainer, "grpo").select(KINDS)
    random.seed(1), np.random.seed(1)
    first = score_trainer(trainer, probes, lr=1e-3, rows=[0])
    random.seed(2), np.random.seed(2)
    again = score_trainer(trainer, probes, lr=1e-3, rows=[0])
    assert first.texts[0]["advantages"] == again.texts[0]["advantages"]
    torch.testing.assert_close(first.effects.total, again.effects.total, rtol=0, atol=0)


def test_grpo_configurations_it_cannot_predict_are_refused(tmp_path):
    trainer = grpo_trainer(tmp_path, n=2, entropy_coef=0.01)
    with pytest.raises(ValueError, match="entropy bonus"):
        score_trainer(trainer)
    trainer = grpo_trainer(tmp_path, n=2)
    with pytest.raises(ValueError, match="at least 2 completions"):
        score_trainer(trainer, num_generations=1)


def test_cli_scores_grpo_prompts_on_the_toy(tmp_path):
    from trl_ntk.cli import main

    args = ["lookahead", "--trainer", "grpo", "-o", str(tmp_path), "--max-examples", "3", "--num-generations", "4"]
    assert main(args) == 0
    lines = [json.loads(line) for line in (tmp_path / "lookahead.jsonl").read_text().splitlines()]
    assert lines[0]["trainer"] == "grpo" and lines[0]["num_generations"] == 4 and lines[0]["seed"] == 0
    assert "Monte-Carlo" in lines[0]["estimate"]
    assert [r["index"] for r in lines[1:]] == [0, 1, 2]
    assert all(len(r["text"]["advantages"].split()) == 4 for r in lines[1:])
    assert "Monte-Carlo" in (tmp_path / "lookahead.html").read_text()


def test_grpo_exact_adam_view_matches_real_adamw_steps_on_each_group(tmp_path):
    """From an AdamW state after 2 real GRPO steps: the `adam_exact` effect of each prompt's group against the real
    AdamW step on that group (minus the step without it). Measured: Spearman 1.0, relative errors 2-17% but 80% on one
    prompt (first order in the probe only; an Adam step on one group is not small). The `adam` tangent ranks these
    steps poorly this early (Spearman 0.37): a group's own `g^2` dominates Adam's second moment."""
    import copy

    trainer = _trainer(
        tmp_path, n=8, optim="adamw_torch", learning_rate=1e-5, lr_scheduler_type="constant", max_steps=2
    )
    trainer.train()
    model, optimizer = trainer.model.eval(), trainer.optimizer.optimizer
    probes, probe_batch, names, weights = _probes(trainer)
    rows = [0, 1, 2, 3, 4, 5]
    exact = score_trainer(trainer, probes, view="adam_exact", rows=rows)
    assert exact.meta["optimizer_step"] == 2 and "Monte-Carlo" in exact.meta["estimate"]
    state, saved = copy.deepcopy(optimizer.state_dict()), {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = _probe_objectives(model, probe_batch, weights)

    def step(grads) -> torch.Tensor:
        for name, p in model.named_parameters():
            p.grad = grads[name] if name in grads else torch.zeros_like(p)
        optimizer.step()
        with torch.no_grad():
            change = _probe_objectives(model, probe_batch, weights) - before
            for name, p in model.named_parameters():
                p.copy_(saved[name])
        optimizer.load_state_dict(copy.deepcopy(state))
        return change

    history = step({})
    observed = torch.stack([step(_group_grad(trainer, _group(trainer, row))) - history for row in rows])
    for col in range(len(names)):
        obs = observed[:, col].numpy()
        rho_exact = spearmanr(exact.effects.total[:, col].numpy(), obs).statistic
        large = observed[:, col].abs() >= 0.1 * observed[:, col].abs().max()
        relative = ((exact.effects.total[:, col] - observed[:, col]).abs() / observed[:, col].abs())[large]
        assert rho_exact >= 0.9 and int(large.sum()) >= 3 and relative.median() <= 0.2, (
            names[col],
            rho_exact,
            relative,
        )
