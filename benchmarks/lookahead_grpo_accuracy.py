"""GRPO look-ahead accuracy on the toy arithmetic prompts: the predicted effect of one SGD step on each prompt's
sampled group against the observed change of the probe objectives after really taking that step (same group),
float64, one CPU thread.

    python benchmarks/lookahead_grpo_accuracy.py --prompts 24 --num-generations 8 --loss-type dapo grpo
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from scipy.stats import spearmanr

from trl_ntk.analysis import lookahead
from trl_ntk.integration import lookahead_grpo
from trl_ntk.integration.lookahead import _default_probes, score_trainer
from trl_ntk.ntk.logprobs import target_logprobs


def _trainer(prompts: int, generations: int, loss_type: str):
    from trl import GRPOConfig, GRPOTrainer

    from trl_ntk.demo import toy

    model, tokenizer = toy.model_and_tokenizer(warmup=True)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=generations,
        num_generations=generations,
        max_completion_length=20,
        temperature=1.0,
        loss_type=loss_type,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    data = toy.math_dataset(n=prompts, seed=0)
    trainer = GRPOTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, reward_funcs=toy.math_reward
    )
    trainer.model.to(torch.float64)
    return trainer


def _observed(trainer, rows, probe_batch, weights, lr: float) -> torch.Tensor:
    """`[N, R]`: the probe objectives' change after one real SGD step on each prompt's group (the trainer's .grad)."""
    model = trainer.model.eval()
    size = trainer.num_generations
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = weights @ target_logprobs(model, probe_batch).double()
    out = []
    for row in rows:
        with lookahead_grpo.scoring_mode(trainer, size):
            inputs = lookahead_grpo.sample_groups(trainer, [row], size, lookahead_grpo.group_seed(0, [row]))
            model.zero_grad(set_to_none=True)
            trainer.compute_loss(model, inputs).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        out.append(weights @ target_logprobs(model, probe_batch).double() - before)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--loss-type", nargs="+", default=["dapo", "grpo"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| loss | probe kind | Spearman | max rel. error | median rel. error | prompts > 10% of max | zero groups |")
    print("|---|---|---|---|---|---|---|")
    for loss_type in args.loss_type:
        trainer = _trainer(args.prompts, args.num_generations, loss_type)
        probes = _default_probes(trainer, "grpo").select(["completion", "irrelevant_train"])
        encoded = probes.encode(trainer.processing_class)
        names, weights = lookahead.probe_weights(encoded)
        result = score_trainer(trainer, probes, lr=args.lr)
        observed = _observed(trainer, range(args.prompts), encoded.batch, weights.double(), args.lr)
        for col, name in enumerate(names):
            pred, obs = result.effects.total[:, col], observed[:, col]
            large = obs.abs() >= 0.1 * obs.abs().max()
            relative = ((pred - obs).abs() / obs.abs())[large]
            rho = spearmanr(pred.numpy(), obs.numpy()).statistic
            print(
                f"| `{loss_type}` | {name} | {rho:.4f} | {float(relative.max()):.2%} | {float(relative.median()):.2%} "
                f"| {int(large.sum())} | {int((pred == 0).sum())} |"
            )


if __name__ == "__main__":
    main()
