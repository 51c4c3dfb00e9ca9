"""NTHR (negative token hidden reward) for GRPO: the per-token hidden reward, the token weights it implies, and the
callback that applies them to `GRPOTrainer`'s advantages (Deng, Ren, Li, Sutherland, Li, Thrampoulidis 2025, "On
the Effect of Negative Gradient in Group Relative Deep RL").

The maths lives in `trl_ntk.ntk.nthr` (`hidden_reward`, `token_weights`); `NTHRCallback` only plumbs the trainer.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.nn.functional as F
import trl
from packaging.version import Version
from torch import Tensor
from transformers import TrainerCallback
from trl import GRPOTrainer

from trl_ntk import _dist
from trl_ntk._model import LogitTransform, unwrap_model
from trl_ntk.config import HiddenSource, NTHRConfig, Vocab
from trl_ntk.ntk.nthr import NTHRStats, group_weights
from trl_ntk.output import schema

logger = logging.getLogger(__name__)


SUPPORTED_TRL = (Version("1.10"), Version("2.0"))
"""`NTHRCallback` wraps `GRPOTrainer` internals that are stable in this range (tested with trl 1.16): lower bound
inclusive, upper bound exclusive."""


# ------------------------------------------------------------------------------------------------------------------
# Across ranks: a group may span processes (TRL gives each rank a contiguous slice of the gathered batch).
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _token_weights_on_rank(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    group_size: int,
    accelerator: Any,
    *,
    beta: float,
    eta: float | str,
    vocab: Vocab,
    temperature: float,
    chunk_size: int,
) -> tuple[Tensor, NTHRStats]:
    """`token_weights` of this rank's rows, with the groups that span ranks completed from the other ranks.

    Rank `r` holds global rows `r * B ... (r + 1) * B - 1` of the generation batch; group `g` is global rows
    `g * G ... (g + 1) * G - 1`. When `B` is not a multiple of `G`, the groups cut by a rank boundary are rebuilt on
    every rank that holds part of them by gathering those rows' hidden states, ids, masks and advantages (the head
    recomputes the logits, so no `[rows, T, V]` array moves): at most two groups per rank. Each rank keeps the weights
    of its own rows; the group-level counts go to the rank holding the group's first row; the returned stats are
    summed over ranks. `accelerator` needs `num_processes`, `process_index`, `gather` and `pad_across_processes` (an
    `accelerate.Accelerator`). Every rank must call this (collectives inside).
    """
    batch, length = completion_ids.shape
    world, rank = accelerator.num_processes, accelerator.process_index
    offset = rank * batch
    options = {"beta": beta, "eta": eta, "vocab": vocab, "temperature": temperature, "chunk_size": chunk_size}
    weights = torch.ones(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    stats = NTHRStats()
    spanning = []
    for group in range(offset // group_size, (offset + batch - 1) // group_size + 1):
        low, high = group * group_size, (group + 1) * group_size
        local = slice(max(low, offset) - offset, min(high, offset + batch) - offset)
        if low >= offset and high <= offset + batch:
            result = group_weights(
                hidden[local], head, completion_ids[local], completion_mask[local], advantages[local], **options
            )
            weights[local] = result.weights
            stats = stats + result.stats(completion_mask[local], advantages[local], slice(None), count_group=True)
        else:
            spanning.append((group, local))
    if spanning and world == 1:
        raise ValueError(f"the batch has {batch} rows, not a multiple of the group size {group_size}")
    if world > 1 and batch % group_size:
        rows = torch.cat([torch.arange(batch, device=completion_ids.device)[local] for _, local in spanning])
        shared = _gather_rows(
            accelerator, rows + offset, hidden[rows], completion_ids[rows], completion_mask[rows], advantages[rows]
        )
        for group, local in spanning:
            low = group * group_size
            order = torch.nonzero((shared["index"] >= low) & (shared["index"] < low + group_size))[:, 0]
            order = order[torch.argsort(shared["index"][order])]
            if order.numel() != group_size:
                raise RuntimeError(f"group {group} has {order.numel()} rows across ranks, expected {group_size}")
            group_mask, group_advantages = shared["mask"][order], shared["advantages"][order]
            result = group_weights(
                shared["hidden"][order], head, shared["ids"][order], group_mask, group_advantages, **options
            )
            mine = slice(local.start + offset - low, local.stop + offset - low)
            weights[local] = result.weights[mine, :length]
            stats = stats + result.stats(group_mask, group_advantages, mine, count_group=low >= offset)
    if world > 1:
        totals = torch.tensor(stats.as_tuple(), dtype=torch.float64, device=completion_ids.device)
        totals = accelerator.gather(totals[None]).sum(0).tolist()
        stats = NTHRStats(*(type(value)(total) for value, total in zip(stats.as_tuple(), totals, strict=True)))
    return weights, stats


def _gather_rows(accelerator: Any, index: Tensor, hidden: Tensor, ids: Tensor, mask: Tensor, advantages: Tensor):
    """All ranks' rows (padded to a common length and count; padding rows carry index -1)."""
    parts = {"index": index, "hidden": hidden, "ids": ids, "mask": mask, "advantages": advantages}
    for name in ("hidden", "ids", "mask"):
        parts[name] = accelerator.pad_across_processes(parts[name], dim=1, pad_index=0)
    padded = {
        name: accelerator.pad_across_processes(value, dim=0, pad_index=-1 if name == "index" else 0)
        for name, value in parts.items()
    }
    return {name: accelerator.gather(value) for name, value in padded.items()}


