"""Sinks: the JSONL source of truth, resume truncation, failure isolation, and what W&B / TensorBoard / trackio get."""

from __future__ import annotations

import contextvars
import json
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.synthetic_run import replay, synthetic_events, write_synthetic_run
from trl_ntk.output import schema
from trl_ntk.output.sinks import (
    DYNAMICS_TABLE_COLUMNS,
    PROBE_TABLE_COLUMNS,
    DashboardSink,
    Event,
    JsonlSink,
    RunMemory,
    Sink,
    SinkGroup,
    TensorBoardSink,
    TrackioSink,
    WandbSink,
    aggregate_scalars,
    attributions_file,
    encode_record,
    load_attributions,
    make_sinks,
    read_records,
    resolve_report_to,
    save_attributions,
)

TABLE_TYPES = ("table-file", "incremental-table-file")  # W&B incremental tables, or the fixed ones


def make_record(record_type: str, step: int, **fields) -> dict:
    """A record with only the fields a test needs, on the builders' header."""
    return {**schema.header(record_type, step), **fields}


SMALL_RUN = {"kinds": ("chosen", "rejected", "greedy"), "num_prompts": 1, "steps": 4, "every": 2}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_sink_writes_strict_json_lines_flushed_after_each_event(tmp_path):
    sink = JsonlSink(tmp_path / "dynamics.jsonl")
    record = make_record("probe", 3, probe_id="a", kind="chosen", logp_sum=np.float32(-1.5), entropy_mean=math.nan)
    record["token_logps"] = torch.tensor([-0.5, -1.0])
    sink.write_event(Event(3, [record, make_record("nthr", 3, tau=float("inf"), num_groups=np.int64(2))]))
    lines = _lines(tmp_path / "dynamics.jsonl")  # read before close: flushed per event
    assert [line["type"] for line in lines] == ["probe", "nthr"]
    assert lines[0]["schema_version"] == 2 and lines[0]["step"] == 3 and "time" in lines[0]
    assert lines[0]["logp_sum"] == -1.5 and lines[0]["entropy_mean"] is None
    assert lines[0]["token_logps"] == [-0.5, -1.0]
    assert lines[1]["tau"] is None and lines[1]["num_groups"] == 2
    assert (
        "NaN" not in (tmp_path / "dynamics.jsonl").read_text()
        and "Infinity" not in (tmp_path / "dynamics.jsonl").read_text()
    )
    sink.close()


def test_encode_record_rejects_records_without_type_or_step():
    with pytest.raises(ValueError, match="no 'step' field"):
        encode_record({"type": "probe"})
    with pytest.raises(ValueError, match="unknown record type"):
        make_record("probes_typo", 0)


def test_save_attributions_round_trips_tensors_and_token_lists_without_pickle(tmp_path):
    arrays = {
        "p0-chosen": torch.randn(3, 5, dtype=torch.float64),
        "p0-chosen.tokens": ["The", " cat", "\n"],
        "train.tokens": np.array(["a", "b", "c", "d", "e"]),
        "train.row": np.array([0, 0, 1, 1, 1]),
    }
    relative = save_attributions(tmp_path, 7, arrays)
    assert relative == attributions_file(7) == "attributions/step_7.npz"
    loaded = load_attributions(tmp_path, relative)
    assert loaded["p0-chosen"].dtype == np.float32 and loaded["p0-chosen"].shape == (3, 5)
    np.testing.assert_allclose(loaded["p0-chosen"], arrays["p0-chosen"].numpy(), rtol=1e-6)
    assert loaded["p0-chosen.tokens"].tolist() == ["The", " cat", "\n"]
    assert not list((tmp_path / "attributions").glob("*.tmp"))


