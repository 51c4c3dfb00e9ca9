"""The captured `c_l = dL/d lp_l` reconstruct the gradient the optimizer sees, for every trainer and loss type.

Oracle: the model's plain (non-fused) forward, `log_softmax(logits / T)` gathered at the captured targets, and
`torch.autograd.grad(sum_l c_l lp_l + sum_n <r_n, z_n>)` (the logit residual `r` of losses on the plain logits);
compared with the accumulated `.grad` at `on_pre_optimizer_step`, after undoing the clip factor torch applies
(`min(1, max_norm / (norm + 1e-6))`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from tests import trainer_factory
from trl_ntk.integration.capture import GradientCapture, logit_gradient_split, residual_tolerance


def _reconstruction_objective(model, micro_batch):
    """`sum_l c_l lp_l + sum_n <r_n, z_n>` from the model's plain forward."""
    batch = micro_batch.batch
    raw_logits = model(**batch.forward_kwargs(), fused_lm_head=False).logits[:, :-1].float()
    logprobs = torch.log_softmax(raw_logits / batch.temperature, dim=-1).gather(-1, batch.input_ids[:, 1:, None])
    objective = (micro_batch.grad_coeffs * logprobs.squeeze(-1)[batch.target_mask[:, 1:]]).sum()
    if micro_batch.logit_residual is not None:
        objective = objective + (raw_logits[micro_batch.residual_positions] * micro_batch.logit_residual).sum()
    return objective


class ReconstructionCheck(TrainerCallback):
    """Arms a capture every step and compares its reconstruction with `.grad` before the optimizer steps."""

    def __init__(self, trainer, temperature: float = 1.0):
        self.trainer = trainer
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        self.capture = GradientCapture(self.model, temperature=temperature)
        compute_loss = trainer.compute_loss

        def compute_loss_with_capture(model, inputs, *args, **kwargs):  # as LearningDynamicsCallback wires it
            self.capture.begin_loss_call(inputs)
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss_with_capture
        self.results: list[tuple[float, float, int]] = []
        self.micro_batches: list = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.capture.arm()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        micro_batches = self.capture.disarm()
        self.micro_batches.append(micro_batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()  # the oracle's forward without gradient checkpointing (the toy has no dropout)
        with self.capture.paused(), torch.enable_grad():
            objective = sum(_reconstruction_objective(self.model, mb) for mb in micro_batches)
            raw = torch.autograd.grad(objective, params, allow_unused=True)
        self.model.train()
        raw = torch.cat([(r if r is not None else torch.zeros_like(p)).flatten() for r, p in zip(raw, params)])
        applied = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        if args.max_grad_norm and args.max_grad_norm > 0:
            raw = raw * min(1.0, args.max_grad_norm / (float(raw.norm()) + 1e-6))
        if float(applied.norm()) == 0.0:  # e.g. GRPO groups without reward variance and no KL: nothing to explain
            assert float(raw.norm()) == 0.0
            return
        cosine = float(torch.nn.functional.cosine_similarity(raw.double(), applied.double(), dim=0))
        relative_error = float((raw - applied).norm() / applied.norm())
        self.results.append((cosine, relative_error, len(micro_batches)))


def _check(trainer, temperature: float = 1.0, min_micro_batches: int = 1):
    check = ReconstructionCheck(trainer, temperature)
    trainer.add_callback(check)
    trainer.train()
    assert check.results, "no step had a non-zero gradient"
    for cosine, relative_error, count in check.results:
        assert count >= min_micro_batches
        assert cosine >= 0.99999
        assert relative_error <= 1e-4
    return check


@pytest.mark.parametrize("accumulation,max_grad_norm", [(1, 0.0), (2, 1e-3)])
def test_sft_capture_reconstructs_grad(tmp_path, accumulation, max_grad_norm):
    trainer = trainer_factory.sft_trainer(
        tmp_path, gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm
    )
    _check(trainer, min_micro_batches=accumulation)


@pytest.mark.parametrize(
    "loss_type,accumulation,max_grad_norm",
    [("sigmoid", 1, 0.0), ("ipo", 2, 0.0), ("hinge", 2, 1e-3), (["sigmoid", "ipo"], 2, 0.0)],
)
def test_dpo_capture_reconstructs_grad(tmp_path, loss_type, accumulation, max_grad_norm):
    trainer = trainer_factory.dpo_trainer(
        tmp_path, loss_type=loss_type, gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm
    )
    _check(trainer, min_micro_batches=accumulation)


@pytest.mark.parametrize(
    "loss_type,beta,accumulation,max_grad_norm",
    [("grpo", 0.0, 1, 0.0), ("dr_grpo", 0.04, 2, 0.0), ("dapo", 0.04, 2, 1e-3), ("bnpo", 0.0, 2, 0.0)],
)
def test_grpo_capture_reconstructs_grad(tmp_path, loss_type, beta, accumulation, max_grad_norm):
    trainer = trainer_factory.grpo_trainer(
        tmp_path,
        loss_type=loss_type,
        beta=beta,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=max_grad_norm,
        temperature=0.9,
    )
    _check(trainer, temperature=0.9, min_micro_batches=accumulation)


def test_capture_keeps_nothing_while_disarmed(tmp_path):
    trainer = trainer_factory.sft_trainer(tmp_path, max_steps=1)
    model = trainer.accelerator.unwrap_model(trainer.model)
    capture = GradientCapture(model)
    trainer.train()
    assert capture.micro_batches == []
    assert not capture.armed


def _z_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy plus a z-loss `1e-2 * logsumexp(z)^2` on the trained positions: a loss on the plain logits with
    a term beyond the trained tokens' log-probs."""
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:]
    trained = targets != -100
    cross_entropy = torch.nn.functional.cross_entropy(logits[trained], targets[trained], reduction="sum")
    z_loss = 1e-2 * torch.logsumexp(logits[trained], dim=-1).pow(2).sum()
    return (cross_entropy + z_loss) / (num_items_in_batch if num_items_in_batch is not None else trained.sum())


