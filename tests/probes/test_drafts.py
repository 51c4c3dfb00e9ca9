"""Greedy decoding that verifies guessed tokens in cached batched forwards gives exactly `generate`'s greedy tokens."""

from __future__ import annotations

import pytest
import torch

from trl_ntk.demo import toy
from trl_ntk.probes.drafts import GreedyDrafts, NgramIndex, answer_tokens, guess_continuation, speculative_greedy
from trl_ntk.probes.encoding import _generation_prompt_ids
from trl_ntk.probes.generation import _generation_configs, _left_pad
from trl_ntk.probes.probe_set import ProbeSet


@pytest.fixture(scope="module")
def tokenizer():
    return toy.model_and_tokenizer(warmup=True)[1]


@pytest.fixture(scope="module")
def toy_model():
    return toy.model_and_tokenizer(warmup=True)[0].eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Chat prompts of different lengths, and a plain-text one a few tokens long (left padding of 10+ columns)."""
    probes = ProbeSet.from_preference_dataset(toy.preference_dataset(12, seed=0), num_prompts=4, seed=0).prompts()
    ids = [_generation_prompt_ids(tokenizer, probe.prompt, {}) for probe in probes]
    return [*ids, tokenizer("The capital of")["input_ids"]]


def _random_model(arch: str, vocab_size: int):
    """A random-weight decoder (peaked distributions: initializer_range 0.3)."""
    import transformers

    common = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"num_attention_heads": 4}),  # learned absolute positions
    }
    config_name, model_name, extra = configs[arch]
    config = getattr(transformers, config_name)(**common, **extra, initializer_range=0.3, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, model_name)(config).eval()


def _eos_pad(tokenizer) -> tuple[list[int], int]:
    return [tokenizer.eos_token_id], tokenizer.pad_token_id


def _generated(model, prompts, budget, eos_ids, pad_id) -> list[list[int]]:
    """The reference: `generate(do_sample=False)` on the left-padded prompts, each cut after its first eos."""
    config, _ = _generation_configs(eos_ids, pad_id, 0, 1.0, budget, None)
    input_ids, attention_mask = _left_pad(prompts, pad_id, torch.device("cpu"))
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return [answer_tokens(row, eos_ids) for row in output[:, input_ids.shape[1] :].tolist()]


class _Forwards:
    """Counts the model's forwards."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.count += 1


def _decode(model, prompts, drafts, budget, eos_ids, pad_id) -> tuple[list[list[int]], int]:
    forwards = _Forwards(model)
    try:
        with torch.no_grad():
            return speculative_greedy(model, prompts, drafts, budget, eos_ids, pad_id), forwards.count
    finally:
        forwards.handle.remove()


def _drafts(prompts, answers) -> GreedyDrafts:
    drafts = GreedyDrafts()
    for prompt, answer in zip(prompts, answers):
        drafts.answers[tuple(prompt)] = [list(answer)]
    return drafts


