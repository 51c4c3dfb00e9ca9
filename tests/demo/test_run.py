"""`trl-ntk demo` and `trl-ntk report` at reduced size: outputs, printed table, effect signs, determinism."""

from __future__ import annotations

import json

import pytest

from trl_ntk import cli
from trl_ntk.demo.run import DemoConfig, format_table, summarize

SHORT_DPO = ["--steps", "30", "--every-n-steps", "10", "--tokens-every-n-steps", "0", "--probe-prompts", "4"]


@pytest.fixture(scope="module")
def dpo_demo(tmp_path_factory):
    """One short DPO demo through the CLI: 30 steps, probes scored at steps 0, 10, 20, 30 and the updates of steps
    0, 10, 20 analysed (sums level; the token level is covered by the callback's own tests)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("dpo_demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["demo", "--output-dir", str(out), "-q", *SHORT_DPO])
    return out, status, stdout.getvalue()


@pytest.mark.slow
def test_cli_demo_writes_summary_and_report_and_prints_the_table(dpo_demo):
    out, status, printed = dpo_demo
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    report = out / "dynamics" / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    assert str(report) in printed
    for kind in ("chosen", "rejected", "chosen_rephrase", "chosen_swapped", "irrelevant_train", "greedy"):
        entry = summary["kinds"][kind]
        assert {"logp_start", "logp_end", "logp_peak"} <= set(entry)
        assert entry["logp_peak"] >= max(entry["logp_start"], entry["logp_end"])
        assert f"\n{kind} " in printed
    assert {"argmax_logp_start", "argmax_logp_end", "argmax_logp_peak"} <= set(summary)
    assert summary["steps"] == 30
    assert summary["analysed_steps"] == 3  # steps 0, 10, 20 (step 30 is the last: scored, not analysed)
    assert "argmax (chosen)" in printed


@pytest.mark.slow
def test_dpo_demo_summary_splits_add_up_to_the_predicted_change(dpo_demo):
    summary = json.loads((dpo_demo[0] / "summary.json").read_text())
    for kind, entry in summary["kinds"].items():
        if kind == "greedy":  # regenerated at every scoring step: a different response per step
            continue
        assert entry["split_positive"] + entry["split_negative"] == pytest.approx(entry["predicted"], abs=0.05)
        assert entry["predicted"] == pytest.approx(entry["observed"], rel=0.25, abs=0.05)


@pytest.mark.slow
def test_short_dpo_demo_already_shows_the_early_squeeze(dpo_demo):
    """30 SGD steps are enough for the early signs: rejected falls far more than chosen, the teacher-forced argmax
    and the greedy response gain probability, and on the rejected responses the pushed-down (negative-gradient)
    part dominates."""
    summary = json.loads((dpo_demo[0] / "summary.json").read_text())
    kinds = summary["kinds"]
    change = {kind: entry["logp_end"] - entry["logp_start"] for kind, entry in kinds.items()}
    assert change["rejected"] < change["chosen"] - 1.0
    assert change["rejected"] < -1.0
    assert summary["argmax_logp_peak"] > summary["argmax_logp_start"]
    assert change["greedy"] > 0
    assert kinds["rejected"]["split_negative"] < -abs(kinds["rejected"]["split_positive"])
    assert summary["checks"]["rejected_falls_more_than_chosen"]
    assert summary["checks"]["argmax_peak_above_start"]


def test_cli_report_delegates_to_report_main(dpo_demo, capsys):
    out = dpo_demo[0]
    target = out / "again.html"
    assert cli.main(["report", str(out / "dynamics"), "-o", str(target), "-q"]) == 0
    assert target.is_file()
    assert str(target) in capsys.readouterr().out


def test_demo_is_deterministic_for_a_seed(tmp_path):
    args = ["--steps", "4", "--every-n-steps", "2", "--attribution", "none", "--probe-prompts", "2", "-q"]
    summaries = []
    for name in ("a", "b"):
        assert cli.main(["demo", "--output-dir", str(tmp_path / name), "--seed", "3", *args]) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        summaries.append({k: summary[k] for k in ("kinds", "argmax_logp_start", "argmax_logp_end", "checks")})
    assert summaries[0] == summaries[1]


def test_cli_rejects_nthr_without_grpo(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["demo", "--trainer", "dpo", "--nthr"])
    assert error.value.code == 2
    assert "--nthr applies to --trainer grpo only" in capsys.readouterr().err


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        cli.main([])


def test_format_table_lists_every_kind_and_the_argmax_row():
    summary = {
        "kinds": {
            "rejected": {"logp_start": -18.0, "logp_end": -40.0, "logp_peak": -18.0},
            "chosen": {
                "logp_start": -5.0,
                "logp_end": -6.0,
                "logp_peak": -4.8,
                "split_positive": 0.5,
                "split_negative": -1.5,
            },
        },
        "argmax_kind": "chosen",
        "argmax_logp_start": -3.7,
        "argmax_logp_end": -3.6,
        "argmax_logp_peak": -2.9,
        "analysed_steps": 7,
    }
    lines = format_table(summary).splitlines()
    assert lines[2].startswith("chosen ") and lines[3].startswith("rejected ")
    assert "-22.00" in lines[3] and "-1.50" in lines[2]
    assert lines[4].startswith("argmax (chosen)")


def test_summarize_reads_start_end_peak_and_summed_splits(tmp_path):
    records = [{"type": "run", "step": 0, "trainer": "dpo"}]
    for step, (chosen, rejected) in enumerate([(-5.0, -18.0), (-4.5, -25.0), (-6.0, -40.0)]):
        for kind, value in (("chosen", chosen), ("rejected", rejected)):
            for probe in ("p1", "p2"):
                records.append(
                    {
                        "type": "probe",
                        "step": step,
                        "kind": kind,
                        "probe_id": f"{probe}-{kind}",
                        "logp_sum": value + (0.5 if probe == "p1" else -0.5),
                        "argmax_logp": -3.0 + 0.1 * step,
                    }
                )
        if step < 2:
            for probe in ("p1", "p2"):
                records.append(
                    {
                        "type": "dynamics",
                        "step": step,
                        "kind": "chosen",
                        "probe_id": f"{probe}-chosen",
                        "observed": 0.1,
                        "predicted": 0.1,
                        "split": {"positive": 0.3, "negative": -0.2},
                    }
                )
    (tmp_path / "dynamics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(tmp_path)
    chosen = summary["kinds"]["chosen"]
    assert (chosen["logp_start"], chosen["logp_end"], chosen["logp_peak"], chosen["peak_step"]) == (-5.0, -6.0, -4.5, 1)
    assert chosen["split_positive"] == pytest.approx(0.6) and chosen["split_negative"] == pytest.approx(-0.4)
    assert "split_positive" not in summary["kinds"]["rejected"]
    assert summary["argmax_logp_peak"] == pytest.approx(-2.8)
    assert summary["checks"]["rejected_falls_more_than_chosen"] and summary["checks"]["chosen_end_below_start"]


def test_demo_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="trainer"):
        DemoConfig(trainer="ppo")
    with pytest.raises(ValueError, match="nthr"):
        DemoConfig(trainer="sft", nthr=True)
    resolved = DemoConfig(trainer="grpo", epochs=1).resolved()
    assert resolved.max_steps is None and resolved.epochs == 1


@pytest.mark.slow
def test_sft_demo_runs_from_the_pretrained_base(tmp_path, capsys):
    args = ["--steps", "4", "--every-n-steps", "2", "--tokens-every-n-steps", "0", "--probe-prompts", "2", "-q"]
    assert cli.main(["demo", "--trainer", "sft", "-o", str(tmp_path), *args]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trainer"] == "sft" and summary["steps"] == 4
    assert {"chosen", "rejected", "chosen_swapped", "shuffled_chosen"} <= set(summary["kinds"])
    assert summary["kinds"]["chosen"]["split_negative"] == 0.0  # SFT pulls every trained token up
    assert "chosen_rises" in summary["checks"]
    assert "trl-ntk demo: SFT" in capsys.readouterr().out


@pytest.mark.slow
def test_grpo_demo_with_nthr_compares_two_runs(tmp_path, capsys):
    args = ["--steps", "2", "--every-n-steps", "1", "--batch-size", "16", "--probe-prompts", "2", "-q"]
    assert cli.main(["demo", "--trainer", "grpo", "--nthr", "--output-dir", str(tmp_path), *args]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    nthr = summary["nthr_run"]
    assert summary["nthr"] is False and nthr["nthr"] is True
    assert (tmp_path / "dynamics" / "report.html").is_file()
    assert (tmp_path / "nthr" / "dynamics" / "report.html").is_file()
    assert nthr["nthr_stats"]["batches"] == 2 and "nthr_stats" not in summary
    assert {"groups", "delta_observed_mean", "frac_groups_negative"} <= set(summary["lld"])
    printed = capsys.readouterr().out
    assert "GRPO + NTHR" in printed and "completion" in printed
    _assert_grpo_arms(tmp_path, summary, printed)


def _assert_grpo_arms(out, summary: dict, printed: str) -> None:
    """arms.json lists both runs with the reward the trainer logged; the plain report's arms panel holds the table
    of both arms; the share of groups with delta <= 0 matches a count over the run's own lld records."""
    from trl_ntk.output.schema import read_records

    manifest = json.loads((out / "arms.json").read_text())
    assert [a["name"] for a in manifest["arms"]] == ["plain", "nthr"]
    assert [a["run_dir"] for a in manifest["arms"]] == ["dynamics", "nthr/dynamics"]
    table = manifest["table"]
    for index, (arm, run) in enumerate(zip(manifest["arms"], (summary, summary["nthr_run"]), strict=True)):
        assert arm["rewards"]["values"] == run["reward"]["values"]
        assert run["reward"]["first"] == run["reward"]["values"][0]
        deltas = [r["delta_observed"] for r in read_records(out / arm["run_dir"] / "dynamics.jsonl", ["lld"])]
        row = dict(zip(table["columns"], table["rows"][index], strict=True))
        assert row["share delta<=0"] == pytest.approx(sum(d <= 0 for d in deltas) / len(deltas))
        assert row["reward last"] == run["reward"]["last"] and row["arm"] == arm["name"]
    assert summary["arms"] == table and "The arms side by side" in printed
    page = (out / "dynamics" / "report.html").read_text()
    assert 'id="panel-arms"' in page and 'id="arms-table"' in page
    assert 'id="panel-arms"' in (out / "nthr" / "dynamics" / "report.html").read_text()