# ------------------------------------------------------------------------------------------------------------------
# The callback.
# ------------------------------------------------------------------------------------------------------------------


def nthr_record(step: int, stats: NTHRStats, seconds: float, path: str, time_fraction: float | None) -> dict[str, Any]:
    """The `type: "nthr"` record of one generation batch (built by `trl_ntk.output.schema.nthr_record`)."""
    return schema.nthr_record(step, stats, seconds, path, time_fraction)


def _check_trainer(trainer: Any) -> None:
    """Fail early, naming the TRL version, when the wrapped internals are not those this module knows."""
    release = Version(trl.__version__).release[:2]
    low, high = SUPPORTED_TRL
    if not low.release <= release < high.release:
        raise RuntimeError(
            f"NTHRCallback supports trl>={low},<{high} (tested with 1.16); found trl {trl.__version__}. It wraps "
            "GRPOTrainer._generate_and_score_completions, _generate and _get_per_token_logps_and_entropies; install "
            f"a supported trl (pip install 'trl>={low},<{high}')."
        )
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(
            f"NTHRCallback reweights GRPO advantages and needs a trl.GRPOTrainer, got {type(trainer).__name__}"
        )
    missing = [
        name
        for name in (
            "_generate_and_score_completions",
            "_generate",
            "_get_per_token_logps_and_entropies",
            "_metrics",
            "num_generations",
            "temperature",
        )
        if not hasattr(trainer, name)
    ]
    method = getattr(trainer, "_get_per_token_logps_and_entropies", None)
    parameters = list(inspect.signature(method).parameters)[:4] if method is not None else []
    if missing or parameters != ["model", "input_ids", "attention_mask", "logits_to_keep"]:
        raise RuntimeError(
            f"trl {trl.__version__}'s GRPOTrainer does not have the internals NTHRCallback wraps (missing: "
            f"{missing or 'the signature _get_per_token_logps_and_entropies(model, input_ids, attention_mask, '}"
            f"{'' if missing else 'logits_to_keep, ...)'}); use trl>={low},<{high}."
        )


def _policy_model(trainer: Any) -> Any:
    """The causal LM under the trainer's wrappers (DDP, PEFT): the module whose backbone and head TRL patches."""
    return unwrap_model(trainer.accelerator.unwrap_model(trainer.model))


def _backbone(model: Any) -> torch.nn.Module:
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        raise RuntimeError(
            f"{type(model).__name__} has no separate backbone (`base_model`) whose last_hidden_state feeds the LM head"
        )
    return backbone


class _PolicyHead:
    """`hidden [n, d] -> logits [n, V]` (float32, before the temperature) as the model's own forward computes them:
    `lm_head(h)` then the head's `LogitTransform` (scaling, soft-capping). Gathers a sharded head's weight."""

    def __init__(self, model: Any) -> None:
        self.lm_head = model.get_output_embeddings()
        self.transform = LogitTransform.of(model)

    def __call__(self, hidden: Tensor) -> Tensor:
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        return self.transform(F.linear(hidden.to(weight.dtype), weight, bias).float())


