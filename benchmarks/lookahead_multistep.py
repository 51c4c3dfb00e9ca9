"""Multi-step look-ahead on the toy DPO task: the probes' change after k full-batch SGD steps on a candidate set of
pairs, predicted from the eNTK at the start (once, and re-linearised every few steps) and by `k` times the one-step
effect, against real training. Float64, one CPU thread.

    python benchmarks/lookahead_multistep.py --pairs 16 --lr 0.05 --steps 1 5 20
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from trl_ntk.analysis import lookahead
from trl_ntk.analysis import lookahead_multistep as ms
from trl_ntk.batches import target_rows
from trl_ntk.integration.capture import GradientCapture
from trl_ntk.integration.lookahead import _capture_batch, _default_probes, _inputs, toy_trainer
from trl_ntk.ntk.logprobs import target_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="candidate pairs (<= 32)")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.05])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--relinearise-every", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = toy_trainer("dpo", tempfile.mkdtemp(), num_rows=64, beta=args.beta)
    model = trainer.model.to(torch.float64).eval()
    capture = GradientCapture(model)
    try:
        (micro_batch,) = _capture_batch(trainer, model, capture, _inputs(trainer, list(range(args.pairs)), "cpu"))
    finally:
        capture.remove()
    train = micro_batch.batch
    encoded = _default_probes(trainer, "dpo").select(["chosen", "rejected"]).encode(trainer.processing_class)
    names, weights = lookahead.probe_weights(encoded)
    weights = weights.double()
    z0 = target_logprobs(model, train).double()
    sequence = target_rows(train)
    loss_fn = ms.dpo_sigmoid_loss(sequence, ms.sequence_sums(z0, sequence, 2 * args.pairs), beta=args.beta)
    gap = (ms.loss_gradient(loss_fn, z0) - micro_batch.grad_coeffs.double()).abs().max()
    print(f"pairs={args.pairs} training tokens Mt={train.num_targets} probes={names} beta={args.beta}")
    print(f"max |dL/dz - trainer c_l| = {float(gap):.1e}")
    k = max(args.steps)
    for lr in args.lr:
        start = time.perf_counter()
        real = ms.real_training(model, train, encoded.batch, weights, loss_fn, lr=lr, steps=k).probe_change
        t_real = time.perf_counter() - start
        start = time.perf_counter()
        once = ms.linearised_training(
            model, train, encoded.batch, weights, loss_fn, lr=lr, steps=k, chunk_size=64
        ).probe_change
        t_once = time.perf_counter() - start
        again = ms.linearised_training(
            model,
            train,
            encoded.batch,
            weights,
            loss_fn,
            lr=lr,
            steps=k,
            relinearise_every=args.relinearise_every,
            chunk_size=64,
        ).probe_change
        steps = torch.arange(k + 1, dtype=torch.float64)[:, None]
        frozen = steps * once[1]  # k times the one-step effect
        print(f"\nlr={lr}  (real {t_real:.1f}s, linearised once {t_once:.1f}s)")
        print(
            "| k | real change (chosen, rejected) | rel. error: k x one-step | eNTK once | "
            f"eNTK re-linearised every {args.relinearise_every} |"
        )
        print("|---|---|---|---|---|")
        for s in args.steps:
            errors = [float(ms.relative_error(p, real)[s]) for p in (frozen, once, again)]
            change = ", ".join(f"{v:+.3f}" for v in real[s].tolist())
            print(f"| {s} | {change} | " + " | ".join(f"{e:.2%}" for e in errors) + " |")


if __name__ == "__main__":
    main()
