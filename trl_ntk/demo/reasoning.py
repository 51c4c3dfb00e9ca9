"""Offline GRPO task with worked multi-step arithmetic, built so that plain GRPO shows lazy likelihood displacement.

Prompt `"Q: 7+9+8\\nA:"` (three operands in `1 .. 9`); a completion shows its steps and ends with the answer:

    " 9+7=16, 16+8=24. Answer 24"

Design (what lets a negative gradient displace the correct completions' likelihood, after Deng et al., "On the Effect
of Negative Gradient in Group Relative Deep Reinforcement Optimization", NeurIPS 2025):

- correct completions vary: each solution adds the operands in a random order, so the correct completions of one
  group are not copies of one string (identical shared prefixes cancel in a group, since advantages sum to zero);
- a wrong completion slips (a step's result off by 1 or 2) and carries on correctly from the slipped value, so it
  shares the format, most digits and the later steps' structure with the right ones;
- the model is warmed up by SFT on solutions whose steps slip independently with probability `slip_prob`, so the
  digits after the first step stay uncertain and sampled groups are mixed (sampled accuracy about 0.43 at
  temperature 1; all 32 groups of 8 mixed in one sample of 32 prompts).

Usage:

```python
from trl import GRPOConfig, GRPOTrainer
from trl_ntk.demo.reasoning import model_and_tokenizer, reasoning_dataset, reasoning_reward

model, tokenizer = model_and_tokenizer()  # warm model, built once and cached under $TRL_NTK_CACHE
trainer = GRPOTrainer(model=model, reward_funcs=reasoning_reward, train_dataset=reasoning_dataset(),
                      args=GRPOConfig(output_dir="out", num_generations=8, max_completion_length=32),
                      processing_class=tokenizer)
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trl_ntk.demo import toy, toy_model
from trl_ntk.demo.toy_data import _Document

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM, Qwen2Tokenizer

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
"""Bump when the build changes in a way the recipe hash cannot see."""

PROMPT = "Q: {question}\nA:"
"""Prompt format; the completion follows after one space."""

MAX_OPERAND = 9
NUM_OPERANDS = 3
SLIPS = (-2, -1, 1, 2)
"""How far a slipped step's result is off."""

_ANSWER = re.compile(r"Answer\s+(-?\d+)")
_STEP = re.compile(r"(-?\d+)\+(-?\d+)=(-?\d+)")


@dataclass(frozen=True)
class ReasoningRecipe:
    """Model shape and warm-up (completion-only SFT with AdamW, linear decay to 0, clipping at 1)."""

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    slip_prob: float = 0.2
    sft_examples: int = 4000
    sft_epochs: int = 6
    sft_batch_size: int = 32
    sft_lr: float = 2e-3


DEFAULT_RECIPE = ReasoningRecipe()


# ------------------------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solution:
    """One worked solution: its text (leading space, no end-of-turn), the written final answer, and whether it is
    right (the final answer equals the sum; two slips can cancel)."""

    text: str
    answer: int
    correct: bool
    slips: int


def solve(operands: Sequence[int], rng: random.Random, slip_prob: float = 0.0) -> Solution:
    """A worked solution: the operands in a random order, added left to right; each step's result slips by one of
    `SLIPS` with probability `slip_prob` (never below 0), and later steps carry on from the written value.

    `solve([7, 9, 8], rng)` -> `" 9+7=16, 16+8=24. Answer 24"` (order drawn from `rng`).
    """
    order = list(operands)
    rng.shuffle(order)
    total, steps, slips = order[0], [], 0
    for operand in order[1:]:
        result = total + operand
        if rng.random() < slip_prob:
            result += rng.choice([s for s in SLIPS if result + s >= 0])
            slips += 1
        steps.append(f"{total}+{operand}={result}")
        total = result
    return Solution(f" {', '.join(steps)}. Answer {total}", total, total == sum(operands), slips)


def prompt_text(operands: Sequence[int]) -> str:
    """`"Q: 7+9+8\\nA:"`."""
    return PROMPT.format(question="+".join(str(o) for o in operands))


def _operands(rng: random.Random) -> list[int]:
    return [rng.randint(1, MAX_OPERAND) for _ in range(NUM_OPERANDS)]


def reasoning_dataset(n: int = 512, seed: int = 0) -> Dataset:
    """Prompt-only data for GRPO: `n` rows with columns `prompt` (plain text, `"Q: 7+9+8\\nA:"`), `answer` (`int`,
    passed by TRL to `reasoning_reward`), `operands` (`list[int]`) and `solution` (one correct worked solution, for
    SFT and probes). Operands are drawn uniformly from `1 .. MAX_OPERAND`; deterministic in `(n, seed)`."""
    from datasets import Dataset

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(f"reasoning-{seed}")
    rows = []
    for _ in range(n):
        operands = _operands(rng)
        rows.append(
            {
                "prompt": prompt_text(operands),
                "answer": sum(operands),
                "operands": operands,
                "solution": solve(operands, rng).text,
            }
        )
    return Dataset.from_list(rows)


