"""Context managers that leave training undisturbed: every module's mode, and torch's global RNG state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of `model` in eval mode, and give each back the mode it had (even on error)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block on a fork of torch's global RNG state: CPU, every CUDA device, and `device`'s accelerator.

    `torch.manual_seed` inside the block seeds every device, so every device's state is saved and restored.
    """
    with contextlib.ExitStack() as stack:
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices, device_type="cuda"))
        if device.type not in ("cpu", "cuda", "meta"):
            backend = getattr(torch, device.type, None)
            if backend is not None and hasattr(backend, "device_count"):
                devices = list(range(backend.device_count()))
                stack.enter_context(torch.random.fork_rng(devices=devices, device_type=device.type))
        yield
