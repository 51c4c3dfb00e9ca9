"""Tests for trl_ntk.ntk.kernels against brute force: per-target `torch.autograd.grad` through the model's own forward
(full logits) and explicit dot products, on tiny random Qwen2 / Llama / Gemma2 models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from trl_ntk.batches import TokenBatch
from trl_ntk.ntk import attributions, jvp, kernels, logprobs, optim

EXACT = 1e-4  # float32, exact routes
FINITE_DIFFERENCE = 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Tiny models, batches and the brute-force oracle
# ---------------------------------------------------------------------------------------------------------------


def qwen2(tied: bool = True, attn: str = "eager", seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=72,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).eval()


def llama(tied: bool = False, attn: str = "sdpa", seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=90,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


ARCHITECTURES = {"qwen2-tied-eager": lambda: qwen2(tied=True), "llama-untied-sdpa": lambda: llama(tied=False)}


def token_batch(model: torch.nn.Module, rows: int, length: int, seed: int, temperature: float = 1.0) -> TokenBatch:
    """Row 0 left-padded (3 pads), the last row right-padded (2 pads); every real token is a target except the first
    of each row, and row 0's first two real tokens form an unscored prompt."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[0, :3] = 0
    attention_mask[-1, -2:] = 0
    target_mask = attention_mask.bool().clone()
    target_mask[:, 0] = False
    target_mask[0, :5] = False
    return TokenBatch(input_ids, attention_mask, target_mask, temperature=temperature)


def probe_and_train(model: torch.nn.Module) -> tuple[TokenBatch, TokenBatch]:
    return token_batch(model, 2, 8, seed=11, temperature=1.3), token_batch(model, 3, 10, seed=12, temperature=0.7)


