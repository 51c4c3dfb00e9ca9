"""Tiny SFT, DPO and GRPO trainers on the toy default, shared by the tests (seconds each on one CPU thread)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl_ntk.demo import toy


def _common(output_dir: Path, **overrides: Any) -> dict[str, Any]:
    args = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "max_grad_norm": 0.0,
        "bf16": False,  # on CPU transformers would otherwise train under bf16 autocast
    }
    args.update(overrides)
    return args


def sft_trainer(output_dir: Path, warmup: bool | str = "pretrain", n: int = 32, dtype: Any = None, **overrides: Any):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = toy.model_and_tokenizer(warmup=warmup)
    if dtype is not None:
        model = model.to(dtype)
    data = (
        toy.preference_dataset(n=n, seed=0).select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    )
    config = SFTConfig(**_common(output_dir, **overrides), max_length=128)
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)


def dpo_trainer(output_dir: Path, warmup: bool | str = True, n: int = 32, dtype: Any = None, **overrides: Any):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = toy.model_and_tokenizer(warmup=warmup)
    if dtype is not None:
        model = model.to(dtype)
    data = toy.preference_dataset(n=n, seed=0)
    config = DPOConfig(**_common(output_dir, **overrides), max_length=128, beta=0.1)
    return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)


def grpo_trainer(output_dir: Path, warmup: bool | str = True, n: int = 32, **overrides: Any):
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = toy.model_and_tokenizer(warmup=warmup)
    data = toy.math_dataset(n=n, seed=0)
    defaults = {"num_generations": 4, "max_completion_length": 20, "temperature": 1.0}
    defaults.update(overrides)
    config = GRPOConfig(**_common(output_dir, **defaults))
    return GRPOTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, reward_funcs=toy.math_reward
    )