def _cross_entropy(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:]
    trained = targets != -100
    loss = torch.nn.functional.cross_entropy(logits[trained], targets[trained], reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else trained.sum())


@pytest.mark.parametrize(
    "options,accumulation,max_grad_norm",
    [
        ({"label_smoothing_factor": 0.1}, 1, 0.0),
        ({"label_smoothing_factor": 0.1}, 2, 1e-3),
        ({"compute_loss_func": _z_loss}, 2, 0.0),
    ],
    ids=["label-smoothing", "label-smoothing-accumulation-clipping", "z-loss"],
)
def test_sft_loss_on_plain_logits_is_reconstructed_with_its_logit_residual(
    tmp_path, options, accumulation, max_grad_norm
):
    loss_func = options.pop("compute_loss_func", None)
    trainer = trainer_factory.sft_trainer(
        tmp_path, gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm, **options
    )
    if loss_func is not None:
        trainer.compute_loss_func = loss_func
    check = _check(trainer, min_micro_batches=accumulation)
    residuals = [mb.logit_residual for step in check.micro_batches for mb in step]
    assert residuals and all(r is not None and float(r.norm()) > 0 for r in residuals)


def test_plain_cross_entropy_on_logits_gives_the_fused_coefficients_and_no_residual(tmp_path):
    fused = _check(trainer_factory.sft_trainer(tmp_path / "fused", max_steps=1))
    plain_trainer = trainer_factory.sft_trainer(tmp_path / "plain", max_steps=1)
    plain_trainer.compute_loss_func = _cross_entropy
    plain = _check(plain_trainer)
    (fused_batch,), (plain_batch,) = fused.micro_batches[0], plain.micro_batches[0]
    assert plain_batch.logit_residual is None
    assert torch.equal(plain_batch.batch.target_mask, fused_batch.batch.target_mask)
    assert torch.allclose(plain_batch.grad_coeffs, fused_batch.grad_coeffs, rtol=1e-4, atol=1e-8)