def test_truncate_after_drops_later_steps_and_archives_so_a_resumed_run_has_every_step_once(tmp_path):
    path = write_synthetic_run(tmp_path, steps=8, every=2, kinds=("chosen", "rejected"), num_prompts=1)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"schema_version": 2, "type": "probe", "step": 9, "probe_')  # a write cut short by a crash
    assert (tmp_path / attributions_file(6)).exists()

    sink = JsonlSink(path)
    dropped = sink.truncate_after(4)
    assert dropped > 0
    assert max(record["step"] for record in _lines(path)) == 4
    assert (tmp_path / attributions_file(4)).exists() and not (tmp_path / attributions_file(6)).exists()

    # the resumed run goes on from step 5 and writes steps 5.. again
    resumed = [e for e in synthetic_events(steps=8, every=2, kinds=("chosen", "rejected"), num_prompts=1) if e[0] > 4]
    group = SinkGroup([sink], strict=True)
    replay(group, resumed)
    group.close()
    records = read_records(path)
    keys = [(r["type"], r["step"], r.get("probe_id"), r.get("group")) for r in records if r["type"] != "probes"]
    assert len(keys) == len(set(keys))
    assert {r["step"] for r in records if r["type"] == "probe"} == {0, 2, 4, 6, 8}
    assert (tmp_path / attributions_file(6)).exists()


def test_read_records_skips_a_partial_last_line(tmp_path, caplog):
    path = write_synthetic_run(tmp_path, **SMALL_RUN)
    count = len(read_records(path))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"type": "probe", "st')
    assert len(read_records(path)) == count
    assert "skipped 1 line" in caplog.text


# --------------------------------------------------------------------------------------------- views of an event


def test_aggregate_scalars_are_means_per_kind_and_step_not_per_token():
    records = [
        make_record("probe", 2, probe_id="a", kind="chosen", logp_sum=-2.0, argmax_logp=-1.0),
        make_record("probe", 2, probe_id="b", kind="chosen", logp_sum=-4.0, argmax_logp=math.nan),
        make_record("probe", 2, probe_id="c", kind="my kind/x", logp_sum=-1.0),
        make_record(
            "dynamics",
            2,
            probe_id="a",
            kind="chosen",
            observed=-0.5,
            predicted=-0.4,
            gap=-0.1,
            history=0.0,
            split={"positive": 0.2, "negative": -0.6},
            groups={"chosen": 0.1, "rejected": -0.5},
        ),
        make_record("lld", 2, group=0, delta_observed=-0.2, delta_predicted=-0.1, delta_from_negative=-0.3, gwhes=2.0),
        make_record("lld", 2, group=1, delta_observed=0.4, delta_predicted=0.3, delta_from_negative=-0.1, gwhes=None),
        make_record("nthr", 3, frac_downweighted=0.25, tau=0.5, eta=0.6, s_neg_mean=0.1, seconds=0.01),
        make_record("status", 3, analysis_failures=1, sink_failures={"jsonl": 0, "wandb": 2}, message="x"),
    ]
    scalars = aggregate_scalars(records)
    assert set(scalars) == {2, 3}
    at_2 = scalars[2]
    assert at_2["ntk_logp/chosen"] == -3.0 and at_2["ntk_squeeze/argmax_logp/chosen"] == -1.0
    assert at_2["ntk_logp/my_kind_x"] == -1.0
    assert at_2["ntk_split/positive/chosen"] == 0.2 and at_2["ntk_split/negative/chosen"] == -0.6
    assert at_2["ntk_split/group_rejected/chosen"] == -0.5
    assert at_2["ntk_lld/delta_observed"] == pytest.approx(0.1) and at_2["ntk_lld/frac_groups_negative"] == 0.5
    assert at_2["ntk_lld/gwhes"] == 2.0  # mean over the groups that have one (a group that is not mixed has none)
    assert scalars[3] == {
        "ntk_nthr/frac_downweighted": 0.25,
        "ntk_nthr/tau": 0.5,
        "ntk_nthr/eta": 0.6,
        "ntk_nthr/s_neg_mean": 0.1,
        "ntk_nthr/seconds": 0.01,
        "ntk_health/analysis_failures": 1.0,
        "ntk_health/sink_failures": 2.0,
    }
    assert not any(key.startswith("ntk_squeeze/entropy") for key in at_2)  # no value, no key


