"""Look-ahead: score every training example by the predicted first-order effect of one step on it on the probe
responses, before (or during) training. The maths, the cost, how to read the ranking and a worked example are in
docs/lookahead.md.

Usage:
```python
>>> from trl_ntk.lookahead import score_trainer, curate
>>> result = score_trainer(trainer, max_examples=200)  # any SFT / DPO / GRPO trainer built by the user
>>> result.write_jsonl("lookahead.jsonl")
>>> kept = curate(raw_dataset, result.effects, "chosen", fraction=0.1, indices=result.indices)
```

The command line form is `trl-ntk lookahead` (`trl-ntk lookahead -h`).
"""

from __future__ import annotations

from trl_ntk.analysis.lookahead import (
    ExampleEffects,
    ProbeDirections,
    adam_view,
    batch_effects,
    curate,
    direction_effect,
    exact_step_effect,
    harmful_examples,
    probe_directions,
    probe_weights,
    sgd_view,
    spearman,
    top_k_overlap,
)
from trl_ntk.integration.lookahead import (
    LookaheadConfig,
    LookaheadResult,
    build_trainer,
    load_optimizer_state,
    score_trainer,
    toy_trainer,
)
from trl_ntk.integration.lookahead_callback import LookaheadCallback

__all__ = [
    "ExampleEffects",
    "LookaheadCallback",
    "LookaheadConfig",
    "LookaheadResult",
    "ProbeDirections",
    "adam_view",
    "batch_effects",
    "build_trainer",
    "curate",
    "direction_effect",
    "exact_step_effect",
    "harmful_examples",
    "load_optimizer_state",
    "probe_directions",
    "probe_weights",
    "score_trainer",
    "sgd_view",
    "spearman",
    "top_k_overlap",
    "toy_trainer",
]
