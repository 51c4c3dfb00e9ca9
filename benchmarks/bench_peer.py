"""The token-pair gradient inner products of `trl_ntk.ntk.kernels.logprob_kernel` against two peer libraries.

    python benchmarks/bench_peer.py [--threads 1] [--repeats 3] [--train-targets 128 512 2048] [--probe-targets 32]
                                    [--dattri-max-train-targets 512] [--dattri-repeats 1]

Quantity: `K[m, l] = <grad_w log pi(probe target m), grad_w log pi(train target l)>`, per target token on both
sides, for one toy-size Qwen2 (hidden 128, 2 layers, vocab 600, untied head, eager attention, random weights), a
probe batch of 2 sequences x 16 targets (Mp = 32; `--probe-targets`) and training batches of 32 targets per
sequence (length 48).

- dattri 0.3.0, grad-dot (`TracInAttributor`, weights 1, no normalization, random projection switched off), over
  all parameters, against `logprob_kernel(model, probe, train)`.
- kronfluence 1.0.1, pairwise scores with the identity strategy (no preconditioning, no damping), which tracks
  `nn.Linear` modules only, against `logprob_kernel(..., params=<weights and biases of the nn.Linear modules>)`.

Both peers reproduce the exact matrix only when every (sequence, target position) is its own example (the input ids
plus a one-hot mask on that target), with the masked next-token NLL as training loss and as measurement (the two
minus signs cancel). All methods run in the same process on the same model and pairs, interleaved, median of the
repeats (wall and process-CPU seconds). Agreement target: relative Frobenius error <= 1e-4.

Install the peers without letting pip replace torch (see benchmarks/README.md); a peer that is not installed is
skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from trl_ntk.batches import TokenBatch
from trl_ntk.ntk import kernels

VOCAB = 600
PROBE_TARGETS = 16  # per probe sequence
TRAIN_LENGTH, TRAIN_TARGETS = 48, 32
AGREEMENT = 1e-4


def untied_toy_model(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 at the toy size with an untied head (kronfluence tracks `lm_head` as a linear layer of its own)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config).eval()


def token_batch(num_sequences: int, length: int, targets_per_sequence: int, seed: int) -> TokenBatch:
    """Random tokens; the last `targets_per_sequence` tokens of each sequence are targets."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (num_sequences, length), generator=generator)
    target_mask = torch.zeros(num_sequences, length, dtype=torch.bool)
    target_mask[:, -targets_per_sequence:] = True
    return TokenBatch(input_ids, torch.ones_like(input_ids), target_mask)


def one_target_examples(batch: TokenBatch) -> torch.utils.data.TensorDataset:
    """One example per target, row-major (the kernel's order): `(input_ids [T], one-hot target mask [T])`."""
    rows, positions = batch.target_mask.nonzero(as_tuple=True)
    masks = torch.zeros(len(rows), batch.input_ids.shape[1])
    masks[torch.arange(len(rows)), positions] = 1.0
    return torch.utils.data.TensorDataset(batch.input_ids[rows], masks)


def masked_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """`-sum_t mask[t] log softmax(logits[t - 1])[ids[t]]`, summed over the batch: the negative target log-prob."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return -(logprobs * target_mask[:, 1:]).sum()


def linear_parameter_names(model: nn.Module) -> list[str]:
    """Weights and biases of every `nn.Linear` (what kronfluence tracks), names as in `model.named_parameters()`."""
    return [
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        for param_name, _ in module.named_parameters(recurse=False)
    ]


def correlation(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Pearson correlation of the entries."""
    return float(torch.corrcoef(torch.stack([value.flatten().double(), reference.flatten().double()]))[0, 1])


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


