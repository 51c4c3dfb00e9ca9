"""Collectives across the ranks of a `torch.distributed` job, each a no-op on one process.

Every rank must call each of these in the same order (they are collectives). Flags and small vectors travel as
float64 tensors on the backend's device (CUDA for NCCL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from trl_ntk.batches import TokenLabels

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _backend_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: Tensor) -> Tensor:
    """`tensor` summed over the ranks, in place (returned for chaining); unchanged on one process."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def max_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise maximum of `values` over the ranks (the values themselves on one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_backend_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on at least one rank."""
    return max_over_ranks([float(flag)])[0] > 0


def every_rank(flag: bool) -> bool:
    """Whether `flag` holds on every rank."""
    return max_over_ranks([-float(flag)])[0] < 0


def gather_objects(value: T) -> list[T]:
    """`[value of rank 0, value of rank 1, ...]` (picklable values); `[value]` on one process."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def concat_renumbered(parts: Sequence[TokenLabels], reference: Sequence[TokenLabels] | None = None) -> TokenLabels:
    """Labels of several ranks (or micro-batches) concatenated so that examples and sequence groups stay distinct:
    part `r`'s numbers are shifted past those of parts `< r`. `reference[r]` (defaults to `parts[r]`) gives the
    numbers part `r` spans, for when `parts[r]` is a subset of them."""
    reference = parts if reference is None else reference
    groups, examples, sequence_groups = [], [], []
    example_offset = sequence_offset = 0
    for part, spans in zip(parts, reference, strict=True):
        groups.append(part.group)
        examples.append(part.example + example_offset)
        sequence_groups.append(part.sequence_group + sequence_offset)
        if spans.example.numel():
            example_offset += int(spans.example.max()) + 1
            sequence_offset += int(spans.sequence_group.max()) + 1
    return TokenLabels(group=torch.cat(groups), example=torch.cat(examples), sequence_group=torch.cat(sequence_groups))
