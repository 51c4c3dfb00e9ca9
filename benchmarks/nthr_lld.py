"""NTHR on the toy GRPO task: paired lazy-likelihood-displacement test, whole-run reward curves, and NTHR's cost.

    python benchmarks/nthr_lld.py [--seeds 3] [--steps 60] [--checkpoints 5] [--json results.json]

1. Paired LLD. Along a plain GRPO run (seed 0), the model and optimizer state are kept at `--checkpoints` points. At
   each, the same generated batches (fixed seeds) take one optimizer step with plain advantages and one with NTHR's
   from the same state; per mixed group, `Delta = mean_{i in P} [ln pi_w'(y_i|x) - ln pi_w(y_i|x)]` (summed
   completion log-probs of the group's correct completions). Reported per arm: mean and median Delta, the fraction
   of groups with Delta <= 0, and the paired difference (with a control: the plain step taken twice); and the
   fraction of negative tokens NTHR downweights.
2. Whole runs: plain GRPO and GRPO + NTHR (default options) for `--steps` steps, `--seeds` seeds; mean training reward
   (on-policy samples) per window of steps.
3. Cost: NTHR's seconds per step over the trainer's step time, on the toy runs (path "generation") and at group size
   8 with 64-token completions for each way of getting the hidden states ("generation", "old_logps" with
   num_iterations=2, and the separate "forward").
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GROUP_SIZE = 8
PROMPTS_PER_STEP = 8


def make_trainer(seed: int, steps: int, output_dir: str, nthr: dict[str, Any] | None, **overrides: Any):
    """A GRPO trainer on the toy arithmetic task (warm toy model), with an NTHR callback when `nthr` is given."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_ntk.demo import toy
    from trl_ntk.integration.nthr import NTHRCallback

    model, tokenizer = toy.model_and_tokenizer()
    options = {
        "output_dir": output_dir,
        "per_device_train_batch_size": GROUP_SIZE * PROMPTS_PER_STEP,
        "num_generations": GROUP_SIZE,
        "max_completion_length": 32,
        "temperature": 1.0,
        "learning_rate": 3e-4,
        "lr_scheduler_type": "constant",
        "max_steps": steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": seed,
        "loss_type": "grpo",
        "beta": 0.0,
    }
    options.update(overrides)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=toy.math_reward,
        args=GRPOConfig(**options),
        train_dataset=toy.math_dataset(n=4096, seed=seed),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    callback = None
    if nthr is not None:
        callback = NTHRCallback(trainer, **nthr)
        trainer.add_callback(callback)
    return trainer, callback


class Snapshots(TrainerCallback):
    """Model and optimizer state at the start of the chosen optimizer steps (parameters `w_step`)."""

    def __init__(self, trainer, steps: set[int]) -> None:
        self.trainer, self.steps, self.saved = trainer, steps, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            optimizer = self.trainer.optimizer.optimizer
            self.saved[state.global_step] = (
                copy.deepcopy(self.trainer.model.state_dict()),
                copy.deepcopy(optimizer.state_dict()),
            )


def rewards_per_step(trainer) -> list[float]:
    return [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]


def cost_per_step(trainer, callback) -> dict[str, float]:
    """NTHR seconds over TRL's `step_time`, over the generation cycles after the first (whose NTHR time also holds
    the one-time check of the capture path, reported apart). A cycle is the steps one generation batch serves."""
    step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
    seconds = [record["seconds"] for record in callback.records]
    cycle = round(len(step_times) / len(seconds))
    cycle_times = [sum(step_times[i * cycle : (i + 1) * cycle]) for i in range(len(seconds))]
    return {
        "fraction": sum(seconds[1:]) / sum(cycle_times[1:]),
        "median_fraction": statistics.median(s / t for s, t in zip(seconds[1:], cycle_times[1:], strict=True)),
        "seconds_per_step": sum(seconds[1:]) / (cycle * (len(seconds) - 1)),
        "step_time": statistics.mean(step_times[cycle:]),
        "first_step_fraction": seconds[0] / cycle_times[0],
        "path": callback.records[-1]["path"],
    }


def sequence_logprobs(trainer, batch: dict[str, Any]) -> torch.Tensor:
    """`[B]` summed completion log-probs under the trainer's model."""
    with torch.no_grad():
        logprobs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
            batch["completion_ids"].shape[1],
        )
    return (logprobs * batch["completion_mask"]).sum(-1)


def one_step_delta(trainer, state, batch: dict[str, Any], advantages: torch.Tensor) -> torch.Tensor:
    """From `state`, one optimizer step on `batch` with `advantages`; `[B]` change of the summed log-probs."""
    model, optimizer = trainer.model, trainer.optimizer.optimizer
    model.load_state_dict(state[0])
    optimizer.load_state_dict(copy.deepcopy(state[1]))  # loading aliases the tensors, which step() updates
    before = sequence_logprobs(trainer, batch)
    optimizer.zero_grad()
    trainer.compute_loss(model, {**batch, "advantages": advantages}).backward()
    if trainer.args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return sequence_logprobs(trainer, batch) - before


