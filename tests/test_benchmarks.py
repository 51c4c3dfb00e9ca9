"""The GPU benchmark script runs end to end in its reduced CPU mode (`--device cpu --size tiny`), in seconds."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_cpu_mode_reports_every_level():
    bench_gpu = _load("bench_gpu")
    lines: list[str] = []
    results = bench_gpu.measure(
        bench_gpu.SIZES["tiny"], torch.device("cpu"), torch.float32, list(bench_gpu.LEVELS), log=lines.append
    )
    bench_gpu.report(results, log=lines.append)
    assert set(results["levels"]) == {"none", "sums", "tokens"}
    assert results["plain_step"] > 0
    for figures in results["levels"].values():
        assert figures["analysis_seconds"] > 0
        assert math.isfinite(figures["multiple"]) and figures["multiple"] > 0
        assert figures["steady"] == (49 + figures["multiple"]) / 50
    assert any(line.startswith("tokens") for line in lines)
