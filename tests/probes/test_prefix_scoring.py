"""Scoring after a shared prompt prefix (KV cache) against the plain forward of every row, and the reused encodings."""

from __future__ import annotations

import logging

import pytest
import torch

from trl_ntk.batches import TokenBatch
from trl_ntk.demo import toy
from trl_ntk.probes import prefix
from trl_ntk.probes.encoding import encode_extended, encode_responses, tokenizer_fingerprint
from trl_ntk.probes.probe_set import ProbeResponse, ProbeSet
from trl_ntk.probes.scoring import DIAGNOSTICS, score_responses


def _count_chat_templates(tokenizer, monkeypatch) -> list[int]:
    """A list that grows by one at every `tokenizer.apply_chat_template` call from now on."""
    calls: list[int] = []
    original = tokenizer.apply_chat_template
    monkeypatch.setattr(
        tokenizer, "apply_chat_template", lambda *a, **k: calls.append(1) or original(*a, **k), raising=False
    )
    return calls


@pytest.fixture(scope="module")
def toy_model_and_tokenizer():
    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def probes():
    return ProbeSet.from_preference_dataset(toy.preference_dataset(12, seed=0), num_prompts=3, seed=0)


def _random_model(arch: str, vocab_size: int):
    """A random-weight decoder built from its config class (peaked distributions: initializer_range 0.3)."""
    import transformers

    common = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"num_attention_heads": 4}),  # learned absolute positions
        "mistral_sliding": (
            "MistralConfig",
            "MistralForCausalLM",
            {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8},
        ),
    }
    config_name, model_name, extra = configs[arch]
    config = getattr(transformers, config_name)(**common, **extra, initializer_range=0.3, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(config)
    return model.eval()


def _left_padded(batch: TokenBatch) -> TokenBatch:
    """The same rows, left padded (one extra column of padding for all), positions counted from each first token."""
    lengths = batch.attention_mask.sum(1)
    width = int(lengths.max()) + 1
    input_ids = torch.zeros((batch.input_ids.shape[0], width), dtype=torch.long)
    attention_mask, target_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, width - length :] = batch.input_ids[row, :length]
        attention_mask[row, width - length :] = 1
        target_mask[row, width - length :] = batch.target_mask[row, :length]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention_mask, target_mask, position_ids=position_ids)


def _assert_same_scores(shared, plain, atol: float = 1e-5) -> None:
    """Every token log-prob and per-token mean within `atol`; the sums over a response within `atol` per token."""
    torch.testing.assert_close(shared.flat_token_logps, plain.flat_token_logps, atol=atol, rtol=0)
    assert torch.equal(shared.num_tokens, plain.num_tokens)
    for name in DIAGNOSTICS:
        tolerance = (
            atol * plain.num_tokens if name in ("logp_sum", "argmax_logp") else torch.full_like(plain.a_norm, atol)
        )
        difference = (getattr(shared, name) - getattr(plain, name)).abs()
        assert bool((difference <= tolerance).all()), f"{name}: largest difference {float(difference.max()):.3g}"


class _Spy:
    """Counts the calls of `prefix.shared_prefix_hidden` (so a test knows the shared path ran)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = prefix.shared_prefix_hidden

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(prefix, "shared_prefix_hidden", counted)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["toy", "llama", "qwen2"])
def test_shared_prefix_scores_equal_the_plain_forward(toy_model_and_tokenizer, probes, monkeypatch, arch, side):
    toy_model, tokenizer = toy_model_and_tokenizer
    model = toy_model if arch == "toy" else _random_model(arch, len(tokenizer))
    batch = probes.encode(tokenizer).batch
    if side == "left":
        batch = _left_padded(batch)
    lengths = batch.target_mask.sum(1)
    assert len(set(lengths.tolist())) > 3  # responses of different lengths
    spy = _Spy(monkeypatch)
    plain = score_responses(model, batch, share_prefix=False)
    assert spy.calls == 0
    # batch_size 4: several suffix forwards, the groups split across them
    shared = score_responses(model, batch, batch_size=4)
    assert spy.calls >= 2 and prefix.verified(model) is True
    _assert_same_scores(shared, plain)


def test_shared_prefix_matches_each_unpadded_response_forward(toy_model_and_tokenizer, probes):
    """Against an independent reference: each response scored alone, without padding, by the model's forward."""
    model, tokenizer = toy_model_and_tokenizer
    encoded = probes.encode(tokenizer)
    shared = score_responses(model, encoded.batch)
    with torch.no_grad():
        for row, (context, response) in enumerate(zip(encoded.context_ids, encoded.response_ids)):
            sequence = torch.tensor(context + response)
            logits = model(input_ids=sequence[None]).logits[0, len(context) - 1 : -1].double()
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
            torch.testing.assert_close(shared.token_logps[row].double(), expected, atol=1e-5, rtol=0)


