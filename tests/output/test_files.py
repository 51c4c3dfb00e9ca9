"""The run folder under faults: disk full during the JSONL and `.npz` writes, a write cut mid-character followed by
resume, a fresh run into a used folder, two writers, non-finite values, the status record, and a W&B that cannot
start."""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tests.fixtures.synthetic_run import replay, synthetic_events, write_synthetic_run
from trl_ntk.output import files, schema
from trl_ntk.output.files import JsonlSink, RunFolderInUse
from trl_ntk.output.schema import read_jsonl, read_records
from trl_ntk.output.sinks import SinkGroup, WandbSink
from trl_ntk.output.views import Event

SMALL_RUN = {"kinds": ("chosen", "rejected"), "num_prompts": 1, "steps": 4, "every": 2}


class DiskFullAfter:
    """A binary file whose writes fail with ENOSPC once `budget` bytes went through, after writing part of the data
    (what a full disk does to a write in the middle of a line)."""

    def __init__(self, handle, budget: int):
        self.handle, self.budget = handle, budget

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) <= self.budget:
            self.budget -= len(data)
            return self.handle.write(data)
        self.handle.write(data[: max(self.budget, 1)])
        self.budget = 0
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _disk_full(monkeypatch, budget: int, suffix: str) -> list[DiskFullAfter]:
    real, opened = files.open_binary, []

    def open_binary(path, mode):
        handle = real(path, mode)
        if not str(path).endswith(suffix):
            return handle
        opened.append(DiskFullAfter(handle, budget))
        return opened[-1]

    monkeypatch.setattr(files, "open_binary", open_binary)
    return opened


def test_disk_full_mid_line_leaves_only_complete_lines_and_later_writes_go_on(tmp_path, monkeypatch):
    path = tmp_path / "dynamics.jsonl"
    first = [schema.status_record(0, 0, {}, "é" * 50)]
    budget = len((schema.encode_record(first[0]) + "\n").encode()) + 200  # the second write fails inside a line
    opened = _disk_full(monkeypatch, budget, ".jsonl")
    group = SinkGroup([JsonlSink(path)])
    group.write_event(0, first)
    probes = [schema.probe_record(1, probe_id=f"p{i}", prompt_id="p", kind="chosen", logp_sum=-1.0) for i in range(9)]
    with pytest.warns(RuntimeWarning, match="sink 'jsonl' failed .*No space left"):
        group.write_event(1, probes)
    assert group.failures == {"jsonl": 1}
    opened[0].budget = 10**9  # space is back
    group.write_event(2, [schema.status_record(2, 0, group.failures, "")])
    group.close()
    found = read_jsonl(path)
    assert found.damaged_lines == 0  # the torn line was rolled back
    assert [(r["type"], r["step"]) for r in found.records] == [("status", 0), ("status", 2)]


def test_disk_full_during_an_archive_leaves_no_archive_and_no_temporary_file(tmp_path, monkeypatch):
    _disk_full(monkeypatch, 100, ".tmp")
    group = SinkGroup([JsonlSink(tmp_path / "dynamics.jsonl")])
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert group.save_attributions(3, {"p0": np.random.default_rng(0).normal(size=(40, 50))}) is None
    assert group.failures == {"jsonl": 1}
    assert not list(tmp_path.glob("attributions/*"))
    group.close()


def test_resume_after_a_write_cut_mid_character_truncates_on_bytes_and_keeps_every_step_once(tmp_path):
    events = synthetic_events(**SMALL_RUN)
    path = write_synthetic_run(tmp_path, **SMALL_RUN)
    torn = schema.encode_record(schema.probes_record(5, [{"probe_id": "x", "prompt": "日本"}])).encode()
    with open(path, "ab") as handle:
        handle.write(torn[: torn.index("本".encode()) + 1])  # cut inside a 3-byte character
    sink = JsonlSink(path)
    assert sink.truncate_after(2) > 0
    group = SinkGroup([sink], strict=True)
    group.write_event(3, [schema.run_record(3, "dpo", {}, {}, 2)])
    replay(group, [event for event in events if event[0] > 2])
    group.close()
    found = read_jsonl(path)
    assert found.damaged_lines == 0
    runs = [r for r in found.records if r["type"] == "run"]
    assert [r["resumed_from"] for r in runs] == [None, 2] and runs[0]["run_id"] != runs[1]["run_id"]
    keys = [(r["type"], r["step"], r.get("probe_id")) for r in found.records if r["type"] in ("probe", "dynamics")]
    assert len(keys) == len(set(keys))
    assert sorted({r["step"] for r in found.records if r["type"] == "probe"}) == [0, 2, 4]


