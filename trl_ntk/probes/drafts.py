"""Greedy decoding of probe prompts that guesses the next tokens from earlier answers and verifies the guesses.

Between two scoring steps the policy changes little: its greedy answer to a probe prompt is often the last one, or
differs from it in a few tokens and then goes on as before, or borrows words from another prompt's answer, from the
fixed probe responses, from the prompt or from itself (a loop). `speculative_greedy` decodes the prompts as one
batch with a KV cache and feeds, after each row's last verified token, a guess of the tokens that follow (prompt
lookup decoding, with the earlier answers as the text looked up): at the first forward the row's last answer, later
the tokens that followed the longest n-gram ending the row's text (`guess_continuation`: the row's earlier answers,
then its own text, then every answer, reference sequence and prompt). One forward gives the greedy token after every
guessed token; the guess is kept up to its first wrong token, the greedy token replaces that one, and decoding goes
on from the cache. The rejected guess tokens stay in the cache as holes that the attention mask hides, and every
token carries its own position (`position_ids`), so each row attends to its prompt and its verified tokens only, at
their positions, exactly as in token-by-token decoding.

Cost: one forward per round, `1 + guess` tokens per open row, for as many rounds as the row needing most (about one
round per token no text predicts, plus one); a row whose answer is unchanged is done after the first forward
(prompt + last answer); token-by-token decoding (`generate`) runs one forward per generated token. The tokens are
the greedy ones of the same model; the forwards compute the logits in other shapes than `generate`'s decoding, so
two tokens tied to float rounding may be ranked the other way (`GreedyDrafts.check` compares both once per model).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trl_ntk._model import unwrap_model
from trl_ntk.probes import prefix

logger = logging.getLogger(__name__)

MAX_NGRAM = 3
"""Longest n-gram looked up to place a row's text in the earlier answers."""

_GREEDY_PROCESSORS = (
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "min_length",
    "min_new_tokens",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "watermarking_config",
)
"""`GenerationConfig` fields that would change greedy tokens through a logits processor."""


class NgramIndex:
    """Where each n-gram (`n = 1..max_n`) of a token sequence first occurs: the position after it, so that
    `sequence[position:]` is what followed it (an n-gram at the very end, with nothing after it, is not indexed).

    Cost: `O(max_n L)` dictionary insertions for a sequence of `L` tokens, once per sequence."""

    def __init__(self, sequence: Sequence[int], max_n: int = MAX_NGRAM) -> None:
        self.sequence = list(sequence)
        self.following: dict[tuple[int, ...], int] = {}
        for end in range(1, len(self.sequence)):
            for n in range(1, min(max_n, end) + 1):
                self.following.setdefault(tuple(self.sequence[end - n : end]), end)


def guess_continuation(
    text: Sequence[int], first: Sequence[NgramIndex], then: Sequence[NgramIndex], limit: int
) -> list[int]:
    """At most `limit` tokens that followed the longest n-gram (`n <= MAX_NGRAM`) ending `text`, looked up in the
    indexes `first`, then in `text` itself (its latest earlier occurrence: repetition), then in `then`, the first
    place holding it; `[]` when no suffix of `text` occurs anywhere.

    Cost: `O(MAX_NGRAM (len(first) + len(then)))` dictionary look-ups and a scan of `text`."""
    if limit <= 0:
        return []
    for n in range(min(MAX_NGRAM, len(text)), 0, -1):
        key = tuple(text[-n:])
        for index in first:
            if (end := index.following.get(key)) is not None:
                return index.sequence[end : end + limit]
        for end in range(len(text) - 1, n - 1, -1):
            if tuple(text[end - n : end]) == key:
                return list(text[end : end + limit])
        for index in then:
            if (end := index.following.get(key)) is not None:
                return index.sequence[end : end + limit]
    return []


