"""trl_ntk: learning dynamics of TRL post-training, token by token (empirical-NTK x gradient attributions)."""

__version__ = "0.1.0"

from trl_ntk.config import DynamicsArguments, DynamicsConfig, NTHRConfig  # noqa: E402
from trl_ntk.integration.callbacks import LearningDynamicsCallback  # noqa: E402
from trl_ntk.integration.nthr import NTHRCallback, NTHRGRPOTrainer  # noqa: E402
from trl_ntk.probes.probe_set import ProbeSet  # noqa: E402

__all__ = [
    "__version__",
    "DynamicsArguments",
    "DynamicsConfig",
    "LearningDynamicsCallback",
    "NTHRCallback",
    "NTHRConfig",
    "NTHRGRPOTrainer",
    "ProbeSet",
]
