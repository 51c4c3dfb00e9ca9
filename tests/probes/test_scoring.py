"""Probe scoring: per-token log-probs and squeezing diagnostics against plain forwards of each unpadded response."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from trl_ntk.batches import TokenBatch
from trl_ntk.ntk import logprobs
from trl_ntk.probes.probe_set import ProbeResponse
from trl_ntk.probes.scoring import ResponseScores, score_responses

VOCAB = 48
# (context length, response length) per response; rows of different lengths, so padding matters
LENGTHS = [(5, 4), (2, 9), (7, 1), (3, 6), (4, 3)]


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,  # peaked distributions, so the diagnostics are far from their uniform values
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_model():
    """Learned absolute positions: a left-padded row scores right only with positions counted from its first token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model.eval()


@pytest.fixture(scope="module")
def sequences():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (c + r,), generator=generator) for c, r in LENGTHS]


def _padded_batch(sequences, side: str, temperature: float = 1.0) -> TokenBatch:
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros((len(sequences), length), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (sequence, (context, _)) in enumerate(zip(sequences, LENGTHS)):
        start = 0 if side == "right" else length - len(sequence)
        input_ids[row, start : start + len(sequence)] = sequence
        attention_mask[row, start : start + len(sequence)] = 1
        target_mask[row, start + context : start + len(sequence)] = True
    # positions counted from each row's first token, so that a row scores as its unpadded sequence
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) if side == "left" else None
    return TokenBatch(input_ids, attention_mask, target_mask, position_ids=position_ids, temperature=temperature)