# ---------------------------------------------------------------------------------------------------- peers
def dattri_grad_dot(model: nn.Module, probe: TokenBatch, train: TokenBatch, train_batch_size: int) -> torch.Tensor:
    """`[Mp, Mt]` by dattri's grad-dot over all parameters (per-example gradients by `vmap(grad)`)."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    def loss(params, data):
        input_ids, target_mask = data
        logits = torch.func.functional_call(model, params, (input_ids[None],)).logits
        return masked_nll(logits, input_ids[None], target_mask[None])

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False)
    attributor.projector_kwargs = None  # the constructor always keeps a 512-dim random projection; switch it off
    probe_examples, train_examples = one_target_examples(probe), one_target_examples(train)
    train_loader = torch.utils.data.DataLoader(train_examples, batch_size=train_batch_size)
    probe_loader = torch.utils.data.DataLoader(probe_examples, batch_size=len(probe_examples))  # one probe batch
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        return attributor.attribute(train_loader, probe_loader).T


class _TokenPairTask:
    """kronfluence `Task`: the masked NLL of one-target examples as training loss and as measurement."""

    @staticmethod
    def make():
        from kronfluence.task import Task

        class TokenPairTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                input_ids, target_mask = batch
                return masked_nll(model(input_ids=input_ids).logits, input_ids, target_mask)

            def compute_measurement(self, batch, model):
                return self.compute_train_loss(batch, model)

        return TokenPairTask()


class KronfluenceIdentity:
    """kronfluence pairwise scores, identity strategy; the model is copied and prepared once (set-up not timed)."""

    def __init__(self, model: nn.Module, output_dir: str) -> None:
        from kronfluence.analyzer import Analyzer, prepare_model

        self.task = _TokenPairTask.make()
        self.model = prepare_model(copy.deepcopy(model), self.task)
        self.analyzer = Analyzer(
            analysis_name="bench_peer",
            model=self.model,
            task=self.task,
            cpu=True,
            disable_tqdm=True,
            output_dir=output_dir,
        )
        self.calls = 0

    def __call__(self, probe: TokenBatch, train: TokenBatch, train_batch_size: int) -> torch.Tensor:
        from kronfluence.arguments import FactorArguments, ScoreArguments

        self.calls += 1
        name = f"run{self.calls}"
        probe_examples, train_examples = one_target_examples(probe), one_target_examples(train)
        self.analyzer.fit_all_factors(
            factors_name=name,
            dataset=train_examples,
            per_device_batch_size=train_batch_size,
            factor_args=FactorArguments(strategy="identity"),
            overwrite_output_dir=True,
        )
        self.analyzer.compute_pairwise_scores(
            scores_name=name,
            factors_name=name,
            query_dataset=probe_examples,
            train_dataset=train_examples,
            per_device_query_batch_size=len(probe_examples),
            per_device_train_batch_size=train_batch_size,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        return self.analyzer.load_pairwise_scores(name)["all_modules"]


def bergson_scores(
    model: nn.Module, probe: TokenBatch, train: TokenBatch, projection_dim: int, batch_size: int, folder: str
) -> torch.Tensor:
    """`[Mp, Mt]` by Bergson: per-example gradients of every `nn.Linear` (weights and biases, `lm_head` included)
    collected in memory (`InMemoryCollector`, one-target examples, summed NLL), randomly projected to
    `projection_dim x projection_dim` per module when `projection_dim > 0`, then `G_probe @ G_train^T`."""
    probe_grads = _bergson_gradients(model, probe, projection_dim, batch_size, f"{folder}/probe")
    train_grads = _bergson_gradients(model, train, projection_dim, batch_size, f"{folder}/train")
    return probe_grads @ train_grads.T


def _bergson_gradients(model: nn.Module, batch: TokenBatch, projection_dim: int, batch_size: int, run: str):
    from bergson import GradientProcessor, IndexConfig, InMemoryCollector
    from bergson.collector.collector import CollectorComputer
    from datasets import Dataset

    ids, masks = one_target_examples(batch).tensors
    labels = torch.where(masks.bool(), ids, torch.full_like(ids, -100))  # the NLL of this example's target only
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    Path(run + ".part").mkdir(parents=True, exist_ok=True)
    cfg = IndexConfig(
        run_path=run, projection_dim=projection_dim, include_bias=True, loss_reduction="sum", attribute_tokens=False
    )
    processor = GradientProcessor(projection_dim=projection_dim or None, include_bias=True)
    collector = InMemoryCollector(model=model, data=data, cfg=cfg, processor=processor)
    batches = [list(range(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)]
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        CollectorComputer(
            model=model, data=data, collector=collector, cfg=cfg, batches=batches
        ).run_with_collector_hooks()
    return torch.cat([collector.gradients[name].float() for name in collector.gradients], dim=1)


# ---------------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def available(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f"skipping {module}: not installed (see benchmarks/README.md for the install commands)")
        return False
    return True


# ---------------------------------------------------------------------------------------------------- real size
REAL_PEERS = ("kernel", "kernel (linear)", "dattri grad-dot", "kronfluence identity", "bergson projected")


def real_size_model(hidden: int, layers: int, seed: int = 0) -> Qwen2ForCausalLM:
    """The toy Qwen2 widened (intermediate `2.75 x hidden`, `hidden / 64` heads, 2 KV heads), untied head."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config).eval()


