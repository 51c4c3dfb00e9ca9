"""GRPO with lazy-likelihood-displacement tracking, and the NTHR fix.

Each analysed step logs, per prompt group, how much the step moved the log-prob of the group's *correct* completions
(`lld` records: small or negative = lazy likelihood displacement) and how much of that came from the penalty on the
wrong completions. `--nthr` adds `NTHRCallback`, which down-weights the penalty on the wrong answers' tokens that
share a hidden reward with the right ones.

Offline, on the embedded toy model and its arithmetic task (CPU, a few minutes):

    python examples/grpo_nthr.py            # plain GRPO
    python examples/grpo_nthr.py --nthr     # GRPO + NTHR

On a hub model (network; a GPU is strongly advised):

    python examples/grpo_nthr.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --nthr --report-to wandb

Then open `<output-dir>/dynamics/report.html` (or run `trl-ntk report <output-dir>/dynamics`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer

from trl_ntk.demo import toy
from trl_ntk.integration.callbacks import LearningDynamicsCallback
from trl_ntk.report.render import build_report

GSM8K_INSTRUCTION = " Finish with 'The answer is N.'"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub model id (default: the offline toy model)")
    parser.add_argument("--dataset", default=None, help="hub math dataset with question / '#### N' answers")
    parser.add_argument("--num-rows", type=int, default=2048)
    parser.add_argument("--output-dir", default="runs/grpo_nthr")
    parser.add_argument("--max-steps", type=int, default=None, help="default: toy 60, hub 200")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: toy 3e-4, hub 1e-6")
    parser.add_argument("--every-n-steps", type=int, default=5, help="probe scoring / analysis period")
    parser.add_argument("--attribution", choices=("none", "sums", "tokens"), default="sums")
    parser.add_argument("--nthr", action="store_true", help="reweight the negative gradient with NTHRCallback")
    parser.add_argument("--report-to", default="none", help="none, wandb, tensorboard or trackio")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def gsm8k_rows(example: dict) -> dict:
    """`{question, answer: '... #### 42'}` -> a chat prompt and the integer answer that `toy.math_reward` checks."""
    final = example["answer"].split("####")[-1].strip().replace(",", "")
    return {
        "prompt": [{"role": "user", "content": example["question"] + GSM8K_INSTRUCTION}],
        "answer": int(float(final)),
    }


def main(argv=None) -> Path:
    args = parse_args(argv)
    toy_run = args.model is None
    if toy_run and args.dataset is not None:
        raise SystemExit("--dataset needs --model (the toy tokenizer only knows the toy data)")
    if toy_run:
        model, tokenizer = toy.model_and_tokenizer()  # the warm toy model: right about half the time at T=1
        train = toy.math_dataset(n=args.num_rows, seed=args.seed)
    else:
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        name = args.dataset or "openai/gsm8k"
        raw = load_dataset(name, "main" if name == "openai/gsm8k" else None, split="train")
        raw = raw.shuffle(seed=args.seed).select(range(min(args.num_rows, len(raw))))
        train = raw.map(gsm8k_rows, remove_columns=raw.column_names)
    on_gpu = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps or (60 if toy_run else 200),
        per_device_train_batch_size=64 if toy_run else 8,
        num_generations=8,
        max_completion_length=32 if toy_run else 256,
        temperature=1.0,
        learning_rate=args.learning_rate or (3e-4 if toy_run else 1e-6),
        lr_scheduler_type="constant",
        gradient_checkpointing=not toy_run,
        loss_type="grpo",
        beta=0.0,
        logging_steps=5,
        save_strategy="no",
        report_to=args.report_to,
        seed=args.seed,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=toy.math_reward, args=config, train_dataset=train, processing_class=tokenizer
    )
    dynamics = LearningDynamicsCallback(trainer, every_n_steps=args.every_n_steps, attribution=args.attribution)
    trainer.add_callback(dynamics)
    if args.nthr:
        from trl_ntk.integration.nthr import NTHRCallback

        # NTHR's per-batch records go to the same dynamics.jsonl (and dashboards) as the learning-dynamics ones.
        def write_record(record: dict) -> None:
            if dynamics.sinks is not None:
                dynamics.sinks.write(record)

        trainer.add_callback(NTHRCallback(trainer, beta=1.0, eta="auto", vocab="group", record_fn=write_record))
    trainer.train()
    report = build_report(Path(args.output_dir) / "dynamics")
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
