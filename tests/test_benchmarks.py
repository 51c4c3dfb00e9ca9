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


def test_bench_gpu_tiny_lora_reconstructs_the_applied_gradient_and_measures_rss():
    """LoRA mode trains the adapters only, and the captured signal reconstructs the gradient the optimizer applies;
    on Linux the peak-RSS measure of the CPU mode catches a freed 64 MiB tensor."""
    bench_gpu = _load("bench_gpu")
    size = bench_gpu.SIZES["tiny"]
    results = bench_gpu.measure(size, torch.device("cpu"), torch.float32, ["sums"], log=lambda _: None, lora_rank=2)
    h, i, kv = size.hidden, size.intermediate, size.kv_heads * size.hidden // size.heads
    in_out = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    assert results["num_params"] == 2 * size.layers * sum(a + b for a, b in in_out)  # rank x (in + out) each
    check = results["explanations"]["sums"].gradient_check
    assert check.relative_error < 1e-4 and check.cosine > 1 - 1e-6

    if Path("/proc/self/clear_refs").exists():  # the CPU memory measure sees a tensor allocated and freed in between
        bench_gpu.low_malloc_threshold()
        baseline = bench_gpu.rss_peak_reset()
        block = torch.ones(16 * 2**20)  # 64 MiB, written
        del block
        assert bench_gpu.rss_peak() - baseline >= 60 * 2**20
        assert bench_gpu.rss_peak_reset() < baseline + 16 * 2**20  # and it left the RSS again


def test_long_comparison_finite_difference_path_agrees_with_the_exact_path():
    """The exact vs finite-difference comparison of bench_gpu.py / bench_long.py on one step: each explanation
    records the path that ran, and the finite-difference prediction and cells agree with the exact JVPs."""
    bench_gpu = _load("bench_gpu")
    lines: list[str] = []
    results = bench_gpu.long_comparison(bench_gpu.SIZES["tiny"], torch.device("cpu"), torch.float32, 64, log=print)
    bench_gpu.report_long(results, log=lines.append)
    assert [figures["path"] for figures in results["paths"].values()] == ["func", "finite_difference"]
    assert results["cells_error"] < 1e-2 and results["predicted_error"] < 1e-2
    assert any("finite differences vs exact" in line for line in lines)


def test_bench_peer_bergson_without_projection_matches_the_kernel():
    """Bergson's per-example gradients of one-target examples give the exact token-pair kernel over nn.Linear."""
    if importlib.util.find_spec("bergson") is None:
        import pytest

        pytest.skip("bergson not installed (optional benchmark dependency)")
    import tempfile

    from trl_ntk.ntk import kernels

    bench_peer = _load("bench_peer")
    torch.manual_seed(0)
    model = bench_peer.untied_toy_model()
    probe = bench_peer.token_batch(1, 24, 4, seed=1)
    train = bench_peer.token_batch(2, 48, 6, seed=2)
    with tempfile.TemporaryDirectory() as folder:
        scores = bench_peer.bergson_scores(model, probe, train, 0, 8, folder)
    reference = kernels.logprob_kernel(model, probe, train, params=bench_peer.linear_parameter_names(model))
    assert scores.shape == reference.shape == (4, 12)
    assert bench_peer.relative_error(scores, reference) < 1e-4
