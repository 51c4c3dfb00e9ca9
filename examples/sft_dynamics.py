"""SFT with learning-dynamics tracking: what else rises when you train on the chosen answers?

A TRL-style script: every `SFTConfig`, `ModelConfig` and `DynamicsArguments` (`--ntk_*`) option comes from the
command line or a YAML `--config`. Offline, on the embedded toy model (the pre-trained base, before its own SFT)
and the toy's chosen answers (CPU, under a minute); the probes come from the toy preference data, so the report
shows rejected answers, rephrases and swapped facts as well:

    python examples/sft_dynamics.py
    python examples/sft_dynamics.py --use_peft --lora_r 8          # LoRA
    python examples/sft_dynamics.py --config sft.yaml              # e.g. `ntk_every_n_steps: 5` in it
    accelerate launch --num_processes 2 --cpu examples/sft_dynamics.py

The defaults are the toy's recipe; on a hub model (network; a GPU helps) pass the model's own:

    python examples/sft_dynamics.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/Capybara --num_rows 2000 --num_train_epochs 1 --optim adamw_torch \
        --learning_rate 2e-5 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 \
        --max_length 1024 --activation_checkpointing --bf16 --use_cpu false --report_to wandb

Then open `<output_dir>/dynamics/report.html` (or run `trl-ntk report <output_dir>/dynamics`).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from trl_ntk import DynamicsArguments, LearningDynamicsCallback

TOY_DEFAULTS = {
    "output_dir": "runs/sft_dynamics",
    "num_train_epochs": 4,
    "per_device_train_batch_size": 16,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "constant",
    "max_length": 128,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "activation_checkpointing": False,
    "use_cpu": not torch.cuda.is_available(),
    "bf16": False,
    "ntk_every_n_steps": 10,
}


@dataclass
class ExampleArguments(ScriptArguments):
    num_rows: int | None = field(default=None, metadata={"help": "training rows (default: toy 216, hub all)"})


def parse(argv: list[str] | None = None) -> tuple:
    parser = TrlParser((ExampleArguments, SFTConfig, ModelConfig, DynamicsArguments))
    parser.set_defaults(**{k: v for k, v in TOY_DEFAULTS.items() if any(k == a.dest for a in parser._actions)})
    return tuple(parser.parse_args_and_config(argv))


def model_and_data(script_args: ExampleArguments, model_args: ModelConfig, seed: int):
    """`(model, tokenizer, train, probes)`: the toy base, its chosen answers and probes from the toy preference data
    (offline), or the hub model and dataset the arguments name (default probes)."""
    if model_args.model_name_or_path is None:
        if script_args.dataset_name is not None:
            raise SystemExit("--dataset_name needs --model_name_or_path (the toy tokenizer only knows the toy data)")
        from trl_ntk import ProbeSet
        from trl_ntk.demo import toy

        model, tokenizer = toy.model_and_tokenizer(warmup="pretrain")  # the base, before the toy's own SFT
        preference = toy.preference_dataset(n=script_args.num_rows or 216, seed=seed)
        train = preference.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
        test = toy.preference_dataset(split="test")
        probes = ProbeSet.from_preference_dataset(preference, tokenizer, num_prompts=8, seed=seed, test_dataset=test)
        return model, tokenizer, train, probes
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
    name = script_args.dataset_name or "trl-lib/Capybara"
    train = load_dataset(name, name=script_args.dataset_config, split=script_args.dataset_train_split)
    if script_args.num_rows:
        train = train.shuffle(seed=seed).select(range(min(script_args.num_rows, len(train))))
    return model, tokenizer, train, None


def main(argv: list[str] | None = None) -> Path | None:
    script_args, training_args, model_args, ntk_args = parse(argv)
    model, tokenizer, train, probes = model_and_data(script_args, model_args, training_args.seed)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    # The one line (without `probes`, the callback probes prompts of the training data: reference answer, other
    # prompts' answers, shuffled text, and the model's own greedy answer).
    trainer.add_callback(LearningDynamicsCallback(trainer, probes=probes, config=ntk_args.to_config()))
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
