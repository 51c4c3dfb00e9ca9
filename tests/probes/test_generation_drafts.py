"""Greedy generation that checks the previous greedy answers first gives exactly what plain generation gives."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from trl_ntk.demo import toy
from trl_ntk.probes.generation import GreedyDrafts, sample_responses
from trl_ntk.probes.probe_set import ProbeSet


@pytest.fixture(scope="module")
def model_tokenizer_prompts():
    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    prompts = ProbeSet.from_preference_dataset(toy.preference_dataset(12, seed=0), num_prompts=4, seed=0).prompts()
    return model, tokenizer, prompts


def _texts(responses):
    return [(r.probe_id, r.response[0]["content"]) for r in responses]


class _GenerateCounter:
    def __init__(self, model, monkeypatch):
        self.calls = 0
        original = model.generate

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", counted)


def test_unchanged_answers_come_from_one_forward_and_equal_plain_generation(model_tokenizer_prompts, monkeypatch):
    model, tokenizer, prompts = model_tokenizer_prompts
    drafts = GreedyDrafts()
    plain = sample_responses(model, tokenizer, prompts, max_new_tokens=48)
    assert _texts(sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)) == _texts(plain)
    assert len(drafts.answers) == len(prompts) and drafts.verified  # the first call generates, then checks once
    counter = _GenerateCounter(model, monkeypatch)
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        again = sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)
    finally:
        handle.remove()
    assert counter.calls == 0 and len(forwards) == 1  # every draft was still the greedy answer
    assert _texts(again) == _texts(plain)


@pytest.mark.parametrize("noise", [1e-3, 3e-2, 0.3])
def test_after_the_model_changes_the_answers_equal_plain_generation(model_tokenizer_prompts, noise):
    model, tokenizer, prompts = model_tokenizer_prompts
    drafts = GreedyDrafts()
    sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)
    changed = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for parameter in changed.parameters():
            parameter.add_(noise * parameter.abs().mean() * torch.randn_like(parameter))
    expected = _texts(sample_responses(changed, tokenizer, prompts, max_new_tokens=48))
    assert _texts(sample_responses(changed, tokenizer, prompts, max_new_tokens=48, drafts=drafts)) == expected


def test_wrong_or_overlong_drafts_still_give_the_greedy_answers(model_tokenizer_prompts):
    model, tokenizer, prompts = model_tokenizer_prompts
    drafts = GreedyDrafts()
    sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)
    keys = list(drafts.answers)
    drafts.answers[keys[0]] = [[7] * 60]  # longer than the budget, no eos
    drafts.answers[keys[1]] = [drafts.last(keys[1])[:3] + [5, 5, 5]]  # right start, then wrong
    drafts.answers[keys[2]] = [drafts.last(keys[2])[:1]]  # right first token only
    for max_new_tokens in (48, 6):
        expected = _texts(sample_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens))
        got = sample_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, drafts=copy.deepcopy(drafts))
        assert _texts(got) == expected


def test_a_failing_draft_check_falls_back_to_plain_generation(model_tokenizer_prompts, monkeypatch):
    from trl_ntk.probes import generation

    model, tokenizer, prompts = model_tokenizer_prompts
    drafts = GreedyDrafts()
    plain = sample_responses(model, tokenizer, prompts, max_new_tokens=48)
    sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)

    def broken(*args, **kwargs):
        raise RuntimeError("a model the one-forward check cannot run on")

    monkeypatch.setattr(generation, "speculative_greedy", broken)
    counter = _GenerateCounter(model, monkeypatch)
    again = sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)
    assert drafts.failed and counter.calls > 0
    assert _texts(again) == _texts(plain)


def test_a_model_failing_the_one_time_check_is_decoded_plainly_with_a_warning(
    model_tokenizer_prompts, monkeypatch, caplog
):
    from trl_ntk.probes import drafts as drafts_module

    model, tokenizer, prompts = model_tokenizer_prompts
    plain = sample_responses(model, tokenizer, prompts, max_new_tokens=48)
    monkeypatch.setattr(drafts_module, "speculative_greedy", lambda model, prompts, *args: [[5] for _ in prompts])
    drafts = GreedyDrafts()
    with caplog.at_level(logging.WARNING):
        first = sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)
    assert drafts.verified is False and "does not reproduce generate()" in caplog.text
    counter = _GenerateCounter(model, monkeypatch)
    again = sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)
    assert counter.calls == 1 and _texts(first) == _texts(again) == _texts(plain)


def test_a_model_whose_cache_is_not_plain_is_decoded_plainly_without_a_warning(
    model_tokenizer_prompts, monkeypatch, caplog
):
    from trl_ntk.probes import prefix

    model, tokenizer, prompts = model_tokenizer_prompts
    monkeypatch.setattr(prefix, "has_plain_cache", lambda model: False)  # a sliding window, say
    drafts = GreedyDrafts()
    with caplog.at_level(logging.WARNING):
        sample_responses(model, tokenizer, prompts, max_new_tokens=48, drafts=drafts)
    assert drafts.verified is False and not caplog.text
    assert not drafts.usable(model, synced_gpus=False, generation_kwargs=None)


def test_a_peft_model_is_decoded_from_drafts_with_its_adapters(model_tokenizer_prompts, monkeypatch):
    peft = pytest.importorskip("peft")
    model, tokenizer, prompts = model_tokenizer_prompts
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(copy.deepcopy(model), lora)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:  # non-zero adapters: their answers differ from the base model's
                parameter.normal_(std=0.3)
    plain = _texts(sample_responses(wrapped, tokenizer, prompts, max_new_tokens=48))
    assert plain != _texts(sample_responses(model, tokenizer, prompts, max_new_tokens=48))
    drafts = GreedyDrafts()
    assert _texts(sample_responses(wrapped, tokenizer, prompts, max_new_tokens=48, drafts=drafts)) == plain
    counter = _GenerateCounter(wrapped, monkeypatch)
    assert _texts(sample_responses(wrapped, tokenizer, prompts, max_new_tokens=48, drafts=drafts)) == plain
    assert drafts.verified and not drafts.failed and counter.calls == 0
