"""LearningDynamicsCallback on PEFT LoRA training: kernels over the adapter only, reference forwards not captured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import trainer_factory
from trl_ntk.demo import toy
from trl_ntk.integration import capture
from trl_ntk.integration.callbacks import LearningDynamicsCallback
from trl_ntk.ntk import logprobs

peft = pytest.importorskip("peft")


def _lora_dpo_trainer(output_dir: Path, **overrides):
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)  # the adapter's initialisation
    model, tokenizer = toy.model_and_tokenizer()
    config = DPOConfig(**trainer_factory._common(output_dir, **overrides), max_length=128, beta=0.1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return DPOTrainer(
        model=model,
        args=config,
        train_dataset=toy.preference_dataset(n=16, seed=0),
        processing_class=tokenizer,
        peft_config=lora,
    )


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "dynamics" / "dynamics.jsonl").read_text().splitlines()]


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _scale(record: dict) -> float:
    return abs(record["split"]["positive"]) + abs(record["split"]["negative"])


def test_lora_dpo_kernel_is_over_the_adapter_only_and_reconstructs_its_gradient(tmp_path, monkeypatch):
    trainer = _lora_dpo_trainer(tmp_path, max_steps=2, per_device_train_batch_size=2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, peft.PeftModel)
    lora_names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_A" in name or "lora_B" in name for name in lora_names)

    selections = []
    real_select_params = logprobs.select_params

    def select_params(model, params=None):
        chosen = real_select_params(model, params)
        selections.append(set(chosen))
        return chosen

    monkeypatch.setattr(logprobs, "select_params", select_params)  # every evaluation point of the kernels

    captured = []
    real_disarm = capture.GradientCapture.disarm

    def disarm(self):
        micro_batches = real_disarm(self)
        captured.append(list(micro_batches))
        return micro_batches

    monkeypatch.setattr(capture.GradientCapture, "disarm", disarm)

    callback = LearningDynamicsCallback(
        trainer, every_n_steps=1, attribution="tokens", num_prompts=2, generate=False, strict=True
    )
    trainer.add_callback(callback)

    # every forward of the model during an armed step: the policy's (with grad) and the reference (adapter off)
    forwards = []

    def record_forward(module, args, kwargs, output):
        if callback.capture.armed:
            forwards.append((bool(kwargs.get("fused_lm_head")), output.log_probs.requires_grad))

    model.register_forward_hook(record_forward, with_kwargs=True)
    trainer.train()

    assert selections
    assert all(selection <= lora_names for selection in selections)
    assert set().union(*selections) == lora_names  # the kernels span every adapter parameter, and nothing else

    assert sorted(forwards) == [(True, False), (True, False), (True, True), (True, True)]  # 2 steps x (policy, ref)
    assert [len(step) for step in captured] == [1, 1]  # the reference forward is not captured
    assert all(mb.grad_coeffs is not None and bool((mb.grad_coeffs != 0).any()) for step in captured for mb in step)

    dynamics = [r for r in _records(tmp_path) if r["type"] == "dynamics"]
    assert {r["step"] for r in dynamics} == {0, 1}
    for record in dynamics:
        assert record["gradient_check"]["cosine"] >= 0.99999
        tolerance = 1e-5 * max(_scale(record), 1.0)
        assert abs(record["predicted"] - (record["predicted_current"] + record["history"])) <= tolerance
        assert abs(record["attributed"] - record["predicted_current"]) <= tolerance
        if "matrix" in record:
            archive = np.load(tmp_path / "dynamics" / record["matrix"]["file"])
            matrix = archive[record["matrix"]["key"]].astype(np.float64)
            assert abs(float(matrix.sum()) - record["predicted_current"]) <= tolerance
    assert any("matrix" in record for record in dynamics)


def test_lora_dpo_training_losses_identical_with_and_without_callback(tmp_path):
    plain = _lora_dpo_trainer(tmp_path / "plain", max_steps=3, per_device_train_batch_size=2)
    plain.train()
    observed = _lora_dpo_trainer(tmp_path / "observed", max_steps=3, per_device_train_batch_size=2)
    observed.add_callback(
        LearningDynamicsCallback(
            observed,
            every_n_steps=1,
            attribution="sums",
            tokens_every_n_steps=2,
            num_prompts=2,
            max_new_tokens=8,
            strict=True,
        )
    )
    observed.train()
    assert len(_losses(plain)) == 3
    assert _losses(plain) == _losses(observed)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), observed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert all(r["analysis_failures"] == 0 for r in _records(tmp_path / "observed") if r["type"] == "status")
