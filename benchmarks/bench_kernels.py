"""Benchmark of the kernel engine (`trl_ntk.ntk.kernels`) on the toy-size Qwen2 model; prints tables of ratios.

    python benchmarks/bench_kernels.py [--threads 1] [--repeats 3] [--growth]

Compares, in one run and interleaved so that machine load hits all alike:
- `logprob_kernel` (Mp = 32 probe targets, Mt = 512 training targets) against the naive route (one per-target
  `torch.autograd.grad` for every target, gradients stacked, one matrix product) and against the cost floor
  (the Mp batched JVPs of the training batch alone, tangents given);
- the direct column-sum route against one training step (forward + backward of the training batch).
Targets: >= 10x faster than naive, <= 1.5x the floor, column sums <= 3x a training step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trl_ntk.batches import TokenBatch
from trl_ntk.ntk import attributions, jvp, kernels, logprobs

VOCAB = 600


def toy_model(hidden: int = 128, layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 at the toy size (hidden 128, 2 layers, 4 heads / 2 KV, tied embeddings: 372,864 parameters)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config).eval()


def token_batch(num_sequences: int, length: int, targets_per_sequence: int, seed: int) -> TokenBatch:
    """Right-aligned responses: the last `targets_per_sequence` tokens of each sequence are targets."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (num_sequences, length), generator=generator)
    attention_mask = torch.ones(num_sequences, length, dtype=torch.long)
    target_mask = torch.zeros(num_sequences, length, dtype=torch.bool)
    target_mask[:, -targets_per_sequence:] = True
    return TokenBatch(input_ids, attention_mask, target_mask)


def reference_logprobs(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """`[M]` target log-probs through the model's own forward (full logits)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = torch.log_softmax(logits[:, :-1] / batch.temperature, dim=-1)
    return logprobs.gather(-1, batch.input_ids[:, 1:, None])[..., 0][batch.target_mask[:, 1:]]


def naive_kernel(model: torch.nn.Module, probe: TokenBatch, train: TokenBatch) -> torch.Tensor:
    """Per-target gradients materialized (one backward per target, one forward per batch), then dot products."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient_rows(batch: TokenBatch) -> torch.Tensor:
        logprobs = reference_logprobs(model, batch)
        rows = []
        for m in range(logprobs.shape[0]):
            grads = torch.autograd.grad(logprobs[m], params, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]))
        return torch.stack(rows)

    return gradient_rows(probe) @ gradient_rows(train).T


def floor_jvps(model: torch.nn.Module, train: TokenBatch, tangents: dict, chunk_size: int) -> torch.Tensor:
    """The Mp batched JVPs of the training log-probs alone (tangents given), as `logprob_kernel` runs them."""
    values = logprobs.primal_values(model)
    score = logprobs.score_fn(model, train, "logprob")
    rows = []
    num_rows = next(iter(tangents.values())).shape[0]
    with jvp.forward_mode_attention(model, jvp.JvpPath.FUNC):
        for start in range(0, num_rows, chunk_size):
            chunk = {name: t[start : start + chunk_size] for name, t in tangents.items()}
            rows.append(jvp.jvp_rows(score, values, chunk, jvp.JvpPath.FUNC, jvp.DEFAULT_FD_STEP))
    return torch.cat(rows)


def floor_jvps_full_logits(model: torch.nn.Module, train: TokenBatch, tangents: dict, chunk_size: int):
    """The same JVPs written plainly: `torch.func.jvp` of the model's forward (full logits) under `vmap`."""
    values = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def logprobs(params: dict) -> torch.Tensor:
        logits = torch.func.functional_call(
            model, params, (), {"input_ids": train.input_ids, "attention_mask": train.attention_mask}
        ).logits
        return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, train.input_ids[:, 1:, None])[..., 0][
            train.target_mask[:, 1:]
        ]

    def directional(tangent: dict) -> torch.Tensor:
        return torch.func.jvp(logprobs, (values,), (tangent,))[1]

    with torch.no_grad():
        return torch.func.vmap(directional, chunk_size=chunk_size)(tangents)


def training_step(model: torch.nn.Module, train: TokenBatch, grad_coeffs: torch.Tensor) -> None:
    """One forward + backward of the training batch, `L = sum_l c_l lp_l` (gradients discarded)."""
    loss = (grad_coeffs * reference_logprobs(model, train)).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per case, the cases run in turn `repeats` times."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    return {
        name: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
        for name, values in times.items()
    }


