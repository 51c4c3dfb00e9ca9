"""Look-ahead cost at two model sizes: the package's route against three routes computing the same SGD-view scores.

Every route computes, for `N` SFT training examples and the `R` probe kinds of `ProbeSet.from_prompts` (8 prompts),
`effect[i, r] = -lr <grad L_i, grad O_r>` with `L_i` the trainer's loss on example `i` alone (its mean completion
NLL) and `O_r` the mean over the kind's probe responses of their summed log-prob:

- package: `score_trainer` (the trainer's `c_l` read from a backward that stops at the model's outputs, then one JVP
  of the joined training sequences per probe direction), split into its parts (`probe directions`: `R` probe
  backwards; `signal`: the trainer's loss forward and the loss-side backward; `JVP`: the JVPs);
- naive: one full backward of the trainer's loss per example and `R` dot products with the same directions;
- dattri 0.3.0 grad-dot (`TracInAttributor`, no projection, no normalization; per-example gradients by
  `vmap(grad)`), the per-example NLL written out as its training loss, minus each probe response's summed log-prob
  as its test loss, scores combined per kind (the objective is linear in the responses), times `lr`;
- kronfluence 1.0.1 pairwise scores, identity strategy, no damping (`<g_query, g_train>`), same losses; it tracks
  `nn.Linear` modules only, so it is compared with the package restricted to those parameters (`params=`).

Models: `toy` (the 372,864-parameter tied Qwen2 of `trl_ntk.demo.toy`, its toy SFT rows of ~30 tokens; kronfluence
is skipped there: with tied embeddings the head's weight is also the embedding, which it does not track) and
`llama` (a random-weight Llama with an untied head, `--hidden 512 --layers 8 --vocab 8192`: 35.7M parameters;
training sequences of ~100 tokens made of several toy answers). CPU, one thread; seconds are CPU time of the
process (`time.process_time`), steadier than wall time on a shared machine.

    python benchmarks/bench_lookahead_cost.py --model toy --sizes 8 32 --kinds 1 4
    python benchmarks/bench_lookahead_cost.py --model llama --sizes 8 32 --kinds 1 4 --peers naive kronfluence

(dattri at the llama size needs several GB per batch of examples and ~30x the package's time: leave it out there.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import trl_ntk.integration.lookahead as driver
from trl_ntk.analysis import lookahead
from trl_ntk.integration.capture import GradientCapture
from trl_ntk.probes.probe_set import ProbeSet

LR = 1e-5


# ---------------------------------------------------------------------------------------------------- set-up
def long_sft_rows(n: int, answers_per_row: int) -> list[dict]:
    """Toy SFT rows whose completion joins `answers_per_row` toy answers (about 20 tokens each)."""
    from trl_ntk.demo import toy

    data = toy.preference_dataset(n=n * answers_per_row, seed=0)
    rows = []
    for i in range(n):
        parts = [data[(i * answers_per_row + k) % len(data)] for k in range(answers_per_row)]
        text = " ".join(p[c][0]["content"] for p in parts for c in ("chosen", "chosen_rephrase"))
        rows.append({"prompt": parts[0]["prompt"], "completion": [{"role": "assistant", "content": text}]})
    return rows


def build_trainer(kind: str, n: int, args: argparse.Namespace):
    """An `SFTTrainer` (batch size 1, `lr = LR`) on the toy model or on a random-weight untied Llama."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from trl_ntk.demo import toy

    common = {"output_dir": tempfile.mkdtemp(), "report_to": "none", "use_cpu": True, "bf16": False}
    common.update(save_strategy="no", disable_tqdm=True, per_device_train_batch_size=1, learning_rate=LR)
    if kind == "toy":
        return driver.toy_trainer("sft", common.pop("output_dir"), num_rows=n, **common)
    _, tokenizer = toy.model_and_tokenizer(warmup=False)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",  # vmap (dattri) has no batching rule for the CPU SDPA kernels
    )
    model = LlamaForCausalLM(config).eval()
    data = Dataset.from_list(long_sft_rows(n, args.answers_per_row))
    return SFTTrainer(
        model=model, args=SFTConfig(**common, max_length=256), train_dataset=data, processing_class=tokenizer
    )


def linear_names(model: nn.Module) -> list[str]:
    """Weights and biases of every `nn.Linear` (what kronfluence tracks), as in `model.named_parameters()`."""
    return [
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.Linear) for p, _ in m.named_parameters()
    ]


def kind_matrix(encoded, names: list[str]) -> torch.Tensor:
    """`[R, Mp_rows]`: `1 / n_r` for the responses of kind `r` (the objective per kind from per-response scores)."""
    kinds = [r.kind for r in encoded.responses]
    matrix = torch.tensor([[float(k == name) for k in kinds] for name in names], dtype=torch.float64)
    return matrix / matrix.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------------- routes
