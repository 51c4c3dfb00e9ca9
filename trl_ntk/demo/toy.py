"""Embedded offline default: a byte-level BPE tokenizer with a ChatML template, a tiny Qwen2 model, and synthetic
preference and arithmetic data with real structure. Built once, warmed up briefly on CPU, and cached on disk, so the
demo, the examples and the tests run with no network and no model hub.

Usage:

```python
from trl import DPOConfig, DPOTrainer
from trl_ntk.demo.toy import model_and_tokenizer, preference_dataset

model, tokenizer = model_and_tokenizer()  # warm model, loaded from its cache folder
trainer = DPOTrainer(model=model, args=DPOConfig(output_dir="out"), train_dataset=preference_dataset(),
                     processing_class=tokenizer)
```
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2ForCausalLM, Qwen2Tokenizer

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
"""Bump when the build changes in a way the recipe hash cannot see (for example the training loop)."""

VOCAB_SIZE = 600
"""Size of the toy tokenizer's vocabulary (256 bytes + BPE merges + 3 special tokens); `len(tokenizer)`."""

MAX_LENGTH = 256
"""`model_max_length` of the tokenizer and `max_position_embeddings` of the model."""

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, no default system message. The assistant's
content and its `<|im_end|>\\n` sit inside `{% generation %}` markers, so TRL's `assistant_only_loss` masks work and
the end-of-turn token is trained."""

PLAIN_PROMPT = "Question: {question}\nAnswer:"
"""Prompt format of the plain-text (non-conversational) variants; the response follows after one space."""

CHOSEN_SLOT_WEIGHTS = (0.45, 0.25, 0.15, 0.10, 0.05)
"""Probabilities of the 5 choices of each response slot (opener, statement, closing) in chosen responses;
rejected responses use them reversed, so their wording is unlikely under a model fine-tuned on chosen."""

# ------------------------------------------------------------------------------------------------------------------
# Facts and wording. `{x}` is the subject, `{y}` the answer. The first 5 statements / openers / closings are the
# preference data's wording; the rest are the "other words" used by rephrases and by the broad pre-training corpus.
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Category:
    name: str
    facts: tuple[tuple[str, str], ...]
    questions: tuple[str, ...]
    statements: tuple[str, ...]
    rephrase_statements: tuple[str, ...]


_CATEGORIES: tuple[_Category, ...] = (
    _Category(
        name="colours",
        facts=(
            ("sky", "blue"),
            ("grass", "green"),
            ("snow", "white"),
            ("coal", "black"),
            ("banana", "yellow"),
            ("tomato", "red"),
            ("carrot", "orange"),
            ("chocolate", "brown"),
            ("lemon", "yellow"),
            ("cloud", "grey"),
            ("leaf", "green"),
            ("milk", "white"),
            ("cherry", "red"),
            ("night", "black"),
            ("sea", "blue"),
            ("plum", "purple"),
            ("pumpkin", "orange"),
            ("flamingo", "pink"),
        ),
        questions=(
            "What colour is the {x}?",
            "Which colour does the {x} have?",
            "Tell me the colour of the {x}.",
            "What is the colour of the {x}?",
        ),
        statements=(
            "the {x} is {y}.",
            "it is {y}.",
            "the colour of the {x} is {y}.",
            "the {x} has the colour {y}.",
            "{y} is the colour of the {x}.",
        ),
        rephrase_statements=("its colour is {y}.", "you will see that the {x} looks {y}.", "a {x} is {y} in colour."),
    ),
    _Category(
        name="sounds",
        facts=(
            ("dog", "barks"),
            ("cat", "meows"),
            ("cow", "moos"),
            ("duck", "quacks"),
            ("lion", "roars"),
            ("sheep", "bleats"),
            ("horse", "neighs"),
            ("pig", "oinks"),
            ("pigeon", "coos"),
            ("snake", "hisses"),
            ("bee", "buzzes"),
            ("frog", "croaks"),
            ("mouse", "squeaks"),
            ("wolf", "howls"),
            ("donkey", "brays"),
            ("crow", "caws"),
            ("hen", "clucks"),
            ("goose", "honks"),
        ),
        questions=(
            "What sound does a {x} make?",
            "Which noise does a {x} make?",
            "How does a {x} sound?",
            "What does a {x} say?",
        ),
        statements=(
            "a {x} {y}.",
            "it {y}.",
            "the {x} {y}.",
            "every {x} {y}.",
            "a {x} usually {y}.",
        ),
        rephrase_statements=("the sound it makes is that it {y}.", "we hear that a {x} {y}.", "mostly it {y}."),
    ),
    _Category(
        name="capitals",
        facts=(
            ("France", "Paris"),
            ("Spain", "Madrid"),
            ("Italy", "Rome"),
            ("Germany", "Berlin"),
            ("Japan", "Tokyo"),
            ("Egypt", "Cairo"),
            ("Peru", "Lima"),
            ("Kenya", "Nairobi"),
            ("Greece", "Athens"),
            ("Norway", "Oslo"),
            ("Poland", "Warsaw"),
            ("Cuba", "Havana"),
            ("Chile", "Santiago"),
            ("Ireland", "Dublin"),
            ("Austria", "Vienna"),
            ("Russia", "Moscow"),
            ("Canada", "Ottawa"),
            ("Portugal", "Lisbon"),
        ),
        questions=(
            "What is the capital of {x}?",
            "Which city is the capital of {x}?",
            "Name the capital of {x}.",
            "Tell me the capital of {x}.",
        ),
        statements=(
            "the capital of {x} is {y}.",
            "it is {y}.",
            "{y} is the capital of {x}.",
            "the capital is {y}.",
            "{x} has {y} as its capital.",
        ),
        rephrase_statements=("its main city is {y}.", "the government of {x} sits in {y}.", "you mean {y}."),
    ),
    _Category(
        name="opposites",
        facts=(
            ("hot", "cold"),
            ("big", "small"),
            ("up", "down"),
            ("fast", "slow"),
            ("light", "dark"),
            ("happy", "sad"),
            ("old", "young"),
            ("open", "closed"),
            ("early", "late"),
            ("full", "empty"),
            ("hard", "soft"),
            ("high", "low"),
            ("rich", "poor"),
            ("strong", "weak"),
            ("wet", "dry"),
            ("loud", "quiet"),
            ("thick", "thin"),
            ("near", "far"),
        ),
        questions=(
            "What is the opposite of {x}?",
            "Which word is the opposite of {x}?",
            "Name the opposite of {x}.",
            "Give me the opposite of {x}.",
        ),
        statements=(
            "the opposite of {x} is {y}.",
            "it is {y}.",
            "{y} is the opposite of {x}.",
            "the word is {y}.",
            "{x} and {y} are opposites.",
        ),
        rephrase_statements=("the reverse of {x} would be {y}.", "think of {y}.", "its antonym is {y}."),
    ),
)

_OPENERS = ("Sure!", "Of course.", "Good question.", "Well,", "Let me see.")
_CLOSINGS = ("Hope that helps.", "Anything else?", "That is all.", "Ask me more.", "Have a nice day.")
_REPHRASE_OPENERS = ("Happy to answer.", "Right, so", "Here you go:")
_REPHRASE_CLOSINGS = ("I am glad to help.", "Feel free to ask again.", "Enjoy your day.")

_MATH_MAX_OPERAND = 5
"""Operands of the arithmetic task are drawn from `1 .. _MATH_MAX_OPERAND`."""

_MATH_QUESTIONS = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "How much is {a} plus {b}?")
_MATH_SOLUTION = "{a} plus {b} makes {c}. So the answer is {c}."
_ANSWER_PATTERN = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)
_INTEGER_PATTERN = re.compile(r"-?\d+")

# ------------------------------------------------------------------------------------------------------------------
# Warm-up recipe. Everything that changes the built artefacts goes into the cache folder's hash.
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WarmupRecipe:
    """Model shape and warm-up hyper-parameters (AdamW, linear decay to 0, gradient clipping at 1)."""

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tokenizer_documents: int = 3000
    pretrain_documents: int = 4000
    pretrain_math_fraction: float = 0.3
    pretrain_plain_fraction: float = 0.15
    pretrain_correct_fraction: float = 0.5
    pretrain_epochs: int = 2
    pretrain_batch_size: int = 32
    pretrain_lr: float = 2e-3
    sft_epochs: int = 6
    sft_batch_size: int = 16
    sft_lr: float = 1e-3
    sft_math_examples: int = 220
    weight_decay: float = 0.0


_RECIPE = _WarmupRecipe()

Stage = Literal["random", "pretrain", "sft"]
_STAGES: tuple[Stage, ...] = ("random", "pretrain", "sft")
_DONE_MARKER = "BUILD_COMPLETE"
_IN_PROCESS_LOCK = threading.Lock()
"""Serializes build and load across threads: `from_pretrained` toggles process-global initialization flags, and two
threads loading at once can leave them wrong (later models then come out untied)."""


# ------------------------------------------------------------------------------------------------------------------
# Text generation shared by the datasets and the warm-up corpus.
# ------------------------------------------------------------------------------------------------------------------


def _response(opener: str, statement: str, closing: str, subject: str, answer: str) -> str:
    """Opener + statement + closing, e.g. `"Sure! The sky is blue. Hope that helps."`; the statement (written
    lower-case first) is capitalized unless the opener runs into it (`"Well, the sky is blue."`)."""
    body = statement.format(x=subject, y=answer)
    if not opener.endswith((",", ":", " so")):
        body = body[0].upper() + body[1:]
    return f"{opener} {body} {closing}"


def _split_of(category_index: int, fact_index: int, question_index: int) -> Literal["train", "test"]:
    """Held-out design: for each fact one of the 4 question phrasings is a test prompt, the other 3 train prompts."""
    return "test" if question_index == (fact_index + category_index) % 4 else "train"


def _prompt_pool(split: Literal["train", "test"]) -> list[tuple[int, int, int]]:
    """All (category, fact, question) index triples of one split, in a fixed order."""
    return [
        (c, f, q)
        for c, category in enumerate(_CATEGORIES)
        for f in range(len(category.facts))
        for q in range(len(category.questions))
        if _split_of(c, f, q) == split
    ]


def _wrong_answer(rng: random.Random, category: _Category, fact_index: int) -> str:
    """A different answer of the same category (never equal to the correct one)."""
    correct = category.facts[fact_index][1]
    return rng.choice(sorted({answer for _, answer in category.facts} - {correct}))


def _weighted(rng: random.Random, options: Sequence[str], weights: Sequence[float]) -> str:
    return rng.choices(options, weights=weights, k=1)[0]


def _plain_prompt(question: str) -> str:
    return PLAIN_PROMPT.format(question=question)


def _messages(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def _preference_row(rng: random.Random, c: int, f: int, q: int, conversational: bool) -> dict[str, Any]:
    category = _CATEGORIES[c]
    subject, answer = category.facts[f]
    wrong = _wrong_answer(rng, category, f)
    rejected_weights = CHOSEN_SLOT_WEIGHTS[::-1]
    pools = (_OPENERS, category.statements, _CLOSINGS)
    rephrase_pools = (_REPHRASE_OPENERS, category.rephrase_statements, _REPHRASE_CLOSINGS)
    chosen_slots = [_weighted(rng, pool, CHOSEN_SLOT_WEIGHTS) for pool in pools]
    rejected_slots = [_weighted(rng, pool, rejected_weights) for pool in pools]
    rephrase_slots = [rng.choice(pool) for pool in rephrase_pools]
    rejected_rephrase_slots = [rng.choice(pool) for pool in rephrase_pools]
    question = category.questions[q].format(x=subject)
    responses = {
        "chosen": _response(*chosen_slots, subject, answer),
        "rejected": _response(*rejected_slots, subject, wrong),
        "chosen_rephrase": _response(*rephrase_slots, subject, answer),
        "rejected_rephrase": _response(*rejected_rephrase_slots, subject, wrong),
        "chosen_swapped": _response(*chosen_slots, subject, wrong),
    }
    if conversational:
        row: dict[str, Any] = {"prompt": _messages("user", question)}
        row.update({name: _messages("assistant", text) for name, text in responses.items()})
    else:
        row = {"prompt": _plain_prompt(question)}
        row.update({name: " " + text for name, text in responses.items()})
    row.update({"category": category.name, "subject": subject, "answer": answer, "wrong_answer": wrong})
    return row


def preference_dataset(
    n: int | None = None,
    seed: int = 0,
    split: Literal["train", "test"] = "train",
    conversational: bool = True,
) -> Dataset:
    """Synthetic preference data over 4 fact categories (colours, animal sounds, capitals, opposites).

    Every prompt asks one fact (18 per category) in one of 4 phrasings; for each fact one phrasing is held out, so
    the `"test"` split (72 prompts) shares no prompt with the `"train"` split (216 prompts), only the facts. A response
    is opener + statement + closing, 5 choices per slot:

    - `chosen`: the correct answer, slot choices drawn with probabilities `CHOSEN_SLOT_WEIGHTS` (.45/.25/.15/.10/.05);
    - `rejected`: a wrong answer of the same category, slots drawn from the reversed distribution, so it has much
      lower log-prob than `chosen` under a model fine-tuned on chosen responses;
    - `chosen_rephrase` / `rejected_rephrase`: the correct / the rejected (wrong) answer in other words (openers,
      statements and closings outside the preference wording; seen only in the broad pre-training corpus);
    - `chosen_swapped`: `chosen` word for word with only the answer replaced by the rejected one's wrong answer.

    Args:
        n (`int`, *optional*): number of rows; defaults to one row per prompt of the split. Prompts are taken in a
            seeded random order and cycled when `n` exceeds the split's size (each row draws its own responses).
        seed (`int`, *optional*, defaults to `0`): the dataset is a deterministic function of `(n, seed, split)`.
        split (`str`, *optional*, defaults to `"train"`): `"train"` or `"test"`.
        conversational (`bool`, *optional*, defaults to `True`): `True`: `prompt` is `[{"role": "user", ...}]` and
            every response column is `[{"role": "assistant", ...}]` (TRL's conversational preference format). `False`:
            plain strings, `prompt = "Question: ...\\nAnswer:"` and responses starting with a space.

    Returns:
        `datasets.Dataset` with columns `prompt, chosen, rejected, chosen_rephrase, rejected_rephrase,
        chosen_swapped` and the metadata columns `category, subject, answer, wrong_answer`.
    """
    from datasets import Dataset

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pool = _prompt_pool(split)
    n = len(pool) if n is None else n
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(f"preference-{split}-{seed}")
    order: list[tuple[int, int, int]] = []
    while len(order) < n:
        order.extend(rng.sample(pool, len(pool)))
    rows = [_preference_row(rng, c, f, q, conversational) for c, f, q in order[:n]]
    return Dataset.from_list(rows)


def _math_row(rng: random.Random, conversational: bool) -> dict[str, Any]:
    a = rng.randint(1, _MATH_MAX_OPERAND)
    b = rng.randint(1, _MATH_MAX_OPERAND)
    question = rng.choice(_MATH_QUESTIONS).format(a=a, b=b)
    solution = _MATH_SOLUTION.format(a=a, b=b, c=a + b)
    if conversational:
        return {"prompt": _messages("user", question), "solution": _messages("assistant", solution), "answer": a + b}
    return {"prompt": _plain_prompt(question), "solution": " " + solution, "answer": a + b}


def math_dataset(n: int = 256, seed: int = 0, conversational: bool = True) -> Dataset:
    """Prompt-only arithmetic data for GRPO: `"What is 3 plus 4?"` with operands in `1 .. 5`.

    The reference solution is a short worked answer, `"3 plus 4 makes 7. So the answer is 7."`: the answer is stated
    and then restated, so a right and a wrong completion share structure *after* the token where they diverge
    (the room a negative gradient needs to displace the right answer's likelihood). The warm model samples the right
    answer roughly half the time at temperature 1 (48-53 % over 400 samples; each of the 25 operand pairs is right
    between 2 and 7 times out of 8), so most GRPO groups are mixed. A completion is 16-18 tokens with `<|im_end|>`
    (digits are single tokens): `max_completion_length >= 18` keeps the restated answer.

    Args:
        n (`int`, *optional*, defaults to `256`): number of rows (the 25 operand pairs x 4 phrasings repeat).
        seed (`int`, *optional*, defaults to `0`): the dataset is a deterministic function of `(n, seed)`.
        conversational (`bool`, *optional*, defaults to `True`): `prompt = [{"role": "user", ...}]` and
            `solution = [{"role": "assistant", ...}]`; `False`: plain strings as in `preference_dataset`.

    Returns:
        `datasets.Dataset` with columns `prompt`, `solution` (reference answer, for SFT warm-up and as a probe) and
        `answer` (`int`, passed by TRL to `math_reward`).
    """
    from datasets import Dataset

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(f"math-{seed}")
    return Dataset.from_list([_math_row(rng, conversational) for _ in range(n)])


def _completion_text(completion: Any) -> str:
    """Text of one completion: a string, or the concatenated contents of a list of message dicts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, Sequence):
        return " ".join(_completion_text(message) for message in completion)
    raise TypeError(f"a completion must be a string or a list of message dicts, got {type(completion).__name__}")


def final_answer(text: str) -> int | None:
    """The final stated answer of a completion: the last `"answer is N"`, else the last integer, else `None`."""
    stated = _ANSWER_PATTERN.findall(text)
    if stated:
        return int(stated[-1])
    numbers = _INTEGER_PATTERN.findall(text)
    return int(numbers[-1]) if numbers else None


def math_reward(prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float]:
    """TRL reward function for `math_dataset`: 1.0 when the completion's final stated answer equals `answer`.

    Args:
        prompts (`list`): unused (TRL passes them).
        completions (`list`): strings, or lists of message dicts (conversational completions).
        answer (`list[int | str]`): the `answer` column, one per completion.

    Returns:
        `list[float]` of 0.0 / 1.0, one per completion.
    """
    if len(completions) != len(answer):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        stated = final_answer(_completion_text(completion))
        rewards.append(1.0 if stated is not None and stated == int(expected) else 0.0)
    return rewards


# ------------------------------------------------------------------------------------------------------------------
# Warm-up corpora.
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Document:
    """One training sequence: a prompt (no loss) and a response (loss), both already rendered as text."""

    prompt: str
    response: str


def _render(question: str, response: str, plain: bool) -> _Document:
    if plain:
        return _Document(_plain_prompt(question), " " + response + IM_END)
    return _Document(f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n", f"{response}{IM_END}\n")


def _pretrain_documents(recipe: _WarmupRecipe, count: int, seed: str) -> list[_Document]:
    """The broad corpus: uniform slot choices over all wording (preference and rephrase pools), half the answers
    wrong, facts and arithmetic, chat and plain formats; only train-split prompts."""
    rng = random.Random(seed)
    pool = _prompt_pool("train")
    openers, closings = _OPENERS + _REPHRASE_OPENERS, _CLOSINGS + _REPHRASE_CLOSINGS
    documents = []
    for _ in range(count):
        plain = rng.random() < recipe.pretrain_plain_fraction
        correct = rng.random() < recipe.pretrain_correct_fraction
        if rng.random() < recipe.pretrain_math_fraction:
            a, b = rng.randint(1, _MATH_MAX_OPERAND), rng.randint(1, _MATH_MAX_OPERAND)
            c = a + b if correct else rng.choice([s for s in range(2, 2 * _MATH_MAX_OPERAND + 1) if s != a + b])
            question = rng.choice(_MATH_QUESTIONS).format(a=a, b=b)
            response = _MATH_SOLUTION.format(a=a, b=b, c=c)
        else:
            ci, fi, qi = rng.choice(pool)
            category = _CATEGORIES[ci]
            subject, answer = category.facts[fi]
            if not correct:
                answer = _wrong_answer(rng, category, fi)
            statement = rng.choice(category.statements + category.rephrase_statements)
            question = category.questions[qi].format(x=subject)
            response = _response(rng.choice(openers), statement, rng.choice(closings), subject, answer)
        documents.append(_render(question, response, plain))
    return documents


def _sft_documents(recipe: _WarmupRecipe, epoch: int) -> list[_Document]:
    """One epoch of SFT: a fresh chosen response for every train prompt plus correct worked arithmetic."""
    rng = random.Random(f"sft-{recipe.seed}-{epoch}")
    documents = []
    for ci, fi, qi in _prompt_pool("train"):
        row = _preference_row(rng, ci, fi, qi, conversational=True)
        documents.append(_render(row["prompt"][0]["content"], row["chosen"][0]["content"], plain=False))
    for _ in range(recipe.sft_math_examples):
        row = _math_row(rng, conversational=True)
        documents.append(_render(row["prompt"][0]["content"], row["solution"][0]["content"], plain=False))
    rng.shuffle(documents)
    return documents


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer and model.
# ------------------------------------------------------------------------------------------------------------------


def _train_tokenizer(recipe: _WarmupRecipe) -> Qwen2Tokenizer:
    """Byte-level BPE with `VOCAB_SIZE` entries trained on the synthetic corpus, as a `Qwen2Tokenizer`.

    The normalizer (NFC) and pre-tokenizer (Qwen2's split regex, one token per digit, then byte-level) are Qwen2's
    own, because `AutoTokenizer` rebuilds a `Qwen2Tokenizer` from the saved vocabulary and merges for a folder whose
    model is a Qwen2: training with anything else would tokenize differently after a save / load round trip.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _pretrain_documents(recipe, recipe.tokenizer_documents, seed=f"tokenizer-{recipe.seed}")
    texts = [doc.prompt + doc.response for doc in corpus]
    texts += [row for split in ("train", "test") for row in _all_preference_text(split)]
    backend.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        unk_token=PAD_TOKEN,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START],
        model_max_length=MAX_LENGTH,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"the toy tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}; grow the corpus")
    return tokenizer


def _all_preference_text(split: Literal["train", "test"]) -> Iterator[str]:
    """Questions and every kind of response of one split, so no probe text falls back to raw bytes."""
    for row in preference_dataset(seed=0, split=split, conversational=False):
        yield row["prompt"] + "".join(row[name] for name in ("chosen", "rejected", "chosen_rephrase"))


def tiny_random_model(
    arch: Literal["qwen2", "llama"] = "qwen2",
    tie_word_embeddings: bool = True,
    vocab_size: int = VOCAB_SIZE,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture, in memory, eager attention, float32.

    Defaults give the toy's shape (about 0.37M parameters for `vocab_size=600`), with `pad_token_id = 0` and
    `eos_token_id = 2` (the toy tokenizer's `<|endoftext|>` and `<|im_end|>`), `max_position_embeddings = MAX_LENGTH`.

    Args:
        arch (`str`, *optional*, defaults to `"qwen2"`): `"qwen2"` (`Qwen2ForCausalLM`, q/k/v biases) or `"llama"`
            (`LlamaForCausalLM`, no biases).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`): share the input embedding and the LM head.
        vocab_size (`int`, *optional*, defaults to `VOCAB_SIZE`): rows of the embedding.
        seed (`int`, *optional*, defaults to `0`): `torch.manual_seed` for the initialisation (global RNG restored).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_class, model_class = classes[arch]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def _build_random_model(recipe: _WarmupRecipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    model = tiny_random_model(
        arch="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        seed=recipe.seed,
    )
    for config in (model.config, model.generation_config):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return model


# ------------------------------------------------------------------------------------------------------------------
# Warm-up training: a plain torch loop (faster on CPU than a Trainer for a model this small).
# ------------------------------------------------------------------------------------------------------------------


def _encode(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[_Document], loss_on_prompt: bool
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per document; labels are -100 on the prompt unless `loss_on_prompt`."""
    encoded = []
    for doc in documents:
        prompt_ids = tokenizer(doc.prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(doc.response, add_special_tokens=False)["input_ids"]
        input_ids = prompt_ids + response_ids
        labels = input_ids if loss_on_prompt else [-100] * len(prompt_ids) + response_ids
        encoded.append((input_ids[:MAX_LENGTH], labels[:MAX_LENGTH]))
    return encoded


def _batches(
    encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_token_id: int, rng: random.Random
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled, right-padded batches: `input_ids`, `attention_mask`, `labels`, each `[B, T]`."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, targets) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(targets)
            attention_mask[row, : len(ids)] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _train(
    model: PreTrainedModel,
    epochs: Sequence[Sequence[tuple[list[int], list[int]]]],
    batch_size: int,
    lr: float,
    weight_decay: float,
    pad_token_id: int,
    seed: str,
) -> float:
    """AdamW with a linear decay to 0 over all steps; returns the mean loss of the last epoch."""
    rng = random.Random(seed)
    total_steps = sum(math.ceil(len(epoch) / batch_size) for epoch in epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    model.train()
    last_losses: list[float] = []
    for encoded in epochs:
        last_losses = []
        for batch in _batches(encoded, batch_size, pad_token_id, rng):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_losses.append(loss.item())
    model.eval()
    return sum(last_losses) / max(len(last_losses), 1)


def _pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: _WarmupRecipe) -> None:
    documents = _pretrain_documents(recipe, recipe.pretrain_documents, seed=f"pretrain-{recipe.seed}")
    encoded = _encode(tokenizer, documents, loss_on_prompt=True)
    loss = _train(
        model,
        [encoded] * recipe.pretrain_epochs,
        recipe.pretrain_batch_size,
        recipe.pretrain_lr,
        recipe.weight_decay,
        tokenizer.pad_token_id,
        seed=f"pretrain-order-{recipe.seed}",
    )
    logger.info("toy pre-training done: last-epoch loss %.3f", loss)


def _sft(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: _WarmupRecipe) -> None:
    epochs = [_encode(tokenizer, _sft_documents(recipe, e), loss_on_prompt=False) for e in range(recipe.sft_epochs)]
    loss = _train(
        model,
        epochs,
        recipe.sft_batch_size,
        recipe.sft_lr,
        recipe.weight_decay,
        tokenizer.pad_token_id,
        seed=f"sft-order-{recipe.seed}",
    )
    logger.info("toy SFT done: last-epoch loss %.3f", loss)


# ------------------------------------------------------------------------------------------------------------------
# Cache.
# ------------------------------------------------------------------------------------------------------------------


def _recipe_hash(recipe: _WarmupRecipe) -> str:
    """Hash of everything the build depends on: recipe, vocabulary size, template, wording, facts, versions."""
    import transformers

    payload = {
        "version": RECIPE_VERSION,
        "recipe": recipe.__dict__,
        "vocab_size": VOCAB_SIZE,
        "max_length": MAX_LENGTH,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
        "plain_prompt": PLAIN_PROMPT,
        "slot_weights": CHOSEN_SLOT_WEIGHTS,
        "categories": [c.__dict__ for c in _CATEGORIES],
        "wording": [_OPENERS, _CLOSINGS, _REPHRASE_OPENERS, _REPHRASE_CLOSINGS],
        "math": [_MATH_MAX_OPERAND, _MATH_QUESTIONS, _MATH_SOLUTION],
        "transformers_major": transformers.__version__.split(".")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """`$TRL_NTK_CACHE` if set, else `~/.cache/trl_ntk`."""
    return Path(os.environ.get("TRL_NTK_CACHE") or Path.home() / ".cache" / "trl_ntk")


def toy_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the current recipe's build: `<cache_dir>/toy-v<RECIPE_VERSION>-<hash>`, one subfolder per stage."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"toy-v{RECIPE_VERSION}-{_recipe_hash(_RECIPE)}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX `flock`); elsewhere builders race and the atomic rename keeps one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Build on one intra-op thread, restoring the caller's setting after. The model's matrices are too small for
    intra-op parallelism to pay: on a shared 2-core machine 2 threads made the warm-up about 10x slower than 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _is_built(folder: Path, stage: Stage) -> bool:
    return (folder / stage / _DONE_MARKER).exists()


def _load(path: Path) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """`(model, tokenizer)` from one stage folder: eager attention, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _save_stage(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, stage: Stage) -> None:
    """Write one stage atomically: into a temporary sibling folder, then rename it into place with its marker."""
    target = folder / stage
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=folder))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps({"stage": stage, "recipe": folder.name}))
        if target.exists():  # left by an interrupted build, without its marker
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(folder: Path, stage: Stage) -> None:
    """Build every stage up to `stage` that is not on disk yet, each from the previous stage's saved folder, so a
    stage's weights do not depend on which stages an earlier call happened to build."""
    recipe = _RECIPE
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _single_thread(), torch.random.fork_rng(devices=[]):
        if not _is_built(folder, "random"):
            torch.manual_seed(recipe.seed)
            tokenizer = _train_tokenizer(recipe)
            _save_stage(_build_random_model(recipe, tokenizer), tokenizer, folder, "random")
        training = {"pretrain": _pretrain, "sft": _sft}
        for previous, current in zip(_STAGES[: _STAGES.index(stage)], _STAGES[1 : _STAGES.index(stage) + 1]):
            if _is_built(folder, current):
                continue
            model, tokenizer = _load(folder / previous)
            torch.manual_seed(recipe.seed)
            training[current](model, tokenizer, recipe)
            _save_stage(model, tokenizer, folder, current)
    logger.info("toy model up to stage %r ready in %s (%.1f s)", stage, folder, time.perf_counter() - start)


def _stage_of(warmup: bool | str) -> Stage:
    if warmup is True or warmup == "sft":
        return "sft"
    if warmup is False or warmup == "random":
        return "random"
    if warmup == "pretrain":
        return "pretrain"
    raise ValueError(f"warmup must be True, False, 'pretrain', 'sft' or 'random', got {warmup!r}")


def model_and_tokenizer(
    cache_dir: str | os.PathLike[str] | None = None,
    warmup: bool | Literal["random", "pretrain", "sft"] = True,
) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """The toy tiny Qwen2 model and its tokenizer, built once, cached on disk and loaded from their folder.

    The build (first call for a recipe: about 30 s on one free CPU core, 45 s on a busy shared one; later calls load
    in tens of milliseconds) trains a 600-token byte-level BPE tokenizer with a ChatML template on the synthetic
    corpus, creates a Qwen2 model (hidden 128, 2 layers, 4 heads / 2 KV heads, intermediate 256, tied embeddings,
    372,864 parameters) and warms it up:

    1. `"pretrain"`: 2 epochs of language modelling on 4,000 broad documents (uniform wording over all word pools,
       half of the answers wrong, facts and arithmetic, chat and plain formats);
    2. `"sft"`: 6 epochs of completion-only SFT on `chosen`-distributed responses to the train prompts and on correct
       worked arithmetic. Under this model `rejected` has far lower log-prob than `chosen` (mean summed log-prob
       -6.4 vs -16.0 on the train split; the pre-trained base: -12.2 vs -14.7), and arithmetic sampled at
       temperature 1 is right about half of the time.

    Each stage is saved with the tokenizer to `toy_cache_path(cache_dir) / stage` (atomic rename, inter-process
    lock) and loaded with `from_pretrained(path)`, so `model.name_or_path` is that folder and trainers that reload the
    model by path (DPO's implicit reference, GRPO with `beta > 0`) get the same weights.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): root of the cache; defaults to `$TRL_NTK_CACHE` or
            `~/.cache/trl_ntk`. The build lives in a subfolder named after `RECIPE_VERSION` and a hash of the recipe,
            so recipe changes never load stale weights.
        warmup (`bool` or `str`, *optional*, defaults to `True`): which stage to load. `True` / `"sft"`: the warm
            model; `"pretrain"`: the pre-trained base before SFT (start the SFT demo here); `False` / `"random"`: the
            random initialisation (same tokenizer).

    Returns:
        `(model, tokenizer)`: a `Qwen2ForCausalLM` in eval mode with eager attention, float32, on CPU, and a
        `Qwen2Tokenizer`, a `PreTrainedTokenizerFast` (eos `<|im_end|>`, pad `<|endoftext|>`, no bos, right padding,
        `model_max_length = 256`, ChatML `chat_template` with generation markers).
    """
    stage = _stage_of(warmup)
    folder = toy_cache_path(cache_dir)
    with _IN_PROCESS_LOCK:
        if not _is_built(folder, stage):
            with _file_lock(folder.parent / f"{folder.name}.lock"):
                if not _is_built(folder, stage):
                    _build(folder, stage)
        return _load(folder / stage)
