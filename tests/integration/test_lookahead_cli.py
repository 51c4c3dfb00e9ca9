"""`trl-ntk lookahead` on a user dataset, trainer config and probes (the toy model, offline)."""

from __future__ import annotations

import json

import pytest

from trl_ntk.cli import build_parser, main
from trl_ntk.demo import toy
from trl_ntk.integration.lookahead_cli import prepare
from trl_ntk.probes.probe_set import ProbeSet

ROWS = 10


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Ten toy preference pairs as a local JSONL dataset, and the rows themselves."""
    data = toy.preference_dataset(n=ROWS, seed=0).select_columns(["prompt", "chosen", "rejected"])
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    data.to_json(str(path))
    return path, data


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_user_dataset_with_loss_type_and_beta_scores_the_kept_rows_against_held_out_probes(pairs, tmp_path):
    path, data = pairs
    out = tmp_path / "run"
    args = ["lookahead", "--dataset", str(path), "--loss-type", "ipo", "--beta", "0.2", "-o", str(out)]
    args += ["--probes", "heldout", "--heldout-fraction", "0.3", "--probe-prompts", "2"]
    assert main(args) == 0
    header, *examples = _records(out / "lookahead.jsonl")
    assert header["type"] == "lookahead_run" and header["trainer"] == "dpo"
    assert header["loss_type"] == ["ipo"] and header["beta"] == 0.2
    assert header["dataset"] == str(path) and header["probes"] == "heldout"
    assert header["heldout_rows"] == 3 and header["heldout_first_row"] == ROWS - 3
    # every kept row is scored, no held-out row is
    assert [r["index"] for r in examples] == list(range(ROWS - 3))
    assert header["num_examples"] == ROWS - 3
    for record in examples:
        assert record["text"]["prompt"] == data[record["index"]]["prompt"][0]["content"]
        assert set(record["effect"]) == set(header["objectives"]) >= {"chosen", "rejected"}


def test_held_out_probes_are_the_answers_of_the_last_rows_and_the_trainer_gets_the_others(pairs, tmp_path):
    path, data = pairs
    args = build_parser().parse_args(
        ["lookahead", "--dataset", str(path), "--probes", "heldout", "--heldout-fraction", "0.2", "-o", str(tmp_path)]
    )
    trainer, probes, header = prepare(args)
    assert len(trainer.train_dataset) == ROWS - 2
    held = [data[i] for i in range(ROWS - 2, ROWS)]
    chosen = [r.response for r in probes if r.kind == "chosen"]
    assert len(chosen) == 2 and sorted(map(str, chosen)) == sorted(str(row["chosen"]) for row in held)
    assert trainer.args.loss_type == ["sigmoid"] and header["loss_type"] == ["sigmoid"]


def test_probes_file_is_used(pairs, tmp_path):
    path, _ = pairs
    probes = ProbeSet()
    probes.add("q", "mine", "Paris.", prompt="Name the capital of France.")
    probes.add("q", "other", "Berlin.")
    probes.save(tmp_path / "probes.jsonl")
    out = tmp_path / "run"
    args = ["lookahead", "--trainer", "sft", "--dataset", str(path), "--probes-file", str(tmp_path / "probes.jsonl")]
    assert main([*args, "--max-examples", "2", "-o", str(out)]) == 0
    header, *examples = _records(out / "lookahead.jsonl")
    assert header["objectives"] == ["mine", "other"] and header["probes"] == "file"
    assert header["trainer"] == "sft" and header["loss_type"] == "nll" and header["beta"] is None
    assert [r["index"] for r in examples] == [0, 1]


@pytest.mark.parametrize(
    ("trainer", "option", "message"),
    [
        ("dpo", ["--loss-type", "bogus"], "unknown loss_type 'bogus'"),
        ("sft", ["--loss-type", "ipo"], "unknown loss_type 'ipo'"),
        ("sft", ["--beta", "0.1"], "beta"),
        ("grpo", [], "--reward-func"),
    ],
)
def test_bad_trainer_options_fail_before_scoring_with_status_2(pairs, tmp_path, capsys, trainer, option, message):
    path, _ = pairs
    out = tmp_path / "run"
    assert main(["lookahead", "--trainer", trainer, "--dataset", str(path), *option, "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("trl-ntk lookahead: error:") and message in error
    assert not out.exists()


def test_the_loss_type_reaches_the_trainers_loss(pairs, tmp_path):
    path, _ = pairs
    effects = {}
    for loss in ("sigmoid", "ipo"):
        out = tmp_path / loss
        assert (
            main(["lookahead", "--dataset", str(path), "--loss-type", loss, "--max-examples", "2", "-o", str(out)]) == 0
        )
        effects[loss] = [r["effect"]["chosen"] for r in _records(out / "lookahead.jsonl")[1:]]
    assert effects["sigmoid"] != pytest.approx(effects["ipo"], rel=1e-3)


def test_grpo_on_a_user_dataset_uses_the_named_reward(tmp_path):
    path = tmp_path / "math.jsonl"
    toy.math_dataset(n=4, seed=0).to_json(str(path))
    out = tmp_path / "run"
    args = ["lookahead", "--trainer", "grpo", "--dataset", str(path), "--reward-func", "trl_ntk.demo.toy:math_reward"]
    assert main([*args, "--max-examples", "1", "--num-generations", "2", "-o", str(out)]) == 0
    header, *examples = _records(out / "lookahead.jsonl")
    assert header["trainer"] == "grpo" and header["dataset"] == str(path) and len(examples) == 1
    assert header["loss_type"] == "dapo"


def test_saved_folders_and_files_load_to_the_same_rows(pairs, tmp_path):
    from datasets import DatasetDict

    from trl_ntk.integration.lookahead_cli import CLIError, load_dataset_arg

    path, data = pairs
    DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_arg(str(tmp_path / "saved"), "test")["prompt"] == data.select([0])["prompt"]
    assert load_dataset_arg(str(path))["chosen"] == data["chosen"]
    with pytest.raises(CLIError, match="no split 'dev'"):
        load_dataset_arg(str(tmp_path / "saved"), "dev")


def test_the_facade_exports_the_lookahead_api():
    import trl_ntk.lookahead as facade
    from trl_ntk.analysis import lookahead as maths
    from trl_ntk.integration import lookahead as driver
    from trl_ntk.integration.lookahead_callback import LookaheadCallback

    assert facade.score_trainer is driver.score_trainer and facade.curate is maths.curate
    assert facade.LookaheadCallback is LookaheadCallback and facade.LookaheadConfig is driver.LookaheadConfig
    assert all(hasattr(facade, name) for name in facade.__all__)