def real_size_child(peer: str, args: argparse.Namespace, out: str) -> dict:
    """One peer in this process: `[Mp, Mt]` saved to `out`; returns its CPU / wall seconds and peak RSS above the
    RSS once the model and batches exist (`bench_gpu.rss_peak_reset`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_gpu

    torch.set_num_threads(args.threads)
    bench_gpu.low_malloc_threshold()
    model = real_size_model(args.hidden, args.layers)
    probe = token_batch(max(1, args.real_probe_targets // PROBE_TARGETS), 24, min(args.real_probe_targets, 16), 1)
    train = token_batch(args.real_train_targets // TRAIN_TARGETS, TRAIN_LENGTH, TRAIN_TARGETS, seed=2)
    linear = linear_parameter_names(model)
    with tempfile.TemporaryDirectory() as folder:
        fns = {
            "kernel": lambda: kernels.logprob_kernel(model, probe, train),
            "kernel (linear)": lambda: kernels.logprob_kernel(model, probe, train, params=linear),
            "dattri grad-dot": lambda: dattri_grad_dot(model, probe, train, args.peer_batch_size),
            "kronfluence identity": lambda: KronfluenceIdentity(model, folder)(probe, train, args.peer_batch_size),
            "bergson projected": lambda: bergson_scores(model, probe, train, dim, args.peer_batch_size, folder),
        }
        peer, _, dim = peer.partition(":")  # "bergson projected:<per-module dim>"
        dim = int(dim or 0)
        baseline = bench_gpu.rss_peak_reset()
        wall, cpu, value = timed(fns[peer])
        peak = bench_gpu.rss_peak() - baseline
    torch.save(value.detach().float(), out)
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(p.numel() for n, p in model.named_parameters() if n in linear)
    return {"wall": wall, "cpu": cpu, "peak": peak, "params": params, "linear_params": linear_params}


def real_size(args: argparse.Namespace) -> None:
    """Every peer in its own subprocess at a size where per-target gradients exceed `--budget-gib`."""
    import json
    import os
    import subprocess

    gib = 2**30
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        peers = []
        for name in args.real_peers:
            peers += [f"{name}:{d}" for d in args.projection_dim] if name == "bergson projected" else [name]
        for peer in peers:
            out = f"{folder}/{len(rows)}.pt"
            command = [sys.executable, __file__, "--real-child", peer, out, *sys.argv[1:]]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                print(f"{peer}: failed (return code {done.returncode})\n{done.stderr[-2000:]}", flush=True)
                continue
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((peer, figures, torch.load(out)))
            print(f"  [{peer} done: {json.dumps(figures)}]", flush=True)
    reference = {name: value for name, _, value in rows if name.startswith("kernel")}
    first = rows[0][1]
    targets = args.real_probe_targets + args.real_train_targets
    store = targets * first["params"] * 4
    print(
        f"\nQwen2 hidden {args.hidden}, {args.layers} layers, vocab {VOCAB}, untied head: {first['params']:,} "
        f"parameters (P = {first['params'] * 4 / 2**20:.1f} MiB, {first['linear_params']:,} in nn.Linear); Mp = "
        f"{args.real_probe_targets}, Mt = {args.real_train_targets}: per-target gradients (Mp + Mt) x P = "
        f"{store / gib:.1f} GiB against a budget of {args.budget_gib} GiB"
    )
    print(f"{'method':<24}{'projected':>11}{'rel. error':>12}{'corr.':>8}{'CPU s':>9}{'wall s':>9}{'peak RSS MiB':>14}")
    for name, figures, value in rows:
        exact_ref = reference.get("kernel" if name in ("kernel", "dattri grad-dot") else "kernel (linear)")
        projected = f"{name.partition(':')[2]}^2/module" if name.startswith("bergson") else "no"
        error = relative_error(value, exact_ref) if exact_ref is not None else float("nan")
        corr = correlation(value, exact_ref) if exact_ref is not None else float("nan")
        print(
            f"{name:<24}{projected:>11}{error:>12.1e}{corr:>8.3f}{figures['cpu']:>9.2f}{figures['wall']:>9.2f}"
            f"{figures['peak'] / 2**20:>14.0f}"
        )
    linear_store = targets * first["linear_params"] * 4
    print(
        f"bergson without projection would hold (Mp + Mt) x P_linear = {linear_store / gib:.1f} GiB of gradients "
        f"in memory ({'over' if linear_store > args.budget_gib * gib else 'within'} the budget): not run"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-targets", type=int, nargs="+", default=[128, 512, 2048], help="Mt values")
    parser.add_argument(
        "--probe-targets", type=int, nargs="+", default=[32], help="Mp values (default 32; multiples of 16, or < 16)"
    )
    parser.add_argument("--peer-batch-size", type=int, default=64, help="one-target examples per peer batch")
    parser.add_argument(
        "--dattri-max-train-targets",
        type=int,
        default=512,
        help="largest Mt run through dattri (default 512: it "
        "takes about 0.1 CPU s per training target on the toy model)",
    )
    parser.add_argument("--dattri-repeats", type=int, default=1, help="timed dattri runs per Mt (default 1)")
    parser.add_argument("--real-size", action="store_true", help="the comparison at real size (see above)")
    parser.add_argument("--hidden", type=int, default=512, help="--real-size: hidden size (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="--real-size: decoder layers (default 4)")
    parser.add_argument("--real-probe-targets", type=int, default=16, help="--real-size: Mp (default 16)")
    parser.add_argument("--real-train-targets", type=int, default=256, help="--real-size: Mt (default 256)")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="--real-size: stated memory budget")
    parser.add_argument(
        "--projection-dim", type=int, nargs="+", default=[16, 64], help="--real-size: Bergson's per-module dims"
    )
    parser.add_argument("--real-peers", nargs="+", default=list(REAL_PEERS), choices=list(REAL_PEERS))
    parser.add_argument("--real-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.real_child:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        import json

        print(json.dumps(real_size_child(args.real_child[0], args, args.real_child[1])))
        return
    if args.real_size:
        real_size(args)
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads})")

    model = untied_toy_model()
    linear_names = linear_parameter_names(model)
    num_all = sum(p.numel() for p in model.parameters())
    num_linear = sum(p.numel() for n, p in model.named_parameters() if n in linear_names)
    print(
        f"model: Qwen2 hidden 128, 2 layers, vocab {VOCAB}, untied head, {num_all:,} parameters "
        f"({num_linear:,} in nn.Linear modules); probes of {PROBE_TARGETS} targets per sequence (length 24), "
        f"training sequences of {TRAIN_TARGETS} targets (length {TRAIN_LENGTH})"
    )
    # name -> (function of (probe, train), kernel parameter selection, largest Mt, repeats)
    peers: dict[str, tuple[Callable, list[str] | None, int, int]] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        if available("dattri"):
            peers["dattri grad-dot"] = (
                lambda p, t: dattri_grad_dot(model, p, t, args.peer_batch_size),
                None,
                args.dattri_max_train_targets,
                args.dattri_repeats,
            )
        if available("kronfluence"):
            kronfluence = KronfluenceIdentity(model, str(Path(output_dir) / "kronfluence"))
            peers["kronfluence identity"] = (
                lambda p, t: kronfluence(p, t, args.peer_batch_size),
                linear_names,
                max(args.train_targets),
                args.repeats,
            )
        if available("bergson"):
            runs = iter(range(10**6))
            peers["bergson (no projection)"] = (
                lambda p, t: bergson_scores(model, p, t, 0, args.peer_batch_size, f"{output_dir}/b{next(runs)}"),
                linear_names,
                max(args.train_targets),
                args.repeats,
            )
        if not peers:
            print("no peer installed; nothing to compare")
            return
        kernels.logprob_kernel(model, token_batch(1, 24, 4, seed=1), token_batch(1, 48, 8, seed=2))  # warm-up
        rows = []
        sizes = [(num_probe, num_train) for num_probe in args.probe_targets for num_train in args.train_targets]
        for num_probe, num_train in sizes:
            probe = token_batch(max(1, num_probe // PROBE_TARGETS), 24, min(num_probe, PROBE_TARGETS), seed=1)
            train = token_batch(num_train // TRAIN_TARGETS, TRAIN_LENGTH, TRAIN_TARGETS, seed=2)
            cases: dict[str, tuple[Callable[[], torch.Tensor], int]] = {}
            for peer_name, (peer, params, max_train, repeats) in peers.items():
                if num_train > max_train:
                    continue
                cases[peer_name] = (lambda peer=peer, probe=probe, train=train: peer(probe, train), repeats)
                cases[f"kernel for {peer_name}"] = (
                    lambda params=params, probe=probe, train=train: kernels.logprob_kernel(
                        model, probe, train, params=params
                    ),
                    args.repeats,
                )
            results: dict[str, list[tuple[float, float, torch.Tensor]]] = {name: [] for name in cases}
            for round_index in range(args.repeats):
                for name, (fn, repeats) in cases.items():
                    if round_index < repeats:
                        results[name].append(timed(fn))
            for peer_name in peers:
                if peer_name not in cases:
                    continue
                peer_runs, kernel_runs = results[peer_name], results[f"kernel for {peer_name}"]
                error = relative_error(peer_runs[0][2], kernel_runs[0][2])
                peer_wall, peer_cpu = (statistics.median(r[i] for r in peer_runs) for i in range(2))
                kernel_wall, kernel_cpu = (statistics.median(r[i] for r in kernel_runs) for i in range(2))
                rows.append((peer_name, num_probe, num_train, error, peer_wall, peer_cpu, kernel_wall, kernel_cpu))
            print(f"  [Mp = {num_probe}, Mt = {num_train} done]", flush=True)

    print(
        f"\n{'peer':<22}{'Mp':>5}{'Mt':>6}{'rel. error':>12}{'peer wall s':>13}{'CPU s':>8}"
        f"{'kernel wall s':>15}{'CPU s':>8}{'peer / kernel wall':>20}{'CPU':>7}"
    )
    for peer_name, num_probe, num_train, error, peer_wall, peer_cpu, kernel_wall, kernel_cpu in rows:
        flag = "" if error <= AGREEMENT else "  DISAGREES"
        print(
            f"{peer_name:<22}{num_probe:>5}{num_train:>6}{error:>12.1e}{peer_wall:>13.3f}{peer_cpu:>8.3f}{kernel_wall:>15.3f}"
            f"{kernel_cpu:>8.3f}{peer_wall / kernel_wall:>20.2f}{peer_cpu / kernel_cpu:>7.2f}{flag}"
        )
    if any(row[3] > AGREEMENT for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