def _reference_logits(model, sequences, temperature: float = 1.0) -> list[torch.Tensor]:
    """`[M, V]` float64 logits predicting each response token, from a plain forward of the unpadded sequence."""
    logits = []
    with torch.no_grad():
        for sequence, (context, _) in zip(sequences, LENGTHS):
            full = model(input_ids=sequence[None]).logits[0].double() / temperature
            logits.append(full[context - 1 : len(sequence) - 1])
    return logits


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("strategy", ["backbone", "logits"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_logprobs_match_unpadded_forward_with_padding_and_split_batches(request, sequences, side, strategy, arch):
    model = request.getfixturevalue("model" if arch == "qwen2" else "gpt2_model")
    scores = score_responses(model, _padded_batch(sequences, side), batch_size=2, strategy=strategy)
    assert scores.strategy == strategy
    for row, (logits, sequence, (context, response)) in enumerate(
        zip(_reference_logits(model, sequences), sequences, LENGTHS)
    ):
        expected = logits.log_softmax(-1).gather(-1, sequence[context:, None]).squeeze(-1)
        assert scores.token_logps[row].shape == (response,)
        torch.testing.assert_close(scores.token_logps[row].double(), expected, atol=1e-5, rtol=0)
        assert int(scores.num_tokens[row]) == response
    torch.testing.assert_close(scores.flat_token_logps, torch.cat(scores.token_logps))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_diagnostics_match_hand_computation_from_full_logits(model, sequences, temperature):
    scores = score_responses(model, _padded_batch(sequences, "right", temperature), batch_size=3, chunk_size=4)
    for row, (logits, sequence, (context, _)) in enumerate(
        zip(_reference_logits(model, sequences, temperature), sequences, LENGTHS)
    ):
        token_logps, max_logps, max_probs, entropies, prob_norms, residual_norms = [], [], [], [], [], []
        for m, target in enumerate(sequence[context:].tolist()):
            probs = [math.exp(z) for z in logits[m].tolist()]
            total = sum(probs)
            probs = [p / total for p in probs]
            token_logps.append(math.log(probs[target]))
            max_probs.append(max(probs))
            max_logps.append(math.log(max(probs)))
            entropies.append(-sum(p * math.log(p) for p in probs if p > 0))
            prob_norms.append(math.sqrt(sum(p * p for p in probs)))
            one_hot = [1.0 if v == target else 0.0 for v in range(VOCAB)]
            residual_norms.append(math.sqrt(sum((p - e) ** 2 for p, e in zip(probs, one_hot))))
        count = len(token_logps)
        expected = {
            "logp_sum": sum(token_logps),
            "logp_mean": sum(token_logps) / count,
            "argmax_logp": sum(max_logps),
            "max_prob_mean": sum(max_probs) / count,
            "entropy_mean": sum(entropies) / count,
            "a_norm": math.sqrt(VOCAB * (sum(prob_norms) / count) ** 2 + VOCAB - 2),
            "g_norm": sum(residual_norms) / count,
        }
        for name, value in expected.items():
            assert float(getattr(scores, name)[row]) == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert float(scores.max_prob_mean.max()) > 2 / VOCAB  # the check is not against a near-uniform model


def test_scores_do_not_depend_on_batch_size_chunk_size_or_strategy(model, sequences):
    batch = _padded_batch(sequences, "left")
    reference = score_responses(model, batch, batch_size=len(sequences), chunk_size=1024, strategy="logits")
    for batch_size, chunk_size in [(1, 1), (2, 3), (4, 1024)]:
        scores = score_responses(model, batch, batch_size=batch_size, chunk_size=chunk_size)
        assert scores.strategy == "backbone"
        for name in ("logp_sum", "argmax_logp", "entropy_mean", "a_norm", "g_norm"):
            torch.testing.assert_close(getattr(scores, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def test_scoring_a_model_patched_with_trl_fused_lm_head_gives_the_same_scores(model, sequences):
    from trl.trainer.utils import add_fused_lm_head

    batch = _padded_batch(sequences, "right")
    reference = score_responses(model, batch)
    patched = copy.deepcopy(model)
    add_fused_lm_head(patched)
    for strategy in ("auto", "logits"):
        scores = score_responses(patched, batch, strategy=strategy)
        torch.testing.assert_close(scores.logp_sum, reference.logp_sum, atol=1e-5, rtol=0)
        torch.testing.assert_close(scores.g_norm, reference.g_norm, atol=1e-5, rtol=0)


def test_scoring_a_lora_wrapped_model_includes_its_adapters(model, sequences):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wrapped = get_peft_model(copy.deepcopy(model), config)
    scores = score_responses(wrapped, _padded_batch(sequences, "left"), batch_size=2)
    assert scores.strategy == "backbone"
    for row, (logits, sequence, (context, _)) in enumerate(
        zip(_reference_logits(wrapped, sequences), sequences, LENGTHS)
    ):
        expected = logits.log_softmax(-1).gather(-1, sequence[context:, None]).squeeze(-1)
        torch.testing.assert_close(scores.token_logps[row].double(), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(scores.logp_sum, score_responses(model, _padded_batch(sequences, "left")).logp_sum)


def test_scoring_restores_each_module_mode_and_builds_no_graph(model, sequences):
    scored = copy.deepcopy(model)
    scored.config.attention_dropout = 0.9  # dropout would change the scores if scoring ran in train mode
    for layer in scored.model.layers:
        layer.self_attn.attention_dropout = 0.9
    scored.train()
    scored.model.layers[1].eval()
    modes = [m.training for m in scored.modules()]

    scores = score_responses(scored, _padded_batch(sequences, "right"))
    assert [m.training for m in scored.modules()] == modes
    assert not scores.logp_sum.requires_grad and not scores.token_logps[0].requires_grad
    torch.testing.assert_close(scores.logp_sum, score_responses(model, _padded_batch(sequences, "right")).logp_sum)


def test_head_that_transforms_logits_falls_back_to_full_logits_and_backbone_refuses(model, sequences):
    scaled = copy.deepcopy(model)
    scaled.config.final_logit_softcapping = 30.0
    assert score_responses(scaled, _padded_batch(sequences, "right")).strategy == "logits"
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        score_responses(scaled, _padded_batch(sequences, "right"), strategy="backbone")


def test_rows_without_targets_and_bad_options_raise(model, sequences):
    batch = _padded_batch(sequences, "right")
    batch.target_mask[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\] have no target tokens"):
        score_responses(model, batch)
    with pytest.raises(ValueError, match="strategy must be"):
        score_responses(model, _padded_batch(sequences, "right"), strategy="fast")
    with pytest.raises(ValueError, match="batch_size and chunk_size must be >= 1"):
        score_responses(model, _padded_batch(sequences, "right"), batch_size=0)


def test_records_carry_the_probe_record_fields_and_are_json(model, sequences):
    scores = score_responses(model, _padded_batch(sequences, "right"))
    assert isinstance(scores, ResponseScores) and len(scores) == len(LENGTHS)
    responses = [ProbeResponse(f"p{i}-chosen", f"p{i}", "chosen", "q", " a") for i in range(len(LENGTHS))]
    records = scores.to_records(responses)
    json.dumps(records)
    expected_fields = {
        "probe_id", "prompt_id", "kind", "logp_sum", "logp_mean", "argmax_logp", "max_prob_mean", "entropy_mean",
        "a_norm", "g_norm", "num_tokens", "token_logps",
    }  # fmt: skip
    for record, response, (_, length) in zip(records, responses, LENGTHS):
        assert set(record) == expected_fields
        assert record["probe_id"] == response.probe_id and record["num_tokens"] == len(record["token_logps"]) == length
        assert record["logp_sum"] == pytest.approx(sum(record["token_logps"]), abs=1e-4)
    with pytest.raises(ValueError, match="got 1 responses for 5 scored rows"):
        scores.to_records(responses[:1])


@pytest.mark.parametrize("strategy", ["backbone", "logits"])
def test_without_position_ids_rows_score_with_the_models_own_positions_as_the_kernels_do(
    gpt2_model, sequences, strategy
):
    """Learned positions and left padding: the scores are those of the model's own forward on the padded batch
    (positions counted from column 0, as a trainer that passes no position ids trains), whatever the row split."""
    batch = _padded_batch(sequences, "left")
    batch = TokenBatch(batch.input_ids, batch.attention_mask, batch.target_mask)  # no position ids
    with torch.no_grad():
        logits = gpt2_model(**batch.forward_kwargs()).logits[:, :-1][batch.target_mask[:, 1:]]
    expected = torch.log_softmax(logits, -1).gather(-1, batch.targets[:, None])[:, 0]
    scores = score_responses(gpt2_model, batch, batch_size=2, strategy=strategy).flat_token_logps
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, logprobs.target_logprobs(gpt2_model, batch), atol=1e-5, rtol=0)
    padded_positions = _padded_batch(sequences, "left")  # positions from the mask: a different function
    assert float((score_responses(gpt2_model, padded_positions).flat_token_logps - scores).abs().max()) > 1e-3


def test_scoring_a_model_under_the_trainers_bf16_autocast_wrapper_computes_in_float32(model, sequences):
    """`bf16=True` makes accelerate run `model.forward` under bf16 autocast (its wrapper, built as accelerate's
    `prepare_model` builds it); scores stay the float32 scores of the unwrapped model, on both strategies, and the
    wrapper is back in place afterwards."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    batch = _padded_batch(sequences, "right")
    reference = {s: score_responses(model, batch, strategy=s) for s in ("backbone", "logits")}
    wrapped = copy.deepcopy(model)
    wrapped._original_forward = wrapped.forward
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    wrapped.forward = MethodType(convert_outputs_to_fp32(autocast(type(wrapped).forward)), wrapped)
    wrapper = wrapped.forward
    with torch.no_grad():  # the wrapper does compute in bf16: far from the float32 logits
        bf16_logits = wrapped(input_ids=sequences[0][None]).logits
        assert (bf16_logits - model(input_ids=sequences[0][None]).logits).abs().max() > 1e-3
    for strategy, expected in reference.items():
        scores = score_responses(wrapped, batch, strategy=strategy)
        torch.testing.assert_close(scores.logp_sum, expected.logp_sum, atol=1e-5, rtol=0)
    assert wrapped.forward == wrapper