def model_outputs(model: torch.nn.Module, batch: TokenBatch, output: str = "logprob") -> torch.Tensor:
    """`[M]` per-target outputs from the model's own forward (full `[B, T, V]` logits)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    if output == "logit_sum":
        values = logits.sum(-1) / math.sqrt(logits.shape[-1])
    else:
        logprobs = torch.log_softmax(logits / batch.temperature, dim=-1)
        values = logprobs.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return values[batch.target_mask[:, 1:]]


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def per_target_gradients(model, batch, params=None, output="logprob") -> torch.Tensor:
    """`[M, P]`: one `torch.autograd.grad` per target, flattened over `params` (default: trainable)."""
    params = trainable(model) if params is None else params
    values = model_outputs(model, batch, output)
    rows = []
    for m in range(values.shape[0]):
        grads = torch.autograd.grad(values[m], list(params.values()), retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for g, p in zip(grads, params.values(), strict=True)
                ]
            )
        )
    return torch.stack(rows)


def flat(tensors: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in names])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def bruteforce_kernel(model, probe, train, params=None, output="logprob", preconditioner=None) -> torch.Tensor:
    params = trainable(model) if params is None else params
    probe_grads = per_target_gradients(model, probe, params, output)
    train_grads = per_target_gradients(model, train, params, output)
    if preconditioner is not None:
        scale = torch.cat([preconditioner[name].expand_as(p).reshape(-1) for name, p in params.items()])
        train_grads = train_grads * scale
    return probe_grads @ train_grads.T


def random_preconditioner(params: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=generator) + 0.5 for name, p in params.items()}


def random_direction(params: dict[str, torch.Tensor], seed: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=generator) * 0.1 for name, p in params.items()}


# ---------------------------------------------------------------------------------------------------------------
# Per-target outputs and kernels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_target_logprobs_match_model_forward_with_padding_on_both_sides(architecture):
    model = ARCHITECTURES[architecture]()
    probe, train = probe_and_train(model)
    for batch in (probe, train):
        expected = model_outputs(model, batch)
        assert torch.allclose(logprobs.target_logprobs(model, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("swap", [False, True], ids=["probe-rows", "train-rows"])
def test_logprob_kernel_matches_bruteforce_with_temperature_and_chunking(architecture, swap):
    model = ARCHITECTURES[architecture]()
    probe, train = probe_and_train(model)
    if swap:  # Mp > Mt: the kernel is assembled column-wise
        probe, train = train, probe
    expected = bruteforce_kernel(model, probe, train)
    kernel = kernels.logprob_kernel(model, probe, train, chunk_size=4)
    assert kernel.shape == (probe.num_targets, train.num_targets)
    assert relative_error(kernel, expected) < EXACT


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_pntk_matches_bruteforce_on_logit_sums(architecture):
    model = ARCHITECTURES[architecture]()
    probe, train = probe_and_train(model)
    expected = bruteforce_kernel(model, probe, train, output="logit_sum")
    assert relative_error(kernels.pntk(model, probe, train, chunk_size=5), expected) < EXACT


@pytest.mark.parametrize("swap", [False, True], ids=["probe-rows", "train-rows"])
def test_kernel_with_fewer_tangents_per_jvp_matches_bruteforce(swap):
    """`jvp_chunk_size` splits each chunk of gradients into several batched JVPs (3 does not divide 5): the same
    kernel, preconditioned, on either side."""
    model = llama()
    probe, train = probe_and_train(model)
    if swap:
        probe, train = train, probe
    preconditioner = random_preconditioner(trainable(model))
    expected = bruteforce_kernel(model, probe, train, preconditioner=preconditioner)
    for jvp_chunk_size in (1, 3):
        kernel = kernels.logprob_kernel(
            model, probe, train, preconditioner=preconditioner, chunk_size=5, jvp_chunk_size=jvp_chunk_size
        )
        assert relative_error(kernel, expected) < EXACT
    with pytest.raises(ValueError, match="jvp_chunk_size"):
        kernels.logprob_kernel(model, probe, train, jvp_chunk_size=0)


def test_gradients_implementation_matches_bruteforce():
    model = llama()
    probe, train = probe_and_train(model)
    expected = bruteforce_kernel(model, probe, train)
    kernel = kernels.logprob_kernel(model, probe, train, implementation="gradients", chunk_size=4)
    assert relative_error(kernel, expected) < EXACT


@pytest.mark.parametrize(
    ("path", "tolerance"),
    [("func", EXACT), ("forward_ad", EXACT), ("finite_difference", FINITE_DIFFERENCE)],
)
def test_every_jvp_path_gives_the_bruteforce_kernel(path, tolerance):
    model = qwen2()
    assert jvp.select_jvp_path(model) is jvp.JvpPath.FUNC  # eager attention, no checkpointing
    probe, train = probe_and_train(model)
    expected = bruteforce_kernel(model, probe, train)
    assert relative_error(kernels.logprob_kernel(model, probe, train, path=path), expected) < tolerance


def test_preconditioned_kernel_matches_bruteforce():
    model = llama()
    probe, train = probe_and_train(model)
    preconditioner = random_preconditioner(trainable(model))
    expected = bruteforce_kernel(model, probe, train, preconditioner=preconditioner)
    kernel = kernels.logprob_kernel(model, probe, train, preconditioner=preconditioner, chunk_size=4)
    assert relative_error(kernel, expected) < EXACT
    assert relative_error(kernel, bruteforce_kernel(model, probe, train)) > 1e-2  # P really entered


def test_parameter_selection_by_names_predicate_and_values():
    model = qwen2()
    probe, train = probe_and_train(model)
    names = [name for name in trainable(model) if "mlp" in name]
    subset = {name: dict(model.named_parameters())[name] for name in names}
    expected = bruteforce_kernel(model, probe, train, params=subset)
    by_names = kernels.logprob_kernel(model, probe, train, params=names)
    by_predicate = kernels.logprob_kernel(model, probe, train, params=lambda name, _: "mlp" in name)
    assert relative_error(by_names, expected) < EXACT
    assert relative_error(by_predicate, expected) < EXACT

    other = qwen2(seed=3)  # same architecture, other weights: the mapping evaluates the kernel there
    values = {name: p.detach() for name, p in other.named_parameters()}
    at_values = kernels.logprob_kernel(model, probe, train, params=values)
    assert relative_error(at_values, bruteforce_kernel(other, probe, train)) < EXACT
    with pytest.raises(ValueError, match="unknown parameter"):
        kernels.logprob_kernel(model, probe, train, params=["no.such.weight"])


def test_lora_kernel_is_over_adapter_parameters_including_a_wrapped_lm_head():
    peft = pytest.importorskip("peft")
    base = llama(tied=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    probe, train = probe_and_train(model)
    adapter = trainable(model)
    assert adapter and all("lora_" in name for name in adapter)
    expected = bruteforce_kernel(model, probe, train, params=adapter)
    assert relative_error(kernels.logprob_kernel(model, probe, train, chunk_size=4), expected) < EXACT
    assert (
        relative_error(kernels.pntk(model, probe, train), bruteforce_kernel(model, probe, train, output="logit_sum"))
        < EXACT
    )


def test_softcapped_logits_and_attended_padding_token_match_bruteforce():
    """Gemma2: final logit softcapping, scaled embeddings, and `padding_idx = 0` — a padding token the attention
    mask keeps gets no gradient through the embedding lookup in backward, and must get none in forward mode."""
    torch.manual_seed(2)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=2.0,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()
    probe, train = probe_and_train(model)
    train.input_ids[1, 0] = model.config.pad_token_id  # attended (attention_mask 1)
    assert model.get_input_embeddings().padding_idx == model.config.pad_token_id
    assert torch.allclose(logprobs.target_logprobs(model, probe), model_outputs(model, probe), atol=1e-5, rtol=0)
    expected = bruteforce_kernel(model, probe, train)
    assert relative_error(kernels.logprob_kernel(model, probe, train), expected) < EXACT


def test_unembedding_bias_enters_kernel_and_jvp():
    model = qwen2(tied=False)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    model.lm_head = torch.nn.Linear(hidden, vocab, bias=True)  # the model's forward uses it too
    torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    probe, train = probe_and_train(model)
    expected = bruteforce_kernel(model, probe, train)
    assert relative_error(kernels.logprob_kernel(model, probe, train), expected) < EXACT
    bias_only = {"lm_head.bias": model.lm_head.bias}
    direction = {"lm_head.bias": torch.randn(vocab, generator=torch.Generator().manual_seed(4))}
    jvp = kernels.logprob_jvp(model, train, direction)
    assert relative_error(jvp, per_target_gradients(model, train, bias_only) @ direction["lm_head.bias"]) < EXACT


def test_gradient_checkpointing_in_train_mode_runs_forward_ad_and_matches_bruteforce():
    model = qwen2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # configs have zero dropout: train mode is deterministic
    assert jvp.select_jvp_path(model) is jvp.JvpPath.FORWARD_AD
    probe, train = probe_and_train(model)
    expected = bruteforce_kernel(model, probe, train)
    assert relative_error(kernels.logprob_kernel(model, probe, train), expected) < EXACT
    assert model.training


def test_reentrant_checkpointing_in_train_mode_raises_with_the_fix():
    model = qwen2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    probe, train = probe_and_train(model)
    with pytest.raises(ValueError, match=r"call model\.eval\(\)"):
        kernels.logprob_kernel(model, probe, train)
    model.eval()  # checkpointing idles in eval mode
    assert relative_error(kernels.logprob_kernel(model, probe, train), bruteforce_kernel(model, probe, train)) < EXACT


@pytest.fixture
def counting_attention():
    """A registered attention implementation without known forward-mode support (SDPA underneath), counting calls."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    name, calls = "kernels_test_attention", []

    def attention(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    yield name, calls
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def test_unknown_attention_falls_back_to_finite_differences_or_is_switched_and_restored(counting_attention):
    name, calls = counting_attention
    model = qwen2()
    model.config._attn_implementation = name
    probe, _ = probe_and_train(model)
    direction = random_direction(trainable(model))
    expected = per_target_gradients(model, probe) @ flat(direction, trainable(model))
    assert calls  # the oracle ran through the registered attention
    assert jvp.select_jvp_path(model) is jvp.JvpPath.FINITE_DIFFERENCE

    calls.clear()
    switched = kernels.logprob_jvp(model, probe, direction, path="func")
    assert not calls  # switched to SDPA for the JVP ...
    assert model.config._attn_implementation == name  # ... and back
    assert relative_error(switched, expected) < EXACT

    calls.clear()
    fallback = kernels.logprob_jvp(model, probe, direction)
    assert calls  # auto: finite differences through the model's own attention
    assert relative_error(fallback, expected) < FINITE_DIFFERENCE


# ---------------------------------------------------------------------------------------------------------------
# Last layer, JVPs, weighted gradients
# ---------------------------------------------------------------------------------------------------------------


def unembedding_gradients(model, batch) -> torch.Tensor:
    """`[M, V * H]`: per-target gradient w.r.t. the unembedding weight alone (final hidden states held fixed)."""
    hidden = (
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        .hidden_states[-1][:, :-1][batch.target_mask[:, 1:]]
        .detach()
    )
    weight = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    logprobs = torch.log_softmax(hidden @ weight.T / batch.temperature, dim=-1)
    values = logprobs.gather(-1, batch.targets[:, None])[:, 0]
    return torch.stack(
        [torch.autograd.grad(values[m], weight, retain_graph=True)[0].flatten() for m in range(len(values))]
    )


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_last_layer_kernel_equals_unembedding_weight_gradient_products(tied):
    model = qwen2(tied=tied)
    probe, train = probe_and_train(model)
    probe_grads, train_grads = unembedding_gradients(model, probe), unembedding_gradients(model, train)
    assert relative_error(kernels.last_layer_kernel(model, probe, train), probe_grads @ train_grads.T) < EXACT

    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    weight = dict(model.named_parameters())[head_name]
    full = torch.rand(weight.shape, generator=torch.Generator().manual_seed(8)) + 0.5
    expected = probe_grads @ (train_grads * full.flatten()).T
    preconditioned = kernels.last_layer_kernel(model, probe, train, preconditioner={head_name: full}, chunk_size=3)
    assert relative_error(preconditioned, expected) < EXACT
    scalar = kernels.last_layer_kernel(model, probe, train, preconditioner={head_name: torch.tensor(0.25)})
    assert relative_error(scalar, 0.25 * probe_grads @ train_grads.T) < EXACT


@pytest.mark.parametrize("path", ["func", "forward_ad", "finite_difference"])
def test_logprob_jvp_matches_gradient_dot_direction(path):
    model = llama()
    _, train = probe_and_train(model)
    params = trainable(model)
    direction = random_direction(params)
    expected = per_target_gradients(model, train) @ flat(direction, params)
    tolerance = FINITE_DIFFERENCE if path == "finite_difference" else EXACT
    assert relative_error(kernels.logprob_jvp(model, train, direction, path=path), expected) < tolerance
    partial = {name: value for name, value in direction.items() if "layers.1" in name}
    expected_partial = per_target_gradients(model, train, {n: params[n] for n in partial}) @ flat(partial, partial)
    assert relative_error(kernels.logprob_jvp(model, train, partial, path=path), expected_partial) < tolerance


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_logprob_grad_is_the_weighted_sum_of_per_target_gradients(architecture):
    model = ARCHITECTURES[architecture]()
    _, train = probe_and_train(model)
    weights = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(9))
    grads = kernels.logprob_grad(model, train, weights)
    assert set(grads) == set(trainable(model))
    expected = weights @ per_target_gradients(model, train)
    assert relative_error(flat(grads, trainable(model)), expected) < EXACT
    assert all(p.grad is None for p in model.parameters())
    # added in place into given tensors (the running sum of several micro-batches): no new dict, same values
    start = {name: torch.randn_like(p) for name, p in trainable(model).items()}
    into = {name: t.clone() for name, t in start.items()}
    returned = kernels.logprob_grad(model, train, weights, into=into)
    assert returned is into and all(returned[n].data_ptr() == into[n].data_ptr() for n in into)
    assert relative_error(flat(into, trainable(model)), flat(start, trainable(model)) + expected) < EXACT
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Attributions: from the kernel and by the direct routes
# ---------------------------------------------------------------------------------------------------------------