def test_event_views_join_texts_and_earlier_scores_and_draw_heatmaps():
    events = synthetic_events(**SMALL_RUN)
    memory = RunMemory()
    for step, records, *arrays in events:
        event = Event(step, records, arrays[0] if arrays else None, memory=memory.copy())
        if any(r["type"] == "dynamics" for r in records):
            break
        memory.update(records)
    columns, rows = event.tables["ntk_tables/dynamics"]
    assert tuple(columns) == DYNAMICS_TABLE_COLUMNS
    row = dict(zip(columns, rows[0]))
    assert row["prompt"].startswith("Question") and row["response"]
    assert isinstance(row["logp_sum"], float)  # from the probe record of the earlier event
    assert "ntk_tables/probes" not in event.tables
    assert set(event.heatmaps) == {"ntk_attribution/chosen", "ntk_attribution/rejected", "ntk_attribution/greedy"}
    image, caption = event.heatmaps["ntk_attribution/chosen"][0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and "p0-chosen" in caption
    html_text, text = event.token_texts["ntk_attribution/tokens_chosen"]
    assert "<span title=" in html_text and "p0-chosen" in text
    assert event.attribution_values is not None and event.attribution_values.size > 0


# ------------------------------------------------------------------------------------------- failure isolation


class RaisingSink(DashboardSink):
    """A dashboard whose every write fails, as a W&B outage would."""

    name = "raising"

    def log_scalars(self, step, scalars):
        raise ConnectionError("dashboard unreachable")

    def log_table(self, step, key, columns, rows):
        raise ConnectionError("dashboard unreachable")

    def log_images(self, step, key, images, captions):
        raise ConnectionError("dashboard unreachable")

    def log_text(self, step, key, text, html=None):
        raise ConnectionError("dashboard unreachable")

    def log_histogram(self, step, key, values):
        raise ConnectionError("dashboard unreachable")

    def log_config(self, config):
        raise ConnectionError("dashboard unreachable")


def test_a_failing_sink_warns_once_is_counted_and_never_loses_the_jsonl(tmp_path):
    path = tmp_path / "dynamics.jsonl"
    group = SinkGroup([RaisingSink(), JsonlSink(path)])
    assert [sink.name for sink in group.sinks] == ["jsonl", "raising"]
    events = synthetic_events(**SMALL_RUN)
    with pytest.warns(RuntimeWarning, match="sink 'raising' failed") as caught:
        replay(group, events)
    assert len([w for w in caught if "raising" in str(w.message)]) == 1
    group.close()
    drawn = [records for _, records, *_ in events if records[0]["type"] != "probes"]  # a catalogue draws nothing
    assert group.failures == {"jsonl": 0, "raising": len(drawn)}
    assert len(read_records(path)) == sum(len(records) for _, records, *_ in events)
    status = group.status()
    assert status["sink_failures"]["raising"] == len(drawn) and "ConnectionError" in status["message"]


def test_strict_sink_group_reraises():
    group = SinkGroup([RaisingSink()], strict=True)
    with pytest.raises(ConnectionError):
        group.write(make_record("probe", 0, probe_id="a", kind="chosen", logp_sum=-1.0))


def test_a_failing_attribution_save_is_counted_and_returns_none(tmp_path):
    group = SinkGroup([JsonlSink(tmp_path / "dynamics.jsonl")])
    (tmp_path / "attributions").write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="sink 'jsonl' failed"):
        assert group.save_attributions(2, {"a": np.zeros((1, 1))}) is None
    assert group.failures["jsonl"] == 1
    group.write(make_record("status", 2, analysis_failures=0, sink_failures=group.failures, message=""))
    group.close()
    assert read_records(tmp_path / "dynamics.jsonl")[0]["sink_failures"] == {"jsonl": 1}


# ------------------------------------------------------------------------------------------------------ factory


class _Args:
    def __init__(self, report_to, output_dir):
        self.report_to, self.output_dir = report_to, str(output_dir)


class _Trainer:
    def __init__(self, report_to, output_dir, callbacks=()):
        self.args = _Args(report_to, output_dir)
        self.callback_handler = types.SimpleNamespace(callbacks=list(callbacks))


