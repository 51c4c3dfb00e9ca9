"""The probe data model: one tracked response (`ProbeResponse`) and a prompt with its responses (`Probe`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

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