def final_answer(text: str) -> int | None:
    """The integer after the last `"Answer"` of a completion, or `None` when there is none (malformed)."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def reasoning_reward(prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float]:
    """TRL reward function for `reasoning_dataset`: 1.0 when the completion's final `"Answer N"` equals `answer`,
    else 0.0 (wrong, or no `"Answer N"` at all). Only the outcome counts, not the steps.

    Args:
        prompts (`list`): unused (TRL passes them).
        completions (`list[str]`): the completions (plain text; message lists are joined).
        answer (`list[int]`): the `answer` column, one per completion.
    """
    return toy.rewards_by_final_answer(completions, answer, final_answer)


def steps_of(text: str) -> list[tuple[int, int, int]]:
    """The `(a, b, written result)` steps of a completion, in order."""
    return [tuple(int(x) for x in match) for match in _STEP.findall(text)]


def shared_token_fraction(wrong: Sequence[int], right: Sequence[Sequence[int]]) -> float:
    """Share of a wrong completion's tokens equal to the token at the same position of the most similar right
    completion: `max_r (1/|w|) sum_t [w_t = r_t]` (positions past the end of `r` count as different)."""
    if not wrong or not right:
        return 0.0
    return max(sum(a == b for a, b in zip(wrong, r, strict=False)) / len(wrong) for r in right)


# ------------------------------------------------------------------------------------------------------------------
# Warm-up and cache.
# ------------------------------------------------------------------------------------------------------------------


def _sft_documents(recipe: ReasoningRecipe, epoch: int) -> list[_Document]:
    """One epoch: `sft_examples` fresh prompts, each with a solution whose steps slip with `slip_prob`."""
    rng = random.Random(f"reasoning-sft-{recipe.seed}-{epoch}")
    documents = []
    for _ in range(recipe.sft_examples):
        operands = _operands(rng)
        solution = solve(operands, rng, recipe.slip_prob)
        documents.append(_Document(prompt_text(operands), solution.text + toy.IM_END))
    return documents


def _recipe_hash(recipe: ReasoningRecipe) -> str:
    import transformers

    payload = {
        "version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "toy": toy.toy_cache_path("").name,
        "prompt": PROMPT,
        "task": [MAX_OPERAND, NUM_OPERANDS, SLIPS],
        "transformers_major": transformers.__version__.split(".")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(cache_dir: str | os.PathLike[str] | None = None, recipe: ReasoningRecipe = DEFAULT_RECIPE) -> Path:
    """Folder of a recipe's build: `<cache_dir>/reasoning-v<RECIPE_VERSION>-<hash>` (default root as in `toy`)."""
    root = Path(cache_dir) if cache_dir is not None else toy.default_cache_dir()
    return root / f"reasoning-v{RECIPE_VERSION}-{_recipe_hash(recipe)}"


def _build(folder: Path, recipe: ReasoningRecipe, tokenizer: Qwen2Tokenizer) -> None:
    """A fresh Qwen2 of the recipe's shape, completion-only SFT; saved atomically (with `tokenizer`) as `sft`."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with toy_model._single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = toy_model._build_random_model(recipe, tokenizer)  # the toy's initialisation, this shape
        epochs = [
            toy_model._encode(tokenizer, _sft_documents(recipe, epoch), loss_on_prompt=False)
            for epoch in range(recipe.sft_epochs)
        ]
        loss = toy_model._train(
            model, epochs, recipe.sft_batch_size, recipe.sft_lr, 0.0, tokenizer.pad_token_id, f"reasoning-{recipe.seed}"
        )
        toy_model._save_stage(model, tokenizer, folder, "sft")
    logger.info("reasoning model built in %s (%.1f s, last-epoch loss %.3f)", folder, time.perf_counter() - start, loss)


def model_and_tokenizer(
    cache_dir: str | os.PathLike[str] | None = None, recipe: ReasoningRecipe = DEFAULT_RECIPE
) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """The warm reasoning model and the toy tokenizer, built once per recipe, cached on disk and loaded from there.

    The build loads the toy's tokenizer (`toy.model_and_tokenizer(warmup="random")`, one token per digit), creates
    a Qwen2 (default: hidden 128, 3 layers, 4 heads / 2 KV heads, intermediate 256, tied embeddings) and trains it
    by completion-only SFT on `sft_epochs x sft_examples` worked solutions whose steps slip with `slip_prob`
    (about 2.5 minutes on a busy shared CPU core). Saved to `cache_path(cache_dir, recipe) / "sft"` (atomic rename,
    inter-process lock), so trainers that reload the model by path get the same weights.

    Returns:
        `(model, tokenizer)`: float32 `Qwen2ForCausalLM` in eval mode with eager attention, and the toy tokenizer
        (eos `<|im_end|>`, pad `<|endoftext|>`).
    """
    folder = cache_path(cache_dir, recipe)
    if not toy_model._is_built(folder, "sft"):
        _, tokenizer = toy.model_and_tokenizer(cache_dir, warmup="random")
        with toy_model._IN_PROCESS_LOCK, toy_model._file_lock(folder.parent / f"{folder.name}.lock"):
            if not toy_model._is_built(folder, "sft"):
                _build(folder, recipe, tokenizer)
    with toy_model._IN_PROCESS_LOCK:
        return toy_model._load(folder / "sft")
