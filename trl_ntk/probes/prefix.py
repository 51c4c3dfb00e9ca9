"""Rows that share a prompt, scored with one forward of the prompt: its keys and values (a KV cache) are computed
once per group of rows with the same prefix, and the rows' remaining tokens run as one batch after it.

A probe set holds several responses per prompt (chosen, rejected, rephrases, other prompts' answers, the model's
own), each scored after the same prompt tokens; the plain forward re-encodes the prompt in every row. Here row `r`
with its first target at `t_r` has the prefix `[0, t_r - 1)`: no hidden state there is scored, so the prefix can
run once for every row with the same prefix tokens (same ids, attention mask and `position_ids`). The prefixes of
a chunk of groups run as one right-padded batch with `use_cache`; the cache is indexed out to one entry per row
(`Cache.batch_select_indices`), and the rows' suffixes `[L_r, T)` run as a right-padded batch after it with
attention mask `[prefix mask (zero past L_r), suffix mask]` and explicit positions (`position_ids[r, L_r:]`, or
`L_r + k` when the batch has none: the model's default `arange(T)` of a right-padded row). Causal attention makes
every suffix position see exactly the keys the plain forward shows it, so the hidden states agree up to float
rounding (about 1e-6 in float32).

Cost: `sum_g L_g + sum_r (T - L_r)` positions instead of `B T`, one extra small forward per chunk.

Used only when every check holds (`supports_shared_prefix`), else the rows are scored plainly:
- the batch carries no extra model inputs and, without `position_ids`, a row's prefix has no padding (models
  that derive positions from the attention mask, e.g. OPT, then agree with `arange`);
- the decoder body's `forward` takes `inputs_embeds`, `position_ids`, `use_cache` and a cache argument
  (`cache`, or `past_key_values`);
- `DynamicCache(config=...)` of the model has only plain full-attention layers (`DynamicLayer`: no sliding window,
  no linear-attention or recurrent state);
- checked once per model against the plain forward on two rows (`verify`); a mismatch disables it for that model.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trl_ntk._model import decoder_and_head, text_config
from trl_ntk.batches import TokenBatch

logger = logging.getLogger(__name__)

_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Per model: the outcome of the one-time check of the shared-prefix forward against the plain forward."""

_CACHE_ARGUMENT: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()
"""Per model: `cache_argument`'s answer."""

VERIFY_ATOL = 1e-3
"""Largest difference in a token log-prob (nats) the one-time check accepts; a real mismatch (wrong positions, a
cache the model ignores) is of order 0.1-10."""


@dataclass
class PrefixGroups:
    """Rows grouped by a shared prefix.

    Args:
        group_of (`Tensor[B]`, long): the group of each row, `-1` for rows scored plainly (a prefix of length 0,
            padding in the prefix of a batch without `position_ids`, or no other row with the same prefix).
        lengths (`list[int]`): prefix length `L_g` per group.
        source_row (`list[int]`): per group, a row whose first `L_g` tokens are the prefix.
    """

    group_of: Tensor
    lengths: list[int]
    source_row: list[int]

    @property
    def shared_rows(self) -> list[int]:
        """Rows scored after a shared prefix, grouped (rows of a group are adjacent), in row order within a group."""
        order = sorted((int(g), row) for row, g in enumerate(self.group_of.tolist()) if g >= 0)
        return [row for _, row in order]

    @property
    def plain_rows(self) -> list[int]:
        return (self.group_of < 0).nonzero().flatten().tolist()


def group_prefixes(batch: TokenBatch) -> PrefixGroups:
    """Group the rows of `batch` by prefix `[0, t_r - 1)` (`t_r`: the row's first target); see the module notes.

    Cost: `O(B T)` on the CPU (the rows' prefixes as tuples)."""
    input_ids, attention_mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    position_ids = None if batch.position_ids is None else batch.position_ids.cpu()
    first_target = batch.target_mask.cpu().float().argmax(dim=1)
    members: dict[tuple, list[int]] = {}
    for row in range(input_ids.shape[0]):
        length = int(first_target[row]) - 1
        if length < 1:
            continue
        mask = attention_mask[row, :length]
        if position_ids is None and not bool(mask.all()):
            continue
        key = (tuple(input_ids[row, :length].tolist()), tuple(mask.tolist()))
        if position_ids is not None:
            key += (tuple(position_ids[row, :length].tolist()),)
        members.setdefault(key, []).append(row)
    group_of = torch.full((input_ids.shape[0],), -1, dtype=torch.long)
    lengths, source_row = [], []
    for key, rows in members.items():
        if len(rows) < 2:
            continue
        group_of[rows] = len(lengths)
        lengths.append(len(key[0]))
        source_row.append(rows[0])
    return PrefixGroups(group_of, lengths, source_row)


def cache_argument(model: nn.Module) -> str | None:
    """The decoder body's keyword for a KV cache (`"cache"` or `"past_key_values"`), or `None` when its forward
    does not take one with `inputs_embeds`, `position_ids` and `use_cache`, or the model's `DynamicCache` has layers
    other than plain full attention. Found once per model."""
    if model not in _CACHE_ARGUMENT:
        _CACHE_ARGUMENT[model] = _find_cache_argument(model)
    return _CACHE_ARGUMENT[model]


def _find_cache_argument(model: nn.Module) -> str | None:
    try:
        decoder, _ = decoder_and_head(model)
        parameters = inspect.signature(decoder.forward).parameters
    except (ValueError, TypeError):
        return None
    if not {"inputs_embeds", "position_ids", "use_cache"} <= set(parameters):
        return None
    name = next((n for n in ("cache", "past_key_values") if n in parameters), None)
    return name if name is not None and has_plain_cache(model) else None


