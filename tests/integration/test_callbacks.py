"""LearningDynamicsCallback inside real SFT/DPO/GRPO trainers: records, non-interference, errors, resume, accuracy."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from tests import trainer_factory
from trl_ntk.demo import toy
from trl_ntk.integration.callbacks import LearningDynamicsCallback
from trl_ntk.probes.probe_set import ProbeSet


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "dynamics" / "dynamics.jsonl").read_text().splitlines()]


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _make(kind: str, output_dir: Path, **overrides):
    return getattr(trainer_factory, f"{kind}_trainer")(output_dir, **overrides)


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_each_trainer_writes_one_probe_record_per_probe_per_scoring_step(tmp_path, kind):
    overrides = {"per_device_train_batch_size": 8} if kind == "grpo" else {}
    trainer = _make(kind, tmp_path, max_steps=3, **overrides)
    callback = LearningDynamicsCallback(
        trainer, every_n_steps=2, attribution="sums", num_prompts=2, strict=True, max_new_tokens=8
    )
    trainer.add_callback(callback)
    trainer.train()
    records = _records(tmp_path)
    assert records[0]["type"] == "run" and records[0]["trainer"] == kind
    probe_ids = {p["probe_id"] for r in records if r["type"] == "probes" for p in r["probes"]}
    per_step = Counter((r["step"], r["probe_id"]) for r in records if r["type"] == "probe")
    assert {step for step, _ in per_step} == {0, 2, 3}
    assert set(per_step.values()) == {1}
    for step in (0, 2, 3):
        assert {pid for s, pid in per_step if s == step} <= probe_ids
        assert len([1 for s, _ in per_step if s == step]) >= 2 * (3 if kind != "dpo" else 8)
    dynamics = [r for r in records if r["type"] == "dynamics"]
    assert {r["step"] for r in dynamics} == {0, 2}
    for record in dynamics:
        assert record["gradient_check"]["cosine"] > 0.9999
        assert record["predicted"] == pytest.approx(record["predicted_current"] + record["history"], abs=1e-4)
    if kind == "grpo":
        assert all(r["type"] != "lld" or r["num_positive"] >= 1 for r in records)
    assert records[-1]["type"] == "status" and records[-1]["analysis_failures"] == 0


@pytest.mark.parametrize("level", ["none", "sums", "tokens"])
def test_dpo_training_losses_identical_with_and_without_callback(tmp_path, level):
    plain = _make("dpo", tmp_path / "plain", max_steps=3)
    plain.train()
    observed = _make("dpo", tmp_path / "observed", max_steps=3)
    observed.add_callback(
        LearningDynamicsCallback(
            observed, every_n_steps=1, attribution=level, num_prompts=2, strict=True, max_new_tokens=8
        )
    )
    observed.train()
    assert _losses(plain) == _losses(observed)
    for a, b in zip(plain.model.parameters(), observed.model.parameters()):
        assert torch.equal(a, b)


def test_sft_label_smoothing_training_identical_with_and_without_the_logit_capture(tmp_path):
    options = {"max_steps": 3, "label_smoothing_factor": 0.1, "gradient_accumulation_steps": 2}
    plain = _make("sft", tmp_path / "plain", **options)
    plain.train()
    observed = _make("sft", tmp_path / "observed", **options)
    observed.add_callback(
        LearningDynamicsCallback(
            observed, every_n_steps=1, attribution="tokens", num_prompts=2, strict=True, max_new_tokens=8
        )
    )
    observed.train()
    assert _losses(plain) == _losses(observed)
    for a, b in zip(plain.model.parameters(), observed.model.parameters()):
        assert torch.equal(a, b)


def test_grpo_training_losses_identical_with_and_without_callback(tmp_path):
    plain = _make("grpo", tmp_path / "plain", max_steps=2, per_device_train_batch_size=8)
    plain.train()
    observed = _make("grpo", tmp_path / "observed", max_steps=2, per_device_train_batch_size=8)
    observed.add_callback(
        LearningDynamicsCallback(
            observed, every_n_steps=1, attribution="sums", num_prompts=2, strict=True, max_new_tokens=8
        )
    )
    observed.train()
    assert _losses(plain) == _losses(observed)


def test_unknown_trainer_fails_before_training(tmp_path):
    model, tokenizer = toy.model_and_tokenizer()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="Trainer is not supported"):
        LearningDynamicsCallback(trainer)


def test_probe_longer_than_the_model_limit_fails_before_training(tmp_path):
    trainer = _make("dpo", tmp_path, max_steps=1)
    probes = ProbeSet()
    probes.add("long", "chosen", "word " * 400, prompt="Tell me a long story.")
    with pytest.raises(ValueError, match="long"):
        LearningDynamicsCallback(trainer, probes=probes)


def test_empty_probe_response_fails_before_training(tmp_path):
    trainer = _make("dpo", tmp_path, max_steps=1)
    probes = ProbeSet()
    probes.add("p0", "chosen", "", prompt="What colour is the sky?")
    with pytest.raises(ValueError, match="empty response"):
        LearningDynamicsCallback(trainer, probes=probes)


def test_resumed_run_continues_the_jsonl_exactly(tmp_path):
    def run(output_dir: Path, resume: bool) -> list[dict]:
        trainer = _make("dpo", output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        trainer.add_callback(
            LearningDynamicsCallback(
                trainer, every_n_steps=1, attribution="sums", num_prompts=2, strict=True, max_new_tokens=8
            )
        )
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-2") if resume else None)
        return _records(output_dir)

    full = run(tmp_path / "full", resume=False)
    interrupted = tmp_path / "interrupted"
    run(interrupted, resume=False)
    resumed = run(interrupted, resume=True)

    def key(r):
        return (r["type"], r["step"], r.get("probe_id"))

    content = [r for r in full if r["type"] in ("probe", "dynamics")]
    continued = [r for r in resumed if r["type"] in ("probe", "dynamics")]
    assert [key(r) for r in continued] == [key(r) for r in content]
    for a, b in zip(content, continued):
        if a["type"] == "probe":
            assert a["logp_sum"] == pytest.approx(b["logp_sum"], abs=1e-5)
    assert sum(r["type"] == "run" and r["resumed_from"] == 2 for r in resumed) == 1


def _attribution_run(tmp_path, optim: str, learning_rate: float):
    # float64 so that sums over many cancelling token attributions are compared at 1e-4, not at float32 round-off
    trainer = _make(
        "dpo",
        tmp_path,
        max_steps=1,
        optim=optim,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        dtype=torch.float64,
    )
    trainer.add_callback(
        LearningDynamicsCallback(
            trainer, every_n_steps=1, attribution="tokens", num_prompts=2, generate=False, strict=True
        )
    )
    trainer.train()
    return [r for r in _records(tmp_path) if r["type"] == "dynamics"]


def _scale(record: dict) -> float:
    """The size of the terms that cancel in a probe's change: float round-off is relative to this."""
    return abs(record["split"]["positive"]) + abs(record["split"]["negative"])