def test_make_sinks_follows_the_trainers_report_to_and_can_be_overridden(tmp_path):
    trainer = _Trainer(["tensorboard", "codecarbon"], tmp_path)
    group = make_sinks(trainer=trainer)
    assert [sink.name for sink in group.sinks] == ["jsonl", "tensorboard"]
    assert all(isinstance(sink, Sink) for sink in [*group.sinks, WandbSink(), RaisingSink()])
    assert group.run_dir == tmp_path / "dynamics"
    assert [sink.name for sink in make_sinks("none", tmp_path, trainer=trainer).sinks] == ["jsonl"]
    assert [sink.name for sink in make_sinks(["wandb"], tmp_path).sinks] == ["jsonl", "wandb"]
    assert resolve_report_to("all") == ["wandb", "tensorboard"]  # trackio is not installed here
    assert resolve_report_to(None) == [] and resolve_report_to(["none"]) == []
    with pytest.raises(ValueError, match="needs output_dir"):
        make_sinks("none")


def test_trackio_requested_but_missing_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "trackio", raising=False)
    if __import__("importlib").util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed")
    with pytest.raises(ImportError, match="pip install trackio"):
        make_sinks(["trackio"], tmp_path)


# -------------------------------------------------------------------------------------------------------- W&B


def _wandb_records(run_dir: Path) -> list[dict]:
    """The run's transaction log, read back with the W&B command line (`wandb leet inspect --json`)."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in _wandb_records(run_dir) if r["type"] == "history"]


def _spy_on_log(monkeypatch, run):
    calls = []
    original = run.log

    def log(data, *args, **kwargs):
        calls.append((dict(data), args, kwargs))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(run, "log", log)
    return calls


def test_wandb_sink_logs_kind_means_tables_and_images_at_train_global_step(tmp_path, monkeypatch):
    import wandb

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="trl-ntk-tests")
    try:
        calls = _spy_on_log(monkeypatch, run)
        group = SinkGroup([JsonlSink(tmp_path / "dynamics.jsonl"), WandbSink()], strict=True)
        replay(group, synthetic_events(trainer="grpo", **SMALL_RUN))
        group.close()
        assert wandb.run is run, "the sink finished a run it did not start"
        run_dir = Path(run.dir).parent
        assert run.config["trl_ntk"]["trainer"] == "grpo"
    finally:
        run.finish()

    assert calls and all(not args and "step" not in kwargs for _, args, kwargs in calls)
    assert all("train/global_step" in data for data, _, _ in calls)
    history = _history(run_dir)
    logp = {item["train/global_step"]: item["ntk_logp/chosen"] for item in history if "ntk_logp/chosen" in item}
    assert sorted(logp) == [0, 2, 4]
    jsonl = read_records(tmp_path / "dynamics.jsonl", types=["probe"])
    assert logp[2] == pytest.approx(next(r["logp_sum"] for r in jsonl if r["step"] == 2 and r["kind"] == "chosen"))

    analysis = [item for item in history if "ntk_change/observed/chosen" in item]
    assert sorted(item["train/global_step"] for item in analysis) == [0, 2]
    item = analysis[0]
    for key in (
        "ntk_change/predicted/rejected",
        "ntk_change/gap/greedy",
        "ntk_split/positive/chosen",
        "ntk_split/negative/chosen",
        "ntk_change/history/chosen",
        "ntk_lld/delta_observed",
    ):
        assert key in item, key
    assert item["ntk_attribution/chosen._type"] == "images/separated"
    assert item["ntk_attribution/tokens_chosen._type"] == "html-file"
    assert item["ntk_tables/dynamics._type"] in TABLE_TYPES and item["ntk_tables/dynamics.ncols"] == len(
        DYNAMICS_TABLE_COLUMNS
    )
    table = json.loads((run_dir / "files" / item["ntk_tables/dynamics.path"]).read_text())
    assert table["columns"] == list(DYNAMICS_TABLE_COLUMNS) and len(table["data"]) == 3
    assert any(i.get("ntk_tables/probes.ncols") == len(PROBE_TABLE_COLUMNS) for i in history)
    assert any("ntk_nthr/frac_downweighted" in i for i in history)
    metric_names = {key.split(".")[0] for i in history for key in i if not key.startswith("_")}
    assert len(metric_names) < 100  # per kind, never per token or per probe


def test_wandb_is_never_started_when_report_to_lacks_it(tmp_path):
    import wandb

    group = make_sinks(["tensorboard"], tmp_path)
    replay(group, synthetic_events(**SMALL_RUN))
    group.close()
    assert wandb.run is None
    sink = WandbSink(start_run=False)  # made by hand, not asked to start one
    group = SinkGroup([sink], strict=True)
    replay(group, synthetic_events(**SMALL_RUN))
    group.close()
    assert wandb.run is None
    assert not list(Path(os.environ["WANDB_DIR"]).glob("**/*.wandb"))


def test_wandb_sink_starts_a_run_when_asked_and_none_is_open_and_finishes_only_that_run(tmp_path):
    import wandb

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    group = make_sinks(["wandb"], tmp_path)
    try:
        group.write(make_record("probe", 5, probe_id="a", kind="chosen", logp_sum=-2.5))
        run = wandb.run
        assert run is not None
        run_dir = Path(run.dir).parent
    finally:
        group.close()
    assert wandb.run is None
    history = _history(run_dir)
    assert [(i["train/global_step"], i["ntk_logp/chosen"]) for i in history] == [(5, -2.5)]


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_sink_writes_scalars_images_and_text_readable_by_event_accumulator(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    group = SinkGroup([JsonlSink(tmp_path / "dynamics.jsonl"), TensorBoardSink(log_dir=log_dir)], strict=True)
    replay(group, synthetic_events(**SMALL_RUN))
    group.close()
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert [event.step for event in accumulator.Scalars("ntk_logp/chosen")] == [0, 2, 4]
    assert [event.step for event in accumulator.Scalars("ntk_change/observed/rejected")] == [0, 2]
    assert "ntk_attribution/chosen/0" in tags["images"]
    assert {
        "ntk_tables/probes/text_summary",
        "ntk_tables/dynamics/text_summary",
        "ntk_health/config/text_summary",
    } <= set(tags["tensors"])
    text = accumulator.Tensors("ntk_tables/dynamics/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| step | probe_id |" in text and "p0-chosen" in text


def test_tensorboard_sink_reuses_the_trainers_writer_and_leaves_it_open(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    writer = SummaryWriter(log_dir=str(tmp_path / "trainer_tb"))
    trainer = _Trainer(["tensorboard"], tmp_path, callbacks=[TensorBoardCallback(tb_writer=writer)])
    group = make_sinks(trainer=trainer, strict=True)
    sink = group.sinks[1]
    assert sink.writer is writer
    group.write(make_record("probe", 1, probe_id="a", kind="chosen", logp_sum=-1.0))
    group.close()
    assert writer.file_writer is not None  # not closed by the sink
    writer.close()
    assert list((tmp_path / "trainer_tb").glob("events.out.tfevents.*"))
    assert not (tmp_path / "dynamics" / "tensorboard").exists()


# ------------------------------------------------------------------------------------------------------ trackio


class _FakeTrackio(types.ModuleType):
    """The slice of trackio's wandb-like API the sink uses, recording every call."""

    def __init__(self):
        super().__init__("trackio")
        self.context_vars = types.SimpleNamespace(current_run=contextvars.ContextVar("run", default=None))
        self.runs = []
        self.Image = lambda value, caption=None: ("image", value.shape, caption)
        self.Table = lambda columns=None, data=None: ("table", tuple(columns), len(data))
        self.Markdown = lambda text: ("markdown", text)
        self.Histogram = lambda sequence, num_bins=64: ("histogram", len(sequence), num_bins)

    def init(self, project, **kwargs):
        run = types.SimpleNamespace(logged=[], finished=False, config={}, project=project)
        run.log = lambda metrics, **kw: run.logged.append((metrics, kw))
        run.finish = lambda: setattr(run, "finished", True)
        self.context_vars.current_run.set(run)
        self.runs.append(run)
        return run


