"""Faults injected into every part of `LearningDynamicsCallback` that runs during training, on tiny SFT, DPO and GRPO
trainers (2 steps): an exception in each capture hook, in each kernel entry point the step analysis calls, in probe
scoring, in probe generation and in each sink (JSONL, W&B, TensorBoard).

Each fault fires once (the first call) and must leave: training losses and weights bit-identical to the same run
without the callback; exactly one warning naming it; its count in the `status` record; and a `status` record in the
JSONL file already at the end of the step where it fired (read during training, not at its end).

Faults of the run folder itself are covered in `tests/output/test_files.py`: disk full during the JSONL write
(`test_disk_full_mid_line_leaves_only_complete_lines_and_later_writes_go_on`) and the `.npz` write
(`test_disk_full_during_an_archive_leaves_no_archive_and_no_temporary_file`), a write cut mid-character followed by
resume (`test_resume_after_a_write_cut_mid_character_truncates_on_bytes_and_keeps_every_step_once`), kill -9 then
`trl-ntk report` (`test_kill_9_while_writing_then_report_reads_every_complete_record`), two writers on one folder
(`test_two_writers_on_one_folder_the_second_is_refused_and_nothing_is_mixed`,
`test_a_writer_in_another_process_is_refused`, and at trainer level
`test_the_callback_added_twice_writes_one_run_and_the_second_is_refused_with_a_warning`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from tests import trainer_factory
from trl_ntk.analysis import guard
from trl_ntk.analysis.dense import DenseBackend
from trl_ntk.integration import callbacks, capture
from trl_ntk.integration.callbacks import LearningDynamicsCallback
from trl_ntk.ntk import kernels
from trl_ntk.output.files import JsonlSink
from trl_ntk.output.tensorboard_sink import TensorBoardSink
from trl_ntk.output.wandb_sink import WandbSink

STEPS = 2
FAULT = "injected fault"


def _trainer(kind: str, output_dir: Path, **overrides: Any):
    return getattr(trainer_factory, f"{kind}_trainer")(output_dir, max_steps=STEPS, **overrides)


def _losses_and_params(trainer) -> tuple[list[float], list[torch.Tensor]]:
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, [p.detach().clone() for p in trainer.model.parameters()]


_PLAIN: dict[tuple, tuple[list[float], list[torch.Tensor]]] = {}


def _plain(kind: str, tmp_path_factory, **overrides: Any) -> tuple[list[float], list[torch.Tensor]]:
    """Losses and final weights of the run without the callback (one per trainer set-up, shared by the tests)."""
    key = (kind, tuple(sorted(overrides.items())))
    if key not in _PLAIN:
        _PLAIN[key] = _losses_and_params(_trainer(kind, tmp_path_factory.mktemp(f"plain-{kind}"), **overrides))
    return _PLAIN[key]


class _JsonlSnapshots(TrainerCallback):
    """The records of the JSONL file at the end of every training step, read while training goes on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.snapshots: list[list[dict]] = []

    def on_step_end(self, args, state, control, **kwargs):
        text = self.path.read_text() if self.path.exists() else ""
        self.snapshots.append([json.loads(line) for line in text.splitlines() if line])


