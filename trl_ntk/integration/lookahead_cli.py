"""`trl-ntk lookahead`: build a trainer (the toy default, or a model, a dataset and a trainer config), its probes
(the defaults, a held-out split's answers, or a probe file), score it with `score_trainer` and write
`lookahead.jsonl` (plus parquet and the HTML report section).

Held-out probes: the last `ceil(fraction * N)` rows of the dataset are removed from the trainer's train dataset
(so they are never scored) and become the probes (`ProbeSet.from_preference_dataset`, or `ProbeSet.from_prompts`
for SFT / GRPO); the scored rows keep their dataset index.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import torch

from trl_ntk.integration.lookahead import (
    LookaheadResult,
    build_trainer,
    load_optimizer_state,
    score_trainer,
)
from trl_ntk.probes.probe_set import ProbeSet
from trl_ntk.report.lookahead import build_lookahead_report

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class CLIError(ValueError):
    """A bad command-line value, found before any scoring (the command prints it and exits with status 2)."""


def load_dataset_arg(source: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local `.json` / `.jsonl` / `.parquet` / `.csv` file, a folder written by
    `Dataset.save_to_disk` (a `DatasetDict` gives its `split`), or a hub id (`datasets.load_dataset`)."""
    import datasets

    path = Path(source)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise CLIError(f"--dataset {source}: unsupported file type (use {', '.join(_FILE_BUILDERS)})")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise CLIError(f"--dataset {source}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(source, split=split)


def load_reward_func(spec: str) -> Any:
    """The function named by `module:function` (imported; the module must be importable, e.g. on `PYTHONPATH`)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise CLIError(f"--reward-func must be module:function, got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise CLIError(f"--reward-func {spec}: {error}") from None
    if not callable(function):
        raise CLIError(f"--reward-func {spec}: not callable")
    return function


def split_heldout(dataset: Any, fraction: float) -> tuple[Any, Any]:
    """`(scored, held_out)`: the first rows and the last `ceil(fraction * N)` rows (at least one of each)."""
    if not 0 < fraction < 1:
        raise CLIError(f"--heldout-fraction must lie in (0, 1), got {fraction}")
    size = len(dataset)
    held = min(size - 1, max(1, math.ceil(fraction * size)))
    if size < 2:
        raise CLIError("--probes heldout needs a dataset of at least 2 rows")
    return dataset.select(range(size - held)), dataset.select(range(size - held, size))


def _probes(args: Any, kind: str, held_out: Any, tokenizer: Any) -> tuple[ProbeSet | None, dict[str, Any]]:
    """The probe set of the command (`None`: `score_trainer`'s defaults) and its description for the header."""
    if args.probes_file:
        return ProbeSet.from_file(args.probes_file), {"probes": "file", "probes_file": str(args.probes_file)}
    if held_out is None:
        return None, {"probes": "default"}
    options = {"num_prompts": args.probe_prompts, "seed": args.seed}
    if kind == "dpo" or {"chosen", "rejected"} <= set(held_out.column_names):
        probes = ProbeSet.from_preference_dataset(held_out, tokenizer, **options)
    else:
        probes = ProbeSet.from_prompts(held_out, tokenizer, **options)
    return probes, {"probes": "heldout", "heldout_rows": len(held_out)}


def _trainer_args(args: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if args.trainer == "grpo" and args.num_generations:
        extra["num_generations"] = args.num_generations
    if args.loss_type is not None:
        extra["loss_type"] = args.loss_type
    if args.beta is not None:
        extra["beta"] = args.beta
    return extra


def prepare(args: Any) -> tuple[Any, ProbeSet | None, dict[str, Any]]:
    """`(trainer, probes, header fields)` of the command; raises `CLIError` for a bad option before any scoring."""
    if args.probes_file and args.probes == "heldout":
        raise CLIError("--probes-file and --probes heldout are exclusive")
    if args.trainer == "grpo" and args.dataset and not args.reward_func:
        raise CLIError("--trainer grpo with --dataset needs --reward-func module:function (the rewards of a group)")
    dataset = held_out = None
    if args.dataset:
        dataset = load_dataset_arg(args.dataset, args.dataset_split)
    elif args.probes == "heldout":
        raise CLIError("--probes heldout needs --dataset")
    if args.probes == "heldout":
        dataset, held_out = split_heldout(dataset, args.heldout_fraction)
    reward = load_reward_func(args.reward_func) if args.reward_func else None
    try:
        trainer = build_trainer(
            args.trainer,
            args.output_dir,
            dataset=dataset,
            model_path=args.model_path,
            reward_funcs=reward,
            num_rows=args.rows,
            **_trainer_args(args),
        )
    except TypeError as error:  # a field the config class lacks, e.g. --beta for SFT
        raise CLIError(f"--trainer {args.trainer}: {error}") from None
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    probes, header = _probes(args, args.trainer, held_out, tokenizer)
    if held_out is not None:  # the probes' prompt ids "p<k>" name held-out row k, dataset row heldout_first_row + k
        header["heldout_first_row"] = len(dataset)
    header.update(
        dataset=args.dataset or "toy",
        loss_type=getattr(trainer.args, "loss_type", None),
        beta=getattr(trainer.args, "beta", None),
        model=args.model_path or "toy",
    )
    return trainer, probes, header


def run_cli(args: Any) -> int:
    """`trl-ntk lookahead`: score the training rows and write `lookahead.jsonl` (see the module docstring)."""
    try:
        trainer, probes, header = prepare(args)
    except (CLIError, ValueError) as error:
        print(f"trl-ntk lookahead: error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    if args.checkpoint:
        trainer.optimizer = load_optimizer_state(trainer, args.checkpoint)
    result = score_trainer(
        trainer,
        probes,
        view=args.view,
        lr=args.lr,
        by_probe=args.by_probe,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        num_generations=args.num_generations if args.trainer == "grpo" else None,
        seed=args.seed,
    )
    result.meta.update(header)
    path = result.write_jsonl(output_dir / "lookahead.jsonl")
    objective = "chosen" if "chosen" in result.effects.names else result.effects.names[0]
    written = [path, build_lookahead_report(path, objective=objective)]
    if importlib.util.find_spec("pandas") and importlib.util.find_spec("pyarrow"):
        written.append(result.write_parquet(output_dir / "lookahead.parquet"))
    print("\n".join([*summary_lines(result, objective), *(f"wrote {p}" for p in written)]))
    return 0


def summary_lines(result: LookaheadResult, objective: str, top: int = 5) -> list[str]:
    """A few lines for the console: the view, then the most harmful and most helpful examples for `objective`."""
    column = result.effects.column(objective)
    values = result.effects.total[:, column]
    order = values.argsort(stable=True).tolist()
    lines = [f"view: {result.meta.get('view')}  examples: {len(result.indices)}  objective: {objective}"]
    for label, picks in (("most harmful", order[:top]), ("most helpful", order[::-1][:top])):
        lines.append(f"{label}:")
        for row in picks:
            text = next(iter(result.texts[row].values()), "") if result.texts[row] else ""
            lines.append(f"  #{result.indices[row]:<5d} {values[row]:+.3e}  {text[:70]!r}")
    finite = values[torch.isfinite(values)]
    if finite.numel():
        lines.append(f"median {finite.median():+.3e}, negative for {int((finite < 0).sum())} of {finite.numel()}")
    return lines if math.isfinite(float(values.sum())) else lines + ["warning: non-finite effects"]
