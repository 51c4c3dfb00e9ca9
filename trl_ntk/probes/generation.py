"""Fresh probe responses from the current model (greedy and sampled), drawn without disturbing training."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from trl_ntk.probes.drafts import GreedyDrafts, speculative_greedy
from trl_ntk.probes.encoding import _generation_prompt_ids
from trl_ntk.probes.modes import eval_mode, forked_rng
from trl_ntk.probes.responses import ProbeResponse, PromptLike, is_conversation

logger = logging.getLogger(__name__)

SAMPLED_KINDS = ("greedy", "sample")
"""Kinds `sample_responses` produces; regenerate them with `ProbeSet.select(exclude=SAMPLED_KINDS)` + `extend`."""


def sample_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: Any,
    *,
    num_samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 16,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    synced_gpus: bool = False,
    drafts: GreedyDrafts | None = None,
    prompt_cache: dict[str, list[int]] | None = None,
) -> list[ProbeResponse]:
    """Responses of the current model to each prompt: one greedy (kind `greedy`) and `num_samples` samples (`sample`).

    Prompts are tokenized as TRL's GRPO trainer tokenizes them for generation (`apply_chat_template(...,
    add_generation_prompt=True)` or `tokenizer(prompt)`), left padded, and decoded without the eos and padding
    (`skip_special_tokens=True`, as GRPO decodes). Samples are drawn from the policy itself at `temperature`
    (`top_k=0`, `top_p=1`, no repetition penalty; override with `generation_kwargs`). Empty generations are skipped
    with a warning. Probe ids: `"<prompt_id>-greedy"`, `"<prompt_id>-sample-<i>"`.

    A mixture-of-experts model generates with its router outputs off (`router_outputs_off`): with them on, its
    forward computes the load-balancing loss on each decoding step's router logits against the whole attention mask,
    a size mismatch.

    Training is left undisturbed: generation runs on a fork of torch's RNG state (CPU and every accelerator device)
    seeded with `seed`, with every module in eval mode, and each module's mode is restored afterwards. Works with a
    model patched by TRL's `add_fused_lm_head` (its plain forward is the original one). Re-encoding a decoded
    plain-text response appends the eos token (see `ProbeSet.encode`), also for responses cut at `max_new_tokens`.

    Args:
        model (`PreTrainedModel`): the policy (unwrapped).
        tokenizer (`PreTrainedTokenizerBase`): the trainer's `processing_class`.
        prompts (`ProbeSet` or `Sequence[Probe]`): the prompts to answer.
        num_samples (`int`, *optional*, defaults to `0`): sampled responses per prompt.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        max_new_tokens (`int`, *optional*, defaults to `128`): generation length bound.
        seed (`int`, *optional*, defaults to `0`): seeds the forked RNG.
        batch_size (`int`, *optional*, defaults to `16`): prompts per `generate` call.
        chat_template_kwargs (`dict`, *optional*): extra keyword arguments for `apply_chat_template`.
        generation_kwargs (`dict`, *optional*): overrides for the `GenerationConfig` fields.
        synced_gpus (`bool`, *optional*, defaults to `False`): call on every rank of a sharded model (FSDP2); ranks
            keep running forwards until all have finished (`generate(synced_gpus=True)`).
        drafts (`GreedyDrafts`, *optional*): the greedy responses of earlier calls (and reference token
            sequences): the greedy responses are decoded by guessing from them and verifying the guesses
            (`drafts.speculative_greedy`; compared with `generate` once per model at the first call, which decodes
            plainly); updated with this call's. Not used with `synced_gpus` or `generation_kwargs`.
        prompt_cache (`dict`, *optional*): the prompt token ids per prompt id, read and filled here (shared with
            `encode_responses`: the same tokenizer and `chat_template_kwargs`); defaults to a fresh dict.

    Returns:
        `list[ProbeResponse]`: per prompt, the greedy response then the samples (non-empty ones only).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    kwargs = dict(chat_template_kwargs or {})
    probes, prompt_ids = [], []
    prompt_cache = {} if prompt_cache is None else prompt_cache
    for probe in prompts.prompts() if hasattr(prompts, "prompts") else prompts:
        if probe.prompt_id not in prompt_cache:
            prompt_cache[probe.prompt_id] = _generation_prompt_ids(tokenizer, probe.prompt, kwargs)
        ids = prompt_cache[probe.prompt_id]
        if ids:
            probes.append(probe)
            prompt_ids.append(ids)
        else:
            logger.warning("prompt %r has no tokens to generate after; no sampled responses for it", probe.prompt_id)
    device = model.get_input_embeddings().weight.device
    eos_ids = _eos_token_ids(model, tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    greedy_config, sample_config = _generation_configs(
        eos_ids, pad_token_id, num_samples, temperature, max_new_tokens, generation_kwargs
    )
    generated: dict[str, list[ProbeResponse]] = {probe.prompt_id: [] for probe in probes}
    skipped = 0
    with eval_mode(model), forked_rng(device), torch.no_grad(), router_outputs_off(model):
        if num_samples or generation_kwargs:  # greedy decoding draws nothing (seeding every device costs ~2 ms)
            torch.manual_seed(seed)
        for start in range(0, len(probes), batch_size):
            chunk = probes[start : start + batch_size]
            input_ids, attention_mask = _left_pad(prompt_ids[start : start + batch_size], pad_token_id, device)
            runs = [("greedy", greedy_config, 1)] + ([("sample", sample_config, num_samples)] if num_samples else [])
            for kind, generation_config, per_prompt in runs:
                completions = None
                ids = prompt_ids[start : start + batch_size]
                speculative = kind == "greedy" and drafts is not None
                speculative = speculative and drafts.usable(model, synced_gpus, generation_kwargs)
                if speculative and drafts.verified:
                    try:
                        completions = speculative_greedy(model, ids, drafts, max_new_tokens, eos_ids, pad_token_id)
                    except Exception:  # noqa: BLE001 - never fail a scoring: decode plainly from now on
                        name = type(model).__name__
                        logger.warning("greedy decoding from drafts failed on %s; decoding plainly", name)
                        drafts.failed = True
                if completions is None:
                    output = model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        generation_config=generation_config,
                        synced_gpus=synced_gpus,
                    )
                    completions = output[:, input_ids.shape[1] :].tolist()
                    if speculative and drafts.verified is None:
                        drafts.check(model, ids, completions, max_new_tokens, eos_ids, pad_token_id)
                if kind == "greedy" and drafts is not None:
                    drafts.remember(ids, completions, eos_ids)
                for row, completion in enumerate(completions):
                    probe = chunk[row // per_prompt]
                    text = tokenizer.decode(_cut_at_eos(completion, eos_ids), skip_special_tokens=True)
                    if not text:
                        skipped += 1
                        continue
                    suffix = "greedy" if kind == "greedy" else f"sample-{row % per_prompt}"
                    probe_id = f"{probe.prompt_id}-{suffix}"
                    response: PromptLike = (
                        [{"role": "assistant", "content": text}] if is_conversation(probe.prompt) else text
                    )
                    generated[probe.prompt_id].append(
                        ProbeResponse(probe_id, probe.prompt_id, kind, probe.prompt, response)
                    )
    if skipped:
        logger.warning("skipped %d empty generated responses (of %d)", skipped, len(probes) * (1 + num_samples))
    return [r for probe in probes for r in generated[probe.prompt_id]]


@contextlib.contextmanager
def router_outputs_off(model: nn.Module) -> Iterator[None]:
    """Run the body with `output_router_logits=False` in every config of the model's modules that has it on (MoE
    models trained with their load-balancing loss); the values are restored afterwards.

    Generation needs no router logits, and an MoE forward that returns them also computes the load-balancing loss
    from them and the attention mask, which have different lengths once decoding uses the cache."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    texts = [c.get_text_config() for c in configs.values() if hasattr(c, "get_text_config")]
    configs.update({id(c): c for c in texts})
    switched = [c for c in configs.values() if getattr(c, "output_router_logits", False) is True]
    for config in switched:
        config.output_router_logits = False
    try:
        yield
    finally:
        for config in switched:
            config.output_router_logits = True


def generation_cap(trainer: Any, max_new_tokens: int) -> int:
    """`max_new_tokens`, capped at the trainer's own completion length when it has one (GRPO's
    `max_completion_length`): the policy's responses are never trained beyond it, and each generated token costs one
    decoding forward of the probe prompts."""
    trained = getattr(getattr(trainer, "args", None), "max_completion_length", None)
    return min(max_new_tokens, int(trained)) if isinstance(trained, int) and trained > 0 else max_new_tokens


def _generation_configs(
    eos_ids: list[int],
    pad_token_id: int,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    generation_kwargs: Mapping[str, Any] | None,
) -> tuple[Any, Any]:
    """`(greedy, sample)` `GenerationConfig`s that draw from the policy itself.

    Every field that could inherit a non-neutral value from `model.generation_config` is set: the responses come
    from the policy itself (argmax, or sampling at `temperature` only). `top_k=50` is the neutral default for greedy.
    """
    from transformers import GenerationConfig

    common = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_ids,
        "num_beams": 1,
        "top_p": 1.0,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
        "disable_compile": True,
    }
    overrides = dict(generation_kwargs or {})
    greedy_config = GenerationConfig(**{**common, "do_sample": False, "temperature": 1.0, "top_k": 50, **overrides})
    sample_config = GenerationConfig(
        **{
            **common,
            "do_sample": True,
            "temperature": temperature,
            "top_k": 0,
            "min_p": 0.0,
            "num_return_sequences": num_samples,
            **overrides,
        }
    )
    return greedy_config, sample_config


def _eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a generation: the model's generation config's eos ids, then the tokenizer's."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.extend([configured] if isinstance(configured, int) else list(configured))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an eos token")
    return list(dict.fromkeys(int(i) for i in ids))


def _left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, length - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, length - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    for position, token_id in enumerate(token_ids):
        if token_id in eos_ids:
            return token_ids[:position]
    return token_ids
