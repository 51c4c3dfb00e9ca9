"""The pre-flight memory estimate: its buffer counts, the plan, and the callback refusing or downgrading before
training against a mocked free-memory figure."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.profiling import tensor_peak
from tests.trainer_factory import dpo_trainer
from trl_ntk import LearningDynamicsCallback
from trl_ntk.analysis import memory
from trl_ntk.demo import toy
from trl_ntk.ntk import logprobs, optim

SHAPE = memory.ModelShape(
    num_params=1_000_000, buffer_bytes=4, param_bytes=2, act_bytes=2, hidden=64, intermediate=128, layers=2,
    heads=4, vocab=100,
)  # fmt: skip
WORK = memory.Workload(train_rows=4, train_length=256, probe_rows=8, probe_length=64, chunk_size=16)


def test_buffers_follow_the_documented_counts():
    """sums: raw gradient + cell gradient + one more while micro-batches are added; tokens: a chunk + the split
    read per parameter; finite differences add the saved parameters (and run the tokens chunk one at a time)."""
    buffer = 4_000_000  # float32 buffers of a bf16 model: twice P
    assert SHAPE.buffer == buffer and SHAPE.parameters == buffer // 2
    assert memory.estimate(SHAPE, "none", WORK).buffers == 0
    # sums: one float32 direction at a time, plus one bf16 gradient while a micro-batch's is added
    assert memory.estimate(SHAPE, "sums", WORK).buffers == buffer + SHAPE.parameters
    assert memory.estimate(SHAPE, "sums", WORK, "finite_difference").buffers == 2 * buffer + SHAPE.parameters
    float32 = memory.ModelShape(**{**SHAPE.__dict__, "param_bytes": 4})
    assert memory.estimate(float32, "sums", WORK).buffers == float32.buffer  # added in place
    assert memory.estimate(SHAPE, "tokens", WORK).buffers == 16 * buffer
    # fewer tangents per JVP: as many gradients alive, and less activation
    one = memory.estimate(SHAPE, "tokens", memory.Workload(**{**WORK.__dict__, "jvp_chunk_size": 1}))
    assert one.buffers == buffer and one.activations < memory.estimate(SHAPE, "tokens", WORK).activations
    # the exact path's JVP activations grow with T^2 per head (MATH scores), finite differences' do not
    long = memory.Workload(train_rows=1, train_length=8192, probe_rows=1, probe_length=8192)
    assert memory.jvp_bytes(SHAPE, 1, 8192, "func") > 4 * memory.jvp_bytes(
        memory.ModelShape(**{**SHAPE.__dict__, "fused_attention": True}), 1, 8192, "finite_difference"
    )
    assert memory.estimate(SHAPE, "sums", long).activations > memory.estimate(SHAPE, "sums", WORK).activations


def test_plan_keeps_lowers_or_gives_up_by_the_free_memory():
    tokens = memory.estimate(SHAPE, "tokens", WORK).total
    sums = memory.estimate(SHAPE, "sums", WORK).total
    assert sums < tokens
    roomy = memory.plan(SHAPE, "tokens", WORK, free=int(tokens / memory.SAFETY) + 1)
    assert (roomy.level, roomy.path, roomy.message) == ("tokens", "auto", "")
    # a large probe batch: "tokens" with one tangent per JVP (probe graph + JVP), or by finite differences, still
    # needs more than "sums"
    work = memory.Workload(**{**WORK.__dict__, "probe_rows": 64, "probe_length": 32})
    sums = memory.estimate(SHAPE, "sums", work).total
    tokens = memory.estimate(SHAPE, "tokens", work).total
    lowered = memory.plan(SHAPE, "tokens", work, free=int(sums / memory.SAFETY) + 1)
    assert lowered.level == "sums" and "'tokens'" in lowered.message and lowered.needed == tokens
    assert "'tokens' analysis step needs about" in lowered.refusal("tokens")
    assert memory.plan(SHAPE, "sums", WORK, free=1).level == "none"
    low = memory.plan(SHAPE, "sums", WORK, free=10**12, low_memory=True)
    assert (low.path, low.message) == ("finite_difference", "")


def test_tangents_per_jvp_fit_the_budget():
    per_tangent = SHAPE.buffer + memory.jvp_bytes(SHAPE, WORK.train_rows, WORK.train_length, "func")
    for budget, expected in ((0, 1), (3 * per_tangent, 3), (3 * per_tangent + per_tangent // 2, 3), (10**15, 16)):
        assert memory.jvp_tangents(SHAPE, WORK.train_rows, WORK.train_length, "func", 16, budget) == expected
    assert memory.jvp_budget(SHAPE, "buffer", 16, free=10**15) == 17 * SHAPE.buffer
    assert memory.jvp_budget(SHAPE, "auto", 16, free=0) == 17 * SHAPE.buffer
    # "auto": a small model may use up to JVP_SMALL_MODEL_BYTES of the free memory, a large one one chunk plus one
    small = memory.JVP_SMALL_MODEL_BYTES
    assert 17 * SHAPE.buffer < small
    assert memory.jvp_budget(SHAPE, "auto", 16, free=10**15) == small
    assert memory.jvp_budget(SHAPE, "auto", 16, free=small // 2) == int(memory.SAFETY * small // 2)
    large = memory.ModelShape(**{**SHAPE.__dict__, "num_params": 10**9})
    assert memory.jvp_budget(large, "auto", 16, free=10**15) == 17 * large.buffer
    with pytest.raises(ValueError, match="jvp_chunk_size"):
        memory.jvp_budget(SHAPE, "fast", 16, free=0)


def test_plan_keeps_tokens_with_fewer_tangents_per_jvp_before_downgrading():
    whole = memory.estimate(SHAPE, "tokens", WORK).total
    one = memory.estimate(SHAPE, "tokens", memory.Workload(**{**WORK.__dict__, "jvp_chunk_size": 1})).total
    chosen = memory.plan(SHAPE, "tokens", WORK, free=int(one / memory.SAFETY) + 1)
    assert one < whole and (chosen.level, chosen.path, chosen.message) == ("tokens", "auto", "")


@pytest.mark.parametrize("level", ["sums", "tokens"])
def test_estimate_bounds_the_measured_peak_of_an_analysis_step(tmp_path, level):
    """The tensor bytes the analysis step allocates above what existed before it (`torch.profiler`, as in
    `benchmarks/bench_memory.py`) lie between the estimate's parameter-sized buffers and its total."""
    from torch.profiler import ProfilerActivity, profile

    trainer = dpo_trainer(tmp_path, max_steps=1, per_device_train_batch_size=2)
    callback = LearningDynamicsCallback(
        trainer, every_n_steps=1, attribution=level, num_prompts=1, generate=False, strict=True
    )
    peaks = []
    original = callback.on_pre_optimizer_step

    def measured(args, state, control, **kwargs):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
            out = original(args, state, control, **kwargs)
        peaks.append(tensor_peak(session))
        return out

    callback.on_pre_optimizer_step = measured
    trainer.add_callback(callback)
    trainer.train()
    work = memory.workload(trainer, "dpo", tuple(callback.encoded.batch.input_ids.shape), None)
    estimate = memory.estimate(memory.model_shape(trainer.model), level, work)
    assert len(peaks) == 1 and estimate.buffers <= peaks[0] <= estimate.total, (peaks, estimate)


