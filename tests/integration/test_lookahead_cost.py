"""The look-ahead's cheap read-out of the trainer's gradient signal: `c_l` from a backward that stops at the model's
outputs equals what the trainer's full backward hands the capture, it never back-propagates into the model, and it
leaves no `.grad`."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_factory import dpo_trainer, sft_trainer
from trl_ntk.integration.capture import GradientCapture
from trl_ntk.integration.lookahead import _inputs
from trl_ntk.integration.signal import capture_signal

CASES = [("sft", {}), ("dpo", {"loss_type": ["sigmoid"]}), ("dpo", {"loss_type": ["ipo"]})]


def _full_backward_coeffs(trainer, model, inputs) -> list[torch.Tensor]:
    """The reference: the trainer's loss and its full `loss.backward()` (every parameter's `.grad`), as in training."""
    capture = GradientCapture(model)
    try:
        capture.arm()
        capture.begin_loss_call(inputs)
        trainer.compute_loss(model, inputs).backward()
        return [mb.grad_coeffs.clone() for mb in capture.disarm()]
    finally:
        capture.remove()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("kind", "args"), CASES, ids=["sft", "dpo-sigmoid", "dpo-ipo"])
def test_signal_equals_the_full_backward_capture_and_stops_at_the_outputs(tmp_path, kind, args):
    factory = sft_trainer if kind == "sft" else dpo_trainer
    trainer = factory(tmp_path, n=4, dtype=torch.float64, **args)
    model = trainer.model.eval()
    inputs = _inputs(trainer, [0, 1, 2], next(model.parameters()).device)
    expected = _full_backward_coeffs(trainer, model, inputs)
    assert expected and all(c.abs().max() > 0 for c in expected)

    reached = []  # parameter gradients computed by the cheap route (there must be none)
    handles = [p.register_hook(lambda g, name=n: reached.append(name)) for n, p in model.named_parameters()]
    capture = GradientCapture(model)
    try:
        got = [mb.grad_coeffs for mb in capture_signal(trainer, model, capture, inputs)]
    finally:
        capture.remove()
        for handle in handles:
            handle.remove()
    assert reached == []
    assert all(p.grad is None for p in model.parameters())
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-12)


def test_the_full_backward_reference_does_reach_the_parameters(tmp_path):
    """Guard for the test above: the parameter hooks it installs do fire on a backward through the model."""
    trainer = sft_trainer(tmp_path, n=2)
    model = trainer.model.eval()
    reached = []
    handles = [p.register_hook(lambda g, name=n: reached.append(name)) for n, p in model.named_parameters()]
    try:
        trainer.compute_loss(model, _inputs(trainer, [0], torch.device("cpu"))).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    assert len(reached) > 0
