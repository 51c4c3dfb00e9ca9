"""Probe sets: builders, tokenization identical to TRL's trainers, validation, and sampling without side effects."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from trl_ntk.demo import toy
from trl_ntk.probes.probe_set import (
    PREFERENCE_KINDS,
    Probe,
    ProbeResponse,
    ProbeSet,
    sample_responses,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
USER_ONLY_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'assistant' %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
)


def _train_tokenizer(chat_template: str = CHATML):
    """A byte-level BPE tokenizer with ChatML special tokens (`<|pad|>` 0, `<|im_start|>` 1, `<|im_end|>` 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        row["prompt"] + row["chosen"] + row["rejected"]
        for row in toy.preference_dataset(64, seed=0, conversational=False)
    ]
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=chat_template
    )


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return toy.tiny_random_model(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)


def _chat(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


# ---- builders --------------------------------------------------------------------------------------------------


def test_preference_builder_yields_every_kind_per_prompt_from_the_right_sources():
    train = toy.preference_dataset(12, seed=0)
    test = toy.preference_dataset(4, seed=0, split="test")
    probes = ProbeSet.from_preference_dataset(train, num_prompts=3, seed=1, test_dataset=test)

    assert len(probes.prompts()) == 3
    test_chosen = [row["chosen"] for row in test]
    for probe in probes.prompts():
        index = int(probe.prompt_id[1:])
        row = train[index]
        assert probe.prompt == row["prompt"]
        assert probe.kinds == PREFERENCE_KINDS
        by_kind = {r.kind: r.response for r in probe.responses}
        for kind in ("chosen", "rejected", "chosen_rephrase", "rejected_rephrase", "chosen_swapped"):
            assert by_kind[kind] == row[kind]
        others = [train[i]["chosen"] for i in range(len(train)) if i != index]
        assert by_kind["irrelevant_train"] in others
        assert by_kind["irrelevant_test"] in test_chosen
        for shuffled, source in (("shuffled_chosen", "chosen"), ("shuffled_irrelevant", "irrelevant_train")):
            words, source_words = by_kind[shuffled][0]["content"].split(), by_kind[source][0]["content"].split()
            assert sorted(words) == sorted(source_words) and words != source_words
    assert len({r.probe_id for r in probes}) == len(probes) == 3 * len(PREFERENCE_KINDS)


def test_preference_builder_is_deterministic_for_a_seed_and_varies_with_it():
    train = toy.preference_dataset(20, seed=0)
    first = ProbeSet.from_preference_dataset(train, num_prompts=4, seed=7).to_dicts()
    again = ProbeSet.from_preference_dataset(train, num_prompts=4, seed=7).to_dicts()
    other = ProbeSet.from_preference_dataset(train, num_prompts=4, seed=8).to_dicts()
    assert first == again
    assert first != other


def test_preference_builder_skips_missing_columns_and_extracts_an_implicit_prompt():
    rows = [
        {
            "chosen": _chat("user", f"Colour of thing {i}?") + _chat("assistant", f"It is blue number {i}."),
            "rejected": _chat("user", f"Colour of thing {i}?") + _chat("assistant", f"It is red number {i}."),
        }
        for i in range(3)
    ]
    probes = ProbeSet.from_preference_dataset(rows, num_prompts=2, seed=0)
    for probe in probes.prompts():
        assert probe.kinds == ("chosen", "rejected", "irrelevant_train", "shuffled_chosen", "shuffled_irrelevant")
        assert probe.prompt == _chat("user", f"Colour of thing {probe.prompt_id[1:]}?")
        assert probe.responses[0].response == _chat("assistant", f"It is blue number {probe.prompt_id[1:]}.")


@pytest.mark.parametrize(
    ("rows", "expected_prompt", "expected_reference"),
    [
        (
            [{"prompt": f"Q{i}: what?", "completion": f" answer {i} is here"} for i in range(4)],
            "Q{i}: what?",
            " answer {i} is here",
        ),
        (
            [{"messages": _chat("user", f"Q{i}?") + _chat("assistant", f"A {i} is it")} for i in range(4)],
            _chat("user", "Q{i}?"),
            _chat("assistant", "A {i} is it"),
        ),
        (
            [{"prompt": _chat("user", f"Add {i} and 1."), "answer": i + 1} for i in range(4)],
            _chat("user", "Add {i} and 1."),
            _chat("assistant", "{j}"),
        ),
        ([{"text": f"Some text number {i} here."} for i in range(4)], "", "Some text number {i} here."),
    ],
    ids=["prompt-completion", "messages", "prompt-only-with-answer-column", "text"],
)
def test_prompt_builder_takes_prompt_and_reference_answer_of_each_format(rows, expected_prompt, expected_reference):
    response_column = "answer" if "answer" in rows[0] else None
    probes = ProbeSet.from_prompts(rows, num_prompts=2, seed=3, response_column=response_column)

    def fill(template, i):
        return json.loads(json.dumps(template).replace("{i}", str(i)).replace("{j}", str(i + 1)))

    assert len(probes.prompts()) == 2
    for probe in probes.prompts():
        i = int(probe.prompt_id[1:])
        assert probe.prompt == fill(expected_prompt, i)
        assert probe.kinds == ("completion", "irrelevant_train", "shuffled_completion", "shuffled_irrelevant") or (
            probe.kinds == ("completion", "irrelevant_train")  # one-word answers cannot be shuffled
        )
        assert probe.responses[0].response == fill(expected_reference, i)


def test_prompt_builder_keeps_prompts_without_reference_for_sampling_only():
    rows = toy.math_dataset(10, seed=0).select_columns(["prompt"])
    probes = ProbeSet.from_prompts(rows, num_prompts=3, seed=0)
    assert len(probes.prompts()) == 3 and len(probes) == 0


def test_prompt_builder_finds_the_solution_column_and_adds_a_held_out_one_as_irrelevant_test():
    train = toy.math_dataset(10, seed=0)
    test = toy.math_dataset(3, seed=1)
    probes = ProbeSet.from_prompts(train, num_prompts=2, seed=0, test_dataset=test)
    test_solutions = [row["solution"] for row in test]
    for probe in probes.prompts():
        by_kind = {r.kind: r.response for r in probe.responses}
        assert by_kind["completion"] == train[int(probe.prompt_id[1:])]["solution"]
        assert by_kind["irrelevant_test"] in test_solutions


def test_user_kinds_can_be_added_selected_and_round_trip_through_dicts():
    probes = ProbeSet.from_preference_dataset(toy.preference_dataset(6, seed=0), num_prompts=2, seed=0)
    prompt_id = probes.prompts()[0].prompt_id
    added = probes.add(prompt_id, "my_kind", _chat("assistant", "Something else entirely."))
    assert added.probe_id == f"{prompt_id}-my_kind" and "my_kind" in probes.kinds
    probes.add("new", "other", "plain answer", prompt="plain prompt")
    assert probes.select(["my_kind"]).kinds == ("my_kind",)
    assert "chosen" not in probes.select(exclude=["chosen"]).kinds
    assert ProbeSet.from_dicts(json.loads(json.dumps(probes.to_dicts()))).to_dicts() == probes.to_dicts()


def test_duplicate_ids_and_mixed_formats_raise():
    probes = ProbeSet([Probe("a", "prompt")])
    probes.add("a", "chosen", " yes", probe_id="x")
    with pytest.raises(ValueError, match="'x' is already"):
        probes.add("a", "rejected", " no", probe_id="x")
    with pytest.raises(KeyError, match="pass prompt="):
        probes.add("missing", "chosen", " yes")
    with pytest.raises(ValueError, match="must both be plain text or both chat messages"):
        ProbeResponse("p", "a", "chosen", _chat("user", "hi"), "plain")


# ---- encoding --------------------------------------------------------------------------------------------------


def test_encode_scores_exactly_the_response_tokens_after_the_templated_prompt(tokenizer):
    probes = ProbeSet()
    probes.add("c", "chosen", _chat("assistant", "It is blue."), prompt=_chat("user", "Sky colour?"))
    probes.add("c", "rejected", _chat("assistant", "It is a very long and green answer."))
    probes.add("t", "chosen", " blue.", prompt="Question: Sky colour?\nAnswer:")
    encoded = probes.encode(tokenizer)
    batch = encoded.batch

    expected = [
        ("<|im_start|>user\nSky colour?<|im_end|>\n<|im_start|>assistant\n", "It is blue.<|im_end|>\n"),
        (
            "<|im_start|>user\nSky colour?<|im_end|>\n<|im_start|>assistant\n",
            "It is a very long and green answer.<|im_end|>\n",
        ),
        ("Question: Sky colour?\nAnswer:", " blue.<|im_end|>"),  # plain text: eos appended, as TRL does
    ]
    for row, (prompt_text, response_text) in enumerate(expected):
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        response_ids = tokenizer(prompt_text + response_text)["input_ids"][len(prompt_ids) :]
        length = len(prompt_ids) + len(response_ids)
        assert batch.attention_mask[row].tolist() == [1] * length + [0] * (batch.input_ids.shape[1] - length)
        assert batch.input_ids[row, :length].tolist() == prompt_ids + response_ids
        assert batch.input_ids[row, length:].eq(tokenizer.pad_token_id).all()
        assert batch.target_mask[row].nonzero().flatten().tolist() == list(range(len(prompt_ids), length))
    assert encoded.num_tokens == [int(n) for n in batch.target_mask.sum(1)]


def test_describe_gives_the_probes_record_with_decoded_response_tokens(tokenizer):
    probes = ProbeSet.from_preference_dataset(toy.preference_dataset(6, seed=0), tokenizer, num_prompts=1, seed=0)
    encoded = probes.encode(tokenizer)
    described = encoded.describe(tokenizer)
    json.dumps(described)
    assert len(described) == len(probes)
    for record, response_ids in zip(described, encoded.response_ids):
        assert set(record) == {"probe_id", "prompt_id", "kind", "prompt", "response", "num_tokens", "tokens"}
        assert record["num_tokens"] == len(record["tokens"]) == len(response_ids)
        assert "".join(record["tokens"]) == record["response"]
    chosen = next(r for r in described if r["kind"] == "chosen")
    assert chosen["response"].endswith("<|im_end|>\n") and chosen["prompt"].endswith("<|im_start|>assistant\n")


def test_describe_with_a_shared_cache_decodes_each_sequence_once(tokenizer, monkeypatch):
    probes = ProbeSet.from_preference_dataset(toy.preference_dataset(6, seed=0), tokenizer, num_prompts=2, seed=0)
    encoded = probes.encode(tokenizer)
    expected = encoded.describe(tokenizer)
    decoded: dict = {}
    assert encoded.describe(tokenizer, decoded) == expected
    calls = []
    original = type(tokenizer).decode
    monkeypatch.setattr(type(tokenizer), "decode", lambda self, ids, **kw: calls.append(ids) or original(self, ids))
    assert encoded.describe(tokenizer, decoded) == expected and calls == []
    assert decoded[tuple(encoded.response_ids[0])] == expected[0]["response"]
    decoded.pop(tuple(encoded.context_ids[0]))
    assert encoded.describe(tokenizer, decoded) == expected and calls == [list(encoded.context_ids[0])]


@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "plain"])
def test_dpo_trainer_trains_on_the_token_ids_the_probes_score(tokenizer, model, tmp_path, conversational):
    from trl import DPOConfig, DPOTrainer

    data = toy.preference_dataset(6, seed=0, conversational=conversational).select_columns(
        ["prompt", "chosen", "rejected"]
    )
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, max_steps=1)
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer
    )
    # from the raw rows and from the trainer's prepared dataset (plain text: eos already appended to the responses)
    for source in (data, trainer.train_dataset):
        probes = ProbeSet.from_preference_dataset(source, tokenizer, num_prompts=len(data), seed=0)
        encoded = probes.select(["chosen", "rejected"]).encode(tokenizer)
        by_id = {r.probe_id: i for i, r in enumerate(encoded.responses)}
        for index, row in enumerate(trainer.train_dataset):
            for kind in ("chosen", "rejected"):
                n = by_id[f"p{index}-{kind}"]
                assert encoded.context_ids[n] == row["prompt_ids"]
                assert encoded.response_ids[n] == row[f"{kind}_ids"]
        for response_ids in probes.encode(tokenizer).response_ids:  # eos ends every response, never inside one
            assert tokenizer.eos_token_id not in response_ids[:-2]