def _moving(dynamics: list[dict]) -> list[dict]:
    """Probes whose change is not dwarfed by second-order terms (at least 5% of the largest change)."""
    largest = max(abs(r["observed"]) for r in dynamics)
    return [r for r in dynamics if abs(r["observed"]) >= 0.05 * largest]


def test_sgd_token_attributions_sum_to_the_prediction_and_match_the_observed_change(tmp_path):
    dynamics = _attribution_run(tmp_path, "sgd", 1e-4)
    assert dynamics
    with_matrix = [r for r in dynamics if "matrix" in r]
    assert with_matrix and {r["prompt_id"] for r in with_matrix} == {dynamics[0]["prompt_id"]}  # matrix_prompts=1
    for record in dynamics:
        tolerance = 1e-4 * _scale(record)
        assert abs(record["attributed"] - record["predicted_current"]) <= tolerance  # per-response totals route
        if "matrix" in record:
            archive = np.load(tmp_path / "dynamics" / record["matrix"]["file"])
            matrix = archive[record["matrix"]["key"]]
            assert matrix.shape[0] == len(record["token_predicted"])
            assert abs(float(matrix.sum()) - record["predicted_current"]) <= tolerance
        assert abs(record["predicted_current"] - record["predicted_sgd"]) <= tolerance
        assert record["history"] == pytest.approx(0.0, abs=1e-12)
    moving = _moving(dynamics)
    assert len(moving) >= len(dynamics) // 2
    for record in moving:
        assert record["observed"] == pytest.approx(record["predicted"], rel=0.05)