def package_route(trainer, probes: ProbeSet, n: int, params: list[str] | None) -> tuple[torch.Tensor, dict]:
    """`score_trainer` (SGD view), timed per part; `params` restricts the directions (kronfluence's subset)."""
    parts = {"directions": 0.0, "signal": 0.0, "jvp": 0.0}

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                parts[key] += time.process_time() - start

        return wrapper

    originals = (lookahead.probe_directions, lookahead.batch_effects, driver._capture_batch, lookahead.sgd_view)
    lookahead.probe_directions = timed("directions", originals[0])
    lookahead.batch_effects = timed("jvp", originals[1])
    driver._capture_batch = timed("signal", originals[2])
    if params is not None:
        lookahead.sgd_view = lambda model, lr, params=None, subset=params: originals[3](model, lr, params=subset)
    try:
        start = time.process_time()
        result = driver.score_trainer(trainer, probes, max_examples=n, jvp_rows=32, lr=LR)
        parts["total"] = time.process_time() - start
    finally:
        lookahead.probe_directions, lookahead.batch_effects, driver._capture_batch, lookahead.sgd_view = originals
    return result.effects.total, parts


def naive_route(trainer, probes: ProbeSet, n: int) -> tuple[torch.Tensor, float]:
    """One full backward of the trainer's loss per example, `R` dot products with the package's directions."""
    model = trainer.model.eval()
    start = time.process_time()
    encoded = probes.encode(trainer.processing_class)
    names, weights = lookahead.probe_weights(encoded)
    directions = lookahead.probe_directions(model, encoded.batch, weights, names, lookahead.sgd_view(model, LR))
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    rows = []
    for row in range(n):
        loss = trainer.compute_loss(model, driver._inputs(trainer, [row], torch.device("cpu")))
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
        rows.append([-sum(float((grads[k] * d[k]).sum()) for k in grads) for d in directions.directions])
    return torch.tensor(rows, dtype=torch.float64), time.process_time() - start


