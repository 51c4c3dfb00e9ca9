"""The GPU benchmark script runs end to end in its reduced CPU mode (`--device cpu --size tiny`), in seconds."""

from __future__ import annotations

import importlib.util
import math
import subprocess
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


def test_nthr_sweep_settings_and_per_arm_statistics():
    task = _load("grpo_lld_task")
    assert task.parse_setting("0.5:auto") == (0.5, "auto") and task.parse_setting("1:0") == (1.0, 0.0)
    assert [task.arm_name(s) for s in [(0.5, "auto"), (1.0, 0.0), (2.0, 0.5)]] == [
        "nthr_b0.5_eauto",
        "nthr_b1_e0",
        "nthr_b2_e0.5",
    ]
    rows = [
        {"delta_plain": -0.2, "delta_nthr_b1_e0": 0.1, "negative_tokens": 10, "downweighted_nthr_b1_e0": 2},
        {"delta_plain": 0.3, "delta_nthr_b1_e0": 0.0, "negative_tokens": 6, "downweighted_nthr_b1_e0": 2},
    ]
    stats = task.sweep_stats(rows, ["nthr_b1_e0"])
    assert stats["nthr_b1_e0_frac_nonpositive"] == 0.5  # the zero change counts as displaced
    assert stats["nthr_b1_e0_mean"] == 0.05
    assert abs(stats["nthr_b1_e0_minus_plain_mean"] - ((0.1 + 0.2) + (0.0 - 0.3)) / 2) < 1e-12
    assert stats["nthr_b1_e0_frac_downweighted"] == 4 / 16


def _demo_summary(chosen, rejected, argmax, greedy):
    """A demo summary's fields fix_arms reads: (start, end) of each figure."""
    kinds = {
        name: {"logp_start": start, "logp_end": end}
        for name, (start, end) in (("chosen", chosen), ("rejected", rejected), ("greedy", greedy))
    }
    return {"kinds": kinds, "argmax_logp_start": argmax[0], "argmax_logp_end": argmax[1]}


def test_fix_arms_tables_give_per_arm_and_paired_t_intervals():
    fix_arms = _load("fix_arms")
    summaries = {}
    plain_chosen = [(-5.0, -6.0), (-5.0, -5.5), (-6.0, -7.5)]
    fix_chosen = [(-5.0, -5.8), (-5.0, -5.0), (-6.0, -7.4)]
    for seed, (p, f) in enumerate(zip(plain_chosen, fix_chosen, strict=True)):
        plain = _demo_summary(p, (-18.0, -25.0), (-3.0, -2.5), (-4.0, -3.0))
        fix = _demo_summary(f, (-18.0, -24.0), (-3.0, -2.7), (-4.0, -3.5))
        summaries[seed] = {**plain, "fixes": {"dpo_nthr": fix}}
    table = fix_arms.tables("dpo", summaries)
    line = next(row for row in table.splitlines() if row.startswith("| chosen end-start"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # plain changes -1, -0.5, -1.5: mean -1, sd 0.5, half-width t(2) * 0.5 / sqrt(3)
    assert cells[1] == f"-1.000 ± {4.303 * 0.5 / math.sqrt(3):.3f}"
    # paired fix - plain: +0.2, +0.5, +0.1
    differences = [0.2, 0.5, 0.1]
    mean = sum(differences) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    assert cells[3] == f"{mean:+.3f} ± {4.303 * sd / math.sqrt(3):.3f}"
    # seed 0 margin change: plain (-6 + 25) - 13 = 6, fix (-5.8 + 24) - 13 = 5.2
    assert "seed 0 plain: chosen end-start -1.000" in table and "margin change +6.000" in table
    assert "seed 0 dpo_nthr: chosen end-start -0.800" in table and "margin change +5.200" in table


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
        # in a fresh process, as the benchmarks measure (here freed heap pages of earlier tests could serve it)
        script = (
            "import importlib.util, sys, torch\n"
            f"spec = importlib.util.spec_from_file_location('bench_gpu', {str(BENCHMARKS / 'bench_gpu.py')!r})\n"
            "bench = sys.modules['bench_gpu'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)\n"
            "bench.low_malloc_threshold(); baseline = bench.rss_peak_reset()\n"
            "block = torch.ones(16 * 2**20); del block  # 64 MiB, written\n"
            "print(bench.rss_peak() - baseline, bench.rss_peak_reset() - baseline)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        peak_rise, left = map(int, out.split()[-2:])
        assert peak_rise >= 60 * 2**20
        assert left < 16 * 2**20  # and it left the RSS again


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