def test_a_fresh_run_into_a_used_folder_sets_the_old_run_aside_with_a_warning(tmp_path):
    write_synthetic_run(tmp_path, **SMALL_RUN)
    old = read_records(tmp_path / "dynamics.jsonl")
    with pytest.warns(UserWarning, match="held the records of an earlier run; they were moved to"):
        write_synthetic_run(tmp_path, **{**SMALL_RUN, "steps": 2})
    new = read_records(tmp_path / "dynamics.jsonl")
    assert len({r["run_id"] for r in new}) == 1 and {r["run_id"] for r in new} != {r["run_id"] for r in old}
    assert max(r["step"] for r in new) == 2
    (previous,) = (tmp_path / "previous").iterdir()
    assert read_records(previous / "dynamics.jsonl") == old
    assert (previous / "attributions" / "step_2.npz").exists() and not (tmp_path / "attributions/step_2.npz").exists()


def test_two_writers_on_one_folder_the_second_is_refused_and_nothing_is_mixed(tmp_path):
    path = tmp_path / "dynamics.jsonl"
    first, second = SinkGroup([JsonlSink(path)]), SinkGroup([JsonlSink(path)])
    first.write_event(0, [schema.status_record(0, 0, {}, "first")])
    with pytest.warns(RuntimeWarning, match="being written by another run"):
        second.write_event(0, [schema.status_record(0, 0, {}, "second")])
    second.write_event(1, [schema.status_record(1, 0, {}, "second")])
    first.write_event(1, [schema.status_record(1, 0, {}, "first")])
    assert second.failures == {"jsonl": 2} and "RunFolderInUse" in second.status()["message"]
    first.close()
    second.close()
    assert [r["message"] for r in read_records(path)] == ["first", "first"]


