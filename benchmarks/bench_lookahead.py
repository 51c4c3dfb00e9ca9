"""Look-ahead cost: scoring N training examples (JVP route) vs the naive route (one backward per example + dot
products with each probe direction), on the toy DPO trainer, CPU, one thread.

    python benchmarks/bench_lookahead.py [--sizes 8 16 32] [--kinds 2 4 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from trl_ntk.analysis import lookahead
from trl_ntk.integration.lookahead import _default_probes, _inputs, score_trainer, toy_trainer


def naive_scores(trainer, directions: lookahead.ProbeDirections, count: int) -> torch.Tensor:
    """`[N, R]`: `-<g_i, v_r>` with `g_i` the trainer's gradient on example `i` alone (one backward each)."""
    model = trainer.model.eval()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for row in range(count):
        loss = trainer.compute_loss(model, _inputs(trainer, [row], torch.device("cpu")))
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
        rows.append([-sum(float((grads[n] * d[n]).sum()) for n in grads) for d in directions.directions])
    return torch.tensor(rows, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--kinds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=1, help="examples per scored step of the look-ahead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = toy_trainer("dpo", tempfile.mkdtemp(), num_rows=max(args.sizes))
    all_kinds = _default_probes(trainer, "dpo").kinds
    print("| N | probe kinds R | look-ahead (s) | naive (s) | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for num_kinds in args.kinds:
            probes = _default_probes(trainer, "dpo").select(list(all_kinds[:num_kinds]))
            start = time.perf_counter()
            result = score_trainer(trainer, probes, max_examples=size, batch_size=args.batch_size)
            fast = time.perf_counter() - start
            encoded = probes.encode(trainer.processing_class)
            names, weights = lookahead.probe_weights(encoded)
            precond = lookahead.sgd_view(trainer.model, trainer.args.learning_rate)
            start = time.perf_counter()
            directions = lookahead.probe_directions(trainer.model, encoded.batch, weights, names, precond)
            naive = naive_scores(trainer, directions, size)
            slow = time.perf_counter() - start
            scale = 1.0 if args.batch_size == 1 else None  # batched shares differ from lone-example scores
            diff = (result.effects.total - naive).abs().max() / naive.abs().max() if scale else float("nan")
            print(f"| {size} | {len(names)} | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