class _HiddenCapture:
    """Forward hook on the policy backbone: while `mode` is set, keeps the final hidden states that predict the
    completion tokens ("generation": the last position of each decoding forward; "policy_forward": the
    `logits_to_keep` positions before the last of a full forward)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.mode: str | None = None
        self.logits_to_keep = 0
        self.policy_forward_done = False
        self.generation_steps: list[Tensor] = []
        self.policy_chunks: list[Tensor] = []
        self._handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.mode is None:
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if self.mode == "generation":
            self.generation_steps.append(hidden[:, -1].detach())
        else:
            self.policy_chunks.append(hidden[:, -self.logits_to_keep - 1 : -1].detach())

    def remove(self) -> None:
        self._handle.remove()


_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class NTHRCallback(TrainerCallback):
    """A callback that down-weights the penalty on the wrong answers' tokens whose hidden reward says penalizing
    them would pull down the right answers (NTHR), in a `trl.GRPOTrainer`.

    Usage:

    ```python
    from trl import GRPOConfig, GRPOTrainer
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(output_dir="out"), train_dataset=data)
    trainer.add_callback(NTHRCallback(trainer))
    trainer.train()
    ```

    Once per training generation batch, inside `GRPOTrainer._generate_and_score_completions` (wrapped on the
    instance), it takes the final hidden states of the generating policy (see `hidden_source`), computes the
    `token_weights` and replaces the `(B,)` advantages of the output by the `(B, T)` advantages `A * w`, before TRL
    shuffles and splits the batch, so the weights stay aligned through every micro-batch, iteration and loss type.
    Logs `nthr/frac_downweighted`, `nthr/tau`, `nthr/eta`, `nthr/s_neg_mean`, `nthr/seconds` and
    `nthr/time_fraction` (NTHR's seconds over the training steps' seconds so far) with the trainer's metrics, and
    hands one `type: "nthr"` record per generation batch to `record_fn` on the main process. Evaluation batches are
    left alone. Under DDP every rank runs it (groups that span ranks are completed by gathering their rows).

    Args:
        trainer (`trl.GRPOTrainer`): the trainer; its instance methods are wrapped at construction (`remove()`
            undoes it).
        beta (`float`, *optional*, defaults to `1.0`): threshold multiplier (the paper's main setting).
        eta (`float` or `"auto"`, *optional*, defaults to `"auto"`): weight of the selected tokens; `"auto"` =
            `2 |0.5 - p|`, the paper's training setting (defaults and their source: `docs/nthr.md`).
        vocab (`str`, *optional*, defaults to `"group"`): `"group"` or `"full"`.
        every_generation (`bool` or `int`, *optional*, defaults to `True`): reweight every generation batch, or
            every n-th.
        hidden_source (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"old_logps"`, `"generation"` or
            `"forward"`; see `NTHRConfig`.
        apply (`bool`, *optional*, defaults to `True`): `False` measures and logs only.
        chunk_size (`int`, *optional*, defaults to `512`): tokens per chunk.
        record_fn (`Callable[[dict], None]`, *optional*): receives each record; records are also kept in
            `self.records`.
    """

    def __init__(
        self,
        trainer: Any,
        *,
        beta: float = 1.0,
        eta: float | Literal["auto"] = "auto",
        vocab: Vocab = "group",
        every_generation: bool | int = True,
        hidden_source: HiddenSource = "auto",
        apply: bool = True,
        chunk_size: int = 512,
        record_fn: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        _check_trainer(trainer)
        self.config = NTHRConfig(beta, eta, vocab, every_generation, hidden_source, apply, chunk_size)
        self.trainer = trainer
        self.record_fn = record_fn
        self.records: list[dict[str, Any]] = []
        self.last_weights: Tensor | None = None
        self.last_stats: NTHRStats | None = None
        self.last_path: str | None = None
        self._generation_batches = 0
        self._capture: _HiddenCapture | None = None
        self._verified_paths: set[str] = set()
        self._rejected_paths: set[str] = set()
        self._nthr_seconds = 0.0
        self._step_seconds = 0.0
        self._step_start: float | None = None
        self._install()

    # -- wrapping ----------------------------------------------------------------------------------------------------

    _WRAPPED = ("_generate_and_score_completions", "_generate", "_get_per_token_logps_and_entropies")

    def _install(self) -> None:
        trainer = self.trainer
        if getattr(trainer, "_nthr_callback", None) is not None:
            raise RuntimeError("this trainer already has an NTHRCallback; add one only")
        self._previous = {name: vars(trainer).get(name) for name in self._WRAPPED}
        self._original = {name: getattr(trainer, name) for name in self._WRAPPED}
        trainer._generate_and_score_completions = self._generate_and_score_completions
        trainer._generate = self._generate
        trainer._get_per_token_logps_and_entropies = self._get_per_token_logps_and_entropies
        trainer._nthr_callback = self

    def remove(self) -> None:
        """Restore the trainer's methods; the callback does nothing afterwards."""
        for name, previous in self._previous.items():
            if previous is None:
                vars(self.trainer).pop(name, None)
            else:
                setattr(self.trainer, name, previous)
        self.trainer._nthr_callback = None

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        capture = self._capture
        if capture is None or not self._generation_capturable():
            return self._original["_generate"](*args, **kwargs)
        capture.mode = "generation"
        try:
            return self._original["_generate"](*args, **kwargs)
        finally:
            capture.mode = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        capture = self._capture
        original = self._original["_get_per_token_logps_and_entropies"]
        if (
            capture is None
            or capture.policy_forward_done
            or model is not self.trainer.model
            or not (self._old_logps_expected())
        ):
            return original(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        capture.mode, capture.logits_to_keep = "policy_forward", logits_to_keep
        try:
            return original(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            capture.mode, capture.policy_forward_done = None, True

    def _generation_capturable(self) -> bool:
        trainer = self.trainer
        return not (
            getattr(trainer, "use_vllm", False)
            or getattr(trainer, "use_transformers_continuous_batching", False)
            or getattr(trainer, "tools", None)
            or getattr(trainer, "rollout_func", None) is not None
            or getattr(trainer, "environment_factories", None) is not None
        )

    def _old_logps_expected(self) -> bool:
        """TRL's own condition for the no-grad old-policy forward in `_generate_and_score_completions`."""
        trainer, args = self.trainer, self.trainer.args
        generate_every = args.steps_per_generation * trainer.num_iterations
        return args.gradient_accumulation_steps % generate_every != 0 or bool(
            getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False)
        )

    # -- one generation batch ----------------------------------------------------------------------------------------

    def _due(self) -> bool:
        every = 1 if self.config.every_generation is True else self.config.every_generation
        due = self._generation_batches % every == 0
        self._generation_batches += 1
        return due

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        original = self._original["_generate_and_score_completions"]
        if self.trainer._nthr_callback is not self or not self.trainer.model.training or not self._due():
            return original(inputs)
        model = _policy_model(self.trainer)
        self._capture = _HiddenCapture(_backbone(model))
        try:
            output = original(inputs)
            start = time.perf_counter()
            hidden, path = self._hidden_states(output, model)
        finally:
            self._capture.remove()
            self._capture = None
        advantages = output["advantages"]
        if advantages.dim() != 1:
            raise RuntimeError(f"expected (B,) advantages from trl, got shape {tuple(advantages.shape)}")
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        config = self.config
        weights, stats = _token_weights_on_rank(
            hidden,
            _PolicyHead(model),
            output["completion_ids"],
            mask,
            advantages,
            self.trainer.num_generations,
            self.trainer.accelerator,
            beta=config.beta,
            eta=config.eta,
            vocab=config.vocab,
            temperature=self.trainer.temperature,
            chunk_size=config.chunk_size,
        )
        if config.apply:
            output["advantages"] = advantages[:, None] * weights.to(advantages.dtype)
        seconds = time.perf_counter() - start
        self._nthr_seconds += seconds
        self.last_weights, self.last_stats, self.last_path = weights, stats, path
        self._log(stats, seconds, path)
        return output

    @torch.no_grad()
    def _hidden_states(self, output: dict[str, Any], model: Any) -> tuple[Tensor, str]:
        """`[B, T, d]` hidden states that predict `output["completion_ids"]`, and the path that produced them."""
        capture, source = self._capture, self.config.hidden_source
        batch, length = output["completion_ids"].shape
        if source in ("auto", "old_logps") and _dist.every_rank(bool(capture.policy_chunks)):
            hidden = torch.cat(capture.policy_chunks)
            if self._agrees(hidden, output, model, "old_logps", output.get("old_per_token_logps")):
                return hidden, "old_logps"
        if source in ("auto", "generation"):
            steps = capture.generation_steps
            usable = (
                bool(steps)
                and "pixel_values" not in output
                and steps[0].shape[0] == batch
                and int(output["completion_mask"].sum(-1).max()) <= len(steps)
            )
            if _dist.every_rank(usable):
                hidden = torch.stack(steps[:length], dim=1)
                hidden = F.pad(hidden, (0, 0, 0, length - hidden.shape[1]))
                if self._agrees(hidden, output, model, "generation", None):
                    return hidden, "generation"
        if source in ("auto", "forward"):
            return self._policy_forward(output), "forward"
        raise RuntimeError(
            f"hidden_source={source!r} is not available for this trainer's configuration; use hidden_source='auto'"
        )

    def _policy_forward(self, output: dict[str, Any]) -> Tensor:
        """One no-grad forward of the policy over prompt + completion, through TRL's own log-prob method."""
        trainer = self.trainer
        capture = self._capture
        capture.policy_chunks, capture.policy_forward_done = [], False
        capture.mode, capture.logits_to_keep = "policy_forward", output["completion_ids"].shape[1]
        extra = {key: output[key] for key in _MULTIMODAL_KEYS if key in output}
        try:
            with torch.no_grad():
                self._original["_get_per_token_logps_and_entropies"](
                    trainer.model,
                    torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                    torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                    output["completion_ids"].shape[1],
                    batch_size=trainer.args.per_device_train_batch_size,
                    **extra,
                )
        finally:
            capture.mode = None
        return torch.cat(capture.policy_chunks)

    @torch.no_grad()
    def _agrees(self, hidden: Tensor, output: dict[str, Any], model: Any, path: str, reference: Tensor | None) -> bool:
        """Check a captured path once: the log-probs its hidden states give match TRL's old-policy log-probs (or,
        for the generation path, those of one full forward) within 0.01 nats on average, on every rank. On mismatch,
        warn and never use the path again."""
        if path in self._verified_paths:
            return True
        if path in self._rejected_paths:
            return False
        if reference is None:
            reference_hidden = self._policy_forward(output)
            reference = _completion_logprobs(reference_hidden, output, _PolicyHead(model), self.trainer.temperature)
        mask = output["completion_mask"].bool()
        mine = _completion_logprobs(hidden, output, _PolicyHead(model), self.trainer.temperature)
        error = float((mine - reference.float())[mask].abs().mean()) if mask.any() else 0.0
        if _dist.every_rank(error <= 1e-2):
            self._verified_paths.add(path)
            return True
        logger.warning(
            "NTHR: hidden states captured on the %r path give log-probs %.3g nats off the policy's; falling back to "
            "the next path",
            path,
            error,
        )
        self._rejected_paths.add(path)
        return False

    def _log(self, stats: NTHRStats, seconds: float, path: str) -> None:
        metrics = self.trainer._metrics["train"]
        metrics["nthr/frac_downweighted"].append(stats.frac_downweighted)
        if stats.num_mixed_groups:
            metrics["nthr/tau"].append(stats.tau)
            metrics["nthr/eta"].append(stats.eta)
        if stats.s_neg_count:
            metrics["nthr/s_neg_mean"].append(stats.s_neg_mean)
        metrics["nthr/seconds"].append(seconds)
        if not self.trainer.accelerator.is_main_process:
            return
        fraction = self._nthr_seconds / self._step_seconds if self._step_seconds else None
        record = nthr_record(self.trainer.state.global_step, stats, seconds, path, fraction)
        self.records.append(record)
        logger.debug("NTHR record: %s", record)
        if self.record_fn is not None:
            self.record_fn(record)

    # -- trainer events ----------------------------------------------------------------------------------------------

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is None:
            return
        self._step_seconds += time.perf_counter() - self._step_start
        self._step_start = None
        self.trainer._metrics["train"]["nthr/time_fraction"].append(self._nthr_seconds / self._step_seconds)


def _completion_logprobs(hidden: Tensor, output: dict[str, Any], head: _PolicyHead, temperature: float) -> Tensor:
    """`[B, T]` log-probs of the completion tokens from hidden states (0 on padding)."""
    mask = output["completion_mask"].bool()
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if mask.any():
        logits = head(hidden[mask]) / temperature
        logprobs[mask] = torch.log_softmax(logits, -1).gather(-1, output["completion_ids"][mask][:, None])[:, 0]
    return logprobs


class NTHRGRPOTrainer(GRPOTrainer):
    """A `trl.GRPOTrainer` with NTHR: the same arguments, plus `nthr_config`.

    Usage:

    ```python
    from trl import GRPOConfig
    from trl_ntk.integration.nthr import NTHRConfig, NTHRGRPOTrainer

    trainer = NTHRGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(output_dir="out"),
                              train_dataset=data, nthr_config=NTHRConfig(beta=1.0, eta="auto"))
    trainer.train()
    ```

    Args:
        nthr_config (`NTHRConfig`, *optional*): the NTHR options; defaults to `NTHRConfig()`.
        nthr_record_fn (`Callable[[dict], None]`, *optional*): receives each `type: "nthr"` record.
        *args, **kwargs: passed to `trl.GRPOTrainer`.
    """

    def __init__(
        self,
        *args: Any,
        nthr_config: NTHRConfig | None = None,
        nthr_record_fn: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        options = asdict(nthr_config or NTHRConfig())
        self.nthr_callback = NTHRCallback(self, record_fn=nthr_record_fn, **options)
        self.add_callback(self.nthr_callback)
