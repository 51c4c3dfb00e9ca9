"""LearningDynamicsCallback under DDP and FSDP2: 2-process CPU (gloo) trainings launched with `torchrun`.

One launch of `tests/ddp_script.py` trains the toy DPO setup on every rank without and with the callback
(`attribution="sums"`, the "tokens" level at steps 0 and 2); the tests read what it left behind. The FSDP2 launches
train the same setups with the model sharded; their finite-difference analysis is checked against the exact one of
the DDP launches (same data, same updates).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
MAX_STEPS = 3
PER_DEVICE_PAIRS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(output_dir: Path, *options: str) -> Path:
    """Run `tests/ddp_script.py` under `torchrun --nproc_per_node 2` on a free port; its output folder."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(output_dir / "wandb"),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD_SIZE}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(REPO / "tests" / "ddp_script.py"),
        str(output_dir),
        *options,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return output_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """DPO, "sums" with the "tokens" level at steps 0 and 2 (about 20-50 s on two busy CPU cores)."""
    return _launch(tmp_path_factory.mktemp("ddp"), "--attribution=sums", "--tokens-every=2", f"--max-steps={MAX_STEPS}")


def _reports(output_dir: Path) -> list[dict]:
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _records(output_dir: Path) -> list[dict]:
    path = output_dir / "observed" / "dynamics" / "dynamics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scale(record: dict) -> float:
    """The size of the terms that cancel in a probe's change: float round-off is relative to this."""
    return abs(record["split"]["positive"]) + abs(record["split"]["negative"])


def test_ddp_run_completes_and_only_the_main_process_writes_one_jsonl(ddp_run):
    reports = _reports(ddp_run)
    assert [r["world_size"] for r in reports] == [WORLD_SIZE] * WORLD_SIZE
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in reports)
    assert [r["is_main"] for r in reports] == [True, False]
    assert [r["sink_groups_made"] for r in reports] == [1, 0]
    # greedy probes are generated on the main process at every scoring step and shared, so all ranks explain the same
    assert [r["generations"] for r in reports] == [MAX_STEPS + 1, 0]
    assert [r["analysis_failures"] for r in reports] == [0, 0]
    assert [p.relative_to(ddp_run) for p in ddp_run.rglob("*.jsonl")] == [Path("observed/dynamics/dynamics.jsonl")]
    records = _records(ddp_run)
    assert Counter(r["type"] for r in records)["run"] == 1
    assert records[-1]["type"] == "status" and records[-1]["analysis_failures"] == 0
    for kind in ("probe", "dynamics"):  # one record per step and probe: no second rank wrote to the file
        assert set(Counter((r["step"], r["probe_id"]) for r in records if r["type"] == kind).values()) == {1}
    assert {r["step"] for r in records if r["type"] == "dynamics"} == set(range(MAX_STEPS))
    assert any(r["kind"] == "greedy" for r in records if r["type"] == "dynamics")


def test_ddp_gradient_check_matches_the_averaged_grad_and_the_sums_add_up(ddp_run):
    dynamics = [r for r in _records(ddp_run) if r["type"] == "dynamics"]
    assert dynamics
    for record in dynamics:
        assert record["gradient_check"]["cosine"] >= 0.99999
        assert record["gradient_check"]["clip_scale"] == pytest.approx(1.0, abs=1e-4)  # 1/world_size applied once
        tolerance = 1e-5 * max(_scale(record), 1.0)
        assert abs(record["predicted"] - (record["predicted_current"] + record["history"])) <= tolerance
        assert abs(sum(record["cells"].values()) - record["predicted_current"]) <= tolerance
        assert record["split"]["positive"] + record["split"]["negative"] == pytest.approx(
            record["predicted_current"], abs=tolerance
        )


def test_ddp_token_attributions_hold_every_ranks_columns_and_sum_to_the_prediction(ddp_run):
    tokens_steps = [r for r in _records(ddp_run) if r["type"] == "dynamics" and "attributed" in r]
    for record in tokens_steps:  # every response's totals over all ranks' training tokens
        tolerance = 1e-5 * max(_scale(record), 1.0)
        assert abs(record["attributed"] - record["predicted_current"]) <= tolerance
    with_matrix = [r for r in tokens_steps if "matrix" in r]
    assert {r["step"] for r in with_matrix} == {0, 2}
    for record in with_matrix:
        archive = np.load(ddp_run / "observed" / "dynamics" / record["matrix"]["file"])
        matrix = archive[record["matrix"]["key"]]
        assert matrix.shape == (len(record["token_predicted"]), len(archive["train.row"]))
        tolerance = 1e-5 * max(_scale(record), 1.0)
        assert abs(float(matrix.astype(np.float64).sum()) - record["predicted_current"]) <= tolerance
        # DPO's examples are preference pairs, renumbered across ranks: every rank's pairs are columns here
        assert set(archive["train.row"].tolist()) == set(range(WORLD_SIZE * PER_DEVICE_PAIRS))
        assert set(archive["train.group"].tolist()) == {0, 1}
        assert record["top_up"] or record["top_down"]


def test_ddp_training_losses_and_weights_identical_with_and_without_callback(ddp_run):
    for report in _reports(ddp_run):
        assert len(report["plain_losses"]) == MAX_STEPS
        assert report["observed_losses"] == report["plain_losses"]
        assert report["same_weights"]
    first, second = _reports(ddp_run)
    assert first["plain_losses"] == second["plain_losses"]  # both ranks log the cross-rank mean loss


@pytest.fixture(scope="module")
def grpo_ddp_run(tmp_path_factory) -> Path:
    """GRPO, "sums", one prompt group of 4 completions per rank."""
    return _launch(tmp_path_factory.mktemp("grpo_ddp"), "--trainer=grpo", "--attribution=sums", "--max-steps=2")


