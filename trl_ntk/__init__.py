"""trl_ntk: learning dynamics of TRL post-training, token by token (empirical-NTK x gradient attributions)."""

__version__ = "0.1.0"
