"""Lazy likelihood displacement (LLD) on the worked-arithmetic task, and what NTHR does about it, paired.

    python benchmarks/grpo_lld_task.py [--seeds 5] [--checkpoints 0,4,8] [--batches 2] [--json out.json]
    python benchmarks/grpo_lld_task.py --optim sgd --lr 0.1 --seeds 3 --sweep 0.5:auto 2:auto 1:0 1:0.5

Per seed, a plain GRPO run (TRL `GRPOTrainer`, `loss_type="grpo"`, beta 0, AdamW or `--optim`, 8 prompts x 8
generations, sampling seed = the seed) on `trl_ntk.demo.reasoning` keeps the model and optimizer state at the
`--checkpoints` steps. At each, `--batches` batches are generated once and three arms take one optimizer step from that
same state on the same completions: plain (TRL's advantages); NTHR (advantages x `NTHRCallback`'s token weights, beta 1,
eta "auto"); and positive-only (negative advantages set to 0). Per mixed group, `Delta = mean_{i in P} [ln pi'(y_i|x) -
ln pi(y_i|x)]` over its correct completions (summed completion log-probs). Reported, with 95% t-intervals over seeds
(per-seed means):

- the fraction of mixed groups with Delta <= 0 and the mean / median Delta of the positives, per arm;
- the displacement `Delta(positive-only) - Delta(plain)`: how much of the correct completions' change the wrong ones
  cause (positive = likelihood taken away by the negative gradient);
- `Delta(NTHR) - Delta(plain)` (paired) and the share of negative tokens NTHR down-weights;
- the Pearson and Spearman correlation over groups of GWHES (`trl_ntk.ntk.gwhes`, at the checkpoint, on the batch)
  with Delta(plain) and with the displacement.

`--sweep BETA:ETA ...` adds one NTHR arm per setting (same checkpoint, same batch), its token weights from
`trl_ntk.ntk.nthr.token_weights` on the final hidden states of the batch (the tokens where this route's weights at
beta 1, eta "auto" differ from the callback's are counted and printed); each is reported as its Delta<=0 share,
mean Delta, `Delta(arm) - Delta(plain)` and the share of negative tokens it down-weights.

NTHR's hyperparameters are the paper's defaults (Deng et al., "On the Effect of Negative Gradient in Group Relative
Deep Reinforcement Optimization", NeurIPS 2025, the section defining NTHR: threshold `tau = beta * min_i mean_k
s(y_i,k)` over the positives with beta = 1, and the scale `eta = 2 |0.5 - p|` with p the group's success rate), as
`NTHRCallback` implements them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import PrinterCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nthr_lld import GROUP_SIZE, PROMPTS_PER_STEP, Snapshots, group_deltas, one_step_delta  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def make_trainer(seed: int, steps: int, output_dir: str, lr: float, optim: str = "adamw_torch"):
    """A plain GRPO trainer on the worked-arithmetic task (warm reasoning model)."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_ntk.demo import reasoning

    model, tokenizer = reasoning.model_and_tokenizer()
    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=GROUP_SIZE * PROMPTS_PER_STEP,
        num_generations=GROUP_SIZE,
        max_completion_length=32,
        temperature=1.0,
        learning_rate=lr,
        optim=optim,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        loss_type="grpo",
        beta=0.0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reasoning.reasoning_reward,
        args=args,
        train_dataset=reasoning.reasoning_dataset(n=4096, seed=seed),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