def test_adamw_optimizer_aware_prediction_matches_the_observed_change(tmp_path):
    dynamics = _attribution_run(tmp_path, "adamw_torch", 1e-5)
    moving = _moving(dynamics)
    assert len(moving) >= len(dynamics) // 2
    for record in moving:
        assert record["observed"] == pytest.approx(record["predicted"], rel=0.05)
        assert record["predicted_sgd"] != pytest.approx(record["predicted"], rel=0.05)  # a different view


def test_sft_label_smoothing_prediction_adds_the_logit_residual_and_matches_the_observed_change(tmp_path):
    trainer = _make(
        "sft",
        tmp_path,
        max_steps=1,
        optim="sgd",
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        label_smoothing_factor=0.1,
        dtype=torch.float64,
    )
    trainer.add_callback(
        LearningDynamicsCallback(
            trainer, every_n_steps=1, attribution="tokens", num_prompts=2, generate=False, strict=True
        )
    )
    trainer.train()
    dynamics = [r for r in _records(tmp_path) if r["type"] == "dynamics"]
    assert dynamics
    for record in dynamics:
        assert record["gradient_check"]["cosine"] >= 0.99999
        tolerance = 1e-4 * (_scale(record) + abs(record["logit_residual"]))
        assert abs(sum(record["cells"].values()) + record["logit_residual"] - record["predicted_current"]) <= tolerance
        # the token attributions cover the trained tokens' log-probs; the residual is the rest of the prediction
        assert abs(record["attributed"] + record["logit_residual"] - record["predicted_current"]) <= tolerance
        assert abs(record["predicted_current"] - record["predicted_sgd"]) <= tolerance
    assert any(abs(r["logit_residual"]) > 1e-3 * _scale(r) for r in dynamics)
    moving = _moving(dynamics)
    assert len(moving) >= len(dynamics) // 2
    for record in moving:
        assert record["observed"] == pytest.approx(record["predicted"], rel=0.05)


def test_dpo_rejected_falls_and_its_fall_comes_from_the_negative_gradient(tmp_path):
    # the probes' prompts are all in the step's batch, as in the one-step picture of Ren and Sutherland's paper
    trainer = _make(
        "dpo",
        tmp_path,
        max_steps=1,
        optim="sgd",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        per_device_train_batch_size=8,
        n=8,
    )
    trainer.add_callback(
        LearningDynamicsCallback(
            trainer, every_n_steps=1, attribution="sums", num_prompts=8, generate=False, strict=True
        )
    )
    trainer.train()
    rejected = [r for r in _records(tmp_path) if r["type"] == "dynamics" and r["kind"] == "rejected"]
    assert rejected
    assert sum(r["observed"] for r in rejected) < 0
    assert sum(r["split"]["negative"] for r in rejected) < sum(r["split"]["positive"] for r in rejected)
    assert abs(sum(r["split"]["negative"] for r in rejected)) > abs(sum(r["split"]["positive"] for r in rejected))