def test_attribution_helpers_on_a_hand_kernel():
    kernel = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    grad_coeffs = torch.tensor([-2.0, 1.0, 0.0])
    matrix = attributions.attribution_matrix(kernel, grad_coeffs, lr=0.1)
    assert torch.allclose(matrix, torch.tensor([[0.2, -0.2, 0.0], [-0.2, -0.05, 0.0]]))
    rows = attributions.attribution_row_sums(kernel, grad_coeffs, lr=0.1)
    assert torch.allclose(rows.positive_gradient, torch.tensor([0.2, -0.2]))  # c < 0: token pulled up
    assert torch.allclose(rows.negative_gradient, torch.tensor([-0.2, -0.05]))
    assert torch.allclose(rows.total, matrix.sum(1))
    assert torch.allclose(attributions.attribution_column_sums(kernel, grad_coeffs, lr=0.1), matrix.sum(0))
    groups = torch.tensor([1, 0, 1])
    assert torch.allclose(
        attributions.attribution_group_sums(kernel, grad_coeffs, groups, lr=0.1),
        torch.stack([matrix[:, 1], matrix[:, 0]], 1),
    )


@pytest.mark.parametrize("preconditioned", [False, True], ids=["sgd", "preconditioned"])
def test_direct_routes_equal_sums_of_the_full_matrix(preconditioned):
    model = qwen2(tied=False)
    probe, train = probe_and_train(model)
    grad_coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(10))
    preconditioner = random_preconditioner(trainable(model)) if preconditioned else None
    lr = 1.0 if preconditioned else 0.05
    kernel = kernels.logprob_kernel(model, probe, train, preconditioner=preconditioner)

    rows = attributions.attribution_row_sums(kernel, grad_coeffs, lr=lr)
    direct_rows = attributions.attribution_row_sums_direct(
        model, probe, train, grad_coeffs, lr=lr, preconditioner=preconditioner
    )
    assert relative_error(direct_rows.positive_gradient, rows.positive_gradient) < EXACT
    assert relative_error(direct_rows.negative_gradient, rows.negative_gradient) < EXACT

    columns = attributions.attribution_column_sums(kernel, grad_coeffs, lr=lr)
    direct_columns = attributions.attribution_column_sums_direct(
        model, probe, train, grad_coeffs, lr=lr, preconditioner=preconditioner
    )
    assert relative_error(direct_columns, columns) < EXACT

    per_response = torch.zeros(2, probe.num_targets)
    first_row_targets = int(probe.target_mask[0].sum())
    per_response[0, :first_row_targets], per_response[1, first_row_targets:] = 1.0, 1.0
    direct_per_response = attributions.attribution_column_sums_direct(
        model, probe, train, grad_coeffs, lr=lr, preconditioner=preconditioner, probe_weights=per_response
    )
    expected = attributions.attribution_column_sums(kernel, grad_coeffs, lr=lr, probe_weights=per_response)
    assert relative_error(direct_per_response, expected) < EXACT
    one_tangent_at_a_time = attributions.attribution_column_sums_direct(
        model, probe, train, grad_coeffs, lr=lr, preconditioner=preconditioner, probe_weights=per_response,
        jvp_chunk_size=1,
    )  # fmt: skip
    assert relative_error(one_tangent_at_a_time, expected) < EXACT

    groups = torch.arange(train.num_targets) % 3
    direct_groups = attributions.attribution_group_sums_direct(
        model, probe, train, grad_coeffs, groups, lr=lr, preconditioner=preconditioner, chunk_size=2
    )
    assert (
        relative_error(direct_groups, attributions.attribution_group_sums(kernel, grad_coeffs, groups, lr=lr)) < EXACT
    )


