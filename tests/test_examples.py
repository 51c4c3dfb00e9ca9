"""Every script in `examples/` runs offline on the toy default with short settings and writes its report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(report: Path) -> list[dict]:
    return [json.loads(line) for line in (report.parent / "dynamics.jsonl").read_text().splitlines() if line]


def test_every_example_is_covered_here():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == ["dpo_dynamics", "grpo_nthr", "sft_dynamics"]


@pytest.mark.slow
def test_dpo_example_runs_offline_and_logs_to_wandb_offline(tmp_path):
    import time

    import wandb

    started = time.time()
    out = tmp_path / "dpo"
    report = load_example("dpo_dynamics").main(
        ["--output-dir", str(out), "--max-steps", "2", "--every-n-steps", "1", "--report-to", "wandb"]
    )
    assert report == out / "dynamics" / "report.html" and report.is_file()
    kinds = {r["kind"] for r in records(report) if r["type"] == "dynamics"}
    assert {"chosen", "rejected", "greedy"} <= kinds
    # W&B fixes its folders process-wide at its first use in the process: look where it writes now
    wandb_dir = Path(wandb.setup().settings.wandb_dir)
    written = [p for p in wandb_dir.rglob("*.wandb") if p.stat().st_mtime >= started]
    assert written, "an offline W&B run file was written"


@pytest.mark.slow
def test_sft_example_runs_offline_and_probes_the_preference_kinds(tmp_path):
    report = load_example("sft_dynamics").main(
        ["--output-dir", str(tmp_path / "sft"), "--max-steps", "2", "--every-n-steps", "1"]
    )
    assert report.is_file()
    dynamics = [r for r in records(report) if r["type"] == "dynamics"]
    assert {"chosen", "rejected", "chosen_rephrase"} <= {r["kind"] for r in dynamics}
    assert {"sft"} == {group for r in dynamics for group in r["groups"]}


@pytest.mark.slow
@pytest.mark.parametrize("nthr", [False, True], ids=["grpo", "grpo_nthr"])
def test_grpo_example_runs_offline_with_lld_records(tmp_path, nthr):
    argv = ["--output-dir", str(tmp_path / "grpo"), "--max-steps", "2", "--every-n-steps", "1", "--num-rows", "64"]
    report = load_example("grpo_nthr").main(argv + (["--nthr"] if nthr else []))
    assert report.is_file()
    types = {r["type"] for r in records(report)}
    assert "dynamics" in types
    assert ("nthr" in types) == nthr


def test_examples_refuse_a_dataset_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="--dataset needs --model"):
        load_example("dpo_dynamics").main(
            ["--output-dir", str(tmp_path), "--dataset", "trl-lib/ultrafeedback_binarized"]
        )


def test_gsm8k_rows_become_chat_prompts_with_integer_answers():
    row = load_example("grpo_nthr").gsm8k_rows({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 1,004"})
    assert row["answer"] == 1004
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("What is 2 + 2?")
