"""The `trl-ntk` console script: `trl-ntk demo` (an offline run on the toy default) and `trl-ntk report RUN_DIR`.

Usage:

    trl-ntk demo                                   # DPO's squeezing effect, ~2-5 minutes on a laptop CPU
    trl-ntk demo --trainer sft --output-dir sft_demo
    trl-ntk demo --trainer grpo --nthr --report-to wandb
    trl-ntk report trl_ntk_demo/dynamics           # -> trl_ntk_demo/dynamics/report.html
    trl-ntk lookahead --trainer dpo                # score every toy training pair before training
    trl-ntk lookahead --dataset pairs.jsonl --loss-type ipo --beta 0.2 --probes heldout
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from trl_ntk import __version__


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1)


def _non_negative_int(text: str) -> int:
    return _integer(text, 0)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


class _DeprecatedAlias(argparse.Action):
    """Stores like its destination's main flag, and warns that this spelling is deprecated."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"trl-ntk: {option_string} is deprecated; use --output-dir (or -o)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-ntk", description="Learning dynamics of TRL fine-tuning, token by token (eNTK x gradient)."
    )
    parser.add_argument("-v", "--version", action="version", version=f"trl-ntk {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,report,lookahead}")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train the offline toy model with the learning-dynamics callback, then write and summarize the report",
        description=(
            "Train the embedded toy model (offline, CPU) with LearningDynamicsCallback, write report.html and "
            "summary.json, and print how each kind of probe response moved. DPO (default) shows the squeezing "
            "effect: rejected falls far, chosen ends lower too, the model's argmax and greedy response gain."
        ),
    )
    demo.add_argument("--trainer", choices=("dpo", "sft", "grpo"), default="dpo", help="which TRL trainer to run")
    demo.add_argument(
        "-o", "--output-dir", dest="output_dir", default="trl_ntk_demo", help="output folder (default: ./trl_ntk_demo)"
    )
    demo.add_argument("--out", dest="output_dir", action=_DeprecatedAlias, help=argparse.SUPPRESS)
    length = demo.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (overrides the recipe)")
    length.add_argument("--epochs", type=_positive_float, default=None, help="epochs over the training rows")
    demo.add_argument(
        "--report-to",
        choices=("none", "wandb", "tensorboard", "trackio"),
        default="none",
        help="dashboard besides the JSONL and HTML report (W&B runs offline unless WANDB_MODE is set)",
    )
    demo.add_argument(
        "--attribution",
        choices=("none", "sums", "tokens"),
        default="sums",
        help="analysis level: probe log-probs only, predicted change and its sign split (default; the token "
        "matrix at step 0), or the token matrix at every analysed step (slow: a minute or two of CPU each)",
    )
    demo.add_argument("--seed", type=int, default=0, help="data, data order, probes and generation seed")
    demo.add_argument(
        "--nthr", action="store_true", help="GRPO only: also train with NTHRCallback and compare the displacement"
    )
    demo.add_argument(
        "--fixes",
        action="store_true",
        help="DPO only: also run each DPO fix (SFT on chosen and rejected first; NTHR on DPO pairs) from the same "
        "start and print whether it reduces the squeezing and at what cost to the margin",
    )
    tuning = demo.add_argument_group("recipe overrides (defaults: the tuned recipe of each trainer)")
    tuning.add_argument("--lr", type=_positive_float, default=None, help="learning rate (constant)")
    tuning.add_argument("--beta", type=_non_negative_float, default=None, help="DPO / GRPO beta (finite, >= 0)")
    tuning.add_argument("--optim", default=None, help="transformers optimizer name, e.g. sgd or adamw_torch")
    tuning.add_argument("--batch-size", type=_positive_int, default=None, help="rows per optimizer step")
    tuning.add_argument("--rows", type=_positive_int, default=None, help="training rows (prompts are cycled)")
    tuning.add_argument("--probe-prompts", type=_positive_int, default=None, help="prompts whose responses are probed")
    tuning.add_argument("--every-n-steps", type=_positive_int, default=None, help="probe scoring / analysis period")
    tuning.add_argument(
        "--tokens-every-n-steps",
        type=_non_negative_int,
        default=None,
        help="with --attribution sums: token-level analysis on the analysed steps that are multiples of this (step 0 "
        "always is; 0: never). Each costs about a minute or two of CPU on the toy; the recipes run it at step 0 only",
    )
    tuning.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1: fastest here)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    commands.add_parser(
        "report",
        help="write the self-contained HTML report of a run folder (see `trl-ntk report -h`)",
        add_help=False,
    )
    _add_lookahead_parser(commands)
    return parser


