"""Checks made when `LearningDynamicsCallback` is built: parallel set-ups, adapters, set-ups whose randomness the
token level does not reproduce, the model's length limit, and the library versions logged with the run."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import transformers
import trl

from trl_ntk import __version__
from trl_ntk._model import text_config
from trl_ntk.analysis import guard
from trl_ntk.config import DynamicsConfig


def validate_parallelism(trainer: Any, config: DynamicsConfig) -> None:
    """Refuse, before training, the parallel set-ups the analysis cannot run under.

    FSDP2 (`fsdp_config={"fsdp_version": 2}`): every level but `"tokens"` (finite differences on the shards,
    `sharded.py`). FSDP1 and DeepSpeed ZeRO-3: not supported. DeepSpeed ZeRO-1/2: tracking (`"none"`) only, since
    DeepSpeed updates the weights before `on_pre_optimizer_step`.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and plugin is not None:
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "LearningDynamicsCallback supports FSDP2 only (it reads the parameter shards as DTensors); set "
                "fsdp_config={'fsdp_version': 2} in the training arguments"
            )
        logits_loss = getattr(trainer, "compute_loss_func", None) is not None or (
            getattr(trainer, "label_smoother", None) is not None
        )
        if logits_loss and config.attribution != "none":
            raise ValueError(
                "under FSDP the analysis covers losses on TRL's fused log-probs only; this trainer computes its loss "
                "from the plain logits (label smoothing or a compute_loss_func): use attribution='none' or drop them"
            )
        if getattr(getattr(trainer, "model", None), "peft_config", None) is not None:
            raise ValueError(
                "LearningDynamicsCallback does not support PEFT adapters under FSDP (its scoring and generation go "
                "through the base model, below the root FSDP module); train the adapter with DDP instead"
            )
        tokens = config.attribution == "tokens" or (config.attribution == "sums" and config.tokens_every_n_steps)
        if tokens or config.kernel_summaries:
            raise ValueError(
                "the 'tokens' level (and kernel_summaries) needs the full parameters on one process, which FSDP "
                "shards; use attribution='sums' without tokens_every_n_steps (finite differences on the shards) or "
                "train without FSDP for token attributions"
            )
        args = getattr(trainer, "args", None)
        if config.attribution != "none" and (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
            warnings.warn(
                "under FSDP with bf16/fp16 the forwards compute in half precision, which resolves about 4e-3 of a "
                "weight: the finite-difference predictions ('sums') are coarse there (only float32 was tested); "
                "the observed changes and the gradient check are unaffected",
                stacklevel=3,
            )
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(deepspeed, "zero_stage", 0) == 3:
        raise ValueError(
            "LearningDynamicsCallback does not support DeepSpeed ZeRO-3 (partitioned parameters, and the probe "
            "forwards would need every rank); use FSDP2 (fsdp_config={'fsdp_version': 2})"
        )
    if config.attribution != "none":
        raise ValueError(
            "under DeepSpeed the optimizer step runs inside the backward (accelerate's DeepSpeedEngineWrapper), "
            "before the trainer's on_pre_optimizer_step, so an update cannot be explained from before it; use "
            "attribution='none' (probe tracking), or DDP / FSDP2 for the step analysis"
        )


def validate_adapter(model: torch.nn.Module) -> None:
    """Refuse, before training, PEFT prompt-learning adapters (prompt / prefix / P-tuning): their virtual tokens
    change the forward's sequence layout, which the token-level analysis cannot name."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for name, peft_config in configs.items():
        if getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(
                f"LearningDynamicsCallback does not support the prompt-learning PEFT adapter {name!r} "
                f"({type(peft_config).__name__}): its virtual tokens are not tokens of the training batch, so the "
                "training tokens cannot be attributed; use a LoRA-type adapter (LoraConfig) or full fine-tuning"
            )


def warn_unreproduced(issues: list[guard.SetupIssue], config: DynamicsConfig) -> None:
    """Warn, before training, about set-ups the analysis does not reproduce: their steps are flagged untrusted."""
    replayed = [issue.name for issue in issues if issue.handled and issue.name in ("dropout", "neftune")]
    tokens = config.attribution == "tokens" or config.tokens_every_n_steps is not None
    if replayed and tokens:
        warnings.warn(
            f"the training forward draws random numbers ({', '.join(replayed)}): the gradient reconstruction, the "
            "predictions and their sign / group splits replay them exactly, but the 'tokens' level attributions are "
            "computed without them (the deterministic network), so their row sums differ from the prediction",
            stacklevel=3,
        )
    unhandled = [issue.detail for issue in issues if not issue.handled]
    if unhandled and config.attribution != "none":
        warnings.warn(
            "the learning-dynamics explanations of this run will be flagged untrusted (trusted: false in the "
            "records"
            + (", and strict=True raises at the first analysed step" if config.strict else "")
            + "): "
            + "; ".join(unhandled),
            stacklevel=3,
        )


def model_max_length(model: torch.nn.Module) -> int | None:
    return getattr(text_config(model), "max_position_embeddings", None)


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "trl_ntk": __version__,
    }
