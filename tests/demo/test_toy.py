"""The toy default: tokenizer and chat template, cached model, synthetic data, reward, and the warm model."""

from __future__ import annotations

import collections
import multiprocessing
import re
import time
from pathlib import Path

import pytest
import torch

from trl_ntk.demo import toy, toy_data, toy_model

RESPONSE_COLUMNS = ("chosen", "rejected", "chosen_rephrase", "rejected_rephrase", "chosen_swapped")


@pytest.fixture(scope="session")
def warm():
    """The warm toy model and tokenizer from the default cache (built once per machine, then loaded)."""
    return toy.model_and_tokenizer()


@pytest.fixture(scope="session")
def tokenizer(warm):
    return warm[1]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _content(column) -> str:
    return column if isinstance(column, str) else column[0]["content"]


def _response_logprob(model, tokenizer, prompt, response) -> float:
    """Oracle: sum of `log softmax(z)[y]` over the response's tokens, from one plain forward of prompt + response."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full_ids = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    token_logprobs = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logprobs[len(prompt_ids) - 1 :].sum().item()


# ---- tokenizer and chat template -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Sure! The sky is blue. Hope that helps.",
        "3 plus 4 makes 7. So the answer is 7.",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "Ünïcödé, emoji 🙂 and 漢字 fall back to bytes",
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_sizes(tokenizer):
    assert len(tokenizer) == toy.VOCAB_SIZE
    assert tokenizer.model_max_length == toy.MAX_LENGTH
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
        assert special in tokenizer.all_special_tokens
    assert (
        tokenizer("hello", add_special_tokens=True)["input_ids"]
        == tokenizer("hello", add_special_tokens=False)["input_ids"]
    )


def test_tokenizer_compresses_the_synthetic_text(tokenizer):
    text = " ".join(_content(row["chosen"]) for row in toy.preference_dataset(n=50))
    assert len(text) / len(tokenizer(text)["input_ids"]) > 2.5


def test_chat_template_renders_chatml_and_the_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "It is blue."},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"
        "<|im_start|>assistant\nIt is blue.<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_passes_trl_training_checks_and_masks_the_assistant_turn(tokenizer):
    from trl.chat_template_utils import (
        has_generation_markers,
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
    )

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_prefix_preserving(tokenizer)
    assert is_chat_template_stop_token_trained(tokenizer)
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "It is 5."}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "It is 5.<|im_end|>\n"


@pytest.mark.parametrize("conversational", [True, False])
def test_prompt_tokens_are_a_prefix_of_prompt_plus_response_tokens(tokenizer, conversational):
    for row in toy.preference_dataset(n=40, conversational=conversational):
        for column in RESPONSE_COLUMNS:
            if conversational:
                prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
                full = tokenizer.apply_chat_template(row["prompt"] + row[column], tokenize=False)
            else:
                prompt, full = row["prompt"], row["prompt"] + row[column] + tokenizer.eos_token
            prompt_ids = tokenizer(prompt)["input_ids"]
            assert tokenizer(full)["input_ids"][: len(prompt_ids)] == prompt_ids


# ---- model and cache -----------------------------------------------------------------------------------------------


def test_model_loads_from_its_cache_folder_with_the_toy_shape(warm):
    model, tokenizer = warm
    path = Path(model.name_or_path)
    assert path.is_dir() and (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert path.parent == toy.toy_cache_path() and path.name == "sft"
    config = model.config
    assert config.model_type == "qwen2" and config._attn_implementation == "eager"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 4)
    assert config.num_key_value_heads == 2 and config.max_position_embeddings == toy.MAX_LENGTH
    assert config.vocab_size == len(tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.dtype == torch.float32 and not model.training
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 450_000


def test_stages_load_from_sibling_folders_and_differ(warm):
    random_model, _ = toy.model_and_tokenizer(warmup=False)
    pretrained, _ = toy.model_and_tokenizer(warmup="pretrain")
    paths = {Path(m.name_or_path).name for m in (random_model, pretrained, warm[0])}
    assert paths == {"random", "pretrain", "sft"}
    weights = [m.get_input_embeddings().weight for m in (random_model, pretrained, warm[0])]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    with pytest.raises(ValueError, match="warmup must be"):
        toy.model_and_tokenizer(warmup="finetuned")


def test_random_stage_builds_into_a_fresh_cache_and_then_loads_without_rebuilding(tmp_path):
    model, tokenizer = toy.model_and_tokenizer(tmp_path, warmup=False)
    folder = Path(model.name_or_path)
    assert folder.parent.parent == tmp_path and not (folder.parent / "sft").exists()
    marker_mtime = (folder / "BUILD_COMPLETE").stat().st_mtime_ns
    start = time.perf_counter()
    again, _ = toy.model_and_tokenizer(tmp_path, warmup=False)
    assert time.perf_counter() - start < 2.0
    assert (folder / "BUILD_COMPLETE").stat().st_mtime_ns == marker_mtime
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def _build_in_child(cache_dir: str, queue) -> None:
    """Child process body: load the random stage, report where from, its weights' sum and whether it built."""
    builds = []
    build = toy_model._build
    toy_model._build = lambda *args: (builds.append(args), build(*args))
    model, _ = toy.model_and_tokenizer(cache_dir, warmup=False)
    queue.put((model.name_or_path, model.get_input_embeddings().weight.double().sum().item(), len(builds)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_concurrent_processes_build_the_cache_once(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    (path, weight_sum, _), (other_path, other_weight_sum, _) = results
    assert path == other_path and weight_sum == other_weight_sum
    assert sum(builds for *_, builds in results) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(path).parent.name]


def test_cache_folder_name_follows_the_recipe(monkeypatch, tmp_path):
    import dataclasses

    before = toy.toy_cache_path(tmp_path)
    assert before.parent == tmp_path and before.name.startswith(f"toy-v{toy.RECIPE_VERSION}-")
    monkeypatch.setattr(
        toy_model, "_RECIPE", dataclasses.replace(toy_model._RECIPE, sft_epochs=toy_model._RECIPE.sft_epochs + 1)
    )
    assert toy.toy_cache_path(tmp_path) != before
    monkeypatch.setenv("TRL_NTK_CACHE", str(tmp_path / "elsewhere"))
    assert toy.toy_cache_path().parent == tmp_path / "elsewhere"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_random_model_builds_each_architecture(arch, tied):
    model = toy.tiny_random_model(arch=arch, tie_word_embeddings=tied, vocab_size=97, hidden_size=32, seed=3)
    again = toy.tiny_random_model(arch=arch, tie_word_embeddings=tied, vocab_size=97, hidden_size=32, seed=3)
    assert model.config.model_type == arch and model.config._attn_implementation == "eager"
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert model(torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 97)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


# ---- data ----------------------------------------------------------------------------------------------------------


def test_preference_dataset_is_deterministic_for_a_seed():
    assert toy.preference_dataset(n=30, seed=4).to_list() == toy.preference_dataset(n=30, seed=4).to_list()
    assert toy.preference_dataset(n=30, seed=4).to_list() != toy.preference_dataset(n=30, seed=5).to_list()
    plain = toy.preference_dataset(n=30, seed=4, conversational=False)
    assert plain.to_list() == toy.preference_dataset(n=30, seed=4, conversational=False).to_list()


def test_preference_train_and_test_prompts_are_disjoint_but_share_the_facts():
    train = toy.preference_dataset(split="train")
    test = toy.preference_dataset(split="test")
    train_prompts = {_content(p) for p in train["prompt"]}
    test_prompts = {_content(p) for p in test["prompt"]}
    assert len(train_prompts) == len(train) == 216 and len(test_prompts) == len(test) == 72
    assert not train_prompts & test_prompts
    assert set(zip(test["subject"], test["answer"], strict=True)) <= set(
        zip(train["subject"], train["answer"], strict=True)
    )
    assert set(train["category"]) == {"colours", "sounds", "capitals", "opposites"}
    bigger = toy.preference_dataset(n=500, split="test", seed=1)
    assert {_content(p) for p in bigger["prompt"]} == test_prompts


def test_preference_columns_in_both_formats():
    conversational = toy.preference_dataset(n=8)
    plain = toy.preference_dataset(n=8, conversational=False)
    for name in ("prompt", *RESPONSE_COLUMNS):
        assert name in conversational.column_names and name in plain.column_names
    row = conversational[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert all([m["role"] for m in row[c]] == ["assistant"] for c in RESPONSE_COLUMNS)
    row = plain[0]
    assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
    assert all(isinstance(row[c], str) and row[c].startswith(" ") for c in RESPONSE_COLUMNS)


@pytest.mark.parametrize("conversational", [True, False])
def test_responses_carry_the_right_or_the_wrong_fact(conversational):
    for row in toy.preference_dataset(n=100, seed=2, conversational=conversational):
        answer, wrong = row["answer"].lower(), row["wrong_answer"].lower()
        assert answer != wrong
        texts = {c: _words(_content(row[c])) for c in RESPONSE_COLUMNS}
        for column in ("chosen", "chosen_rephrase"):
            assert answer in texts[column] and wrong not in texts[column]
        for column in ("rejected", "rejected_rephrase", "chosen_swapped"):
            assert wrong in texts[column] and answer not in texts[column]
        chosen, swapped = texts["chosen"], texts["chosen_swapped"]
        assert len(chosen) == len(swapped)
        differing = [(a, b) for a, b in zip(chosen, swapped, strict=True) if a != b]
        assert differing and all(pair == (answer, wrong) for pair in differing)
        assert texts["chosen_rephrase"] != chosen


def test_chosen_and_rejected_wording_follow_reversed_skewed_distributions():
    data = toy.preference_dataset(n=2000, seed=0)
    chosen_openers = collections.Counter(_content(r).split(" ")[0] for r in data["chosen"])
    rejected_openers = collections.Counter(_content(r).split(" ")[0] for r in data["rejected"])
    assert chosen_openers.most_common(1)[0][0] == "Sure!" and rejected_openers.most_common(1)[0][0] == "Let"
    assert 0.40 < chosen_openers["Sure!"] / len(data) < 0.50
    assert 0.40 < rejected_openers["Let"] / len(data) < 0.50


def test_math_dataset_is_deterministic_and_consistent():
    data = toy.math_dataset(n=64, seed=3)
    assert data.to_list() == toy.math_dataset(n=64, seed=3).to_list()
    assert data.to_list() != toy.math_dataset(n=64, seed=4).to_list()
    assert set(data.column_names) == {"prompt", "solution", "answer"}
    for row in data:
        a, b = (int(x) for x in re.findall(r"\d+", row["prompt"][0]["content"]))
        assert 1 <= a <= 5 and 1 <= b <= 5 and row["answer"] == a + b
        assert row["solution"][0]["content"] == f"{a} plus {b} makes {a + b}. So the answer is {a + b}."
    plain = toy.math_dataset(n=4, seed=3, conversational=False)[0]
    assert plain["prompt"].startswith("Question: ") and plain["solution"].startswith(" ")


def test_math_reward_scores_the_final_stated_answer():
    rewards = toy.math_reward(
        prompts=[None] * 7,
        completions=[
            "3 plus 4 makes 7. So the answer is 7.",
            "3 plus 4 makes 8. So the answer is 8.",
            "3 plus 4 makes 7. So the answer is 8.",
            "3 plus 4 makes 8. So the answer is 7.",
            [{"role": "assistant", "content": "3 plus 4 makes 7. So the answer is 7."}],
            [{"role": "assistant", "content": "It is 6."}],
            "no number at all",
        ],
        answer=[7, 7, 7, 7, 7, "7", 7],
    )
    assert rewards == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    data = toy.math_dataset(n=16)
    assert toy.math_reward(data["prompt"], data["solution"], data["answer"]) == [1.0] * 16


# ---- the warm model ------------------------------------------------------------------------------------------------


def test_warm_model_prefers_chosen_over_rejected(warm):
    model, tokenizer = warm
    data = toy.preference_dataset(n=48, split="test")
    gaps = [
        _response_logprob(model, tokenizer, row["prompt"], row["chosen"])
        - _response_logprob(model, tokenizer, row["prompt"], row["rejected"])
        for row in data
    ]
    assert sum(gaps) / len(gaps) > 5.0
    assert sum(g > 0 for g in gaps) / len(gaps) > 0.9


def test_sft_stage_raises_chosen_over_the_pretrained_base(warm):
    base, tokenizer = toy.model_and_tokenizer(warmup="pretrain")
    data = toy.preference_dataset(n=24)
    base_logprob = sum(_response_logprob(base, tokenizer, r["prompt"], r["chosen"]) for r in data)
    warm_logprob = sum(_response_logprob(warm[0], tokenizer, r["prompt"], r["chosen"]) for r in data)
    assert warm_logprob > base_logprob + 2.0 * len(data)


def test_warm_model_samples_the_right_sum_about_half_the_time(warm):
    model, tokenizer = warm
    data = toy.math_dataset(n=160, seed=11)
    prompts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in data["prompt"]]
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    accuracy = sum(toy.math_reward(data["prompt"], completions, data["answer"])) / len(data)
    assert 0.25 <= accuracy <= 0.75
    assert sum("So the answer is" in c for c in completions) / len(completions) > 0.9


# ---- TRL trainers --------------------------------------------------------------------------------------------------


def _trainer_args(tmp_path):
    return {
        "output_dir": str(tmp_path),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "bf16": False,
    }


def test_sft_trainer_trains_on_assistant_tokens_only(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = toy.model_and_tokenizer(warmup="pretrain")
    data = toy.preference_dataset(n=8).map(lambda r: {"messages": r["prompt"] + r["chosen"]})
    data = data.select_columns(["messages"])
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(assistant_only_loss=True, **_trainer_args(tmp_path)),
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trained = tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert trained.startswith(tuple(toy_data._OPENERS)) and trained.endswith("<|im_end|>\n")
    trainer.train()


@pytest.mark.parametrize("conversational", [True, False])
def test_dpo_trainer_runs_and_reloads_the_reference_by_path(tmp_path, conversational):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = toy.model_and_tokenizer()
    data = toy.preference_dataset(n=8, conversational=conversational)
    trainer = DPOTrainer(
        model=model, args=DPOConfig(**_trainer_args(tmp_path)), train_dataset=data, processing_class=tokenizer
    )
    assert trainer.ref_model.name_or_path == model.name_or_path
    for a, b in zip(trainer.ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["logps/chosen"] > logs["logps/rejected"]


def test_grpo_trainer_scores_sampled_completions_with_math_reward(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = toy.model_and_tokenizer()
    args = GRPOConfig(
        **{**_trainer_args(tmp_path), "per_device_train_batch_size": 16},
        num_generations=8,
        max_completion_length=24,
        beta=0.04,
        logging_steps=1,
    )
    trainer = GRPOTrainer(
        model=model,
        args=args,
        train_dataset=toy.math_dataset(n=16),
        processing_class=tokenizer,
        reward_funcs=toy.math_reward,
    )
    assert trainer.ref_model.name_or_path == model.name_or_path
    trainer.train()
    assert 0.0 < trainer.state.log_history[0]["reward"] < 1.0