def _logit_gradient(label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dL/dz, z, y)` of a summed cross-entropy over 6 positions and 50 logits, by autograd."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (6,), generator=generator)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient, logits.detach(), targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_gradient_split_of_a_cross_entropy_is_minus_one_per_token_and_round_off_residual(dtype):
    gradient, logits, targets = _logit_gradient(0.0)
    coeffs, residual = logit_gradient_split(gradient.to(dtype), logits, targets, 1.0)
    tolerance = residual_tolerance(dtype)
    assert torch.allclose(coeffs, torch.full_like(coeffs, -1.0), atol=tolerance)  # dL/dlp of -sum lp
    assert float(residual.norm()) <= tolerance * float(gradient.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_gradient_split_keeps_label_smoothing_as_a_residual_and_reassembles_the_gradient(dtype):
    gradient, logits, targets = _logit_gradient(0.1)
    coeffs, residual = logit_gradient_split(gradient.to(dtype), logits, targets, 1.0)
    assert float(residual.norm()) > 4 * residual_tolerance(dtype) * float(gradient.norm())
    direction = -torch.softmax(logits, dim=-1)
    direction[torch.arange(6), targets] += 1.0
    assert torch.allclose(coeffs[:, None] * direction + residual, gradient.to(dtype).float(), atol=1e-6)
    assert bool(((residual * direction).sum(-1).abs() <= 1e-5).all())  # the residual is orthogonal to d_l


def test_a_failure_inside_the_logit_hook_is_reported_by_the_analysis_and_training_goes_on(tmp_path, monkeypatch):
    import json

    from trl_ntk.integration import capture
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    def failing(*args, **kwargs):
        raise MemoryError("no room for the [M, V] temporaries")

    monkeypatch.setattr(capture, "logit_gradient_split", failing)
    trainer = trainer_factory.sft_trainer(tmp_path, max_steps=2, label_smoothing_factor=0.1)
    trainer.add_callback(LearningDynamicsCallback(trainer, every_n_steps=1, num_prompts=1, generate=False))
    with pytest.warns(UserWarning, match="logit-gradient capture failed"):
        trainer.train()
    assert trainer.state.global_step == 2
    status = [json.loads(line) for line in (tmp_path / "dynamics" / "dynamics.jsonl").read_text().splitlines()][-1]
    assert status["type"] == "status" and status["analysis_failures"] == 2
    assert "MemoryError" in status["message"]


def _failing(*args, **kwargs):
    raise RuntimeError("injected fault")


def _train_losses_and_params(trainer) -> tuple[list[float], list[torch.Tensor]]:
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("hook", ["forward", "pre-forward", "log-prob-gradient"])
def test_an_exception_in_each_capture_hook_is_an_analysis_failure_and_training_is_bit_identical(
    tmp_path, monkeypatch, hook
):
    import json

    from trl_ntk.analysis import guard
    from trl_ntk.integration import capture
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    plain_losses, plain_params = _train_losses_and_params(trainer_factory.sft_trainer(tmp_path / "plain", max_steps=2))
    trainer = trainer_factory.sft_trainer(tmp_path / "observed", max_steps=2)
    callback = LearningDynamicsCallback(trainer, every_n_steps=1, num_prompts=1, generate=False)
    if hook == "forward":
        monkeypatch.setattr(capture.GradientCapture, "_record_forward", _failing)
    elif hook == "pre-forward":
        callback.capture.record_randomness = True
        monkeypatch.setattr(guard.RngState, "capture", _failing)
    else:
        monkeypatch.setattr(capture, "_accumulate_coeffs", _failing)
    trainer.add_callback(callback)
    with pytest.warns(UserWarning, match="injected fault"):
        losses, params = _train_losses_and_params(trainer)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    records = [
        json.loads(line)
        for line in (tmp_path / "observed" / "dynamics" / "dynamics.jsonl").read_text().split("\n")
        if line
    ]
    assert records[-1]["type"] == "status" and records[-1]["analysis_failures"] == 2
    assert not [r for r in records if r["type"] == "dynamics"]


def test_pre_shifted_labels_are_a_recorded_failure_not_an_exception(tmp_path):
    from trl_ntk.demo import toy

    model, _ = toy.model_and_tokenizer(warmup="pretrain")
    capture = GradientCapture(model)
    capture.arm()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    log_probs = torch.zeros(1, 3, requires_grad=True)
    output = type("Output", (), {"log_probs": log_probs})()
    kwargs = {"input_ids": input_ids, "labels": input_ids, "shift_labels": input_ids[:, 1:], "fused_lm_head": True}
    capture._on_forward(model, (), kwargs, output)
    assert capture.micro_batches == []
    assert len(capture.failures) == 1 and "pre-shifted labels" in capture.failures[0]


def test_a_forward_without_attention_mask_keeps_the_trainers_layout():
    """Padding-free forwards pass `position_ids` and no mask: the captured batch passes no mask either, so the
    analysis forwards find the same sequence boundaries, and their log-probs equal the training forward's (and
    differ from those of one unbroken sequence, which an all-ones mask would give)."""
    from dataclasses import replace

    from trl_ntk.demo import toy
    from trl_ntk.ntk import logprobs

    model, _ = toy.model_and_tokenizer(warmup="pretrain")
    model.eval()
    capture = GradientCapture(model)
    capture.arm()
    input_ids = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 120]])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])  # two packed documents
    with torch.enable_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids, use_cache=False).logits
    (record,) = capture.micro_batches
    assert record.batch.model_kwargs == {"attention_mask": None}
    expected = torch.log_softmax(logits[0, :-1].detach(), -1).gather(-1, input_ids[0, 1:, None])[:, 0]
    expected = expected[record.batch.target_mask[0, 1:]]
    assert torch.allclose(logprobs.target_logprobs(model, record.batch), expected, atol=1e-5)
    unbroken = logprobs.target_logprobs(model, replace(record.batch, model_kwargs={}))
    assert (unbroken - expected).abs().max() > 1e-2