def test_trackio_sink_logs_with_train_global_step_and_finishes_only_its_own_run(monkeypatch):
    fake = _FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", fake)
    group = SinkGroup([TrackioSink(start_run=True)], strict=True)
    replay(group, synthetic_events(**SMALL_RUN))
    group.close()
    (run,) = fake.runs
    assert run.finished and run.config["trl_ntk"]["trainer"] == "dpo"
    assert all(kw == {} and "train/global_step" in metrics for metrics, kw in run.logged)
    steps = [m["train/global_step"] for m, _ in run.logged if "ntk_logp/chosen" in m]
    assert steps == [0, 2, 4]
    assert any("ntk_attribution/chosen/0" in m for m, _ in run.logged)

    other = _FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", other)
    users_run = other.init(project="mine")
    group = SinkGroup([TrackioSink(start_run=True)], strict=True)
    group.write(make_record("probe", 1, probe_id="a", kind="chosen", logp_sum=-1.0))
    group.close()
    assert other.runs == [users_run] and not users_run.finished and users_run.logged


def test_dashboard_sink_write_accepts_single_records_and_remembers_probe_texts():
    logged = []

    class Recorder(RaisingSink):
        name = "recorder"

        def log_table(self, step, key, columns, rows):
            logged.append((step, key, dict(zip(columns, rows[0]))))

        def log_scalars(self, step, scalars):
            logged.append((step, "scalars", scalars))

        def log_config(self, config):
            logged.append((0, "config", config))

    sink = Recorder()
    events = synthetic_events(**SMALL_RUN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _, records, *_ in events[:3]:  # run, probes, probe records of step 0
            for record in records:
                sink.write(record)
    tables = [row for _, key, row in logged if key == "ntk_tables/probes"]
    assert tables and tables[0]["prompt"].startswith("Question")


def test_tensorboard_gets_one_custom_scalars_layout_with_the_dashboard_sections(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from trl_ntk.output.views import SECTIONS, custom_scalar_layout

    log_dir = tmp_path / "tb"
    group = SinkGroup([TensorBoardSink(log_dir=log_dir)], strict=True)
    replay(group, synthetic_events(**SMALL_RUN))
    group.close()
    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    titles = [category.title for category in layout.category]
    assert titles == list(custom_scalar_layout()) and set(titles) <= set(SECTIONS)
    logp = next(category for category in layout.category if category.title == "ntk_logp")
    assert logp.chart[0].multiline.tag == ["ntk_logp/.*"]
    split = next(category for category in layout.category if category.title == "ntk_split")
    assert split.chart[0].multiline.tag == ["ntk_split/positive/.*", "ntk_split/negative/.*"]


def test_run_summary_has_start_end_peak_change_per_kind_and_the_prediction_accuracy():
    from trl_ntk.output.views import run_summary

    history = {0: {"ntk_logp/chosen": -5.0}, 1: {"ntk_logp/chosen": -4.0}, 2: {"ntk_logp/chosen": -7.0}}
    records = [
        make_record("dynamics", 0, kind="chosen", observed=1.0, predicted=0.5),
        make_record("dynamics", 1, kind="chosen", observed=-3.0, predicted=-2.0),
        make_record("dynamics", 1, kind="rejected", observed=2.0, predicted=2.5),
        make_record("lld", 1, group=0, delta_observed=-0.2, delta_predicted=-0.1),
        make_record("lld", 1, group=1, delta_observed=0.4, delta_predicted=0.3),
        make_record("nthr", 1, frac_downweighted=0.25, tau=0.5),
    ]
    summary = run_summary(history, records)
    assert summary["ntk/chosen/logp_start"] == -5.0 and summary["ntk/chosen/logp_end"] == -7.0
    assert summary["ntk/chosen/logp_peak"] == -4.0 and summary["ntk/chosen/logp_change"] == -2.0
    assert summary["ntk/prediction/median_abs_gap"] == 0.5  # |gaps| 0.5, 1.0, 0.5
    assert summary["ntk/prediction/correlation"] == pytest.approx(np.corrcoef([1, -3, 2], [0.5, -2, 2.5])[0, 1])
    assert summary["ntk/lld/delta_observed_mean"] == pytest.approx(0.1)
    assert summary["ntk/nthr/frac_downweighted_mean"] == 0.25 and summary["ntk/nthr/tau_mean"] == 0.5


def test_nthr_scalars_are_left_to_the_trainer_when_the_sinks_follow_one(tmp_path):
    logged = []

    class Recorder(RaisingSink):
        name = "recorder"

        def log_scalars(self, step, scalars):
            logged.append(dict(scalars))

    record = make_record("nthr", 2, frac_downweighted=0.25, tau=0.5)
    SinkGroup([Recorder(skip_nthr_scalars=True)], strict=True).write(record)
    assert logged == []  # the trainer's train/nthr/* has them; no second key
    SinkGroup([Recorder()], strict=True).write(record)
    assert logged == [{"ntk_nthr/frac_downweighted": 0.25, "ntk_nthr/tau": 0.5}]
    trainer = _Trainer(["wandb", "tensorboard"], tmp_path)
    assert all(sink.skip_nthr_scalars for sink in make_sinks(trainer=trainer).sinks[1:])
    assert not make_sinks(["wandb"], tmp_path / "alone").sinks[1].skip_nthr_scalars


# --------------------------------------------------------------------------------------------------- truth guard


def _guarded_events() -> list[tuple[int, list[dict]]]:
    """Step 0 trusted (exact check), step 1 not (cosine 0.9), then the status record counting it."""

    def dynamics(step: int, probe_id: str, cosine: float, relative_error: float, trusted: bool) -> dict:
        check = {"cosine": cosine, "relative_error": relative_error, "clip_scale": 1.0}
        reason = None if trusted else "gradient check cosine 0.9"
        fields = {"observed": 0.1, "predicted": 0.1, "gap": 0.0, "history": 0.0}
        return make_record(
            "dynamics", step, probe_id=probe_id, kind="chosen", gradient_check=check, trusted=trusted,
            trust_reason=reason, **fields,
        )  # fmt: skip

    step_0 = [dynamics(0, p, 1 - 1e-12, 1e-6, True) for p in ("a", "b")]
    step_1 = [dynamics(1, p, 0.9, 0.45, False) for p in ("a", "b")]
    status = make_record("status", 1, analysis_failures=0, sink_failures={}, message="", untrusted_steps=1)
    return [(0, step_0), (1, [*step_1, status])]


def test_aggregate_scalars_carry_the_truth_guard_per_step():
    scalars = aggregate_scalars([r for _, records in _guarded_events() for r in records])
    assert scalars[0]["ntk_health/gradient_cosine"] == pytest.approx(1 - 1e-12, abs=1e-15)
    assert scalars[0]["ntk_health/gradient_relative_error"] == 1e-6 and scalars[0]["ntk_health/trusted"] == 1.0
    assert "ntk_health/untrusted_steps" not in scalars[0]
    assert scalars[1]["ntk_health/gradient_cosine"] == 0.9 and scalars[1]["ntk_health/trusted"] == 0.0
    assert scalars[1]["ntk_health/gradient_relative_error"] == 0.45 and scalars[1]["ntk_health/untrusted_steps"] == 1


def test_wandb_and_tensorboard_show_the_truth_guard_under_ntk_health(tmp_path):
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="trl-ntk-tests")
    try:
        group = SinkGroup([WandbSink(), TensorBoardSink(log_dir=tmp_path / "tb")], strict=True)
        for step, records in _guarded_events():
            group.write_event(step, records)
        group.close()
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    history = _history(run_dir)
    cosine = {
        i["train/global_step"]: i["ntk_health/gradient_cosine"] for i in history if "ntk_health/gradient_cosine" in i
    }
    assert cosine == {0: pytest.approx(1.0), 1: pytest.approx(0.9)}
    assert [i["ntk_health/untrusted_steps"] for i in history if "ntk_health/untrusted_steps" in i] == [1]
    assert [i["ntk_health/trusted"] for i in history if "ntk_health/trusted" in i] == [1, 0]

    accumulator = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tb_cosine = [(e.step, e.value) for e in accumulator.Scalars("ntk_health/gradient_cosine")]
    assert tb_cosine == [(0, pytest.approx(1.0)), (1, pytest.approx(0.9))]
    assert [(e.step, e.value) for e in accumulator.Scalars("ntk_health/untrusted_steps")] == [(1, 1.0)]
