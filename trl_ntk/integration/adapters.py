"""Per-trainer names for the captured training tokens, found through a small registry keyed by trainer class.

Everything else is generic: the split into positive-gradient (`c_l < 0`, pulled up) and negative-gradient
(`c_l > 0`, pushed down) tokens needs no adapter. An adapter only says which group a training token belongs to
(DPO: chosen or rejected row; GRPO: positive, negative or zero advantage completion; SFT: one group), which example
it comes from, and how the trainer's fused head scores it (temperature).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trl_ntk.batches import CapturedMicroBatch, TokenLabels, target_rows


@dataclass(frozen=True)
class TrainerAdapter:
    """How one TRL trainer names its training tokens.

    Args:
        kind (`str`): `"sft"`, `"dpo"` or `"grpo"`.
        group_names (`tuple[str, ...]`): names of the token groups, in index order.
        label_tokens (`Callable`): `(micro_batch, step_context) -> TokenLabels`.
        temperature (`Callable`): `trainer -> float`, the temperature of the trainer's fused log-prob head.
        validate (`Callable`): `trainer -> None`, raises `ValueError` for configurations that cannot be attributed.
    """

    kind: str
    group_names: tuple[str, ...]
    label_tokens: Callable[[CapturedMicroBatch, StepContext], TokenLabels]
    temperature: Callable[[object], float] = lambda trainer: 1.0
    validate: Callable[[object], None] = lambda trainer: None


@dataclass
class StepContext:
    """Numbering that spans the micro-batches of one optimizer step (examples, GRPO prompt groups)."""

    examples_seen: int = 0
    last_loss_call: int = -1
    loss_call_offset: int = 0
    prompt_groups: dict[tuple[int, ...], int] = field(default_factory=dict)


def _loss_call_rows(micro_batch: CapturedMicroBatch, context: StepContext) -> Tensor:
    """`[B]` row index of each forward row within its `compute_loss` call; advances the step's example count."""
    if micro_batch.loss_call != context.last_loss_call:
        context.loss_call_offset = context.examples_seen
        context.last_loss_call = micro_batch.loss_call
    num_rows = micro_batch.batch.input_ids.shape[0]
    context.examples_seen = max(context.examples_seen, context.loss_call_offset + micro_batch.row_offset + num_rows)
    return torch.arange(num_rows) + micro_batch.row_offset


def _label_sft(micro_batch: CapturedMicroBatch, context: StepContext) -> TokenLabels:
    rows = _loss_call_rows(micro_batch, context)
    example = (rows + context.loss_call_offset)[target_rows(micro_batch.batch).cpu()]
    return TokenLabels(group=torch.zeros_like(example), example=example, sequence_group=example)


def _label_dpo(micro_batch: CapturedMicroBatch, context: StepContext) -> TokenLabels:
    rows = _loss_call_rows(micro_batch, context)
    total_rows = micro_batch.loss_inputs["input_ids"].shape[0]
    if total_rows % 2:
        raise RuntimeError(f"DPO micro-batch has {total_rows} rows; expected chosen and rejected halves")
    pairs = total_rows // 2
    call_rows = rows[target_rows(micro_batch.batch).cpu()]
    group = (call_rows >= pairs).long()  # 0 chosen, 1 rejected
    example = call_rows % pairs + context.loss_call_offset // 2
    return TokenLabels(group=group, example=example, sequence_group=example)


def _label_grpo(micro_batch: CapturedMicroBatch, context: StepContext) -> TokenLabels:
    rows = _loss_call_rows(micro_batch, context)
    inputs = micro_batch.loss_inputs
    advantages = inputs["advantages"]
    if advantages.dim() == 2:  # per-token advantages (e.g. reweighted): the sign is the completion's
        advantages = advantages.sum(dim=1)
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    row_group = []
    for row in rows.tolist():
        key = tuple(prompt_ids[row][prompt_mask[row].bool()].tolist())
        row_group.append(context.prompt_groups.setdefault(key, len(context.prompt_groups)))
    row_advantage = advantages[rows.to(advantages.device)].cpu()
    row_label = torch.where(row_advantage > 0, 0, torch.where(row_advantage < 0, 1, 2))
    local = target_rows(micro_batch.batch).cpu()
    example = (rows + context.loss_call_offset)[local]
    return TokenLabels(
        group=row_label[local].long(),
        example=example,
        sequence_group=torch.tensor(row_group, dtype=torch.long)[local],
    )


def _validate_dpo(trainer: object) -> None:
    args = trainer.args  # type: ignore[attr-defined]
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "DPOTrainer with use_liger_kernel=True computes its loss outside the model's log-probs; "
            "learning-dynamics attribution needs use_liger_kernel=False"
        )
    if getattr(args, "padding_free", False):
        raise ValueError(
            "DPOTrainer with padding_free=True packs chosen and rejected rows; "
            "learning-dynamics attribution needs padding_free=False"
        )


def _validate_grpo(trainer: object) -> None:
    args = trainer.args  # type: ignore[attr-defined]
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "GRPOTrainer with use_liger_kernel=True computes its loss outside the model's log-probs; "
            "learning-dynamics attribution needs use_liger_kernel=False"
        )


ADAPTERS: dict[str, TrainerAdapter] = {
    "SFTTrainer": TrainerAdapter("sft", ("sft",), _label_sft),
    "DPOTrainer": TrainerAdapter("dpo", ("chosen", "rejected"), _label_dpo, validate=_validate_dpo),
    "GRPOTrainer": TrainerAdapter(
        "grpo",
        ("positive_advantage", "negative_advantage", "zero_advantage"),
        _label_grpo,
        temperature=lambda trainer: float(trainer.temperature),  # type: ignore[attr-defined]
        validate=_validate_grpo,
    ),
}


def adapter_for(trainer: object) -> TrainerAdapter:
    """The adapter of the nearest registered TRL trainer class in `type(trainer).__mro__`.

    Raises:
        ValueError: for a trainer that is not (a subclass of) SFTTrainer, DPOTrainer or GRPOTrainer.
    """
    for cls in type(trainer).__mro__:
        if cls.__module__.startswith("trl") and cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise ValueError(
        f"{type(trainer).__name__} is not supported: trl_ntk attributes SFTTrainer, DPOTrainer and GRPOTrainer "
        f"(and their subclasses); supported: {sorted(ADAPTERS)}"
    )


def label_step(adapter: TrainerAdapter, micro_batches: list[CapturedMicroBatch]) -> list[TokenLabels]:
    """Names for every target of every micro-batch of one optimizer step, numbered across the step."""
    context = StepContext()
    return [adapter.label_tokens(mb, context) for mb in micro_batches]
