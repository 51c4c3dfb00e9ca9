"""`trl-ntk demo`: a small offline run that shows the learning dynamics of fine-tuning on the toy default.

DPO (the default) shows the squeezing effect of Ren & Sutherland (ICLR 2025): the log-prob of the rejected responses
falls far, the chosen one ends lower too, while the model grows peakier (its argmax and its own greedy response gain
probability); the attributions show that the push down on rejected tokens is what drags the chosen response down.
SFT and GRPO (with lazy likelihood displacement, optionally against NTHR) run the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PrinterCallback, ProgressCallback

from trl_ntk.config import (
    ATTRIBUTION_LEVELS,
    check_choice,
    check_float,
    check_int,
    check_optional_dependencies,
    check_writable_dir,
)
from trl_ntk.demo import toy, toy_model
from trl_ntk.demo.summary import (
    arms_manifest,
    checks,
    fix_comparison,
    format_checks,
    format_table,
    nthr_checks,
    print_summary,
    reward_summary,
    summarize,
)
from trl_ntk.report.render import build_report

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPES",
    "DemoConfig",
    "check_demo_requirements",
    "checks",
    "format_checks",
    "format_table",
    "run_demo",
    "summarize",
    "train_one",
]

TrainerName = Literal["dpo", "sft", "grpo"]
TRAINERS: tuple[TrainerName, ...] = ("dpo", "sft", "grpo")
REPORT_TO = ("none", "wandb", "tensorboard", "trackio")
SUMMARY_NAME = "summary.json"
ARMS_NAME = "arms.json"
"""Written beside `summary.json` when the demo runs several arms (`--fixes`, `--nthr`): the arms' run folders and
table, which the plain arm's report shows in its arms panel (`trl_ntk.report.arms`)."""


