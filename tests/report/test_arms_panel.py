"""The arms panel: present with each arm's values (read back from the folders and `arms.json` the demo writes) when a
comparison ran several arms, absent for a single run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_ntk.demo.run import write_arms
from trl_ntk.demo.summary import summarize
from trl_ntk.report import arms as arms_module
from trl_ntk.report.arms import find_arms, load_arms
from trl_ntk.report.render import build_report

# per arm and step: (chosen, rejected, greedy, argmax along chosen), each the mean of two probes 1 nat apart
DPO_ARMS = {
    "": [(-5.0, -18.0, -4.0, -3.0), (-5.5, -24.0, -3.8, -2.7), (-6.0, -30.0, -3.5, -2.5)],
    "dpo_nthr": [(-5.0, -18.0, -4.0, -3.0), (-5.2, -23.0, -3.9, -2.8), (-5.4, -27.0, -3.7, -2.6)],
}


def _write_run(folder: Path, trainer: str, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    lines = [{"type": "run", "step": 0, "trainer": trainer}, *records]
    (folder / "dynamics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _dpo_records(values: list[tuple[float, ...]]) -> list[dict]:
    out = []
    for step, (chosen, rejected, greedy, argmax) in enumerate(values):
        for kind, value in (("chosen", chosen), ("rejected", rejected), ("greedy", greedy)):
            for probe, offset in (("p1", 0.5), ("p2", -0.5)):
                out.append(
                    {
                        "type": "probe",
                        "step": 10 * step,
                        "kind": kind,
                        "probe_id": f"{probe}-{kind}",
                        "logp_sum": value + offset,
                        "argmax_logp": argmax + offset if kind == "chosen" else value,
                    }
                )
    return out


@pytest.fixture
def dpo_arms(tmp_path):
    """A demo folder of two DPO arms, as `run_demo` leaves it: plain in `dynamics/`, the fix in its subfolder, and
    `arms.json` written by the demo's own `write_arms` from the arms' summaries."""
    summaries = {}
    for name, values in DPO_ARMS.items():
        folder = (tmp_path / name if name else tmp_path) / "dynamics"
        _write_run(folder, "dpo", _dpo_records(values))
        summaries[name] = summarize(folder)
    write_arms(tmp_path, "dpo", summaries)
    return tmp_path


def _figure(monkeypatch, arms):
    figures = []
    monkeypatch.setattr(arms_module, "figure_html", lambda figure, div_id: figures.append(figure) or "")
    panel = arms_module.arms_panel(arms)
    (figure,) = figures
    return panel, figure


def test_dpo_arms_panel_plots_each_arm_from_its_own_records(dpo_arms, monkeypatch):
    arms = load_arms(find_arms(dpo_arms / "dynamics"))
    assert [arm.name for arm in arms.arms] == ["plain", "dpo_nthr"]
    panel, figure = _figure(monkeypatch, arms)
    titles = [a.text for a in figure.layout.annotations]
    assert titles == ["chosen", "rejected", "argmax (chosen)", "greedy"]
    for name, values in DPO_ARMS.items():
        label = name or "plain"
        traces = [t for t in figure.data if t.name == label]
        assert len(traces) == 4
        for column, trace in zip((0, 1, 3, 2), traces, strict=True):  # the titles' order: argmax before greedy
            assert list(trace.x) == [0, 10, 20]
            assert list(trace.y) == pytest.approx([v[column] for v in values])
    # the table: one row per arm, the same numbers the demo prints (end - start, margin cost against plain)
    plain, fix = arms.rows
    assert arms.columns[:5] == ["arm", "chosen change", "rejected change", "argmax change", "greedy change"]
    assert plain[:5] == ["plain", pytest.approx(-1.0), pytest.approx(-12.0), pytest.approx(0.5), pytest.approx(0.5)]
    assert fix[:5] == ["dpo_nthr", pytest.approx(-0.4), pytest.approx(-9.0), pytest.approx(0.4), pytest.approx(0.3)]
    # margin change: plain (-6 + 30) - (-5 + 18) = 11, fix (-5.4 + 27) - 13 = 8.6; cost 2.4
    assert plain[6] == pytest.approx(11.0) and fix[6] == pytest.approx(8.6) and fix[7] == pytest.approx(2.4)
    assert 'id="arms-table"' in panel.body and "+2.400" in panel.body


def test_the_plain_report_shows_the_arms_panel_and_a_single_run_does_not(dpo_arms, tmp_path_factory):
    page = build_report(dpo_arms / "dynamics", progress=False).read_text()
    assert 'id="panel-arms"' in page and "dpo_nthr" in page and "-0.400" in page
    # the fix's own report is listed in the same arms.json (grandparent folder)
    assert 'id="panel-arms"' in build_report(dpo_arms / "dpo_nthr" / "dynamics", progress=False).read_text()
    single = tmp_path_factory.mktemp("single")
    _write_run(single / "dynamics", "dpo", _dpo_records(DPO_ARMS[""]))
    assert find_arms(single / "dynamics") is None
    page = build_report(single / "dynamics", progress=False).read_text()
    assert "panel-arms" not in page and 'id="panel-run"' in page


def test_an_arms_file_that_does_not_list_the_run_or_lists_one_arm_is_ignored(dpo_arms, tmp_path):
    manifest = json.loads((dpo_arms / "arms.json").read_text())
    other = tmp_path / "other"
    _write_run(other / "dynamics", "dpo", _dpo_records(DPO_ARMS[""]))
    (other / "arms.json").write_text(json.dumps({**manifest, "arms": manifest["arms"][1:]}))
    assert find_arms(other / "dynamics") is None  # one arm, not this run
    (other / "arms.json").write_text(json.dumps({**manifest, "arms": manifest["arms"][:1]}))
    assert find_arms(other / "dynamics") is None  # lists this run, but alone
    assert arms_module.arms_panel(None) is None


def test_grpo_arms_panel_plots_reward_and_the_nonpositive_share(tmp_path, monkeypatch):
    deltas = {"": [[-0.2, 0.0, 0.3, 0.1], [0.5, -0.1, 0.2, 0.4]], "nthr": [[0.1, 0.2, -0.3, 0.0], [0.3, 0.2, 0.1, 0.6]]}
    summaries = {}
    for name, steps in deltas.items():
        records = [
            {"type": "lld", "step": 5 * step, "group": group, "delta_observed": delta}
            for step, groups in enumerate(steps)
            for group, delta in enumerate(groups)
        ]
        folder = (tmp_path / name if name else tmp_path) / "dynamics"
        _write_run(folder, "grpo", records)
        summaries[name] = {
            **summarize(folder),
            "reward": {"first": 0.3, "last": 0.5, "mean": 0.4, "steps": [5, 10], "values": [0.3, 0.5]},
            "train_seconds": 12.0,
        }
    write_arms(tmp_path, "grpo", summaries)
    arms = load_arms(tmp_path / "arms.json")
    _, figure = _figure(monkeypatch, arms)
    titles = [a.text for a in figure.layout.annotations]
    assert titles[0].startswith("reward") and titles[1].startswith("share of groups with delta <= 0")
    plain = [t for t in figure.data if t.name == "plain"]
    nthr = [t for t in figure.data if t.name == "nthr"]
    assert list(plain[0].y) == [0.3, 0.5] and list(plain[0].x) == [5, 10]
    # delta <= 0 counts a zero change as displaced: plain step 0 has -0.2 and 0.0
    assert list(plain[1].y) == pytest.approx([0.5, 0.25]) and list(nthr[1].y) == pytest.approx([0.5, 0.0])
    assert list(plain[2].y) == pytest.approx([0.05, 0.25]) and list(nthr[2].y) == pytest.approx([0.0, 0.3])
    columns = arms.columns
    plain_row = dict(zip(columns, arms.rows[0], strict=True))
    assert plain_row["share delta<=0"] == pytest.approx(3 / 8) and plain_row["mean delta"] == pytest.approx(0.15)
    assert plain_row["reward first"] == 0.3 and plain_row["reward last"] == 0.5
