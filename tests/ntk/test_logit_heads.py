"""Heads that transform their logits (scale, divide, soft-cap, multiply): the kernels' per-target log-prob is the
probe scoring's and the model's own, and a plain-SGD step is predicted, on tiny random float64 models of every
installed architecture whose config sets one of those fields."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from trl_ntk._model import LogitTransform, decoder_and_head
from trl_ntk.analysis import dynamics
from trl_ntk.batches import CapturedMicroBatch, TokenBatch, TokenLabels, target_rows
from trl_ntk.ntk import logprobs
from trl_ntk.probes.scoring import score_responses

VOCAB = 40
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    initializer_range=0.2,
)
HEADS = {
    # model type: (config fields, expected (scale, softcap) of the logit transform)
    "cohere": ({"logit_scale": 0.5}, (0.5, None)),
    "granite": ({"logits_scaling": 4.0}, (0.25, None)),
    "gemma2": ({"final_logit_softcapping": 3.0, "head_dim": 8}, (1.0, 3.0)),
    "falcon_h1": (
        {"lm_head_multiplier": 0.3, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,
         "mamba_chunk_size": 4, "head_dim": 8},
        (0.3, None),
    ),
    "hyperclovax": ({"logits_scaling": 2.0}, (2.0, None)),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(HEADS))
def head_model(request):
    fields, expected = HEADS[request.param]
    config = AutoConfig.for_model(request.param, **{**COMMON, **fields})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    return model.double().eval(), expected


def _batch(lengths: list[tuple[int, int]], seed: int) -> TokenBatch:
    """Right-padded rows of (context, response) lengths; targets: the response tokens."""
    generator = torch.Generator().manual_seed(seed)
    length = max(c + r for c, r in lengths)
    input_ids = torch.zeros(len(lengths), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (context, response) in enumerate(lengths):
        input_ids[row, : context + response] = torch.randint(0, VOCAB, (context + response,), generator=generator)
        attention_mask[row, : context + response] = 1
        target_mask[row, context : context + response] = True
    return TokenBatch(input_ids, attention_mask, target_mask)


def _own_logprobs(model, batch: TokenBatch) -> torch.Tensor:
    """`[M]` log-probs from the model's own forward and full logits (with grad when enabled)."""
    logits = model(**batch.forward_kwargs()).logits[:, :-1][batch.target_mask[:, 1:]]
    return torch.log_softmax(logits, -1).gather(-1, batch.targets[:, None])[:, 0]


def test_the_transform_is_read_from_the_config_and_matters(head_model):
    model, (scale, softcap) = head_model
    transform = LogitTransform.of(model)
    assert transform.scale == pytest.approx(scale) and transform.softcap == softcap and transform.fields
    batch = _batch([(3, 4), (2, 6)], seed=0)
    with torch.no_grad():
        _, head = decoder_and_head(model)
        untransformed = torch.log_softmax(head(logprobs.final_hidden(model, batch)), -1)
        untransformed = untransformed.gather(-1, batch.targets[:, None])[:, 0]
        assert float((untransformed - _own_logprobs(model, batch)).abs().max()) > 1e-3  # the check below can fail


def test_kernel_logprob_equals_scoring_and_the_models_own_logits(head_model):
    model, _ = head_model
    batch = _batch([(3, 4), (2, 6), (5, 2)], seed=1)
    kernel = logprobs.target_logprobs(model, batch)
    with torch.no_grad():
        own = _own_logprobs(model, batch)
    scored = score_responses(model, batch, batch_size=2).flat_token_logps
    torch.testing.assert_close(kernel, own, atol=1e-10, rtol=0)
    torch.testing.assert_close(scored.double(), kernel, atol=1e-6, rtol=0)


def test_sgd_prediction_matches_the_observed_change(head_model):
    model, _ = head_model
    probe, train = _batch([(3, 4), (2, 5)], seed=2), _batch([(2, 6), (4, 3), (3, 3)], seed=3)
    coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model.zero_grad()
    (_own_logprobs(model, train) * coeffs).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    rows = target_rows(train)
    labels = [TokenLabels(group=torch.zeros_like(rows), example=rows, sequence_group=rows)]
    before = logprobs.target_logprobs(model, probe)
    explanation = dynamics.explain_update(
        model, probe, [CapturedMicroBatch(train, grad_coeffs=coeffs)], labels, ("all",), optimizer
    )
    optimizer.step()
    observed = logprobs.target_logprobs(model, probe) - before
    model.zero_grad()
    assert explanation.gradient_check.cosine > 1 - 1e-9
    error = float((explanation.probe.predicted.double() - observed).norm() / observed.norm())
    assert error < 0.05, error
