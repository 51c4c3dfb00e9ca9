"""Tokenization of probe responses exactly as TRL's trainers tokenize their training data, and the encoded batch.

`encode_responses` (behind `ProbeSet.encode`) gives an `EncodedProbes`: one right-padded row per response whose
targets are the response tokens only; `EncodedProbes.validate` checks it against a model before training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trl_ntk._model import text_config
from trl_ntk.batches import TokenBatch
from trl_ntk.probes.responses import Conversation, ProbeResponse, PromptLike, is_conversation


def encode_responses(
    responses: Sequence[ProbeResponse],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    prompt_cache: dict[str, list[int]] | None = None,
) -> EncodedProbes:
    """Tokenize every response after its prompt, as TRL's DPO/SFT trainers tokenize their training data.

    Conversational probes: `prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)`, `ids =
    apply_chat_template(prompt + response)`; plain text: `prompt_ids = tokenizer(prompt)`, `ids =
    tokenizer(prompt + response)` with the eos token appended to the response unless it already ends with it.
    The response tokens start where `prompt_ids` and `ids` diverge (TRL's `common_prefix_length`; DPO takes the
    smaller of the chosen and rejected boundaries, which differ only for unusual chat templates). When the prompt
    has no tokens (plain text without BOS), the first token is context and is not scored.

    Args:
        responses (`Sequence[ProbeResponse]`): the responses, in row order.
        tokenizer (`PreTrainedTokenizerBase`): the trainer's `processing_class`.
        max_length (`int`, *optional*): raise when a prompt + response is longer (no silent truncation).
        chat_template_kwargs (`dict`, *optional*): extra keyword arguments for `apply_chat_template`, as the
            trainer passes them (e.g. `chat_template=...`, `enable_thinking=False`).
        prompt_cache (`dict`, *optional*): `prompt_ids` per prompt id, read and filled here; pass the same dict
            to later calls (and to `sample_responses`) with the same tokenizer and `chat_template_kwargs` to
            tokenize each prompt once. Defaults to a fresh dict.

    Returns:
        `EncodedProbes`: a right-padded `TokenBatch` `[N, T]` with one row per response (targets: the response
        tokens only) and the aligned responses.
    """
    responses = list(responses)
    if not responses:
        raise ValueError("the probe set has no responses to encode")
    kwargs = dict(chat_template_kwargs or {})
    pad_token_id = _pad_token_id(tokenizer)
    prompt_cache = {} if prompt_cache is None else prompt_cache
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

    return _assemble(responses, context_ids, response_ids, pad_token_id, tokenizer_fingerprint(tokenizer))


def encode_extended(
    encoded: EncodedProbes | None,
    responses: Sequence[ProbeResponse],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    prompt_cache: dict[str, list[int]] | None = None,
) -> EncodedProbes:
    """`encode_responses(responses, tokenizer, ...)`, tokenizing only the responses `encoded` does not hold.

    A response of `responses` equal to one of `encoded` (same probe id, prompt and response) reuses its tokens;
    the others are encoded here. Rows follow `responses`, so the result equals encoding all of them at once when
    `encoded` came from the same tokenizer, `chat_template_kwargs` and `max_length` (its tokenizer fingerprint is
    checked). Use: the fixed probes encoded once, plus the responses generated at each scoring step.

    Cost: the chat template and the tokenizer run on the new responses only.
    """
    responses = list(responses)
    known = {}
    if encoded is not None:
        known = {r.probe_id: (r, c, t) for r, c, t in zip(encoded.responses, encoded.context_ids, encoded.response_ids)}
    new = [r for r in responses if r.probe_id not in known or known[r.probe_id][0] != r]
    options = {"max_length": max_length, "chat_template_kwargs": chat_template_kwargs, "prompt_cache": prompt_cache}
    if encoded is None or (new and not known):
        return encode_responses(responses, tokenizer, **options)
    if new:
        fresh = encode_responses(new, tokenizer, **options)
        if fresh.tokenizer_fingerprint != encoded.tokenizer_fingerprint:
            raise ValueError("the new responses were encoded with a different tokenizer than the reused ones")
        known.update({r.probe_id: (r, c, t) for r, c, t in zip(fresh.responses, fresh.context_ids, fresh.response_ids)})
    rows = [known[r.probe_id] for r in responses]
    return _assemble(
        responses,
        [list(c) for _, c, _ in rows],
        [list(t) for _, _, t in rows],
        _pad_token_id(tokenizer),
        encoded.tokenizer_fingerprint,
    )


def _assemble(
    responses: list[ProbeResponse],
    context_ids: list[list[int]],
    response_ids: list[list[int]],
    pad_token_id: int,
    fingerprint: str,
) -> EncodedProbes:
    """The right-padded `EncodedProbes` of rows `context_ids[n] + response_ids[n]` (targets: the response)."""
    length = max(len(c) + len(r) for c, r in zip(context_ids, response_ids))
    ids, mask, targets = [], [], []
    for context, response in zip(context_ids, response_ids):
        padding = length - len(context) - len(response)
        ids.append([*context, *response] + [pad_token_id] * padding)
        mask.append([1] * (len(context) + len(response)) + [0] * padding)
        targets.append([False] * len(context) + [True] * len(response) + [False] * padding)
    batch = TokenBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        target_mask=torch.tensor(targets, dtype=torch.bool),
    )
    return EncodedProbes(
        batch=batch,
        responses=responses,
        context_ids=context_ids,
        response_ids=response_ids,
        tokenizer_fingerprint=fingerprint,
    )


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

    def describe(self, tokenizer: Any, decoded: dict[tuple[int, ...], str] | None = None) -> list[dict[str, Any]]:
        """The `probes` list of the `type: "probes"` record: ids, kind, decoded prompt and response, tokens.

        `prompt` and `response` are decoded from the tokens the model sees (chat template included), so the report
        shows exactly what is scored; `tokens` decodes each response token on its own.

        Args:
            decoded (`dict`, *optional*): decoded text per token sequence (single tokens included), read and filled
                here, so that a caller describing mostly the same probes at every scoring step decodes only the new
                ones; a fresh dict by default (each distinct sequence and token decoded once).
        """
        decoded = {} if decoded is None else decoded

        def decode(ids: list[int]) -> str:
            key = tuple(ids)
            if key not in decoded:
                decoded[key] = tokenizer.decode(ids)
            return decoded[key]

        records = []
        for probe_response, context, response in zip(self.responses, self.context_ids, self.response_ids):
            records.append(
                {
                    "probe_id": probe_response.probe_id,
                    "prompt_id": probe_response.prompt_id,
                    "kind": probe_response.kind,
                    "prompt": decode(context),
                    "response": decode(response),
                    "num_tokens": len(response),
                    "tokens": [decode([token_id]) for token_id in response],
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
        max_positions = getattr(text_config(model), "max_position_embeddings", None)
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
    """A hash of what decides tokenization: vocabulary, special tokens and chat template.

    Remembered per tokenizer object while its size, special tokens and chat template stay the same (hashing a
    150k-token vocabulary takes a noticeable fraction of a second)."""
    key = (len(tokenizer), str(tokenizer.special_tokens_map), str(getattr(tokenizer, "chat_template", None)))
    try:
        remembered = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weakly referenceable
        remembered = None
    if remembered is not None and remembered[0] == key:
        return remembered[1]
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    fingerprint = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
    with contextlib.suppress(TypeError):  # not weakly referenceable: not remembered
        _FINGERPRINTS[tokenizer] = (key, fingerprint)
    return fingerprint


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def _response_text(response: Any) -> str:
    """The text of a response given as a string or as a list of chat messages."""
    if isinstance(response, str):
        return response
    return "".join(str(message.get("content", "")) for message in response)


def encode_tracked(
    probes: Any, tokenizer: Any, model: nn.Module, *, max_length: int | None, generate: bool
) -> EncodedProbes | None:
    """The fixed responses of a `ProbeSet`, encoded and validated against `model`.

    Returns `None` when the set holds prompts only and `generate` is on: the responses tracked are then the
    model's own, generated at each scoring step. Raises `ValueError` when there is nothing to track.
    """
    if len(probes) == 0:
        if generate and probes.prompts():
            return None
        raise ValueError(
            "the probe set has no responses to track"
            + (" and no prompts to generate responses for" if generate else " and generate=False")
            + ": add responses (ProbeSet.add), or prompts with generate=True"
        )
    encoded = probes.encode(tokenizer, max_length=max_length)
    encoded.validate(model, tokenizer)
    return encoded
