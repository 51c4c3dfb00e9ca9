"""`dynamics.explain_update` without a trainer, against brute force on a tiny float64 GPT-2: per-target gradients
by `torch.autograd.grad` through the model's own forward, the optimizer split written out by hand and checked
against the optimizer's real `.step()`, and every predicted quantity as explicit dot products."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trl_ntk.analysis import dynamics
from trl_ntk.analysis.results import SIGN_NAMES
from trl_ntk.batches import CapturedMicroBatch, TokenBatch, TokenLabels, target_rows

VOCAB = 32
GROUPS = ("a", "b")
RELATIVE = 1e-9  # float64 throughout: the terms agree to about 1e-14


@pytest.fixture
def model():
    """GPT-2: layer norms and learned positions compute in the model's dtype (Llama's RMSNorm and rotary tables run
    in float32 even in a float64 model), so float64 here is float64 throughout."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, initializer_range=0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).double().eval()


def _batch(lengths: list[tuple[int, int]], generator: torch.Generator) -> TokenBatch:
    """Right-padded rows of (context, response) lengths; targets: the response tokens."""
    length = max(c + r for c, r in lengths)
    input_ids = torch.zeros(len(lengths), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (context, response) in enumerate(lengths):
        input_ids[row, : context + response] = torch.randint(0, VOCAB, (context + response,), generator=generator)
        attention_mask[row, : context + response] = 1
        target_mask[row, context : context + response] = True
    return TokenBatch(input_ids, attention_mask, target_mask)


def _captured_step(generator: torch.Generator, *, groups: bool) -> tuple[list[CapturedMicroBatch], list[TokenLabels]]:
    """Two micro-batches of 2 and 3 sequences with random float64 coefficients; with `groups`, the first target of
    each has no gradient (it belongs to no cell) and the targets fall in random groups, otherwise all in group 0."""
    micro_batches, labels = [], []
    for lengths in ([(2, 4), (3, 3)], [(4, 3), (2, 2), (3, 4)]):
        batch = _batch(lengths, generator)
        rows = target_rows(batch)
        coeffs = torch.randn(batch.num_targets, generator=generator, dtype=torch.float64)
        if groups:
            coeffs[0] = 0.0
            group = torch.randint(0, len(GROUPS), (batch.num_targets,), generator=generator)
        else:
            group = torch.zeros_like(rows)
        micro_batches.append(CapturedMicroBatch(batch, grad_coeffs=coeffs))
        labels.append(TokenLabels(group=group, example=rows + 10 * len(labels), sequence_group=rows))
    return micro_batches, labels


def _per_target_gradients(model, batch: TokenBatch) -> torch.Tensor:
    """`[M, P]` flattened `grad_w lp_m` of every target, one `torch.autograd.grad` each, from the full logits."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(**batch.forward_kwargs()).logits[:, :-1][batch.target_mask[:, 1:]]
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch.targets[:, None])[:, 0]
    rows = []
    for m in range(logprobs.shape[0]):
        grads = torch.autograd.grad(logprobs[m], params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def _set_flat(model, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _hand_split(kind: str, optimizer: torch.optim.Optimizer, model, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`(P, history)` flattened, with `dw = -P * g + history`, from torch's update rules written out."""
    group = optimizer.param_groups[0]
    lr, decay = group["lr"], group["weight_decay"]
    params = list(model.parameters())
    weights = _flat(params)
    if kind.startswith("sgd"):
        momentum = group["momentum"]
        if not momentum:
            return torch.full_like(weights, lr), -lr * decay * weights
        buffer = _flat(optimizer.state[p]["momentum_buffer"] for p in params)  # buf_t = mom buf + g + decay w
        return torch.full_like(weights, lr), -lr * (momentum * buffer + decay * weights)
    beta1, beta2 = group["betas"]
    step = float(optimizer.state[params[0]]["step"]) + 1
    first = _flat(optimizer.state[p]["exp_avg"] for p in params)
    second = beta2 * _flat(optimizer.state[p]["exp_avg_sq"] for p in params) + (1 - beta2) * grad.square()
    denom = (second / (1 - beta2**step)).sqrt() + group["eps"]
    preconditioner = lr * (1 - beta1) / (1 - beta1**step) / denom
    return preconditioner, -lr * decay * weights - lr * beta1 * first / (1 - beta1**step) / denom


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-300))
    assert error < RELATIVE, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_every_term_of_the_analysis_equals_brute_force(model, kind):
    generator = torch.Generator().manual_seed(1)
    probe = _batch([(3, 4), (2, 5), (4, 2)], generator)
    micro_batches, labels = _captured_step(generator, groups=True)

    train_grads = torch.cat([_per_target_gradients(model, mb.batch) for mb in micro_batches])  # [L, P]
    probe_grads = _per_target_gradients(model, probe)  # [Mp, P]
    coeffs = torch.cat([mb.grad_coeffs for mb in micro_batches])
    group = torch.cat([lab.group for lab in labels])
    raw = coeffs @ train_grads
    clip = 0.5 if kind == "sgd" else 1.0  # the applied gradient as clipping would scale it

    optimizer = OPTIMIZERS[kind](model.parameters())
    if kind != "sgd":  # a first step, so that momentum / Adam moments carry history into the analysed one
        _set_flat(model, torch.randn(raw.shape, generator=generator, dtype=torch.float64) * raw.abs().mean())
        optimizer.step()
        probe_grads, train_grads = (
            _per_target_gradients(model, probe),
            torch.cat([_per_target_gradients(model, mb.batch) for mb in micro_batches]),
        )
        raw = coeffs @ train_grads
    applied = clip * raw
    _set_flat(model, applied)
    preconditioner, history = _hand_split(kind, optimizer, model, applied)

    explanation = dynamics.explain_update(model, probe, micro_batches, labels, GROUPS, optimizer)
    before = _flat(model.parameters())
    optimizer.step()
    update = _flat(model.parameters()) - before
    _close(-preconditioner * applied + history, update, "hand split vs the optimizer's step")

    assert explanation.gradient_check.clip_scale == pytest.approx(clip, rel=1e-9)
    assert explanation.gradient_check.cosine == pytest.approx(1.0, abs=1e-12)
    expected_cells = {}
    for sign_index, sign_mask in enumerate((coeffs < 0, coeffs > 0)):
        for g, name in enumerate(GROUPS):
            in_cell = sign_mask & (group == g)
            if in_cell.any():
                direction = preconditioner * ((coeffs * in_cell) @ train_grads)
                expected_cells[(SIGN_NAMES[sign_index], name)] = -clip * probe_grads @ direction
    assert set(explanation.cell_names) == set(expected_cells) and len(explanation.cell_names) == len(expected_cells)
    for k, cell in enumerate(explanation.cell_names):
        _close(explanation.probe.cells[k], expected_cells[cell], f"cell {cell}")
    _close(explanation.probe.current, sum(expected_cells.values()), "current")
    _close(explanation.probe.history, probe_grads @ history, "history")
    _close(explanation.probe.predicted, probe_grads @ update, "predicted")
    _close(explanation.sgd, -optimizer.param_groups[0]["lr"] * probe_grads @ applied, "sgd")
    assert explanation.probe.residual is None


