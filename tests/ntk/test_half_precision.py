"""A bfloat16 model is scored and differentiated in float32 on upcast copies of its weights: the same numbers as a
float32 copy of the model (and not those of a bfloat16 forward)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_ntk.batches import TokenBatch
from trl_ntk.ntk import kernels, logprobs
from trl_ntk.probes.scoring import score_responses


@pytest.fixture(scope="module")
def models():
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        half = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return half, copy.deepcopy(half).float()


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([(3, 5), (2, 6)], [(4, 3), (2, 4), (3, 2)]):
        length = max(c + r for c, r in lengths)
        input_ids = torch.zeros(len(lengths), length, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, (context, response) in enumerate(lengths):
            input_ids[row, : context + response] = torch.randint(0, 48, (context + response,), generator=generator)
            attention_mask[row, : context + response] = 1
            target_mask[row, context : context + response] = True
        out.append(TokenBatch(input_ids, attention_mask, target_mask))
    return out


@pytest.mark.parametrize("strategy", ["backbone", "logits"])
def test_scores_of_a_bf16_model_are_those_of_its_float32_copy(models, batches, strategy):
    half, full = models
    scores = score_responses(half, batches[0], strategy=strategy).flat_token_logps
    torch.testing.assert_close(scores, score_responses(full, batches[0], strategy=strategy).flat_token_logps)
    with torch.no_grad():
        logits = half(**batches[0].forward_kwargs()).logits[:, :-1][batches[0].target_mask[:, 1:]].float()
    bf16_forward = torch.log_softmax(logits, -1).gather(-1, batches[0].targets[:, None])[:, 0]
    assert float((bf16_forward - scores).abs().max()) > 1e-3  # a bf16 forward would not pass the check above
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # the model itself is left in bf16


def test_kernel_and_jvp_of_a_bf16_model_are_those_of_its_float32_copy(models, batches):
    half, full = models
    probe, train = batches
    torch.testing.assert_close(logprobs.target_logprobs(half, probe), logprobs.target_logprobs(full, probe))
    kernel = kernels.logprob_kernel(half, probe, train)
    assert kernel.dtype == torch.float32
    torch.testing.assert_close(kernel, kernels.logprob_kernel(full, probe, train), rtol=1e-5, atol=1e-6)
    direction = {name: torch.randn_like(p, dtype=torch.float32) for name, p in half.named_parameters()}
    torch.testing.assert_close(
        kernels.logprob_jvp(half, probe, direction), kernels.logprob_jvp(full, probe, direction), rtol=1e-5, atol=1e-6
    )
