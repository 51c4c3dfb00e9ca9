"""Multi-step look-ahead against brute-force references on a tiny float64 model: the linearised model trained in
parameter space with explicit per-token Jacobians (once, and re-linearised), real SGD written by hand, the DPO loss's
token gradient against the trainer's own captured `c_l`, and convergence to real training as the step shrinks."""

from __future__ import annotations

import pytest
import torch

from trl_ntk.analysis import lookahead_multistep as ms
from trl_ntk.batches import TokenBatch, target_rows
from trl_ntk.demo.toy_model import tiny_random_model


def _model():
    model = tiny_random_model(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, seed=3)
    return model.to(torch.float64).eval()


def _batch(rows: int, length: int, scored: int, seed: int) -> TokenBatch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (rows, length), generator=generator)
    target = torch.zeros(rows, length, dtype=torch.bool)
    target[:, length - scored :] = True
    return TokenBatch(input_ids=ids, attention_mask=torch.ones_like(ids), target_mask=target)


def _logprobs(model, batch: TokenBatch) -> torch.Tensor:
    """`[M]` target log-probs from the model's own logits (no package code), differentiable."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return lp[batch.target_mask[:, 1:]]


def _jacobian(model, batch) -> torch.Tensor:
    """`[M, P]` every target's log-prob gradient, one backward each."""
    params = list(model.parameters())
    lp = _logprobs(model, batch)
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(v, params, retain_graph=True)]) for v in lp]
    return torch.stack(rows)


def _setup():
    model = _model()
    train, probe = _batch(4, 7, 3, seed=1), _batch(3, 6, 2, seed=2)
    weights = torch.tensor([[1.0] * 2 + [0.0] * 4, [0.0] * 2 + [0.5] * 4], dtype=torch.float64)
    with torch.no_grad():
        z0 = _logprobs(model, train)
    sequence = target_rows(train)
    reference = ms.sequence_sums(z0, sequence, 4) + torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64)
    return model, train, probe, weights, ms.dpo_sigmoid_loss(sequence, reference, beta=2.0)


