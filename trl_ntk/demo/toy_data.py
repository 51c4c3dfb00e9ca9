"""The toy's synthetic data: facts and wording, the preference and arithmetic datasets, the arithmetic reward, and
the warm-up corpora (pre-training, SFT, tokenizer training)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from trl_ntk.demo.toy_tokenizer import IM_END, IM_START

if TYPE_CHECKING:
    from datasets import Dataset

    from trl_ntk.demo.toy_model import _WarmupRecipe

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
    return rewards_by_final_answer(completions, answer, final_answer)


def rewards_by_final_answer(
    completions: Sequence[Any], answer: Sequence[Any], parse: Callable[[str], int | None]
) -> list[float]:
    """`[1.0 if parse(text) == int(expected) else 0.0]` per completion (message lists are joined into text; a
    completion `parse` finds no answer in gets 0.0)."""
    if len(completions) != len(answer):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        stated = parse(_completion_text(completion))
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


def _all_preference_text(split: Literal["train", "test"]) -> Iterator[str]:
    """Questions and every kind of response of one split, so no probe text falls back to raw bytes."""
    for row in preference_dataset(seed=0, split=split, conversational=False):
        yield row["prompt"] + "".join(row[name] for name in ("chosen", "rejected", "chosen_rephrase"))


def tokenizer_corpus(recipe: _WarmupRecipe) -> list[str]:
    """The texts the toy tokenizer is trained on: a broad pre-training-like corpus, then every question and kind of
    response of both preference splits (so no probe text falls back to raw bytes)."""
    corpus = _pretrain_documents(recipe, recipe.tokenizer_documents, seed=f"tokenizer-{recipe.seed}")
    texts = [doc.prompt + doc.response for doc in corpus]
    texts += [row for split in ("train", "test") for row in _all_preference_text(split)]
    return texts
