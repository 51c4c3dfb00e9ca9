"""A tiny DPO training under DDP (CPU, gloo), run by `tests/test_distributed.py` through `torchrun`.

Usage: `torchrun --nproc_per_node 2 tests/ddp_script.py OUTPUT_DIR [--attribution sums] [--tokens-every 2] [--fsdp]`.

With `--fsdp` the trainers shard the model with FSDP2 (`fully_shard` per decoder layer and at the root). accelerate
enables FSDP for accelerator devices only, while torch's FSDP2 runs on CPU with gloo; the script lets accelerate
treat the CPU process group as a multi-device one, so that the trainer wraps the model as it would on GPUs.

Each rank trains the same toy DPO setup twice, without and with `LearningDynamicsCallback`, and writes
`OUTPUT_DIR/rank<r>.json` (losses of both runs, whether the final weights are identical, how many sink groups and
probe generations the callback made on that rank); the callback's own output goes to `OUTPUT_DIR/observed/dynamics/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import trainer_factory  # noqa: E402
from trl_ntk import _model  # noqa: E402
from trl_ntk.integration import callbacks  # noqa: E402


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _allow_fsdp_on_cpu() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original_init = PartialState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.MULTI_GPU  # accelerate's condition for honouring fsdp_plugin

    PartialState.__init__ = init


FSDP_OPTIONS = {
    "fsdp": "full_shard",
    "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--attribution", default="sums")
    parser.add_argument("--tokens-every", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--trainer", choices=["dpo", "grpo"], default="dpo")
    parser.add_argument("--fsdp", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    output_dir = Path(options.output_dir)
    rank = int(os.environ["RANK"])
    common = {"max_steps": options.max_steps, "per_device_train_batch_size": 2, "n": 16}
    if options.trainer == "grpo":
        common["per_device_train_batch_size"] = 4
    if options.fsdp:
        _allow_fsdp_on_cpu()
        common.update(FSDP_OPTIONS)
    make_trainer = getattr(trainer_factory, f"{options.trainer}_trainer")

    plain = make_trainer(output_dir / "plain", **common)
    plain.train()

    sink_groups = []

    def make_sinks(*args, **kwargs):
        sink_groups.append(real_make_sinks(*args, **kwargs))
        return sink_groups[-1]

    real_make_sinks, callbacks.make_sinks = callbacks.make_sinks, make_sinks
    generations = []

    def sample_responses(*args, **kwargs):
        generations.append(kwargs["seed"])
        return real_sample_responses(*args, **kwargs)

    real_sample_responses, callbacks.sample_responses = callbacks.sample_responses, sample_responses
    observed = make_trainer(output_dir / "observed", **common)
    callback = callbacks.LearningDynamicsCallback(
        observed,
        every_n_steps=1,
        attribution=options.attribution,
        tokens_every_n_steps=options.tokens_every,
        matrix_every_n_steps=None,  # the token matrix at every tokens-level step, to compare them across ranks
        num_prompts=2,
        max_new_tokens=8,
        strict=True,
    )
    observed.add_callback(callback)
    observed.train()

    same_weights = all(
        torch.equal(_model.local_shard(a), _model.local_shard(b))
        for a, b in zip(plain.model.parameters(), observed.model.parameters())
    )
    report = {
        "rank": rank,
        "world_size": observed.accelerator.num_processes,
        "distributed_type": str(observed.accelerator.distributed_type),
        "plain_losses": _losses(plain),
        "observed_losses": _losses(observed),
        "same_weights": same_weights,
        "is_main": observed.accelerator.is_main_process,
        "sink_groups_made": len(sink_groups),
        "generations": len(generations),
        "analysis_failures": callback.analysis_failures,
        "sharded": callback.sharded,
    }
    (output_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
