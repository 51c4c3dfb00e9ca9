"""The truth guard: verdicts from the gradient check and the set-up, and replayed training randomness."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trl_ntk.analysis import guard
from trl_ntk.analysis.dynamics import GradientCheck


def _check(cosine: float) -> GradientCheck:
    return GradientCheck(cosine=cosine, relative_error=math.sqrt(max(2 * (1 - cosine), 0.0)), clip_scale=1.0)


def test_an_exact_float32_reconstruction_is_trusted():
    assert guard.judge(_check(1 - 1e-12), torch.float32) == guard.Verdict(True, None)


def test_a_float32_reconstruction_off_by_1e_5_is_not_trusted_and_the_reason_names_the_figures_and_causes():
    issues = [guard.SetupIssue("dropout", "dropout active in training mode (drop); its masks are replayed", True)]
    verdict = guard.judge(_check(1 - 1e-5), torch.float32, issues)
    assert not verdict.trusted
    assert "cosine 0.99999" in verdict.reason and "float32" in verdict.reason
    assert "dropout active in training mode" in verdict.reason


def test_bf16_gradients_get_the_looser_limits():
    check = _check(1 - 1e-4)
    assert guard.judge(check, torch.bfloat16).trusted
    assert not guard.judge(check, torch.float32).trusted
    assert not guard.judge(_check(1 - 5e-3), torch.bfloat16).trusted


def test_non_finite_check_is_not_trusted():
    check = GradientCheck(cosine=float("nan"), relative_error=float("nan"), clip_scale=1.0)
    verdict = guard.judge(check, torch.float32)
    assert not verdict.trusted and "NaN or inf" in verdict.reason


def test_an_unhandled_set_up_issue_is_not_trusted_even_with_an_exact_check():
    issue = guard.SetupIssue("entropy_bonus", "GRPO entropy bonus (entropy_coef=0.01)")
    verdict = guard.judge(_check(1.0), torch.float32, [issue])
    assert not verdict.trusted and "GRPO entropy bonus" in verdict.reason
    handled = guard.SetupIssue("dropout", "dropout", handled=True)
    assert guard.judge(_check(1.0), torch.float32, [handled]).trusted


class _FunctionalDropout(nn.Module):
    def __init__(self, rate: float) -> None:
        super().__init__()
        self.dropout = rate


def test_dropout_sources_are_found_as_modules_and_as_functional_rates():
    model = nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.0), _FunctionalDropout(0.2), _FunctionalDropout(0.0))
    assert guard.dropout_modules(model) == ["0", "2.dropout"]


def test_replayed_randomness_draws_the_training_forwards_masks_and_leaves_the_global_stream_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    model.train()
    inputs = torch.ones(4, 8)
    state = guard.RngState.capture(model)
    trained = model(inputs)
    model.eval()
    following = torch.get_rng_state()
    with guard.replayed_randomness(model, state):
        assert model.training
        replayed = model(inputs)
    assert not model.training
    assert torch.equal(trained, replayed)
    assert torch.equal(torch.get_rng_state(), following)
    with guard.replayed_randomness(model, None):
        assert not model.training


@pytest.mark.parametrize(
    "dtype,args,expected",
    [
        (torch.float32, None, torch.float32),
        (torch.float32, type("Args", (), {"bf16": True})(), torch.bfloat16),
        (torch.bfloat16, None, torch.bfloat16),
    ],
)
def test_gradient_dtype_follows_autocast_then_the_trainable_weights(dtype, args, expected):
    assert guard.gradient_dtype(nn.Linear(2, 2).to(dtype), args) == expected
