"""Tests for trl_ntk.kernels against brute force: per-target `torch.autograd.grad` through the model's own forward
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

from trl_ntk import kernels
from trl_ntk.batches import TokenBatch

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
    """Row 0 left-padded (3 pads), the last row right-padded (2 pads); targets on every real token after the first
    real one, except the first two real tokens of row 0 (a prompt)."""
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
                [(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params.values(), strict=True)]
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
        assert torch.allclose(kernels.target_logprobs(model, batch), expected, atol=1e-5, rtol=0)


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
    assert relative_error(kernels.pntk(model, probe, train), bruteforce_kernel(model, probe, train, output="logit_sum")) < EXACT


def test_softcapped_logits_kernel_and_logprobs_match_bruteforce():
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
    assert torch.allclose(kernels.target_logprobs(model, probe), model_outputs(model, probe), atol=1e-5, rtol=0)
    expected = bruteforce_kernel(model, probe, train)
    assert relative_error(kernels.logprob_kernel(model, probe, train), expected) < EXACT


def test_gradient_checkpointing_in_train_mode_runs_forward_ad_and_matches_bruteforce():
    model = qwen2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # configs have zero dropout: train mode is deterministic
    assert kernels.select_jvp_path(model) is kernels.JvpPath.FORWARD_AD
    probe, train = probe_and_train(model)
    expected = bruteforce_kernel(model, probe, train)
    assert relative_error(kernels.logprob_kernel(model, probe, train), expected) < EXACT
    assert model.training


def test_reentrant_checkpointing_in_train_mode_raises_with_the_fix():
    model = qwen2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    probe, train = probe_and_train(model)
    with pytest.raises(ValueError, match="model.eval()"):
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
    assert kernels.select_jvp_path(model) is kernels.JvpPath.FINITE_DIFFERENCE

    calls.clear()
    switched = kernels.logprob_jvp(model, probe, direction, path="func")
    assert not calls  # switched to SDPA for the JVP ...
    assert model.config._attn_implementation == name  # ... and back
    assert relative_error(switched, expected) < EXACT

    calls.clear()
    fallback = kernels.logprob_jvp(model, probe, direction)
    assert calls  # auto: finite differences through the model's own attention
    assert relative_error(fallback, expected) < FINITE_DIFFERENCE
