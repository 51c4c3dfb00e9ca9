"""Interactive attribution heat maps in W&B: the report's plotly figure as `wandb.Html` at "tokens" steps, read back
from an offline run; without plotly, the PNG only and one warning."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.synthetic_run import replay, synthetic_events
from tests.output.test_trackers import _wandb_history
from trl_ntk.output.group import SinkGroup
from trl_ntk.output.sinks import JsonlSink, WandbSink
from trl_ntk.output.views import Event

SMALL_RUN = {"kinds": ("chosen", "rejected", "greedy"), "num_prompts": 1, "steps": 4, "every": 2}

# Runs the page's figure script with a stand-in for plotly.js and prints what it would draw.
_NODE_HARNESS = """
const fs = require("fs");
const page = fs.readFileSync(process.argv[1], "utf8");
const data = page.match(/<script type="application\\/json" id="attribution-data">([\\s\\S]*?)<\\/script>/)[1];
const draw = page.match(/<script id="attribution-draw">([\\s\\S]*?)<\\/script>/)[1];
let drawn = null;
global.Plotly = {react: function (target, traces, layout) { drawn = {target, trace: traces[0], layout}; }};
global.document = {getElementById: function () { return {textContent: data}; }};
eval(draw);
process.stdout.write(JSON.stringify(drawn));
"""


def _drawn(page: Path) -> dict:
    """What the page's own script hands to `Plotly.react` (node, with plotly.js replaced by a recorder)."""
    result = subprocess.run(
        ["node", "-e", _NODE_HARNESS, str(page)], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(result.stdout)


def test_wandb_gets_interactive_heatmaps_with_hover_naming_probe_and_training_tokens(tmp_path):
    pytest.importorskip("plotly")
    import wandb

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    events = list(synthetic_events(trainer="dpo", **SMALL_RUN))
    run = wandb.init(project="trl-ntk-tests")
    try:
        group = SinkGroup([JsonlSink(tmp_path / "dynamics.jsonl"), WandbSink()], strict=True)
        replay(group, events)
        group.close()
        run_dir = Path(run.dir).parent
    finally:
        run.finish()

    history = _wandb_history(run_dir)
    token_steps = sorted(step for step, _, *arrays in events if arrays)
    key = "ntk_attribution/interactive_chosen"
    assert sorted(i["train/global_step"] for i in history if f"{key}._type" in i) == token_steps
    sections = {k.split("/")[0] for item in history for k in item if not k.startswith("_")}
    assert "interactive_chosen" not in sections and "ntk_attribution" in sections
    for item in history:  # one payload per step: the PNG, the coloured tokens and the interactive map together
        if f"{key}._type" in item:
            assert item[f"{key}._type"] == "html-file" and item["ntk_attribution/chosen._type"] == "images/separated"
            assert "ntk_attribution/interactive_rejected._type" in item

    item = next(i for i in history if f"{key}._type" in i)
    step = item["train/global_step"]
    page = run_dir / "files" / item[f"{key}.path"]
    text = page.read_text(encoding="utf-8")
    assert '<div id="attribution-heatmap" class="plotly-graph-div">' in text
    assert "Plotly.react" in text and 'src="http' not in text  # plotly.js inlined: opens offline

    # the independent reference: the archive this step's records point at, and the first chosen probe in it
    records, arrays = next((r, a[0]) for s, r, *a in events if s == step and a)
    probe = next(r for r in records if r["type"] == "dynamics" and r["kind"] == "chosen")
    matrix = np.asarray(arrays[probe["probe_id"]])
    probe_tokens = [str(t) for t in arrays[f"{probe['probe_id']}.tokens"]]
    train_tokens = [str(t) for t in arrays["train.tokens"]]
    train_rows = [int(r) for r in arrays["train.row"]]
    assert probe["probe_id"] in text

    if shutil.which("node") is None:
        pytest.skip("node is not installed: the hover text is built by the page's script")
    drawn = _drawn(page)
    trace = drawn["trace"]
    assert trace["type"] == "heatmap" and drawn["target"] == "attribution-heatmap"
    assert np.asarray(trace["z"]).shape == matrix.shape  # the synthetic matrices fit without trimming
    np.testing.assert_allclose(trace["z"], matrix, rtol=1e-3, atol=1e-6)
    for m, l in ((0, 0), (matrix.shape[0] - 1, matrix.shape[1] - 1), (1, 7)):
        hover = trace["text"][m][l]
        assert hover == f"probe token: {probe_tokens[m]}<br>training token: {train_tokens[l]} (row {train_rows[l]})"
    assert "%{z" in trace["hovertemplate"]
    title = drawn["layout"]["title"]["text"]
    assert probe["probe_id"] in title and f"step {step}" in title
    assert re.search(r"sum of a: -?[0-9.e+-]+", title)


def test_without_plotly_wandb_keeps_the_png_and_warns_once(tmp_path, monkeypatch, caplog):
    import wandb

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="trl-ntk-tests")
    payloads = []
    try:
        sink = WandbSink()
        sink._interactive = False  # as constructed where `importlib.util.find_spec("plotly")` is None
        monkeypatch.setattr(sink, "_send", lambda run, payload: payloads.append(payload))
        with caplog.at_level(logging.WARNING, logger="trl_ntk.output.wandb_sink"):
            for step, records, *arrays in synthetic_events(trainer="dpo", **SMALL_RUN):
                sink.write_event(Event(step, records, arrays[0] if arrays else None))
    finally:
        run.finish()
    keys = {key for payload in payloads for key in payload}
    assert "ntk_attribution/chosen" in keys
    assert not any(key.startswith("ntk_attribution/interactive_") for key in keys)
    warnings = [r for r in caplog.records if "plotly is not installed" in r.getMessage()]
    assert len(warnings) == 1 and "PNG" in warnings[0].getMessage()


def test_wandb_sink_sees_plotly_as_missing_when_it_cannot_be_found(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "plotly" else real(name, *a))
    assert WandbSink()._interactive is False


def test_interactive_heatmaps_can_be_switched_off_without_a_warning(monkeypatch, caplog):
    """`TRL_NTK_WANDB_INTERACTIVE=0`: no interactive page is built (the PNGs stay) and no plotly warning is given."""
    from trl_ntk.output.wandb_sink import WandbSink

    monkeypatch.setenv("TRL_NTK_WANDB_INTERACTIVE", "0")
    sink = WandbSink()
    assert sink._interactive is False
    sink._log_interactive_heatmaps(None)  # returns before reading the event
    assert not [r for r in caplog.records if "plotly" in r.getMessage()]
    monkeypatch.setenv("TRL_NTK_WANDB_INTERACTIVE", "1")
    assert WandbSink()._interactive is True