def group_deltas(change: torch.Tensor, advantages: torch.Tensor) -> list[float | None]:
    """Per group: mean change over its positive-advantage completions (None unless the group is mixed)."""
    out = []
    for start in range(0, change.shape[0], GROUP_SIZE):
        rows = slice(start, start + GROUP_SIZE)
        positive, negative = advantages[rows] > 0, advantages[rows] < 0
        out.append(float(change[rows][positive].mean()) if positive.any() and negative.any() else None)
    return out


def paired_lld(trainer, snapshots: dict[int, Any], batches_per_checkpoint: int, nthr_options: dict[str, Any]):
    """Both arms from the same checkpoint and batch; returns per-group rows."""
    from trl_ntk.integration.nthr import NTHRCallback

    measure = NTHRCallback(trainer, apply=False, **nthr_options)
    trainer.current_gradient_accumulation_steps = 1
    prompts = trainer.train_dataset
    rows = []
    for step, state in sorted(snapshots.items()):
        for index in range(batches_per_checkpoint):
            trainer.model.load_state_dict(state[0])
            trainer.model.train()
            generator = torch.Generator().manual_seed(1000 * step + index)
            picks = torch.randperm(len(prompts), generator=generator)[:PROMPTS_PER_STEP].tolist()
            inputs = [prompts[i] for i in picks for _ in range(GROUP_SIZE)]
            torch.manual_seed(1000 * step + index)
            batch = trainer._generate_and_score_completions(inputs)
            plain = batch["advantages"]
            weights = measure.last_weights
            delta_plain = group_deltas(one_step_delta(trainer, state, batch, plain), plain)
            delta_repeat = group_deltas(one_step_delta(trainer, state, batch, plain), plain)
            delta_nthr = group_deltas(one_step_delta(trainer, state, batch, plain[:, None] * weights), plain)
            for group, (d_plain, d_repeat, d_nthr) in enumerate(
                zip(delta_plain, delta_repeat, delta_nthr, strict=True)
            ):
                if d_plain is None:
                    continue
                group_rows = slice(group * GROUP_SIZE, (group + 1) * GROUP_SIZE)
                negative = (plain[group_rows] < 0)[:, None] & batch["completion_mask"][group_rows].bool()
                rows.append(
                    {
                        "checkpoint": step,
                        "delta_plain": d_plain,
                        "delta_plain_repeat": d_repeat,
                        "delta_nthr": d_nthr,
                        "negative_tokens": int(negative.sum()),
                        "downweighted": int((negative & (weights[group_rows] != 1)).sum()),
                    }
                )
    measure.remove()
    return rows