@pytest.mark.parametrize("data_format", ["prompt-completion", "plain-prompt-completion", "messages", "text"])
def test_sft_trainer_trains_on_the_token_ids_the_probes_score(tokenizer, model, tmp_path, data_format):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    preference = toy.preference_dataset(4, seed=0, conversational=data_format != "plain-prompt-completion")
    if data_format == "messages":
        rows = [{"messages": row["prompt"] + row["chosen"]} for row in preference]
    elif data_format == "text":
        rows = [{"text": row["prompt"][0]["content"] + " " + row["chosen"][0]["content"]} for row in preference]
    else:
        rows = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in preference]
    data = Dataset.from_list(rows)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, max_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    encoded = ProbeSet.from_prompts(data, num_prompts=len(data), seed=0).select(["completion"]).encode(tokenizer)

    for n, probe_response in enumerate(encoded.responses):
        row = trainer.train_dataset[int(probe_response.prompt_id[1:])]
        assert encoded.context_ids[n] + encoded.response_ids[n] == row["input_ids"]
        if data_format.endswith("prompt-completion"):  # completion-only loss: the labels are the response tokens
            assert [t for t in row["labels"] if t != -100] == encoded.response_ids[n]


def test_encode_rejects_a_response_with_no_tokens_naming_the_probe(tokenizer):
    probes = ProbeSet()
    probes.add("p", "chosen", _chat("assistant", "Hidden by the template."), prompt=_chat("user", "Hi"), probe_id="x")
    with pytest.raises(ValueError, match="probe 'x' has 0 response tokens after tokenization; check the chat"):
        probes.encode(tokenizer, chat_template_kwargs={"chat_template": USER_ONLY_TEMPLATE})


