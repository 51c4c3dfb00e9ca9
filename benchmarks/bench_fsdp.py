"""Cost of one analysis step under FSDP2 (finite differences on the shards) and under DDP, as plain steps.

    torchrun --nproc_per_node 2 benchmarks/bench_fsdp.py [--fsdp] [--steps 31] [--every-n-steps 10]

The toy DPO set-up of `tests/ddp_script.py` (2 pairs per rank, AdamW) trains on every rank with
`LearningDynamicsCallback` at `"none"` and at `"sums"`. A timing callback registered first measures every optimizer
step from `on_step_begin` to `on_step_end`; the analysis steps (multiples of `--every-n-steps`, step 0 excepted:
its optimizer has no history yet) are reported as a multiple of the median of the other steps. Run it once with
`--fsdp` and once without, on the same machine, to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import ddp_script, trainer_factory  # noqa: E402
from trl_ntk.integration import callbacks  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall seconds of every optimizer step, `global_step -> seconds` (the step before it was incremented)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds[state.global_step - 1] = time.perf_counter() - self.started


def measure(level: str, steps: int, every: int, fsdp: bool, output_dir: Path) -> tuple[float, list[float]]:
    """`(median plain step seconds, [analysis step / plain step for each analysis step after step 0])`."""
    options = {"max_steps": steps, "per_device_train_batch_size": 2, "n": 64}
    if fsdp:
        options.update(ddp_script.FSDP_OPTIONS)
    trainer = trainer_factory.dpo_trainer(output_dir, **options)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.add_callback(
        callbacks.LearningDynamicsCallback(
            trainer, every_n_steps=every, attribution=level, num_prompts=2, max_new_tokens=8, strict=True
        )
    )
    trainer.train()
    analysed = [step for step in timer.seconds if step % every == 0 and step > 0]
    plain = statistics.median(seconds for step, seconds in timer.seconds.items() if step % every != 0)
    return plain, [timer.seconds[step] / plain for step in analysed]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--every-n-steps", type=int, default=10)
    options = parser.parse_args()
    torch.set_num_threads(1)
    if options.fsdp:
        ddp_script._allow_fsdp_on_cpu()
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory() as folder:
        for level in ("none", "sums"):
            plain, multiples = measure(level, options.steps, options.every_n_steps, options.fsdp, Path(folder) / level)
            if rank == 0:
                setting = "fsdp2" if options.fsdp else "ddp"
                print(
                    f"{setting} {level}: plain step {plain * 1e3:.0f} ms; analysis steps "
                    f"{', '.join(f'{m:.1f}' for m in multiples)} plain steps",
                    flush=True,
                )


if __name__ == "__main__":
    main()