def test_unchanged_answers_take_one_forward_for_all_prompts(toy_model, tokenizer, prompts):
    eos_ids, pad_id = _eos_pad(tokenizer)
    expected = _generated(toy_model, prompts, 48, eos_ids, pad_id)
    assert any(answer[-1] in eos_ids for answer in expected) and len({len(p) for p in prompts}) > 1
    got, forwards = _decode(toy_model, prompts, _drafts(prompts, expected), 48, eos_ids, pad_id)
    assert got == expected and forwards == 1


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_drafts_diverging_at_one_token_give_the_greedy_answers(toy_model, tokenizer, prompts, where):
    eos_ids, pad_id = _eos_pad(tokenizer)
    expected = _generated(toy_model, prompts, 48, eos_ids, pad_id)
    wrong = []
    for answer in expected:
        position = {"first": 0, "middle": len(answer) // 2, "last": len(answer) - 1}[where]
        draft = list(answer)
        draft[position] = (draft[position] + 7) % len(tokenizer)
        wrong.append(draft)
    got, forwards = _decode(toy_model, prompts, _drafts(prompts, wrong), 48, eos_ids, pad_id)
    assert got == expected
    # the rest of each draft is guessed again after the wrong token: far fewer forwards than tokens
    assert forwards <= 4 < max(len(answer) for answer in expected)


def test_drafts_with_an_early_eos_or_past_the_budget_give_the_greedy_answers(toy_model, tokenizer, prompts):
    eos_ids, pad_id = _eos_pad(tokenizer)
    expected = _generated(toy_model, prompts, 48, eos_ids, pad_id)
    drafts = [
        expected[0][:3] + eos_ids + expected[0][3:],  # eos in the middle
        expected[1][:-1] + [5, 6, 7] + eos_ids,  # wrong end, then more tokens
        [7] * 60,  # longer than the budget, no eos
        expected[3][:2],  # right start only
        [],
    ]
    for budget in (48, 5, 1):
        want = [answer[:budget] for answer in expected] if budget < 48 else expected
        got, _ = _decode(toy_model, prompts, _drafts(prompts, drafts), budget, eos_ids, pad_id)
        assert got == want


def test_without_drafts_the_answers_equal_generate_and_references_save_forwards(toy_model, tokenizer, prompts):
    eos_ids, pad_id = _eos_pad(tokenizer)
    expected = _generated(toy_model, prompts, 48, eos_ids, pad_id)
    plain, plain_forwards = _decode(toy_model, prompts, GreedyDrafts(), 48, eos_ids, pad_id)
    assert plain == expected
    # the answers as reference text (no answer per prompt): looked up n-gram by n-gram
    referenced, forwards = _decode(toy_model, prompts, GreedyDrafts(references=expected), 48, eos_ids, pad_id)
    assert referenced == expected and forwards < plain_forwards


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_decoders_give_the_greedy_answers_from_wrong_and_right_drafts(tokenizer, prompts, arch):
    model = _random_model(arch, len(tokenizer))
    eos_ids, pad_id = _eos_pad(tokenizer)
    expected = _generated(model, prompts, 12, eos_ids, pad_id)
    for drafts in (GreedyDrafts(), _drafts(prompts, expected), _drafts(prompts, [a[:4] + [1, 2] for a in expected])):
        assert _decode(model, prompts, drafts, 12, eos_ids, pad_id)[0] == expected


def test_ngram_index_keeps_the_first_occurrence_and_nothing_at_the_end():
    index = NgramIndex([1, 2, 3, 1, 2, 4], max_n=2)
    assert index.sequence[index.following[(1, 2)] :] == [3, 1, 2, 4]
    assert index.sequence[index.following[(2,)] :] == [3, 1, 2, 4]
    assert (4,) not in index.following and (2, 4) not in index.following


def test_guess_prefers_the_longest_ngram_then_the_first_source():
    first = [NgramIndex([9, 8, 5, 6])]
    then = [NgramIndex([1, 9, 8, 7, 7]), NgramIndex([0, 8, 3])]
    assert guess_continuation([4, 1, 9, 8], first, then, 10) == [7, 7]  # 3-gram in `then` beats a 2-gram in `first`
    assert guess_continuation([4, 9, 8], first, then, 10) == [5, 6]  # same length: `first` first
    assert guess_continuation([4, 8], first, then, 1) == [5]  # limit
    assert guess_continuation([3, 4, 3], [], then, 10) == [4, 3]  # the text itself, before `then`
    assert guess_continuation([2, 4], first, then, 10) == [] and guess_continuation([9], first, then, 0) == []


def test_remember_keeps_distinct_answers_newest_first_cut_after_eos():
    drafts = GreedyDrafts(history=2)
    for completion in ([1, 2, 0, 0], [3, 0, 5], [1, 2, 0], [4, 4]):
        drafts.remember([[7]], [completion], eos_ids=[0])
    assert drafts.answers[(7,)] == [[4, 4], [1, 2, 0]] and drafts.last([7]) == [4, 4]