def test_encode_rejects_a_probe_longer_than_max_length_with_its_lengths(tokenizer):
    probes = ProbeSet()
    probes.add("p", "chosen", " a rather long answer", prompt="Question: q?\nAnswer:", probe_id="long")
    full = len(tokenizer("Question: q?\nAnswer: a rather long answer<|im_end|>")["input_ids"])
    with pytest.raises(ValueError, match=rf"probe 'long' is {full} tokens long \(prompt \d+ \+ response \d+\)"):
        probes.encode(tokenizer, max_length=full - 1)
    assert probes.encode(tokenizer, max_length=full).batch.input_ids.shape == (1, full)
    with pytest.raises(ValueError, match="more than max_length=5"):  # builders given a tokenizer check at once
        ProbeSet.from_preference_dataset(toy.preference_dataset(4, seed=0), tokenizer, num_prompts=1, max_length=5)


def test_validate_rejects_a_different_tokenizer_and_ids_or_lengths_the_model_cannot_take(tokenizer, model):
    probes = ProbeSet()
    probes.add("p", "chosen", _chat("assistant", "It is blue."), prompt=_chat("user", "Sky?"), probe_id="c")
    encoded = probes.encode(tokenizer)
    encoded.validate(model, tokenizer)

    other = copy.deepcopy(tokenizer)
    other.chat_template = USER_ONLY_TEMPLATE
    with pytest.raises(ValueError, match="different tokenizer"):
        encoded.validate(model, other)
    small_vocab = toy.tiny_random_model(vocab_size=200, hidden_size=16, intermediate_size=32)
    with pytest.raises(ValueError, match=r"probe 'c' has token id \d+ outside the model's vocabulary of 200"):
        encoded.validate(small_vocab)
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = 8
    with pytest.raises(ValueError, match=r"probe 'c' is \d+ tokens long .* max_position_embeddings=8"):
        encoded.validate(short)