def test_rows_group_by_their_prefix_and_singletons_stay_plain():
    ids = torch.tensor(
        [
            [5, 6, 7, 8, 9, 0],  # group A: prefix [5, 6] (first target at 3)
            [5, 6, 7, 3, 0, 0],  # group A
            [5, 6, 4, 4, 4, 4],  # first target at 2: prefix [5], alone
            [0, 5, 6, 7, 8, 9],  # left padded, no position_ids: plain
            [0, 5, 6, 7, 1, 1],  # same
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1] * 6, [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, 3:5] = targets[1, 3] = True
    targets[2, 2:] = True
    targets[3, 4:] = targets[4, 4:] = True
    groups = prefix.group_prefixes(TokenBatch(ids, mask, targets))
    assert groups.group_of.tolist() == [0, 0, -1, -1, -1] and groups.lengths == [2]
    assert groups.shared_rows == [0, 1] and groups.plain_rows == [2, 3, 4]
    # with position_ids the left-padded pair shares its prefix (padding included)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    groups = prefix.group_prefixes(TokenBatch(ids, mask, targets, position_ids=positions))
    assert groups.group_of.tolist() == [0, 0, -1, 1, 1] and groups.lengths == [2, 3]


def test_sliding_window_model_falls_back_to_the_plain_forward(toy_model_and_tokenizer, probes, monkeypatch):
    _, tokenizer = toy_model_and_tokenizer
    model = _random_model("mistral_sliding", len(tokenizer))
    assert prefix.cache_argument(model) is None
    spy = _Spy(monkeypatch)
    batch = probes.encode(tokenizer).batch
    _assert_same_scores(score_responses(model, batch), score_responses(model, batch, share_prefix=False))
    assert spy.calls == 0


def test_a_model_failing_the_one_time_check_is_scored_plainly(toy_model_and_tokenizer, probes, monkeypatch, caplog):
    _, tokenizer = toy_model_and_tokenizer
    model = _random_model("qwen2", len(tokenizer))
    original = prefix.shared_prefix_hidden
    monkeypatch.setattr(prefix, "shared_prefix_hidden", lambda *a, **k: original(*a, **k) + 1.0)  # a wrong forward
    batch = probes.encode(tokenizer).batch
    with caplog.at_level(logging.WARNING, logger="trl_ntk.probes.prefix"):
        shared = score_responses(model, batch)
    assert prefix.verified(model) is False and "plainly" in caplog.text
    _assert_same_scores(shared, score_responses(model, batch, share_prefix=False), atol=0.0)


def test_a_model_whose_shared_forward_raises_is_scored_plainly(toy_model_and_tokenizer, probes, monkeypatch, caplog):
    _, tokenizer = toy_model_and_tokenizer
    model = _random_model("qwen2", len(tokenizer))

    def broken(*args, **kwargs):
        raise RuntimeError("this cache cannot be shared")

    monkeypatch.setattr(prefix, "shared_prefix_hidden", broken)
    batch = probes.encode(tokenizer).batch
    with caplog.at_level(logging.WARNING, logger="trl_ntk.probes.prefix"):
        shared = score_responses(model, batch)
    assert prefix.verified(model) is False and "plainly" in caplog.text
    _assert_same_scores(shared, score_responses(model, batch, share_prefix=False), atol=0.0)


def test_a_shared_forward_failing_after_the_check_scores_the_rest_plainly(
    toy_model_and_tokenizer, probes, monkeypatch, caplog
):
    _, tokenizer = toy_model_and_tokenizer
    model = _random_model("qwen2", len(tokenizer))
    batch = probes.encode(tokenizer).batch
    reference = score_responses(model, batch, share_prefix=False)
    score_responses(model, batch)  # passes the one-time check
    assert prefix.verified(model) is True

    def broken(*args, **kwargs):
        raise RuntimeError("a batch this cache cannot serve")

    monkeypatch.setattr(prefix, "shared_prefix_hidden", broken)
    with caplog.at_level(logging.WARNING, logger="trl_ntk.probes.prefix"):
        scores = score_responses(model, batch)
    assert prefix.verified(model) is False and "plainly" in caplog.text
    _assert_same_scores(scores, reference, atol=0.0)


def test_encode_extended_equals_encoding_everything_and_tokenizes_only_new_responses(
    toy_model_and_tokenizer, probes, monkeypatch
):
    _, tokenizer = toy_model_and_tokenizer
    fixed = probes.encode(tokenizer)
    prompt = probes.prompts()[1]
    extra = [
        ProbeResponse(
            f"{prompt.prompt_id}-greedy",
            prompt.prompt_id,
            "greedy",
            prompt.prompt,
            [{"role": "assistant", "content": "the answer is 4"}],
        )
    ]
    responses = ProbeSet.from_responses(probes.responses() + extra).responses()
    expected = encode_responses(responses, tokenizer)
    calls = _count_chat_templates(tokenizer, monkeypatch)
    extended = encode_extended(fixed, responses, tokenizer)
    assert len(calls) == 2  # the new response's prompt and prompt + response only
    for name in ("input_ids", "attention_mask", "target_mask"):
        assert torch.equal(getattr(extended.batch, name), getattr(expected.batch, name))
    assert [r.probe_id for r in extended.responses] == [r.probe_id for r in responses]
    assert extended.context_ids == expected.context_ids and extended.response_ids == expected.response_ids
    assert extended.tokenizer_fingerprint == expected.tokenizer_fingerprint


def test_a_shared_prompt_cache_tokenizes_each_prompt_once_and_changes_nothing(
    toy_model_and_tokenizer, probes, monkeypatch
):
    from trl_ntk.probes.generation import sample_responses

    model, tokenizer = toy_model_and_tokenizer
    fixed = probes.encode(tokenizer)
    cache: dict[str, list[int]] = {}
    generated = sample_responses(model, tokenizer, probes.prompts(), max_new_tokens=4, prompt_cache=cache)
    assert set(cache) == {p.prompt_id for p in probes.prompts()}
    assert generated == sample_responses(model, tokenizer, probes.prompts(), max_new_tokens=4)
    responses = ProbeSet.from_responses(probes.responses() + generated).responses()
    expected = encode_responses(responses, tokenizer)
    calls = _count_chat_templates(tokenizer, monkeypatch)
    extended = encode_extended(fixed, responses, tokenizer, prompt_cache=cache)
    assert len(calls) == len(generated)  # prompt + response only: the prompts come from the cache
    assert torch.equal(extended.batch.input_ids, expected.batch.input_ids)
    assert extended.context_ids == expected.context_ids and extended.response_ids == expected.response_ids


def test_tokenizer_fingerprint_is_remembered_until_the_template_changes(toy_model_and_tokenizer):
    import copy

    _, tokenizer = toy_model_and_tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    first = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer) == first
    tokenizer.chat_template = tokenizer.chat_template + " "
    assert tokenizer_fingerprint(tokenizer) != first


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_mixed_batch_of_shared_single_and_contextless_rows_matches_unpadded_forwards(monkeypatch, arch):
    """Three responses to one prompt, one to another prompt (scored plainly), one scored from its second token."""
    model = _random_model(arch, 48)
    generator = torch.Generator().manual_seed(3)
    prompt_a, prompt_b = (
        torch.randint(0, 48, (6,), generator=generator),
        torch.randint(0, 48, (4,), generator=generator),
    )
    rows = [(prompt_a, 2), (prompt_b, 7), (prompt_a, 9), (prompt_a[:1], 5), (prompt_a, 5)]
    sequences = [torch.cat([p, torch.randint(0, 48, (n,), generator=generator)]) for p, n in rows]
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask, target_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (sequence, (context, _)) in enumerate(zip(sequences, rows)):
        input_ids[row, : len(sequence)], attention_mask[row, : len(sequence)] = sequence, 1
        target_mask[row, len(context) : len(sequence)] = True
    batch = TokenBatch(input_ids, attention_mask, target_mask)
    assert prefix.group_prefixes(batch).shared_rows == [0, 2, 4]
    spy = _Spy(monkeypatch)
    scores = score_responses(model, batch, batch_size=2)
    assert spy.calls >= 1
    with torch.no_grad():
        for row, (sequence, (context, _)) in enumerate(zip(sequences, rows)):
            logits = model(input_ids=sequence[None]).logits[0, len(context) - 1 : -1].double()
            expected = logits.log_softmax(-1).gather(-1, sequence[len(context) :, None])[:, 0]
            torch.testing.assert_close(scores.token_logps[row].double(), expected, atol=1e-5, rtol=0)
