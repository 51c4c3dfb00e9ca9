"""LearningDynamicsCallback with the trainer's own trackers: W&B (offline, read back with `wandb leet inspect`),
TensorBoard (read back with `EventAccumulator`), no run when W&B is not asked for, and a failing sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import trainer_factory
from trl_ntk.integration.callbacks import LearningDynamicsCallback
from trl_ntk.output import sinks
from trl_ntk.output.sinks import DYNAMICS_TABLE_COLUMNS, PROBE_TABLE_COLUMNS, read_records

MAX_STEPS = 3
TOKEN_STEPS = [0, 2]  # attribution="sums" with the "tokens" level every 2nd analysed step
ANALYSED_STEPS = [0, 1, 2]
SCORED_STEPS = [0, 1, 2, 3]  # every step, and the end of training

TABLE_TYPES = ("table-file", "incremental-table-file")  # W&B incremental tables, or the fixed ones


def _observed_dpo_trainer(output_dir: Path, report_to: str):
    trainer = trainer_factory.dpo_trainer(output_dir, max_steps=MAX_STEPS, report_to=report_to, n=16)
    callback = LearningDynamicsCallback(
        trainer,
        every_n_steps=1,
        attribution="sums",
        tokens_every_n_steps=2,
        matrix_every_n_steps=None,  # the token matrix (heat maps) at every tokens-level step
        num_prompts=2,
        max_new_tokens=8,
        strict=True,
    )
    trainer.add_callback(callback)
    return trainer, callback


def _jsonl(output_dir: Path, types: list[str] | None = None) -> list[dict]:
    return read_records(output_dir / "dynamics" / "dynamics.jsonl", types=types)


def _wandb_history(run_dir: Path) -> list[dict]:
    """The run's history rows, read back from its transaction log with `wandb leet inspect --json`."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def _steps_with(history: list[dict], key: str) -> list[int]:
    return sorted({item["train/global_step"] for item in history if key in item})


def _run_dirs() -> list[Path]:
    return sorted(path for path in Path(os.environ["WANDB_DIR"]).glob("**/*run-*") if path.is_dir())


def test_wandb_run_of_the_trainer_gets_ntk_keys_tables_and_images_at_train_global_step(tmp_path, monkeypatch):
    import wandb

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    opened = []
    monkeypatch.setattr(sinks.WandbSink, "_open_run", lambda self: opened.append(self) or None)
    trainer, _ = _observed_dpo_trainer(tmp_path, report_to="wandb")
    try:
        trainer.train()
        run = wandb.run
        assert run is not None, "the run transformers' WandbCallback started was finished by the sink"
        run_id, run_dir = run.id, Path(run.dir).parent
    finally:
        if wandb.run is not None:
            wandb.run.finish()
    assert not opened  # the sink attached to the trainer's run and never started one
    # W&B keeps its folder settings process-wide, so the run may live under an earlier test's WANDB_DIR: use its own
    assert run_dir.is_dir() and run_dir.name.endswith(run_id)

    history = _wandb_history(run_dir)
    assert _steps_with(history, "train/loss") == [1, 2, 3]  # the trainer's own logs, in the same run
    assert _steps_with(history, "ntk_logp/chosen") == SCORED_STEPS
    jsonl = _jsonl(tmp_path, types=["probe", "dynamics"])
    logp = {i["train/global_step"]: i["ntk_logp/chosen"] for i in history if "ntk_logp/chosen" in i}
    chosen_at_1 = [r["logp_sum"] for r in jsonl if r["type"] == "probe" and r["step"] == 1 and r["kind"] == "chosen"]
    assert logp[1] == pytest.approx(sum(chosen_at_1) / len(chosen_at_1))
    for key in (
        "ntk_change/observed/chosen",
        "ntk_change/predicted/rejected",
        "ntk_split/negative/rejected",
        "ntk_change/gap/greedy",
    ):
        assert _steps_with(history, key) == ANALYSED_STEPS, key
    observed = {
        i["train/global_step"]: i["ntk_change/observed/rejected"]
        for i in history
        if "ntk_change/observed/rejected" in i
    }
    rejected_at_2 = [
        r["observed"] for r in jsonl if r["type"] == "dynamics" and r["step"] == 2 and r["kind"] == "rejected"
    ]
    assert observed[2] == pytest.approx(sum(rejected_at_2) / len(rejected_at_2))

    assert _steps_with(history, "ntk_attribution/chosen._type") == TOKEN_STEPS  # heatmaps at "tokens" steps only
    images = next(i for i in history if "ntk_attribution/chosen._type" in i)
    assert images["ntk_attribution/chosen._type"] == "images/separated" and images["ntk_attribution/chosen.count"] >= 1

    for key, columns in (("ntk_tables/dynamics", DYNAMICS_TABLE_COLUMNS), ("ntk_tables/probes", PROBE_TABLE_COLUMNS)):
        item = next(i for i in history if f"{key}._type" in i)
        assert item[f"{key}._type"] in TABLE_TYPES
        table = json.loads((run_dir / "files" / item[f"{key}.path"]).read_text())
        assert table["columns"] == list(columns) and table["data"]
        assert all(isinstance(cell, (str, int, float, type(None))) for row in table["data"] for cell in row)
    assert _steps_with(history, "ntk_tables/dynamics._type") == ANALYSED_STEPS


