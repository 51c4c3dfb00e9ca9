"""Analysis cost at LLM scale, as one short prepared run: a ~0.5B Qwen2 with random weights, DPO-like steps.

    python benchmarks/bench_gpu.py                              # cuda, ~0.5B parameters, bf16 (a few minutes)
    python benchmarks/bench_gpu.py --device cpu --size tiny     # the same script in reduced size (a minute)

The model is built from a Qwen2.5-0.5B-shaped config (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate
4864, vocabulary 151,936, tied embeddings: 494M parameters) with random weights, in bf16, trained with SDPA
attention (the JVPs switch SDPA to its MATH backend, which has forward-mode AD). Synthetic token batches: a fixed
DPO-like batch of chosen / rejected responses (sigmoid loss against reference log-probs taken at the start, beta
0.1, AdamW, gradient clipping at 1), through TRL's fused log-prob head (`trl.trainer.utils.add_fused_lm_head`) as
the trainers call it, and a fixed probe batch. The analysis step does what `LearningDynamicsCallback` does at each
level, without a Trainer: the gradient capture armed over the step, probe scoring before and after the optimizer
step (`"none"`), plus `dynamics.explain_update` (`"sums"`), plus the token matrix (`"tokens"`).

Printed per level: the analysis step as a multiple of a plain step, the steady-state ratio at `every_n_steps=50`
(`(49 + a) / 50`) against the targets (<= 1.05, 1.15, 1.5), the seconds of the analysis, and on CUDA the peak
memory the analysis allocates above the training state, in units of the trainable parameter bytes (on CPU the
step's peak RSS, `rss_peak`). Then the scoring event alone in plain steps, and `long_comparison`: one "sums" step
at `--long` tokens (default 4096 on CUDA) on the exact JVP path and on the finite-difference path, with their
time, peak memory above a plain step and the finite-difference error. `--lora-rank` trains LoRA adapters (peft)
instead of every weight; `--path finite_difference` runs every level's JVPs by finite differences.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LEVELS = ("none", "sums", "tokens")
TARGETS = {"none": 1.05, "sums": 1.15, "tokens": 1.5}
EVERY_N_STEPS = 50


@dataclass(frozen=True)
class Size:
    """Model shape and batch sizes of one benchmark size."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    pairs: int  # DPO pairs per step: 2 * pairs training sequences
    prompt_length: int
    response_length: int
    probe_responses: int
    probe_prompt_length: int
    probe_response_length: int
    plain_steps: int  # timed plain steps
    family: str = "qwen2"  # "qwen2" (Qwen2Config) or "llama" (LlamaConfig)


SIZES = {
    "0.5b": Size(896, 4864, 24, 14, 2, 151_936, 8, 64, 64, 16, 64, 32, 5),
    "tiny": Size(64, 128, 2, 4, 2, 512, 2, 8, 8, 4, 8, 6, 3),
}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(size: Size, device: torch.device, dtype: torch.dtype, lora_rank: int = 0) -> nn.Module:
    """Qwen2 (or Llama) with random weights, built directly on `device`, SDPA attention, TRL's fused log-prob head
    added; with `lora_rank > 0`, wrapped by peft with LoRA adapters of that rank on every projection (the base
    weights frozen)."""
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[size.family]
    config = config_class(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max(4096, size.prompt_length + size.response_length),
        tie_word_embeddings=True,
    )
    with device:
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    add_fused_lm_head(model)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(LORA_MODULES))
        model = get_peft_model(model, lora)
    return model


