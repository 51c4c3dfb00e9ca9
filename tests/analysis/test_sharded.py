"""Tests for trl_ntk.analysis.sharded on one process: its gradient and finite-difference JVPs against
per-target autograd,
its step analysis against the exact `dynamics.explain_update` on the same trainer step, and the set-ups refused
before training. The 2-process FSDP2 runs are in `test_distributed.py`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.ntk.test_kernels import flat, llama, per_target_gradients, probe_and_train, random_direction, trainable
from tests.trainer_factory import dpo_trainer
from trl_ntk.analysis import dynamics, sharded
from trl_ntk.batches import CapturedMicroBatch
from trl_ntk.integration import callbacks, validation
from trl_ntk.integration.callbacks import DynamicsConfig, LearningDynamicsCallback


def test_weighted_gradient_is_the_weighted_sum_of_per_target_gradients_and_keeps_grad():
    model = llama()
    probe, train = probe_and_train(model)
    params = trainable(model)
    for p in params.values():
        p.grad = torch.randn_like(p)
    before = {name: p.grad.clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(probe.num_targets, generator=generator), torch.zeros(train.num_targets)]
    weights[1][::2] = 0.5
    micro_batches = [CapturedMicroBatch(probe), CapturedMicroBatch(train)]
    gradient = sharded.weighted_gradient(model, micro_batches, weights, list(params))
    expected = weights[0] @ per_target_gradients(model, probe) + weights[1] @ per_target_gradients(model, train)
    actual = flat(gradient, params)
    assert float((actual - expected).norm() / expected.norm()) < 1e-5
    assert all(torch.equal(p.grad, before[name]) for name, p in params.items())  # the step's .grad is put back


def test_finite_difference_jvps_match_autograd_along_random_and_steep_directions_and_restore_weights():
    model = llama()
    probe, train = probe_and_train(model)
    params = trainable(model)
    weights_before = {name: p.detach().clone() for name, p in params.items()}
    gradients = per_target_gradients(model, probe)  # [M, P]
    steep = gradients.sum(0)  # the gradient of the probe's own log-likelihood: the steepest direction for it
    offsets = [0] + torch.tensor([p.numel() for p in params.values()]).cumsum(0).tolist()
    steep_direction = {
        name: 300.0 * steep[start:stop].view_as(p)
        for (name, p), start, stop in zip(params.items(), offsets, offsets[1:])
    }
    directions = [random_direction(params), steep_direction, {name: torch.zeros_like(p) for name, p in params.items()}]
    rows = sharded.finite_difference_jvps(model, {"probe": probe, "train": train}, directions, list(params))
    for name, batch in (("probe", probe), ("train", train)):
        exact = per_target_gradients(model, batch) @ torch.stack([flat(d, params) for d in directions]).T  # [M, 3]
        for k in range(2):
            error = (rows[name][k] - exact[:, k]).norm() / exact[:, k].norm()
            assert float(error) < 1e-3, (name, k)
        assert torch.equal(rows[name][2], torch.zeros_like(rows[name][2]))
    assert all(torch.equal(p, weights_before[name]) for name, p in params.items())


def test_sharded_step_analysis_agrees_with_the_exact_one_on_the_same_step(tmp_path, monkeypatch):
    trainer = dpo_trainer(tmp_path, n=16, max_steps=3)
    callback = LearningDynamicsCallback(
        trainer, every_n_steps=1, attribution="sums", num_prompts=2, max_new_tokens=8, strict=True
    )
    pairs = []
    exact_explain = dynamics.explain_update

    def both(model, probe_batch, micro_batches, labels, group_names, optimizer, **options):
        reference = exact_explain(model, probe_batch, micro_batches, labels, group_names, optimizer, **options)
        finite = exact_explain(
            model,
            probe_batch,
            micro_batches,
            labels,
            group_names,
            optimizer,
            coeff_scale=options["coeff_scale"],
            backend=sharded.ShardedBackend(model),
        )
        pairs.append((reference, finite))
        return reference

    monkeypatch.setattr(callbacks.dynamics, "explain_update", both)
    trainer.add_callback(callback)
    trainer.train()
    assert len(pairs) == 3
    for reference, finite in pairs:
        assert finite.cell_names == reference.cell_names and finite.path == "finite_difference"
        assert finite.gradient_check.cosine >= 0.99999 and finite.gradient_check.relative_error <= 1e-4
        assert finite.gradient_check.clip_scale == pytest.approx(reference.gradient_check.clip_scale, rel=1e-5)
        # per probe token: 1% of the terms that cancel there, plus float32 round-off of the differences (the
        # largest token moves by 0.1 nats at the first point; about 1e-5 of the largest value on every token)
        cancelling = reference.probe.cells.abs().sum(0)
        tolerance = 1e-2 * cancelling + 1e-4 * float(cancelling.max())
        assert bool(((finite.probe.cells - reference.probe.cells.cpu()).abs() <= tolerance).all())
        assert bool(((finite.probe.predicted - reference.probe.predicted.cpu()).abs() <= tolerance).all())
        for field, of in (("sgd", lambda e: e.sgd), ("history", lambda e: e.probe.history)):
            expected, actual = of(reference), of(finite)
            assert float((actual - expected).norm() / expected.norm().clamp(min=1e-12)) < 1e-2, field


def _trainer(fsdp_version: int | None = None, zero_stage: int | None = None, **attributes) -> SimpleNamespace:
    """A stand-in with the attributes `validate_parallelism` reads from a transformers `Trainer`."""
    state = SimpleNamespace(
        fsdp_plugin=None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version),
        deepspeed_plugin=None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage),
    )
    defaults = {
        "accelerator": SimpleNamespace(state=state),
        "is_fsdp_enabled": fsdp_version is not None,
        "is_deepspeed_enabled": zero_stage is not None,
        "model": SimpleNamespace(),
        "args": SimpleNamespace(bf16=False, fp16=False),
        "label_smoother": None,
        "compute_loss_func": None,
    }
    return SimpleNamespace(**{**defaults, **attributes})


@pytest.mark.parametrize(
    ("trainer", "config", "message"),
    [
        (_trainer(fsdp_version=1), DynamicsConfig(), "FSDP2 only"),
        (_trainer(fsdp_version=2), DynamicsConfig(attribution="tokens"), "'tokens' level"),
        (_trainer(fsdp_version=2), DynamicsConfig(tokens_every_n_steps=10), "'tokens' level"),
        (_trainer(zero_stage=3), DynamicsConfig(attribution="none"), "ZeRO-3"),
        (_trainer(zero_stage=2), DynamicsConfig(attribution="sums"), "inside the backward"),
        (_trainer(fsdp_version=2, label_smoother=object()), DynamicsConfig(), "plain logits"),
        (_trainer(fsdp_version=2, compute_loss_func=len), DynamicsConfig(), "plain logits"),
        (_trainer(fsdp_version=2, model=SimpleNamespace(peft_config={})), DynamicsConfig(), "PEFT"),
    ],
    ids=["fsdp1", "tokens", "tokens-every", "zero3", "zero2-sums", "label-smoothing", "compute-loss-func", "peft"],
)
def test_sharded_setups_the_analysis_cannot_run_are_refused_before_training(trainer, config, message):
    with pytest.raises(ValueError, match=message):
        validation.validate_parallelism(trainer, config)


def test_fsdp2_sums_and_zero2_tracking_are_accepted_and_half_precision_fsdp_warns(recwarn):
    validation.validate_parallelism(_trainer(fsdp_version=2), DynamicsConfig(attribution="sums"))
    validation.validate_parallelism(_trainer(zero_stage=2), DynamicsConfig(attribution="none"))
    tracking_only = DynamicsConfig(attribution="none")
    validation.validate_parallelism(_trainer(fsdp_version=2, label_smoother=object()), tracking_only)
    assert not recwarn.list
    with pytest.warns(UserWarning, match="half precision"):
        validation.validate_parallelism(
            _trainer(fsdp_version=2, args=SimpleNamespace(bf16=True, fp16=False)), DynamicsConfig(attribution="sums")
        )