def test_ddp_grpo_reports_lazy_likelihood_displacement_of_every_ranks_groups(grpo_ddp_run):
    # one prompt group of 4 completions per rank; each rank's positive completions are predicted on every rank
    output_dir = grpo_ddp_run
    reports = _reports(output_dir)
    assert all(r["observed_losses"] == r["plain_losses"] and r["same_weights"] for r in reports)
    records = _records(output_dir)
    assert records[-1]["type"] == "status" and records[-1]["analysis_failures"] == 0
    dynamics = [r for r in records if r["type"] == "dynamics"]
    assert {r["step"] for r in dynamics} == {0, 1}
    assert all(r["gradient_check"]["cosine"] >= 0.99999 for r in dynamics)
    lld = [r for r in records if r["type"] == "lld" and r["step"] == 0]
    assert sorted(r["group"] for r in lld) == [0, 1]  # rank 1's group is renumbered after rank 0's
    assert all(r["num_positive"] >= 1 and r["num_positive"] + r["num_negative"] <= 4 for r in lld)


# ----------------------------------------------------------------------------------------------------------- FSDP2


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """The DPO setup of `ddp_run` with the model sharded by FSDP2, "sums" level (finite differences on the shards)."""
    return _launch(tmp_path_factory.mktemp("fsdp"), "--fsdp", "--attribution=sums", f"--max-steps={MAX_STEPS}")


def _dynamics_by_probe(output_dir: Path) -> dict[tuple[int, str], dict]:
    return {(r["step"], r["probe_id"]): r for r in _records(output_dir) if r["type"] == "dynamics"}


def _largest(records: dict[tuple[int, str], dict], step: int, field: str) -> float:
    return max(abs(r[field]) for (s, _), r in records.items() if s == step)


def test_fsdp_run_shards_the_model_and_leaves_training_as_it_was(fsdp_run, ddp_run):
    reports = _reports(fsdp_run)
    assert all(r["distributed_type"].endswith("FSDP") and r["sharded"] for r in reports)
    assert [r["sink_groups_made"] for r in reports] == [1, 0]
    # every rank takes part in generating the greedy probes (each forward gathers the shards)
    assert [r["generations"] for r in reports] == [MAX_STEPS + 1] * WORLD_SIZE
    assert [r["analysis_failures"] for r in reports] == [0, 0]
    for report in reports:
        assert report["observed_losses"] == report["plain_losses"]
        assert report["same_weights"]
    assert reports[0]["plain_losses"] == pytest.approx(_reports(ddp_run)[0]["plain_losses"], rel=1e-5)
    records = _records(fsdp_run)
    assert records[-1]["type"] == "status" and records[-1]["analysis_failures"] == 0
    for kind in ("probe", "dynamics"):
        assert set(Counter((r["step"], r["probe_id"]) for r in records if r["type"] == kind).values()) == {1}


def test_fsdp_finite_differences_agree_with_the_exact_ddp_analysis(fsdp_run, ddp_run):
    sharded, exact = _dynamics_by_probe(fsdp_run), _dynamics_by_probe(ddp_run)
    assert set(sharded) == set(exact) and {step for step, _ in sharded} == set(range(MAX_STEPS))
    for key, record in sharded.items():
        reference = exact[key]
        assert record["path"] == "finite_difference"
        check = record["gradient_check"]  # the backward of the captured c_l, reduce-scattered by FSDP, vs .grad
        assert check["cosine"] >= 0.99999 and check["relative_error"] <= 1e-4
        assert check["clip_scale"] == pytest.approx(1.0, abs=1e-4)  # FSDP's 1/world_size averaging undone once
        # DDP scores the probes with their prompts' forward shared (KV cache), FSDP plainly: equal up to float32
        # rounding of the summed token log-probs (about 1e-6 relative per token)
        assert record["observed"] == pytest.approx(reference["observed"], rel=1e-4, abs=1e-5)
        assert set(record["cells"]) == set(reference["cells"])
        tolerance = 1e-2 * _scale(reference)  # five-point differences: measured below 0.5% of the cancelling terms
        for cell, value in record["cells"].items():
            assert abs(value - reference["cells"][cell]) <= tolerance, (key, cell)
        assert abs(record["predicted"] - reference["predicted"]) <= tolerance
        for field in ("predicted_sgd", "history"):
            assert abs(record[field] - reference[field]) <= 1e-2 * _largest(exact, key[0], field) + 1e-6, (key, field)


def test_fsdp_grpo_lazy_likelihood_displacement_agrees_with_ddp(tmp_path, grpo_ddp_run):
    output_dir = _launch(tmp_path, "--fsdp", "--trainer=grpo", "--attribution=sums", "--max-steps=2")
    reports = _reports(output_dir)
    assert all(r["sharded"] and r["observed_losses"] == r["plain_losses"] and r["same_weights"] for r in reports)

    def lld(run: Path) -> dict[tuple[int, int], dict]:
        return {(r["step"], r["group"]): r for r in _records(run) if r["type"] == "lld"}

    sharded, exact = lld(output_dir), lld(grpo_ddp_run)
    assert set(sharded) == set(exact) and sharded
    for key, record in sharded.items():
        reference = exact[key]
        assert record["delta_observed"] == pytest.approx(reference["delta_observed"], abs=1e-5)
        scale = abs(reference["delta_predicted"]) + abs(reference["delta_from_negative"])
        for field in ("delta_predicted", "delta_from_negative"):
            assert abs(record[field] - reference[field]) <= 1e-2 * scale, (key, field)
