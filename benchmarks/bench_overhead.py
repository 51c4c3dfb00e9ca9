"""Training-time overhead of `LearningDynamicsCallback` on the toy DPO, GRPO and SFT runs, per level and period.

    python benchmarks/bench_overhead.py [--threads 1] [--repeats 2] [--steps 50] [--every-n-steps 10 50]
        [--levels none sums] [--trainers dpo grpo sft]

The same training (toy model and data, the demo recipes' batch sizes and optimizers, fixed seed) runs without the
callback and with it at each level (`"none"`, `"sums"`, `"tokens"`) and each `every_n_steps`, all other callback
options at their defaults. Runs are interleaved (plain, then every level x period, then again) so that machine load
hits all alike; ratios are taken against the plain run of the same round and the median over rounds is printed,
for wall and process-CPU time (the CPU column is the robust one on a shared machine).

Besides whole runs, the callback's events are timed one by one: the cost of one analysis step (for `"none"`: one
scoring event, i.e. greedy generation of the probe prompts, encoding, probe forwards and records) in plain steps,
`callback CPU seconds in that step / median plain step`, median over the analysed steps after step 0 (step 0 also
pays one-time costs); the end-of-training scoring; where the time goes (generation, probe scoring, the update
analysis, the token matrix); and the steps it does not analyse ("other steps": their median CPU time over the plain
step's, its per-step hooks included; a check that they cost nothing, +-5-10% from one run to the next here). The
steady-state projection of a long run is `1 + event / every_n_steps`; at the tokens level, the event is that of the
steps without the token matrix, and the projection averages over one period of the matrix (`matrix_every_n_steps`,
default 1000: one analysis in 20 at every 50 steps computes it, costed as the measured steps with it, step 0
included).
Targets: a scoring event ("none") <= 0.5 plain steps, so that tracking every 10 steps is <= 1.05x; at every 50
steps "none" <= 1.05x, "sums" <= 1.15x, "tokens" <= 1.5x.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from trl_ntk.config import DynamicsConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LEVELS = ("none", "sums", "tokens")
TARGETS = {"none": 1.05, "sums": 1.15, "tokens": 1.5}
"""Whole-run targets at every 50 steps ("none": also at every 10 steps)."""
EVENT_TARGET = 0.5
"""A scoring event ("none") in plain training steps."""
EVENTS = ("on_train_begin", "on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_train_end")
PARTS = ("generation", "probe scoring", "update analysis", "token matrix")


def _training_args(output_dir: str, steps: int, batch_size: int, learning_rate: float, optimizer: str) -> dict:
    """TrainingArguments of the demo recipes (CPU, fp32, constant learning rate, clipping at 1, no logging)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch_size,
        "max_steps": steps,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": optimizer,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 10**9,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "data_seed": 0,
        "use_cpu": True,
        "bf16": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def dpo_trainer(output_dir: str, steps: int):
    """The demo's DPO recipe: warm toy model, 16 preference pairs per step, sigmoid loss, beta 0.1, SGD 5e-3."""
    from trl import DPOConfig, DPOTrainer

    from trl_ntk.demo import toy

    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    args = DPOConfig(
        **_training_args(output_dir, steps, 16, 5e-3, "sgd"), beta=0.1, loss_type=["sigmoid"], max_length=128
    )
    data = toy.preference_dataset(n=288, seed=0)
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def grpo_trainer(output_dir: str, steps: int):
    """The demo's GRPO recipe: warm toy model, 4 prompts x 8 completions of <= 24 tokens per step, AdamW 1e-3."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_ntk.demo import toy

    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    args = GRPOConfig(
        **_training_args(output_dir, steps, 32, 1e-3, "adamw_torch"),
        beta=0.0,
        num_generations=8,
        max_completion_length=24,
        temperature=1.0,
    )
    data = toy.math_dataset(n=512, seed=0)
    return GRPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, reward_funcs=toy.math_reward
    )


def sft_trainer(output_dir: str, steps: int):
    """The demo's SFT recipe: pretrain-warm toy model, 16 prompt-completion rows per step, AdamW 1e-3."""
    from trl import SFTConfig, SFTTrainer

    from trl_ntk.demo import toy

    model, tokenizer = toy.model_and_tokenizer(warmup="pretrain")
    data = toy.preference_dataset(n=288, seed=0)
    train = data.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    args = SFTConfig(**_training_args(output_dir, steps, 16, 1e-3, "adamw_torch"), max_length=128)
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)


