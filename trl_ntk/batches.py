"""The token batch every computation in the package takes: which tokens of which sequences are scored.

A target is a token `input_ids[b, t]` scored given its prefix `input_ids[b, :t]`; targets are ordered row-major
over the `True` entries of `target_mask`, so a target index `m` means the same token everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """Sequences and the tokens scored in them.

    Args:
        input_ids (`Tensor[B, T]`, long): token ids, left or right padded.
        attention_mask (`Tensor[B, T]`): 1 on real tokens, 0 on padding.
        target_mask (`Tensor[B, T]`, bool): `True` at `t` when `input_ids[b, t]` is a target, scored as
            `log pi(input_ids[b, t] | input_ids[b, :t])`. Never `True` at `t = 0` or on padding.
        position_ids (`Tensor[B, T]`, *optional*): passed to the model when the trainer passed them (padding-free).
        temperature (`float`, *optional*, defaults to `1.0`): the log-probs are `log_softmax(z / temperature)`,
            as the trainer scores them (GRPO scores at its sampling temperature).
        model_kwargs (`dict`, *optional*): any other keyword inputs the trainer's forward received
            (`{"attention_mask": None}` when it received no attention mask: the model then finds the sequence
            boundaries from `position_ids`, as in the trainer's padding-free forward).
        label_ids (`Tensor[B, T]`, long, *optional*): the token scored at each target when it is not the input
            token there (a collator that perturbs labels); `None`: the target is `input_ids[b, t]`.
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor
    position_ids: Tensor | None = None
    temperature: float = 1.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    label_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(self.input_ids.shape)}")
        if self.attention_mask.shape != self.input_ids.shape or self.target_mask.shape != self.input_ids.shape:
            raise ValueError(
                "input_ids, attention_mask and target_mask must share one [B, T] shape, got "
                f"{tuple(self.input_ids.shape)}, {tuple(self.attention_mask.shape)}, {tuple(self.target_mask.shape)}"
            )
        self.target_mask = self.target_mask.bool()
        if self.target_mask[:, 0].any():
            raise ValueError("target_mask is True at t = 0: the first token has no prefix to be scored against")

    @classmethod
    def from_labels(
        cls,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        *,
        position_ids: Tensor | None = None,
        temperature: float = 1.0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> TokenBatch:
        """Build from Hugging Face labels `[B, T]` (`-100` = not scored; the label at `t` is the token at `t`)."""
        target_mask = labels != -100
        target_mask[:, 0] = False
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            target_mask=target_mask & attention_mask.bool(),
            position_ids=position_ids,
            temperature=temperature,
            model_kwargs=dict(model_kwargs or {}),
        )

    @classmethod
    def coerce(cls, batch: TokenBatch | Mapping[str, Any]) -> TokenBatch:
        """Accept a `TokenBatch` or a mapping with the same keys."""
        if isinstance(batch, TokenBatch):
            return batch
        known = {"input_ids", "attention_mask", "target_mask", "position_ids", "temperature", "model_kwargs"}
        unknown = set(batch) - known
        if unknown:
            raise ValueError(f"unknown token-batch keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**dict(batch))

    @property
    def num_targets(self) -> int:
        """`M`, the number of scored tokens."""
        return int(self.target_mask.sum())

    @property
    def targets(self) -> Tensor:
        """`[M]` the target token ids, row-major."""
        return (self.input_ids if self.label_ids is None else self.label_ids)[self.target_mask]

    def to(self, device: torch.device | str) -> TokenBatch:
        """A copy on `device`."""
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.model_kwargs.items()}
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            target_mask=self.target_mask.to(device),
            position_ids=None if self.position_ids is None else self.position_ids.to(device),
            model_kwargs=moved,
            label_ids=None if self.label_ids is None else self.label_ids.to(device),
        )

    def forward_kwargs(self) -> dict[str, Any]:
        """Keyword inputs for the model's forward (no labels, no fused head)."""
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        kwargs.update(self.model_kwargs)
        return kwargs


