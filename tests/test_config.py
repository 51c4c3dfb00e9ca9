"""Option validation at construction, the parser-ready arguments dataclass, and the output-folder check."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
from transformers import HfArgumentParser
from trl import DPOConfig, GRPOConfig, ModelConfig, SFTConfig, TrlParser

from trl_ntk.config import DynamicsArguments, DynamicsConfig, NTHRConfig, check_writable_dir

BAD_OPTIONS = [
    ({"score_batch_size": 0}, ValueError, "score_batch_size must be >= 1"),
    ({"top_k": -1}, ValueError, "top_k must be >= 0"),
    ({"num_samples": -2}, ValueError, "num_samples must be >= 0"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
    ({"sample_temperature": 0.0}, ValueError, "sample_temperature must be > 0"),
    ({"sample_temperature": -1.0}, ValueError, "sample_temperature must be > 0"),
    ({"sample_temperature": math.nan}, ValueError, "sample_temperature must be finite"),
    ({"sample_temperature": "hot"}, TypeError, "sample_temperature must be a number"),
    ({"tokens_every_n_steps": 0}, ValueError, "tokens_every_n_steps must be >= 1"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
    ({"every_n_steps": "5"}, TypeError, "every_n_steps must be an int"),
    ({"every_n_steps": 2.5}, TypeError, "every_n_steps must be an int"),
    ({"every_n_steps": True}, TypeError, "every_n_steps must be an int"),
    ({"every_n_steps": 0}, ValueError, "every_n_steps must be >= 1"),
    ({"matrix_prompts": 0}, ValueError, "matrix_prompts must be >= 1"),
    ({"matrix_every_n_steps": 0}, ValueError, "matrix_every_n_steps must be >= 1"),
    ({"num_prompts": 0}, ValueError, "num_prompts must be >= 1"),
    ({"seed": "0"}, TypeError, "seed must be an int"),
    ({"generate": "yes"}, TypeError, "generate must be True or False"),
    ({"strict": 1}, TypeError, "strict must be True or False"),
    ({"kernel_summaries": None}, TypeError, "kernel_summaries must be True or False"),
    ({"attribution": "all"}, ValueError, "attribution must be one of"),
    ({"report_to": 3}, TypeError, "report_to must be a str"),
    ({"report_to": ["wandb", None]}, TypeError, "report_to must be a str"),
    ({"output_dir": 3}, TypeError, "output_dir must be a str"),
    ({"attribution": "none", "tokens_every_n_steps": 5}, ValueError, "tokens_every_n_steps applies to"),
    ({"attribution": "tokens", "tokens_every_n_steps": 5}, ValueError, "tokens_every_n_steps applies to"),
    ({"generate": False, "num_samples": 2}, ValueError, "needs generate=True"),
    ({"attribution": "none", "kernel_summaries": True}, ValueError, "kernel_summaries"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_every_bad_option_is_refused_at_construction_with_its_name(options, error, message):
    with pytest.raises(error, match=message):
        DynamicsConfig(**options)


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_the_callback_refuses_bad_options_before_touching_the_trainer(options, error, message):
    """The callback builds its config first: a bad option fails even with a trainer that is not one."""
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    with pytest.raises(error, match=message):
        LearningDynamicsCallback(object(), **options)


def test_valid_options_pass_and_normalise():
    config = DynamicsConfig(
        every_n_steps=1,
        tokens_every_n_steps=3,
        matrix_prompts=None,
        top_k=0,
        num_samples=2,
        sample_temperature=0.7,
        chunk_size=4,
        output_dir=Path("x") / "y",
        report_to=("wandb", "tensorboard"),
    )
    assert config.output_dir == os.path.join("x", "y")
    assert config.report_to == ["wandb", "tensorboard"]
    assert DynamicsConfig().to_dict()["every_n_steps"] == 50


def test_arguments_mirror_every_config_field():
    argument_names = [f.name for f in dataclasses.fields(DynamicsArguments)]
    assert argument_names == ["ntk_" + f.name for f in dataclasses.fields(DynamicsConfig)]
    defaults = DynamicsArguments().to_config()
    assert defaults == DynamicsConfig()
    for f in dataclasses.fields(DynamicsArguments):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize("trainer_config", [DPOConfig, GRPOConfig, SFTConfig])
def test_arguments_parse_next_to_trl_configs_without_clashes(tmp_path, trainer_config):
    parser = HfArgumentParser((trainer_config, ModelConfig, DynamicsArguments))
    training, model, ntk = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--seed",
            "7",
            "--report_to",
            "none",
            "--use_peft",
            "--use_cpu",
            "--bf16",
            "false",
            "--ntk_every_n_steps",
            "5",
            "--ntk_attribution",
            "tokens",
            "--ntk_seed",
            "3",
            "--ntk_report_to",
            "wandb",
            "tensorboard",
            "--ntk_matrix_prompts",
            "-1",
            "--ntk_matrix_every_n_steps",
            "-1",
            "--ntk_generate",
            "false",
        ]
    )
    assert training.seed == 7 and training.output_dir == str(tmp_path) and model.use_peft
    config = ntk.to_config()
    assert (config.every_n_steps, config.attribution, config.seed) == (5, "tokens", 3)
    assert config.report_to == ["wandb", "tensorboard"] and config.matrix_prompts is None
    assert config.matrix_every_n_steps is None
    assert config.generate is False and config.output_dir is None


def test_parser_refuses_bad_values_with_the_option_named():
    parser = HfArgumentParser(DynamicsArguments)
    with pytest.raises(ValueError, match="score_batch_size must be >= 1"):
        parser.parse_args_into_dataclasses(["--ntk_score_batch_size", "0"])
    with pytest.raises(SystemExit):  # argparse: not an int
        parser.parse_args_into_dataclasses(["--ntk_every_n_steps", "2.5"])
    with pytest.raises(SystemExit):  # argparse: not a level
        parser.parse_args_into_dataclasses(["--ntk_attribution", "all"])


def test_yaml_config_with_trl_parser(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"output_dir: {tmp_path / 'out'}\nbeta: 0.3\nuse_cpu: true\nbf16: false\n"
        "ntk_every_n_steps: 4\nntk_attribution: none\n"
        "ntk_report_to: [tensorboard]\n"
    )
    parser = TrlParser((DPOConfig, ModelConfig, DynamicsArguments))
    training, _, ntk = parser.parse_args_and_config(["--config", str(config_file), "--ntk_top_k", "2"])
    assert training.beta == 0.3
    config = ntk.to_config()
    assert (config.every_n_steps, config.attribution, config.top_k) == (4, "none", 2)
    assert config.report_to == ["tensorboard"]


def test_writable_dir_is_created_and_left_empty(tmp_path):
    folder = check_writable_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_unwritable_dir_is_refused_with_the_option_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"output_dir .* is not a writable folder"):
        check_writable_dir(blocker / "dynamics")


def test_callback_refuses_an_unwritable_output_dir_at_construction(tmp_path):
    from tests import trainer_factory
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    trainer = trainer_factory.sft_trainer(tmp_path / "run")
    with pytest.raises(ValueError, match="not a writable folder"):
        LearningDynamicsCallback(trainer, output_dir=str(blocker / "dynamics"), num_prompts=1, generate=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": -1.0}, "beta must be"),
        ({"eta": 2.0}, "eta must be"),
        ({"vocab": "all"}, "vocab must be"),
        ({"every_generation": 0}, "every_generation"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
    ],
)
def test_nthr_config_validates(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NTHRConfig(**options)


def test_nthr_config_is_importable_from_its_old_place():
    from trl_ntk.integration.nthr import NTHRConfig as moved

    assert moved is NTHRConfig


def test_missing_optional_dependencies_are_named_with_their_pip_line(monkeypatch):
    from trl_ntk import config as config_module

    monkeypatch.setattr(config_module, "_installed", lambda module: module not in {"wandb", "plotly", "matplotlib"})
    with pytest.raises(ImportError, match=r"wandb \(for wandb\): pip install 'trl-ntk\[wandb\]'") as error:
        config_module.check_optional_dependencies(["wandb", "tensorboard"], report=True, heatmaps=True)
    assert "plotly (for report): pip install 'trl-ntk[report]'" in str(error.value)
    assert "matplotlib (for heatmaps)" in str(error.value) and "tensorboard" not in str(error.value)
    config_module.check_optional_dependencies("all", report=False, heatmaps=True)  # "all": the installed ones
    config_module.check_optional_dependencies(["none", "mlflow"])


def test_callback_checks_the_dashboards_it_will_write_at_construction(tmp_path, monkeypatch):
    from tests import trainer_factory
    from trl_ntk import config as config_module
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    monkeypatch.setattr(config_module, "_installed", lambda module: module != "tensorboard")
    trainer = trainer_factory.sft_trainer(tmp_path)
    with pytest.raises(ImportError, match=r"pip install 'trl-ntk\[tensorboard\]'"):
        LearningDynamicsCallback(trainer, report_to="tensorboard", num_prompts=1, generate=False)
    assert (
        not hasattr(trainer.compute_loss, "__wrapped__")
        and trainer.compute_loss.__name__ != "compute_loss_with_capture"
    )


@pytest.mark.parametrize(("log_level", "expected"), [("passive", 20), ("warning", 30), ("debug", 10)])
def test_package_log_level_follows_the_trainer(tmp_path, log_level, expected):
    import logging

    from transformers import TrainingArguments

    from trl_ntk.config import follow_trainer_log_level

    args = TrainingArguments(output_dir=str(tmp_path), log_level=log_level, use_cpu=True, report_to="none")
    assert follow_trainer_log_level(args) == expected
    assert logging.getLogger("trl_ntk").getEffectiveLevel() == expected


def test_stderr_handler_when_the_application_configured_no_logging():
    import subprocess
    import sys

    code = (
        "import logging, types\n"
        "from trl_ntk.config import follow_trainer_log_level\n"
        "args = types.SimpleNamespace(log_level='passive', should_log=True, get_process_log_level=lambda: 30)\n"
        "follow_trainer_log_level(args); follow_trainer_log_level(args)\n"
        "logging.getLogger('trl_ntk.integration.callbacks').info('step 0: summary')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.splitlines() == ["[trl_ntk] step 0: summary"]


def test_analysis_progress_and_summary_lines_show_at_the_default_log_level(tmp_path, caplog):
    from tests import trainer_factory
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    trainer = trainer_factory.sft_trainer(tmp_path, max_steps=1)
    trainer.add_callback(LearningDynamicsCallback(trainer, every_n_steps=1, num_prompts=1, generate=False))
    trainer.train()  # no caplog.set_level: what shows is what the package's level lets through
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("trl_ntk")]
    assert any(m.startswith("step 0: scoring the probes and explaining the update") for m in messages)
    assert any(m.startswith("step 0") and "scoring" not in m for m in messages), messages
