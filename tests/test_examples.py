"""Every script in `examples/` runs offline on the toy default with short settings and writes its report; the
scripts parse like TRL's (`TrlParser`, YAML `--config`, `ModelConfig`, `--use_peft`) and survive `accelerate launch`."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def load_example(name: str):
    """Import `examples/<name>.py` as a module (registered, as the argument parser resolves its dataclasses' types)."""
    module_name = f"example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
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
        ["--output-dir", str(out), "--max-steps", "2", "--ntk_every_n_steps", "1", "--report-to", "wandb"]
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
        ["--output-dir", str(tmp_path / "sft"), "--max-steps", "2", "--ntk_every_n_steps", "1"]
    )
    assert report.is_file()
    dynamics = [r for r in records(report) if r["type"] == "dynamics"]
    assert {"chosen", "rejected", "chosen_rephrase"} <= {r["kind"] for r in dynamics}
    assert {"sft"} == {group for r in dynamics for group in r["groups"]}


@pytest.mark.slow
@pytest.mark.parametrize("nthr", [False, True], ids=["grpo", "grpo_nthr"])
def test_grpo_example_runs_offline_with_lld_records(tmp_path, nthr):
    argv = ["--output-dir", str(tmp_path / "grpo"), "--max-steps", "2", "--ntk_every_n_steps", "1", "--num-rows", "64"]
    report = load_example("grpo_nthr").main(argv + (["--nthr"] if nthr else []))
    assert report.is_file()
    types = {r["type"] for r in records(report)}
    assert "dynamics" in types
    assert ("nthr" in types) == nthr


def test_examples_refuse_a_dataset_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="--dataset_name needs --model_name_or_path"):
        load_example("dpo_dynamics").main(
            ["--output-dir", str(tmp_path), "--dataset_name", "trl-lib/ultrafeedback_binarized"]
        )


def test_gsm8k_rows_become_chat_prompts_with_integer_answers():
    row = load_example("grpo_nthr").gsm8k_rows({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 1,004"})
    assert row["answer"] == 1004
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("What is 2 + 2?")


TINY_DPO = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--num_rows", "16", "--disable_tqdm", "true"]


@pytest.mark.parametrize("name", ["dpo_dynamics", "sft_dynamics", "grpo_nthr"])
def test_examples_parse_trl_arguments_without_deprecation_warnings(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        script_args, training_args, model_args, ntk_args = load_example(name).parse(
            ["--output_dir", str(tmp_path), "--use_peft", "--lora_r", "4", "--ntk_every_n_steps", "3", "--seed", "5"]
        )
    assert training_args.activation_checkpointing is False and training_args.seed == 5
    assert model_args.use_peft and model_args.lora_r == 4 and model_args.model_name_or_path is None
    assert ntk_args.to_config().every_n_steps == 3 and ntk_args.ntk_seed == 0


@pytest.mark.slow
def test_dpo_example_end_to_end_from_a_yaml_config_with_lora(tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'run'}\nbeta: 0.2\nuse_peft: true\nlora_r: 4\n"
        "ntk_every_n_steps: 1\nntk_attribution: sums\nntk_num_prompts: 2\nntk_max_new_tokens: 8\n"
    )
    example = load_example("dpo_dynamics")
    report = example.main(["--config", str(config), *TINY_DPO])
    assert report == tmp_path / "run" / "dynamics" / "report.html" and report.is_file()
    run = records(report)
    assert run[0]["type"] == "run" and run[0]["config"]["every_n_steps"] == 1 and run[0]["config"]["num_prompts"] == 2
    assert {r["step"] for r in run if r["type"] == "dynamics"} == {0, 1}
    assert len({r["prompt_id"] for r in run if r["type"] == "probe"}) == 2  # ntk_num_prompts from the YAML


@pytest.mark.slow
def test_dpo_example_end_to_end_from_the_hf_argument_parser(tmp_path):
    """`HfArgumentParser((DPOConfig, DynamicsArguments))` gives what the example's `main` runs on."""
    from transformers import HfArgumentParser
    from trl import DPOConfig

    from trl_ntk import DynamicsArguments

    training_args, ntk_args = HfArgumentParser((DPOConfig, DynamicsArguments)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--ntk_every_n_steps", "1"]
    )
    example = load_example("dpo_dynamics")
    report = example.main(
        ["--output_dir", training_args.output_dir, "--ntk_every_n_steps", str(ntk_args.ntk_every_n_steps), *TINY_DPO]
    )
    assert report.is_file()
    assert {r["step"] for r in records(report) if r["type"] == "dynamics"} == {0, 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_of_an_example_writes_one_report(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "--main_process_port",
        str(_free_port()),
        str(EXAMPLES / "dpo_dynamics.py"),
        "--output_dir",
        str(out),
        "--ntk_every_n_steps",
        "1",
        "--ntk_num_prompts",
        "2",
        "--ntk_max_new_tokens",
        "8",
        *TINY_DPO,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("report: ") == 1
    reports = sorted(p.relative_to(out) for p in out.rglob("report.html*"))
    assert reports == [Path("dynamics/report.html")]
    assert {r["step"] for r in records(out / "dynamics" / "report.html") if r["type"] == "dynamics"} == {0, 1}