def test_tensorboard_report_to_reads_back_with_event_accumulator_and_starts_no_wandb_run(tmp_path):
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _ = _observed_dpo_trainer(tmp_path, report_to="tensorboard")
    trainer.train()
    assert wandb.run is None
    assert not _run_dirs() and not list(tmp_path.glob("**/*.wandb"))

    event_files = sorted(tmp_path.glob("**/events.out.tfevents.*"))
    assert event_files
    log_dirs = {path.parent for path in event_files}
    assert len(log_dirs) == 1, log_dirs  # the trainer's TensorBoard folder, shared with the trainer's own scalars
    accumulator = EventAccumulator(str(log_dirs.pop()), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in accumulator.Scalars("ntk_logp/chosen")] == SCORED_STEPS
    for tag in ("ntk_change/observed/chosen", "ntk_change/predicted/rejected", "ntk_split/negative/rejected"):
        assert [e.step for e in accumulator.Scalars(tag)] == ANALYSED_STEPS, tag
    assert [e.step for e in accumulator.Images("ntk_attribution/chosen/0")] == TOKEN_STEPS
    assert "ntk_tables/dynamics/text_summary" in tags["tensors"]


def test_no_wandb_run_is_started_when_report_to_lacks_wandb(tmp_path):
    import wandb

    trainer, callback = _observed_dpo_trainer(tmp_path, report_to="none")
    trainer.train()
    assert wandb.run is None
    assert not _run_dirs() and not list(tmp_path.glob("**/*.wandb"))
    assert _jsonl(tmp_path, types=["status"])[-1]["sink_failures"] == {"jsonl": 0}


def test_a_failing_wandb_sink_never_loses_the_jsonl_and_never_stops_training(tmp_path, monkeypatch):
    import wandb

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    attempts = []

    def write_event(self, event):
        attempts.append(event.step)
        raise ConnectionError("W&B unreachable")

    monkeypatch.setattr(sinks.WandbSink, "write_event", write_event)
    trainer, callback = _observed_dpo_trainer(tmp_path, report_to="wandb")
    try:
        with pytest.warns(RuntimeWarning, match="sink 'wandb' failed") as caught:
            trainer.train()
    finally:
        if wandb.run is not None:
            wandb.run.finish()
    assert len([w for w in caught if "sink 'wandb' failed" in str(w.message)]) == 1
    assert trainer.state.global_step == MAX_STEPS
    assert len([entry for entry in trainer.state.log_history if "loss" in entry]) == MAX_STEPS

    records = _jsonl(tmp_path)
    assert {r["step"] for r in records if r["type"] == "probe"} == set(SCORED_STEPS)
    assert {r["step"] for r in records if r["type"] == "dynamics"} == set(ANALYSED_STEPS)
    status = records[-1]
    assert status["type"] == "status" and status["analysis_failures"] == 0
    # every event went to the sink and failed; the status event itself is written after its counts are taken
    assert status["sink_failures"] == {"jsonl": 0, "wandb": len(attempts) - 1}
    assert len(attempts) > len(SCORED_STEPS) and "ConnectionError" in status["message"]