@dataclass
class DemoConfig:
    """Options of one demo run; `resolved()` fills every option left unset from the trainer's tuned recipe
    (`RECIPES`).

    Args:
        trainer (`str`, *optional*, defaults to `"dpo"`): `"dpo"`, `"sft"` or `"grpo"`.
        out (`str`, *optional*, defaults to `"trl_ntk_demo"`): output folder (trainer output, `dynamics/`,
            `report.html`, `summary.json`).
        seed (`int`, *optional*, defaults to `0`): dataset draw, data order, probe choice, generation.
        epochs (`float`, *optional*): passes over the training rows.
        max_steps (`int`, *optional*): optimizer steps; overrides `epochs` when set.
        num_rows (`int`, *optional*): training rows (prompts are cycled, each row draws fresh responses).
        batch_size (`int`, *optional*): rows per optimizer step (GRPO: completions per step).
        learning_rate (`float`, *optional*): constant learning rate.
        optimizer (`str`, *optional*): a `transformers` `optim` name (`"sgd"`, `"adamw_torch"`).
        max_grad_norm (`float`, *optional*): gradient clipping norm (`0`: none).
        beta (`float`, *optional*): DPO's / GRPO's KL strength.
        num_probe_prompts (`int`, *optional*): prompts whose responses are probed.
        every_n_steps (`int`, *optional*): probe scoring and analysis period.
        attribution (`str`, *optional*, defaults to `"sums"`): `"none"`, `"sums"` or `"tokens"`.
        tokens_every_n_steps (`int`, *optional*): with `"sums"`, the `"tokens"` level on the analysed steps that are
            multiples of this (step 0 always is; `0`: never). One such step costs about `min(Mp, L)` batch JVPs:
            about 100 s of CPU for the DPO recipe's 8 probe prompts, so the DPO and SFT recipes run it at step 0
            only and the GRPO recipe (64 completions per step) not at all.
        report_to (`str`, *optional*, defaults to `"none"`): `"none"`, `"wandb"`, `"tensorboard"` or `"trackio"`.
        nthr (`bool`, *optional*, defaults to `False`): GRPO only: also run with `NTHRCallback` and compare.
        fixes (`bool`, *optional*, defaults to `False`): DPO only: also run each DPO fix (`DPO_FIXES`) from the
            same start and compare it with plain DPO.
        threads (`int`, *optional*, defaults to `1`): torch intra-op threads (the toy model is too small to gain
            from more).
        num_generations (`int`, *optional*): GRPO group size.
        max_completion_length (`int`, *optional*): GRPO generation length.
        progress (`bool`, *optional*, defaults to `True`): show the training progress bar.
    """

    trainer: TrainerName = "dpo"
    out: str = "trl_ntk_demo"
    seed: int = 0
    epochs: float | None = None
    max_steps: int | None = None
    num_rows: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    optimizer: str | None = None
    max_grad_norm: float | None = None
    beta: float | None = None
    num_probe_prompts: int | None = None
    every_n_steps: int | None = None
    attribution: str = "sums"
    tokens_every_n_steps: int | None = None
    report_to: str = "none"
    nthr: bool = False
    fixes: bool = False
    threads: int = 1
    num_generations: int | None = None
    max_completion_length: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {self.trainer!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        if self.nthr and self.trainer != "grpo":
            raise ValueError("--nthr applies to --trainer grpo only (NTHR reweights GRPO advantages)")
        if self.fixes and self.trainer != "dpo":
            raise ValueError("--fixes applies to --trainer dpo only (the DPO fixes)")
        check_choice("attribution", self.attribution, ATTRIBUTION_LEVELS)
        check_int("seed", self.seed)
        check_int("threads", self.threads, minimum=1)
        for name in ("max_steps", "num_rows", "batch_size", "num_probe_prompts", "every_n_steps", "num_generations"):
            check_int(name, getattr(self, name), minimum=1, optional=True)
        for name in ("tokens_every_n_steps", "max_completion_length"):
            check_int(name, getattr(self, name), minimum=0 if name.startswith("tokens") else 1, optional=True)
        for name, positive in (("epochs", True), ("learning_rate", True), ("beta", False), ("max_grad_norm", False)):
            value = getattr(self, name)
            if value is None:
                continue
            check_float(name, value, positive=positive)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def resolved(self) -> DemoConfig:
        """This config with every unset option taken from the trainer's recipe (`RECIPES`)."""
        recipe = dict(RECIPES[self.trainer])
        if self.epochs is not None or self.max_steps is not None:  # the user's length replaces the recipe's
            recipe.update(epochs=None, max_steps=None)
        values = {name: recipe[name] if getattr(self, name) is None else getattr(self, name) for name in recipe}
        return replace(self, **values)


RECIPES: dict[str, dict[str, Any]] = {
    "dpo": {
        "epochs": 25.0,
        "max_steps": None,
        "num_rows": 288,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "optimizer": "sgd",
        "max_grad_norm": 1.0,
        "beta": 1.0,
        "num_probe_prompts": 8,
        "every_n_steps": 18,
        "tokens_every_n_steps": 1000,
        "num_generations": None,
        "max_completion_length": None,
    },
    "sft": {
        "epochs": 6.0,
        "max_steps": None,
        "num_rows": 216,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "max_grad_norm": 1.0,
        "beta": None,
        "num_probe_prompts": 8,
        "every_n_steps": 5,
        "tokens_every_n_steps": 1000,
        "num_generations": None,
        "max_completion_length": None,
    },
    "grpo": {
        "epochs": None,
        "max_steps": 40,
        "num_rows": 4096,
        "batch_size": 64,
        "learning_rate": 3e-4,
        "optimizer": "adamw_torch",
        "max_grad_norm": 1.0,
        "beta": 0.0,
        "num_probe_prompts": 4,
        "every_n_steps": 5,
        "tokens_every_n_steps": 0,
        "num_generations": 8,
        "max_completion_length": 32,
    },
}
"""Tuned per-trainer defaults of the demo (`benchmarks/demo_seeds.py` prints the per-seed outcome).

DPO: sigmoid loss, beta 1.0, plain SGD at a constant 1e-2 with clipping at 1, 16 pairs per step, 25 epochs over 288
rows (450 steps) from the warm (SFT) toy model. With beta 0.1 the run degenerates after 4-6 epochs (the greedy
answers break down, repetition sets in) and the greedy response ends below its start; with beta 1 the loss saturates
once a pair's margin is large, so the squeeze stays clean for the whole run. SFT: AdamW 1e-3 for 6 epochs on the
chosen responses from the pre-trained toy base. GRPO: the worked-arithmetic task (`trl_ntk.demo.reasoning`: the
completions show their steps, so right and wrong ones share most tokens), 8 prompts x 8 completions per step, AdamW
3e-4, no KL term, `loss_type="grpo"`."""


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _training_args(config: DemoConfig, out: Path, run_name: str) -> dict[str, Any]:
    """TrainingArguments shared by the three trainers (CPU, fp32, constant learning rate, no checkpoints)."""
    args: dict[str, Any] = {
        "output_dir": str(out),
        "run_name": run_name,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": config.optimizer,
        "weight_decay": 0.0,
        "max_grad_norm": config.max_grad_norm,
        "logging_steps": config.every_n_steps,
        "save_strategy": "no",
        "report_to": config.report_to,
        "seed": config.seed,
        "data_seed": config.seed,
        "use_cpu": True,
        "bf16": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": not config.progress,
        "log_level": "passive" if config.progress else "warning",  # -q: no per-analysis lines either
    }
    args[_checkpointing_field()] = False  # TRL's configs default to True; a toy model has no memory to save
    if config.max_steps is not None:
        args["max_steps"] = config.max_steps
    else:
        args["num_train_epochs"] = config.epochs
    return args


def _checkpointing_field() -> str:
    """`activation_checkpointing` where transformers has it (it deprecates `gradient_checkpointing`), else the old
    name."""
    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


DPO_FIXES = ("sft_extension", "dpo_nthr")
"""The DPO fixes `--fixes` compares with plain DPO: `"sft_extension"` (SFT on the chosen and the rejected responses
before DPO, `dpo_fixes.extended_sft_dataset`, `EXTENSION_SFT` below) and `"dpo_nthr"` (`dpo_fixes.DPONTHRCallback`
with `DPO_NTHR`)."""

EXTENSION_SFT = {"num_train_epochs": 2.0, "learning_rate": 1e-3, "optim": "adamw_torch", "batch_size": 16}
"""The SFT stage of the dataset extension: AdamW, constant learning rate, on the `2 n` chosen and rejected rows."""

DPO_NTHR = {"beta": 1.0, "eta": 0.5}
"""`DPONTHRCallback` options of the demo: the paper's threshold multiplier; `eta` 0.5 (the paper's `"auto"` rule
gives 0 for a pair, one positive and one negative)."""


def _dpo_trainer(config: DemoConfig, out: Path, run_name: str, fix: str | None = None):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    data = toy.preference_dataset(n=config.num_rows, seed=config.seed)
    if fix == "sft_extension":
        model = _extension_sft(config, model, tokenizer, data, out / "sft_extension")
    args = DPOConfig(**_training_args(config, out, run_name), beta=config.beta, loss_type=["sigmoid"], max_length=128)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    if fix == "dpo_nthr":
        from trl_ntk.integration.dpo_fixes import DPONTHRCallback

        trainer.add_callback(DPONTHRCallback(trainer, **DPO_NTHR))
    return trainer, data


def _extension_sft(config: DemoConfig, model: Any, tokenizer: Any, data: Any, out: Path) -> Any:
    """The dataset extension's SFT stage (`EXTENSION_SFT`) on the chosen and rejected responses; returns the model."""
    from trl import SFTConfig, SFTTrainer

    from trl_ntk.integration.dpo_fixes import extended_sft_dataset

    options = dict(EXTENSION_SFT)
    args = {
        **_training_args(config, out, f"trl-ntk-demo-sft-extension-seed{config.seed}"),
        "per_device_train_batch_size": options.pop("batch_size"),
        "report_to": "none",
        "logging_steps": 10,
        "disable_tqdm": True,
        **options,
    }
    args.pop("max_steps", None)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**args, max_length=128),
        train_dataset=extended_sft_dataset(data, shuffle_seed=config.seed),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer.model