@dataclass
class _Fault:
    """Replaces `owner.name` by a function that raises at its first call and is the original afterwards."""

    owner: Any
    name: str
    snapshots: _JsonlSnapshots | None = None
    fired_after_steps: int | None = None  # the number of finished steps when it fired
    calls: list[int] = field(default_factory=list)

    def install(self, monkeypatch) -> None:
        original = getattr(self.owner, self.name)  # a plain function for methods: `faulty` binds as it did

        def faulty(*args, **kwargs):
            self.calls.append(1)
            if len(self.calls) == 1:
                self.fired_after_steps = len(self.snapshots.snapshots) if self.snapshots else 0
                raise RuntimeError(f"{FAULT} in {self.name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(self.owner, self.name, faulty)


def _run_with_fault(kind: str, tmp_path: Path, fault: _Fault | None, monkeypatch, options: dict, trainer_overrides):
    trainer = _trainer(kind, tmp_path, **trainer_overrides)
    callback = LearningDynamicsCallback(trainer, **{"every_n_steps": 1, "num_prompts": 1, **options})
    snapshots = _JsonlSnapshots(tmp_path / "dynamics" / "dynamics.jsonl")
    trainer.add_callback(callback)
    trainer.add_callback(snapshots)
    if fault is not None:
        fault.snapshots = snapshots
        if fault.owner is guard.RngState:
            callback.capture.record_randomness = True  # the pre-forward hook keeps the RNG state
        fault.install(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, params = _losses_and_params(trainer)
    records = [json.loads(line) for line in (tmp_path / "dynamics" / "dynamics.jsonl").read_text().splitlines()]
    return losses, params, [str(w.message) for w in caught], records, snapshots.snapshots


def _assert_training_untouched(losses, params, plain) -> None:
    plain_losses, plain_params = plain
    assert losses == plain_losses
    assert len(params) == len(plain_params)
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))


# -------------------------------------------------------------------------------------------- fault-free