def test_analysis_failure_is_one_warning_and_a_counter_not_a_crash(tmp_path, monkeypatch):
    from trl_ntk.analysis import dynamics

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(dynamics, "explain_update", broken)
    trainer = _make("dpo", tmp_path, max_steps=3)
    trainer.add_callback(
        LearningDynamicsCallback(trainer, every_n_steps=1, attribution="sums", num_prompts=2, generate=False)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert sum("injected failure" in str(w.message) for w in caught) == 3
    records = _records(tmp_path)
    status = records[-1]
    assert status["type"] == "status"
    assert status["analysis_failures"] == 3
    assert "injected failure" in status["message"]
    assert {r["step"] for r in records if r["type"] == "probe"} == {0, 1, 2, 3}
    with pytest.raises(RuntimeError, match="injected failure"):
        strict = _make("dpo", tmp_path / "strict", max_steps=1)
        strict.add_callback(
            LearningDynamicsCallback(strict, every_n_steps=1, num_prompts=2, generate=False, strict=True)
        )
        strict.train()


def test_nthr_records_reach_the_dynamics_jsonl(tmp_path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _make("grpo", tmp_path, max_steps=2, per_device_train_batch_size=8)
    trainer.add_callback(NTHRCallback(trainer))
    trainer.add_callback(
        LearningDynamicsCallback(
            trainer, every_n_steps=1, attribution="none", num_prompts=2, generate=False, strict=True
        )
    )
    trainer.train()
    nthr = [r for r in _records(tmp_path) if r["type"] == "nthr"]
    assert len(nthr) >= 1
    assert all(0.0 <= r["frac_downweighted"] <= 1.0 for r in nthr)


def _package_hooks(model: torch.nn.Module) -> list[tuple[str, str, object]]:
    """Every forward (pre-)hook on every module of `model` whose function comes from this package."""
    found = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks"):
            for hook in getattr(module, kind).values():
                if getattr(hook, "__module__", "").startswith("trl_ntk"):
                    found.append((name, kind, hook))
    return found


def test_training_end_removes_the_hooks_and_restores_compute_loss(tmp_path):
    trainer = _make("sft", tmp_path, max_steps=2)
    original = trainer.compute_loss
    callback = LearningDynamicsCallback(trainer, every_n_steps=1, num_prompts=1, generate=False, strict=True)
    assert _package_hooks(trainer.model) and trainer.compute_loss != original  # installed while training
    trainer.add_callback(callback)
    trainer.train()
    assert _package_hooks(trainer.model) == []
    assert "compute_loss" not in vars(trainer) and trainer.compute_loss == original
    assert trainer.compute_loss.__func__ is type(trainer).compute_loss

    # a second `train()` with the callback still attached installs it again and analyses again
    trainer.train()
    records = _records(tmp_path)
    assert sum(r["type"] == "run" for r in records) >= 1
    assert [r["step"] for r in records if r["type"] == "dynamics"][-1:] == [1]
    assert _package_hooks(trainer.model) == [] and trainer.compute_loss == original


def test_remove_is_idempotent_and_a_later_train_runs_as_without_the_callback(tmp_path):
    plain = _make("sft", tmp_path / "plain", max_steps=2)
    plain.train()
    plain_first = _losses(plain)
    plain.train()
    plain_second = _losses(plain)[len(plain_first) :]

    observed = _make("sft", tmp_path / "observed", max_steps=2)
    original = observed.compute_loss
    callback = LearningDynamicsCallback(observed, every_n_steps=1, num_prompts=1, generate=False, strict=True)
    observed.add_callback(callback)
    observed.train()
    assert _losses(observed) == plain_first
    callback.remove()
    callback.remove()
    assert _package_hooks(observed.model) == [] and observed.compute_loss == original
    jsonl = tmp_path / "observed" / "dynamics" / "dynamics.jsonl"
    written = jsonl.read_bytes()
    observed.train()
    assert _losses(observed)[len(plain_first) :] == plain_second
    assert jsonl.read_bytes() == written  # the removed callback wrote nothing
    for a, b in zip(plain.model.parameters(), observed.model.parameters()):
        assert torch.equal(a, b)
    assert _package_hooks(observed.model) == [] and observed.compute_loss == original


def test_remove_before_training_leaves_the_trainer_untouched(tmp_path):
    trainer = _make("sft", tmp_path, max_steps=1)
    original = trainer.compute_loss
    callback = LearningDynamicsCallback(trainer, every_n_steps=1, num_prompts=1, generate=False)
    callback.remove()
    trainer.add_callback(callback)
    trainer.train()
    assert _package_hooks(trainer.model) == [] and trainer.compute_loss == original
    assert not (tmp_path / "dynamics" / "dynamics.jsonl").exists()


@pytest.mark.parametrize(("matrix_every_n_steps", "matrix_steps"), [(2, {0, 2}), (None, {0, 1, 2})])
def test_the_token_matrix_runs_at_the_first_tokens_step_and_its_multiples(tmp_path, matrix_every_n_steps, matrix_steps):
    trainer = _make("dpo", tmp_path, max_steps=3)
    trainer.add_callback(
        LearningDynamicsCallback(
            trainer,
            every_n_steps=1,
            attribution="tokens",
            num_prompts=2,
            generate=False,
            strict=True,
            matrix_every_n_steps=matrix_every_n_steps,
        )
    )
    trainer.train()
    dynamics = [r for r in _records(tmp_path) if r["type"] == "dynamics"]
    assert {r["step"] for r in dynamics} == {0, 1, 2}
    assert {r["step"] for r in dynamics if "matrix" in r} == matrix_steps
    for record in dynamics:  # every tokens-level step keeps every response's per-training-token totals
        assert record["top_up"] and abs(record["attributed"] - record["predicted_current"]) <= 1e-3 * (
            abs(record["split"]["positive"]) + abs(record["split"]["negative"]) + 1e-6
        )