def _sft_trainer(config: DemoConfig, out: Path, run_name: str):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = toy.model_and_tokenizer(warmup="pretrain")
    data = toy.preference_dataset(n=config.num_rows, seed=config.seed)
    train = data.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    args = SFTConfig(**_training_args(config, out, run_name), max_length=128)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    return trainer, data


def _grpo_trainer(config: DemoConfig, out: Path, run_name: str):
    from trl import GRPOConfig, GRPOTrainer

    from trl_ntk.demo import reasoning

    model, tokenizer = reasoning.model_and_tokenizer()
    data = reasoning.reasoning_dataset(n=config.num_rows, seed=config.seed)
    args = GRPOConfig(
        **_training_args(config, out, run_name),
        beta=config.beta,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=1.0,
        loss_type="grpo",
    )
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, reward_funcs=reasoning.reasoning_reward
    )
    return trainer, data


def _probes(config: DemoConfig, trainer: Any, data: Any):
    from trl_ntk.probes.probe_set import ProbeSet

    tokenizer = trainer.processing_class
    if config.trainer == "grpo":
        return ProbeSet.from_prompts(data, tokenizer, num_prompts=config.num_probe_prompts, seed=config.seed)
    return ProbeSet.from_preference_dataset(
        data,
        tokenizer,
        num_prompts=config.num_probe_prompts,
        seed=config.seed,
        test_dataset=toy.preference_dataset(seed=config.seed, split="test"),
    )