def peer_examples(trainer, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(input_ids [T], target mask [T])` per training example, right-padded to one width (the trainer's tokens)."""
    batches = [driver._inputs(trainer, [row], torch.device("cpu")) for row in range(n)]
    width = max(b["input_ids"].shape[1] for b in batches)
    out = []
    for b in batches:
        pad = width - b["input_ids"].shape[1]
        ids = nn.functional.pad(b["input_ids"][0], (0, pad))
        out.append((ids, nn.functional.pad((b["labels"][0] != -100).float(), (0, pad))))
    return out


def sequence_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B]`: summed log-prob of the masked tokens of each row (position `t` scored by the logits at `t - 1`)."""
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logps * mask[:, 1:]).sum(-1)


def probe_examples(encoded) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batch = encoded.batch
    return [(batch.input_ids[i], batch.target_mask[i].float()) for i in range(batch.input_ids.shape[0])]


def dattri_route(trainer, encoded, names: list[str], n: int) -> tuple[torch.Tensor, float]:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = trainer.model.eval()
    start = time.process_time()
    train, test = peer_examples(trainer, n), probe_examples(encoded)

    def loss(params, data):
        ids, mask, is_train = data
        logps = sequence_logps(torch.func.functional_call(model, params, (ids[None],)).logits, ids[None], mask[None])
        return torch.where(is_train, -logps[0] / mask[1:].sum(), -logps[0])

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False)
    attributor.projector_kwargs = None
    loader = torch.utils.data.DataLoader
    train_loader = loader([(i, m, torch.tensor(True)) for i, m in train], batch_size=4)
    test_loader = loader([(i, m, torch.tensor(False)) for i, m in test], batch_size=len(test))
    with contextlib.redirect_stderr(io.StringIO()):
        scores = attributor.attribute(train_loader, test_loader).double()  # [N, Mp_rows]
    return LR * scores @ kind_matrix(encoded, names).T, time.process_time() - start


def kronfluence_route(trainer, encoded, names: list[str], n: int, workdir: str) -> tuple[torch.Tensor, float]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class SequenceTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids, mask = batch
            logps = sequence_logps(model(input_ids=ids).logits, ids, mask)
            return -(logps / mask[:, 1:].sum(-1)).sum()

        def compute_measurement(self, batch, model):
            ids, mask = batch
            return -sequence_logps(model(input_ids=ids).logits, ids, mask).sum()

    task = SequenceTask()
    model = copy.deepcopy(trainer.model).eval()
    model.__dict__.pop("forward", None)  # the trainer's fused-head patch calls the original model's forward
    model = prepare_model(model, task)
    train, test = peer_examples(trainer, n), probe_examples(encoded)
    start = time.process_time()
    analyzer = Analyzer("lookahead", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=workdir)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        analyzer.fit_all_factors(
            "f", dataset=train, per_device_batch_size=4, factor_args=FactorArguments(strategy="identity")
        )
        analyzer.compute_pairwise_scores(
            "s",
            factors_name="f",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=len(test),
            per_device_train_batch_size=4,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
    scores = analyzer.load_pairwise_scores("s")["all_modules"].double().T  # [N, Mp_rows]
    return LR * scores @ kind_matrix(encoded, names).T, time.process_time() - start


# ---------------------------------------------------------------------------------------------------- reference costs
def forward_and_old_signal(trainer, n: int) -> tuple[float, float, float]:
    """CPU seconds for the `n` examples one by one: a no-grad forward; the trainer's loss with the previous read-out
    of `c_l` (a backward to the unembedding's weight: a full backward when the embeddings are tied, the head's
    weight gradient when not); the trainer's loss with the read-out that stops at the outputs (`capture_signal`)."""
    from trl_ntk.integration.signal import capture_signal

    model = trainer.model.eval()
    inputs = [driver._inputs(trainer, [row], torch.device("cpu")) for row in range(n)]
    start = time.process_time()
    with torch.no_grad():
        for batch in inputs:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    forward = time.process_time() - start
    capture = GradientCapture(model)
    try:
        start = time.process_time()
        for batch in inputs:
            capture.arm()
            capture.begin_loss_call(batch)
            loss = trainer.compute_loss(model, batch)
            torch.autograd.grad(loss, [model.get_output_embeddings().weight], allow_unused=True)
            capture.disarm()
        old = time.process_time() - start
        start = time.process_time()
        for batch in inputs:
            capture_signal(trainer, model, capture, batch)
        new = time.process_time() - start
    finally:
        capture.remove()
    return forward, old, new


def max_relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("toy", "llama"), default="toy")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--kinds", type=int, nargs="+", default=[1, 4], help="probe kinds R (directions)")
    parser.add_argument("--peers", nargs="*", default=["naive", "dattri", "kronfluence"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--answers-per-row", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = build_trainer(args.model, max(args.sizes), args)
    model = trainer.model
    lengths = [driver._inputs(trainer, [r], torch.device("cpu"))["input_ids"].shape[1] for r in range(max(args.sizes))]
    linear = linear_names(model)
    print(
        f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters "
        f"({sum(p.numel() for k, p in model.named_parameters() if k in linear):,} in nn.Linear), tied "
        f"{model.config.tie_word_embeddings}; training sequences {min(lengths)}-{max(lengths)} tokens"
    )
    all_probes = ProbeSet.from_prompts(trainer.train_dataset, trainer.processing_class, num_prompts=8, seed=0)
    kinds = list(all_probes.kinds)
    package_route(trainer, all_probes.select(kinds[:1]), 2, None)  # warm-up (first-call set-up of torch.func)
    use_kron = (
        "kronfluence" in args.peers and importlib.util.find_spec("kronfluence") and not model.config.tie_word_embeddings
    )
    print(
        "| N | R | package s (directions / signal / JVP) | naive s | dattri s | kronfluence s | package (Linear) s "
        "| max rel. diff naive, dattri, kronfluence |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        forward, old, new = forward_and_old_signal(trainer, size)
        print(f"N={size} reference costs: no-grad forward {forward:.2f}s, ", end="")
        print(f"trainer loss + backward to the unembedding {old:.2f}s, trainer loss + cheap signal read-out {new:.2f}s")
        for count in args.kinds:
            probes = all_probes.select(kinds[:count])
            encoded = probes.encode(trainer.processing_class)
            names, _ = lookahead.probe_weights(encoded)
            ours, parts = package_route(trainer, probes, size, None)
            cells, diffs = [], []
            if "naive" in args.peers:
                theirs, seconds = naive_route(trainer, probes, size)
                cells.append(f"{seconds:.2f}")
                diffs.append(f"{max_relative(ours, theirs):.1e}")
            if "dattri" in args.peers and importlib.util.find_spec("dattri"):
                theirs, seconds = dattri_route(trainer, encoded, names, size)
                cells.append(f"{seconds:.2f}")
                diffs.append(f"{max_relative(ours, theirs):.1e}")
            else:
                cells.append("-")
            if use_kron:
                subset, sub_parts = package_route(trainer, probes, size, linear)
                theirs, seconds = kronfluence_route(trainer, encoded, names, size, tempfile.mkdtemp())
                cells += [f"{seconds:.2f}", f"{sub_parts['total']:.2f}"]
                diffs.append(f"{max_relative(subset, theirs):.1e}")
            else:
                cells += ["-", "-"]
            breakdown = f"{parts['total']:.2f} ({parts['directions']:.2f} / {parts['signal']:.2f} / {parts['jvp']:.2f})"
            print(f"| {size} | {len(names)} | {breakdown} | {' | '.join(cells)} | {', '.join(diffs)} |", flush=True)


if __name__ == "__main__":
    main()