@pytest.mark.parametrize("level", ["none", "sums", "tokens"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_fault_free_training_is_bit_identical_with_the_callback_at_every_level(tmp_path, tmp_path_factory, kind, level):
    losses, params, _, records, _ = _run_with_fault(
        kind, tmp_path, None, None, {"attribution": level, "generate": False, "strict": True}, {}
    )
    _assert_training_untouched(losses, params, _plain(kind, tmp_path_factory))
    assert records[-1]["type"] == "status" and records[-1]["analysis_failures"] == 0
    assert {r["step"] for r in records if r["type"] == "dynamics"} == (set() if level == "none" else {0, 1})


# -------------------------------------------------------------------------------------------- injected faults

SUMS = {"attribution": "sums", "generate": False}
TOKENS = {"attribution": "tokens", "generate": False, "kernel_summaries": True}
SMOOTHED = {"label_smoothing_factor": 0.1}  # SFT from plain logits: the logit hook and the residual gradient

# (id, trainer kind, owner, attribute, callback options, trainer overrides)
ANALYSIS_FAULTS = [
    ("hook-forward", "sft", capture.GradientCapture, "_record_forward", SUMS, {}),
    ("hook-pre-forward", "sft", guard.RngState, "capture", SUMS, {}),
    ("hook-log-prob-gradient", "dpo", capture, "_accumulate_coeffs", SUMS, {}),
    ("hook-logit-gradient", "sft", capture, "_split_into", SUMS, SMOOTHED),
    ("kernels.logprob_grad", "grpo", kernels, "logprob_grad", SUMS, {}),
    ("kernels.logit_cotangent_grad", "sft", kernels, "logit_cotangent_grad", SUMS, SMOOTHED),
    ("kernels.logprob_kernel", "dpo", kernels, "logprob_kernel", TOKENS, {}),
    ("kernels.pntk", "sft", kernels, "pntk", TOKENS, {}),
    ("DenseBackend.applied_gradient", "dpo", DenseBackend, "applied_gradient", SUMS, {}),
    ("DenseBackend.step_split", "grpo", DenseBackend, "step_split", SUMS, {}),
    ("DenseBackend.weighted_gradient", "sft", DenseBackend, "weighted_gradient", SUMS, {}),
    ("DenseBackend.residual_gradient", "sft", DenseBackend, "residual_gradient", SUMS, SMOOTHED),
    ("DenseBackend.jvps", "dpo", DenseBackend, "jvps", SUMS, {}),
    ("DenseBackend.dot", "grpo", DenseBackend, "dot", SUMS, {}),
    ("DenseBackend.reduce", "sft", DenseBackend, "reduce", SUMS, {}),
    ("DenseBackend.token_attribution", "dpo", DenseBackend, "token_attribution", TOKENS, {}),
    ("DenseBackend.kernel_norms", "sft", DenseBackend, "kernel_norms", TOKENS, {}),
    ("probe-scoring", "dpo", callbacks, "score_responses", SUMS, {}),
    ("probe-generation", "sft", callbacks, "sample_responses", {"attribution": "sums", "max_new_tokens": 6}, {}),
]


@pytest.mark.parametrize(
    ("kind", "owner", "name", "options", "overrides"),
    [pytest.param(*case[1:], id=case[0]) for case in ANALYSIS_FAULTS],
)
def test_an_analysis_fault_is_one_warning_a_counted_status_at_once_and_training_is_bit_identical(
    tmp_path, tmp_path_factory, monkeypatch, kind, owner, name, options, overrides
):
    fault = _Fault(owner, name)
    losses, params, messages, records, snapshots = _run_with_fault(
        kind, tmp_path, fault, monkeypatch, options, overrides
    )
    assert fault.fired_after_steps is not None, f"{name} was never called"
    _assert_training_untouched(losses, params, _plain(kind, tmp_path_factory, **overrides))
    assert sum(FAULT in message for message in messages) == 1
    status = records[-1]
    assert status["type"] == "status" and status["analysis_failures"] == 1 and FAULT in status["message"]
    at_once = snapshots[fault.fired_after_steps]  # the file at the end of the step where it fired
    assert any(r["type"] == "status" and r["analysis_failures"] == 1 for r in at_once)
    if name != "sample_responses":  # the other step is analysed: the fault cost one step, not the run
        assert len({r["step"] for r in records if r["type"] == "dynamics"}) == 1


SINK_FAULTS = [
    ("jsonl", JsonlSink, "none"),
    ("wandb", WandbSink, "wandb"),
    ("tensorboard", TensorBoardSink, "tensorboard"),
]


@pytest.mark.parametrize(("sink", "owner", "report_to"), [pytest.param(*case, id=case[0]) for case in SINK_FAULTS])
def test_a_sink_fault_is_one_warning_a_counted_status_at_once_and_training_is_bit_identical(
    tmp_path, tmp_path_factory, monkeypatch, sink, owner, report_to
):
    fault = _Fault(owner, "write_event")
    losses, params, messages, records, snapshots = _run_with_fault(
        "sft", tmp_path, fault, monkeypatch, {**SUMS, "report_to": report_to}, {}
    )
    assert fault.fired_after_steps is not None
    _assert_training_untouched(losses, params, _plain("sft", tmp_path_factory))
    assert sum(FAULT in message for message in messages) == 1
    status = records[-1]
    assert status["type"] == "status" and status["analysis_failures"] == 0
    assert status["sink_failures"][sink] == 1
    at_once = snapshots[fault.fired_after_steps]
    assert any(r["type"] == "status" and r["sink_failures"][sink] == 1 for r in at_once)
    assert {r["step"] for r in records if r["type"] == "dynamics"} == {0, 1}


def test_nan_weights_give_null_predictions_an_untrusted_step_with_the_cause_and_a_warning(tmp_path):
    """A weight full of NaN: every prediction field is null (never 0.0, although NaN coefficients fall in no
    gradient-sign cell), the step is untrusted with the non-finite cause named, one warning, counted in the status."""
    trainer = _trainer("dpo", tmp_path)
    with torch.no_grad():
        next(p for name, p in trainer.model.named_parameters() if "mlp" in name).fill_(float("nan"))
    trainer.add_callback(LearningDynamicsCallback(trainer, every_n_steps=1, attribution="sums", generate=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    records = [json.loads(line) for line in (tmp_path / "dynamics" / "dynamics.jsonl").read_text().splitlines()]
    dynamics = [r for r in records if r["type"] == "dynamics"]
    assert dynamics
    for record in dynamics:
        assert record["predicted"] is None and record["predicted_current"] is None
        assert record["trusted"] is False and "NaN or inf" in record["trust_reason"]
    assert sum("is not trusted" in str(w.message) for w in caught) == 1
    assert [r for r in records if r["type"] == "status"][-1]["untrusted_steps"] >= 1
