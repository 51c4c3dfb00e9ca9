"""The `trl-ntk demo` over several seeds: does the effect it shows reproduce?

    PYTHONPATH=. python benchmarks/demo_seeds.py [--trainer dpo] [--seeds 0 1 2] [--out runs/demo_seeds]

Runs the demo (its default recipe, or the overrides given) once per seed, then prints per seed the start -> end
(peak) of the chosen, rejected and greedy responses' log-probs and of the teacher-forced argmax, the predicted
positive- / negative-gradient split of the chosen response's change, the demo's checks (DPO: rejected falls more
than chosen, chosen ends below its start, the argmax peaks above its start, the greedy response ends above its
start, ...; GRPO: lazy likelihood displacement, and with `--nthr` NTHR against plain GRPO), and the wall and CPU
time of each run. Exits 1 when a check fails for some seed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from trl_ntk.demo.run import DemoConfig, format_table, run_demo

HEADLINE = (
    "rejected_falls_more_than_chosen",
    "chosen_end_below_start",
    "argmax_peak_above_start",
    "greedy_end_above_start",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=("dpo", "sft", "grpo"), default="dpo")
    parser.add_argument("--nthr", action="store_true", help="GRPO: also train with NTHR and compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds", help="one subfolder per seed")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--every-n-steps", type=int, default=None)
    parser.add_argument("--attribution", choices=("none", "sums", "tokens"), default="sums")
    parser.add_argument("--json", default=None, help="also write every seed's summary to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each seed's full table")
    return parser.parse_args(argv)


def _row(summary: dict, kind: str) -> str:
    entry = summary["kinds"].get(kind)
    if entry is None:
        return ""
    change = entry["logp_end"] - entry["logp_start"]
    return (
        f"  {kind:<16} {entry['logp_start']:8.2f} -> {entry['logp_end']:8.2f}  "
        f"({change:+7.2f}; peak {entry['logp_peak']:8.2f} at step {entry['peak_step']})"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    failed = []
    for seed in args.seeds:
        config = DemoConfig(
            trainer=args.trainer,
            out=str(Path(args.out) / f"seed{seed}"),
            seed=seed,
            epochs=args.epochs,
            learning_rate=args.lr,
            beta=args.beta,
            every_n_steps=args.every_n_steps,
            attribution=args.attribution,
            nthr=args.nthr,
            progress=False,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        summary = run_demo(config, stream=io.StringIO())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        results[seed] = {**summary, "wall_seconds": wall, "cpu_seconds": cpu}
        print(f"\nseed {seed}: {summary['steps']} steps, {wall:.0f} s wall, {cpu:.0f} s CPU ({summary['report']})")
        if args.verbose:
            print(format_table(summary))
        for kind in (
            "chosen",
            "rejected",
            "chosen_rephrase",
            "chosen_swapped",
            "irrelevant_test",
            "completion",
            "greedy",
        ):
            line = _row(summary, kind)
            if line:
                print(line)
        if "argmax_logp_start" in summary:
            print(
                f"  {'argmax':<16} {summary['argmax_logp_start']:8.2f} -> {summary['argmax_logp_end']:8.2f}  "
                f"(peak {summary['argmax_logp_peak']:8.2f} at step {summary['argmax_peak_step']})"
            )
        chosen = summary["kinds"].get("chosen", {})
        if "split_negative" in chosen:
            print(
                f"  chosen, predicted over {summary['analysed_steps']} analysed steps: positive-gradient part "
                f"{chosen['split_positive']:+.2f}, negative-gradient part {chosen['split_negative']:+.2f}"
            )
        for name, run in (("GRPO", summary), ("GRPO + NTHR", summary.get("nthr_run"))):
            lld = (run or {}).get("lld")
            if lld:
                reward = run.get("reward") or {}
                print(
                    f"  {name:<12} LLD: mean delta {lld['delta_observed_mean']:+.3f} over {lld['groups']} groups, "
                    f"{100 * lld['frac_groups_negative']:.0f}% negative; reward {reward.get('first', float('nan')):.2f}"
                    f" -> {reward.get('last', float('nan')):.2f} (mean {reward.get('mean', float('nan')):.2f})"
                )
        for name, ok in summary["checks"].items():
            marker = "ok  " if ok else "FAIL"
            print(f"  {marker} {name}{' (headline)' if name in HEADLINE else ''}")
            if not ok:
                failed.append((seed, name))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{len(args.seeds)} seeds; failed checks: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