@pytest.mark.browser
def test_demo_report_renders_every_panel_in_headless_chromium(dpo_demo, tmp_path):
    """`trl-ntk report` on the demo's own output opens in headless Chromium with every panel and no console error
    (the token-attribution panel holds its 'no data' note: this short demo skips the tokens level)."""
    from tests.report.test_render import CHROMIUM, PANEL_IDS, _chromium, _sections

    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    out, status, _ = dpo_demo
    assert status == 0
    report = out / "dynamics" / "report.html"
    assert cli.main(["report", str(out / "dynamics"), "-q"]) == 0 and report.is_file()
    dom = _chromium(["--dump-dom", report.resolve().as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "\n".join(console)
    sections = _sections(dom.stdout)
    assert list(sections) == list(PANEL_IDS)
    for panel_id in ("panel-logp", "panel-squeezing", "panel-prediction", "panel-split"):
        assert 'class="main-svg"' in sections[panel_id], f"{panel_id} has no rendered plot"


@pytest.mark.slow
def test_dpo_demo_with_fixes_shows_the_arms_panel_with_each_arms_changes(tmp_path, capsys):
    """`--fixes`: arms.json lists plain and both fixes; each row's chosen change is the arm's own summary's, and the
    plain report's arms panel holds them."""
    args = ["--steps", "2", "--every-n-steps", "1", "--probe-prompts", "2", "--rows", "32"]
    assert cli.main(["demo", "--fixes", "-q", "--tokens-every-n-steps", "0", "--output-dir", str(tmp_path), *args]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    manifest = json.loads((tmp_path / "arms.json").read_text())
    assert [a["name"] for a in manifest["arms"]] == ["plain", "sft_extension", "dpo_nthr"]
    runs = [summary, summary["fixes"]["sft_extension"], summary["fixes"]["dpo_nthr"]]
    page = (tmp_path / "dynamics" / "report.html").read_text()
    assert 'id="panel-arms"' in page
    for row, run, arm in zip(manifest["table"]["rows"], runs, manifest["arms"], strict=True):
        chosen = summarize(tmp_path / arm["run_dir"])["kinds"]["chosen"]
        assert row[1] == pytest.approx(chosen["logp_end"] - chosen["logp_start"])
        assert row[1] == pytest.approx(run["kinds"]["chosen"]["logp_end"] - run["kinds"]["chosen"]["logp_start"])
        assert f"{row[1]:+.3f}" in page
    assert manifest["table"]["rows"][0][7] == 0.0  # plain's margin cost against itself
