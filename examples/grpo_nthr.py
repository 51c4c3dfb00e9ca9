"""GRPO with lazy-likelihood-displacement tracking, and the NTHR fix.

Each analysed step logs, per prompt group, how much the step moved the log-prob of the group's *correct* completions
(`lld` records: small or negative = lazy likelihood displacement) and how much of that came from the penalty on the
wrong completions. `--nthr` adds `NTHRCallback`, which down-weights the penalty on the wrong answers' tokens that
share a hidden reward with the right ones.

A TRL-style script: every `GRPOConfig`, `ModelConfig` and `DynamicsArguments` (`--ntk_*`) option comes from the
command line or a YAML `--config`. Offline, on the embedded toy model and its arithmetic task (CPU, a few minutes):

    python examples/grpo_nthr.py            # plain GRPO
    python examples/grpo_nthr.py --nthr     # GRPO + NTHR
    accelerate launch --num_processes 2 --cpu examples/grpo_nthr.py

The defaults are the toy's recipe; on a hub model (network; a GPU is strongly advised) pass the model's own:

    python examples/grpo_nthr.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name openai/gsm8k \
        --dataset_config main --nthr --max_steps 200 --learning_rate 1e-6 --per_device_train_batch_size 8 \
        --max_completion_length 256 --activation_checkpointing --bf16 --use_cpu false --report_to wandb

Then open `<output_dir>/dynamics/report.html` (or run `trl-ntk report <output_dir>/dynamics`).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_ntk import DynamicsArguments, LearningDynamicsCallback
from trl_ntk.demo import toy

GSM8K_INSTRUCTION = " Finish with 'The answer is N.'"

TOY_DEFAULTS = {
    "output_dir": "runs/grpo_nthr",
    "max_steps": 60,
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 1.0,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant",
    "loss_type": "grpo",
    "beta": 0.0,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": "none",
    "activation_checkpointing": False,
    "use_cpu": not torch.cuda.is_available(),
    "bf16": False,
    "ntk_every_n_steps": 5,
}


@dataclass
class ExampleArguments(ScriptArguments):
    num_rows: int = field(default=2048, metadata={"help": "training rows"})
    nthr: bool = field(default=False, metadata={"help": "reweight the negative gradient with NTHRCallback"})


def parse(argv: list[str] | None = None) -> tuple:
    parser = TrlParser((ExampleArguments, GRPOConfig, ModelConfig, DynamicsArguments))
    parser.set_defaults(**{k: v for k, v in TOY_DEFAULTS.items() if any(k == a.dest for a in parser._actions)})
    return tuple(parser.parse_args_and_config(argv))


def gsm8k_rows(example: dict) -> dict:
    """`{question, answer: '... #### 42'}` -> a chat prompt and the integer answer that `toy.math_reward` checks."""
    final = example["answer"].split("####")[-1].strip().replace(",", "")
    return {
        "prompt": [{"role": "user", "content": example["question"] + GSM8K_INSTRUCTION}],
        "answer": int(float(final)),
    }


def model_and_data(script_args: ExampleArguments, model_args: ModelConfig, seed: int):
    """The toy model and arithmetic prompts (offline), or the hub model and a GSM8K-shaped dataset."""
    if model_args.model_name_or_path is None:
        if script_args.dataset_name is not None:
            raise SystemExit("--dataset_name needs --model_name_or_path (the toy tokenizer only knows the toy data)")
        model, tokenizer = toy.model_and_tokenizer()  # the warm toy model: right about half the time at T=1
        return model, tokenizer, toy.math_dataset(n=script_args.num_rows, seed=seed)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        quantization_config=get_quantization_config(model_args),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    raw = load_dataset(script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split)
    raw = raw.shuffle(seed=seed).select(range(min(script_args.num_rows, len(raw))))
    return model, tokenizer, raw.map(gsm8k_rows, remove_columns=raw.column_names)


def main(argv: list[str] | None = None) -> Path | None:
    script_args, training_args, model_args, ntk_args = parse(argv)
    model, tokenizer, train = model_and_data(script_args, model_args, training_args.seed)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=toy.math_reward,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    # The one line: the probes are the prompts with the model's own greedy answers (and the reference solutions).
    trainer.add_callback(LearningDynamicsCallback(trainer, config=ntk_args.to_config()))
    if script_args.nthr:
        from trl_ntk import NTHRCallback

        # NTHR's per-batch records go to the same dynamics.jsonl (and dashboards) as the learning-dynamics ones.
        trainer.add_callback(NTHRCallback(trainer, beta=1.0, eta="auto", vocab="group"))
    trainer.train()
    return build_report_on_main(trainer, ntk_args)


def build_report_on_main(trainer, ntk_args: DynamicsArguments) -> Path | None:
    """The HTML report, built once, by the main process, after every rank has finished writing."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    from trl_ntk.report.render import build_report

    run_dir = ntk_args.ntk_output_dir or Path(trainer.args.output_dir) / "dynamics"
    report = build_report(run_dir, progress=not trainer.args.disable_tqdm)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
