"""trl_ntk: learning dynamics of TRL post-training, token by token (empirical-NTK x gradient attributions)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LearningDynamicsCallback": "trl_ntk.callbacks",
    "DynamicsConfig": "trl_ntk.callbacks",
    "ProbeSet": "trl_ntk.probes",
    "NTHRCallback": "trl_ntk.nthr",
    "NTHRGRPOTrainer": "trl_ntk.nthr",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import the public classes on first use, so `import trl_ntk` stays light."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trl_ntk' has no attribute {name!r}")