def test_direct_routes_give_zeros_for_all_zero_weights_and_for_a_row_without_weight():
    model = qwen2(tied=False)
    probe, train = probe_and_train(model)
    zeros = torch.zeros(train.num_targets)
    rows = attributions.attribution_row_sums_direct(model, probe, train, zeros)
    assert torch.equal(rows.positive_gradient, torch.zeros_like(rows.positive_gradient))
    assert torch.equal(rows.negative_gradient, torch.zeros_like(rows.negative_gradient))
    grad_coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(10))
    weights = torch.zeros(3, probe.num_targets)
    weights[0, 0], weights[2, -1] = 1.0, 1.0  # the middle row weighs nothing: its own chunk with chunk_size=1
    columns = attributions.attribution_column_sums_direct(
        model, probe, train, grad_coeffs, probe_weights=weights, chunk_size=1
    )
    expected = attributions.attribution_column_sums(
        kernels.logprob_kernel(model, probe, train), grad_coeffs, probe_weights=weights
    )
    assert torch.equal(columns[1], torch.zeros_like(columns[1]))
    assert relative_error(columns, expected) < EXACT


def sgd_step_change(lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed, predicted) change of the probe log-probs under one real SGD step on `L = sum_l c_l lp_l`."""
    model = qwen2()
    probe, train = probe_and_train(model)
    grad_coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(12)) / train.num_targets
    kernel = kernels.logprob_kernel(model, probe, train)
    predicted = attributions.attribution_row_sums(kernel, grad_coeffs, lr=lr).total
    before = logprobs.target_logprobs(model, probe)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    (grad_coeffs * model_outputs(model, train)).sum().backward()
    optimizer.step()
    return logprobs.target_logprobs(model, probe) - before, predicted


def test_sgd_step_changes_probe_logprobs_as_the_attributions_predict():
    """Linearization: after `w <- w - lr * sum_l c_l grad lp_l`, the probe log-probs move by `sum_l a[m, l]`, and
    the gap is second order (halves with the step)."""
    observed, predicted = sgd_step_change(lr=0.004)
    assert observed.abs().max() > 1e-3  # the step really moved the probes
    error = relative_error(predicted, observed)
    assert error < 0.02
    half_observed, half_predicted = sgd_step_change(lr=0.002)
    assert relative_error(half_predicted, half_observed) < 0.6 * error


# ---------------------------------------------------------------------------------------------------------------
# Optimizer steps: dw = -P * g + history
# ---------------------------------------------------------------------------------------------------------------


def two_group_problem(seed: int = 0) -> tuple[dict[str, torch.nn.Parameter], list[dict]]:
    """Three float64 parameters (float error far below the checks) and two param groups with different lr (fresh
    dicts: torch optimizers write their defaults into the group dicts they are given)."""
    generator = torch.Generator().manual_seed(seed)
    named = {
        "a": torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64)),
        "b": torch.nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64)),
        "c": torch.nn.Parameter(torch.randn(2, 2, generator=generator, dtype=torch.float64)),
    }
    return named, [{"params": [named["a"], named["b"]]}, {"params": [named["c"]], "lr": 0.02}]


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "sgd-momentum-dampening-decay": lambda groups: torch.optim.SGD(
        groups, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01
    ),
    "sgd-nesterov-decay": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.1),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
    "adam-l2-decay": lambda groups: torch.optim.Adam(groups, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
    "adamw-amsgrad": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.05, amsgrad=True),
}


@pytest.mark.parametrize("slice_elements", [7, optim.SPLIT_CHUNK_ELEMENTS], ids=["slices", "whole"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optimizer_step_split_reproduces_torch_steps(kind, slice_elements, monkeypatch):
    monkeypatch.setattr(optim, "SPLIT_CHUNK_ELEMENTS", slice_elements)  # Adam's split in slices of a parameter
    named, groups = two_group_problem()
    optimizer = OPTIMIZERS[kind](groups)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):  # step 1 with empty state, then with state
        for param in named.values():
            param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        split = optim.optimizer_step_split(optimizer, named)
        predicted = {name: -split.preconditioner[name] * p.grad + split.history[name] for name, p in named.items()}
        before = {name: p.detach().clone() for name, p in named.items()}
        optimizer.step()
        for name, param in named.items():
            update = param.detach() - before[name]
            assert torch.allclose(predicted[name], update, rtol=1e-9, atol=1e-12), (kind, step, name)
    assert optimizer.param_groups[0]["lr"] != optimizer.param_groups[1]["lr"]  # each group's own lr was used


def test_sgd_preconditioner_is_plain_sgd_split_and_scales_the_kernel():
    model = qwen2()
    probe, train = probe_and_train(model)
    lr = 0.05
    preconditioner = optim.sgd_preconditioner(model.named_parameters(), lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    split = optim.optimizer_step_split(optimizer, model.named_parameters())
    assert all(torch.equal(preconditioner[name], split.preconditioner[name]) for name in preconditioner)
    preconditioned = kernels.logprob_kernel(model, probe, train, preconditioner=preconditioner)
    assert relative_error(preconditioned, lr * kernels.logprob_kernel(model, probe, train)) < EXACT


def test_optimizer_step_split_unwraps_accelerate_and_handles_missing_gradients():
    accelerate_optimizer = pytest.importorskip("accelerate.optimizer")
    named, groups = two_group_problem()
    inner = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)
    wrapped = accelerate_optimizer.AcceleratedOptimizer.__new__(accelerate_optimizer.AcceleratedOptimizer)
    wrapped.optimizer = inner  # what AcceleratedOptimizer holds (its constructor needs a live Accelerator)
    named["a"].grad = torch.ones_like(named["a"])
    split = optim.optimizer_step_split(wrapped, named)
    before = named["b"].detach().clone()
    update_a = -split.preconditioner["a"] * named["a"].grad + split.history["a"]
    start_a = named["a"].detach().clone()
    inner.step()
    assert torch.allclose(named["a"].detach() - start_a, update_a, rtol=1e-9, atol=1e-12)
    assert torch.equal(named["b"].detach(), before)  # no gradient: torch leaves it alone ...
    assert not split.preconditioner["b"].any() and not split.history["b"].any()  # ... and so does the split


def test_optimizer_step_split_refuses_what_it_cannot_split_exactly():
    named, groups = two_group_problem()
    for param in named.values():
        param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="unsupported optimizer RMSprop"):
        optim.optimizer_step_split(torch.optim.RMSprop(groups, lr=0.1), named)
    with pytest.raises(ValueError, match="maximize"):
        optim.optimizer_step_split(torch.optim.AdamW(list(named.values()), maximize=True), named)
    stranger = {"x": torch.nn.Parameter(torch.zeros(2))}
    with pytest.raises(ValueError, match="not managed by the optimizer"):
        optim.optimizer_step_split(torch.optim.SGD(list(named.values()), lr=0.1), stranger)


def test_preconditioned_kernel_and_history_give_the_real_adamw_update():
    """`sum_l -c_l K^P[m, l] + <grad lp~_m, history> = <grad lp~_m, dw>` for the update AdamW really takes."""
    model = llama()
    probe, train = probe_and_train(model)
    grad_coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(13))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    (grad_coeffs * model_outputs(model, train)).sum().backward()
    optimizer.step()  # the state now carries momentum
    optimizer.zero_grad()
    (grad_coeffs * model_outputs(model, train)).sum().backward()

    split = optim.optimizer_step_split(optimizer, model.named_parameters())
    kernel = kernels.logprob_kernel(model, probe, train, preconditioner=split.preconditioner)
    predicted = attributions.attribution_row_sums(kernel, grad_coeffs).total + kernels.logprob_jvp(
        model, probe, split.history
    )
    probe_grads = per_target_gradients(model, probe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    update = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    assert relative_error(predicted, probe_grads @ flat(update, before)) < EXACT


# ---------------------------------------------------------------------------------------------------------------
# Side effects, precision
# ---------------------------------------------------------------------------------------------------------------


def test_kernels_leave_model_state_untouched():
    model = llama()
    model.train()
    probe, train = probe_and_train(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    kernels.logprob_kernel(model, probe, train, params=lambda name, _: "layers.0" in name)
    kernels.last_layer_kernel(model, probe, train)
    kernels.logprob_grad(model, train, torch.ones(train.num_targets))
    assert model.training
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(torch.equal(state[name], p) for name, p in model.named_parameters())


def test_bfloat16_model_kernel_accumulates_in_float32():
    reference = qwen2()
    low = qwen2().to(torch.bfloat16)
    reference.load_state_dict({name: value.float() for name, value in low.state_dict().items()})
    probe, train = probe_and_train(reference)
    kernel = kernels.logprob_kernel(low, probe, train)
    assert kernel.dtype == torch.float32
    assert relative_error(kernel, kernels.logprob_kernel(reference, probe, train)) < 5e-2
