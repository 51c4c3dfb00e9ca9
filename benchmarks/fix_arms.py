"""The demo's arms over seeds, with 95% t-intervals: plain DPO against each DPO fix, plain GRPO against NTHR.

    PYTHONPATH=. python benchmarks/fix_arms.py dpo  --out runs/fixes --seeds 0 1 2 3 4 --run -- --steps 120 \
        --every-n-steps 20 --tokens-every-n-steps 0
    PYTHONPATH=. python benchmarks/fix_arms.py grpo --out runs/nthr  --seeds 0 1 2 3 4 --run
    PYTHONPATH=. python benchmarks/fix_arms.py dpo  --out runs/fixes --seeds 0 1 2 3 4    # tables of existing runs

Each seed is one `trl-ntk demo --fixes` (DPO) or `trl-ntk demo --trainer grpo --nthr` (GRPO) in `OUT/seed<S>`
(`--run` runs the seeds whose `summary.json` is missing, with the demo options after `--`); the tables are read from
the seeds' `summary.json`. Every figure is reported per arm as mean ± half-width of the 95% t-interval over seeds,
and for each fix as the paired difference `fix - plain` (same seed, same start) with its interval.

DPO (summed log-probs, nats, mean over the probe prompts, end - start of the DPO run): chosen, rejected, the
teacher-forced argmax response along chosen, the model's greedy response, and the preference margin
`chosen - rejected` (its change and its end), plus the chosen end (the SFT extension starts DPO elsewhere).

GRPO: the logged mean reward (= sampled accuracy, the reward being 0/1) at the first logging step, the one nearest
the middle and the last, and its mean; per analysed step and mixed group, the share with `Delta <= 0` (the correct
completions' summed log-likelihood did not rise over the step), the mean Delta and its negative-gradient part;
NTHR's cost: training wall time NTHR / plain, the NTHR time as a share of NTHR's training time, and the extra
forwards (one per generation batch when NTHR's hidden states come from an extra forward, none when they are
captured from generation or from the old-policy forward).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_lld_task import interval  # noqa: E402

Figure = Callable[[Mapping[str, Any]], float | None]


def _change(kind: str) -> Figure:
    def figure(summary: Mapping[str, Any]) -> float | None:
        entry = summary["kinds"].get(kind)
        return None if entry is None else entry["logp_end"] - entry["logp_start"]

    return figure


def _margin(at: str) -> Figure:
    def figure(summary: Mapping[str, Any]) -> float:
        chosen, rejected = summary["kinds"]["chosen"], summary["kinds"]["rejected"]
        end = chosen["logp_end"] - rejected["logp_end"]
        return end if at == "end" else end - (chosen["logp_start"] - rejected["logp_start"])

    return figure


DPO_FIGURES: dict[str, Figure] = {
    "chosen end-start": _change("chosen"),
    "rejected end-start": _change("rejected"),
    "argmax end-start": lambda s: s["argmax_logp_end"] - s["argmax_logp_start"],
    "greedy end-start": _change("greedy"),
    "margin change": _margin("change"),
    "margin end": _margin("end"),
    "chosen end": lambda s: s["kinds"]["chosen"]["logp_end"],
}


def _get(*path: str) -> Figure:
    def figure(summary: Mapping[str, Any]) -> float | None:
        value: Any = summary
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    return figure


GRPO_FIGURES: dict[str, Figure] = {
    "reward first": _get("reward", "first"),
    "reward middle": _get("reward", "middle"),
    "reward last": _get("reward", "last"),
    "reward mean": _get("reward", "mean"),
    "share Delta<=0": _get("lld", "frac_groups_nonpositive"),
    "mean Delta": _get("lld", "delta_observed_mean"),
    "Delta from negatives": _get("lld", "delta_from_negative_mean"),
    "train seconds": _get("train_seconds"),
}


def arms_of(trainer: str, summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """`{arm: summary}` of one seed's demo summary, plain first."""
    if trainer == "grpo":
        return {"plain": summary, "nthr": summary["nthr_run"]}
    return {"plain": summary, **summary["fixes"]}


