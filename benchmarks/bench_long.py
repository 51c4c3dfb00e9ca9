"""Long sequences: one "sums" analysis step on the exact JVP path against the finite-difference path, per length.

    PYTHONPATH=. python benchmarks/bench_long.py [--lengths 256 1024 2048] [--threads 1]

A small Llama with random weights (hidden 64, intermediate 128, 2 layers, 4 heads / 2 KV heads, vocabulary 512,
tied embeddings, SDPA attention, float32) trained on a DPO-like batch as in `bench_gpu.py`: 1 pair (2 training
sequences of T tokens, the second half a response) and 2 probe responses of T tokens (half prompt, half response),
AdamW. For each length `T` and each path, one subprocess builds the same run (same seeds), takes a warm-up step
and two plain steps, then one analysis step at `attribution="sums"` with `DenseBackend(path=...)`:

- `auto`: the exact path (`torch.func` JVPs, SDPA switched to its MATH backend: `H T^2` scores per layer, twice
  for the tangents);
- `finite_difference`: the five-point stencil along each direction (four no-grad float32 forwards per direction,
  the model's own SDPA kernel).

Memory: the process's peak resident set size over the step (Linux `VmHWM`, reset through `/proc/self/clear_refs`
just before the step) minus the RSS at its start, with glibc's `mmap` threshold fixed at 64 KiB so that freed
tensors leave the RSS at once. Reported for the plain step and the analysis step (training included), and the
difference; next to it the pre-flight estimate of `trl_ntk.analysis.memory` for the same workload. Time: wall and
the step as a multiple of the median plain step. Accuracy: the finite-difference prediction (`probe.predicted`,
`[Mp]`), cell attributions (`probe.cells`, `[K, Mp]`) and per-response totals against the exact path's, as
`max |fd - exact| / max |exact|`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402

PATHS = ("auto", "finite_difference")
MIB = 2**20


def long_size(length: int) -> bench_gpu.Size:
    half = length // 2
    return bench_gpu.Size(64, 128, 2, 4, 2, 512, 1, half, length - half, 2, half, length - half, 2, family="llama")


def child(length: int, path: str, out: str, threads: int) -> dict:
    """One run (one length, one path) in this process; saves the explanation's tensors to `out`."""
    from trl_ntk.analysis import memory

    torch.set_num_threads(threads)
    size = long_size(length)
    results = bench_gpu.measure(
        size, torch.device("cpu"), torch.float32, ["sums"], log=lambda _: None, path=path, repeats=1,
        warm_analysis=False,
    )  # fmt: skip
    explanation = results["explanations"]["sums"]
    rows = explanation.probe.cells.shape[-1]
    torch.save({"predicted": explanation.probe.predicted, "cells": explanation.probe.cells,
                "history": explanation.probe.history}, out)  # fmt: skip
    model = bench_gpu.build_model(size, torch.device("meta"), torch.float32)
    work = memory.Workload(2 * size.pairs, length, size.probe_responses, length)
    estimate = memory.estimate(memory.model_shape(model), "sums", work, "func" if path == "auto" else path)
    figures = results["levels"]["sums"]
    return {
        "length": length,
        "path": explanation.path,
        "num_params": results["num_params"],
        "param_bytes": results["param_bytes"],
        "probe_targets": rows,
        "plain_step": results["plain_step"],
        "plain_peak": results["plain_peak"],
        "step_seconds": figures["multiple"] * results["plain_step"],
        "analysis_seconds": figures["analysis_seconds"],
        "multiple": figures["multiple"],
        "peak": figures["peak"],
        "estimate": estimate.total,
    }


def relative_max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).abs().max() / reference.double().abs().max())


def run_child(length: int, path: str, out: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", str(length), path, out, f"--threads={threads}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"child {length} {path} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        length, path, out = args.child
        print(json.dumps(child(int(length), path, out, args.threads)))
        return
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}); one subprocess per length and path")
    header = (
        f"{'T':>6} {'path':<18}{'plain s':>9}{'step s':>9}{'x plain':>9}{'plain MiB':>11}{'step MiB':>10}"
        f"{'extra MiB':>11}{'estimate MiB':>14}{'pred. err':>11}{'cells err':>11}{'hist. err':>11}{'sum err':>10}"
    )
    with tempfile.TemporaryDirectory() as folder:
        lines = []
        for length in args.lengths:
            runs, saved = {}, {}
            for path in PATHS:
                out = str(Path(folder) / f"{length}_{path}.pt")
                runs[path] = run_child(length, path, out, args.threads)
                saved[path] = torch.load(out)
                print(f"  [T = {length}, {path} done: {json.dumps(runs[path])}]", flush=True)
            exact = saved["auto"]
            for path in PATHS:
                r, s = runs[path], saved[path]
                errors = (
                    relative_max_error(s["predicted"], exact["predicted"]),
                    relative_max_error(s["cells"], exact["cells"]),
                    relative_max_error(s["history"], exact["history"]),
                    abs(float(s["predicted"].sum() - exact["predicted"].sum())) / float(exact["predicted"].abs().sum()),
                )
                lines.append(
                    f"{length:>6} {r['path']:<18}{r['plain_step']:>9.2f}{r['step_seconds']:>9.2f}"
                    f"{r['multiple']:>9.1f}{r['plain_peak'] / MIB:>11.0f}{r['peak'] / MIB:>10.0f}"
                    f"{(r['peak'] - r['plain_peak']) / MIB:>11.0f}{r['estimate'] / MIB:>14.0f}"
                    + "".join(f"{e:>11.1e}" if k < 3 else f"{e:>10.1e}" for k, e in enumerate(errors))
                )
        first = runs["auto"]
        print(
            f"\nLlama hidden 64, 2 layers, 4 heads / 2 KV, {first['num_params']:,} parameters (P = "
            f"{first['param_bytes'] / MIB:.2f} MiB); 2 training sequences and 2 probe responses of T tokens; "
            f"Mp = T; memory: peak RSS above the step's start"
        )
        print(header)
        print("\n".join(lines))


if __name__ == "__main__":
    main()
