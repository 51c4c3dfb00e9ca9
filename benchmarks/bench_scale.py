"""Analysis cost at the shapes users train: the pre-flight memory estimate, and measured steps on CPU.

    PYTHONPATH=. python benchmarks/bench_scale.py [--lengths 256 1024 2048 8192] [--rows 8]
    PYTHONPATH=. python benchmarks/bench_scale.py --measure --shapes SmolLM-135M --lengths 256 1024 \
        --modes full lora --levels none sums tokens [--layers N] [--threads 1]

Models shaped like SmolLM-135M (Llama: hidden 576, 30 layers, 9 heads / 3 KV, intermediate 1536, vocabulary 49,152)
and Qwen2.5-0.5B (Qwen2: hidden 896, 24 layers, 14 heads / 2 KV, intermediate 4864, vocabulary 151,936), both with
tied embeddings, built on the meta device (no weights are allocated), in bf16 (full fine-tuning: the analysis
buffers are float32, 2 P each) and float32. For each training length `T` (a micro-batch of `--rows` sequences,
probe batch of 16 responses of `T / 4` tokens) it prints the estimated peak extra memory of one analysis step in
units of P (trainable-parameter bytes) and GiB, for the exact JVP path (SDPA's MATH backend, `T^2` per head) and the
finite-difference path (forward-pass memory). These are the estimates the callback checks before training, not
measurements; `bench_memory.py` measures the real peak on a small model.

`--measure` runs, one subprocess per cell (shape, mode, length), the DPO-like step of `bench_gpu.py` on a
random-weight model of the shape (float32 on CPU; `--layers` keeps the width and cuts the depth, printed as such):
1 preference pair (2 training sequences of T tokens, half prompt, half response), 2 probe responses (32 prompt +
16 response tokens, Mp = 32), AdamW; full fine-tuning or LoRA (rank 16 on every projection, `--modes lora`). Per
level: the analysis step's wall time as a multiple of the median plain step, and the peak RSS of the analysis step
above that of a plain step (`bench_gpu.timed_step`) in units of P, next to the pre-flight estimate for the same
workload (its total above the training state, and `above_training`, its upper bound of the "extra" column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from trl_ntk.analysis import memory

SHAPES = {
    "SmolLM-135M": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)),
    "Qwen2.5-0.5B": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
}  # fmt: skip


def meta_model(config_name: str, fields: dict, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, config_name)(**fields, tie_word_embeddings=True, max_position_embeddings=32768)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


LORA_RANK = 16


def cell_size(name: str, length: int, layers: int | None):
    """The `bench_gpu.Size` of one measured cell: the shape (depth cut to `layers` if given) and the batches."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_gpu

    config_name, f = SHAPES[name]
    family = "llama" if config_name == "LlamaConfig" else "qwen2"
    depth = layers or f["num_hidden_layers"]
    half = length // 2
    return bench_gpu.Size(
        f["hidden_size"], f["intermediate_size"], depth, f["num_attention_heads"], f["num_key_value_heads"],
        f["vocab_size"], 1, half, length - half, 2, 32, 16, 2, family=family,
    )  # fmt: skip


def measure_cell(name: str, mode: str, length: int, levels: list[str], layers: int | None) -> dict:
    """One cell in this process (see the module docstring); returns its figures."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_gpu

    size = cell_size(name, length, layers)
    rank = LORA_RANK if mode == "lora" else 0
    results = bench_gpu.measure(
        size, torch.device("cpu"), torch.float32, levels, log=lambda line: print(line, file=sys.stderr),
        lora_rank=rank, repeats=1, warm_analysis=False,
    )  # fmt: skip
    shape = memory.model_shape(bench_gpu.build_model(size, torch.device("meta"), torch.float32, rank))
    work = memory.Workload(2 * size.pairs, length, size.probe_responses, 48)
    out = {key: results[key] for key in ("plain_step", "plain_peak", "param_bytes", "num_params")}
    out["levels"] = {
        level: {
            "multiple": f["multiple"],
            "seconds": f["multiple"] * results["plain_step"],
            "extra_p": (f["peak"] - results["plain_peak"]) / results["param_bytes"],
            "estimate_p": memory.estimate(shape, level, work).total / results["param_bytes"],
            "above_p": memory.estimate(shape, level, work).above_training / results["param_bytes"],
        }
        for level, f in results["levels"].items()
    }
    return out


def measure(args: argparse.Namespace) -> None:
    """Each cell in its own subprocess, in order of cost; prints a table row as each finishes."""
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), float32 on CPU, one subprocess per cell")
    print(
        f"{'shape':<14}{'layers':>7}{'mode':>6}{'T':>6}{'trainable':>12}{'plain s':>9}{'level':>8}{'step s':>9}"
        f"{'x plain':>9}{'extra x P':>11}{'estimate x P':>14}{'above x P':>11}"
    )
    for name in args.shapes:
        for length in args.lengths:
            for mode in args.modes:
                command = [
                    sys.executable, __file__, "--child", json.dumps([name, mode, length, args.levels, args.layers]),
                    f"--threads={args.threads}",
                ]  # fmt: skip
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
                if done.returncode != 0:
                    print(f"{name} {mode} T={length}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                depth = args.layers or SHAPES[name][1]["num_hidden_layers"]
                for level, f in r["levels"].items():
                    print(
                        f"{name:<14}{depth:>7}{mode:>6}{length:>6}{r['num_params'] / 1e6:>11.2f}M"
                        f"{r['plain_step']:>9.2f}{level:>8}{f['seconds']:>9.1f}{f['multiple']:>9.1f}"
                        f"{f['extra_p']:>11.2f}{f['estimate_p']:>14.2f}{f['above_p']:>11.2f}",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 2048, 8192])
    parser.add_argument("--rows", type=int, default=8, help="sequences per training micro-batch (default 8)")
    parser.add_argument("--measure", action="store_true", help="run the analysis step on CPU (see above)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--levels", nargs="+", default=["none", "sums", "tokens"], choices=list(memory.LEVELS))
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure_cell(*json.loads(args.child))))
        return
    if args.measure:
        measure(args)
        return
    gib = 2**30
    for name, (config_name, fields) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            shape = memory.model_shape(meta_model(config_name, fields, dtype))
            print(
                f"\n{name} ({shape.num_params / 1e6:.0f}M parameters, {dtype}), P = {shape.parameters / gib:.2f} GiB; "
                f"{args.rows} training sequences of T tokens, 16 probe responses of T/4"
            )
            print(f"{'T':>6}{'level':>8}{'exact x P':>11}{'exact GiB':>11}{'fin.diff x P':>14}{'fin.diff GiB':>14}")
            for length in args.lengths:
                work = memory.Workload(args.rows, length, 16, max(length // 4, 1))
                for level in ("sums", "tokens"):
                    exact = memory.estimate(shape, level, work, "func").total
                    fd = memory.estimate(shape, level, work, "finite_difference").total
                    print(
                        f"{length:>6}{level:>8}{exact / shape.parameters:>11.1f}{exact / gib:>11.1f}"
                        f"{fd / shape.parameters:>14.1f}{fd / gib:>14.1f}"
                    )


if __name__ == "__main__":
    main()
