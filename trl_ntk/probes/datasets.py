"""Probe sets drawn from TRL datasets: preference (`prompt`/`chosen`/`rejected`), prompt-only, prompt-completion,
conversational and plain-text language modeling; each prompt gets the responses its row and the other rows give.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from trl_ntk.probes.probe_set import ProbeSet
from trl_ntk.probes.responses import PromptLike, is_conversation

logger = logging.getLogger(__name__)

_DATASET_RESPONSE_COLUMNS = ("chosen_rephrase", "rejected_rephrase", "chosen_swapped")
_REFERENCE_COLUMNS = ("completion", "solution")  # reference-answer columns found without `response_column`
_IRRELEVANT_DRAWS = 8  # attempts at drawing another row whose answer differs from this row's


def preference_probes(
    dataset: Any,
    tokenizer: Any = None,
    *,
    num_prompts: int = 8,
    seed: int = 0,
    test_dataset: Any = None,
    max_length: int | None = None,
) -> ProbeSet:
    """The probes of `ProbeSet.from_preference_dataset` (documented there)."""
    eos_token = getattr(tokenizer, "eos_token", None)
    rows = _PreferenceRows(dataset, eos_token)
    test_rows = None if test_dataset is None else _PreferenceRows(test_dataset, eos_token)
    probe_set = ProbeSet()
    for index in _draw_indices(len(rows), num_prompts, seed):
        rng = random.Random(f"{seed}-{index}")
        row = rows[index]
        prompt_id = f"p{index}"
        probe_set.add(prompt_id, "chosen", row["chosen"], prompt=row["prompt"])
        probe_set.add(prompt_id, "rejected", row["rejected"])
        for kind in _DATASET_RESPONSE_COLUMNS:
            if row.get(kind):
                probe_set.add(prompt_id, kind, _strip_prompt(row[kind], row["prompt"]))
        irrelevant = _irrelevant_answer(rows, index, row["chosen"], rng)
        if irrelevant is not None:
            probe_set.add(prompt_id, "irrelevant_train", irrelevant)
        held_out = _held_out_answer(test_rows, rng)
        if held_out is not None:
            probe_set.add(prompt_id, "irrelevant_test", held_out)
        _add_shuffled(probe_set, prompt_id, "shuffled_chosen", row["chosen"], rng)
        if irrelevant is not None:
            _add_shuffled(probe_set, prompt_id, "shuffled_irrelevant", irrelevant, rng)
    if tokenizer is not None:
        probe_set.encode(tokenizer, max_length=max_length)
    return probe_set


def prompt_probes(
    dataset: Any,
    tokenizer: Any = None,
    *,
    num_prompts: int = 8,
    seed: int = 0,
    response_column: str | None = None,
    test_dataset: Any = None,
    max_length: int | None = None,
) -> ProbeSet:
    """The probes of `ProbeSet.from_prompts` (documented there)."""
    eos_token = getattr(tokenizer, "eos_token", None)
    rows = _PromptRows(dataset, response_column, eos_token)
    test_rows = None if test_dataset is None else _PromptRows(test_dataset, response_column, eos_token)
    probe_set = ProbeSet()
    for index in _draw_indices(len(rows), num_prompts, seed):
        rng = random.Random(f"{seed}-{index}")
        prompt, reference = rows[index]
        prompt_id = f"p{index}"
        probe_set.add_prompt(prompt_id, prompt)
        if reference is None:
            continue
        probe_set.add(prompt_id, "completion", reference)
        irrelevant = _irrelevant_answer(rows, index, reference, rng)
        if irrelevant is not None:
            probe_set.add(prompt_id, "irrelevant_train", irrelevant)
        held_out = _held_out_answer(test_rows, rng)
        if held_out is not None:
            probe_set.add(prompt_id, "irrelevant_test", held_out)
        _add_shuffled(probe_set, prompt_id, "shuffled_completion", reference, rng)
        if irrelevant is not None:
            _add_shuffled(probe_set, prompt_id, "shuffled_irrelevant", irrelevant, rng)
    if tokenizer is not None and len(probe_set) > 0:
        probe_set.encode(tokenizer, max_length=max_length)
    return probe_set


def _dataset_length(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError as error:
        raise TypeError(
            "probes are drawn from a dataset with a length (datasets.Dataset or a list of dicts); materialize an "
            "IterableDataset first, e.g. Dataset.from_list(list(iterable.take(n)))"
        ) from error


class _PreferenceRows:
    """Rows of a preference dataset with an explicit prompt (TRL's `extract_prompt` for implicit ones)."""

    def __init__(self, dataset: Any, eos_token: str | None) -> None:
        self.dataset = dataset
        self.eos_token = eos_token
        self.length = _dataset_length(dataset)
        if self.length:
            first = dict(dataset[0])
            missing = {"chosen", "rejected"} - set(first)
            if missing:
                raise ValueError(
                    f"a preference dataset needs 'chosen' and 'rejected' columns (and usually 'prompt'); missing "
                    f"{sorted(missing)}, found {sorted(first)}"
                )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = dict(self.dataset[index])
        if "prompt" not in row:
            from trl import extract_prompt

            row.update(extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]}))
        for column in ("chosen", "rejected", *_DATASET_RESPONSE_COLUMNS):
            if column in row:
                row[column] = _without_eos(row[column], self.eos_token)
        return row

    def reference(self, index: int) -> PromptLike | None:
        return self[index]["chosen"]