def headline(repeats: int, chunk_size: int) -> None:
    model = toy_model()
    probe = token_batch(2, 24, 16, seed=1)  # Mp = 32
    train = token_batch(16, 48, 32, seed=2)  # Mt = 512
    grad_coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(3))
    values = logprobs.primal_values(model)
    generator = torch.Generator().manual_seed(4)
    tangents = {n: torch.randn(probe.num_targets, *v.shape, generator=generator) for n, v in values.items()}
    num_params = sum(v.numel() for v in values.values())
    print(f"model: Qwen2 hidden 128, 2 layers, vocab {VOCAB}, {num_params:,} parameters, eager attention")
    print(f"Mp = {probe.num_targets} probe targets, Mt = {train.num_targets} training targets, chunk_size {chunk_size}")

    kernel = kernels.logprob_kernel(model, probe, train, chunk_size=chunk_size)
    reference = naive_kernel(model, probe, train)
    error = float((kernel - reference).norm() / reference.norm())
    print(f"check: logprob_kernel vs naive, relative error {error:.1e}")

    times = interleaved(
        {
            "logprob_kernel": lambda: kernels.logprob_kernel(model, probe, train, chunk_size=chunk_size),
            "naive (per-target gradients)": lambda: naive_kernel(model, probe, train),
            "floor (Mp batched JVPs)": lambda: floor_jvps(model, train, tangents, chunk_size),
            "floor, plain torch.func on full logits": lambda: floor_jvps_full_logits(
                model, train, tangents, chunk_size
            ),
        },
        repeats,
    )
    times |= interleaved(  # small cases timed apart from the large ones above (allocator state, caches)
        {
            "column sums, direct": lambda: attributions.attribution_column_sums_direct(
                model, probe, train, grad_coeffs
            ),
            "one training step": lambda: training_step(model, train, grad_coeffs),
        },
        3 * repeats,
    )
    print(f"\n{'quantity (median)':<44}{'wall s':>10}{'CPU s':>10}")
    for name, (wall, cpu) in times.items():
        print(f"{name:<44}{wall:>10.3f}{cpu:>10.3f}")
    print(f"\n{'ratio':<48}{'wall':>10}{'CPU':>10}{'target':>10}")
    rows = [
        ("naive / logprob_kernel", "naive (per-target gradients)", "logprob_kernel", ">= 10"),
        ("logprob_kernel / floor", "logprob_kernel", "floor (Mp batched JVPs)", "<= 1.5"),
        ("logprob_kernel / plain torch.func floor", "logprob_kernel", "floor, plain torch.func on full logits", "-"),
        ("column sums (direct) / training step", "column sums, direct", "one training step", "<= 3"),
    ]
    for name, numerator, denominator, target in rows:
        wall, cpu = (times[numerator][i] / times[denominator][i] for i in range(2))
        print(f"{name:<48}{wall:>10.2f}{cpu:>10.2f}{target:>10}")


def growth(repeats: int, chunk_size: int) -> None:
    """Time of `logprob_kernel` as one size grows, the others at the headline setting."""
    print(f"\ncost growth of logprob_kernel (median of {repeats}; headline: Mp 32, Mt 512, hidden 128, 2 layers)")
    print(f"{'varied':<12}{'value':>8}{'parameters':>12}{'wall s':>10}{'CPU s':>10}{'CPU us / param':>16}")
    settings = (
        [("Mp", n, dict(probe_sequences=n // 16)) for n in (16, 32, 64)]
        + [("Mt", n, dict(train_sequences=n // 32)) for n in (256, 512, 1024)]
        + [("hidden", h, dict(hidden=h)) for h in (64, 128, 256)]
        + [("layers", d, dict(layers=d)) for d in (1, 2, 4)]
    )
    for varied, value, overrides in settings:
        options = dict(probe_sequences=2, train_sequences=16, hidden=128, layers=2) | overrides
        model = toy_model(options["hidden"], options["layers"])
        probe = token_batch(options["probe_sequences"], 24, 16, seed=1)
        train = token_batch(options["train_sequences"], 48, 32, seed=2)
        wall, cpu = interleaved(
            {"kernel": lambda: kernels.logprob_kernel(model, probe, train, chunk_size=chunk_size)},  # noqa: B023
            repeats,
        )["kernel"]
        num_params = sum(p.numel() for p in model.parameters())
        print(f"{varied:<12}{value:>8}{num_params:>12,}{wall:>10.3f}{cpu:>10.3f}{cpu / num_params * 1e6:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=jvp.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--growth", action="store_true", help="also print the cost-growth table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads})")
    headline(args.repeats, args.chunk_size)
    if args.growth:
        growth(args.repeats, args.chunk_size)


if __name__ == "__main__":
    main()
