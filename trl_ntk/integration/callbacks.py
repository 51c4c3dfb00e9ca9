"""`LearningDynamicsCallback`: maps trainer events to probe scoring and step analysis; no maths inside.

Event flow of one optimizer step with analysis due: `on_step_begin` arms the capture -> the trainer's own
forward/backward runs, hooks keep the micro-batches and `c_l` -> `on_pre_optimizer_step` (params `w_t`, `.grad`
complete): score probes, predict -> `on_optimizer_step` (params `w_{t+1}`): score again, observed vs predicted ->
sinks. Steps without analysis cost one `if`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from trl_ntk import _dist
from trl_ntk._model import input_device, is_sharded
from trl_ntk.analysis import applied, dense, dynamics, guard, memory, sharded
from trl_ntk.batches import TokenLabels, concat_token_batches
from trl_ntk.config import DynamicsConfig, check_optional_dependencies, check_writable_dir, follow_trainer_log_level
from trl_ntk.integration.adapters import adapter_for, label_step
from trl_ntk.integration.capture import GradientCapture, add_entropy_residuals
from trl_ntk.integration.validation import (
    model_max_length,
    validate_adapter,
    validate_parallelism,
    versions,
    warn_unreproduced,
)
from trl_ntk.output import records
from trl_ntk.output.sinks import make_sinks
from trl_ntk.probes.datasets import default_probes
from trl_ntk.probes.drafts import GreedyDrafts
from trl_ntk.probes.encoding import encode_extended, encode_tracked
from trl_ntk.probes.generation import generation_cap
from trl_ntk.probes.probe_set import ProbeSet, sample_responses
from trl_ntk.probes.scoring import score_responses

logger = logging.getLogger(__name__)

DECODED_TEXT_LIMIT = 100_000
"""Decoded token sequences the callback keeps for its `probes` records before it starts afresh."""


@dataclass
class _PendingAnalysis:
    step: int
    before: Any  # ResponseScores at w_t
    explanation: dynamics.UpdateExplanation | None
    tokens: bool
    lld_before: Any = None
    weights_before: Any = None  # half-precision weights: the trainable parameters at w_t (CPU copies)
    started: float = field(default_factory=time.perf_counter)


class LearningDynamicsCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that tracks probe log-probabilities and explains, token by token, how each
    analysed optimizer step moved them.

    Usage:
    ```python
    >>> trainer = DPOTrainer(...)
    >>> trainer.add_callback(LearningDynamicsCallback(trainer, every_n_steps=20, attribution="sums"))
    >>> trainer.train()  # -> <output_dir>/dynamics/dynamics.jsonl; `trl-ntk report <output_dir>/dynamics`
    ```

    Args:
        trainer (`Trainer`):
            An `SFTTrainer`, `DPOTrainer` or `GRPOTrainer` (or a subclass).
        probes (`ProbeSet`, *optional*):
            Probe responses to track. Defaults to probes built from the trainer's train dataset
            (`ProbeSet.from_preference_dataset` for DPO, `ProbeSet.from_prompts` otherwise).
        config (`DynamicsConfig`, *optional*):
            All options; keyword arguments override its fields (`every_n_steps=...`, `attribution=...`, ...).
    """

    def __init__(self, trainer: Any, probes: ProbeSet | None = None, config: DynamicsConfig | None = None, **options):
        self.trainer = trainer
        self._unwrapped: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (trainer.model, unwrapped)
        self.config = DynamicsConfig(**{**(asdict(config) if config else {}), **options})
        self.adapter = adapter_for(trainer)
        self.adapter.validate(trainer)
        validate_parallelism(trainer, self.config)
        self.output_dir = Path(self.config.output_dir or Path(trainer.args.output_dir) / "dynamics")
        if self._is_main():
            check_writable_dir(self.output_dir, "output_dir" if self.config.output_dir else "args.output_dir")
        report_to = self.config.report_to if self.config.report_to is not None else trainer.args.report_to
        check_optional_dependencies(report_to, heatmaps=self.config.tokens_level)
        follow_trainer_log_level(trainer.args)
        model = self._model()
        validate_adapter(model)
        self.setup_issues = guard.diagnose(trainer, model, replays_randomness=True)
        warn_unreproduced(self.setup_issues, self.config)
        self.gradient_dtype = guard.gradient_dtype(model, getattr(trainer, "args", None))
        self.tokenizer = trainer.processing_class
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        self.tokenizer = tokenizer
        if probes is None:
            probes = self._default_probes(trainer)
        self.probes = probes
        self.max_length = model_max_length(model)
        self.encoded = encode_tracked(
            probes, tokenizer, model, max_length=self.max_length, generate=self.config.generate
        )
        random_forward = any(issue.name in ("dropout", "neftune") for issue in self.setup_issues)
        self.capture = GradientCapture(
            model, temperature=self.adapter.temperature(trainer), record_randomness=random_forward
        )
        self._installed = False
        self._capture_removed = False
        self._removed = False
        self._matrix_computed = False  # whether a tokens-level analysis computed (or tried) the token matrix
        self._install()
        self.sinks = None
        self.sampled: list = []
        self.extended = None  # the last encoded fixed + sampled probes
        self.prompt_tokens: dict[str, list[int]] = {}  # per prompt id, for generation and encoding
        self.decoded_text: dict[tuple[int, ...], str] = {}  # per token sequence, for the probes records
        self.sampled_step: int | None = None
        self.pending: _PendingAnalysis | None = None
        self.last_scored_step: int | None = None
        # the recent greedy answers and the fixed responses: the greedy decoding guesses its tokens from them
        self.greedy_drafts = GreedyDrafts(references=self.encoded.response_ids if self.encoded is not None else ())
        self.analysis_failures = 0
        self.untrusted_steps = 0
        self.last_failure = ""
        self.sharded = False
        # low_memory: finite differences, except at the "tokens" level: exact JVPs within chunk + 1 buffers
        self.jvp_path = "finite_difference" if self.config.low_memory and not self.config.tokens_level else "auto"
        self.memory_plan: memory.Plan | None = None

    # ----------------------------------------------------------------------------------------------- set-up
    def _model(self) -> torch.nn.Module:
        """The trainer's model unwrapped (DDP, compiled); unwrapped again only when `trainer.model` changes."""
        wrapped = self.trainer.model
        if self._unwrapped is None or self._unwrapped[0] is not wrapped:
            self._unwrapped = (wrapped, self.trainer.accelerator.unwrap_model(wrapped))
        return self._unwrapped[1]

    def _default_probes(self, trainer: Any) -> ProbeSet:
        return default_probes(
            trainer.train_dataset,
            self.tokenizer,
            preference=self.adapter.kind == "dpo",
            num_prompts=self.config.num_prompts,
            seed=self.config.seed,
            generate=self.config.generate,
            test_dataset=(getattr(trainer, "eval_dataset", None) or None) if self.adapter.kind == "dpo" else None,
        )

    def _install(self) -> None:
        """Hook the model (`GradientCapture`) and wrap `trainer.compute_loss` so that the capture knows where each
        trainer micro-batch starts (its inputs name the tokens for the adapter). A no-op when installed."""
        if self._installed:
            return
        if self._capture_removed:  # uninstalled at the end of a previous `train()`: hook the model again
            previous = self.capture
            self.capture = GradientCapture(
                self._model(), temperature=previous.temperature, record_randomness=previous.record_randomness
            )
            self._capture_removed = False
        trainer = self.trainer
        self._previous_compute_loss = vars(trainer).get("compute_loss")
        compute_loss = trainer.compute_loss
        capture = self.capture

        def compute_loss_with_capture(model, inputs, *args, **kwargs):
            capture.begin_loss_call(inputs)
            return compute_loss(model, inputs, *args, **kwargs)

        self._compute_loss_wrapper = compute_loss_with_capture
        trainer.compute_loss = compute_loss_with_capture
        self._installed = True

    def _uninstall(self) -> None:
        """Remove the model hooks and restore `trainer.compute_loss` (unless something wrapped it again since, in
        which case the wrapper stays and only passes through: the capture is never armed again)."""
        if not self._installed:
            return
        self.capture.remove()
        self._capture_removed = True
        trainer = self.trainer
        if vars(trainer).get("compute_loss") is self._compute_loss_wrapper:
            if self._previous_compute_loss is None:
                del trainer.compute_loss
            else:
                trainer.compute_loss = self._previous_compute_loss
        self._installed = False

    def remove(self) -> None:
        """Remove the model hooks, restore `trainer.compute_loss` and close the sinks; the callback does nothing
        afterwards (a later `train()` runs as without it). Idempotent; `on_train_end` uninstalls the same way but
        installs again at the next `train()`."""
        self._uninstall()
        self._removed = True
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None

    # -------------------------------------------------------------------------------------------- schedule
    def _due(self, step: int) -> bool:
        return step % self.config.every_n_steps == 0

    def _tokens_due(self, step: int) -> bool:
        if self.config.attribution == "tokens":
            return True
        every = self.config.tokens_every_n_steps
        return self.config.attribution == "sums" and every is not None and step % every == 0

    # -------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, **kwargs):
        if self._removed:
            return
        self._install()
        self.sharded = is_sharded(self._model())  # FSDP wraps the model when training starts
        if self.sharded:  # the applied update of half-precision weights is predicted on unsharded parameters only
            self.setup_issues = guard.diagnose(
                self.trainer, self._model(), replays_randomness=True, applied_update=False
            )
        if self.sharded and not getattr(self.trainer, "is_fsdp_enabled", False):
            raise ValueError(
                "the model's parameters are distributed tensors but the trainer does not use FSDP (tensor "
                "parallelism?); LearningDynamicsCallback supports sharded parameters under FSDP2 only"
            )
        self._check_memory()
        resumed = state.global_step if state.global_step > 0 else None
        if state.is_world_process_zero:
            if self.sinks is not None:  # a second `train()` in this process: release the folder first
                self.sinks.close()
            self.sinks = make_sinks(
                self.config.report_to if self.config.report_to is not None else args.report_to,
                self.output_dir,
                trainer=self.trainer,
            )
            if resumed is not None:
                self.sinks.truncate_after(resumed - 1)
            self._emit(
                state.global_step,
                [records.run_record(state.global_step, self.adapter.kind, asdict(self.config), versions(), resumed)],
            )
            if self.encoded is not None:  # None: prompts only, the responses are generated at each scoring step
                self._emit(state.global_step, [self._probes_record(state.global_step, self.encoded)])
        self._adopt_nthr_records()

    def _check_memory(self) -> None:
        """Before the first analysis (the model on its device): estimate the step's peak extra memory
        (`analysis.memory.plan`) and refuse (`memory_check="refuse"`) or downgrade the level / JVP path with a
        warning when it does not fit in the device's free memory."""
        if self.sharded or self.config.memory_check == "off" or self.config.attribution == "none":
            return
        requested = "tokens" if self.config.tokens_level else "sums"
        chunk = 1 if self.config.low_memory and self.config.chunk_size is None else self.config.chunk_size
        probe_shape = None if self.encoded is None else tuple(self.encoded.batch.input_ids.shape)
        chosen = memory.preflight(
            self.trainer, self._model(), self.adapter.kind, probe_shape, requested, chunk, self.config.low_memory
        )
        self.memory_plan = chosen
        if not chosen.message:
            return
        if self.config.memory_check == "refuse":
            raise ValueError(chosen.refusal(requested))
        warnings.warn(chosen.message, stacklevel=2)
        if chosen.level != requested:
            tokens = chosen.level == "tokens"
            self.config = replace(
                self.config,
                attribution=chosen.level,
                tokens_every_n_steps=None,
                kernel_summaries=self.config.kernel_summaries and tokens,
            )
        self.jvp_path = chosen.path

    def _adopt_nthr_records(self) -> None:
        """Route the records of an `NTHRCallback` on the same trainer through this callback's sinks."""
        from trl_ntk.integration.nthr import NTHRCallback

        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, NTHRCallback) and callback.record_fn is None:
                callback.record_fn = self._write_external

    def _write_external(self, record: dict) -> None:
        self._emit(int(record.get("step", self.trainer.state.global_step)), [record])

    def on_step_begin(self, args, state, control, **kwargs):
        if self._removed:
            return
        if self.config.attribution != "none" and self._due(state.global_step):
            self.capture.arm()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step
        if self._removed or not self._due(step):
            return
        armed = self.capture.armed
        micro_batches = self.capture.disarm() if armed else []
        self._guarded(step, self._before_update, step, micro_batches, armed)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._removed or self.pending is None:
            return
        pending, self.pending = self.pending, None
        self._guarded(pending.step, self._after_update, pending)

    def on_train_end(self, args, state, control, **kwargs):
        if self._removed:
            return
        step = state.global_step
        try:
            if self.last_scored_step != step:
                self._guarded(step, self._score_only, step)
            if self.sinks is not None:
                self._write_status(step)
                self.sinks.close()
                self.sinks = None
        finally:
            self._uninstall()  # the model and the trainer are left as they were found

    # ------------------------------------------------------------------------------------------ analysis
    def _guarded(self, step: int, fn, *args) -> None:
        if self.config.strict:
            fn(*args)
            return
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - non-strict mode must never stop training
            self.pending = None
            self.capture.disarm()
            self._count_failure(step, f"{type(error).__name__}: {error}", "training goes on")

    def _count_failure(self, step: int, message: str, consequence: str, what: str = "analysis") -> None:
        """Count one analysis failure, warn about it, and write a `status` record at the first one (so that the
        count survives a crash of the training later on)."""
        self.analysis_failures += 1
        self.last_failure = f"step {step}: {message}"
        warnings.warn(
            f"learning-dynamics {what} failed at {self.last_failure} (failure #{self.analysis_failures}); "
            f"{consequence}, the count is in the status record",
            stacklevel=3,
        )
        if self.analysis_failures == 1:
            self._write_status(step)

    def _write_status(self, step: int) -> None:
        """A `status` record with the counts so far (at the first failure, the first untrusted step, and the end)."""
        if self.sinks is not None:
            self.sinks.write_status(step, self.analysis_failures, self.last_failure, self.untrusted_steps)

    def _probe_batch(self, step: int):
        """The fixed probes plus the sampled ones of this scoring step (regenerated when due)."""
        if self.config.generate and self.sampled_step != step:
            self.sampled = self._sample_or_keep_fixed(step)
            self.sampled_step = step
            if self.sampled:
                encoded = self._with_sampled()
                self._emit(step, [self._probes_record(step, encoded)])
                return encoded
        if self.sampled:
            return self._with_sampled()
        if self.encoded is None:
            raise RuntimeError("no probe responses to score: the model generated none for the probe prompts")
        return self.encoded

    def _probes_record(self, step: int, encoded) -> dict:
        """The `probes` record of `encoded`, decoding only the token sequences earlier records did not hold."""
        if len(self.decoded_text) > DECODED_TEXT_LIMIT:  # long runs with many distinct sampled responses
            self.decoded_text.clear()
        return records.probes_record(step, encoded, self.tokenizer, self.decoded_text)

    def _with_sampled(self):
        """The fixed probes and the sampled ones, grouped by prompt; only the sampled ones that differ from those of
        the last scoring step are tokenized (an unchanged greedy response keeps its tokens)."""
        responses = ProbeSet.from_responses(self.probes.responses() + self.sampled).responses()
        known = self.extended if self.extended is not None else self.encoded
        self.extended = encode_extended(
            known, responses, self.tokenizer, max_length=self.max_length, prompt_cache=self.prompt_tokens
        )
        return self.extended

    def _sample_or_keep_fixed(self, step: int) -> list:
        """`_sample_on_main`; when generation fails (non-strict, with fixed probes to score) the failure is counted
        and warned about, and the step goes on with the fixed probes alone. Every rank sees the same failure."""
        try:
            return self._sample_on_main(step)
        except Exception as error:
            if self.config.strict or self.encoded is None:
                raise
            message = f"probe generation: {type(error).__name__}: {error}"
            self._count_failure(step, message, "this step scores the fixed probes only", what="probe generation")
            return []

    def _sample_on_main(self, step: int) -> list:
        """The model's own responses, generated on the main process and shared with the other ranks (DDP), so that
        every rank explains the same probe tokens: the cross-rank sums of the probe JVPs add up token by token.
        Under FSDP every rank runs `generate` (each forward gathers the shards) and the main process's responses
        are kept.

        A generation failure is shared as well and raised on every rank, so that no rank is left waiting in a
        collective the others skip.
        """
        sampled, error = None, None
        if self._is_main() or self.sharded:  # sharded: every rank takes part in every forward of `generate`
            try:
                with self.capture.paused():
                    sampled = sample_responses(
                        self._model(),
                        self.tokenizer,
                        self.probes.prompts(),
                        num_samples=self.config.num_samples,
                        temperature=self.config.sample_temperature,
                        max_new_tokens=generation_cap(self.trainer, self.config.max_new_tokens),
                        seed=self.config.seed + step,
                        synced_gpus=self.sharded and self.trainer.accelerator.num_processes > 1,
                        drafts=self.greedy_drafts,
                        prompt_cache=self.prompt_tokens,
                    )
            except Exception as exception:
                if self.trainer.accelerator.num_processes <= 1:
                    raise
                error = f"rank {self.trainer.accelerator.process_index}: {type(exception).__name__}: {exception}"
            finally:
                if self.sharded:
                    sharded.reshard(self._model())
        if self.trainer.accelerator.num_processes > 1:
            errors = _dist.gather_objects(error)
            error = next((e for e in errors if e is not None), None)
            shared = [sampled]
            torch.distributed.broadcast_object_list(shared, src=0)
            sampled = shared[0]
        if error is not None:
            raise RuntimeError(f"probe generation failed on {error}")
        return sampled

    def _score(self, encoded):
        return self._score_batch(encoded.batch)

    def _score_batch(self, batch):
        with self.capture.paused():
            if self.sharded:
                return sharded.score_sharded(self._model(), batch, batch_size=self.config.score_batch_size)
            return score_responses(self._model(), batch, batch_size=self.config.score_batch_size)

    def _score_only(self, step: int) -> None:
        encoded = self._probe_batch(step)
        scores = self._score(encoded)
        self.last_scored_step = step
        self._emit(step, records.probe_records(step, encoded, scores))

    def _before_update(self, step: int, micro_batches: list, armed: bool) -> None:
        logger.info("step %d: scoring the probes%s ...", step, " and explaining the update" if armed else "")
        encoded = self._probe_batch(step)
        before = self._score(encoded)
        self.last_scored_step = step
        self._emit(step, records.probe_records(step, encoded, before))
        if not armed:
            return
        problem = self.capture.failures[0] if self.capture.failures else None
        if problem is None and not micro_batches:
            problem = "no training forward with a gradient was captured in this step"
        # every rank stops together: a rank that went on alone would wait in the analysis' collectives
        if _dist.any_rank(problem is not None):
            raise RuntimeError(problem or "the step's capture failed on another rank")
        model = self._model()
        labels = label_step(self.adapter, micro_batches)
        tokens = self._tokens_due(step)
        lld = self._positive_completions(micro_batches, labels) if self.adapter.kind == "grpo" else None
        was_training = model.training
        model.eval()
        try:
            with self.capture.paused():
                add_entropy_residuals(model, micro_batches)
                explanation = self._explain(
                    model,
                    encoded.batch,
                    micro_batches,
                    labels,
                    self.adapter.group_names,
                    self.trainer.optimizer,
                    attribution="tokens" if tokens else "sums",
                    coeff_scale=1.0 / self.trainer.accelerator.num_processes,
                    chunk_size=self.config.chunk_size,
                    kernel_summaries=self.config.kernel_summaries and tokens,
                    extra_batches={"lld": lld[0]} if lld is not None else None,
                    matrix_rows=self._matrix_rows(encoded, step) if tokens else None,
                )
                lld_before = None if lld is None else self._target_logprobs(lld[0])
                lld_scores = None if lld is None else self._group_scores(model, micro_batches, labels)
        finally:
            model.train(was_training)
        self.pending = _PendingAnalysis(
            step=step,
            before=(encoded, before),
            explanation=explanation,
            tokens=tokens,
            lld_before=None if lld is None else (lld[:2], lld_before, lld[2], lld_scores),
            weights_before=applied.snapshot(model) if not self.sharded and applied.has_half_precision(model) else None,
        )

    def _explain(self, model, probe_batch, micro_batches, labels, group_names, optimizer, **options):
        """`dynamics.explain_update` on the dense backend, or on finite differences of the shards
        (`sharded.ShardedBackend`, no token level) when the parameters are sharded across ranks."""
        if self.sharded:
            options["backend"] = sharded.ShardedBackend(model, batch_size=self.config.score_batch_size)
        elif self.jvp_path != "auto" or self.config.low_memory:  # forward-pass memory, or the "buffer" budget
            buffer = {"jvp_chunk_size": "buffer"} if self.config.low_memory else {}
            chunk = options.get("chunk_size") or 1
            options["backend"] = dense.DenseBackend(model, chunk, path=self.jvp_path, **buffer)
        return dynamics.explain_update(model, probe_batch, micro_batches, labels, group_names, optimizer, **options)

    def _positive_completions(self, micro_batches: list, labels: list):
        """GRPO's positive-advantage completions of the step (for lazy likelihood displacement): `(batch, their
        labels, labels of all the step's training tokens)`, or None when there is none.

        Under DDP those of every rank, concatenated in rank order on every rank, so that every rank predicts the
        same tokens (the cross-rank sums of their JVPs add up token by token) and the main process reports every
        rank's groups; examples and groups are renumbered per rank (a group split across ranks shows as parts).
        """
        has_positive = any(bool((lab.group == 0).any()) for lab in labels)
        local = dynamics.positive_completion_batches(micro_batches, labels) if has_positive else None
        all_labels = dynamics.concat_labels(labels)
        if not _dist.is_distributed():
            return None if local is None else (*local, all_labels)
        parts = _dist.gather_objects((None if local is None else (local[0].to("cpu"), local[1]), all_labels))
        if all(part is None for part, _ in parts):
            return None
        batch = concat_token_batches([part[0] for part, _ in parts if part is not None])
        none = torch.zeros(0, dtype=torch.long)
        positive = [TokenLabels(none, none, none) if part is None else part[1] for part, _ in parts]
        step_labels = [rank_labels for _, rank_labels in parts]
        return (
            batch.to(input_device(self._model())),
            _dist.concat_renumbered(positive, step_labels),
            _dist.concat_renumbered(step_labels),
        )

    def _group_scores(self, model, micro_batches: list, labels: list):
        """GWHES of every GRPO group of the step at `w_t` (`dynamics.group_hidden_scores`), numbered as the `lld`
        records; under DDP each rank scores its own completions (a group split across ranks shows as parts).
        `None` for sharded parameters (the decoder body cannot run alone there)."""
        if self.sharded:
            return None
        loss_type = getattr(self.trainer.args, "loss_type", "grpo")
        aggregation = "sequence_mean" if loss_type in ("grpo", "sapo") else "token_sum"
        temperature = float(getattr(self.trainer.args, "temperature", 1.0) or 1.0)
        local = dynamics.group_hidden_scores(model, micro_batches, labels, aggregation, temperature)
        if not _dist.is_distributed():
            return local
        count = max((int(lab.sequence_group.max()) + 1 for lab in labels if lab.sequence_group.numel()), default=0)
        return dynamics.renumbered_group_scores(_dist.gather_objects((local, count)))

    def _matrix_rows(self, encoded, step: int) -> torch.Tensor | None:
        """`[B]` bool: the probe responses of the first `matrix_prompts` prompts (all when it is `None`), at the
        first tokens-level analysis and at steps multiple of `matrix_every_n_steps`; none at the other steps."""
        every = self.config.matrix_every_n_steps
        first, self._matrix_computed = not self._matrix_computed, True
        if not first and every is not None and step % every != 0:
            return torch.zeros(len(encoded.responses), dtype=torch.bool)
        if self.config.matrix_prompts is None:
            return None
        prompt_ids = list(dict.fromkeys(r.prompt_id for r in encoded.responses))[: self.config.matrix_prompts]
        return torch.tensor([r.prompt_id in prompt_ids for r in encoded.responses], dtype=torch.bool)

    def _target_logprobs(self, batch) -> torch.Tensor:
        """`[M]` log-probs of a token batch's targets (row-major), no grad."""
        return torch.cat(list(self._score_batch(batch).token_logps))

    def _after_update(self, pending: _PendingAnalysis) -> None:
        encoded, before = pending.before
        after = self._score(encoded)
        step = pending.step
        if pending.weights_before is not None:
            pending.explanation = self._explain_applied(pending, encoded.batch)
        verdict = guard.judge(pending.explanation.gradient_check, self.gradient_dtype, self.setup_issues)
        trust = {"trusted": verdict.trusted, "trust_reason": verdict.reason}
        out = records.dynamics_records(
            step, encoded, before, after, pending.explanation, self.tokenizer, top_k=self.config.top_k, **trust
        )
        if pending.lld_before is not None:
            (lld_batch, lld_labels), lld_before, all_labels, lld_scores = pending.lld_before
            groups = dynamics.lazy_likelihood_displacement(
                lld_before,
                self._target_logprobs(lld_batch),
                pending.explanation.extra["lld"],
                lld_labels,
                pending.explanation.cell_names,
                all_labels,
                lld_scores,
            )
            out += records.lld_records(step, groups, **trust)
        tokens = pending.explanation.tokens
        if tokens is not None and tokens.matrix is not None and self._is_main():
            matrix_file = self.sinks.save_attributions(
                step, records.attribution_arrays(encoded, pending.explanation, self.tokenizer)
            )
            with_matrix = set(records.matrix_probe_ids(encoded, pending.explanation))
            for record in out:
                if record["type"] == "dynamics" and record["probe_id"] in with_matrix:
                    record["matrix"] = {"file": matrix_file, "key": record["probe_id"]}
        self._emit(step, out)
        logger.info("%s", records.one_line_summary(step, out, time.perf_counter() - pending.started))
        if not verdict.trusted:
            self._untrusted(step, verdict.reason)

    def _explain_applied(self, pending: _PendingAnalysis, probe_batch) -> dynamics.UpdateExplanation:
        """Half-precision weights: the explanation with its predictions along the update the optimizer applied
        (`applied.explain_applied`, JVPs at `w_t`; the model is left at `w_{t+1}` bit for bit)."""
        extra = None if pending.lld_before is None else {"lld": pending.lld_before[0][0]}
        path = None if self.jvp_path == "auto" else self.jvp_path
        with self.capture.paused():
            return applied.explain_applied(
                self._model(), pending.explanation, probe_batch, pending.weights_before, extra, path
            )

    def _untrusted(self, step: int, reason: str) -> None:
        """Count a step whose explanation is not trusted; warn at the first one; raise under `strict=True`."""
        self.untrusted_steps += 1
        message = f"the learning-dynamics explanation of step {step} is not trusted: {reason}"
        if self.config.strict:
            raise RuntimeError(message + " (strict=True)")
        if self.untrusted_steps == 1:
            warnings.warn(
                message + ". Its records carry trusted: false with this reason; later such steps are only counted "
                "(untrusted_steps in the status record)",
                stacklevel=2,
            )
            self._write_status(step)

    # ------------------------------------------------------------------------------------------- output
    def _is_main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    def _emit(self, step: int, batch: list[dict]) -> None:
        if self.sinks is None or not self._is_main():
            return
        sinks = self.sinks
        had_failed = any(sinks.failures.values())
        sinks.write_event(step, batch)
        if not had_failed and any(sinks.failures.values()):  # a sink's first failure: its count on record now
            self._write_status(step)