class _PromptRows:
    """Rows of a prompt-only, prompt-completion, messages or text dataset, as `(prompt, reference or None)`."""

    def __init__(self, dataset: Any, response_column: str | None, eos_token: str | None) -> None:
        self.dataset = dataset
        self.eos_token = eos_token
        self.response_column = response_column
        self.length = _dataset_length(dataset)
        if self.length:
            first = dict(dataset[0])
            if response_column is not None and response_column not in first:
                raise ValueError(f"response_column {response_column!r} is not a column; found {sorted(first)}")
            if not {"prompt", "messages", "conversations", "text"} & set(first) and response_column is None:
                raise ValueError(
                    "a prompt dataset needs a 'prompt' column (prompt-only or prompt-completion), 'messages' or "
                    f"'conversations' (conversational language modeling) or 'text'; found {sorted(first)}"
                )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[PromptLike, PromptLike | None]:
        row = dict(self.dataset[index])
        if "prompt" in row:
            column = self.response_column or next((c for c in _REFERENCE_COLUMNS if c in row), None)
            reference = row.get(column) if column else None
            if isinstance(reference, int | float) and not isinstance(reference, bool):
                reference = str(reference)
            if reference is not None and isinstance(reference, str) and is_conversation(row["prompt"]):
                reference = [{"role": "assistant", "content": reference}]
            return row["prompt"], _without_eos(reference, self.eos_token) or None
        if "messages" in row or "conversations" in row:
            from trl import maybe_convert_to_chatml

            messages = maybe_convert_to_chatml(row)["messages"]
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise ValueError(
                    f"row {index}: a conversational language-modeling row must end with an assistant message after at "
                    f"least one other message; its roles are {[m['role'] for m in messages]}"
                )
            return list(messages[:-1]), [messages[-1]]
        return "", _without_eos(row[self.response_column or "text"], self.eos_token) or None

    def reference(self, index: int) -> PromptLike | None:
        return self[index][1]


def _without_eos(value: Any, eos_token: str | None) -> Any:
    """A plain-text response without the eos token a trainer's dataset preparation appended (`encode` re-appends
    it), so that shuffling never moves it inside the text."""
    if eos_token and isinstance(value, str) and value.endswith(eos_token):
        return value[: -len(eos_token)]
    return value


def _draw_indices(length: int, num_prompts: int, seed: int) -> list[int]:
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if length == 0:
        raise ValueError("cannot draw probes from an empty dataset")
    return sorted(random.Random(seed).sample(range(length), min(num_prompts, length)))


