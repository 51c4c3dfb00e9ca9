"""Mixture-of-experts models with transformers' default experts kernels (grouped matmul, which has no forward-mode
AD rule): the JVP path runs their eager experts loop for its own forwards and agrees with autograd."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from trl_ntk.batches import TokenBatch
from trl_ntk.ntk import kernels

MOE = {
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_jvp_of_a_moe_model_matches_autograd_and_leaves_its_experts_kernel(model_type):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **MOE[model_type],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        generator = torch.Generator().manual_seed(1)
        input_ids = torch.randint(0, 40, (2, 8), generator=generator)
        direction = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
        weights = torch.randn(8, generator=generator)
    implementation = model.config._experts_implementation
    assert implementation not in (None, "eager")  # the default kernels, which forward-mode AD cannot run
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    target_mask[:, 4:] = True
    batch = TokenBatch(input_ids, torch.ones_like(input_ids), target_mask)
    jvp = kernels.logprob_jvp(model, batch, direction, path="func")
    gradient = kernels.logprob_grad(model, batch, weights)
    expected = float(sum((gradient[name] * direction[name]).sum() for name in direction))
    assert float(jvp @ weights) == pytest.approx(expected, rel=1e-4)
    assert model.config._experts_implementation == implementation