def _flat_step(model, delta: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p += delta[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


def _reference_linearised(model, train, probe, weights, loss_fn, lr, steps, period) -> torch.Tensor:
    """Train the linearised model in parameter space, `w = w_lin + delta`, re-linearising every `period` steps."""
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        start = weights @ _logprobs(model, probe)
    out = [torch.zeros(weights.shape[0], dtype=torch.float64)]
    done = 0
    while done < steps:
        j_train, j_probe = _jacobian(model, train), _jacobian(model, probe)
        with torch.no_grad():
            z0, p0 = _logprobs(model, train), _logprobs(model, probe)
        delta = torch.zeros(j_train.shape[1], dtype=torch.float64)
        for _ in range(min(period, steps - done)):
            z = (z0 + j_train @ delta).requires_grad_(True)
            (c,) = torch.autograd.grad(loss_fn(z), z)
            delta = delta - lr * j_train.T @ c
            out.append(weights @ (p0 + j_probe @ delta) - start)
            done += 1
        _flat_step(model, delta)
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    return torch.stack(out)


@pytest.mark.parametrize("period", [None, 2])
def test_kernel_dynamics_equal_the_linearised_model_trained_in_parameter_space(period):
    model, train, probe, weights, loss_fn = _setup()
    lr, steps = 0.5, 5
    got = ms.linearised_training(model, train, probe, weights, loss_fn, lr=lr, steps=steps, relinearise_every=period)
    expected = _reference_linearised(model, train, probe, weights, loss_fn, lr, steps, period or steps)
    # Qwen2's eager attention takes its softmax in float32 even for a float64 model: JVP and backward differ by ~1e-7
    torch.testing.assert_close(got.probe_change, expected, rtol=2e-6, atol=1e-9)
    assert got.probe_change[-1].abs().min() > 1e-3  # the probes did move


def test_one_linearised_step_is_the_first_order_effect():
    model, train, probe, weights, loss_fn = _setup()
    lr = 0.1
    got = ms.linearised_training(model, train, probe, weights, loss_fn, lr=lr, steps=1).probe_change[1]
    params = list(model.parameters())
    loss_grad = torch.autograd.grad(loss_fn(_logprobs(model, train)), params)
    objectives = weights @ _logprobs(model, probe)
    for r in range(2):
        probe_grad = torch.autograd.grad(objectives[r], params, retain_graph=True)
        expected = -lr * sum(float((a * b).sum()) for a, b in zip(loss_grad, probe_grad))
        assert float(got[r]) == pytest.approx(expected, rel=2e-6)


def test_real_training_is_plain_sgd_and_the_linearisation_converges_to_it_as_the_step_shrinks():
    model, train, probe, weights, loss_fn = _setup()
    steps = 5
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        start = weights @ _logprobs(model, probe)
    expected = [torch.zeros(2, dtype=torch.float64)]
    for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(_logprobs(model, train)), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.5 * g
            expected.append(weights @ _logprobs(model, probe) - start)
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    real = ms.real_training(model, train, probe, weights, loss_fn, lr=0.5, steps=steps)
    torch.testing.assert_close(real.probe_change, torch.stack(expected), rtol=1e-10, atol=1e-13)
    errors = []
    for lr in (5e-3, 5e-4, 5e-5):
        real = ms.real_training(model, train, probe, weights, loss_fn, lr=lr, steps=steps).probe_change
        linear = ms.linearised_training(model, train, probe, weights, loss_fn, lr=lr, steps=steps).probe_change
        errors.append(float(ms.relative_error(linear, real)[-1]))
    # the linearisation drops O(lr^2) of an O(lr) change: the relative error falls 5-10x per decade of lr
    assert errors[0] > 3 * errors[1] > 9 * errors[2] and errors[2] < 1e-2, errors  # measured 0.21, 0.044, 0.0055


def test_linearised_dynamics_checks_shapes_and_k_steps_of_a_constant_gradient_are_k_one_steps():
    k_tt, k_pt, z = torch.eye(3), torch.ones(2, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="K_tt"):
        ms.linearised_dynamics(k_tt, torch.ones(2, 4), z, ms.sft_loss(3), lr=1.0, steps=1)
    out = ms.linearised_dynamics(k_tt * 2, k_pt, z, ms.sft_loss(3), lr=0.3, steps=4)
    torch.testing.assert_close(out.probe_change[:, 0], torch.arange(5, dtype=torch.float64) * 0.3)
    torch.testing.assert_close(out.coefficients, torch.full((3,), 0.4, dtype=torch.float64))
    torch.testing.assert_close(out.train_logprobs[-1], torch.full((3,), 0.8, dtype=torch.float64))


def test_dpo_loss_of_the_log_probs_has_the_trainers_own_token_gradient(tmp_path):
    from tests.trainer_factory import dpo_trainer
    from trl_ntk.integration.capture import GradientCapture
    from trl_ntk.integration.lookahead import _capture_batch, _inputs

    trainer = dpo_trainer(tmp_path, n=4, dtype=torch.float64)
    model = trainer.model.eval()
    capture = GradientCapture(model)
    try:
        (micro_batch,) = _capture_batch(trainer, model, capture, _inputs(trainer, [0, 1, 2, 3], torch.device("cpu")))
    finally:
        capture.remove()
    batch = micro_batch.batch
    z0 = _logprobs(model, batch).detach()
    sequence = target_rows(batch)
    loss_fn = ms.dpo_sigmoid_loss(sequence, ms.sequence_sums(z0, sequence, 8), beta=trainer.beta)
    torch.testing.assert_close(ms.loss_gradient(loss_fn, z0), micro_batch.grad_coeffs.double(), rtol=1e-5, atol=1e-9)
