"""`trl-ntk` flags: validated before any work, one output-folder flag, the version, missing packages named."""

from __future__ import annotations

import io
import math

import pytest

from trl_ntk import __version__, cli
from trl_ntk.demo import run
from trl_ntk.demo.run import DemoConfig


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run starts: every refusal must come before training."""

    def train_one(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(run, "train_one", train_one)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--beta", "nan"], "argument --beta: must be a finite number"),
        (["--beta", "-5"], "argument --beta: must be a finite number >= 0"),
        (["--lr", "inf"], "argument --lr: must be a finite number"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0"),
        (["--epochs", "-1"], "argument --epochs: must be a finite number > 0"),
        (["--steps", "2.5"], "argument --steps: must be a whole number"),
        (["--every-n-steps", "0"], "argument --every-n-steps: must be >= 1"),
        (["--optim", "adamw_nonsense"], "--optim 'adamw_nonsense' is not a transformers optimizer"),
    ],
)
def test_bad_demo_flags_are_refused_before_training(tmp_path, capsys, no_training, flags, message):
    with pytest.raises(SystemExit) as error:
        cli.main(["demo", "-o", str(tmp_path / "out"), *flags])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"beta": math.nan}, ValueError, "beta must be finite"),
        ({"beta": -5.0}, ValueError, "beta must be >= 0"),
        ({"learning_rate": math.inf}, ValueError, "learning_rate must be finite"),
        ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
        ({"threads": 0}, ValueError, "threads must be >= 1"),
        ({"attribution": "all"}, ValueError, "attribution must be one of"),
        ({"every_n_steps": "5"}, TypeError, "every_n_steps must be an int"),
    ],
)
def test_demo_config_validates_for_api_callers(options, error, message):
    with pytest.raises(error, match=message):
        DemoConfig(**options)


def test_output_folder_flag_and_its_aliases(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(run, "run_demo", lambda config, stream=None: seen.append(config.out))
    monkeypatch.setattr(run, "check_demo_requirements", lambda config: None)
    for flag in ("--output-dir", "-o", "--out"):
        assert cli.main(["demo", flag, f"folder{flag}"]) == 0
    assert seen == ["folder--output-dir", "folder-o", "folder--out"]
    assert "--out is deprecated; use --output-dir" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version_flag(flag, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main([flag])
    assert error.value.code == 0
    assert capsys.readouterr().out.strip() == f"trl-ntk {__version__}"


def test_missing_plotly_stops_the_demo_before_training_with_the_fix(tmp_path, capsys, no_training, monkeypatch):
    from trl_ntk import config as config_module

    monkeypatch.setattr(config_module, "_installed", lambda module: module != "plotly")
    with pytest.raises(SystemExit):
        cli.main(["demo", "-o", str(tmp_path / "out")])
    assert "plotly (for report): pip install 'trl-ntk[report]'" in capsys.readouterr().err


def test_missing_dashboard_package_stops_the_demo_before_training(tmp_path, capsys, no_training, monkeypatch):
    from trl_ntk import config as config_module

    monkeypatch.setattr(config_module, "_installed", lambda module: module != "wandb")
    with pytest.raises(SystemExit):
        cli.main(["demo", "-o", str(tmp_path / "out"), "--report-to", "wandb"])
    assert "pip install 'trl-ntk[wandb]'" in capsys.readouterr().err


def test_unwritable_output_folder_stops_the_demo_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        cli.main(["demo", "-o", str(blocker / "out")])
    assert "--output-dir" in capsys.readouterr().err


def test_first_toy_build_is_announced(monkeypatch):
    from trl_ntk.demo import toy_model

    stream = io.StringIO()
    monkeypatch.setattr(toy_model, "_is_built", lambda folder, stage: False)
    run._announce_toy_build(True, stream)
    assert stream.getvalue().startswith("building the toy model (first use only")
    monkeypatch.setattr(toy_model, "_is_built", lambda folder, stage: True)
    quiet = io.StringIO()
    run._announce_toy_build(True, quiet)
    assert quiet.getvalue() == ""


def test_report_without_plotly_stops_with_the_fix(tmp_path, capsys, monkeypatch):
    from trl_ntk import config as config_module

    monkeypatch.setattr(config_module, "_installed", lambda module: module != "plotly")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "pip install 'trl-ntk[report]'" in capsys.readouterr().err
