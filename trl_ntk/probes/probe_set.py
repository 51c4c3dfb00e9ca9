"""Probe responses: named (prompt, response) pairs whose log-probs are tracked through training.

Builders draw them from preference or prompt datasets, `ProbeSet.encode` tokenizes them exactly as TRL's trainers
tokenize their training data, and `sample_responses` draws fresh responses from the current model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trl_ntk.batches import TokenBatch

logger = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]
"""Chat messages, each a dict with at least `role` and `content`."""

PromptLike = str | Conversation
"""A plain-text prompt or response, or a conversational one (chat messages)."""

PREFERENCE_KINDS = (
    "chosen",
    "rejected",
    "chosen_rephrase",
    "rejected_rephrase",
    "chosen_swapped",
    "irrelevant_train",
    "irrelevant_test",
    "shuffled_chosen",
    "shuffled_irrelevant",
)
"""Kinds `ProbeSet.from_preference_dataset` builds, in the order it builds them for each prompt."""

REFERENCE_KINDS = ("completion", "irrelevant_train", "irrelevant_test", "shuffled_completion", "shuffled_irrelevant")
"""Kinds `ProbeSet.from_prompts` builds, in the order it builds them for each prompt."""

SAMPLED_KINDS = ("greedy", "sample")
"""Kinds `sample_responses` produces; regenerate them with `ProbeSet.select(exclude=SAMPLED_KINDS)` + `extend`."""

_DATASET_RESPONSE_COLUMNS = ("chosen_rephrase", "rejected_rephrase", "chosen_swapped")
_REFERENCE_COLUMNS = ("completion", "solution")  # reference-answer columns found without `response_column`
_IRRELEVANT_DRAWS = 8  # attempts at drawing another row whose answer differs from this row's


def is_conversation(value: Any) -> bool:
    """Whether `value` is a list of chat messages (dicts with a `role`), as TRL's `is_conversational` reads it."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


@dataclass(frozen=True)
class ProbeResponse:
    """One probe response: a response to a prompt whose log-probability is tracked.

    Args:
        probe_id (`str`): unique within a `ProbeSet`; names the response in every record.
        prompt_id (`str`): the prompt it answers; several responses share one prompt.
        kind (`str`): what the response is (`"chosen"`, `"irrelevant_train"`, `"greedy"`, or any user name).
        prompt (`str` or `list[dict]`): plain text, or chat messages ending with the user turn.
        response (`str` or `list[dict]`): plain text, or assistant messages; conversational exactly when the
            prompt is.
    """

    probe_id: str
    prompt_id: str
    kind: str
    prompt: PromptLike
    response: PromptLike

    def __post_init__(self) -> None:
        for name in ("probe_id", "prompt_id", "kind"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"probe {self.probe_id!r}: {name} must be a non-empty str, got {value!r}")
        prompt_is_chat, response_is_chat = is_conversation(self.prompt), is_conversation(self.response)
        if not prompt_is_chat and not isinstance(self.prompt, str):
            raise ValueError(
                f"probe {self.probe_id!r}: prompt must be a str or a list of chat messages, got {self.prompt!r}"
            )
        if not response_is_chat and not isinstance(self.response, str):
            raise ValueError(
                f"probe {self.probe_id!r}: response must be a str or a list of chat messages, got {self.response!r}"
            )
        if prompt_is_chat != response_is_chat:
            raise ValueError(
                f"probe {self.probe_id!r}: prompt and response must both be plain text or both chat messages; got a "
                f"{'conversational' if prompt_is_chat else 'plain-text'} prompt and a "
                f"{'conversational' if response_is_chat else 'plain-text'} response"
            )

    @property
    def is_conversational(self) -> bool:
        """Whether prompt and response are chat messages."""
        return is_conversation(self.prompt)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (prompt and response as given: text or messages)."""
        return {
            "probe_id": self.probe_id,
            "prompt_id": self.prompt_id,
            "kind": self.kind,
            "prompt": copy.deepcopy(self.prompt),
            "response": copy.deepcopy(self.response),
        }


@dataclass
class Probe:
    """A prompt and its named responses, each with a kind.

    Args:
        prompt_id (`str`): unique within a `ProbeSet`.
        prompt (`str` or `list[dict]`): plain text, or chat messages.
        responses (`list[ProbeResponse]`, *optional*): the responses so far; add more with `add`.
    """

    prompt_id: str
    prompt: PromptLike
    responses: list[ProbeResponse] = field(default_factory=list)

    def __post_init__(self) -> None:
        for response in self.responses:
            if response.prompt_id != self.prompt_id or response.prompt != self.prompt:
                raise ValueError(f"probe {response.probe_id!r} does not answer prompt {self.prompt_id!r}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of the responses, in first-appearance order."""
        return tuple(dict.fromkeys(r.kind for r in self.responses))

    def add(self, kind: str, response: PromptLike, *, probe_id: str | None = None) -> ProbeResponse:
        """Add a response; `probe_id` defaults to `"<prompt_id>-<kind>"`, numbered `-1`, `-2`, ... on repeats."""
        taken = {r.probe_id for r in self.responses}
        if probe_id is None:
            probe_id = f"{self.prompt_id}-{kind}"
            index = 1
            while probe_id in taken:
                probe_id = f"{self.prompt_id}-{kind}-{index}"
                index += 1
        elif probe_id in taken:
            raise ValueError(f"probe id {probe_id!r} is already used by prompt {self.prompt_id!r}")
        probe_response = ProbeResponse(probe_id, self.prompt_id, kind, self.prompt, response)
        self.responses.append(probe_response)
        return probe_response