def train_one(config: DemoConfig, out: Path, nthr: bool = False, fix: str | None = None) -> dict[str, Any]:
    """Train one toy run with `LearningDynamicsCallback` (and `NTHRCallback` when `nthr`, the DPO fix `fix`, one of
    `DPO_FIXES`); returns timings."""
    from transformers import set_seed

    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    set_seed(config.seed)
    if config.progress:
        _announce_toy_build("pretrain" if config.trainer == "sft" else True, sys.stderr)
    build = {"dpo": _dpo_trainer, "sft": _sft_trainer, "grpo": _grpo_trainer}[config.trainer]
    arm = "-nthr" if nthr else f"-{fix.replace('_', '-')}" if fix else ""
    run_name = f"trl-ntk-demo-{config.trainer}{arm}-seed{config.seed}"
    trainer, data = build(config, out, run_name, fix=fix) if fix else build(config, out, run_name)
    dynamics = LearningDynamicsCallback(
        trainer,
        probes=_probes(config, trainer, data),
        every_n_steps=config.every_n_steps,
        attribution=config.attribution,
        tokens_every_n_steps=(config.tokens_every_n_steps or None) if config.attribution == "sums" else None,
        seed=config.seed,
        output_dir=str(out / "dynamics"),
        report_to=config.report_to,
    )
    trainer.add_callback(dynamics)
    # The log dicts are not printed (they go to `log_history` and the dashboards); the progress bar stays.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if config.progress:
        trainer.add_callback(_QuietProgress())
    if nthr:
        _add_nthr(trainer, dynamics)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    if config.report_to == "wandb":  # transformers leaves its run open; the next run (--nthr) gets its own
        import wandb

        if wandb.run is not None:
            wandb.finish()
    return {"train_seconds": seconds, "steps": int(result.global_step), "log_history": trainer.state.log_history}


