"""SFT with learning-dynamics tracking: what else rises when you train on the chosen answers?

Offline, on the embedded toy model (pre-trained base, before its own SFT) and toy data (CPU, under a minute):

    python examples/sft_dynamics.py

On a hub model (network; a GPU helps):

    python examples/sft_dynamics.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/Capybara --report-to wandb

Then open `<output-dir>/dynamics/report.html` (or run `trl-ntk report <output-dir>/dynamics`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from trl_ntk.integration.callbacks import LearningDynamicsCallback
from trl_ntk.probes.probe_set import ProbeSet
from trl_ntk.report.render import build_report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub model id (default: the offline toy model)")
    parser.add_argument("--dataset", default=None, help="hub SFT dataset (default: the toy chosen answers)")
    parser.add_argument("--num-rows", type=int, default=None, help="training rows (default: toy 216, hub 2000)")
    parser.add_argument("--output-dir", default="runs/sft_dynamics")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: all epochs)")
    parser.add_argument("--epochs", type=float, default=None, help="default: toy 4, hub 1")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: toy 1e-3, hub 2e-5")
    parser.add_argument("--every-n-steps", type=int, default=10, help="probe scoring / analysis period")
    parser.add_argument("--attribution", choices=("none", "sums", "tokens"), default="sums")
    parser.add_argument("--report-to", default="none", help="none, wandb, tensorboard or trackio")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    toy_run = args.model is None
    if toy_run and args.dataset is not None:
        raise SystemExit("--dataset needs --model (the toy tokenizer only knows the toy data)")
    probes = None
    if toy_run:
        from trl_ntk.demo import toy

        model, tokenizer = toy.model_and_tokenizer(warmup="pretrain")  # the base, before the toy's own SFT
        preference = toy.preference_dataset(n=args.num_rows or 216, seed=args.seed)
        train = preference.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
        # Probe the preference data, so the report shows rejected answers, rephrases and swapped facts as well.
        probes = ProbeSet.from_preference_dataset(
            preference, tokenizer, num_prompts=8, seed=args.seed, test_dataset=toy.preference_dataset(split="test")
        )
    else:
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        train = load_dataset(args.dataset or "trl-lib/Capybara", split="train")
        train = train.shuffle(seed=args.seed).select(range(min(args.num_rows or 2000, len(train))))
    on_gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs or (4 if toy_run else 1),
        max_steps=args.max_steps,
        per_device_train_batch_size=16 if toy_run else 4,
        gradient_accumulation_steps=1 if toy_run else 4,
        learning_rate=args.learning_rate or (1e-3 if toy_run else 2e-5),
        lr_scheduler_type="constant",
        gradient_checkpointing=not toy_run,
        max_length=128 if toy_run else 1024,
        logging_steps=10,
        save_strategy="no",
        report_to=args.report_to,
        seed=args.seed,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    # Without `probes`, the callback probes prompts of the training data (reference answer, other prompts' answers,
    # shuffled text) and the model's own greedy answer.
    trainer.add_callback(
        LearningDynamicsCallback(trainer, probes=probes, every_n_steps=args.every_n_steps, attribution=args.attribution)
    )
    trainer.train()
    report = build_report(Path(args.output_dir) / "dynamics")
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