class ProbeSet:
    """An ordered collection of probes; iterating yields the probe responses, prompt by prompt.

    Usage:
    ```python
    probes = ProbeSet.from_preference_dataset(train_dataset, tokenizer, num_prompts=8, seed=0)
    probes.add("p3", "my_kind", [{"role": "assistant", "content": "Something else."}])
    encoded = probes.encode(tokenizer, max_length=1024)
    encoded.validate(model, tokenizer)
    ```

    Args:
        probes (`Iterable[Probe]`, *optional*): the probes, in order; prompt ids and probe ids must be unique.
    """

    def __init__(self, probes: Iterable[Probe] = ()) -> None:
        self._probes: dict[str, Probe] = {}
        for probe in probes:
            if probe.prompt_id in self._probes:
                raise ValueError(f"prompt id {probe.prompt_id!r} appears twice")
            self._probes[probe.prompt_id] = probe
        self._check_unique_ids()

    def __iter__(self) -> Iterator[ProbeResponse]:
        for probe in self._probes.values():
            yield from probe.responses

    def __len__(self) -> int:
        return sum(len(probe.responses) for probe in self._probes.values())

    def __repr__(self) -> str:
        return f"ProbeSet({len(self._probes)} prompts, {len(self)} responses, kinds={list(self.kinds)})"

    def prompts(self) -> list[Probe]:
        """The probes (each a prompt with its responses), in order."""
        return list(self._probes.values())

    def responses(self) -> list[ProbeResponse]:
        """All probe responses, prompt by prompt."""
        return list(self)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds present, in first-appearance order."""
        return tuple(dict.fromkeys(r.kind for r in self))

    def probe(self, prompt_id: str) -> Probe:
        """The probe of `prompt_id`."""
        if prompt_id not in self._probes:
            raise KeyError(f"no prompt {prompt_id!r} in the probe set")
        return self._probes[prompt_id]

    def response(self, probe_id: str) -> ProbeResponse:
        """The probe response named `probe_id`."""
        for probe_response in self:
            if probe_response.probe_id == probe_id:
                return probe_response
        raise KeyError(f"no probe {probe_id!r} in the probe set")

    def add(
        self,
        prompt_id: str,
        kind: str,
        response: PromptLike,
        *,
        prompt: PromptLike | None = None,
        probe_id: str | None = None,
    ) -> ProbeResponse:
        """Add a response of any kind to prompt `prompt_id`; pass `prompt` to start a new prompt.

        Args:
            prompt_id (`str`): an existing prompt, or a new one when `prompt` is given.
            kind (`str`): any name; built-in ones are listed in `docs/output-format.md`.
            response (`str` or `list[dict]`): plain text, or assistant messages (when the prompt is chat messages).
            prompt (`str` or `list[dict]`, *optional*): the prompt, for a new `prompt_id`.
            probe_id (`str`, *optional*): defaults to `"<prompt_id>-<kind>"` (numbered on repeats).
        """
        probe = self._probes.get(prompt_id)
        if probe is None:
            if prompt is None:
                raise KeyError(f"no prompt {prompt_id!r} in the probe set; pass prompt=... to add a new one")
            probe = Probe(prompt_id, prompt)
        elif prompt is not None and prompt != probe.prompt:
            raise ValueError(f"prompt {prompt_id!r} already exists with a different prompt")
        taken = {r.probe_id for r in self}
        if probe_id is not None and probe_id in taken:
            raise ValueError(f"probe id {probe_id!r} is already in the probe set")
        probe_response = probe.add(kind, response, probe_id=probe_id)
        if probe_response.probe_id in taken:
            probe.responses.pop()
            raise ValueError(f"probe id {probe_response.probe_id!r} is already in the probe set; pass probe_id=...")
        self._probes.setdefault(prompt_id, probe)
        return probe_response

    def add_prompt(self, prompt_id: str, prompt: PromptLike) -> Probe:
        """Add a prompt with no response yet (e.g. a GRPO prompt to sample responses for)."""
        if prompt_id in self._probes:
            raise ValueError(f"prompt id {prompt_id!r} is already in the probe set")
        if not is_conversation(prompt) and not isinstance(prompt, str):
            raise ValueError(f"prompt {prompt_id!r} must be a str or a list of chat messages, got {prompt!r}")
        probe = self._probes[prompt_id] = Probe(prompt_id, prompt)
        return probe

    def extend(self, responses: Iterable[ProbeResponse]) -> None:
        """Add ready-made responses (e.g. from `sample_responses`), creating their prompts when new."""
        taken = {r.probe_id for r in self}
        for probe_response in responses:
            if probe_response.probe_id in taken:
                raise ValueError(f"probe id {probe_response.probe_id!r} is already in the probe set")
            taken.add(probe_response.probe_id)
            probe = self._probes.get(probe_response.prompt_id)
            if probe is None:
                probe = self._probes[probe_response.prompt_id] = Probe(probe_response.prompt_id, probe_response.prompt)
            elif probe.prompt != probe_response.prompt:
                raise ValueError(
                    f"probe {probe_response.probe_id!r} answers prompt {probe_response.prompt_id!r} with a prompt "
                    "that differs from the one in the probe set"
                )
            probe.responses.append(probe_response)

    def select(self, kinds: Iterable[str] | None = None, *, exclude: Iterable[str] = ()) -> ProbeSet:
        """A new probe set with the responses whose kind is in `kinds` (all when `None`) and not in `exclude`.

        Prompts left without responses are kept (they can still be sampled from).
        """
        keep = None if kinds is None else set(kinds)
        drop = set(exclude)
        probes = []
        for probe in self._probes.values():
            responses = [r for r in probe.responses if (keep is None or r.kind in keep) and r.kind not in drop]
            probes.append(Probe(probe.prompt_id, probe.prompt, responses))
        return ProbeSet(probes)

    @classmethod
    def from_responses(cls, responses: Iterable[ProbeResponse]) -> ProbeSet:
        """A probe set of ready-made responses, grouped by prompt in first-appearance order."""
        probe_set = cls()
        probe_set.extend(responses)
        return probe_set

    def to_dicts(self) -> list[dict[str, Any]]:
        """JSON-able list of every response (`ProbeResponse.to_dict`), prompt by prompt."""
        return [r.to_dict() for r in self]

    @classmethod
    def from_dicts(cls, rows: Iterable[Mapping[str, Any]]) -> ProbeSet:
        """Inverse of `to_dicts`; also the way to load user-written probes from JSON."""
        return cls.from_responses(ProbeResponse(**dict(row)) for row in rows)

    def encode(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> EncodedProbes:
        """Tokenize every response after its prompt, as TRL's DPO/SFT trainers tokenize their training data.

        Conversational probes: `prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)`, `ids =
        apply_chat_template(prompt + response)`; plain text: `prompt_ids = tokenizer(prompt)`, `ids =
        tokenizer(prompt + response)` with the eos token appended to the response unless it already ends with it.
        The response tokens start where `prompt_ids` and `ids` diverge (TRL's `common_prefix_length`; DPO takes the
        smaller of the chosen and rejected boundaries, which differ only for unusual chat templates). When the prompt
        has no tokens (plain text without BOS), the first token is context and is not scored.

        Args:
            tokenizer (`PreTrainedTokenizerBase`): the trainer's `processing_class`.
            max_length (`int`, *optional*): raise when a prompt + response is longer (no silent truncation).
            chat_template_kwargs (`dict`, *optional*): extra keyword arguments for `apply_chat_template`, as the
                trainer passes them (e.g. `chat_template=...`, `enable_thinking=False`).

        Returns:
            `EncodedProbes`: a right-padded `TokenBatch` `[N, T]` with one row per response (targets: the response
            tokens only) and the aligned responses.
        """
        responses = self.responses()
        if not responses:
            raise ValueError("the probe set has no responses to encode")
        kwargs = dict(chat_template_kwargs or {})
        pad_token_id = _pad_token_id(tokenizer)
        prompt_cache: dict[str, list[int]] = {}
        context_ids: list[list[int]] = []
        response_ids: list[list[int]] = []
        for probe_response in responses:
            if not _response_text(probe_response.response):
                raise ValueError(
                    f"probe {probe_response.probe_id!r} has an empty response (0 response tokens besides the chat "
                    "template's end of turn); give it text or drop it"
                )
            if probe_response.prompt_id not in prompt_cache:
                prompt_cache[probe_response.prompt_id] = _prompt_token_ids(tokenizer, probe_response, kwargs)
            prompt_ids = prompt_cache[probe_response.prompt_id]
            full_ids = _prompt_response_token_ids(tokenizer, probe_response, kwargs)
            start = max(_common_prefix_length(prompt_ids, full_ids), 1)
            if start >= len(full_ids):
                raise ValueError(
                    f"probe {probe_response.probe_id!r} has 0 response tokens after tokenization; check the chat "
                    "template or drop it"
                )
            if max_length is not None and len(full_ids) > max_length:
                raise ValueError(
                    f"probe {probe_response.probe_id!r} is {len(full_ids)} tokens long (prompt {start} + response "
                    f"{len(full_ids) - start}), more than max_length={max_length}; shorten or drop it, or raise "
                    "max_length"
                )
            context_ids.append(full_ids[:start])
            response_ids.append(full_ids[start:])

        length = max(len(c) + len(r) for c, r in zip(context_ids, response_ids))
        input_ids = torch.full((len(responses), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(responses), length), dtype=torch.long)
        target_mask = torch.zeros((len(responses), length), dtype=torch.bool)
        for row, (context, response) in enumerate(zip(context_ids, response_ids)):
            input_ids[row, : len(context) + len(response)] = torch.tensor(context + response)
            attention_mask[row, : len(context) + len(response)] = 1
            target_mask[row, len(context) : len(context) + len(response)] = True
        batch = TokenBatch(input_ids=input_ids, attention_mask=attention_mask, target_mask=target_mask)
        return EncodedProbes(
            batch=batch,
            responses=responses,
            context_ids=context_ids,
            response_ids=response_ids,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        )

    def describe(
        self, tokenizer: Any, *, max_length: int | None = None, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """The `probes` list of the `type: "probes"` record (`encode(...).describe(tokenizer)`)."""
        return self.encode(tokenizer, max_length=max_length, chat_template_kwargs=chat_template_kwargs).describe(
            tokenizer
        )

    @classmethod
    def from_preference_dataset(
        cls,
        dataset: Any,
        tokenizer: Any = None,
        *,
        num_prompts: int = 8,
        seed: int = 0,
        test_dataset: Any = None,
        max_length: int | None = None,
    ) -> ProbeSet:
        """Probes from a TRL preference dataset (`prompt`/`chosen`/`rejected`, explicit or implicit prompt).

        For each of `num_prompts` prompts drawn with `seed` (reproducibly, in dataset order) the kinds are:
        `chosen`, `rejected`; `chosen_rephrase`, `rejected_rephrase`, `chosen_swapped` when those columns exist;
        `irrelevant_train` (the chosen answer of another training prompt); `irrelevant_test` (the chosen answer of a
        `test_dataset` row, when given); `shuffled_chosen` and `shuffled_irrelevant` (the words of `chosen` and of
        `irrelevant_train` in a random order). Prompt ids are `"p<row>"` with the row index in `dataset`.

        Args:
            dataset (`datasets.Dataset` or `Sequence[dict]`): the training dataset, plain text or conversational.
            tokenizer (`PreTrainedTokenizerBase`, *optional*): when given, every probe is encoded once so that bad
                probes raise here, not at the first analysis step.
            num_prompts (`int`, *optional*, defaults to `8`): prompts to draw (all when the dataset is smaller).
            seed (`int`, *optional*, defaults to `0`): the draw, the irrelevant answers and the word orders.
            test_dataset (`datasets.Dataset` or `Sequence[dict]`, *optional*): held-out rows for `irrelevant_test`.
            max_length (`int`, *optional*): checked when `tokenizer` is given (see `encode`).
        """
        eos_token = getattr(tokenizer, "eos_token", None)
        rows = _PreferenceRows(dataset, eos_token)
        test_rows = None if test_dataset is None else _PreferenceRows(test_dataset, eos_token)
        probe_set = cls()
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

    @classmethod
    def from_prompts(
        cls,
        dataset: Any,
        tokenizer: Any = None,
        *,
        num_prompts: int = 8,
        seed: int = 0,
        response_column: str | None = None,
        test_dataset: Any = None,
        max_length: int | None = None,
    ) -> ProbeSet:
        """Probes from a GRPO prompt-only or an SFT dataset, with the reference answers a column gives.

        Formats (TRL's names): prompt-only (`prompt`, reference answer in `response_column`, e.g. `"answer"`);
        prompt-completion (`prompt`/`completion`); conversational language modeling (`messages` or ShareGPT
        `conversations`: the prompt is every message before the last, which must be the assistant's, and the
        reference is that last message); plain language modeling (`text`, or `response_column`: empty prompt, the
        whole text is the reference). A plain-string reference for a conversational prompt becomes one assistant
        message. Kinds, for prompts with a reference: `completion`, `irrelevant_train` (another prompt's reference),
        `irrelevant_test` (a `test_dataset` row's reference, when given), `shuffled_completion`,
        `shuffled_irrelevant`. Prompts without a reference get no response (add sampled ones with
        `sample_responses`). Prompt ids are `"p<row>"`.

        Args:
            dataset (`datasets.Dataset` or `Sequence[dict]`): the training dataset.
            tokenizer (`PreTrainedTokenizerBase`, *optional*): when given, every probe is encoded once so that bad
                probes raise here.
            num_prompts (`int`, *optional*, defaults to `8`): prompts to draw (all when the dataset is smaller).
            seed (`int`, *optional*, defaults to `0`): the draw, the irrelevant answers and the word orders.
            response_column (`str`, *optional*): the column holding reference answers; defaults to `completion`,
                else `solution`, when present.
            test_dataset (`datasets.Dataset` or `Sequence[dict]`, *optional*): held-out rows for `irrelevant_test`.
            max_length (`int`, *optional*): checked when `tokenizer` is given (see `encode`).
        """
        eos_token = getattr(tokenizer, "eos_token", None)
        rows = _PromptRows(dataset, response_column, eos_token)
        test_rows = None if test_dataset is None else _PromptRows(test_dataset, response_column, eos_token)
        probe_set = cls()
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

    def _check_unique_ids(self) -> None:
        seen: set[str] = set()
        for probe_response in self:
            if probe_response.probe_id in seen:
                raise ValueError(f"probe id {probe_response.probe_id!r} appears twice")
            seen.add(probe_response.probe_id)


@dataclass
class EncodedProbes:
    """Tokenized probe responses: one right-padded row per response, targets = the response tokens.

    Args:
        batch (`TokenBatch`): `input_ids`, `attention_mask`, `target_mask` `[N, T]`, right padded; row `n` is
            `context_ids[n] + response_ids[n]` and its targets are the `response_ids[n]` tokens.
        responses (`list[ProbeResponse]`): the `N` responses, aligned with the rows.
        context_ids (`list[list[int]]`): the prompt tokens each response is scored after.
        response_ids (`list[list[int]]`): the scored tokens.
        tokenizer_fingerprint (`str`): `tokenizer_fingerprint` of the tokenizer that encoded them.
    """

    batch: TokenBatch
    responses: list[ProbeResponse]
    context_ids: list[list[int]]
    response_ids: list[list[int]]
    tokenizer_fingerprint: str

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def num_tokens(self) -> list[int]:
        """Response tokens per probe."""
        return [len(ids) for ids in self.response_ids]

    def describe(self, tokenizer: Any) -> list[dict[str, Any]]:
        """The `probes` list of the `type: "probes"` record: ids, kind, decoded prompt and response, tokens.

        `prompt` and `response` are decoded from the tokens the model sees (chat template included), so the report
        shows exactly what is scored; `tokens` decodes each response token on its own.
        """
        records = []
        for probe_response, context, response in zip(self.responses, self.context_ids, self.response_ids):
            records.append(
                {
                    "probe_id": probe_response.probe_id,
                    "prompt_id": probe_response.prompt_id,
                    "kind": probe_response.kind,
                    "prompt": tokenizer.decode(context),
                    "response": tokenizer.decode(response),
                    "num_tokens": len(response),
                    "tokens": [tokenizer.decode([token_id]) for token_id in response],
                }
            )
        return records

    def validate(self, model: nn.Module, tokenizer: Any = None) -> None:
        """Raise early when the probes cannot be scored by `model` as tokenized.

        Checks that every token id is inside the model's input embedding, that every row fits the model's
        `max_position_embeddings` (when its config has one), and, when `tokenizer` is given (the trainer's
        `processing_class`), that it is the tokenizer the probes were encoded with.
        """
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.tokenizer_fingerprint:
            raise ValueError(
                "the probes were encoded with a different tokenizer (vocabulary, special tokens or chat template) "
                "than the one given; encode them with the trainer's processing_class"
            )
        num_embeddings = model.get_input_embeddings().weight.shape[0]
        for probe_response, context, response in zip(self.responses, self.context_ids, self.response_ids):
            outside = [token_id for token_id in context + response if not 0 <= token_id < num_embeddings]
            if outside:
                raise ValueError(
                    f"probe {probe_response.probe_id!r} has token id {outside[0]} outside the model's vocabulary of "
                    f"{num_embeddings}; the tokenizer does not match the model"
                )
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        max_positions = getattr(text_config, "max_position_embeddings", None)
        if max_positions is None:
            return
        for probe_response, context, response in zip(self.responses, self.context_ids, self.response_ids):
            if len(context) + len(response) > max_positions:
                raise ValueError(
                    f"probe {probe_response.probe_id!r} is {len(context) + len(response)} tokens long (prompt "
                    f"{len(context)} + response {len(response)}), more than the model's max_position_embeddings="
                    f"{max_positions}; shorten or drop it"
                )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides tokenization: vocabulary, special tokens and chat template."""
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of `model` in eval mode, and give each back the mode it had (even on error)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block on a fork of torch's global RNG state: CPU, every CUDA device, and `device`'s accelerator.

    `torch.manual_seed` inside the block seeds every device, so every device's state is saved and restored.
    """
    with contextlib.ExitStack() as stack:
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices, device_type="cuda"))
        if device.type not in ("cpu", "cuda", "meta"):
            backend = getattr(torch, device.type, None)
            if backend is not None and hasattr(backend, "device_count"):
                devices = list(range(backend.device_count()))
                stack.enter_context(torch.random.fork_rng(devices=devices, device_type=device.type))
        yield


def sample_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: ProbeSet | Sequence[Probe],
    *,
    num_samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 16,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    synced_gpus: bool = False,
) -> list[ProbeResponse]:
    """Responses of the current model to each prompt: one greedy (kind `greedy`) and `num_samples` samples (`sample`).

    Prompts are tokenized as TRL's GRPO trainer tokenizes them for generation (`apply_chat_template(...,
    add_generation_prompt=True)` or `tokenizer(prompt)`), left padded, and decoded without the eos and padding
    (`skip_special_tokens=True`, as GRPO decodes). Samples are drawn from the policy itself at `temperature`
    (`top_k=0`, `top_p=1`, no repetition penalty; override with `generation_kwargs`). Empty generations are skipped
    with a warning. Probe ids: `"<prompt_id>-greedy"`, `"<prompt_id>-sample-<i>"`.

    Training is left undisturbed: generation runs on a fork of torch's RNG state (CPU and every accelerator device)
    seeded with `seed`, with every module in eval mode, and each module's mode is restored afterwards. Works with a
    model patched by TRL's `add_fused_lm_head` (its plain forward is the original one). Re-encoding a decoded
    plain-text response appends the eos token (see `ProbeSet.encode`), also for responses cut at `max_new_tokens`.

    Args:
        model (`PreTrainedModel`): the policy (unwrapped).
        tokenizer (`PreTrainedTokenizerBase`): the trainer's `processing_class`.
        prompts (`ProbeSet` or `Sequence[Probe]`): the prompts to answer.
        num_samples (`int`, *optional*, defaults to `0`): sampled responses per prompt.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        max_new_tokens (`int`, *optional*, defaults to `128`): generation length bound.
        seed (`int`, *optional*, defaults to `0`): seeds the forked RNG.
        batch_size (`int`, *optional*, defaults to `16`): prompts per `generate` call.
        chat_template_kwargs (`dict`, *optional*): extra keyword arguments for `apply_chat_template`.
        generation_kwargs (`dict`, *optional*): overrides for the `GenerationConfig` fields.
        synced_gpus (`bool`, *optional*, defaults to `False`): call on every rank of a sharded model (FSDP2); ranks
            keep running forwards until all have finished (`generate(synced_gpus=True)`).

    Returns:
        `list[ProbeResponse]`: per prompt, the greedy response then the samples (non-empty ones only).
    """
    from transformers import GenerationConfig

    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    kwargs = dict(chat_template_kwargs or {})
    probes, prompt_ids = [], []
    for probe in prompts.prompts() if isinstance(prompts, ProbeSet) else prompts:
        ids = _generation_prompt_ids(tokenizer, probe.prompt, kwargs)
        if ids:
            probes.append(probe)
            prompt_ids.append(ids)
        else:
            logger.warning("prompt %r has no tokens to generate after; no sampled responses for it", probe.prompt_id)
    device = model.get_input_embeddings().weight.device
    eos_ids = _eos_token_ids(model, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # Every field that could inherit a non-neutral value from `model.generation_config` is set: the responses come
    # from the policy itself (argmax, or sampling at `temperature` only). `top_k=50` is the neutral default for greedy.
    common = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_ids,
        "num_beams": 1,
        "top_p": 1.0,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
        "disable_compile": True,
    }
    overrides = dict(generation_kwargs or {})
    greedy_config = GenerationConfig(**{**common, "do_sample": False, "temperature": 1.0, "top_k": 50, **overrides})
    sample_config = GenerationConfig(
        **{
            **common,
            "do_sample": True,
            "temperature": temperature,
            "top_k": 0,
            "min_p": 0.0,
            "num_return_sequences": num_samples,
            **overrides,
        }
    )
    generated: dict[str, list[ProbeResponse]] = {probe.prompt_id: [] for probe in probes}
    skipped = 0
    with eval_mode(model), forked_rng(device), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(probes), batch_size):
            chunk = probes[start : start + batch_size]
            input_ids, attention_mask = _left_pad(prompt_ids[start : start + batch_size], pad_token_id, device)
            runs = [("greedy", greedy_config, 1)] + ([("sample", sample_config, num_samples)] if num_samples else [])
            for kind, generation_config, per_prompt in runs:
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=generation_config,
                    synced_gpus=synced_gpus,
                )
                completions = output[:, input_ids.shape[1] :].tolist()
                for row, completion in enumerate(completions):
                    probe = chunk[row // per_prompt]
                    text = tokenizer.decode(_cut_at_eos(completion, eos_ids), skip_special_tokens=True)
                    if not text:
                        skipped += 1
                        continue
                    suffix = "greedy" if kind == "greedy" else f"sample-{row % per_prompt}"
                    probe_id = f"{probe.prompt_id}-{suffix}"
                    response: PromptLike = (
                        [{"role": "assistant", "content": text}] if is_conversation(probe.prompt) else text
                    )
                    generated[probe.prompt_id].append(
                        ProbeResponse(probe_id, probe.prompt_id, kind, probe.prompt, response)
                    )
    if skipped:
        logger.warning("skipped %d empty generated responses (of %d)", skipped, len(probes) * (1 + num_samples))
    return [r for probe in probes for r in generated[probe.prompt_id]]


# ---- tokenization, as TRL's trainers do it -------------------------------------------------------------------


def _chat_token_ids(tokenizer: Any, messages: Conversation, **kwargs: Any) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(encoded["input_ids"])


def _prompt_token_ids(tokenizer: Any, probe_response: ProbeResponse, kwargs: dict[str, Any]) -> list[int]:
    try:
        if probe_response.is_conversational:
            return _chat_token_ids(tokenizer, probe_response.prompt, add_generation_prompt=True, **kwargs)
        return list(tokenizer(text=probe_response.prompt)["input_ids"])
    except ValueError as error:
        raise ValueError(f"probe {probe_response.probe_id!r}: cannot tokenize its prompt: {error}") from error


def _prompt_response_token_ids(tokenizer: Any, probe_response: ProbeResponse, kwargs: dict[str, Any]) -> list[int]:
    try:
        if probe_response.is_conversational:
            return _chat_token_ids(tokenizer, probe_response.prompt + probe_response.response, **kwargs)
        response = probe_response.response
        if tokenizer.eos_token is not None and not response.endswith(tokenizer.eos_token):
            response = response + tokenizer.eos_token
        return list(tokenizer(text=probe_response.prompt + response)["input_ids"])
    except ValueError as error:
        raise ValueError(f"probe {probe_response.probe_id!r}: cannot tokenize its response: {error}") from error


def _generation_prompt_ids(tokenizer: Any, prompt: PromptLike, kwargs: dict[str, Any]) -> list[int]:
    if is_conversation(prompt):
        return _chat_token_ids(tokenizer, prompt, add_generation_prompt=True, **kwargs)
    return list(tokenizer(text=prompt)["input_ids"])


def _common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    length = 0
    for a, b in zip(ids, other_ids):
        if a != b:
            break
        length += 1
    return length


def _pad_token_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a generation: the model's generation config's eos ids, then the tokenizer's."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.extend([configured] if isinstance(configured, int) else list(configured))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an eos token")
    return list(dict.fromkeys(int(i) for i in ids))


def _left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, length - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, length - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    for position, token_id in enumerate(token_ids):
        if token_id in eos_ids:
            return token_ids[:position]
    return token_ids


# ---- dataset rows and builders' helpers ------------------------------------------------------------------------


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


def _response_text(response: Any) -> str:
    """The text of a response given as a string or as a list of chat messages."""
    if isinstance(response, str):
        return response
    return "".join(str(message.get("content", "")) for message in response)