def concat_token_batches(batches: list[TokenBatch], pad_token_id: int = 0) -> TokenBatch:
    """Concatenate along B, right-padding shorter ones to the longest T (targets keep their row-major order).

    All batches must share one temperature and carry no extra model kwargs.
    """
    if not batches:
        raise ValueError("no token batches to concatenate")
    if len({b.temperature for b in batches}) != 1:
        raise ValueError("cannot concatenate token batches scored at different temperatures")
    if any(b.model_kwargs for b in batches):
        raise ValueError("cannot concatenate token batches that carry extra model kwargs")
    length = max(b.input_ids.shape[1] for b in batches)

    def pad(x: Tensor, value: int | bool) -> Tensor:
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    has_positions = [b.position_ids is not None for b in batches]
    if any(has_positions) and not all(has_positions):
        raise ValueError("cannot concatenate token batches with and without position_ids")
    return TokenBatch(
        input_ids=torch.cat([pad(b.input_ids, pad_token_id) for b in batches]),
        attention_mask=torch.cat([pad(b.attention_mask, 0) for b in batches]),
        target_mask=torch.cat([pad(b.target_mask, False) for b in batches]),
        position_ids=torch.cat([pad(b.position_ids, 0) for b in batches]) if all(has_positions) else None,
        temperature=batches[0].temperature,
        label_ids=None
        if all(b.label_ids is None for b in batches)
        else torch.cat([pad(b.input_ids if b.label_ids is None else b.label_ids, pad_token_id) for b in batches]),
    )


def target_rows(batch: TokenBatch) -> Tensor:
    """`[M]` the row of every target of `batch` (row-major order)."""
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    return rows[:, None].expand_as(batch.target_mask)[batch.target_mask]


def select_rows(batch: TokenBatch, rows: Tensor) -> TokenBatch:
    """The token batch restricted to the rows where `rows [B]` (bool) is True; targets keep their order."""
    rows = rows.to(batch.input_ids.device)
    return TokenBatch(
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        target_mask=batch.target_mask[rows],
        position_ids=None if batch.position_ids is None else batch.position_ids[rows],
        temperature=batch.temperature,
        model_kwargs=dict(batch.model_kwargs),
        label_ids=None if batch.label_ids is None else batch.label_ids[rows],
    )


@dataclass
class CapturedMicroBatch:
    """One training forward of the step and the gradient the loss sent back through it.

    Args:
        batch (`TokenBatch`): the forward's inputs; targets are the positions with a label.
        grad_coeffs (`Tensor[M]`): `c_l = dL / d lp_l` for the `M` targets of `batch` (row-major), as the
            trainer's backward produced it (accumulation scaling included, before clipping and before any
            cross-rank averaging). `None` until the backward ran.
        loss_call (`int`): index of the `compute_loss` call (the trainer's micro-batch) this forward belongs to.
        row_offset (`int`): the first row of this forward within that call's inputs (trainers may split a
            micro-batch into several forwards).
        loss_inputs (`dict`): the inputs the trainer's `compute_loss` received (for the trainer adapters).
        logit_residual (`Tensor[N, V]`, *optional*): for losses on the plain logits, the residual `r` of `dL/dz`
            at the `N` logit positions in `residual_positions` (see the module docstring); `None` with the fused
            head, or when the residual is zero to float precision (a plain cross-entropy).
        residual_positions (`Tensor[B, T-1]` bool, *optional*): the logit positions of `logit_residual` (position
            `t` predicts token `t + 1`), row-major.
        entropy_grads (`Tensor[M]`, *optional*): `dL / dH_l` for a loss with an entropy term on the fused head's
            per-token entropies `H_l` (GRPO's entropy bonus), at the `M` targets; turned into a logit residual
            before the analysis (`capture.add_entropy_residuals`).
        rng_state (*optional*): the random-number generator state and train mode at the start of this forward
            (`analysis.guard.RngState`), set when the model draws random numbers in its forward (dropout, NEFTune)
            so that the analysis forwards can draw the same ones.
    """

    batch: TokenBatch
    grad_coeffs: Tensor | None = None
    loss_call: int = 0
    row_offset: int = 0
    loss_inputs: dict[str, Any] = field(default_factory=dict)
    logit_residual: Tensor | None = None
    residual_positions: Tensor | None = None
    entropy_grads: Tensor | None = None
    rng_state: Any = None


@dataclass(frozen=True)
class TokenLabels:
    """Adapter names for the targets of one captured micro-batch.

    Args:
        group (`Tensor[M]`, long): index into the adapter's `group_names` for every target.
        example (`Tensor[M]`, long): the example each target comes from (SFT row, DPO pair, GRPO completion),
            numbered within the optimizer step.
        sequence_group (`Tensor[M]`, long): GRPO's group (prompt) index within the step; the example index
            elsewhere.
    """

    group: Tensor
    example: Tensor
    sequence_group: Tensor
