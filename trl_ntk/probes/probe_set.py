"""`ProbeSet`: the ordered collection of probe responses whose log-probs are tracked through training.

The set is plain data; its builders live in `probes/datasets.py` (`from_preference_dataset`, `from_prompts`), its
tokenization in `probes/encoding.py` (`encode`), fresh responses from the model in `probes/generation.py`
(`sample_responses`). The names below are re-exported so that `from trl_ntk.probes.probe_set import ...` keeps working.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from trl_ntk.probes.encoding import EncodedProbes, tokenizer_fingerprint
from trl_ntk.probes.generation import SAMPLED_KINDS, sample_responses
from trl_ntk.probes.modes import eval_mode, forked_rng
from trl_ntk.probes.responses import (
    PREFERENCE_KINDS,
    REFERENCE_KINDS,
    Conversation,
    Probe,
    ProbeResponse,
    PromptLike,
    is_conversation,
)

__all__ = [
    "PREFERENCE_KINDS",
    "REFERENCE_KINDS",
    "SAMPLED_KINDS",
    "Conversation",
    "EncodedProbes",
    "Probe",
    "ProbeResponse",
    "ProbeSet",
    "PromptLike",
    "eval_mode",
    "forked_rng",
    "is_conversation",
    "sample_responses",
    "tokenizer_fingerprint",
]

REQUIRED_FIELDS = frozenset({"probe_id", "prompt_id", "kind", "prompt", "response"})
"""The fields of one probe in a file (`ProbeSet.from_file`)."""


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

    def save(self, path: str | os.PathLike) -> None:
        """Write `to_dicts()` to `path`: one JSON object per line for a `.jsonl` name, else one JSON list."""
        path = Path(path)
        rows = self.to_dicts()
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            text = json.dumps(rows, ensure_ascii=False, indent=1)
        path.write_text(text, encoding="utf-8")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ProbeSet:
        """Load probes written by `save` or by hand: a JSON list, or JSON Lines (`.jsonl`), of objects with
        `probe_id`, `prompt_id`, `kind`, `prompt` and `response` (text, or chat messages)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: expected a list of probe objects (see ProbeSet.to_dicts)")
        missing = [sorted(REQUIRED_FIELDS - set(row)) for row in rows if REQUIRED_FIELDS - set(row)]
        if missing:
            raise ValueError(f"{path}: a probe lacks the fields {missing[0]}; each needs {sorted(REQUIRED_FIELDS)}")
        return cls.from_dicts(rows)

    def encode(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> EncodedProbes:
        """Tokenize every response after its prompt, as TRL's DPO/SFT trainers tokenize their training data
        (`probes.encoding.encode_responses`, which documents the layout, the arguments and the result).

        Returns:
            `EncodedProbes`: a right-padded `TokenBatch` `[N, T]`, one row per response, targets the response tokens.
        """
        from trl_ntk.probes.encoding import encode_responses

        return encode_responses(
            self.responses(), tokenizer, max_length=max_length, chat_template_kwargs=chat_template_kwargs
        )

    @classmethod
    def from_preference_dataset(cls, dataset: Any, tokenizer: Any = None, **options: Any) -> ProbeSet:
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

        The options are keyword-only (`probes.datasets.preference_probes` builds the set).
        """
        from trl_ntk.probes.datasets import preference_probes

        return preference_probes(dataset, tokenizer, **options)

    @classmethod
    def from_prompts(cls, dataset: Any, tokenizer: Any = None, **options: Any) -> ProbeSet:
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
        from trl_ntk.probes.datasets import prompt_probes

        return prompt_probes(dataset, tokenizer, **options)

    def _check_unique_ids(self) -> None:
        seen: set[str] = set()
        for probe_response in self:
            if probe_response.probe_id in seen:
                raise ValueError(f"probe id {probe_response.probe_id!r} appears twice")
            seen.add(probe_response.probe_id)
