"""`trl-ntk demo --fixes`: the comparison of each DPO fix with plain DPO, from hand-made summaries."""

from __future__ import annotations

import pytest

from trl_ntk.demo.run import DemoConfig
from trl_ntk.demo.summary import fix_comparison, format_fix_comparison


def _summary(chosen: tuple[float, float], rejected: tuple[float, float], argmax: tuple[float, float]) -> dict:
    return {
        "kinds": {
            "chosen": {"logp_start": chosen[0], "logp_end": chosen[1]},
            "rejected": {"logp_start": rejected[0], "logp_end": rejected[1]},
        },
        "argmax_logp_start": argmax[0],
        "argmax_logp_end": argmax[1],
    }


def test_fix_comparison_reads_squeezing_and_margin_cost():
    plain = _summary((-5.0, -6.0), (-18.0, -28.0), (-4.0, -3.0))  # chosen -1, margin +9, argmax +1
    fix = _summary((-5.0, -5.5), (-18.0, -25.0), (-4.0, -3.5))  # chosen -0.5, margin +6.5, argmax +0.5
    worse = _summary((-5.0, -7.0), (-18.0, -30.0), (-4.0, -2.0))
    comparison = fix_comparison(plain, {"fix": fix, "worse": worse})
    assert comparison["plain"]["margin_change"] == pytest.approx(9.0)
    row = comparison["fix"]
    assert row["chosen_change"] == pytest.approx(-0.5) and row["argmax_gain"] == pytest.approx(0.5)
    assert row["chosen_falls_less"] and row["argmax_gains_less"]
    assert row["margin_cost"] == pytest.approx(9.0 - 6.5)
    assert not comparison["worse"]["chosen_falls_less"] and not comparison["worse"]["argmax_gains_less"]
    assert comparison["worse"]["margin_cost"] == pytest.approx(9.0 - 10.0)
    text = format_fix_comparison(comparison)
    assert "margin cost +2.50" in text and "margin cost -1.00" in text


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_fixes_are_dpo_only(trainer):
    with pytest.raises(ValueError, match="--fixes applies to --trainer dpo only"):
        DemoConfig(trainer=trainer, fixes=True)