def nthr_cost(summary: Mapping[str, Any]) -> dict[str, float]:
    """NTHR's cost in one GRPO seed: wall-time ratio, NTHR's share of its run's training time, extra forwards."""
    nthr = summary["nthr_run"]
    stats = nthr.get("nthr_stats") or {}
    return {
        "wall time NTHR / plain": nthr["train_seconds"] / summary["train_seconds"],
        "NTHR seconds / NTHR run's training seconds": stats.get("seconds", 0.0) / nthr["train_seconds"],
        "extra forwards per generation batch": (stats.get("paths") or {}).get("forward", 0) / max(1, stats["batches"]),
        "negative tokens down-weighted": stats.get("frac_downweighted_mean"),
    }


def _cell(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:+.3f} ± {half:.3f}"


def tables(trainer: str, summaries: dict[int, Mapping[str, Any]]) -> str:
    """The per-arm and paired tables over the seeds, as Markdown."""
    figures = GRPO_FIGURES if trainer == "grpo" else DPO_FIGURES
    per_seed = {seed: arms_of(trainer, s) for seed, s in summaries.items()}
    arms = list(next(iter(per_seed.values())))
    values = {
        arm: {name: [figure(per_seed[seed][arm]) for seed in per_seed] for name, figure in figures.items()}
        for arm in arms
    }
    lines = [f"seeds: {sorted(summaries)}; mean ± half-width of the 95% t-interval over seeds", ""]
    lines += ["| figure | " + " | ".join(arms) + " | " + " | ".join(f"{a} - plain" for a in arms[1:]) + " |"]
    lines += ["| --- " * (2 * len(arms)) + "|"]
    for name in figures:
        if any(v is None for arm in arms for v in values[arm][name]):
            continue
        cells = [_cell(values[arm][name]) for arm in arms]
        paired = [_cell([f - p for f, p in zip(values[arm][name], values["plain"][name])]) for arm in arms[1:]]
        lines.append(f"| {name} | " + " | ".join(cells + paired) + " |")
    if trainer == "grpo":
        lines += ["", "| NTHR cost | mean ± CI | per seed |", "| --- | --- | --- |"]
        costs = [nthr_cost(s) for s in summaries.values()]
        for name in costs[0]:
            seeds = [c[name] for c in costs]
            lines.append(f"| {name} | {_cell(seeds)} | {' '.join(f'{v:.3f}' for v in seeds)} |")
    lines += ["", "per seed:"]
    for seed, arms_summaries in per_seed.items():
        for arm, summary in arms_summaries.items():
            cells = ", ".join(
                f"{name} {value:+.3f}" for name, figure in figures.items() if (value := figure(summary)) is not None
            )
            lines.append(f"  seed {seed} {arm}: {cells}")
    return "\n".join(lines)


def run_seed(trainer: str, seed: int, out: Path, demo_args: list[str]) -> None:
    """One demo with every arm (`--fixes` / `--nthr`) into `out`."""
    from trl_ntk import cli

    flags = ["--fixes"] if trainer == "dpo" else ["--trainer", "grpo", "--nthr"]
    status = cli.main(["demo", *flags, "-q", "--threads", "1", "--seed", str(seed), "-o", str(out), *demo_args])
    if status:
        raise SystemExit(f"seed {seed}: the demo exited with {status}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trainer", choices=("dpo", "grpo"))
    parser.add_argument("--out", required=True, help="one subfolder seed<S> per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--run", action="store_true", help="run the seeds without a summary.json first")
    parser.add_argument("--json", help="also write the seeds' summaries to this file")
    args = parser.parse_args(argv)
    summaries = {}
    for seed in args.seeds:
        folder = Path(args.out) / f"seed{seed}"
        if args.run and not (folder / "summary.json").is_file():
            with io.StringIO() as printed:
                sys.stdout, saved = printed, sys.stdout
                try:
                    run_seed(args.trainer, seed, folder, demo_args)
                finally:
                    sys.stdout = saved
            print(f"seed {seed} done", flush=True)
        if (folder / "summary.json").is_file():
            summaries[seed] = json.loads((folder / "summary.json").read_text())
        else:
            print(f"seed {seed}: no {folder / 'summary.json'}, left out")
    if not summaries:
        return 1
    print(tables(args.trainer, summaries))
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