def has_plain_cache(model: nn.Module) -> bool:
    """Whether the model's `DynamicCache` (built from its text config) has only plain full-attention layers
    (`DynamicLayer`: no sliding window, no linear-attention or recurrent state), whose columns can be indexed,
    selected by row and masked freely."""
    config = text_config(model)
    if config is None:
        return False
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - a config the cache cannot be built from: not supported
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def shared_prefix_hidden(model: nn.Module, batch: TokenBatch, groups: PrefixGroups, rows: list[int]) -> Tensor:
    """`[M_rows, H]` final hidden states predicting the targets of `rows` (all in groups, adjacent per group), in
    the order of `rows` then position, from one prefix forward of their groups and one suffix forward.

    Shapes: prefix batch `[G, max L_g]`, suffix batch `[R, S]` with `S = max_r (end_r - L_r)` (`end_r`: one past
    the row's last real token). No grad is needed or assumed; the model runs in its current mode.
    """
    from transformers.cache_utils import DynamicCache

    decoder, _ = decoder_and_head(model)
    cache_name = cache_argument(model)
    embeddings = decoder.get_input_embeddings()
    row_index = torch.tensor(rows, device=batch.input_ids.device)
    group_ids = groups.group_of[rows]
    chunk_groups = sorted(set(group_ids.tolist()))
    local = {g: i for i, g in enumerate(chunk_groups)}
    lengths = torch.tensor([groups.lengths[g] for g in chunk_groups])
    sources = [groups.source_row[g] for g in chunk_groups]
    prefix_ids, prefix_mask, prefix_positions = _right_aligned(batch, sources, lengths, lengths.new_zeros(len(sources)))
    cache = DynamicCache(config=text_config(model))
    decoder(
        inputs_embeds=embeddings.forward(prefix_ids),
        attention_mask=prefix_mask,
        position_ids=prefix_positions,
        use_cache=True,
        **{cache_name: cache},
    )
    cache.batch_select_indices(torch.tensor([local[g] for g in group_ids.tolist()], device=prefix_ids.device))
    starts = lengths[[local[g] for g in group_ids.tolist()]]
    ends = _row_ends(batch.attention_mask[row_index].cpu())
    suffix_ids, suffix_mask, suffix_positions = _right_aligned(batch, rows, ends - starts, starts)
    if suffix_positions is None:
        steps = torch.arange(suffix_ids.shape[1])
        suffix_positions = (starts[:, None] + steps[None]).to(suffix_ids.device)
    outputs = decoder(
        inputs_embeds=embeddings.forward(suffix_ids),
        attention_mask=torch.cat([prefix_mask[[local[g] for g in group_ids.tolist()]], suffix_mask], dim=1),
        position_ids=suffix_positions,
        use_cache=True,
        **{cache_name: cache},
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    targets = _right_aligned_targets(batch, rows, ends - starts, starts, suffix_ids.shape[1])
    return hidden[:, :-1][targets[:, 1:]]


def verify(model: nn.Module, plain: Tensor, shared: Tensor) -> bool:
    """Record (once per model) whether the shared-prefix log-probs `shared` match the plain ones `plain`."""
    agree = plain.shape == shared.shape and bool(torch.allclose(plain, shared, rtol=0.0, atol=VERIFY_ATOL))
    if not agree:
        logger.warning(
            "%s: scoring after a shared prompt prefix does not reproduce the plain forward; scoring every row "
            "plainly for this model",
            type(model).__name__,
        )
    _VERIFIED[model] = agree
    return agree


def disable(model: nn.Module) -> None:
    """Score this model plainly from now on (its shared-prefix forward failed), with a warning."""
    logger.warning(
        "%s: the shared-prefix forward failed; scoring every row plainly for this model", type(model).__name__
    )
    _VERIFIED[model] = False


def verified(model: nn.Module) -> bool | None:
    """`True` / `False` once `verify` has run for this model, `None` before."""
    return _VERIFIED.get(model)


def _row_ends(attention_mask: Tensor) -> Tensor:
    """`[B]` one past the last real token of each row."""
    columns = torch.arange(1, attention_mask.shape[1] + 1)
    return (attention_mask.bool() * columns).max(dim=1).values


def _right_aligned(
    batch: TokenBatch, rows: list[int], lengths: Tensor, starts: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`(input_ids, attention_mask, position_ids or None)` `[len(rows), max lengths]`: row `i` holds columns
    `[starts[i], starts[i] + lengths[i])` of batch row `rows[i]`, right padded (token 0, mask 0, position 0)."""
    width = int(lengths.max())
    device = batch.input_ids.device
    columns = torch.arange(width, device=device)
    starts, lengths = starts.to(device), lengths.to(device)
    valid = columns[None] < lengths[:, None]
    index = (starts[:, None] + columns[None]).clamp(max=batch.input_ids.shape[1] - 1)
    row_index = torch.tensor(rows, device=device)[:, None]

    def take(values: Tensor) -> Tensor:
        return torch.where(valid, values[row_index, index], torch.zeros_like(values[row_index, index]))

    positions = None if batch.position_ids is None else take(batch.position_ids)
    return take(batch.input_ids), take(batch.attention_mask), positions


def _right_aligned_targets(batch: TokenBatch, rows: list[int], lengths: Tensor, starts: Tensor, width: int) -> Tensor:
    """The target mask cut out as `_right_aligned` cuts the tokens."""
    device = batch.input_ids.device
    columns = torch.arange(width, device=device)
    starts, lengths = starts.to(device), lengths.to(device)
    valid = columns[None] < lengths[:, None]
    index = (starts[:, None] + columns[None]).clamp(max=batch.input_ids.shape[1] - 1)
    return batch.target_mask[torch.tensor(rows, device=device)[:, None], index] & valid
