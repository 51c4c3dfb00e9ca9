"""Does the look-ahead ranking help? On the toy DPO task, drop the 10% of training pairs ranked most harmful to the
chosen answers vs a random 10%, train both from the same warm model, and compare (paired by seed, 95% CIs):

- the change of the held-out chosen answers' summed log-prob (the squeezing fall), and of the 8 training prompts'
  chosen answers the ranking was computed for;
- the change of the argmax log-prob along the held-out chosen answers (`sum_m log max_v pi_m(v)`, the squeezing
  signature: mass moving to the argmax token);
- held-out preference accuracy: the share of held-out pairs whose implicit reward margin
  `(lp_c - lp_c0) - (lp_r - lp_r0)` is positive (`0`: the warm model).

Recipe: the demo's DPO recipe (sigmoid loss, beta 1, plain SGD at a constant 1e-2, clipping at 1, 16 pairs a step)
on fewer rows and epochs. The ranking is the SGD view at the warm model, objective `chosen` of 8 training prompts.

    python benchmarks/lookahead_usefulness.py [--seeds 0 1 2 3 4] [--rows 144] [--epochs 6]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time

import torch

from trl_ntk.analysis import lookahead
from trl_ntk.integration.lookahead import _default_probes, score_trainer

T_95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def _trainer(data, out: str, seed: int, epochs: float):
    from trl import DPOConfig, DPOTrainer

    from trl_ntk.demo import toy

    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=1.0,
        loss_type=["sigmoid"],
        max_length=128,
        num_train_epochs=epochs,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1000,
        seed=seed,
        data_seed=seed,
        log_level="error",
    )
    return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _scores(model, encoded) -> dict[str, torch.Tensor]:
    from trl_ntk.probes.scoring import score_responses

    scores = score_responses(model, encoded.batch)
    kinds = [r.kind for r in encoded.responses]
    out = {}
    for kind in ("chosen", "rejected"):
        rows = torch.tensor([k == kind for k in kinds])
        out[kind], out[f"{kind}_argmax"] = scores.logp_sum[rows].double(), scores.argmax_logp[rows].double()
    return out


def _metrics(before: dict, after: dict, before_ranked: dict, after_ranked: dict) -> dict[str, float]:
    margin = (after["chosen"] - before["chosen"]) - (after["rejected"] - before["rejected"])
    return {
        "held-out chosen logp change": float((after["chosen"] - before["chosen"]).mean()),
        "ranked-probe chosen logp change": float((after_ranked["chosen"] - before_ranked["chosen"]).mean()),
        "held-out argmax logp change": float((after["chosen_argmax"] - before["chosen_argmax"]).mean()),
        "held-out preference accuracy": float((margin > 0).double().mean()),
    }


def run_seed(seed: int, rows: int, epochs: float, fraction: float) -> dict[str, dict[str, float]]:
    from trl_ntk.demo import toy
    from trl_ntk.probes.probe_set import ProbeSet

    data = toy.preference_dataset(n=rows, seed=seed)
    scorer = _trainer(data, tempfile.mkdtemp(), seed, epochs)
    if len(scorer.train_dataset) != len(data):
        raise RuntimeError("the trainer dropped rows; the ranking would not line up with the dataset")
    tokenizer = scorer.processing_class
    ranked_probes = _default_probes(scorer, "dpo").select(["chosen", "rejected"])
    start = time.perf_counter()
    result = score_trainer(scorer, ranked_probes.select(["chosen"]), jvp_rows=64)
    score_seconds = time.perf_counter() - start
    held_out = toy.preference_dataset(split="test", seed=seed)
    evaluation = ProbeSet.from_preference_dataset(held_out, tokenizer, num_prompts=len(held_out), seed=seed)
    evaluation = evaluation.select(["chosen", "rejected"]).encode(tokenizer)
    ranked_encoded = ranked_probes.encode(tokenizer)
    before, before_ranked = _scores(scorer.model, evaluation), _scores(scorer.model, ranked_encoded)
    count = round(fraction * rows)
    harmful = set(lookahead.harmful_examples(result.effects, "chosen", count / rows))
    randomly = set(random.Random(f"usefulness-{seed}").sample(range(rows), len(harmful)))
    arms = {}
    for arm, dropped in (("drop harmful", harmful), ("drop random", randomly)):
        trainer = _trainer(data.select([i for i in range(rows) if i not in dropped]), tempfile.mkdtemp(), seed, epochs)
        trainer.train()
        arms[arm] = _metrics(
            before, _scores(trainer.model, evaluation), before_ranked, _scores(trainer.model, ranked_encoded)
        )
        arms[arm]["steps"] = trainer.state.global_step
    arms["drop harmful"]["dropped"] = len(harmful)
    arms["drop harmful"]["scoring seconds"] = score_seconds
    return arms


def _ci(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:+.3f}"
    half = T_95.get(len(values), 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:+.3f} ± {half:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rows", type=int, default=144)
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--fraction", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_seed = {}
    for seed in args.seeds:
        start = time.perf_counter()
        per_seed[seed] = run_seed(seed, args.rows, args.epochs, args.fraction)
        summary = {arm: {k: round(v, 3) for k, v in m.items()} for arm, m in per_seed[seed].items()}
        print(f"seed {seed} ({time.perf_counter() - start:.0f}s): {summary}", flush=True)
    metrics = [k for k in per_seed[args.seeds[0]]["drop random"] if k != "steps"]
    print(f"\n{len(args.seeds)} seeds, {args.rows} rows, {args.epochs} epochs; mean ± 95% CI (t)")
    print("| metric | drop most harmful 10% | drop random 10% | harmful - random (paired) |")
    print("|---|---|---|---|")
    for metric in metrics:
        harmful = [per_seed[s]["drop harmful"][metric] for s in args.seeds]
        randomly = [per_seed[s]["drop random"][metric] for s in args.seeds]
        paired = [h - r for h, r in zip(harmful, randomly)]
        print(f"| {metric} | {_ci(harmful)} | {_ci(randomly)} | {_ci(paired)} |")


if __name__ == "__main__":
    main()
