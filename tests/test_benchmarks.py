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


def test_bench_lookahead_cost_routes_agree_on_a_small_untied_llama():
    """Every route of the look-ahead cost benchmark computes the same scores: the package against one backward per
    example, dattri grad-dot, and (on the `nn.Linear` parameters) kronfluence's identity pairwise scores."""
    import argparse

    import pytest

    bench = _load("bench_lookahead_cost")
    torch.manual_seed(0)
    args = argparse.Namespace(vocab=700, hidden=64, layers=2, answers_per_row=1)
    trainer = bench.build_trainer("llama", 3, args)
    probes = bench.ProbeSet.from_prompts(trainer.train_dataset, trainer.processing_class, num_prompts=2, seed=0)
    probes = probes.select(list(probes.kinds)[:2])
    encoded = probes.encode(trainer.processing_class)
    names, _ = bench.lookahead.probe_weights(encoded)
    ours, parts = bench.package_route(trainer, probes, 3, None)
    assert ours.shape == (3, 2) and parts["jvp"] > 0 and ours.abs().min() > 0
    naive, _ = bench.naive_route(trainer, probes, 3)
    assert bench.max_relative(ours, naive) < 1e-4
    if importlib.util.find_spec("dattri"):
        theirs, _ = bench.dattri_route(trainer, encoded, names, 3)
        assert bench.max_relative(ours, theirs) < 1e-4
    if importlib.util.find_spec("kronfluence") is None:
        pytest.skip("kronfluence is not installed")
    subset, _ = bench.package_route(trainer, probes, 3, bench.linear_names(trainer.model))
    assert bench.max_relative(subset, ours) > 1e-3  # the embedding's share is left out: a different quantity
    import tempfile

    theirs, _ = bench.kronfluence_route(trainer, encoded, names, 3, tempfile.mkdtemp())
    assert bench.max_relative(subset, theirs) < 1e-4
