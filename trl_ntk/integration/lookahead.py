"""Score every example of a TRL trainer's train dataset by the predicted effect of one step on it (look-ahead).

The gradient signal `c_l` of each batch comes from the trainer's own `compute_loss` (every DPO and GRPO `loss_type`,
SFT as configured), read by `GradientCapture` during a backward that stops at the unembedding; no loss is
re-implemented. For GRPO an example is a prompt, stepped on with a group of completions the trainer samples and
rewards itself (`trl_ntk.integration.lookahead_grpo`). The probe directions and the per-example sums are in
`trl_ntk.analysis.lookahead`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trl_ntk._model import trainable_parameters
from trl_ntk.analysis import lookahead
from trl_ntk.batches import TokenBatch, concat_token_batches
from trl_ntk.integration import lookahead_grpo
from trl_ntk.integration.adapters import adapter_for, label_step
from trl_ntk.integration.capture import GradientCapture
from trl_ntk.probes.probe_set import ProbeSet

logger = logging.getLogger(__name__)

_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages", "text")


@dataclass
class LookaheadConfig:
    """Options of `score_trainer`.

    Args:
        view (`str`, *optional*, defaults to `"sgd"`): `"sgd"` (`P = lr`), `"adam"` (the preconditioner of the
            trainer's optimizer state at `g -> 0`; see `lookahead.adam_view`) or `"adam_exact"` (the optimizer's exact
            step on each example alone, one backward per example; `lookahead.exact_step_effect`).
        lr (`float`, *optional*): the SGD view's learning rate; defaults to `trainer.args.learning_rate`.
        by_probe (`bool`, *optional*, defaults to `False`): also score every probe response on its own.
        batch_size (`int`, *optional*, defaults to `1`): examples per scored step. `1`: the effect of a step on the
            example alone; `B`: its share of a step on its batch of `B` consecutive examples (no accumulation).
        max_examples (`int`, *optional*): score the first `max_examples` rows only.
        jvp_rows (`int`, *optional*, defaults to `32`): training sequences per JVP (several batches are joined).
        text_chars (`int`, *optional*, defaults to `200`): length of the text excerpt of each example.
        rows (`list[int]`, *optional*): score these train-dataset rows (in this order) instead of the first
            `max_examples`.
        num_generations (`int`, *optional*): GRPO only: completions sampled per prompt (default: the trainer's
            `num_generations`); the effect is a Monte-Carlo estimate over them.
        seed (`int`, *optional*, defaults to `0`): GRPO only: the sampling seed (a prompt's group depends on the seed
            and its row only).
    """

    view: str = "sgd"
    lr: float | None = None
    by_probe: bool = False
    batch_size: int = 1
    max_examples: int | None = None
    jvp_rows: int = 32
    text_chars: int = 200
    rows: list[int] | None = None
    num_generations: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.view not in ("sgd", "adam", "adam_exact"):
            raise ValueError(f"view must be 'sgd', 'adam' or 'adam_exact', got {self.view!r}")
        if self.view == "adam_exact" and self.batch_size != 1:
            raise ValueError("view='adam_exact' scores a step on each example alone: batch_size must be 1")
        if self.batch_size < 1 or self.jvp_rows < 1:
            raise ValueError("batch_size and jvp_rows must be >= 1")


@dataclass
class LookaheadResult:
    """What `score_trainer` computed.

    Args:
        effects (`ExampleEffects`): `[N, R]` predicted change of every probe objective per example.
        indices (`list[int]`): the train-dataset row of each example.
        texts (`list[dict]`): a text excerpt per example (its prompt / chosen / rejected / completion columns).
        meta (`dict`): the optimizer view and its parameters, the trainer kind, and the `history` effect (the
            change the optimizer's step would make regardless of the example; Adam view only).
    """

    effects: lookahead.ExampleEffects
    indices: list[int]
    texts: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        """One header record (`type: "lookahead_run"`) and one `type: "lookahead_example"` record per example."""
        ranks = self.effects.ranks()
        names = self.effects.names
        out: list[dict[str, Any]] = [{"type": "lookahead_run", **self.meta, "objectives": names}]
        for row, index in enumerate(self.indices):

            def values(tensor: Tensor, row: int = row) -> dict[str, float]:
                return {name: float(tensor[row, col]) for col, name in enumerate(names)}

            out.append(
                {
                    "type": "lookahead_example",
                    "index": index,
                    "text": self.texts[row],
                    "effect": values(self.effects.total),
                    "positive_gradient": values(self.effects.positive),
                    "negative_gradient": values(self.effects.negative),
                    "rank": {name: int(ranks[row, col]) for col, name in enumerate(names)},
                }
            )
        return out

    def write_jsonl(self, path: str | Path) -> Path:
        """Write `records()` to `path` (one JSON object a line)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for record in self.records():
                handle.write(json.dumps(record) + "\n")
        return path

    def table(self) -> Any:
        """A `pandas.DataFrame`, one row per example: `index`, `text_<column>`, and `effect_<objective>`,
        `positive_<objective>`, `negative_<objective>`, `rank_<objective>` per objective."""
        import pandas as pd

        ranks = self.effects.ranks()
        columns: dict[str, Any] = {"index": list(self.indices)}
        for column in sorted({c for text in self.texts for c in text}):
            columns[f"text_{column}"] = [text.get(column) for text in self.texts]
        for col, name in enumerate(self.effects.names):
            columns[f"effect_{name}"] = self.effects.total[:, col].tolist()
            columns[f"positive_{name}"] = self.effects.positive[:, col].tolist()
            columns[f"negative_{name}"] = self.effects.negative[:, col].tolist()
            columns[f"rank_{name}"] = ranks[:, col].tolist()
        return pd.DataFrame(columns)

    def write_parquet(self, path: str | Path) -> Path:
        """Write `table()` to a parquet file (needs pandas and pyarrow); the header's fields go to its metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(self.table(), preserve_index=False)
        meta = {**(table.schema.metadata or {}), b"trl_ntk.lookahead": json.dumps(self.meta).encode()}
        pq.write_table(table.replace_schema_metadata(meta), path)
        return path


def load_optimizer_state(trainer: Any, checkpoint: str | Path) -> Any:
    """Create the trainer's optimizer and load `checkpoint/optimizer.pt` into it (a `Trainer` checkpoint folder);
    returns the optimizer. Learning rates are the checkpoint's (the scheduler is not stepped)."""
    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        raise ValueError(f"no optimizer state at {path}; pass a Trainer checkpoint folder (checkpoint-<step>)")
    optimizer = trainer.create_optimizer()
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return optimizer


def _default_probes(trainer: Any, kind: str) -> ProbeSet:
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    if kind == "dpo":
        return ProbeSet.from_preference_dataset(trainer.train_dataset, tokenizer, num_prompts=8, seed=0)
    return ProbeSet.from_prompts(trainer.train_dataset, tokenizer, num_prompts=8, seed=0)


def _excerpt(row: Mapping[str, Any], chars: int) -> dict[str, str]:
    out = {}
    for column in _TEXT_COLUMNS:
        if column in row and row[column] is not None:
            value = row[column]
            text = value if isinstance(value, str) else " | ".join(str(m.get("content", m)) for m in value)
            out[column] = text if len(text) <= chars else text[: chars - 3] + "..."
    return out


def _preconditioner(trainer: Any, model: nn.Module, config: LookaheadConfig) -> tuple[dict, Any, dict[str, Any]]:
    """`(P, history or None, meta)` for the configured view."""
    if config.view == "sgd":
        lr = float(config.lr if config.lr is not None else trainer.args.learning_rate)
        names = list(trainable_parameters(model))
        return lookahead.sgd_view(model, lr, params=names), None, {"view": "sgd", "lr": lr}
    optimizer = trainer.optimizer
    if optimizer is None:
        raise ValueError("the Adam view needs the trainer's optimizer state: train first or load_optimizer_state()")
    inner = getattr(optimizer, "optimizer", optimizer)
    split = lookahead.adam_view(optimizer, model)
    steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
    meta = {
        "view": config.view,
        "optimizer": type(inner).__name__,
        "optimizer_step": int(max(steps)) if steps else 0,
        "lr": [float(g["lr"]) for g in inner.param_groups],
    }
    return split.preconditioner, split.history, meta


def _capture_batch(trainer: Any, model: nn.Module, capture: GradientCapture, inputs: dict) -> list:
    """Run the trainer's loss on `inputs` and the backward from the loss to the model's outputs only (not through
    the model: `trl_ntk.integration.signal.capture_signal`); return the captured micro-batches."""
    from trl_ntk.integration.signal import capture_signal

    return capture_signal(trainer, model, capture, inputs)


def _inputs(trainer: Any, rows: list[int], device: torch.device) -> dict:
    features = [trainer.train_dataset[i] for i in rows]
    batch = trainer.data_collator(features)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def score_trainer(
    trainer: Any, probes: ProbeSet | None = None, config: LookaheadConfig | None = None, **options: Any
) -> LookaheadResult:
    """Predicted first-order effect of one step on each train-dataset example on every probe kind.

    Usage:
    ```python
    >>> trainer = DPOTrainer(...)
    >>> result = score_trainer(trainer, view="sgd", max_examples=200)
    >>> result.write_jsonl("lookahead.jsonl")
    >>> kept = lookahead.curate(raw_dataset, result.effects, "chosen", fraction=0.1, indices=result.indices)
    ```

    Args:
        trainer (`SFTTrainer`, `DPOTrainer` or `GRPOTrainer`): built by the user (its dataset, collator, loss type,
            optimizer; for GRPO its generation settings and reward functions).
        probes (`ProbeSet`, *optional*): defaults to 8 prompts of the train dataset (as the callback builds them).
        config (`LookaheadConfig`, *optional*): options; keyword arguments override its fields.

    GRPO: an example is a prompt; its effect is that of one step on a group of `num_generations` completions the
    trainer samples (seeded) and rewards, a Monte-Carlo estimate of the expected effect (`lookahead_grpo`).

    Cost: `R` probe backwards, then per batch of `jvp_rows` sequences one trainer loss forward (+ a backward to the
    unembedding) per scored step and one JVP per probe direction; GRPO adds the trainer's sampling of each group.
    The model's train/eval mode is restored.
    """
    config = LookaheadConfig(**{**(asdict(config) if config else {}), **options})
    adapter = adapter_for(trainer)
    adapter.validate(trainer)
    if adapter.kind == "grpo":
        lookahead_grpo.validate(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    device = next(model.parameters()).device
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    encoded = (probes or _default_probes(trainer, adapter.kind)).encode(tokenizer)
    probe_batch = encoded.batch.to(device)
    names, weights = lookahead.probe_weights(encoded, by="kind")
    if config.by_probe:
        probe_names, probe_rows = lookahead.probe_weights(encoded, by="probe")
        names, weights = names + probe_names, torch.cat([weights, probe_rows])
    rows = _rows(len(trainer.train_dataset), config)
    steps = _StepInputs(trainer, adapter.kind, rows, config, device)
    was_training = model.training
    model.eval()
    capture = GradientCapture(model, temperature=adapter.temperature(trainer))
    try:
        with steps.context():
            preconditioner, history, meta = _preconditioner(trainer, model, config)
            if config.view == "adam_exact":
                preconditioner = {name: torch.ones((), dtype=p.dtype) for name, p in preconditioner.items()}
            directions = lookahead.probe_directions(
                model, probe_batch, weights, names, preconditioner, view=config.view, params=list(preconditioner)
            )
            if history is not None:
                change = lookahead.direction_effect(model, probe_batch, weights.to(device), history)
                meta["history_effect"] = {name: float(v) for name, v in zip(names, change)}
            if config.view == "adam_exact":
                effects = _score_exact(trainer, model, directions, history, steps)
            else:
                effects = _score_rows(trainer, model, capture, adapter, directions, steps, config)
    finally:
        capture.remove()
        model.train(was_training)
    meta.update(trainer=adapter.kind, batch_size=config.batch_size, num_examples=len(rows), first_order=True)
    meta.update(steps.meta)
    texts = [
        {**_excerpt(trainer.train_dataset[i], config.text_chars), **steps.texts.get(p, {})} for p, i in enumerate(rows)
    ]
    return LookaheadResult(effects=effects, indices=rows, texts=texts, meta=meta)


class _StepInputs:
    """The trainer's inputs of the step on the examples at given positions of `rows`: the collated rows (SFT, DPO),
    or a group of completions per prompt sampled and rewarded by the trainer (GRPO, `rows_per_example = G`)."""

    def __init__(self, trainer: Any, kind: str, rows: list[int], config: LookaheadConfig, device: torch.device):
        self.trainer, self.kind, self.rows, self.config, self.device = trainer, kind, rows, config, device
        self.rows_per_example = 1
        self.meta: dict[str, Any] = {}
        self.texts: dict[int, dict[str, str]] = {}
        if kind == "grpo":
            self.rows_per_example = lookahead_grpo.group_size(trainer, config.num_generations)
            self.meta = lookahead_grpo.meta(trainer, self.rows_per_example, config.seed)

    def context(self) -> Any:
        if self.kind != "grpo":
            return contextlib.nullcontext()
        return lookahead_grpo.scoring_mode(self.trainer, self.rows_per_example)

    def __call__(self, positions: list[int]) -> dict:
        rows = [self.rows[p] for p in positions]
        if self.kind != "grpo":
            return _inputs(self.trainer, rows, self.device)
        size, seed = self.rows_per_example, lookahead_grpo.group_seed(self.config.seed, rows)
        inputs = lookahead_grpo.sample_groups(self.trainer, rows, size, seed)
        texts = lookahead_grpo.group_texts(self.trainer, inputs, size, self.config.text_chars)
        self.texts.update(zip(positions, texts))
        return inputs


def _rows(size: int, config: LookaheadConfig) -> list[int]:
    """The train-dataset rows to score: `config.rows`, else the first `max_examples` (all by default)."""
    if config.rows is None:
        return list(range(size if config.max_examples is None else min(size, config.max_examples)))
    rows = [int(r) for r in config.rows]
    if any(not 0 <= r < size for r in rows):
        raise ValueError(f"rows must lie in [0, {size}) (the train dataset's rows)")
    return rows


def _score_rows(
    trainer: Any,
    model: nn.Module,
    capture: GradientCapture,
    adapter: Any,
    directions: lookahead.ProbeDirections,
    steps: _StepInputs,
    config: LookaheadConfig,
) -> lookahead.ExampleEffects:
    """Capture `c_l` batch by batch, join captured sequences up to `jvp_rows`, and JVP each joined batch. Examples
    are numbered by their position in `steps.rows` (a GRPO prompt owns `steps.rows_per_example` sequences)."""
    pending: list[tuple[TokenBatch, Tensor, Tensor]] = []
    parts: list[lookahead.ExampleEffects] = []
    first_pending = 0

    def flush(upto: int) -> None:
        nonlocal pending, first_pending
        if not pending:
            return
        joinable = all(not batch.model_kwargs for batch, _, _ in pending)
        groups = [pending] if joinable else [[item] for item in pending]
        total = None
        for group in groups:
            batch = concat_token_batches([b for b, _, _ in group]) if len(group) > 1 else group[0][0]
            coeffs = torch.cat([c for _, c, _ in group])
            example = torch.cat([e for _, _, e in group]) - first_pending
            part = lookahead.batch_effects(model, batch, coeffs, example, upto - first_pending, directions)
            total = part if total is None else _add(total, part)
        parts.append(total)
        pending, first_pending = [], upto

    rows_pending, count = 0, len(steps.rows)
    for start in range(0, count, config.batch_size):
        positions = list(range(start, min(start + config.batch_size, count)))
        inputs = steps(positions)
        micro_batches = _capture_batch(trainer, model, capture, inputs)
        if capture.failures or not micro_batches:
            raise RuntimeError(capture.failures[0] if capture.failures else "no training forward was captured")
        for micro_batch, labels in zip(micro_batches, label_step(adapter, micro_batches)):
            example = labels.example // steps.rows_per_example + start
            pending.append((micro_batch.batch, micro_batch.grad_coeffs, example))
            rows_pending += micro_batch.batch.input_ids.shape[0]
        if rows_pending >= config.jvp_rows:
            flush(positions[-1] + 1)
            rows_pending = 0
    flush(count)
    return lookahead.concat_effects(parts)


def _score_exact(
    trainer: Any,
    model: nn.Module,
    gradients: lookahead.ProbeDirections,
    baseline: dict[str, Tensor],
    steps: _StepInputs,
) -> lookahead.ExampleEffects:
    """`view="adam_exact"`: per example, the trainer's gradient on it alone (one backward) stepped through the
    optimizer's exact update (`lookahead.exact_step_effect`). The sign split is not defined for a non-linear step:
    `positive` and `negative` are NaN."""
    named = {name: p for name, p in trainable_parameters(model).items() if name in baseline}
    total = torch.zeros(len(steps.rows), len(gradients.names), dtype=torch.float64)
    for position in range(len(steps.rows)):
        with torch.enable_grad():
            loss = trainer.compute_loss(model, steps([position]))
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        gradient = {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(named.items(), grads)}
        probes = gradients.directions
        total[position] = lookahead.exact_step_effect(trainer.optimizer, named, gradient, probes, baseline)
    nan = torch.full_like(total, float("nan"))
    return lookahead.ExampleEffects(names=list(gradients.names), total=total, positive=nan, negative=nan.clone())


def _add(left: lookahead.ExampleEffects, right: lookahead.ExampleEffects) -> lookahead.ExampleEffects:
    return lookahead.ExampleEffects(
        names=left.names,
        total=left.total + right.total,
        positive=left.positive + right.positive,
        negative=left.negative + right.negative,
    )


def toy_trainer(kind: str, output_dir: str | Path, *, num_rows: int = 64, model_path: str | None = None, **args: Any):
    """A `DPOTrainer` or `SFTTrainer` on the offline toy preference data, or a `GRPOTrainer` on the toy arithmetic
    prompts with their exact-answer reward (its model, or the one at `model_path`), with a plain-SGD-friendly
    configuration for scoring (no training is run here)."""
    return build_trainer(kind, output_dir, num_rows=num_rows, model_path=model_path, **args)


def build_trainer(
    kind: str,
    output_dir: str | Path,
    *,
    dataset: Any = None,
    model_path: str | None = None,
    reward_funcs: Any = None,
    num_rows: int = 64,
    **args: Any,
) -> Any:
    """A `DPOTrainer`, `SFTTrainer` or `GRPOTrainer` for scoring (no training is run here).

    Args:
        kind (`str`): `"dpo"`, `"sft"` or `"grpo"`.
        output_dir (`str` or `Path`): the trainer's `output_dir` (nothing is written there by building).
        dataset (`datasets.Dataset`, *optional*): the train dataset; defaults to `num_rows` toy rows (preference
            pairs; GRPO: the toy arithmetic prompts). For SFT a `prompt`/`chosen` dataset is read as
            `prompt`/`completion`.
        model_path (`str`, *optional*): a hub id or local folder (`AutoModelForCausalLM`); defaults to the toy model.
        reward_funcs (*optional*): GRPO reward functions; required with a user `dataset` (the toy's is its
            exact-answer reward).
        args: fields of the trainer's config class (`loss_type`, `beta`, ...), over a plain-SGD-friendly default.

    Raises `ValueError` for a `loss_type` the config class does not list, and `TypeError` for a field the config
    class lacks (e.g. `beta` for SFT), before the model is loaded.
    """
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from trl_ntk.demo import toy

    if kind not in ("dpo", "sft", "grpo"):
        raise ValueError(f"kind must be 'dpo', 'sft' or 'grpo', got {kind!r}")
    if kind == "grpo" and dataset is not None and reward_funcs is None:
        raise ValueError("GRPO on a user dataset needs a reward function (--reward-func module:function)")
    config_class = {"dpo": DPOConfig, "sft": SFTConfig, "grpo": GRPOConfig}[kind]
    common = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "per_device_train_batch_size": 1,
        "learning_rate": 1e-5,
        **args,
    }
    if kind == "grpo":
        generations = int(common.pop("num_generations", 4))
        common = {"num_generations": generations, "max_completion_length": 24, "temperature": 1.0, **common}
        common["per_device_train_batch_size"] = generations
    check_loss_type(config_class, common.get("loss_type"))
    config = config_class(**common)
    if model_path is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    else:
        model, tokenizer = toy.model_and_tokenizer(warmup="pretrain" if kind == "sft" else True)
    if kind == "grpo":
        data = toy.math_dataset(n=num_rows, seed=0) if dataset is None else dataset
        rewards = toy.math_reward if reward_funcs is None else reward_funcs
        return GRPOTrainer(
            model=model, args=config, train_dataset=data, processing_class=tokenizer, reward_funcs=rewards
        )
    data = toy.preference_dataset(n=num_rows, seed=0) if dataset is None else dataset
    if kind == "dpo":
        return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    if {"prompt", "chosen"} <= set(data.column_names) and "completion" not in data.column_names:
        data = data.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)


def check_loss_type(config_class: type, loss_type: Any) -> None:
    """Raise `ValueError` unless every name in `loss_type` (a str or a list) is one the config class lists for its
    `loss_type` field (its `choices`, else the quoted names after "values are" in its help). The configs accept any
    string and the trainers fail only at the first loss; this fails before any work. No check when the class lists
    nothing."""
    if loss_type is None:
        return
    import dataclasses
    import re

    fields = {f.name: f for f in dataclasses.fields(config_class)}
    if "loss_type" not in fields:
        raise TypeError(f"{config_class.__name__} has no loss_type")
    metadata = fields["loss_type"].metadata
    allowed = list(metadata.get("choices") or [])
    if not allowed:
        sentence = re.search(r"values are:?\s*(.*?)\.(?:\s|$)", metadata.get("help", ""), flags=re.S)
        allowed = re.findall(r"'([A-Za-z0-9_]+)'", sentence.group(1)) if sentence else []
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [name for name in names if name not in allowed]
    if allowed and unknown:
        raise ValueError(
            f"{config_class.__name__}: unknown loss_type {unknown[0]!r}; expected one of {', '.join(allowed)}"
        )