def rss_peak_reset() -> int:
    """Reset this process's peak resident set size (Linux `clear_refs`) and return the current RSS in bytes
    (0 where `/proc` is unavailable). Large CPU tensors are `mmap`ped and returned on free (`low_malloc_threshold`),
    so RSS follows the live tensor bytes closely."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return 0
    return _proc_status("VmRSS")


def rss_peak() -> int:
    """This process's peak resident set size in bytes since the last `rss_peak_reset` (0 without `/proc`)."""
    return _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def low_malloc_threshold(threshold: int = 1 << 16) -> None:
    """glibc: serve every allocation above `threshold` bytes by `mmap` (a fixed threshold also stops glibc from
    raising it after frees), so freed tensors leave the RSS at once. No-op off glibc."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def synthetic_batch(rows: int, prompt_length: int, response_length: int, vocab: int, seed: int, device):
    """`(input_ids, attention_mask, labels)` of `rows` random sequences; labels `-100` on the prompt."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, prompt_length + response_length), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt_length] = -100
    return input_ids.to(device), torch.ones_like(input_ids).to(device), labels.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DpoLikeRun:
    """A fixed DPO-like batch trained step by step, with the analysis of `LearningDynamicsCallback` on request."""

    def __init__(
        self,
        size: Size,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        lora_rank: int = 0,
        path: str = "auto",
    ) -> None:
        from trl_ntk.batches import TokenBatch
        from trl_ntk.integration.capture import GradientCapture

        torch.manual_seed(seed)
        self.device = device
        self.path = path  # the analysis' JVP path: "auto" (exact) or "finite_difference"
        self.explanation = None  # the last analysis step's `UpdateExplanation`
        self.model = build_model(size, device, dtype, lora_rank)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.num_params = sum(p.numel() for p in self.params)
        self.pairs = size.pairs
        self.inputs = synthetic_batch(2 * size.pairs, size.prompt_length, size.response_length, size.vocab, 1, device)
        probe_ids, probe_mask, probe_labels = synthetic_batch(
            size.probe_responses, size.probe_prompt_length, size.probe_response_length, size.vocab, 2, device
        )
        self.probe_batch = TokenBatch.from_labels(probe_ids, probe_mask, probe_labels)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)
        self.capture = GradientCapture(self.model)
        with torch.no_grad():
            self.reference = self._sequence_logprobs()

    @property
    def num_train_targets(self) -> int:
        return int((self.inputs[2][:, 1:] != -100).sum())

    def _sequence_logprobs(self) -> torch.Tensor:
        input_ids, attention_mask, labels = self.inputs
        self.capture.begin_loss_call({"input_ids": input_ids})  # as the trainer's compute_loss wrapper does
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        scored = (labels[:, 1:] != -100).to(output.log_probs.dtype)
        return (output.log_probs * scored).sum(-1).float()

    def _score_probes(self):
        from trl_ntk.probes.scoring import score_responses

        with self.capture.paused():
            return score_responses(self.model, self.probe_batch)

    def step(self, level: str | None) -> float:
        """One optimizer step (with the analysis at `level`); returns the analysis seconds (0 without)."""
        from trl_ntk.analysis import dynamics
        from trl_ntk.analysis.dense import DenseBackend
        from trl_ntk.integration import adapters

        self.model.train()
        if level in ("sums", "tokens"):
            self.capture.arm()
        logprobs = self._sequence_logprobs()
        margins = (logprobs - self.reference).view(2, self.pairs)
        loss = -nn.functional.logsigmoid(0.1 * (margins[0] - margins[1])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        analysis = 0.0
        if level is not None:
            synchronize(self.device)
            start = time.perf_counter()
            micro_batches = self.capture.disarm() if self.capture.armed else []
            self._score_probes()
            if micro_batches:
                adapter = adapters.ADAPTERS["DPOTrainer"]
                self.model.eval()
                with self.capture.paused():
                    self.explanation = dynamics.explain_update(
                        self.model,
                        self.probe_batch,
                        micro_batches,
                        adapters.label_step(adapter, micro_batches),
                        adapter.group_names,
                        self.optimizer,
                        attribution=level,
                        backend=DenseBackend(self.model, path=self.path),
                    )
                self.model.train()
            synchronize(self.device)
            analysis += time.perf_counter() - start
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if level is not None:
            synchronize(self.device)
            start = time.perf_counter()
            self._score_probes()
            synchronize(self.device)
            analysis += time.perf_counter() - start
        return analysis


def timed_step(run: DpoLikeRun, level: str | None) -> tuple[float, float, int]:
    """(step seconds, analysis seconds, peak bytes above the step's start): CUDA's allocator peak on CUDA, the
    process's peak RSS (reset before the step) on CPU."""
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = rss_peak_reset()
    synchronize(device)
    start = time.perf_counter()
    analysis = run.step(level)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_peak()
    return seconds, analysis, max(peak - baseline, 0) if baseline or device.type == "cuda" else 0


def measure(
    size: Size,
    device: torch.device,
    dtype: torch.dtype,
    levels: list[str],
    log: Callable = print,
    *,
    lora_rank: int = 0,
    path: str = "auto",
    repeats: int = 2,
    warm_analysis: bool = True,
) -> dict:
    """Plain steps, then one analysis step per level (`repeats` for "none" and "sums", one for "tokens"); returns
    the figures (`"explanations"`: each level's last `UpdateExplanation`)."""
    if device.type == "cpu":
        low_malloc_threshold()
    run = DpoLikeRun(size, device, dtype, lora_rank=lora_rank, path=path)
    log(
        f"model: {size.family} hidden {size.hidden}, {size.layers} layers, vocab {size.vocab}, "
        f"{'LoRA rank ' + str(lora_rank) + ', ' if lora_rank else ''}{run.num_params:,} trainable parameters "
        f"({run.param_bytes / 2**30:.3f} GiB, {dtype}), {device}; training {2 * size.pairs} sequences of "
        f"{size.prompt_length + size.response_length} tokens (Mt = {run.num_train_targets}), probes "
        f"{size.probe_responses} responses (Mp = {run.probe_batch.num_targets}); JVP path {path}"
    )
    run.step(None)  # warm-up: kernels, allocator, AdamW state
    if warm_analysis:
        run.step("sums")  # warm-up of the analysis code paths
    plain = [timed_step(run, None) for _ in range(size.plain_steps)]
    plain_step = statistics.median(s for s, _, _ in plain)
    plain_peak = max(p for _, _, p in plain)
    results = {
        "plain_step": plain_step,
        "plain_peak": plain_peak,
        "param_bytes": run.param_bytes,
        "num_params": run.num_params,
        "levels": {},
        "explanations": {},
    }
    for level in levels:
        steps = [timed_step(run, level) for _ in range(1 if level == "tokens" else repeats)]
        seconds = statistics.median(s for s, _, _ in steps)
        analysis = statistics.median(a for _, a, _ in steps)
        multiple = seconds / plain_step
        results["levels"][level] = {
            "analysis_seconds": analysis,
            "multiple": multiple,
            "steady": (EVERY_N_STEPS - 1 + multiple) / EVERY_N_STEPS,
            "peak": max(p for _, _, p in steps),
        }
        results["explanations"][level] = run.explanation
    return results


def report(results: dict, log: Callable = print) -> None:
    param_bytes = results["param_bytes"]
    log(f"plain step (median) {results['plain_step'] * 1e3:.1f} ms")
    log(
        f"{'level':<8}{'analysis s':>12}{'step (x plain)':>16}{'steady @50':>12}{'target':>9}"
        f"{'peak above plain step (x P)':>29}"
    )
    for level, figures in results["levels"].items():
        measured = figures["peak"] or results["plain_peak"]
        extra = (figures["peak"] - results["plain_peak"]) / param_bytes if measured else float("nan")
        verdict = "met" if figures["steady"] <= TARGETS[level] else "MISSED"
        log(
            f"{level:<8}{figures['analysis_seconds']:>12.3f}{figures['multiple']:>16.1f}{figures['steady']:>12.3f}"
            f"{'<= ' + str(TARGETS[level]):>9}{extra:>29.2f}   {verdict}"
        )


def long_size(size: Size, length: int) -> Size:
    """`size`'s model on one preference pair and 2 probe responses of `length` tokens (half prompt, half response)."""
    half = length // 2
    return Size(
        size.hidden, size.intermediate, size.layers, size.heads, size.kv_heads, size.vocab, 1, half, length - half,
        2, half, length - half, 2, family=size.family,
    )  # fmt: skip


def long_comparison(size: Size, device: torch.device, dtype: torch.dtype, length: int, log: Callable = print) -> dict:
    """One "sums" analysis step at `length` tokens on the exact path and on the finite-difference path (same
    seeds): per path the step in plain steps and its peak above a plain step; the finite-difference prediction's
    and cells' `max |fd - exact| / max |exact|`."""
    runs = {
        path: measure(
            long_size(size, length), device, dtype, ["sums"], log=log, path=path, repeats=1, warm_analysis=False
        )
        for path in ("auto", "finite_difference")
    }
    exact = runs["auto"]["explanations"]["sums"].probe
    approx = runs["finite_difference"]["explanations"]["sums"].probe

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    out = {"length": length, "param_bytes": runs["auto"]["param_bytes"], "paths": {}}
    for path, r in runs.items():
        figures = r["levels"]["sums"]
        out["paths"][path] = {
            "path": r["explanations"]["sums"].path,
            "multiple": figures["multiple"],
            "extra": figures["peak"] - r["plain_peak"],
        }
    out["predicted_error"] = error(approx.predicted, exact.predicted)
    out["cells_error"] = error(approx.cells, exact.cells)
    return out


def report_long(results: dict, log: Callable = print) -> None:
    log(f'long sequences, T = {results["length"]}, one "sums" step:')
    for figures in results["paths"].values():
        log(
            f"  {figures['path']:<18}{figures['multiple']:>8.1f} x plain step, peak above a plain step "
            f"{figures['extra'] / 2**20:>9.0f} MiB = {figures['extra'] / results['param_bytes']:.2f} P"
        )
    log(
        f"  finite differences vs exact: prediction {results['predicted_error']:.1e}, "
        f"cells {results['cells_error']:.1e} (max error / max entry)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=list(SIZES), default="0.5b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (default 0: full)")
    parser.add_argument(
        "--long", type=int, help="length of the exact vs finite-difference comparison (default 4096 on CUDA, "
        "64 on CPU; 0: skip)"
    )  # fmt: skip
    parser.add_argument("--path", default="auto", choices=["auto", "finite_difference"], help="JVP path")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}")
    results = measure(SIZES[args.size], device, dtype, args.levels, lora_rank=args.lora_rank, path=args.path)
    report(results)
    if "none" in results["levels"]:
        event = results["levels"]["none"]["analysis_seconds"] / results["plain_step"]
        print(f"one scoring event (probe scoring before and after the step) = {event:.2f} plain steps")
    length = args.long if args.long is not None else (4096 if device.type == "cuda" else 64)
    if length:
        report_long(long_comparison(SIZES[args.size], device, dtype, length, log=lambda _: None))


if __name__ == "__main__":
    main()