def _wandb_records(run_dir: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_wandb_run_reads_back_with_few_sections_multi_kind_charts_full_tables_summary_and_scatter(
    tmp_path, monkeypatch
):
    import wandb

    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("TRL_NTK_WANDB_LOG_REPORT", "true")
    trainer, _ = _observed_dpo_trainer(tmp_path, report_to="wandb")
    try:
        trainer.train()
        run_dir = Path(wandb.run.dir).parent
    finally:
        if wandb.run is not None:
            wandb.run.finish()
    records = _wandb_records(run_dir)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    metrics = {key.split(".")[0] for item in history for key in item if not key.startswith("_")}
    sections = {key.split("/")[0] for key in metrics}
    assert len(sections) <= 10, sorted(sections)
    assert {"train", "ntk_logp", "ntk_change", "ntk_split", "ntk_tables", "ntk_charts"} <= sections

    # no metric twice: every (key, step) of the sink is logged once, and nothing under the trainer's `train/`
    logged = [(key, item["train/global_step"]) for item in history for key in item if key.startswith("ntk_")]
    assert len(logged) == len(set(logged)), sorted({entry for entry in logged if logged.count(entry) > 1})
    assert not any(key.startswith("ntk_nthr/") for key in metrics)  # NTHR scalars are the trainer's train/nthr/*

    # a chart with every probe kind on it
    chart = next(item for item in history if "ntk_charts/logp_by_kind_table._type" in item)
    table = json.loads((run_dir / "files" / chart["ntk_charts/logp_by_kind_table.path"]).read_text())
    kinds = {row[table["columns"].index("lineKey")] for row in table["data"]}
    assert {"chosen", "rejected", "greedy"} <= kinds
    for key in ("ntk_charts/split_positive_negative_table", "ntk_charts/observed_vs_predicted_table"):
        assert any(f"{key}._type" in item for item in history), key
    scatter_item = next(item for item in history if "ntk_charts/observed_vs_predicted_table._type" in item)
    scatter = json.loads((run_dir / "files" / scatter_item["ntk_charts/observed_vs_predicted_table.path"]).read_text())
    assert len(scatter["data"]) == len(_jsonl(tmp_path, types=["dynamics"]))

    # the dynamics table keeps every analysed step, the probe table every scoring step
    for key, steps in (("ntk_tables/dynamics", ANALYSED_STEPS), ("ntk_tables/probes", SCORED_STEPS)):
        rows = []
        for item in history:
            if f"{key}._type" in item:
                part = json.loads((run_dir / "files" / item[f"{key}.path"]).read_text())
                rows += part["data"]
        assert sorted({row[0] for row in rows}) == steps, key

    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    for key in ("ntk/chosen/logp_start", "ntk/chosen/logp_end", "ntk/chosen/logp_peak", "ntk/rejected/logp_change"):
        assert isinstance(summary.get(key), float), (key, sorted(summary))
    assert summary["ntk/prediction/median_abs_gap"] >= 0 and -1 <= summary["ntk/prediction/correlation"] <= 1
    assert any(item.get("ntk_tables/report._type") == "html-file" for item in history)
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "trl_ntk_run"]
    paths = {entry["path"] for entry in artifact["manifest"]["contents"]}
    assert {"dynamics.jsonl", "report.html", "attributions/step_0.npz", "attributions/step_2.npz"} <= paths