def test_a_writer_in_another_process_is_refused(tmp_path):
    path = tmp_path / "dynamics.jsonl"
    holder = JsonlSink(path)
    holder.write_records([schema.status_record(0, 0, {}, "holder")])
    code = (
        "import sys; from trl_ntk.output.files import JsonlSink, RunFolderInUse; from trl_ntk.output import schema\n"
        f"sink = JsonlSink({str(path)!r})\n"
        "try:\n    sink.write_records([schema.status_record(0, 0, {}, 'intruder')])\n"
        "except RunFolderInUse as error:\n    print('refused:', error); sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3 and "being written by another run" in result.stdout, result.stderr[-2000:]
    holder.close()
    assert [r["message"] for r in read_records(path)] == ["holder"]


def test_a_closed_writer_releases_the_folder_and_a_resume_takes_it(tmp_path):
    sink = JsonlSink(tmp_path / "dynamics.jsonl")
    sink.write_records([schema.status_record(0, 0, {}, "")])
    sink.close()
    again = JsonlSink(tmp_path / "dynamics.jsonl")
    again.truncate_after(0)  # a resume holds the folder from the truncation on
    with pytest.raises(RunFolderInUse):
        JsonlSink(tmp_path / "dynamics.jsonl").truncate_after(0)
    again.write_records([schema.status_record(1, 0, {}, "")])
    again.close()
    assert [r["step"] for r in read_records(tmp_path / "dynamics.jsonl")] == [0, 1]


def test_non_finite_values_are_written_as_null_with_one_warning_naming_the_fields(tmp_path):
    sink = JsonlSink(tmp_path / "dynamics.jsonl")
    record = schema.dynamics_record(
        0, probe_id="a", prompt_id="p", kind="chosen", observed=math.nan, predicted=1.0, predicted_current=math.inf
    )
    with pytest.warns(RuntimeWarning, match=r"dynamics.gap, dynamics.observed, dynamics.predicted_current"):
        sink.write_event(Event(0, [record]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.write_event(Event(1, [record]))  # the same fields again: no second warning
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "dynamics.jsonl").read_text().splitlines()]
    assert all(line["predicted_current"] is None and line["observed"] is None for line in lines)
    assert lines[0]["predicted"] == 1.0


def test_write_status_writes_the_failure_counts_so_far(tmp_path):
    group = SinkGroup([JsonlSink(tmp_path / "dynamics.jsonl")])
    record = group.write_status(4, 1, "step 4: RuntimeError: boom")
    group.write_status(9, 2)
    group.close()
    statuses = read_records(tmp_path / "dynamics.jsonl", types=["status"])
    assert record["type"] == "status" and [s["step"] for s in statuses] == [4, 9]
    assert statuses[0] == {**statuses[0], "analysis_failures": 1, "sink_failures": {"jsonl": 0}}
    assert statuses[0]["message"] == "step 4: RuntimeError: boom" and statuses[1]["analysis_failures"] == 2


def test_wandb_that_cannot_start_is_tried_once_then_off_for_the_run_and_counted(tmp_path, monkeypatch):
    import wandb

    calls = []

    def init(*args, **kwargs):
        calls.append(kwargs)
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setattr(wandb, "init", init)
    group = SinkGroup([JsonlSink(tmp_path / "dynamics.jsonl"), WandbSink(start_run=True)])
    events = synthetic_events(**SMALL_RUN)
    with pytest.warns(RuntimeWarning, match="sink 'wandb' failed .*network is unreachable"):
        replay(group, events)
    group.close()
    assert len(calls) == 1
    assert group.failures["jsonl"] == 0 and group.failures["wandb"] >= len(events) - 1
    assert "off for this run" in group.last_error
    assert len(read_records(tmp_path / "dynamics.jsonl")) == sum(len(records) for _, records, *_ in events)


@pytest.mark.slow
def test_the_callback_added_twice_writes_one_run_and_the_second_is_refused_with_a_warning(tmp_path):
    from tests import trainer_factory
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    trainer = trainer_factory.sft_trainer(tmp_path, max_steps=2, report_to="none", n=8)
    for _ in range(2):
        trainer.add_callback(
            LearningDynamicsCallback(trainer, every_n_steps=1, attribution="sums", num_prompts=1, generate=False)
        )
    with pytest.warns(RuntimeWarning, match="being written by another run .*add the callback once"):
        trainer.train()
    assert trainer.state.global_step == 2
    found = read_jsonl(tmp_path / "dynamics" / "dynamics.jsonl")
    assert found.damaged_lines == 0 and len({r["run_id"] for r in found.records}) == 1
    assert [r["type"] for r in found.records].count("run") == 1
    keys = [(r["type"], r["step"], r.get("probe_id")) for r in found.records if r["type"] in ("probe", "dynamics")]
    assert len(keys) == len(set(keys))


def test_kill_9_while_writing_then_report_reads_every_complete_record(tmp_path):
    import signal

    from trl_ntk.report.render import main as report_main

    path = tmp_path / "dynamics.jsonl"
    code = (
        "import sys\nfrom tests.fixtures.synthetic_run import synthetic_events\n"
        "from trl_ntk.output.sinks import JsonlSink, SinkGroup\n"
        f"group = SinkGroup([JsonlSink({str(path)!r})], strict=True)\n"
        "events = synthetic_events(kinds=('chosen', 'rejected'), num_prompts=1, steps=4, every=2, attribution='sums')\n"
        "group.write_event(*events[0][:2])\nprint('ready', flush=True)\n"
        "while True:\n    for step, records, *_ in events[1:]:\n        group.write_event(step, records)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(process.stdout.readline, "")
        assert any(line.strip() == "ready" for line in lines)  # other output (library banners) may come first
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    found = read_jsonl(path)
    assert found.damaged_lines <= 1 and found.records[0]["type"] == "run"
    assert report_main([str(tmp_path), "-q"]) == 0 and (tmp_path / "report.html").is_file()