TRAINERS: dict[str, Callable[[str, int], Any]] = {"dpo": dpo_trainer, "grpo": grpo_trainer, "sft": sft_trainer}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


@dataclass
class RunTimes:
    """Seconds of one training run, each as (wall, CPU)."""

    train: tuple[float, float] = (0.0, 0.0)
    construct: tuple[float, float] = (0.0, 0.0)
    steps: list[tuple[float, float]] = field(default_factory=list)
    events: dict[Any, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    parts: dict[tuple[int, str], list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    scoring_steps: list[int] = field(default_factory=list)


class StepTimer(TrainerCallback):
    """Wall and CPU seconds of every optimizer step (added before the callback under test, so its events fall
    inside the step)."""

    def __init__(self, times: RunTimes) -> None:
        self.times = times
        self.step = -1
        self.start = _clock()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.start = _clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.steps.append(_since(self.start))


def _time_events(callback: Any, timer: StepTimer, times: RunTimes) -> None:
    """Replace the callback's event methods by timed ones; seconds go to `times.events[step]` inside a step and to
    `times.events[event name]` for the train begin / end events."""
    for name in EVENTS:
        method = getattr(callback, name)

        def timed(args, state, control, _method=method, _name=name, **kwargs):
            start = _clock()
            result = _method(args, state, control, **kwargs)
            wall, cpu = _since(start)
            key = _name if _name in ("on_train_begin", "on_train_end") else timer.step
            times.events[key][0] += wall
            times.events[key][1] += cpu
            return result

        setattr(callback, name, timed)


class _PartTimer:
    """Times named package functions while a run is active (the callback's generation, scoring, analysis, and the
    token matrix inside the analysis), keyed by the step being analysed."""

    def __init__(self) -> None:
        from trl_ntk.analysis import dynamics
        from trl_ntk.integration import callbacks
        from trl_ntk.ntk import kernels

        self.targets = [
            (callbacks, "sample_responses", "generation"),
            (callbacks, "score_responses", "probe scoring"),
            (dynamics, "explain_update", "update analysis"),
            (kernels, "logprob_kernel", "token matrix"),
        ]
        self.times: RunTimes | None = None
        self.timer: StepTimer | None = None
        self.depth: dict[str, int] = defaultdict(int)
        for module, name, part in self.targets:
            setattr(module, name, self._wrap(getattr(module, name), part))

    def _wrap(self, fn: Callable, part: str) -> Callable:
        def timed(*args, **kwargs):
            if self.times is None or self.depth[part]:
                return fn(*args, **kwargs)
            self.depth[part] += 1
            start = _clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[part] -= 1
                wall, cpu = _since(start)
                slot = self.times.parts[(self.timer.step, part)]
                slot[0] += wall
                slot[1] += cpu

        return timed


def run_once(kind: str, level: str | None, steps: int, every_n_steps: int, parts: _PartTimer) -> RunTimes:
    """One training run (`level=None`: without the callback)."""
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    times = RunTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = TRAINERS[kind](output_dir, steps)
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer(times)
        trainer.add_callback(timer)
        if level is not None:
            start = _clock()
            callback = LearningDynamicsCallback(trainer, every_n_steps=every_n_steps, attribution=level, strict=True)
            times.construct = _since(start)
            _time_events(callback, timer, times)
            trainer.add_callback(callback)
            parts.times, parts.timer = times, timer
        start = _clock()
        try:
            trainer.train()
        finally:
            parts.times = None
        times.train = _since(start)
        times.scoring_steps = [s for s in range(steps) if s % every_n_steps == 0]
    return times


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


RunKey = tuple[str, int] | None
"""`(level, every_n_steps)` of a run with the callback, `None` for the plain run."""


def measure(kind: str, args: argparse.Namespace, parts: _PartTimer) -> dict[RunKey, list[RunTimes]]:
    run_once(kind, "sums", 2, 1, parts)  # warm-up, not timed: first trainer, dataset caches, first JVP
    keys: list[RunKey] = [None] + [(level, every) for level in args.levels for every in args.every_n_steps]
    runs: dict[RunKey, list[RunTimes]] = {key: [] for key in keys}
    for round_index in range(args.repeats):
        for key in keys:
            if key is not None and key[0] == "tokens" and round_index >= args.tokens_repeats:
                continue
            start = time.perf_counter()
            level, every = key if key is not None else (None, args.every_n_steps[0])
            runs[key].append(run_once(kind, level, args.steps, every, parts))
            name = "plain" if key is None else f"{level} @{every}"
            print(f"  [{kind} round {round_index + 1}: {name} {time.perf_counter() - start:.1f} s]", flush=True)
    return runs


def _matrix_steps(level: str, steps: list[int]) -> set[int]:
    """The analysed steps whose tokens-level analysis computes the token matrix at the callback's defaults: the
    first and the multiples of `matrix_every_n_steps`."""
    if level != "tokens" or not steps:
        return set()
    every = DynamicsConfig().matrix_every_n_steps
    return {steps[0]} | {step for step in steps if every is None or step % every == 0}


def _event_multiple(level_runs: list[RunTimes], plain_step: float, level: str) -> tuple[float, dict[int, float]]:
    """`(median event cost after step 0 among the steps without the token matrix, per analysed step)` in plain
    steps (callback CPU s / plain step CPU s)."""
    per_step = {
        step: _median([run.events[step][1] for run in level_runs]) / plain_step for step in level_runs[0].scoring_steps
    }
    with_matrix = _matrix_steps(level, level_runs[0].scoring_steps)
    later = [value for step, value in per_step.items() if step > 0 and step not in with_matrix]
    return _median(later or list(per_step.values())), per_step


def _other_steps(level_runs: list[RunTimes]) -> float:
    """Median CPU seconds of the steps the callback does not analyse (its per-step hooks included), after step 0."""
    return _median(
        [
            cpu
            for run in level_runs
            for step, (_, cpu) in enumerate(run.steps)
            if step > 0 and step not in set(run.scoring_steps)
        ]
    )


def _long_run(level: str, every: int, event: float, per_step: dict[int, float]) -> float:
    """Projected whole-run ratio of a long run: `1 + mean event / every`, the mean over one period of the token
    matrix (`matrix_every_n_steps / every` analyses, one of them with the matrix, costed as the median of the
    measured steps with it, step 0's one-time costs included)."""
    every_matrix = DynamicsConfig().matrix_every_n_steps
    matrix_events = [per_step[s] for s in _matrix_steps(level, sorted(per_step))]
    if level != "tokens" or every_matrix is None or not matrix_events:
        return 1 + event / every
    analyses = max(every_matrix // every, 1)
    return 1 + (event * (analyses - 1) + _median(matrix_events)) / (analyses * every)


def report(kind: str, runs: dict[RunKey, list[RunTimes]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print the trainer's tables; return one summary row per level and period."""
    plain_runs = runs[None]
    plain_step = [_median([s[i] for run in plain_runs for s in run.steps[1:]]) for i in range(2)]
    print(
        f"\n{kind.upper()}: {args.steps} steps; plain step (median) {plain_step[0] * 1e3:.0f} ms wall, "
        f"{plain_step[1] * 1e3:.0f} ms CPU; plain run {_median([r.train[0] for r in plain_runs]):.1f} s wall"
    )
    print(
        f"{'level':<8}{'every':>6}{'runs':>5}{'event (x plain step)':>22}{'run ratio wall':>16}{'CPU':>7}"
        f"{'other steps':>12}{'steady state':>14}{'target':>9}{'end score (x)':>15}"
    )
    summary = []
    for key, level_runs in runs.items():
        if key is None:
            continue
        level, every = key
        ratios = [
            _median([run.train[i] / plain.train[i] for run, plain in zip(level_runs, plain_runs)]) for i in range(2)
        ]
        event, per_step = _event_multiple(level_runs, plain_step[1], level)
        other = _other_steps(level_runs) / plain_step[1]
        steady = _long_run(level, every, event, per_step)
        end = _median([run.events["on_train_end"][1] for run in level_runs]) / plain_step[1]
        target = TARGETS[level] if every >= 50 or level == "none" else None
        verdict = "" if target is None else ("met" if ratios[1] <= target else "MISSED")
        if level == "none":
            verdict += f", event {'met' if event <= EVENT_TARGET else 'MISSED'} (<= {EVENT_TARGET})"
        print(
            f"{level:<8}{every:>6}{len(level_runs):>5}{event:>22.2f}{ratios[0]:>16.3f}{ratios[1]:>7.3f}"
            f"{other:>12.3f}{steady:>14.3f}{'' if target is None else '<= ' + str(target):>9}{end:>15.2f}   {verdict}"
            f" (per analysed step: {', '.join(f'{step}: {value:.2f}' for step, value in per_step.items())})"
        )
        summary.append(
            {
                "trainer": kind,
                "level": level,
                "every": every,
                "event": event,
                "wall": ratios[0],
                "cpu": ratios[1],
                "other": other,
                "steady": steady,
            }
        )
    _report_parts(kind, runs)
    return summary


def _report_parts(kind: str, runs: dict[RunKey, list[RunTimes]]) -> None:
    print(f"\n{kind.upper()}: where an analysis step's callback time goes (CPU seconds, median over runs)")
    print(
        f"{'level':<8}{'every':>6}{'step':>6}"
        + "".join(f"{part:>18}" for part in PARTS)
        + f"{'other':>10}{'total':>10}"
    )
    for key, level_runs in runs.items():
        if key is None:
            continue
        for step in level_runs[0].scoring_steps:
            values = [_median([run.parts[(step, part)][1] for run in level_runs]) for part in PARTS]
            total = _median([run.events[step][1] for run in level_runs])
            # the token matrix runs inside the update analysis: report the analysis without it
            values[2] -= values[3]
            other = total - sum(values)
            print(
                f"{key[0]:<8}{key[1]:>6}{step:>6}"
                + "".join(f"{v:>18.3f}" for v in values)
                + f"{other:>10.3f}{total:>10.3f}"
            )


def _print_summary(rows: list[dict[str, Any]]) -> None:
    """One side-by-side table of every trainer, level and period (markdown, for benchmarks/README.md)."""
    print("\n| trainer | level | every | event (x plain step) | whole run wall / CPU |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['trainer'].upper()} | {row['level']} | {row['every']} | {row['event']:.2f} | "
            f"{row['wall']:.3f} / {row['cpu']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of interleaved runs (default 2)")
    parser.add_argument(
        "--tokens-repeats",
        type=int,
        default=1,
        help="rounds that include the 'tokens' level (default 1: its cost "
        "is far above the machine noise and dominates the benchmark's run time)",
    )
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    parser.add_argument(
        "--every-n-steps", type=int, nargs="+", default=[10, 50], help="the callback's every_n_steps (default 10 50)"
    )
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--levels", nargs="+", default=["none", "sums"], choices=list(LEVELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), {os.cpu_count()} CPUs")
    parts = _PartTimer()
    start = time.perf_counter()
    summary = []
    for kind in args.trainers:
        runs = measure(kind, args, parts)
        summary += report(kind, runs, args)
    _print_summary(summary)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