def test_model_shape_reads_the_config_and_the_trainable_parameters():
    model, _ = toy.model_and_tokenizer(warmup=False)
    shape = memory.model_shape(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert shape.num_params == sum(p.numel() for p in params)
    assert shape.hidden == model.config.hidden_size and shape.layers == model.config.num_hidden_layers
    assert shape.vocab == model.config.vocab_size and shape.buffer_bytes == 4
    assert shape.largest == max(p.numel() for p in params) and not shape.checkpointing
    assert memory.free_bytes("cpu") > 0
    assert shape.chunked_head and shape.head_rows == logprobs.head_chunk_rows(shape.vocab, shape.hidden, 4)
    # a head the analysis differentiates through its own forward (LoRA on lm_head) holds all targets' `[M, V]`
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(_llama(16, lora=False), LoraConfig(r=4, target_modules=["lm_head"]))
    assert not memory.model_shape(wrapped).chunked_head and memory.model_shape(wrapped).head_rows is None
    assert memory.model_shape(_llama(16, lora=True)).chunked_head  # LoRA on the layers: a plain lm_head
    model.gradient_checkpointing_enable()
    checkpointed = memory.model_shape(model)
    assert checkpointed.checkpointing
    assert memory.training_bytes(checkpointed, 2, 64) < memory.training_bytes(shape, 2, 64)


def test_head_term_counts_the_rows_formed_at_once_and_above_training_subtracts_a_lower_bound():
    """The per-target head holds `HEAD_COPIES` float32 `[rows, V]` tensors, `rows` all targets or a chunk of them;
    `above_training` is the total less the plain step's lower bound (layers only, no logits)."""
    per_row = memory.HEAD_COPIES * SHAPE.vocab * 4
    assert memory.head_bytes(SHAPE, 512) == 512 * per_row
    assert memory.head_bytes(SHAPE, 512, chunk_rows=64) == 64 * per_row
    assert memory.head_bytes(SHAPE, 32, chunk_rows=64) == 32 * per_row
    assert memory.split_bytes(SHAPE) == 0  # no largest parameter given
    assert memory.split_bytes(memory.ModelShape(**{**SHAPE.__dict__, "largest": 1000})) == memory.SPLIT_COPIES * 4000
    # plain tensors: the split runs in slices of `optim.SPLIT_CHUNK_ELEMENTS`, its results whole
    large = 10 * optim.SPLIT_CHUNK_ELEMENTS
    sliced = memory.ModelShape(**{**SHAPE.__dict__, "largest": large, "sliced_split": True})
    expected = (memory.SPLIT_RESULTS * large + memory.SPLIT_SLICE_COPIES * optim.SPLIT_CHUNK_ELEMENTS) * 4
    assert memory.split_bytes(sliced) == expected
    # a plain linear unembedding runs in row chunks (`logprobs.head_chunk_rows`), counted at the chunk's rows
    wide = memory.ModelShape(**{**SHAPE.__dict__, "vocab": 151936, "hidden": 896, "chunked_head": True})
    chunk = logprobs.head_chunk_rows(151936, 896, 4)
    assert wide.head_rows == chunk < 512 and memory.head_bytes(wide, 512) == memory.HEAD_COPIES * chunk * 151936 * 4
    assert memory.ModelShape(**{**wide.__dict__, "chunked_head": False}).head_rows is None
    # a backward also forms the largest parameter's gradients (per tangent of a batched backward)
    assert memory.gradient_bytes(wide) == 0
    large = memory.ModelShape(**{**wide.__dict__, "largest": 1000})
    assert memory.gradient_bytes(large, 3) == 3 * memory.BACKWARD_GRADIENTS * 4000
    assert memory.backward_bytes(large, 1, 8) - memory.backward_bytes(wide, 1, 8) == memory.gradient_bytes(large)
    estimate = memory.estimate(SHAPE, "sums", WORK)
    floor = WORK.train_rows * WORK.train_length * SHAPE.layers * (4 * SHAPE.hidden + 2 * SHAPE.intermediate) * 2
    assert estimate.training == floor == memory.training_bytes(SHAPE, WORK.train_rows, WORK.train_length)
    assert estimate.above_training == estimate.total - floor


def _fake_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    monkeypatch.setattr(memory, "pending_training_bytes", lambda model, optimizer: 0)


def test_training_memory_not_yet_allocated_is_set_aside():
    """Before the first step: the gradients and AdamW's two moments (3 P); after a step with gradients kept, 0."""
    model, _ = toy.model_and_tokenizer(warmup=False)
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() * p.element_size() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    assert memory.pending_training_bytes(model, optimizer) == 3 * size
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    missing = sum(p.numel() * p.element_size() for p in params if p.grad is None)  # e.g. unused rows: none here
    assert memory.pending_training_bytes(model, optimizer) == missing


def test_callback_refuses_before_the_first_step_when_the_analysis_cannot_fit(tmp_path, monkeypatch):
    _fake_free(monkeypatch, 1)
    trainer = dpo_trainer(tmp_path, max_steps=2)
    trainer.add_callback(LearningDynamicsCallback(trainer, every_n_steps=1, memory_check="refuse"))
    with pytest.raises(ValueError, match="'sums' analysis step needs about"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_callback_downgrades_with_a_warning_and_records_the_level_it_runs(tmp_path, monkeypatch):
    trainer = dpo_trainer(tmp_path, max_steps=1)
    callback = LearningDynamicsCallback(trainer, every_n_steps=1, attribution="tokens")
    model = trainer.model
    work = memory.workload(trainer, "dpo", tuple(callback.encoded.batch.input_ids.shape), None)
    shape = memory.model_shape(model)
    sums = memory.estimate(shape, "sums", work).total
    tokens_fd = memory.estimate(shape, "tokens", work, "finite_difference").total
    _fake_free(monkeypatch, int(max(sums, 0) / memory.SAFETY) + 1)
    assert tokens_fd > sums  # so that the plan is "sums" on the exact path
    trainer.add_callback(callback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("running 'sums' instead" in str(w.message) for w in caught)
    assert callback.config.attribution == "sums" and callback.jvp_path == "auto"
    lines = [json.loads(line) for line in (tmp_path / "dynamics" / "dynamics.jsonl").read_text().splitlines()]
    run = next(r for r in lines if r.get("type") == "run")
    assert run["config"]["attribution"] == "sums"


def test_low_memory_mode_runs_the_step_by_finite_differences(tmp_path):
    trainer = dpo_trainer(tmp_path, max_steps=1)
    callback = LearningDynamicsCallback(trainer, every_n_steps=1, low_memory=True, strict=True)
    trainer.add_callback(callback)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "dynamics" / "dynamics.jsonl").read_text().splitlines()]
    paths = {r["path"] for r in lines if "path" in r}
    assert paths == {"finite_difference"}, paths


def _llama(length: int, lora: bool, vocab: int = 128, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    """A random Llama (MLP width 2x `hidden`, 4 heads / 2 KV heads, SDPA, tied embeddings), optionally LoRA-wrapped
    (rank 4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    return model.eval()


def _long_batch(rows: int, length: int, seed: int, vocab: int = 128):
    from trl_ntk.batches import TokenBatch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    targets = torch.zeros(rows, length, dtype=torch.bool)
    targets[:, length // 2 :] = True  # a long response after a long prompt
    return TokenBatch(ids, torch.ones_like(ids), targets)


def _plain_step(model: torch.nn.Module, batch, coeffs: torch.Tensor, optimizer=None, head_rows: int = 64) -> None:
    """`sum_l c_l lp_l` backward (and the optimizer step if given) with the loss head formed `head_rows` targets at
    a time and recomputed in the backward (`torch.utils.checkpoint`), as a fused or chunked head does: the plain
    step with the least activations, against which the estimate's `above_training` must still be an upper bound."""
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def target_logprobs(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(base.lm_head(hidden).float(), -1).gather(-1, targets[:, None])[:, 0]

    hidden = base.model(**batch.forward_kwargs()).last_hidden_state[:, :-1][batch.target_mask[:, 1:]]
    loss = sum(
        (checkpoint(target_logprobs, hidden[k : k + head_rows], batch.targets[k : k + head_rows], use_reentrant=False)
         * coeffs[k : k + head_rows]).sum()
        for k in range(0, batch.num_targets, head_rows)
    )  # fmt: skip
    loss.backward()
    if optimizer is not None:
        optimizer.step()


def _measured_sums_step(
    model: torch.nn.Module, length: int, vocab: int = 128, probe_length: int | None = None
) -> tuple[int, int, memory.Estimate]:
    """Tensor peaks (`torch.profiler`, above what existed before each) of a plain training step (`_plain_step`, with
    its AdamW step) and of one exact-path "sums" `explain_update` of a 2-row training batch of `length` tokens and
    a 2-row probe batch (of `probe_length`, default `length`), both from the training state (gradients and AdamW
    moments allocated), and the estimate for the same workload."""
    from torch.profiler import ProfilerActivity, profile

    from trl_ntk.analysis import dynamics
    from trl_ntk.batches import CapturedMicroBatch, TokenLabels, target_rows

    probe_length = probe_length or length
    train, probe = _long_batch(2, length, 1, vocab), _long_batch(2, probe_length, 2, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(3)) / train.num_targets
    _plain_step(model, train, coeffs, optimizer)  # creates the gradients and AdamW's moments
    optimizer.zero_grad(set_to_none=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        _plain_step(model, train, coeffs, optimizer)
    plain = tensor_peak(session)
    optimizer.zero_grad(set_to_none=False)
    _plain_step(model, train, coeffs)  # the analysed step's gradient
    rows = target_rows(train)
    labels = [TokenLabels(group=torch.zeros_like(rows), example=rows, sequence_group=rows)]
    micro = [CapturedMicroBatch(train, grad_coeffs=coeffs.double())]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        dynamics.explain_update(model, probe, micro, labels, ("all",), optimizer, attribution="sums")
    work = memory.Workload(train_rows=2, train_length=length, probe_rows=2, probe_length=probe_length)
    return plain, tensor_peak(session), memory.estimate(memory.model_shape(model), "sums", work)


@pytest.mark.parametrize("length", [256, 768])
def test_estimate_bounds_the_exact_path_at_long_sequences_within_a_factor(length):
    """Forward-mode attention through SDPA's MATH backend holds about 6 `H T^2` score tensors per row; the estimate
    of a "sums" step on the exact path is above the measured tensor peak and within 4x of it."""
    model = _llama(length, lora=False)
    _, peak, estimate = _measured_sums_step(model, length)
    assert estimate.path == "func" and peak <= estimate.total <= 4 * peak, (peak, estimate)


def test_estimate_of_a_lora_step_is_an_upper_bound_and_not_counted_in_parameters():
    """LoRA: parameter-sized buffers are negligible, the activations do not scale with P; the estimate bounds the
    measured peak within 4x, and its part above a plain training step bounds the measured difference within 4x."""
    length = 512
    model = _llama(length, lora=True)
    plain, peak, estimate = _measured_sums_step(model, length)
    shape = memory.model_shape(model)
    assert shape.num_params < 10_000 and estimate.buffers < 0.01 * peak
    assert peak <= estimate.total <= 4 * peak, (peak, estimate)
    assert 0 < peak - plain <= estimate.above_training <= 4 * (peak - plain), (plain, peak, estimate)
    assert estimate.above_training < estimate.total and estimate.training > 0


@pytest.mark.parametrize(("lora", "length"), [(False, 256), (True, 256), (False, 32)])
def test_estimate_bounds_a_large_vocabulary_step_and_its_part_above_a_plain_step(monkeypatch, lora, length):
    """Hidden 128, vocabulary 32,768 (the tied embedding is 94% of the parameters). The estimate and its part above a
    plain training step (a chunked loss head, the least a plain step holds) bound the measured tensor peak and the
    measured difference, and the estimate is within 4.5x of the measure: it counts the per-target head's `[rows, V]`
    tensors for one row chunk (`logprobs.head_chunk_rows`, 32 rows here) where counting all targets at once made it
    6.3x (full fine-tuning, T 256) and 40x (LoRA), and the optimizer split in slices (`ModelShape.sliced_split`)."""
    vocab = 32768
    model = _llama(length, lora=lora, vocab=vocab, hidden=128, layers=1)
    plain, peak, estimate = _measured_sums_step(model, length, vocab, probe_length=32)
    shape = memory.model_shape(model)
    assert shape.head_rows == logprobs.head_chunk_rows(vocab, shape.hidden, 4) == 32
    assert peak <= estimate.total <= 4.5 * peak, (peak, estimate)
    assert max(peak - plain, 0) <= estimate.above_training, (plain, peak, estimate)
    assert shape.sliced_split


def test_backward_term_counts_the_gradients_a_chunked_head_backward_forms():
    """A training backward through the chunked head (hidden 256, vocabulary 32,768, tied embeddings, full
    fine-tuning, T 128, gradients added into preallocated buffers) holds the head weight's `[V, h]` gradient, and at
    the embedding two of them (the head's, held until the embedding's is summed with it): 67.4 MB measured, two
    33.5 MB gradients. `backward_bytes` bounds the measured tensor peak within 2.5x (130.6 MB), and without its
    gradient term (`gradient_bytes`) it falls below it (63.4 MB): the `[rows, V]` head chunks (64 rows of 256
    targets) alone do not cover them."""
    from torch.profiler import ProfilerActivity, profile

    from trl_ntk._model import trainable_parameters
    from trl_ntk.ntk import kernels

    vocab, hidden, rows, length = 32768, 256, 2, 128
    model = _llama(length, lora=False, vocab=vocab, hidden=hidden, layers=1)
    batch = _long_batch(rows, length, 1, vocab)
    weights = torch.randn(batch.num_targets, generator=torch.Generator().manual_seed(0))
    total = {n: torch.zeros_like(p) for n, p in trainable_parameters(model).items()}
    kernels.logprob_grad(model, batch, weights, into=total)  # first-call allocations outside the measure
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        kernels.logprob_grad(model, batch, weights, into=total)
    peak = tensor_peak(session)
    shape = memory.model_shape(model)
    assert shape.head_rows is not None and shape.head_rows < batch.num_targets
    estimate = memory.backward_bytes(shape, rows, length)
    assert peak > shape.largest * 4 and peak <= estimate <= 2.5 * peak, (peak, estimate)
    assert estimate - memory.gradient_bytes(shape) < peak, (peak, estimate)


def _numbers(value, prefix=""):
    """`{path: float}` of every number in a JSON record (nested dicts and lists), booleans and strings left out."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{prefix}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{prefix}[{i}]").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def _tokens_run(tmp_path, low_memory: bool, monkeypatch) -> tuple[list[dict], list[dict]]:
    """A one-step toy DPO run at the "tokens" level; its records and the keyword arguments of every `DenseBackend`
    the callback built."""
    from trl_ntk.analysis import dense
    from trl_ntk.integration import callbacks

    built = []

    class Spy(dense.DenseBackend):
        def __init__(self, *args, **kwargs):
            built.append({"args": args[1:], **kwargs})
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(callbacks.dense, "DenseBackend", Spy)
    trainer = dpo_trainer(tmp_path, max_steps=1)
    callback = LearningDynamicsCallback(
        trainer, every_n_steps=1, attribution="tokens", low_memory=low_memory, num_prompts=1, generate=False,
        strict=True, chunk_size=4,
    )  # fmt: skip
    trainer.add_callback(callback)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "dynamics" / "dynamics.jsonl").read_text().splitlines()]
    return lines, built


def test_low_memory_runs_the_tokens_level_exactly_within_a_buffer_budget(tmp_path, monkeypatch):
    """`low_memory=True` at the "tokens" level builds `DenseBackend(jvp_chunk_size="buffer")` on the exact path,
    and records the same numbers as the default run at the same `chunk_size` (timings aside) to 1e-5 (with another
    chunk size the float32 sums change order: 4e-5 relative on the toy between chunks of 1 and 16)."""
    low, built = _tokens_run(tmp_path / "low", True, monkeypatch)
    default, built_default = _tokens_run(tmp_path / "default", False, monkeypatch)
    assert built_default == [] and len(built) == 1, (built, built_default)
    assert built[0]["jvp_chunk_size"] == "buffer" and built[0]["path"] == "auto" and built[0]["args"] == (4,)
    paths = {r["path"] for r in low if "path" in r}
    assert paths and "finite_difference" not in paths, paths
    kept = [r for r in low if r.get("type") not in ("run", "status")]
    reference = [r for r in default if r.get("type") not in ("run", "status")]
    assert [r.get("type") for r in kept] == [r.get("type") for r in reference]
    compared = 0
    for mine, theirs in zip(kept, reference):
        a, b = _numbers(mine), _numbers(theirs)
        for key in a.keys() & b.keys():
            if any(word in key for word in ("seconds", "time", "elapsed", "duration")):
                continue
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (key, a[key], b[key])
            compared += 1
    assert compared > 100, compared


def test_low_memory_plan_keeps_exact_tokens_within_the_buffer_budget_and_sums_by_finite_differences():
    """With `low_memory`, "sums" runs by finite differences; "tokens" on the exact path with the tangents per JVP
    of the "buffer" budget (`chunk_size + 1` buffers) when that fits, finite differences when only those fit."""
    roomy = memory.plan(SHAPE, "tokens", WORK, free=10**12, low_memory=True)
    assert (roomy.level, roomy.path, roomy.message) == ("tokens", "auto", "")
    budget = memory.jvp_budget(SHAPE, "buffer", WORK.chunk_size, 0)
    tangents = memory.jvp_tangents(SHAPE, WORK.train_rows, WORK.train_length, "func", WORK.chunk_size, budget)
    assert 1 <= tangents < WORK.chunk_size  # activations outweigh the parameters here: fewer than a whole chunk
    buffered = memory.estimate(SHAPE, "tokens", memory.Workload(**{**WORK.__dict__, "jvp_chunk_size": tangents}))
    assert roomy.estimate == buffered
    fd = memory.estimate(SHAPE, "tokens", WORK, "finite_difference").total
    assert fd < buffered.total
    tight = memory.plan(SHAPE, "tokens", WORK, free=int(fd / memory.SAFETY) + 1, low_memory=True)
    assert (tight.level, tight.path) == ("tokens", "finite_difference") and "finite-difference" in tight.message
    assert memory.plan(SHAPE, "sums", WORK, free=10**12, low_memory=True).path == "finite_difference"


def test_sums_step_holds_no_buffer_beside_a_training_backward():
    """Where a training micro-batch's activations outweigh the parameters, the "sums" step's tensor peak is that of
    one plain backward of the micro-batch (`torch.autograd.grad` of `sum_l c_l lp_l`, which builds the gradient
    while it frees the graph), not one parameter-sized buffer more: no running sum or zero-filled gradient is alive
    beside a whole backward graph. Slack: 0.1 P for the step's small tensors (labels, rows, the probe's JVP)."""
    from torch.profiler import ProfilerActivity, profile

    from trl_ntk.analysis import dynamics
    from trl_ntk.batches import CapturedMicroBatch, TokenLabels, target_rows

    model = _llama(64, lora=False, hidden=64)
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    train, probe = _long_batch(2, 64, 1), _long_batch(1, 16, 2)
    coeffs = torch.randn(train.num_targets, generator=torch.Generator().manual_seed(3)) / train.num_targets

    def plain_loss() -> torch.Tensor:
        logits = model(**train.forward_kwargs()).logits[:, :-1][train.target_mask[:, 1:]]
        return (torch.log_softmax(logits, -1).gather(-1, train.targets[:, None])[:, 0] * coeffs).sum()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        reference = torch.autograd.grad(plain_loss(), params)
    backward = tensor_peak(session)
    for p, g in zip(params, reference):
        p.grad = g
    del reference
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rows = target_rows(train)
    labels = [TokenLabels(group=torch.zeros_like(rows), example=rows, sequence_group=rows)]
    micro = [CapturedMicroBatch(train, grad_coeffs=coeffs.double())]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        explanation = dynamics.explain_update(model, probe, micro, labels, ("all",), optimizer, attribution="sums")
    step = tensor_peak(session)
    assert explanation.gradient_check.cosine == pytest.approx(1.0, abs=1e-6)
    assert backward > 2 * param_bytes, "the activations must outweigh the parameters for the bound to bite"
    assert step <= backward + 0.1 * param_bytes, (step / param_bytes, backward / param_bytes)


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam-l2"])
def test_split_term_bounds_the_measured_split_of_a_large_parameter(decoupled):
    """Reading the split of one parameter of three and a bit slices (`dense.LazySplit`: `P`, then the history
    while `P` is held) allocates its results whole and its temporaries one slice at a time: the measured tensor peak
    lies within `split_bytes` of a sliced split, and at least half of it."""
    from torch.profiler import ProfilerActivity, profile

    from trl_ntk.analysis.dense import LazySplit

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3 * optim.SPLIT_CHUNK_ELEMENTS + 5))
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)([param], lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        param.grad = torch.randn_like(param)
        optimizer.step()
    param.grad = torch.randn_like(param)
    params = {"w": param}
    parts = LazySplit(optimizer, params, 0), LazySplit(optimizer, params, 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        preconditioner = parts[0]["w"]
        history = parts[1]["w"]
        del preconditioner, history
    peak = tensor_peak(session)
    shape = memory.ModelShape(
        num_params=param.numel(), buffer_bytes=4, param_bytes=4, act_bytes=4, largest=param.numel(), sliced_split=True
    )
    assert peak <= memory.split_bytes(shape) <= 2 * peak, (peak, memory.split_bytes(shape))
    assert memory.split_bytes(shape) < memory.SPLIT_COPIES * param.numel() * 4  # below whole-parameter copies