# ---- sampling --------------------------------------------------------------------------------------------------


def _prompts_set() -> ProbeSet:
    probes = ProbeSet()
    probes.add("a", "chosen", _chat("assistant", "It is blue."), prompt=_chat("user", "Sky colour?"))
    probes.add("b", "chosen", _chat("assistant", "Woof."), prompt=_chat("user", "Which noise does a dog make, then?"))
    return probes


def test_sampling_leaves_the_global_rng_and_each_module_mode_unchanged(tokenizer, model):
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    rng_state = torch.get_rng_state()
    responses = sample_responses(model, tokenizer, _prompts_set(), num_samples=2, max_new_tokens=4, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert [m.training for m in model.modules()] == modes
    assert responses
    model.eval()


def test_sampling_returns_greedy_then_seeded_samples_matching_unpadded_greedy_decoding(tokenizer, model):
    prompts = _prompts_set()
    kwargs = {"num_samples": 2, "max_new_tokens": 6, "generation_kwargs": {"suppress_tokens": [0, 1, 2]}}
    responses = sample_responses(model, tokenizer, prompts, seed=1, **kwargs)
    assert [r.probe_id for r in responses] == [
        "a-greedy",
        "a-sample-0",
        "a-sample-1",
        "b-greedy",
        "b-sample-0",
        "b-sample-1",
    ]
    assert [r.kind for r in responses] == ["greedy", "sample", "sample"] * 2
    assert all(r.is_conversational and r.response[0]["role"] == "assistant" for r in responses)
    assert [r.to_dict() for r in sample_responses(model, tokenizer, prompts, seed=1, **kwargs)] == [
        r.to_dict() for r in responses
    ]

    for probe, greedy in zip(prompts.prompts(), [responses[0], responses[3]]):
        prompt_ids = tokenizer.apply_chat_template(probe.prompt, add_generation_prompt=True, return_dict=True)
        ids = list(prompt_ids["input_ids"])
        with torch.no_grad():
            for _ in range(6):  # greedy decoding by full forwards of the unpadded sequence, special tokens suppressed
                logits = model(torch.tensor([ids])).logits[0, -1]
                logits[:3] = -float("inf")
                ids.append(int(logits.argmax()))
        expected = tokenizer.decode(ids[len(prompt_ids["input_ids"]) :], skip_special_tokens=True)
        assert greedy.response[0]["content"] == expected


def test_sampling_works_on_a_model_patched_with_trl_fused_lm_head(tokenizer, model):
    from trl.trainer.utils import add_fused_lm_head

    kwargs = {"num_samples": 1, "max_new_tokens": 5, "seed": 2, "generation_kwargs": {"suppress_tokens": [0, 1, 2]}}
    plain = sample_responses(model, tokenizer, _prompts_set(), **kwargs)
    patched = copy.deepcopy(model)
    add_fused_lm_head(patched)
    assert [r.to_dict() for r in sample_responses(patched, tokenizer, _prompts_set(), **kwargs)] == [
        r.to_dict() for r in plain
    ]


def test_sampling_skips_empty_generations_with_a_warning(tokenizer, model, caplog):
    plain = ProbeSet()
    plain.add("a", "chosen", " blue.", prompt="Question: Sky colour?\nAnswer:")
    with caplog.at_level(logging.WARNING, logger="trl_ntk.probes.probe_set"):
        responses = sample_responses(
            model, tokenizer, plain, num_samples=1, max_new_tokens=3, generation_kwargs={"sequence_bias": {(2,): 1e4}}
        )
    assert responses == []
    assert "skipped 2 empty generated responses" in caplog.text
