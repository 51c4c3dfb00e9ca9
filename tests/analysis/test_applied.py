"""The prediction along the update the optimizer applied to bf16 weights (`analysis.applied`): the JVP at `w_t`
along `w_{t+1} - w_t` equals forward-mode AD through a float64 copy of the model along the same update,
the model is left at `w_{t+1}` bit for bit, and `rounding` is the difference from the float32-update prediction."""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from trl_ntk.analysis import applied
from trl_ntk.analysis.results import Prediction
from trl_ntk.batches import TokenBatch


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        initializer_range=0.3,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _batch() -> TokenBatch:
    input_ids = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 8, 6, 11, 0, 0]])
    attention_mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    target_mask[0, 2:6] = True
    target_mask[1, 2:4] = True
    return TokenBatch(input_ids, attention_mask, target_mask)


def _logprobs64(model, values, batch: TokenBatch) -> torch.Tensor:
    logits = functional_call(model, values, (), batch.forward_kwargs()).logits[:, :-1].double()
    targets = batch.input_ids[:, 1:][batch.target_mask[:, 1:]]
    return torch.log_softmax(logits[batch.target_mask[:, 1:]], -1).gather(-1, targets[:, None])[:, 0]


def test_jvp_along_the_applied_update_matches_a_float64_difference_and_restores_the_weights():
    model, batch = _model(), _batch()
    before = applied.snapshot(model)
    assert applied.has_half_precision(model) and all(v.dtype == torch.bfloat16 for v in before.values())
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an SGD-like step, rounded to bf16: many entries do not move at all
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator).to(p.dtype))
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = applied.applied_update(model, before)
    assert any(bool((update[n] == 0).any()) for n in update)
    rows = applied.applied_update_jvps(model, {"probe": batch}, before)["probe"]
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters())  # w_{t+1}, bit for bit

    reference = copy.deepcopy(model).double()
    start = {n: before[n].double() for n in before}
    tangent = {n: update[n].double() for n in update}
    _, expected = torch.func.jvp(lambda values: _logprobs64(reference, values, batch), (start,), (tangent,))
    assert rows.shape == expected.shape
    torch.testing.assert_close(rows.double(), expected, rtol=1e-4, atol=1e-7)
    step = 1e-2  # and the first-order change of a float64 difference (RMSNorm computes in float32 inside)
    moved = _logprobs64(reference, {n: start[n] + step * tangent[n] for n in start}, batch)
    torch.testing.assert_close((moved - _logprobs64(reference, start, batch)) / step, expected, rtol=2e-2, atol=1e-4)


def test_with_rounding_keeps_the_split_and_adds_the_difference():
    cells = torch.tensor([[0.1, -0.2], [0.3, 0.05]])
    history = torch.tensor([0.01, 0.02])
    current = cells.sum(0)
    prediction = Prediction(current + history, current, history, cells)
    out = applied.with_rounding(prediction, torch.tensor([0.5, -0.1]))
    torch.testing.assert_close(out.predicted, torch.tensor([0.5, -0.1]))
    torch.testing.assert_close(out.cells.sum(0) + out.history + out.rounding, out.predicted)
    assert out.current is prediction.current
