"""The unembedding head's chunked closed form (`logprobs._head_outputs`): its value, gradients and JVPs are those
of brute-force autograd through `log_softmax(transform(h W^T + b) / T)[y]` (or the logit sum) in float64, for row
chunks smaller than the number of targets, under every JVP path and backward form; and a backward through a
large-vocabulary head holds a few row chunks, never an `[M, V]` buffer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from tests.profiling import tensor_peak
from trl_ntk._model import LogitTransform
from trl_ntk.ntk import jvp, logprobs

HIDDEN, VOCAB, TARGETS = 6, 11, 9


class _TinyLM(nn.Module):
    """`h = tanh(x A^T)`, then the head `h W^T + b`: the hidden state depends on parameters too."""

    def __init__(self, vocab: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.body = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, vocab, bias=bias)


def _setup(bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    model = _TinyLM(VOCAB, HIDDEN, bias).double()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    inputs = torch.randn(TARGETS, HIDDEN, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (TARGETS,), generator=generator)
    return model, inputs, targets


def _score(model, inputs, targets, output, temperature, transform) -> logprobs.ScoreFn:
    """`values -> [M]` through `_head_outputs` (the code under test)."""

    def forward(module: nn.Module) -> torch.Tensor:
        hidden = torch.tanh(module.body(inputs))
        return logprobs._head_outputs(module.head, hidden, targets, output, temperature, transform, True)

    return lambda values: logprobs.call_with(model, values, forward)


def _reference(model, inputs, targets, output, temperature, transform, values) -> torch.Tensor:
    """`[M]` the outputs by plain differentiable ops on the full `[M, V]` logits (the oracle)."""
    params = dict(values)
    hidden = torch.tanh(inputs @ params["body.weight"].T)
    pre = hidden @ params["head.weight"].T + params.get("head.bias", 0)
    logits = transform(pre)
    if output == "logit_sum":
        return logits.sum(-1) / math.sqrt(VOCAB)
    return torch.log_softmax(logits / temperature, -1).gather(-1, targets[:, None])[:, 0]


CASES = [
    ("logprob", 1.0, LogitTransform(), True),
    ("logprob", 0.7, LogitTransform(scale=0.5, softcap=2.0), False),
    ("logit_sum", 1.0, LogitTransform(scale=1.5, softcap=3.0), True),
]


@pytest.fixture(params=[1, 2, 4, TARGETS + 1], ids=lambda rows: f"rows{rows}")
def chunk_rows(request, monkeypatch):
    """Row chunks of `rows` targets: smaller than M (uneven last chunk), or all in one."""
    monkeypatch.setattr(logprobs, "head_chunk_rows", lambda vocab_size, hidden_size, itemsize: request.param)
    return request.param


@pytest.mark.parametrize("output, temperature, transform, bias", CASES)
def test_chunked_head_matches_bruteforce_value_gradients_and_jvps(chunk_rows, output, temperature, transform, bias):
    model, inputs, targets = _setup(bias)
    values = {name: param.detach() for name, param in model.named_parameters()}
    score = _score(model, inputs, targets, output, temperature, transform)

    def reference(params):
        return _reference(model, inputs, targets, output, temperature, transform, params)

    jacobian = torch.autograd.functional.jacobian(lambda *p: reference(dict(zip(values, p))), tuple(values.values()))
    jacobian = dict(zip(values, jacobian))  # name -> [M, *shape]
    with torch.no_grad():
        torch.testing.assert_close(score(values), reference(values), rtol=1e-12, atol=1e-12)

    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(3, TARGETS, generator=generator, dtype=torch.float64)
    expected_grads = {name: torch.einsum("rm,m...->r...", weights, jac) for name, jac in jacobian.items()}
    backward = jvp.Backward(score, values, model)
    for name, grad in backward(weights).items():  # batched backward (vmap over the backward)
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12)
    for name, grad in backward.single(weights[0]).items():
        torch.testing.assert_close(grad, expected_grads[name][0], rtol=1e-10, atol=1e-12)
    into = {name: torch.ones_like(value) for name, value in values.items()}
    jvp.Backward(score, values, model).accumulate(weights[1], into)
    for name, grad in into.items():
        torch.testing.assert_close(grad, 1 + expected_grads[name][1], rtol=1e-10, atol=1e-12)

    tangents = {name: torch.randn(4, *v.shape, generator=generator, dtype=torch.float64) for name, v in values.items()}
    expected_rows = sum(torch.einsum("m...,c...->cm", jacobian[name], tangents[name]) for name in values)
    for path in (jvp.JvpPath.FUNC, jvp.JvpPath.FORWARD_AD):
        rows = jvp.jvp_rows(score, values, tangents, path, jvp.DEFAULT_FD_STEP)
        torch.testing.assert_close(rows, expected_rows, rtol=1e-10, atol=1e-12)
    head_only = {name: t.clone() if name.startswith("head.") else torch.zeros_like(t) for name, t in tangents.items()}
    expected_head = sum(torch.einsum("m...,c...->cm", jacobian[name], head_only[name]) for name in values)
    rows = jvp.jvp_rows(score, values, head_only, jvp.JvpPath.FUNC, jvp.DEFAULT_FD_STEP)
    torch.testing.assert_close(rows, expected_head, rtol=1e-10, atol=1e-12)


def test_no_targets_give_empty_outputs_and_zero_gradients():
    model, inputs, targets = _setup(bias=True)
    values = {name: param.detach() for name, param in model.named_parameters()}
    score = _score(model, inputs[:0], targets[:0], "logprob", 1.0, LogitTransform())
    backward = jvp.Backward(score, values, model)
    assert backward.outputs.shape == (0,)
    for name, grad in backward.single(torch.zeros(0, dtype=torch.float64)).items():
        torch.testing.assert_close(grad, torch.zeros_like(values[name]), rtol=0, atol=0)
    tangents = {name: torch.ones(2, *value.shape, dtype=torch.float64) for name, value in values.items()}
    assert jvp.jvp_rows(score, values, tangents, jvp.JvpPath.FUNC, jvp.DEFAULT_FD_STEP).shape == (2, 0)


def _peak_tensor_bytes(fn) -> int:
    """Peak tensor bytes allocated while `fn()` runs (see `tests.profiling.tensor_peak`)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        fn()
    return tensor_peak(session)


