"""Peak extra memory of one analysis step of `LearningDynamicsCallback`, per attribution level, on CPU.

    python benchmarks/bench_memory.py [--hidden 512] [--layers 4] [--levels none sums tokens]

A DPO run (AdamW) on the toy data with a wider randomly initialised Qwen2 (default hidden 512, intermediate 1408,
4 layers, 8 heads / 2 KV heads, the toy's 600-token vocabulary, tied embeddings: about 11.6M parameters, so that
parameter-sized buffers dominate activations), 2 preference pairs per step and the probes of 1 prompt (few targets
keep the token level's run time short; its peak memory is that of one chunk whatever the number of chunks), the
model's own greedy responses not tracked (`generate=False`: a random model answers blanks).

Each level runs in its own subprocess. Two measures:
- tensor bytes: the callback's two events of the analysed step (step 2, optimizer state present) run under
  `torch.profiler` with `profile_memory=True`; the running sum of the CPU allocator's allocation and free events
  gives the peak of tensor bytes the callback holds above what existed before it started, counting what it keeps
  from `on_pre_optimizer_step` to `on_optimizer_step`: `max(peak_pre, held_pre + peak_post)`. Exact for tensors;
  blind to non-tensor memory.
- peak RSS (`resource.getrusage` maxrss) of the whole run minus that of the same run without the callback (run
  without the profiler): crude (allocator caching, Python objects, generation), a cross-check only.

Targets: "sums" extra <= 2 P; "tokens" extra <= P + one chunk, a chunk being `chunk_size` (16) parameter-sized
tangents of the kernels (P = trainable-parameter bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LEVELS = ("none", "sums", "tokens", "tokens-buffer")
"""`tokens-buffer`: the "tokens" level with `dense.DEFAULT_JVP_CHUNK_SIZE = "buffer"` (the JVP's activations kept
within one parameter-sized buffer) instead of the default `"auto"`."""
MB = 2**20


def _dpo_trainer(output_dir: str, args: argparse.Namespace):
    """DPO on the toy data with a wide random Qwen2, saved and reloaded so that DPO finds its reference by path."""
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from trl_ntk.demo import toy

    _, tokenizer = toy.model_and_tokenizer(warmup=True)
    model = toy.tiny_random_model(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=2,
    )
    model_dir = Path(output_dir) / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    config = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=3,
        learning_rate=1e-5,
        optim="adamw_torch",
        max_grad_norm=1.0,
        logging_steps=10**9,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        beta=0.1,
        max_length=128,
    )
    data = toy.preference_dataset(n=32, seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _tensor_peak(events) -> tuple[int, int]:
    """(peak, final) running sum of the CPU allocator's allocation / free events of one profiler session."""
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = peak = 0
    for event in memory:
        running += event.nbytes()
        peak = max(peak, running)
    return peak, running


def child(level: str, profile: bool, args: argparse.Namespace) -> dict:
    """One run in this process; returns the measures as a dict."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    torch.set_num_threads(args.threads)
    result: dict = {"level": level}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _dpo_trainer(output_dir, args)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        result["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
        result["num_params"] = sum(p.numel() for p in params)
        if level == "tokens-buffer":
            from trl_ntk.analysis import dense

            dense.DEFAULT_JVP_CHUNK_SIZE = "buffer"
        if level != "plain":
            callback = LearningDynamicsCallback(
                trainer,
                every_n_steps=2,
                attribution=level.split("-")[0],
                num_prompts=args.num_prompts,
                generate=False,  # a random model's greedy answer can be blank, which the probe encoder rejects
                strict=True,
            )
            trainer.add_callback(callback)
            if profile:
                windows: dict[str, tuple[int, int]] = {}
                for event in ("on_pre_optimizer_step", "on_optimizer_step"):
                    method = getattr(callback, event)

                    def measured(run_args, state, control, _method=method, _event=event, **kwargs):
                        if state.global_step != 2:
                            return _method(run_args, state, control, **kwargs)
                        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
                            out = _method(run_args, state, control, **kwargs)
                        windows[_event] = _tensor_peak(session.profiler.kineto_results.events())
                        return out

                    setattr(callback, event, measured)
        trainer.train()
        if level != "plain" and profile:
            peak_pre, held_pre = windows["on_pre_optimizer_step"]
            peak_post, _ = windows["on_optimizer_step"]
            result.update(peak_pre=peak_pre, held_pre=held_pre, peak_post=peak_post)
            result["extra_bytes"] = max(peak_pre, held_pre + peak_post)
    result["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return result


def run_child(level: str, profile: bool, argv: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", level, *argv] + (["--profile"] if profile else [])
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"child {level} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="preference pairs per step (default 2)")
    parser.add_argument("--num-prompts", type=int, default=1, help="probe prompts (default 1)")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS cross-check runs (half the time)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.disable(logging.WARNING)
        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
        print(json.dumps(child(args.child, args.profile, args)))
        return
    argv = [
        f"--threads={args.threads}",
        f"--hidden={args.hidden}",
        f"--intermediate={args.intermediate}",
        f"--layers={args.layers}",
        f"--heads={args.heads}",
        f"--batch-size={args.batch_size}",
        f"--num-prompts={args.num_prompts}",
    ]
    from trl_ntk.ntk import jvp

    plain = run_child("plain", False, argv)
    param_bytes = plain["param_bytes"]
    chunk_bytes = jvp.DEFAULT_CHUNK_SIZE * param_bytes
    budget = param_bytes + chunk_bytes
    print(
        f"DPO, AdamW, Qwen2 hidden {args.hidden}, {args.layers} layers, {plain['num_params']:,} trainable "
        f"parameters = {param_bytes / MB:.1f} MiB (P); one chunk = {jvp.DEFAULT_CHUNK_SIZE} x P = "
        f"{chunk_bytes / MB:.1f} MiB; targets: sums <= 2 P, tokens <= P + chunk = {budget / MB:.1f} MiB; "
        f"torch.set_num_threads({args.threads})"
    )
    print(f"plain run peak RSS {plain['maxrss_bytes'] / MB:.0f} MiB")
    header = (
        f"{'level':<14}{'pre peak MiB':>14}{'held MiB':>10}{'post peak MiB':>15}{'extra MiB':>11}{'extra / P':>11}"
        f"{'target':>9}{'RSS extra MiB':>15}{'RSS / P':>9}"
    )
    print(header)
    for level in args.levels:
        measured = run_child(level, True, argv)
        rss = measured if args.no_rss else run_child(level, False, argv)
        rss_extra = (rss["maxrss_bytes"] - plain["maxrss_bytes"]) if not args.no_rss else float("nan")
        target = 2 * param_bytes if level == "sums" else budget
        verdict = "met" if measured["extra_bytes"] <= target else "MISSED"
        print(
            f"{level:<14}{measured['peak_pre'] / MB:>14.1f}{measured['held_pre'] / MB:>10.1f}"
            f"{measured['peak_post'] / MB:>15.1f}{measured['extra_bytes'] / MB:>11.1f}"
            f"{measured['extra_bytes'] / param_bytes:>11.2f}{verdict:>9}{rss_extra / MB:>15.0f}"
            f"{rss_extra / param_bytes:>9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