class _QuietProgress(ProgressCallback):
    """transformers' progress bar without the log dict printed at every logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def _add_nthr(trainer: Any, dynamics: Any) -> None:
    try:
        from trl_ntk.integration.nthr import NTHRCallback
    except ImportError as error:
        raise RuntimeError(f"--nthr needs NTHRCallback, which could not be imported: {error}") from error

    def record(entry: dict[str, Any]) -> None:
        if dynamics.sinks is not None:
            dynamics.sinks.write(entry)

    trainer.add_callback(NTHRCallback(trainer, beta=1.0, eta="auto", vocab="group", record_fn=record))


def check_demo_requirements(config: DemoConfig) -> None:
    """Everything `run_demo` needs, checked before any training: the packages (plotly for the report, the chosen
    dashboard's), a writable output folder and a known optimizer name. Raises `ImportError` / `ValueError` with the fix.
    """
    from transformers.training_args import OptimizerNames

    resolved = config.resolved()
    tokens = resolved.attribution == "tokens" or bool(resolved.tokens_every_n_steps)
    check_optional_dependencies(resolved.report_to, report=True, heatmaps=tokens)
    known = [name.value for name in OptimizerNames]
    if resolved.optimizer not in known:
        raise ValueError(f"--optim {resolved.optimizer!r} is not a transformers optimizer; e.g. sgd, adamw_torch")
    check_writable_dir(resolved.out, "--output-dir")


def _announce_toy_build(warmup: bool | str, stream: Any) -> None:
    """One line before the toy model's first build (about 30 s of CPU), so that the wait is explained."""
    stage = toy_model._stage_of(warmup)
    if not toy_model._is_built(toy.toy_cache_path(), stage):
        print(
            f"building the toy model (first use only, about 30-60 s of CPU; cached in {toy.toy_cache_path()}) ...",
            file=stream,
            flush=True,
        )


def write_arms(out: Path, trainer: str, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write `out/arms.json` for the arms panel (`summary.arms_manifest`) and return it. `summaries` maps each arm's
    subfolder of `out` (`""` for the plain arm, first) to its summary; the plain arm is named `"plain"`."""
    manifest = arms_manifest(
        trainer,
        {name or "plain": summary for name, summary in summaries.items()},
        {name or "plain": f"{name}/dynamics" if name else "dynamics" for name in summaries},
    )
    (out / ARMS_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def run_demo(config: DemoConfig, stream: Any = None) -> dict[str, Any]:
    """Train, write `report.html` and `summary.json` under `config.out`, print the table to `stream`; returns the
    summary (with `--nthr`, the baseline's, and the NTHR run's under `"nthr_run"`). With several arms (`--nthr`,
    `--fixes`) also `arms.json`, and the arms' table under `"arms"`."""
    stream = stream if stream is not None else sys.stdout
    config = config.resolved()
    check_demo_requirements(config)
    out = Path(config.out)
    if config.report_to == "wandb":  # the demo is offline: W&B too, unless WANDB_MODE says otherwise
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_PROJECT", "trl_ntk_demo")
        logger.info("W&B mode %s (sync an offline run with `wandb sync`)", os.environ["WANDB_MODE"])
    runs = [("", False)] + ([("nthr", True)] if config.nthr else [])
    runs += [(fix, False) for fix in DPO_FIXES] if config.fixes else []
    summaries = {}
    with _torch_threads(config.threads):
        for name, nthr in runs:
            run_out = out / name if name else out
            fix = name if name in DPO_FIXES else None
            timing = train_one(config, run_out, nthr=nthr, fix=fix)
            summary = summarize(run_out / "dynamics")
            summary.update(
                trainer=config.trainer,
                nthr=nthr,
                fix=fix,
                config={k: v for k, v in asdict(config).items() if k != "progress"},
                steps=timing["steps"],
                train_seconds=round(timing["train_seconds"], 1),
            )
            if config.trainer == "grpo":
                summary["reward"] = reward_summary(timing["log_history"])
            summaries[name] = summary
        (out / ARMS_NAME).unlink(missing_ok=True)  # a single run has no arms panel, whatever ran here before
        manifest = write_arms(out, config.trainer, summaries) if len(runs) > 1 else None
        for name, summary in summaries.items():  # after arms.json: the plain arm's report shows the arms panel
            start = time.perf_counter()
            summary["report"] = str(build_report((out / name if name else out) / "dynamics", progress=False))
            summary["report_seconds"] = round(time.perf_counter() - start, 1)
    summary = summaries[""]
    if config.nthr:
        summary["nthr_run"] = summaries["nthr"]
        summary["checks"].update(nthr_checks(summary, summaries["nthr"]))
    if config.fixes:
        summary["fixes"] = {fix: summaries[fix] for fix in DPO_FIXES}
        summary["fix_comparison"] = fix_comparison(summary, summary["fixes"])
    if manifest is not None:
        summary["arms"] = manifest["table"]
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, stream)
    return summary