def _irrelevant_answer(
    rows: _PreferenceRows | _PromptRows, index: int, answer: PromptLike, rng: random.Random
) -> PromptLike | None:
    """The reference answer of another row, preferring one that differs from `answer`; `None` when there is none."""
    if len(rows) < 2:
        logger.warning("the dataset has one row: no irrelevant_train probe for prompt p%d", index)
        return None
    candidate = None
    for _ in range(_IRRELEVANT_DRAWS):
        other = rng.randrange(len(rows) - 1)
        other += other >= index
        candidate = rows.reference(other)
        if candidate is not None and candidate != answer:
            return candidate
    return candidate


def _held_out_answer(rows: _PreferenceRows | _PromptRows | None, rng: random.Random) -> PromptLike | None:
    """The reference answer of a random held-out row (`None` without held-out rows or references)."""
    if rows is None or len(rows) == 0:
        return None
    for _ in range(_IRRELEVANT_DRAWS):
        answer = rows.reference(rng.randrange(len(rows)))
        if answer is not None:
            return answer
    return None


def _strip_prompt(value: PromptLike, prompt: PromptLike) -> PromptLike:
    """An implicit-prompt column value without the prompt (as `extract_prompt` strips `chosen`)."""
    if isinstance(value, list) and isinstance(prompt, list) and value[: len(prompt)] == prompt:
        return value[len(prompt) :]
    if isinstance(value, str) and isinstance(prompt, str) and prompt and value.startswith(prompt):
        return value[len(prompt) :]
    return value


def _shuffle_words(text: str, rng: random.Random) -> str:
    """The words of `text` in a random order (a different one when possible), outer whitespace kept."""
    words = text.split()
    shuffled = list(words)
    if len(set(words)) > 1:
        while shuffled == words:
            rng.shuffle(shuffled)
    leading = text[: len(text) - len(text.lstrip())]
    trailing = text[len(text.rstrip()) :]
    return leading + " ".join(shuffled) + trailing


def _shuffled_response(response: PromptLike, rng: random.Random) -> PromptLike:
    if isinstance(response, str):
        return _shuffle_words(response, rng)
    shuffled = []
    for message in response:
        if not isinstance(message.get("content"), str):
            raise ValueError(f"cannot shuffle the words of a message whose content is not text: {message!r}")
        shuffled.append({**message, "content": _shuffle_words(message["content"], rng)})
    return shuffled


def _add_shuffled(probe_set: ProbeSet, prompt_id: str, kind: str, response: PromptLike, rng: random.Random) -> None:
    shuffled = _shuffled_response(response, rng)
    if shuffled == response:
        logger.info("no %s probe for prompt %s: its words cannot be reordered", kind, prompt_id)
        return
    probe_set.add(prompt_id, kind, shuffled)


def default_probes(
    dataset: Any,
    tokenizer: Any,
    *,
    preference: bool,
    num_prompts: int,
    seed: int,
    generate: bool,
    test_dataset: Any = None,
) -> ProbeSet:
    """The probes `LearningDynamicsCallback` tracks when it is given none, drawn from the trainer's train dataset.

    Preference data (DPO): `preference_probes`. Anything else (SFT, GRPO): `prompt_probes`, whose prompts carry the
    reference answer of a `completion` / `solution` column when the dataset has one. A GRPO prompt-only dataset (no
    such column) gives prompts without fixed responses: the callback then tracks the model's own greedy (and
    `num_samples` sampled) responses to them, regenerated at every scoring step, which needs `generate=True`.

    Raises:
        `ValueError`: no dataset, or prompts without any response while `generate=False` (nothing to track).
    """
    if dataset is None:
        raise ValueError("the trainer has no train_dataset to build default probes from; pass probes=ProbeSet(...)")
    if preference:
        return preference_probes(dataset, tokenizer, num_prompts=num_prompts, seed=seed, test_dataset=test_dataset)
    probes = prompt_probes(dataset, tokenizer, num_prompts=num_prompts, seed=seed, test_dataset=test_dataset)
    if len(probes) == 0 and not generate:
        raise ValueError(
            "the train dataset has prompts but no reference responses (no 'completion' or 'solution' column), and "
            "generate=False leaves nothing to track: keep generate=True (the model's own greedy responses to the "
            "prompts are tracked), or pass probes=ProbeSet.from_prompts(dataset, tokenizer, response_column=...)"
        )
    return probes