@torch.no_grad()
def completion_hidden(trainer, batch: dict[str, Any]) -> torch.Tensor:
    """`[B, T, d]` final-layer hidden states (after the final norm) at the positions predicting the completion."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    hidden = trainer.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    start = batch["prompt_ids"].shape[1] - 1
    return hidden[:, start : start + batch["completion_ids"].shape[1]]


def parse_setting(text: str) -> tuple[float, float | str]:
    """`"BETA:ETA"` (ETA a number in [0, 1] or `auto`) -> `(beta, eta)`."""
    beta, _, eta = text.partition(":")
    return float(beta), eta if eta == "auto" else float(eta)


def arm_name(setting: tuple[float, float | str]) -> str:
    """The arm key of an NTHR setting, e.g. `nthr_b0.5_eauto`."""
    return f"nthr_b{setting[0]:g}_e{setting[1] if setting[1] == 'auto' else format(setting[1], 'g')}"


def sweep_weights(trainer, batch, hidden, advantages, settings) -> dict[str, torch.Tensor]:
    """`{arm: [B, T] NTHR token weights}` of each `(beta, eta)` setting, from the final `hidden` states `[B, T, d]`."""
    from trl_ntk.integration.nthr import _PolicyHead
    from trl_ntk.ntk.nthr import token_weights

    head = _PolicyHead(trainer.model)
    return {
        arm_name((beta, eta)): token_weights(
            hidden, head, batch["completion_ids"], batch["completion_mask"], advantages, GROUP_SIZE, beta=beta, eta=eta
        )
        for beta, eta in [(1.0, "auto"), *settings]
    }


def measure_checkpoint(
    trainer, measure, state, step: int, index: int, seed: int, settings: tuple = ()
) -> list[dict[str, Any]]:
    """One batch from one checkpoint: the three arms' (and each sweep setting's) per-group Delta, GWHES and NTHR's
    selection."""
    from trl_ntk.ntk.gwhes import gwhes

    trainer.model.load_state_dict(state[0])
    trainer.model.train()
    prompts = trainer.train_dataset
    key = 100_000 * seed + 1000 * step + index
    picks = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(key))[:PROMPTS_PER_STEP].tolist()
    torch.manual_seed(key)
    batch = trainer._generate_and_score_completions([prompts[i] for i in picks for _ in range(GROUP_SIZE)])
    plain = batch["advantages"]
    weights = measure.last_weights
    hidden = completion_hidden(trainer, batch)
    scores = gwhes(hidden, batch["completion_mask"], plain, GROUP_SIZE)
    swept = sweep_weights(trainer, batch, hidden, plain, settings) if settings else {}
    # tokens where the direct weights at beta 1, eta "auto" differ from the callback's (0 when they reproduce it)
    mismatch = int((swept.pop(arm_name((1.0, "auto"))) != weights).sum()) if swept else 0
    deltas = {
        "plain": group_deltas(one_step_delta(trainer, state, batch, plain), plain),
        "nthr": group_deltas(one_step_delta(trainer, state, batch, plain[:, None] * weights), plain),
        "positive_only": group_deltas(one_step_delta(trainer, state, batch, plain.clamp_min(0)), plain),
    }
    for arm, arm_weights in swept.items():
        deltas[arm] = group_deltas(one_step_delta(trainer, state, batch, plain[:, None] * arm_weights), plain)
    rows = []
    for group in range(len(deltas["plain"])):
        if deltas["plain"][group] is None:
            continue
        span = slice(group * GROUP_SIZE, (group + 1) * GROUP_SIZE)
        negative = (plain[span] < 0)[:, None] & batch["completion_mask"][span].bool()
        rows.append(
            {
                "seed": seed,
                "checkpoint": step,
                **{f"delta_{arm}": values[group] for arm, values in deltas.items()},
                "gwhes": float(scores.gwhes[group]),
                "success_rate": float((plain[span] > 0).float().mean()),
                "negative_tokens": int(negative.sum()),
                "downweighted": int((negative & (weights[span] != 1)).sum()),
                **{f"downweighted_{arm}": int((negative & (w[span] != 1)).sum()) for arm, w in swept.items()},
                "sweep_mismatch": mismatch if group == 0 else 0,
            }
        )
    return rows


def run_seed(
    seed: int, checkpoints: list[int], batches: int, lr: float, optim: str, workdir: str, settings: tuple = ()
) -> list[dict[str, Any]]:
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = make_trainer(seed, max(checkpoints) + 1, f"{workdir}/seed-{seed}", lr, optim)
    keeper = Snapshots(trainer, set(checkpoints))
    trainer.add_callback(keeper)
    trainer.train()
    measure = NTHRCallback(trainer, beta=1.0, eta="auto", apply=False)
    trainer.current_gradient_accumulation_steps = 1
    rows = []
    for step, state in sorted(keeper.saved.items()):
        for index in range(batches):
            rows += measure_checkpoint(trainer, measure, state, step, index, seed, settings)
    measure.remove()
    return rows


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def _pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return math.nan
    return statistics.correlation(x, y)


def sweep_stats(rows: list[dict[str, Any]], arms: list[str]) -> dict[str, float]:
    """Per sweep arm: the Delta<=0 share, mean Delta, mean `Delta(arm) - Delta(plain)`, share down-weighted."""
    out: dict[str, float] = {}
    negative_tokens = max(1, sum(r["negative_tokens"] for r in rows))
    for arm in arms:
        values = [r[f"delta_{arm}"] for r in rows]
        out[f"{arm}_frac_nonpositive"] = sum(v <= 0 for v in values) / len(values)
        out[f"{arm}_mean"] = statistics.mean(values)
        out[f"{arm}_minus_plain_mean"] = statistics.mean(v - r["delta_plain"] for v, r in zip(values, rows))
        out[f"{arm}_frac_downweighted"] = sum(r[f"downweighted_{arm}"] for r in rows) / negative_tokens
    return out


def per_seed_stats(rows: list[dict[str, Any]], arms: list[str] = ()) -> dict[str, float]:
    """The reported statistics of one seed's groups (and of the sweep `arms`)."""
    out: dict[str, float] = {"groups": len(rows), **sweep_stats(rows, list(arms))}
    for arm in ("plain", "nthr", "positive_only"):
        values = [r[f"delta_{arm}"] for r in rows]
        out[f"{arm}_frac_nonpositive"] = sum(v <= 0 for v in values) / len(values)
        out[f"{arm}_mean"] = statistics.mean(values)
        out[f"{arm}_median"] = statistics.median(values)
    displacement = [r["delta_positive_only"] - r["delta_plain"] for r in rows]
    difference = [r["delta_nthr"] - r["delta_plain"] for r in rows]
    out["displacement_mean"] = statistics.mean(displacement)
    out["displacement_median"] = statistics.median(displacement)
    out["nthr_minus_plain_mean"] = statistics.mean(difference)
    out["nthr_minus_plain_frac_positive"] = sum(d > 0 for d in difference) / len(difference)
    out["recovered_share"] = out["nthr_minus_plain_mean"] / out["displacement_mean"]
    out["frac_downweighted"] = sum(r["downweighted"] for r in rows) / max(1, sum(r["negative_tokens"] for r in rows))
    scores = [r["gwhes"] for r in rows]
    plain = [r["delta_plain"] for r in rows]
    out["gwhes_pearson_delta"] = _pearson(scores, plain)
    out["gwhes_spearman_delta"] = _pearson(_ranks(scores), _ranks(plain))
    out["gwhes_pearson_displacement"] = _pearson(scores, displacement)
    out["gwhes_spearman_displacement"] = _pearson(_ranks(scores), _ranks(displacement))
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds (NaN half-width for one seed)."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.mean(values), T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def print_tables(per_seed: list[dict[str, float]], arms: list[str] = (), mismatches: int = 0) -> None:
    def row(label: str, key: str, digits: int = 4) -> None:
        mean, half = interval([s[key] for s in per_seed])
        cells = " ".join(f"{s[key]:>9.{digits}f}" for s in per_seed)
        print(f"{label:<34}{mean:>10.{digits}f} ± {half:<9.{digits}f}| {cells}")

    print(f"\nmixed groups per seed: {[int(s['groups']) for s in per_seed]}")
    print(f"{'statistic':<34}{'mean':>10} ± 95% CI  | per seed")
    for arm in ("plain", "nthr", "positive_only"):
        row(f"frac Delta<=0, {arm}", f"{arm}_frac_nonpositive", 3)
        row(f"mean Delta, {arm}", f"{arm}_mean")
        row(f"median Delta, {arm}", f"{arm}_median")
    row("displacement (pos-only - plain)", "displacement_mean")
    row("displacement, median", "displacement_median")
    row("NTHR - plain, mean", "nthr_minus_plain_mean")
    row("NTHR - plain, frac > 0", "nthr_minus_plain_frac_positive", 3)
    row("NTHR recovered share of displ.", "recovered_share", 3)
    row("frac negative tokens downweighted", "frac_downweighted", 3)
    row("GWHES ~ Delta plain, Pearson", "gwhes_pearson_delta", 3)
    row("GWHES ~ Delta plain, Spearman", "gwhes_spearman_delta", 3)
    row("GWHES ~ displacement, Pearson", "gwhes_pearson_displacement", 3)
    row("GWHES ~ displacement, Spearman", "gwhes_spearman_displacement", 3)
    if arms:
        print(f"sweep: tokens whose weight differs from the callback's at beta 1, eta auto: {mismatches}")
    for arm in arms:
        print(f"-- sweep arm {arm}")
        row(f"frac Delta<=0, {arm}", f"{arm}_frac_nonpositive", 3)
        row(f"mean Delta, {arm}", f"{arm}_mean")
        row(f"{arm} - plain, mean", f"{arm}_minus_plain_mean")
        row(f"frac downweighted, {arm}", f"{arm}_frac_downweighted", 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--checkpoints", default="0,4,8", help="GRPO steps of the plain run to measure from")
    parser.add_argument("--batches", type=int, default=2, help="generated batches per checkpoint")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--optim", default="adamw_torch", help="TRL/transformers optimizer name, e.g. sgd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep", nargs="*", default=[], help="extra NTHR arms, BETA:ETA (ETA in [0, 1] or auto)")
    parser.add_argument("--json", help="also write the per-group rows and per-seed statistics to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    settings = tuple(parse_setting(text) for text in args.sweep)
    arms = [arm_name(setting) for setting in settings]
    rows, per_seed = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(args.seeds):
            started = time.perf_counter()
            seed_rows = run_seed(seed, checkpoints, args.batches, args.lr, args.optim, workdir, settings)
            rows += seed_rows
            per_seed.append(per_seed_stats(seed_rows, arms))
            print(f"seed {seed}: {len(seed_rows)} mixed groups, {time.perf_counter() - started:.0f} s", flush=True)
    print(
        f"\n== one-step LLD on the worked-arithmetic task: {args.optim} lr {args.lr}, checkpoints {checkpoints}, "
        f"{args.batches} batches x {PROMPTS_PER_STEP} groups of {GROUP_SIZE}; NTHR beta 1, eta auto =="
    )
    print_tables(per_seed, arms, sum(r.get("sweep_mismatch", 0) for r in rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "per_seed": per_seed, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
