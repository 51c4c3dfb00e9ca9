"""The forward-memory (finite-difference) analysis path at T = 2048 against the exact JVPs, and its selection."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_ntk.analysis import memory
from trl_ntk.analysis.dense import DenseBackend
from trl_ntk.batches import TokenBatch
from trl_ntk.ntk import kernels

LENGTH = 2048


def _long_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def _batch(rows: int, seed: int) -> TokenBatch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (rows, LENGTH), generator=generator)
    targets = torch.zeros(rows, LENGTH, dtype=torch.bool)
    targets[:, LENGTH // 2 :] = True  # a long response after a long prompt
    return TokenBatch(ids, torch.ones_like(ids), targets)


def test_finite_difference_path_matches_the_exact_jvps_at_2048_tokens():
    """Along an Adam-like preconditioned gradient direction (entries over orders of magnitude) and along a raw
    gradient, the five-point stencil agrees with forward-mode AD to 1e-3 of the largest row entry."""
    model = _long_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    probe, train = _batch(1, 1), _batch(1, 2)
    gradient = kernels.logprob_grad(model, train, torch.ones(train.num_targets), params=names)
    adam_like = {n: g / (g.abs() + 1e-3 * g.abs().max()) * 1e-4 for n, g in gradient.items()}
    directions = [adam_like, {n: 1e-6 * g for n, g in gradient.items()}]
    exact = DenseBackend(model).jvps({"probe": probe}, directions)["probe"]
    fd_backend = DenseBackend(model, path="finite_difference")
    approx = fd_backend.jvps({"probe": probe}, directions)["probe"]
    assert fd_backend.path == "finite_difference" and DenseBackend(model).path == "func"
    assert exact.shape == approx.shape == (2, probe.num_targets)
    for k in range(2):
        error = float((approx[k] - exact[k]).abs().max() / exact[k].abs().max())
        assert error < 1e-3, (k, error)
        # the sums the analysis reports (a probe response's total change) agree more tightly still
        assert abs(float(approx[k].sum() - exact[k].sum())) <= 1e-3 * float(exact[k].abs().sum())


def test_plan_picks_finite_differences_when_only_forward_memory_fits_at_2048_tokens():
    """With a free-memory figure between the two estimates, the plan keeps the level and switches the path, and
    says so; with plenty it keeps the exact path silently; with almost none it falls to tracking only."""
    shape = memory.model_shape(_long_model())
    work = memory.Workload(train_rows=8, train_length=LENGTH, probe_rows=8, probe_length=LENGTH)
    exact = memory.estimate(shape, "sums", work, "func").total
    forward = memory.estimate(shape, "sums", work, "finite_difference").total
    assert forward < exact / 1.5  # the T^2-per-head scores of forward-mode attention dominate at this length
    middle = int((forward + exact) / 2 / memory.SAFETY)
    chosen = memory.plan(shape, "sums", work, free=middle)
    assert (chosen.level, chosen.path) == ("sums", "finite_difference") and "finite-difference" in chosen.message
    roomy = memory.plan(shape, "sums", work, free=int(2 * exact / memory.SAFETY))
    assert (roomy.level, roomy.path, roomy.message) == ("sums", "auto", "")
    tight = memory.plan(shape, "sums", work, free=1)
    assert tight.level == "none" and "'sums'" in tight.message
