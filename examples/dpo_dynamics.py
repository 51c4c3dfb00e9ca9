"""DPO with learning-dynamics tracking: why do chosen *and* rejected log-probs go down?

A TRL-style script: every `DPOConfig`, `ModelConfig` and `DynamicsArguments` (`--ntk_*`) option comes from the
command line or a YAML `--config`. Offline, on the embedded toy model and preference data (CPU, about a minute):

    python examples/dpo_dynamics.py
    python examples/dpo_dynamics.py --use_peft --lora_r 8          # LoRA
    python examples/dpo_dynamics.py --config dpo.yaml              # e.g. `ntk_every_n_steps: 10` in it
    accelerate launch --num_processes 2 --cpu examples/dpo_dynamics.py

The defaults are the toy's recipe; on a hub model (network; a GPU helps) pass the model's own:

    python examples/dpo_dynamics.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --num_rows 2000 --num_train_epochs 1 --optim adamw_torch \
        --learning_rate 5e-7 --beta 0.1 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 \
        --max_length 1024 --activation_checkpointing --bf16 --use_cpu false --report_to wandb

Then open `<output_dir>/dynamics/report.html` (or run `trl-ntk report <output_dir>/dynamics`).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_ntk import DynamicsArguments, LearningDynamicsCallback

TOY_DEFAULTS = {
    "output_dir": "runs/dpo_dynamics",
    "num_train_epochs": 12,
    "per_device_train_batch_size": 16,
    "learning_rate": 5e-3,
    "optim": "sgd",
    "lr_scheduler_type": "constant",
    "beta": 0.5,
    "max_length": 128,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "activation_checkpointing": False,
    "use_cpu": not torch.cuda.is_available(),
    "bf16": False,
    "ntk_every_n_steps": 20,
}


@dataclass
class ExampleArguments(ScriptArguments):
    num_rows: int | None = field(default=None, metadata={"help": "training rows (default: toy 288, hub all)"})


def parse(argv: list[str] | None = None) -> tuple:
    parser = TrlParser((ExampleArguments, DPOConfig, ModelConfig, DynamicsArguments))
    parser.set_defaults(**{k: v for k, v in TOY_DEFAULTS.items() if any(k == a.dest for a in parser._actions)})
    return tuple(parser.parse_args_and_config(argv))


def model_and_data(script_args: ExampleArguments, model_args: ModelConfig, seed: int):
    """The toy model and preference data (offline), or the hub model and dataset the arguments name."""
    if model_args.model_name_or_path is None:
        if script_args.dataset_name is not None:
            raise SystemExit("--dataset_name needs --model_name_or_path (the toy tokenizer only knows the toy data)")
        from trl_ntk.demo import toy

        model, tokenizer = toy.model_and_tokenizer()  # the warm (SFT'd) toy model, cached on first use
        return model, tokenizer, toy.preference_dataset(n=script_args.num_rows or 288, seed=seed)
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
    name = script_args.dataset_name or "trl-lib/ultrafeedback_binarized"
    train = load_dataset(name, name=script_args.dataset_config, split=script_args.dataset_train_split)
    if script_args.num_rows:
        train = train.shuffle(seed=seed).select(range(min(script_args.num_rows, len(train))))
    return model, tokenizer, train


def main(argv: list[str] | None = None) -> Path | None:
    script_args, training_args, model_args, ntk_args = parse(argv)
    model, tokenizer, train = model_and_data(script_args, model_args, training_args.seed)
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    # The one line: probe chosen, rejected, rephrased, other prompts' and shuffled answers and the model's greedy one,
    # and split each analysed step's change into the pull of the chosen tokens and the push of the rejected ones.
    trainer.add_callback(LearningDynamicsCallback(trainer, config=ntk_args.to_config()))
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