def test_backward_through_a_large_vocabulary_head_holds_row_chunks_not_the_logits(monkeypatch):
    vocab, hidden, num_targets = 16384, 8, 256
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False)
    inputs = torch.randn(num_targets, hidden, generator=generator)
    targets = torch.randint(0, vocab, (num_targets,), generator=generator)
    transform = LogitTransform()

    def forward_and_backward() -> None:
        hidden_states = inputs.clone().requires_grad_(True)
        outputs = logprobs._head_outputs(head, hidden_states, targets, "logprob", 1.0, transform, True)
        torch.autograd.grad(outputs, [head.weight, hidden_states], torch.ones_like(outputs))

    logits_bytes = num_targets * vocab * 4  # 16 MiB
    rows = 16
    chunk_bytes = rows * vocab * 4  # 1 MiB
    monkeypatch.setattr(logprobs, "head_chunk_rows", lambda vocab_size, hidden_size, itemsize: rows)
    chunked = _peak_tensor_bytes(forward_and_backward)
    monkeypatch.setattr(logprobs, "head_chunk_rows", lambda vocab_size, hidden_size, itemsize: num_targets)
    whole = _peak_tensor_bytes(forward_and_backward)
    weight_bytes = head.weight.numel() * 4  # the gradient of W is returned: 0.5 MiB
    assert whole >= 2 * logits_bytes  # the measure sees the `[M, V]` temporaries of one chunk of all targets
    assert chunked <= 4 * chunk_bytes + 2 * weight_bytes


def test_head_chunk_rows_keep_a_chunk_within_both_caps():
    assert logprobs.head_chunk_rows(151936, 896, 4) == logprobs.HEAD_CHUNK_BYTES // (151936 * 4)
    assert logprobs.head_chunk_rows(151936, 64, 4) == 16  # H / 4: a fraction of the weight
    assert logprobs.head_chunk_rows(600, 512, 8) == logprobs.HEAD_CHUNK_MIN_BYTES // (
        600 * 8
    )  # a small head: the floor
    assert logprobs.head_chunk_rows(10**9, 8, 4) == 1