def test_running_sum_takes_a_gradient_over_only_where_it_owns_its_storage():
    """The first micro-batch's gradient becomes the running sum that later backwards add into in place: a tensor
    autograd hands out is taken as it is only when it has the parameter's compute dtype and layout and shares its
    storage with nothing else; a second tensor on the same storage, a view into a larger one, an expanded tensor
    or another dtype are copied, with the same values."""
    from trl_ntk.analysis.dense import _owned

    param, owned = torch.zeros(3, 4), set()
    fresh = torch.randn(3, 4)
    assert _owned(fresh, param, owned) is fresh
    cases = {
        "the same storage again": fresh,
        "a view into a larger storage": torch.randn(6, 4)[:3],
        "an expanded tensor": torch.randn(4).expand(3, 4),
        "another layout": torch.randn(4, 3).T,
        "another dtype": torch.randn(3, 4, dtype=torch.bfloat16),
    }
    storages = {fresh.untyped_storage().data_ptr()}
    for case, gradient in cases.items():
        taken = _owned(gradient, param, owned)
        assert taken.dtype == torch.float32 and taken.stride() == param.stride(), case
        assert taken.untyped_storage().data_ptr() not in storages | {gradient.untyped_storage().data_ptr()}, case
        assert torch.equal(taken, gradient.float()), case
        storages.add(taken.untyped_storage().data_ptr())
    half = torch.zeros(2, dtype=torch.bfloat16)
    upcast = torch.randn(2)  # a half-precision parameter's gradient is float32 (taken on its float32 copy)
    assert _owned(upcast, half, set()) is upcast


@pytest.mark.parametrize("selected", [None, (False, True, False), (True, False, True), (False, False, False)])
def test_token_level_matrix_and_response_totals_equal_brute_force(model, selected):
    """The matrix of the selected responses and every response's per-training-token totals (the selected ones read
    off the matrix, the others by their own probe backward and batch JVP), against explicit per-target gradients;
    responses of one token each and of several, micro-batches of several sequences."""
    generator = torch.Generator().manual_seed(2)
    probe = _batch([(3, 4), (2, 1), (4, 3)], generator)
    micro_batches, labels = _captured_step(generator, groups=False)
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    train_grads = torch.cat([_per_target_gradients(model, mb.batch) for mb in micro_batches])
    probe_grads = _per_target_gradients(model, probe)
    coeffs = torch.cat([mb.grad_coeffs for mb in micro_batches])
    applied = coeffs @ train_grads
    _set_flat(model, applied)
    preconditioner, _ = _hand_split("sgd", optimizer, model, applied)
    matrix_rows = None if selected is None else torch.tensor(selected)

    explanation = dynamics.explain_update(
        model,
        probe,
        micro_batches,
        labels,
        GROUPS,
        optimizer,
        attribution="tokens",
        matrix_rows=matrix_rows,
        chunk_size=2,
    )
    expected = -(probe_grads * preconditioner) @ train_grads.T * coeffs[None, :]  # [Mp, L], clip scale 1
    probe_rows = target_rows(probe)
    tokens = explanation.tokens
    _close(tokens.response_totals, torch.stack([expected[probe_rows == r].sum(0) for r in range(3)]), "totals")
    in_matrix = torch.ones(3, dtype=torch.bool) if matrix_rows is None else matrix_rows
    if not bool(in_matrix.any()):
        assert tokens.matrix is None
    else:
        _close(tokens.matrix, expected[in_matrix[probe_rows]], "matrix")