def summarize_paired(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def arm(key):
        values = [row[key] for row in rows]
        return {
            "mean": statistics.mean(values),
            "median": statistics.median(values),
            "frac_nonpositive": sum(v <= 0 for v in values) / len(values),
        }

    differences = [row["delta_nthr"] - row["delta_plain"] for row in rows]
    repeat_gap = max(abs(row["delta_plain_repeat"] - row["delta_plain"]) for row in rows)
    touched = [d for d, row in zip(differences, rows, strict=True) if row["downweighted"]]
    by_checkpoint = {}
    for row in rows:
        entry = by_checkpoint.setdefault(row["checkpoint"], {"groups": 0, "negative": 0, "downweighted": 0})
        entry["groups"] += 1
        entry["negative"] += row["negative_tokens"]
        entry["downweighted"] += row["downweighted"]
    return {
        "groups": len(rows),
        "plain": arm("delta_plain"),
        "nthr": arm("delta_nthr"),
        "difference_mean": statistics.mean(differences),
        "difference_sem": statistics.stdev(differences) / math.sqrt(len(differences)) if len(rows) > 1 else math.nan,
        "repeat_max_abs_gap": repeat_gap,
        "difference_frac_positive": sum(d > 0 for d in differences) / len(differences),
        "groups_with_downweighted_tokens": len(touched),
        "difference_mean_in_those": statistics.mean(touched) if touched else math.nan,
        "frac_downweighted": sum(r["downweighted"] for r in rows) / max(1, sum(r["negative_tokens"] for r in rows)),
        "frac_downweighted_by_checkpoint": {
            step: entry["downweighted"] / max(1, entry["negative"]) for step, entry in sorted(by_checkpoint.items())
        },
    }


def window_means(values: list[float], window: int) -> list[float]:
    return [statistics.mean(values[i : i + window]) for i in range(0, len(values), window)]


def run_curves(seeds: int, steps: int, checkpoints: int, workdir: str):
    every = max(1, steps // checkpoints)
    checkpoint_steps = {every * k for k in range(checkpoints)}
    curves = {"plain": [], "nthr": []}
    costs, snapshots, plain_trainer = [], None, None
    for seed in range(seeds):
        for arm in ("plain", "nthr"):
            started = time.perf_counter()
            trainer, callback = make_trainer(seed, steps, f"{workdir}/{arm}-{seed}", {} if arm == "nthr" else None)
            keeper = None
            if arm == "plain" and seed == 0:
                keeper = Snapshots(trainer, checkpoint_steps)
                trainer.add_callback(keeper)
            trainer.train()
            curves[arm].append(rewards_per_step(trainer))
            if callback is not None:
                costs.append(cost_per_step(trainer, callback))
            if keeper is not None:
                snapshots, plain_trainer = keeper.saved, trainer
            print(f"  run {arm} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return curves, costs, snapshots, plain_trainer


def long_completion_costs(workdir: str, steps: int) -> dict[str, dict[str, float]]:
    """Group size 8, 64-token completions (EOS held off by `min_new_tokens`), one run per hidden-state path."""
    settings = {
        "generation": ({"hidden_source": "generation"}, {}),
        "old_logps": ({"hidden_source": "old_logps"}, {"num_iterations": 2}),
        "forward": ({"hidden_source": "forward"}, {}),
    }
    out = {}
    for name, (nthr, overrides) in settings.items():
        trainer, callback = make_trainer(
            0,
            steps,
            f"{workdir}/cost-{name}",
            nthr,
            max_completion_length=64,
            generation_kwargs={"min_new_tokens": 64},
            **overrides,
        )
        trainer.train()
        out[name] = cost_per_step(trainer, callback)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--batches-per-checkpoint", type=int, default=2)
    parser.add_argument("--cost-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        print(
            f"whole runs: {args.seeds} seeds x (plain, NTHR) x {args.steps} steps, group size {GROUP_SIZE}, "
            f"{PROMPTS_PER_STEP} prompts per step",
            flush=True,
        )
        curves, costs, snapshots, plain_trainer = run_curves(args.seeds, args.steps, args.checkpoints, workdir)
        print(f"paired LLD at steps {sorted(snapshots)} of the plain seed-0 run", flush=True)
        rows = paired_lld(plain_trainer, snapshots, args.batches_per_checkpoint, {})
        paired = summarize_paired(rows)
        print("cost at 64-token completions", flush=True)
        long_costs = long_completion_costs(workdir, args.cost_steps)

    print("\n== paired one-step LLD (same checkpoint, same batch; Delta in nats, mixed groups) ==")
    print(f"groups: {paired['groups']}  (checkpoints {sorted(snapshots)}, {args.batches_per_checkpoint} batches each)")
    print(f"{'arm':<8}{'mean Delta':>14}{'median Delta':>14}{'frac Delta<=0':>15}")
    for arm in ("plain", "nthr"):
        stats = paired[arm]
        print(f"{arm:<8}{stats['mean']:>14.4f}{stats['median']:>14.4f}{stats['frac_nonpositive']:>15.3f}")
    print(
        f"paired Delta_nthr - Delta_plain: mean {paired['difference_mean']:.5f} "
        f"+- {paired['difference_sem']:.5f} (s.e.), "
        f"fraction > 0 {paired['difference_frac_positive']:.3f}; in the "
        f"{paired['groups_with_downweighted_tokens']} groups where NTHR downweighted something: mean "
        f"{paired['difference_mean_in_those']:.5f}"
    )
    print(f"control: the plain step run twice differs by at most {paired['repeat_max_abs_gap']:.2e} nats per group")
    print(
        f"fraction of negative tokens NTHR downweights: {paired['frac_downweighted']:.4f}  by checkpoint: "
        + ", ".join(f"{k}: {v:.4f}" for k, v in paired["frac_downweighted_by_checkpoint"].items())
    )

    window = 10
    print(f"\n== whole-run training reward (on-policy samples), mean per {window}-step window ==")
    for arm in ("plain", "nthr"):
        per_seed = [window_means(curve, window) for curve in curves[arm]]
        mean = [statistics.mean(values) for values in zip(*per_seed, strict=True)]
        print(
            f"{arm:<8}"
            + " ".join(f"{v:.3f}" for v in mean)
            + "   last window per seed: "
            + ", ".join(f"{w[-1]:.3f}" for w in per_seed)
        )

    print("\n== NTHR cost (NTHR seconds / trainer step_time, steps after the first) ==")
    print(f"{'setting':<34}{'path':>12}{'fraction':>10}{'median':>10}{'s/step':>9}{'step s':>9}{'1st step':>10}")
    for seed, cost in enumerate(costs):
        name = f"toy runs, seed {seed}"
        print(
            f"{name:<34}{cost['path']:>12}{cost['fraction']:>10.4f}{cost['median_fraction']:>10.4f}"
            f"{cost['seconds_per_step']:>9.4f}{cost['step_time']:>9.3f}{cost['first_step_fraction']:>10.3f}"
        )
    for name, cost in long_costs.items():
        label = f"G=8, 64-token completions, {name}"
        print(
            f"{label:<34}{cost['path']:>12}{cost['fraction']:>10.4f}{cost['median_fraction']:>10.4f}"
            f"{cost['seconds_per_step']:>9.4f}{cost['step_time']:>9.3f}{cost['first_step_fraction']:>10.3f}"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s, torch.set_num_threads({args.threads})")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(
                {
                    "paired": paired,
                    "paired_rows": rows,
                    "curves": curves,
                    "costs": costs,
                    "long_completion_costs": long_costs,
                    "args": vars(args),
                },
                stream,
                indent=1,
            )


if __name__ == "__main__":
    main()