def _add_lookahead_parser(commands: argparse._SubParsersAction) -> None:
    lookahead = commands.add_parser(
        "lookahead",
        help="predict, before training, what one step on each training example does to the probe responses",
        description=(
            "Score every training example by the predicted first-order change of each probe kind's log-prob after "
            "one step on it (the trainer's own loss, one JVP per probe direction). Writes lookahead.jsonl."
        ),
    )
    lookahead.add_argument("--trainer", choices=("dpo", "sft", "grpo"), default="dpo", help="which TRL trainer's loss")
    lookahead.add_argument("-o", "--output-dir", default="trl_ntk_lookahead", help="output folder")
    lookahead.add_argument("--max-examples", type=_positive_int, default=None, help="score the first N rows only")
    lookahead.add_argument("--rows", type=_positive_int, default=64, help="toy training rows to build")
    lookahead.add_argument("--model-path", default=None, help="a hub id or local model folder instead of the toy")
    lookahead.add_argument("--view", choices=("sgd", "adam", "adam_exact"), default="sgd", help="optimizer view")
    lookahead.add_argument("--checkpoint", default=None, help="Trainer checkpoint folder with optimizer.pt (adam)")
    lookahead.add_argument("--lr", type=_positive_float, default=None, help="SGD view learning rate")
    lookahead.add_argument("--batch-size", type=_positive_int, default=1, help="examples per scored step")
    lookahead.add_argument("--by-probe", action="store_true", help="also score every probe response")
    lookahead.add_argument(
        "--num-generations", type=_positive_int, default=None, help="grpo: completions sampled per prompt (>= 2)"
    )
    lookahead.add_argument(
        "--seed", type=int, default=0, help="grpo: sampling seed of the completion groups; the held-out probe draw"
    )
    data = lookahead.add_argument_group("model, data and probes (defaults: the offline toy)")
    data.add_argument(
        "--dataset",
        default=None,
        help="train data: a .json/.jsonl/.parquet/.csv file, a folder written by Dataset.save_to_disk, or a hub id",
    )
    data.add_argument("--dataset-split", default="train", help="split of a hub dataset or a saved DatasetDict")
    data.add_argument(
        "--loss-type", default=None, help="the trainer config's loss_type (checked against the names it lists)"
    )
    data.add_argument("--beta", type=_non_negative_float, default=None, help="the trainer config's beta (DPO / GRPO)")
    data.add_argument(
        "--reward-func", default=None, help="grpo with --dataset: the reward, module:function (importable)"
    )
    data.add_argument(
        "--probes",
        choices=("default", "heldout"),
        default="default",
        help="default: 8 prompts of the train data; heldout: the last --heldout-fraction rows are not scored and "
        "their answers are the probes",
    )
    data.add_argument(
        "--heldout-fraction", type=_positive_float, default=0.1, help="share of rows held out (default 0.1)"
    )
    data.add_argument("--probe-prompts", type=_positive_int, default=8, help="held-out prompts drawn as probes")
    data.add_argument(
        "--probes-file", default=None, help="probes written by hand: JSON / JSONL in ProbeSet.from_file's format"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trl-ntk`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        if not {"-h", "--help"} & set(argv):
            from trl_ntk.config import check_optional_dependencies

            try:
                check_optional_dependencies(report=True)
            except ImportError as error:
                print(f"trl-ntk report: error: {error}", file=sys.stderr)
                return 2
        from trl_ntk.report.render import main as report_main

        return report_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "lookahead":
        from trl_ntk.integration.lookahead_cli import run_cli

        return run_cli(args)
    if args.nthr and args.trainer != "grpo":
        parser.error("--nthr applies to --trainer grpo only")
    if args.fixes and args.trainer != "dpo":
        parser.error("--fixes applies to --trainer dpo only")
    from trl_ntk.demo.run import DemoConfig, check_demo_requirements, run_demo

    try:
        config = DemoConfig(
            trainer=args.trainer,
            out=args.output_dir,
            seed=args.seed,
            epochs=args.epochs,
            max_steps=args.steps,
            num_rows=args.rows,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            optimizer=args.optim,
            beta=args.beta,
            num_probe_prompts=args.probe_prompts,
            every_n_steps=args.every_n_steps,
            attribution=args.attribution,
            tokens_every_n_steps=args.tokens_every_n_steps,
            report_to=args.report_to,
            nthr=args.nthr,
            fixes=args.fixes,
            threads=args.threads,
            progress=not args.quiet,
        )
        check_demo_requirements(config)
    except (ImportError, TypeError, ValueError) as error:
        parser.error(str(error))
    run_demo(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
