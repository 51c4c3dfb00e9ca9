"""Default probes: GRPO prompt-only datasets track the model's own responses; a generation failure keeps the fixed
probes of its step."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from tests import trainer_factory
from trl_ntk.demo import toy
from trl_ntk.integration import callbacks
from trl_ntk.integration.callbacks import LearningDynamicsCallback
from trl_ntk.probes.datasets import default_probes
from trl_ntk.probes.encoding import encode_tracked
from trl_ntk.probes.probe_set import ProbeSet


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "dynamics" / "dynamics.jsonl").read_text().splitlines()]


def _prompt_only(n: int = 16):
    return toy.math_dataset(n=n, seed=0).select_columns(["prompt", "answer"])


def test_prompt_only_dataset_gives_prompts_to_generate_for():
    _, tokenizer = toy.model_and_tokenizer(warmup=False)
    probes = default_probes(_prompt_only(), tokenizer, preference=False, num_prompts=3, seed=0, generate=True)
    assert len(probes.prompts()) == 3 and len(probes) == 0


def test_prompt_only_dataset_without_generation_is_refused_with_the_remedy():
    _, tokenizer = toy.model_and_tokenizer(warmup=False)
    with pytest.raises(ValueError, match="keep generate=True"):
        default_probes(_prompt_only(), tokenizer, preference=False, num_prompts=3, seed=0, generate=False)


def test_reference_column_adds_fixed_completion_probes():
    _, tokenizer = toy.model_and_tokenizer(warmup=False)
    data = toy.math_dataset(n=16, seed=0)  # has a 'solution' column
    probes = default_probes(data, tokenizer, preference=False, num_prompts=2, seed=0, generate=True)
    assert "completion" in probes.kinds and len(probes.prompts()) == 2


def test_encode_tracked_needs_responses_or_prompts_with_generation():
    model, tokenizer = toy.model_and_tokenizer(warmup=False)
    only_prompts = ProbeSet()
    only_prompts.add_prompt("p0", "Add 2 and 3.")
    assert encode_tracked(only_prompts, tokenizer, model, max_length=None, generate=True) is None
    with pytest.raises(ValueError, match="generate=False"):
        encode_tracked(only_prompts, tokenizer, model, max_length=None, generate=False)
    with pytest.raises(ValueError, match="no prompts"):
        encode_tracked(ProbeSet(), tokenizer, model, max_length=None, generate=True)


def test_readme_one_liner_works_on_a_grpo_prompt_only_dataset(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    args = GRPOConfig(
        **trainer_factory._common(tmp_path, max_steps=2, per_device_train_batch_size=8),
        num_generations=4,
        max_completion_length=12,
    )
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=_prompt_only(), processing_class=tokenizer, reward_funcs=toy.math_reward
    )
    trainer.add_callback(LearningDynamicsCallback(trainer))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "learning-dynamics" in str(w.message)]  # an analysis failure warns
    records = _records(tmp_path)
    greedy = [r for r in records if r["type"] == "probe"]
    assert {r["kind"] for r in greedy} == {"greedy"}
    assert {r["step"] for r in greedy} == {0, 2}
    assert Counter(r["step"] for r in greedy)[0] == 4  # one greedy response per default prompt
    assert any(r["type"] == "dynamics" and r["step"] == 0 for r in records)
    assert records[-1]["type"] == "status" and records[-1]["analysis_failures"] == 0


def test_generation_failure_keeps_the_fixed_probes_of_its_step(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected generation failure")

    monkeypatch.setattr(callbacks, "sample_responses", broken)
    trainer = trainer_factory.sft_trainer(tmp_path, max_steps=2)
    callback = LearningDynamicsCallback(trainer, every_n_steps=1, num_prompts=2)
    trainer.add_callback(callback)
    with pytest.warns(UserWarning, match="probe generation failed"):
        trainer.train()
    records = _records(tmp_path)
    fixed = {r["probe_id"] for r in records if r["type"] == "probes" for r in r["probes"]}
    per_step = Counter(r["step"] for r in records if r["type"] == "probe")
    assert set(per_step) == {0, 1, 2} and set(per_step.values()) == {len(fixed)}
    assert {r["step"] for r in records if r["type"] == "dynamics"} == {0, 1}
    status = records[-1]
    assert status["type"] == "status" and status["analysis_failures"] == 3
    assert "injected generation failure" in status["message"]


def test_generation_failure_raises_in_strict_mode(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected generation failure")

    monkeypatch.setattr(callbacks, "sample_responses", broken)
    trainer = trainer_factory.sft_trainer(tmp_path, max_steps=1)
    trainer.add_callback(LearningDynamicsCallback(trainer, every_n_steps=1, num_prompts=1, strict=True))
    with pytest.raises(RuntimeError, match="injected generation failure"):
        trainer.train()


@pytest.mark.parametrize("name", ["probes.json", "probes.jsonl"])
def test_probe_file_round_trip_and_hand_written_rows(tmp_path, name):
    probes = ProbeSet()
    probes.add("q0", "mine", "Five.", prompt="Add 2 and 3.")
    probes.add("q1", "chat", [{"role": "assistant", "content": "Six."}], prompt=[{"role": "user", "content": "3+3?"}])
    probes.save(tmp_path / name)
    loaded = ProbeSet.from_file(tmp_path / name)
    assert loaded.to_dicts() == probes.to_dicts()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"probe_id": "a", "prompt": "x", "response": "y"}]))
    with pytest.raises(ValueError, match="lacks the fields"):
        ProbeSet.from_file(bad)
