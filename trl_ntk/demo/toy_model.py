"""The toy model: its recipe, a tiny random causal LM, the warm-up training loop, and the on-disk cache of the built
stages (`model_and_tokenizer`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from trl_ntk.demo.toy_data import (
    _CATEGORIES,
    _CLOSINGS,
    _MATH_MAX_OPERAND,
    _MATH_QUESTIONS,
    _MATH_SOLUTION,
    _OPENERS,
    _REPHRASE_CLOSINGS,
    _REPHRASE_OPENERS,
    CHOSEN_SLOT_WEIGHTS,
    PLAIN_PROMPT,
    _Document,
    _pretrain_documents,
    _sft_documents,
    tokenizer_corpus,
)
from trl_ntk.demo.toy_tokenizer import CHAT_TEMPLATE, MAX_LENGTH, SPECIAL_TOKENS, VOCAB_SIZE, train_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2ForCausalLM, Qwen2Tokenizer

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
"""Bump when the build changes in a way the recipe hash cannot see (for example the training loop)."""

# ------------------------------------------------------------------------------------------------------------------
# Warm-up recipe. Everything that changes the built artefacts goes into the cache folder's hash.
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WarmupRecipe:
    """Model shape and warm-up hyper-parameters (AdamW, linear decay to 0, gradient clipping at 1)."""

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tokenizer_documents: int = 3000
    pretrain_documents: int = 4000
    pretrain_math_fraction: float = 0.3
    pretrain_plain_fraction: float = 0.15
    pretrain_correct_fraction: float = 0.5
    pretrain_epochs: int = 2
    pretrain_batch_size: int = 32
    pretrain_lr: float = 2e-3
    sft_epochs: int = 6
    sft_batch_size: int = 16
    sft_lr: float = 1e-3
    sft_math_examples: int = 220
    weight_decay: float = 0.0


_RECIPE = _WarmupRecipe()

Stage = Literal["random", "pretrain", "sft"]
_STAGES: tuple[Stage, ...] = ("random", "pretrain", "sft")
_DONE_MARKER = "BUILD_COMPLETE"
_IN_PROCESS_LOCK = threading.Lock()
"""Serializes build and load across threads: `from_pretrained` toggles process-global initialization flags, and two
threads loading at once can leave them wrong (later models then come out untied)."""


# ------------------------------------------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------------------------------------------


def tiny_random_model(
    arch: Literal["qwen2", "llama"] = "qwen2",
    tie_word_embeddings: bool = True,
    vocab_size: int = VOCAB_SIZE,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture, in memory, eager attention, float32.

    Defaults give the toy's shape (about 0.37M parameters for `vocab_size=600`), with `pad_token_id = 0` and
    `eos_token_id = 2` (the toy tokenizer's `<|endoftext|>` and `<|im_end|>`), `max_position_embeddings = MAX_LENGTH`.

    Args:
        arch (`str`, *optional*, defaults to `"qwen2"`): `"qwen2"` (`Qwen2ForCausalLM`, q/k/v biases) or `"llama"`
            (`LlamaForCausalLM`, no biases).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`): share the input embedding and the LM head.
        vocab_size (`int`, *optional*, defaults to `VOCAB_SIZE`): rows of the embedding.
        seed (`int`, *optional*, defaults to `0`): `torch.manual_seed` for the initialisation (global RNG restored).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_class, model_class = classes[arch]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def _build_random_model(recipe: _WarmupRecipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    model = tiny_random_model(
        arch="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        seed=recipe.seed,
    )
    for config in (model.config, model.generation_config):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return model


# ------------------------------------------------------------------------------------------------------------------
# Warm-up training: a plain torch loop (faster on CPU than a Trainer for a model this small).
# ------------------------------------------------------------------------------------------------------------------


def _encode(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[_Document], loss_on_prompt: bool
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per document; labels are -100 on the prompt unless `loss_on_prompt`."""
    encoded = []
    for doc in documents:
        prompt_ids = tokenizer(doc.prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(doc.response, add_special_tokens=False)["input_ids"]
        input_ids = prompt_ids + response_ids
        labels = input_ids if loss_on_prompt else [-100] * len(prompt_ids) + response_ids
        encoded.append((input_ids[:MAX_LENGTH], labels[:MAX_LENGTH]))
    return encoded


def _batches(
    encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_token_id: int, rng: random.Random
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled, right-padded batches: `input_ids`, `attention_mask`, `labels`, each `[B, T]`."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, targets) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(targets)
            attention_mask[row, : len(ids)] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _train(
    model: PreTrainedModel,
    epochs: Sequence[Sequence[tuple[list[int], list[int]]]],
    batch_size: int,
    lr: float,
    weight_decay: float,
    pad_token_id: int,
    seed: str,
) -> float:
    """AdamW with a linear decay to 0 over all steps; returns the mean loss of the last epoch."""
    rng = random.Random(seed)
    total_steps = sum(math.ceil(len(epoch) / batch_size) for epoch in epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    model.train()
    last_losses: list[float] = []
    for encoded in epochs:
        last_losses = []
        for batch in _batches(encoded, batch_size, pad_token_id, rng):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_losses.append(loss.item())
    model.eval()
    return sum(last_losses) / max(len(last_losses), 1)


def _pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: _WarmupRecipe) -> None:
    documents = _pretrain_documents(recipe, recipe.pretrain_documents, seed=f"pretrain-{recipe.seed}")
    encoded = _encode(tokenizer, documents, loss_on_prompt=True)
    loss = _train(
        model,
        [encoded] * recipe.pretrain_epochs,
        recipe.pretrain_batch_size,
        recipe.pretrain_lr,
        recipe.weight_decay,
        tokenizer.pad_token_id,
        seed=f"pretrain-order-{recipe.seed}",
    )
    logger.info("toy pre-training done: last-epoch loss %.3f", loss)


def _sft(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: _WarmupRecipe) -> None:
    epochs = [_encode(tokenizer, _sft_documents(recipe, e), loss_on_prompt=False) for e in range(recipe.sft_epochs)]
    loss = _train(
        model,
        epochs,
        recipe.sft_batch_size,
        recipe.sft_lr,
        recipe.weight_decay,
        tokenizer.pad_token_id,
        seed=f"sft-order-{recipe.seed}",
    )
    logger.info("toy SFT done: last-epoch loss %.3f", loss)


# ------------------------------------------------------------------------------------------------------------------
# Cache.
# ------------------------------------------------------------------------------------------------------------------


def _recipe_hash(recipe: _WarmupRecipe) -> str:
    """Hash of everything the build depends on: recipe, vocabulary size, template, wording, facts, versions."""
    import transformers

    payload = {
        "version": RECIPE_VERSION,
        "recipe": recipe.__dict__,
        "vocab_size": VOCAB_SIZE,
        "max_length": MAX_LENGTH,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
        "plain_prompt": PLAIN_PROMPT,
        "slot_weights": CHOSEN_SLOT_WEIGHTS,
        "categories": [c.__dict__ for c in _CATEGORIES],
        "wording": [_OPENERS, _CLOSINGS, _REPHRASE_OPENERS, _REPHRASE_CLOSINGS],
        "math": [_MATH_MAX_OPERAND, _MATH_QUESTIONS, _MATH_SOLUTION],
        "transformers_major": transformers.__version__.split(".")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """`$TRL_NTK_CACHE` if set, else `~/.cache/trl_ntk`."""
    return Path(os.environ.get("TRL_NTK_CACHE") or Path.home() / ".cache" / "trl_ntk")


def toy_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the current recipe's build: `<cache_dir>/toy-v<RECIPE_VERSION>-<hash>`, one subfolder per stage."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"toy-v{RECIPE_VERSION}-{_recipe_hash(_RECIPE)}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX `flock`); elsewhere builders race and the atomic rename keeps one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Build on one intra-op thread, restoring the caller's setting after. The model's matrices are too small for
    intra-op parallelism to pay: on a shared 2-core machine 2 threads made the warm-up about 10x slower than 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _is_built(folder: Path, stage: Stage) -> bool:
    return (folder / stage / _DONE_MARKER).exists()


def _load(path: Path) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """`(model, tokenizer)` from one stage folder: eager attention, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _save_stage(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, stage: Stage) -> None:
    """Write one stage atomically: into a temporary sibling folder, then rename it into place with its marker."""
    target = folder / stage
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=folder))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps({"stage": stage, "recipe": folder.name}))
        if target.exists():  # left by an interrupted build, without its marker
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(folder: Path, stage: Stage) -> None:
    """Build every stage up to `stage` that is not on disk yet, each from the previous stage's saved folder, so a
    stage's weights do not depend on which stages an earlier call happened to build."""
    recipe = _RECIPE
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _single_thread(), torch.random.fork_rng(devices=[]):
        if not _is_built(folder, "random"):
            torch.manual_seed(recipe.seed)
            tokenizer = train_tokenizer(tokenizer_corpus(recipe))
            _save_stage(_build_random_model(recipe, tokenizer), tokenizer, folder, "random")
        training = {"pretrain": _pretrain, "sft": _sft}
        for previous, current in zip(_STAGES[: _STAGES.index(stage)], _STAGES[1 : _STAGES.index(stage) + 1]):
            if _is_built(folder, current):
                continue
            model, tokenizer = _load(folder / previous)
            torch.manual_seed(recipe.seed)
            training[current](model, tokenizer, recipe)
            _save_stage(model, tokenizer, folder, current)
    logger.info("toy model up to stage %r ready in %s (%.1f s)", stage, folder, time.perf_counter() - start)


def _stage_of(warmup: bool | str) -> Stage:
    if warmup is True or warmup == "sft":
        return "sft"
    if warmup is False or warmup == "random":
        return "random"
    if warmup == "pretrain":
        return "pretrain"
    raise ValueError(f"warmup must be True, False, 'pretrain', 'sft' or 'random', got {warmup!r}")


def model_and_tokenizer(
    cache_dir: str | os.PathLike[str] | None = None,
    warmup: bool | Literal["random", "pretrain", "sft"] = True,
) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """The toy tiny Qwen2 model and its tokenizer, built once, cached on disk and loaded from their folder.

    The build (first call for a recipe: about 30 s on one free CPU core, 45 s on a busy shared one; later calls load
    in tens of milliseconds) trains a 600-token byte-level BPE tokenizer with a ChatML template on the synthetic
    corpus, creates a Qwen2 model (hidden 128, 2 layers, 4 heads / 2 KV heads, intermediate 256, tied embeddings,
    372,864 parameters) and warms it up:

    1. `"pretrain"`: 2 epochs of language modelling on 4,000 broad documents (uniform wording over all word pools,
       half of the answers wrong, facts and arithmetic, chat and plain formats);
    2. `"sft"`: 6 epochs of completion-only SFT on `chosen`-distributed responses to the train prompts and on correct
       worked arithmetic. Under this model `rejected` has far lower log-prob than `chosen` (mean summed log-prob
       -6.4 vs -16.0 on the train split; the pre-trained base: -12.2 vs -14.7), and arithmetic sampled at
       temperature 1 is right about half of the time.

    Each stage is saved with the tokenizer to `toy_cache_path(cache_dir) / stage` (atomic rename, inter-process
    lock) and loaded with `from_pretrained(path)`, so `model.name_or_path` is that folder and trainers that reload the
    model by path (DPO's implicit reference, GRPO with `beta > 0`) get the same weights.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): root of the cache; defaults to `$TRL_NTK_CACHE` or
            `~/.cache/trl_ntk`. The build lives in a subfolder named after `RECIPE_VERSION` and a hash of the recipe,
            so recipe changes never load stale weights.
        warmup (`bool` or `str`, *optional*, defaults to `True`): which stage to load. `True` / `"sft"`: the warm
            model; `"pretrain"`: the pre-trained base before SFT (start the SFT demo here); `False` / `"random"`: the
            random initialisation (same tokenizer).

    Returns:
        `(model, tokenizer)`: a `Qwen2ForCausalLM` in eval mode with eager attention, float32, on CPU, and a
        `Qwen2Tokenizer`, a `PreTrainedTokenizerFast` (eos `<|im_end|>`, pad `<|endoftext|>`, no bos, right padding,
        `model_max_length = 256`, ChatML `chat_template` with generation markers).
    """
    stage = _stage_of(warmup)
    folder = toy_cache_path(cache_dir)
    with _IN_PROCESS_LOCK:
        if not _is_built(folder, stage):
            with _file_lock(folder.parent / f"{folder.name}.lock"):
                if not _is_built(folder, stage):
                    _build(folder, stage)
        return _load(folder / stage)
