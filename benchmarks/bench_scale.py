"""The pre-flight memory estimate (`trl_ntk.analysis.memory`) at the shapes users train, per level, path and length.

    PYTHONPATH=. python benchmarks/bench_scale.py [--lengths 256 1024 2048 8192] [--rows 8]

Models shaped like SmolLM-135M (Llama: hidden 576, 30 layers, 9 heads / 3 KV, intermediate 1536, vocabulary 49,152)
and Qwen2.5-0.5B (Qwen2: hidden 896, 24 layers, 14 heads / 2 KV, intermediate 4864, vocabulary 151,936), both with
tied embeddings, built on the meta device (no weights are allocated), in bf16 (full fine-tuning: the analysis
buffers are float32, 2 P each) and float32. For each training length `T` (a micro-batch of `--rows` sequences,
probe batch of 16 responses of `T / 4` tokens) it prints the estimated peak extra memory of one analysis step in
units of P (trainable-parameter bytes) and GiB, for the exact JVP path (SDPA's MATH backend, `T^2` per head) and the
finite-difference path (forward-pass memory). These are the estimates the callback checks before training, not
measurements; `bench_memory.py` measures the real peak on a small model.
"""

from __future__ import annotations

import argparse

import torch

from trl_ntk.analysis import memory

SHAPES = {
    "SmolLM-135M": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)),
    "Qwen2.5-0.5B": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
}  # fmt: skip


def meta_model(config_name: str, fields: dict, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, config_name)(**fields, tie_word_embeddings=True, max_position_embeddings=32768)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 2048, 8192])
    parser.add_argument("--rows", type=int, default=8, help="sequences per training micro-batch (default 8)")
    args = parser.parse_args()
    gib = 2**30
    for name, (config_name, fields) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            shape = memory.model_shape(meta_model(config_name, fields, dtype))
            print(
                f"\n{name} ({shape.num_params / 1e6:.0f}M parameters, {dtype}), P = {shape.parameters / gib:.2f} GiB; "
                f"{args.rows} training sequences of T tokens, 16 probe responses of T/4"
            )
            print(f"{'T':>6}{'level':>8}{'exact x P':>11}{'exact GiB':>11}{'fin.diff x P':>14}{'fin.diff GiB':>14}")
            for length in args.lengths:
                work = memory.Workload(args.rows, length, 16, max(length // 4, 1))
                for level in ("sums", "tokens"):
                    exact = memory.estimate(shape, level, work, "func").total
                    fd = memory.estimate(shape, level, work, "finite_difference").total
                    print(
                        f"{length:>6}{level:>8}{exact / shape.parameters:>11.1f}{exact / gib:>11.1f}"
                        f"{fd / shape.parameters:>14.1f}{fd / gib:>14.1f}"
                    )


if __name__ == "__main__":
    main()