class GreedyDrafts:
    """The recent greedy answers (token ids, up to and including the eos) per prompt, and reference token sequences:
    the text `speculative_greedy` guesses from.

    Args:
        references (`Sequence[Sequence[int]]`, *optional*): more token sequences to guess from (e.g. the fixed probe
            responses, which the trained policy's answers drift towards).
        history (`int`, *optional*, defaults to `4`): distinct answers kept per prompt, newest first.
    """

    def __init__(self, references: Sequence[Sequence[int]] = (), history: int = 4) -> None:
        self.answers: dict[tuple[int, ...], list[list[int]]] = {}
        self.references = [list(sequence) for sequence in references]
        self.history = history
        self.verified: bool | None = None
        """Outcome of the one-time comparison with `generate` (`check`); `None` before it."""
        self.failed = False
        """Set when a speculative decoding raised: the prompts are decoded plainly from then on."""
        self._indexes: dict[tuple[int, ...], NgramIndex] = {}

    def indexes(self, prompts: list[list[int]]) -> tuple[list[list[NgramIndex]], list[NgramIndex]]:
        """`(per prompt: its answers' indexes, newest first; the indexes of every answer, reference and prompt)`,
        the lookup order of `guess_continuation` after the prompt's own text. Built once per sequence."""
        known, self._indexes = self._indexes, {}

        def index(sequence: Sequence[int]) -> NgramIndex:
            key = tuple(sequence)
            if key not in self._indexes:
                self._indexes[key] = known.get(key) or NgramIndex(sequence)
            return self._indexes[key]

        own = [[index(answer) for answer in self.answers.get(tuple(prompt), [])] for prompt in prompts]
        answers = [answer for answers in self.answers.values() for answer in answers]
        return own, [index(sequence) for sequence in answers + self.references + prompts]

    def usable(self, model: nn.Module, synced_gpus: bool, generation_kwargs: Mapping[str, Any] | None) -> bool:
        """Whether greedy decoding is the plain argmax here: no sharded lock-step decoding, no overrides, no
        logits processor from the model's own generation config (the verification applies none), and no earlier
        failure or failed check on this model."""
        if self.failed or self.verified is False or synced_gpus or generation_kwargs:
            return False
        configured = getattr(model, "generation_config", None)
        return not any(getattr(configured, name, None) for name in _GREEDY_PROCESSORS)

    def last(self, prompt: Sequence[int]) -> list[int] | None:
        """The last greedy answer to `prompt`, or `None`."""
        answers = self.answers.get(tuple(prompt))
        return answers[0] if answers else None

    def remember(self, prompts: list[list[int]], completions: list[list[int]], eos_ids: list[int]) -> None:
        """Keep each prompt's completion, cut after its first eos, as its newest answer."""
        for prompt, completion in zip(prompts, completions):
            answer = answer_tokens(completion, eos_ids)
            earlier = [a for a in self.answers.get(tuple(prompt), []) if a != answer]
            self.answers[tuple(prompt)] = [answer, *earlier[: self.history - 1]]

    def check(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        completions: list[list[int]],
        budget: int,
        eos_ids: list[int],
        pad_id: int,
    ) -> None:
        """Once per model: whether `speculative_greedy` reproduces `completions` (the greedy ones of `generate`) when
        each prompt's draft is its answer with the middle token changed, so that the check covers an accepted
        prefix, a rejected guess left in the cache as a hole, and decoding after it; a mismatch or an error is
        warned about and turns speculative decoding off for this model. Models whose cache is not plain full
        attention (sliding windows, recurrent state) are turned off quietly."""
        if not prefix.has_plain_cache(model):
            self.verified = False
            return
        expected = [answer_tokens(completion, eos_ids)[:budget] for completion in completions]
        vocab_size = model.get_input_embeddings().weight.shape[0]
        altered = GreedyDrafts(history=1)
        for prompt, answer in zip(prompts, expected):
            draft = list(answer)
            draft[len(draft) // 2] = (draft[len(draft) // 2] + 1) % vocab_size
            altered.answers[tuple(prompt)] = [draft]
        try:
            self.verified = speculative_greedy(model, prompts, altered, budget, eos_ids, pad_id) == expected
        except Exception:  # noqa: BLE001 - a model the cached decoding cannot run on: decode it plainly
            self.verified = False
        if not self.verified:
            logger.warning(
                "%s: greedy decoding from drafts does not reproduce generate(); decoding the probe prompts plainly",
                type(model).__name__,
            )


def speculative_greedy(
    model: nn.Module, prompts: list[list[int]], drafts: GreedyDrafts, budget: int, eos_ids: list[int], pad_id: int
) -> list[list[int]]:
    """Per prompt, the greedy completion of at most `budget` tokens, up to and including its first eos, decoded
    with guesses from `drafts` verified in batched cached forwards (see the module notes).

    Each round feeds every open row `[last verified token] + guess` (the whole prompt + guess at the first round),
    left padded to the round's width `W`: `input_ids [R, W]`, `position_ids [R, W]` (each row's own positions),
    `attention_mask [R, cached columns + W]` (zero on padding and on the holes of rejected guesses). Rows that are
    done leave the batch and the cache (`batch_select_indices`). Logits are kept for the last `1 + longest guess`
    columns only (`logits_to_keep`, when the model takes it).
    """
    model = unwrap_model(model)  # a PEFT model's base model (adapters active) names its forward's arguments
    device = model.get_input_embeddings().weight.device
    eos = set(eos_ids)
    own, shared = drafts.indexes(prompts)
    parameters = inspect.signature(model.forward).parameters
    cache_name = next((name for name in ("cache", "past_key_values") if name in parameters), None)
    if cache_name is None or "position_ids" not in parameters:
        raise ValueError(f"{type(model).__name__}.forward takes no KV cache or no position_ids")
    keeps_logits = "logits_to_keep" in parameters
    answers: list[list[int]] = [[] for _ in prompts]
    feed = [list(p) for p in prompts]  # per prompt: verified tokens not in the cache yet
    guesses = []
    for i, prompt in enumerate(prompts):
        last = drafts.last(prompt)
        guesses.append(last[: budget - 1] if last else guess_continuation(prompt, own[i], shared, budget - 1))
    cached = [0] * len(prompts)  # per prompt: tokens in the cache (the position of the next one)
    rows = list(range(len(prompts)))  # the open prompts, in cache batch order
    mask = torch.zeros((len(rows), 0), dtype=torch.long)
    cache = None
    while rows:
        chunks = [feed[i] + guesses[i] for i in rows]
        width = max(len(chunk) for chunk in chunks)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        chunk_mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (i, chunk) in enumerate(zip(rows, chunks)):
            input_ids[b, width - len(chunk) :] = torch.tensor(chunk)
            chunk_mask[b, width - len(chunk) :] = 1
            positions[b, width - len(chunk) :] = torch.arange(cached[i], cached[i] + len(chunk))
        mask = torch.cat([mask, chunk_mask], dim=1)
        keep = 1 + max(len(guesses[i]) for i in rows)
        kwargs = {cache_name: cache, "use_cache": True} | ({"logits_to_keep": keep} if keeps_logits else {})
        output = model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), **kwargs
        )
        cache = getattr(output, cache_name)
        greedy = output.logits[:, -keep:].argmax(-1).tolist()
        still_open = []
        for b, i in enumerate(rows):
            guess = guesses[i]
            matched = 0  # guess tokens that are the greedy ones
            for j, token in enumerate(greedy[b][keep - len(guess) - 1 :]):
                answers[i].append(token)
                if token in eos or len(answers[i]) >= budget or j == len(guess) or token != guess[j]:
                    break
                matched += 1
            if matched < len(guess):
                mask[b, mask.shape[1] - len(guess) + matched :] = 0
            cached[i] += len(feed[i]) + matched
            if answers[i][-1] not in eos and len(answers[i]) < budget:
                still_open.append(b)
                feed[i] = [answers[i][-1]]
                limit = budget - len(answers[i]) - 1
                guesses[i] = guess_continuation(prompts[i] + answers[i], own[i], shared, limit)
        if len(still_open) < len(rows):
            if still_open:
                cache.batch_select_indices(torch.tensor(still_open, device=device))
            mask = mask[still_open]
            rows = [rows[b] for b in still_open]
    return answers


def answer_tokens(completion: list[int], eos_ids: list[int]) -> list[int]:
    """`completion` up to and including its first eos token (all of it when it has none)."""
    for position, token_id in enumerate(completion):
        if token_id in eos_ids:
            return completion[: position + 1]
    return completion
