"""Look-ahead cost: scoring N training examples (JVP route) vs the naive route (one backward per example + dot
products with each probe direction), on the toy DPO trainer, CPU, one thread; and, with `--peer dattri`, the same
scores from dattri's grad-dot (`TracInAttributor`, no projection, no normalization).

    python benchmarks/bench_lookahead.py [--sizes 8 16 32] [--kinds 2 4 8]
    python benchmarks/bench_lookahead.py --peer dattri --sizes 16 64   # dattri installed as in benchmarks/README.md

The peer needs the loss written out: the DPO sigmoid loss of one pair, `-log sigmoid(beta ((lp_c - ref_c) -
(lp_r - ref_r)))` over the collator's completion tokens (reference log-probs precomputed), as training loss, and
`-O_chosen` (minus the mean summed log-prob of the chosen probe responses) as test loss; its score `<grad L_i,
grad(-O)>` times the learning rate is the look-ahead's SGD-view effect on `chosen`.
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


def _completion_logps(model, params, ids, attention, completion) -> torch.Tensor:
    """Summed log-prob of the completion tokens of each row of `ids [S, T]` under `params` (functional call)."""
    logits = torch.func.functional_call(model, params, (ids,), {"attention_mask": attention}).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logps * completion[:, 1:]).sum(-1)


def dattri_scores(trainer, encoded, count: int) -> tuple[torch.Tensor, float]:
    """`([N], seconds)`: dattri grad-dot of the hand-written per-pair DPO loss against `-O_chosen`, times `lr`."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model, beta, lr = trainer.model.eval(), trainer.args.beta, trainer.args.learning_rate
    pairs = [_inputs(trainer, [row], torch.device("cpu")) for row in range(count)]
    width = max(p["input_ids"].shape[1] for p in pairs)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    examples = []
    with torch.no_grad():
        for p in pairs:
            ids, attention, completion = pad(p["input_ids"]), pad(p["attention_mask"]), pad(p["completion_mask"])
            reference = _completion_logps(
                trainer.ref_model, dict(trainer.ref_model.named_parameters()), ids, attention, completion
            )
            examples.append((ids, attention, completion.float(), reference))
    probe = encoded.batch
    chosen = torch.tensor([r.kind == "chosen" for r in encoded.responses])
    test = [(probe.input_ids[chosen], probe.attention_mask[chosen], probe.target_mask[chosen].float(), torch.zeros(1))]

    def loss(params, data):
        ids, attention, mask, reference = data
        logps = _completion_logps(model, params, ids, attention, mask)
        if ids.shape[0] != 2:  # the probe example: -O_chosen
            return -logps.mean()
        margin = (logps[0] - reference[0]) - (logps[1] - reference[1])
        return -torch.nn.functional.logsigmoid(beta * margin)

    start = time.perf_counter()
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False)
    attributor.projector_kwargs = None
    train_loader = torch.utils.data.DataLoader(examples, batch_size=8)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1)
    scores = attributor.attribute(train_loader, test_loader)[:, 0]
    return lr * scores.double(), time.perf_counter() - start


def compare_dattri(sizes: list[int]) -> None:
    """Agreement and time of dattri's grad-dot against the look-ahead (SGD view, objective `chosen`)."""
    trainer = toy_trainer("dpo", tempfile.mkdtemp(), num_rows=max(sizes))
    probes = _default_probes(trainer, "dpo").select(["chosen"])
    encoded = probes.encode(trainer.processing_class)
    print("| N | look-ahead (s) | dattri grad-dot (s) | dattri / look-ahead | max rel. diff | Spearman |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        start = time.perf_counter()
        ours = score_trainer(trainer, probes, max_examples=size, jvp_rows=64).effects.total[:, 0]
        fast = time.perf_counter() - start
        theirs, slow = dattri_scores(trainer, encoded, size)
        diff = float((ours - theirs).abs().max() / theirs.abs().max())
        rho = lookahead.spearman(ours, theirs)
        print(f"| {size} | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x | {diff:.1e} | {rho:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--kinds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=1, help="examples per scored step of the look-ahead")
    parser.add_argument("--peer", choices=("dattri",), default=None, help="compare with a peer library instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.peer == "dattri":
        compare_dattri(args.sizes)
        return
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
