"""NTHR: the hidden reward against autograd and a token-pair loop, the weights against the paper's rule written as a
loop, and the callback against hand-scaled advantages in a real `GRPOTrainer`."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from trl_ntk.ntk.nthr import hidden_reward, token_weights

# ------------------------------------------------------------------------------------------------------------------
# Oracles, written independently of the code under test.
# ------------------------------------------------------------------------------------------------------------------


def _autograd_hidden_reward(hidden, head, completion_ids, completion_mask, positive, temperature):
    """`T^2 <grad_W lp_t, sum_{positive tokens} grad_W lp_i>` with autograd on the unembedding weight only."""
    weight = head.weight.detach().clone().requires_grad_(True)

    def logprob(b, t):
        return torch.log_softmax(hidden[b, t] @ weight.T / temperature, -1)[completion_ids[b, t]]

    tokens = [(b, t) for b, t in itertools.product(*map(range, completion_ids.shape)) if completion_mask[b, t]]
    positive_sum = sum(logprob(b, t) for b, t in tokens if positive[b])
    (positive_grad,) = torch.autograd.grad(positive_sum, weight)
    scores = torch.zeros(completion_ids.shape, dtype=torch.float64)
    for b, t in tokens:
        (grad,) = torch.autograd.grad(logprob(b, t), weight)
        scores[b, t] = (grad * positive_grad).sum() * temperature**2
    return scores


def _pair_loop_hidden_reward(hidden, logits, completion_ids, completion_mask, positive, temperature, columns=None):
    """The paper's double sum over token pairs, `alpha` on `columns` (all ids when None)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    vocab = probs.shape[-1]
    columns = list(range(vocab)) if columns is None else columns
    tokens = [(b, t) for b, t in itertools.product(*map(range, completion_ids.shape)) if completion_mask[b, t]]

    def error(b, t):
        e = -probs[b, t, columns]
        e[columns.index(int(completion_ids[b, t]))] += 1
        return e

    scores = torch.zeros(completion_ids.shape, dtype=torch.float64)
    for j, k in tokens:
        scores[j, k] = sum(
            float(error(i, m) @ error(j, k)) * float(hidden[i, m].double() @ hidden[j, k].double())
            for i, m in tokens
            if positive[i]
        )
    return scores


def _rule_loop_weights(scores, completion_mask, advantages, group_size, beta, eta):
    """The paper's selection rule, group by group and token by token, given the scores."""
    weights = torch.ones(scores.shape)
    for start in range(0, scores.shape[0], group_size):
        rows = range(start, start + group_size)
        pos = [i for i in rows if advantages[i] > 0 and completion_mask[i].sum() > 0]
        neg = [i for i in rows if advantages[i] < 0]
        if not pos or not neg:
            continue
        means = [
            sum(scores[i, t] for t in range(scores.shape[1]) if completion_mask[i, t]) / completion_mask[i].sum()
            for i in pos
        ]
        tau = beta * min(means)
        p = sum(1 for i in rows if advantages[i] > 0) / group_size
        group_eta = 2 * abs(0.5 - p) if eta == "auto" else eta
        for j in neg:
            for t in range(scores.shape[1]):
                if completion_mask[j, t] and scores[j, t] > tau:
                    weights[j, t] = group_eta
    return weights


def _random_group(seed, batch=4, length=5, vocab=11, width=6, dtype=torch.float64, pad=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=generator, dtype=dtype)
    head = torch.nn.Linear(width, vocab, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=generator, dtype=dtype))
    completion_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    completion_mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        completion_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return hidden, head, completion_ids, completion_mask


# ------------------------------------------------------------------------------------------------------------------
# hidden_reward
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_reward_full_vocab_matches_autograd_on_the_unembedding(temperature):
    hidden, head, completion_ids, completion_mask = _random_group(0)
    positive = torch.tensor([True, False, True, False])
    with torch.no_grad():
        logits = head(hidden)
    scores = hidden_reward(
        hidden, logits, completion_ids, completion_mask, positive, temperature=temperature, chunk_size=3
    )
    oracle = _autograd_hidden_reward(hidden, head, completion_ids, completion_mask, positive, temperature)
    assert scores.shape == completion_ids.shape
    assert torch.allclose(scores, oracle, rtol=1e-5, atol=1e-9 * oracle.abs().max())
    assert (scores[completion_mask == 0] == 0).all()


def test_hidden_reward_float32_is_within_1e5_relative_of_autograd():
    hidden, head, completion_ids, completion_mask = _random_group(1, batch=6, length=7, dtype=torch.float32)
    positive = torch.tensor([True, False, False, True, False, True])
    with torch.no_grad():
        logits = head(hidden)
    scores = hidden_reward(hidden, logits, completion_ids, completion_mask, positive, chunk_size=4)
    oracle = _autograd_hidden_reward(hidden.double(), head.double(), completion_ids, completion_mask, positive, 1.0)
    mask = completion_mask.bool()
    relative = (scores.double() - oracle)[mask].abs().max() / oracle[mask].abs().max()
    assert scores.dtype == torch.float32
    assert relative <= 1e-5


def test_hidden_reward_accepts_a_head_instead_of_logits():
    hidden, head, completion_ids, completion_mask = _random_group(2)
    positive = torch.tensor([False, True, True, False])
    with torch.no_grad():
        logits = head(hidden)
    for vocab in ("full", "group"):
        from_logits = hidden_reward(hidden, logits, completion_ids, completion_mask, positive, vocab=vocab)
        from_head = hidden_reward(hidden, head, completion_ids, completion_mask, positive, vocab=vocab, chunk_size=2)
        assert torch.allclose(from_logits, from_head, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_hidden_reward_group_vocab_matches_the_restricted_pair_loop(temperature):
    hidden, head, completion_ids, completion_mask = _random_group(3, vocab=17)
    positive = torch.tensor([True, True, False, False])
    with torch.no_grad():
        logits = head(hidden)
    columns = sorted(set(completion_ids[completion_mask.bool()].tolist()))
    assert len(columns) < 17
    scores = hidden_reward(
        hidden, logits, completion_ids, completion_mask, positive, vocab="group", temperature=temperature, chunk_size=3
    )
    oracle = _pair_loop_hidden_reward(hidden, logits, completion_ids, completion_mask, positive, temperature, columns)
    assert torch.allclose(scores, oracle, rtol=1e-9, atol=1e-12)
    full = _pair_loop_hidden_reward(hidden, logits, completion_ids, completion_mask, positive, temperature)
    assert not torch.allclose(scores, full)


def test_hidden_reward_without_positive_completions_is_zero():
    hidden, head, completion_ids, completion_mask = _random_group(4)
    scores = hidden_reward(hidden, head, completion_ids, completion_mask, torch.zeros(4, dtype=torch.bool))
    assert (scores == 0).all()


def test_hidden_reward_ignores_values_on_padding():
    hidden, head, completion_ids, completion_mask = _random_group(5)
    positive = torch.tensor([True, False, True, False])
    with torch.no_grad():
        logits = head(hidden)
    padding = completion_mask == 0
    assert padding.any()
    noisy_hidden, noisy_logits, noisy_ids = hidden.clone(), logits.clone(), completion_ids.clone()
    noisy_hidden[padding] = 1e3
    noisy_logits[padding] = -1e3
    noisy_ids[padding] = 0
    for vocab in ("full", "group"):
        clean = hidden_reward(hidden, logits, completion_ids, completion_mask, positive, vocab=vocab)
        noisy = hidden_reward(noisy_hidden, noisy_logits, noisy_ids, completion_mask, positive, vocab=vocab)
        assert torch.equal(clean, noisy)


# ------------------------------------------------------------------------------------------------------------------
# token_weights
# ------------------------------------------------------------------------------------------------------------------


def _weights_and_oracle(hidden, head, completion_ids, completion_mask, advantages, group_size, beta, eta, vocab):
    with torch.no_grad():
        logits = head(hidden)
    weights, stats = token_weights(
        hidden,
        logits,
        completion_ids,
        completion_mask,
        advantages,
        group_size,
        beta=beta,
        eta=eta,
        vocab=vocab,
        return_stats=True,
    )
    scores = torch.zeros(completion_ids.shape, dtype=torch.float64)
    for start in range(0, completion_ids.shape[0], group_size):
        rows = slice(start, start + group_size)
        group_mask = completion_mask[rows].bool()
        columns = sorted(set(completion_ids[rows][group_mask].tolist())) if vocab == "group" else None
        scores[rows] = _pair_loop_hidden_reward(
            hidden[rows], logits[rows], completion_ids[rows], completion_mask[rows], advantages[rows] > 0, 1.0, columns
        )
    oracle = _rule_loop_weights(scores, completion_mask, advantages, group_size, beta, eta)
    return weights, stats, oracle, scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vocab", ["group", "full"])
def test_token_weights_match_the_rule_loop_on_random_groups(seed, vocab):
    group_size = 4
    hidden, head, completion_ids, completion_mask = _random_group(seed, batch=3 * group_size, length=4)
    generator = torch.Generator().manual_seed(100 + seed)
    rewards = torch.randint(0, 2, (3 * group_size,), generator=generator).double()
    rewards[:group_size] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # at least one mixed group
    grouped = rewards.view(-1, group_size)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    beta = [1.0, 0.5, 0.0][seed % 3]
    weights, stats, oracle, scores = _weights_and_oracle(
        hidden, head, completion_ids, completion_mask, advantages, group_size, beta, "auto", vocab
    )
    assert torch.equal(weights, oracle.float())
    negative_tokens = (advantages < 0)[:, None] & completion_mask.bool()
    assert stats.num_negative_tokens == int(negative_tokens.sum())
    assert stats.num_downweighted == int(((weights != 1) & negative_tokens).sum())
    assert stats.num_groups == 3


def test_token_weights_downweight_some_tokens_with_beta_zero_and_fixed_eta():
    group_size = 4
    hidden, head, completion_ids, completion_mask = _random_group(7, batch=group_size, length=6, pad=False)
    advantages = torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64)
    weights, stats, oracle, scores = _weights_and_oracle(
        hidden, head, completion_ids, completion_mask, advantages, group_size, 0.0, 0.25, "full"
    )
    assert torch.equal(weights, oracle.float())
    assert 0 < stats.num_downweighted < stats.num_negative_tokens
    assert set(weights[1:].flatten().tolist()) == {0.25, 1.0}
    assert (weights[0] == 1).all()
    assert stats.eta == 0.25 and stats.num_mixed_groups == 1
    assert stats.tau == 0.0
    assert stats.s_neg_mean == pytest.approx(float(scores[1:].mean()))


@pytest.mark.parametrize("rewards", [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], ids=["all-correct", "all-wrong"])
def test_token_weights_leave_groups_without_both_signs_untouched(rewards):
    hidden, head, completion_ids, completion_mask = _random_group(8)
    rewards = torch.tensor(rewards)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    weights, stats = token_weights(
        hidden, head, completion_ids, completion_mask, advantages, 4, beta=0.0, eta=0.0, return_stats=True
    )
    assert (weights == 1).all()
    assert stats.num_mixed_groups == 0 and stats.num_groups == 1
    assert stats.frac_downweighted == 0.0


def test_token_weights_all_negative_group_without_positive_is_untouched():
    hidden, head, completion_ids, completion_mask = _random_group(9)
    weights = token_weights(hidden, head, completion_ids, completion_mask, -torch.ones(4), 4, beta=0.0, eta=0.0)
    assert (weights == 1).all()


def test_token_weights_tie_with_the_threshold_is_not_downweighted():
    # Exact arithmetic: uniform pi over 4 ids (pi = 1/4), integer hidden states.
    logits = torch.zeros(2, 2, 4, dtype=torch.float64)
    completion_ids = torch.tensor([[0, 0], [0, 0]])
    completion_mask = torch.tensor([[1, 0], [1, 1]])
    hidden = torch.zeros(2, 2, 3, dtype=torch.float64)
    hidden[0, 0] = torch.tensor([1.0, 0.0, 0.0])  # the only positive token
    hidden[1, 0] = torch.tensor([1.0, 0.0, 0.0])  # its copy in the negative completion: s == tau
    hidden[1, 1] = torch.tensor([2.0, 0.0, 0.0])  # s == 2 tau
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    scores = hidden_reward(hidden, logits, completion_ids, completion_mask, advantages > 0)
    tau = float(scores[0, 0])
    assert tau == 0.75 and float(scores[1, 0]) == tau and float(scores[1, 1]) == 2 * tau
    weights = token_weights(
        hidden, logits, completion_ids, completion_mask, advantages, 2, beta=1.0, eta="auto", vocab="full"
    )
    assert weights.tolist() == [[1.0, 1.0], [1.0, 0.0]]  # p = 1/2 -> eta = 0


def test_token_weights_auto_eta_uses_the_fraction_of_positive_advantages():
    hidden, head, completion_ids, completion_mask = _random_group(10, batch=8, length=3, pad=False)
    advantages = torch.tensor([2.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0])  # p = 1/8
    weights, stats = token_weights(
        hidden, head, completion_ids, completion_mask, advantages, 8, beta=0.0, return_stats=True
    )
    assert stats.eta == pytest.approx(0.75)
    assert set(weights.flatten().tolist()) <= {0.75, 1.0}


def test_token_weights_graded_rewards_count_zero_advantage_as_neither_sign():
    hidden, head, completion_ids, completion_mask = _random_group(11, pad=False)
    advantages = torch.tensor([1.0, 0.0, -0.5, -0.5], dtype=torch.float64)  # p = 1/4 -> eta = 1/2
    weights, stats, oracle, _ = _weights_and_oracle(
        hidden, head, completion_ids, completion_mask, advantages, 4, 0.0, "auto", "group"
    )
    assert torch.equal(weights, oracle.float())
    assert (weights[1] == 1).all() and (weights[0] == 1).all()
    assert stats.eta == 0.5


def test_token_weights_skip_empty_positive_completions_in_the_threshold():
    hidden, head, completion_ids, completion_mask = _random_group(12, pad=False)
    completion_mask[0] = 0  # an empty positive completion
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    weights, stats, oracle, _ = _weights_and_oracle(
        hidden, head, completion_ids, completion_mask, advantages, 4, 1.0, 0.5, "full"
    )
    assert torch.equal(weights, oracle.float())
    assert stats.num_mixed_groups == 1 and torch.isfinite(torch.tensor(stats.tau))


def test_token_weights_reject_bad_options():
    hidden, head, completion_ids, completion_mask = _random_group(13)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="multiple of group_size"):
        token_weights(hidden, head, completion_ids, completion_mask, advantages, 3)
    with pytest.raises(ValueError, match="eta"):
        token_weights(hidden, head, completion_ids, completion_mask, advantages, 4, eta=1.5)
    with pytest.raises(ValueError, match="beta"):
        token_weights(hidden, head, completion_ids, completion_mask, advantages, 4, beta=-1.0)
    with pytest.raises(ValueError, match="vocab"):
        token_weights(hidden, head, completion_ids, completion_mask, advantages, 4, vocab="top")


# ------------------------------------------------------------------------------------------------------------------
# Across ranks: threads stand in for processes, with the accelerate collectives the code uses.
# ------------------------------------------------------------------------------------------------------------------


class _ThreadAccelerator:
    """`num_processes`, `process_index`, `gather` (concatenate along dim 0) and `pad_across_processes`, one
    instance per thread, exchanging through a barrier."""

    def __init__(self, shared, rank):
        self.shared, self.process_index, self.num_processes = shared, rank, shared["world"]

    def _all(self, tensor):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.process_index] = tensor
        barrier.wait()
        everything = list(slots)
        barrier.wait()
        return everything

    def gather(self, tensor):
        return torch.cat(self._all(tensor))

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        size = max(t.shape[dim] for t in self._all(tensor))
        shape = list(tensor.shape)
        shape[dim] = size - tensor.shape[dim]
        return torch.cat([tensor, tensor.new_full(shape, pad_index)], dim=dim)


@pytest.mark.parametrize(("world", "batch", "group_size"), [(2, 6, 4), (3, 2, 3), (4, 2, 8), (2, 10, 4), (2, 8, 4)])
def test_token_weights_across_ranks_match_one_process_when_groups_span_ranks(world, batch, group_size):
    import threading

    from trl_ntk.integration.nthr import _token_weights_on_rank

    total = world * batch
    assert total % group_size == 0
    hidden, head, completion_ids, completion_mask = _random_group(
        20 + world, batch=total, length=5, vocab=13, dtype=torch.float32
    )
    rewards = torch.tensor([float((i * 7 + world) % 3 == 0) for i in range(total)])
    grouped = rewards.view(-1, group_size)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    options = {"beta": 0.5, "eta": "auto", "vocab": "group", "temperature": 1.0, "chunk_size": 4}
    expected, expected_stats = token_weights(
        hidden,
        head,
        completion_ids,
        completion_mask,
        advantages,
        group_size,
        return_stats=True,
        **{k: v for k, v in options.items()},
    )
    assert expected_stats.num_mixed_groups > 0 and expected_stats.num_downweighted > 0
    shared = {"world": world, "slots": [None] * world, "barrier": threading.Barrier(world)}
    results, errors = [None] * world, []

    def run(rank):
        try:
            rows = slice(rank * batch, (rank + 1) * batch)
            # each rank pads its completions to its own longest one, as TRL does
            length = int(completion_mask[rows].sum(-1).max())
            results[rank] = _token_weights_on_rank(
                hidden[rows, :length],
                head,
                completion_ids[rows, :length],
                completion_mask[rows, :length],
                advantages[rows],
                group_size,
                _ThreadAccelerator(shared, rank),
                **options,
            )
        except Exception as error:  # reported below, from the main thread
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for rank, (weights, stats) in enumerate(results):
        rows = slice(rank * batch, (rank + 1) * batch)
        assert torch.equal(weights, expected[rows, : weights.shape[1]])
        assert stats.num_groups == expected_stats.num_groups
        assert stats.num_mixed_groups == expected_stats.num_mixed_groups
        assert stats.num_downweighted == expected_stats.num_downweighted
        assert stats.num_negative_tokens == expected_stats.num_negative_tokens
        assert stats.tau == pytest.approx(expected_stats.tau, rel=1e-5)
        assert stats.s_neg_mean == pytest.approx(expected_stats.s_neg_mean, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# The callback in a real GRPOTrainer (a 1-layer Qwen2 with a byte-level tokenizer, built in memory).
# ------------------------------------------------------------------------------------------------------------------

GROUP_SIZE = 4
NUM_PROMPTS = 2
MAX_COMPLETION_LENGTH = 6


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>")


def _tiny_model(tokenizer, folder):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)  # GRPO with beta > 0 reloads the reference model from this path
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _parity_reward(completions, **kwargs):
    """1 when the first character's code point is even: about half the completions of a random model."""
    return [float(len(text) > 0 and ord(text[0]) % 2 == 0) for text in completions]


def _grpo_trainer(tmp_path, trainer_class=None, **overrides):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = _byte_tokenizer()
    # one folder per rank: under torchrun both ranks build the same (seeded) model, and must not read a half-written one
    model = _tiny_model(tokenizer, tmp_path / f"model-rank{os.environ.get('RANK', '0')}")
    options = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": GROUP_SIZE * NUM_PROMPTS,
        "num_generations": GROUP_SIZE,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "report_to": "none",
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(overrides.pop("args", {}))
    data = Dataset.from_list([{"prompt": f"Q{i}:"} for i in range(16)])
    return (trainer_class or GRPOTrainer)(
        model=model,
        reward_funcs=_parity_reward,
        args=GRPOConfig(**options),
        train_dataset=data,
        processing_class=tokenizer,
        **overrides,
    )


def _generation_inputs(trainer):
    prompts = [trainer.train_dataset[i] for i in range(NUM_PROMPTS)]
    return [row for row in prompts for _ in range(GROUP_SIZE)]


def _generate(trainer, seed=0):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(_generation_inputs(trainer))


def _reference_weights(trainer, output, plain_advantages, **options):
    """`token_weights` on hidden states from an independent no-grad forward of the backbone (no hooks)."""
    model = trainer.model
    prompt_length = output["prompt_ids"].shape[1]
    with torch.no_grad():
        hidden = model.model(
            input_ids=torch.cat([output["prompt_ids"], output["completion_ids"]], 1),
            attention_mask=torch.cat([output["prompt_mask"], output["completion_mask"]], 1),
        ).last_hidden_state[:, prompt_length - 1 : -1]
        logits = model.lm_head(hidden)
    return token_weights(
        hidden,
        logits,
        output["completion_ids"],
        output["completion_mask"],
        plain_advantages,
        GROUP_SIZE,
        temperature=trainer.temperature,
        **options,
    )


def _hand_loss(trainer, inputs, advantages):
    """GRPO's clipped surrogate written out for grpo / bnpo / dr_grpo / dapo, with per-token advantages `[B, T]`."""
    mask = inputs["completion_mask"].float()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].shape[1],
        )
    old = inputs.get("old_per_token_logps", logps)
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    if trainer.beta:
        ref = inputs["ref_per_token_logps"]
        per_token = per_token + trainer.beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    accumulation = trainer.args.gradient_accumulation_steps
    if trainer.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / accumulation
    if trainer.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1) / accumulation
    if trainer.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * trainer.max_completion_length) / accumulation
    normalizer = inputs["num_items_in_batch"] * accumulation / trainer.args.steps_per_generation
    return (per_token * mask).sum() / normalizer


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_callback_loss_equals_the_loss_with_hand_scaled_advantages(tmp_path, loss_type):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path, args={"loss_type": loss_type, "beta": 0.05})
    callback = NTHRCallback(trainer, beta=0.0, eta=0.5)
    trainer.add_callback(callback)
    output = _generate(trainer)
    callback.remove()
    plain = _generate(trainer)
    assert torch.equal(output["completion_ids"], plain["completion_ids"])
    assert plain["advantages"].dim() == 1 and output["advantages"].shape == output["completion_ids"].shape
    weights = _reference_weights(trainer, plain, plain["advantages"], beta=0.0, eta=0.5)
    assert 0 < int((weights == 0.5).sum()) < int((plain["advantages"] < 0).sum()) * MAX_COMPLETION_LENGTH
    assert torch.equal(callback.last_weights, weights)
    hand_scaled = plain["advantages"][:, None] * weights
    assert torch.allclose(output["advantages"], hand_scaled, rtol=0, atol=1e-7)

    # Off-policy ratios, so the clipping is active: old log-probs moved by noise.
    torch.manual_seed(1)
    noise = 0.3 * torch.randn(output["completion_ids"].shape)
    for inputs in (output, plain):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].shape[1],
        )
        inputs["old_per_token_logps"] = logps.detach() + noise
    loss = trainer.compute_loss(trainer.model, output)
    by_hand = trainer.compute_loss(trainer.model, {**plain, "advantages": hand_scaled})
    unscaled = trainer.compute_loss(trainer.model, plain)
    assert torch.allclose(loss, by_hand, rtol=1e-6, atol=1e-8)
    assert torch.allclose(loss, _hand_loss(trainer, plain, hand_scaled), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(loss, unscaled)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"])
def test_callback_with_unit_weights_leaves_every_loss_type_unchanged(tmp_path, loss_type):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path, args={"loss_type": loss_type})
    callback = NTHRCallback(trainer, beta=0.0, eta=1.0)
    trainer.add_callback(callback)
    output = _generate(trainer)
    assert output["advantages"].dim() == 2 and (callback.last_weights == 1).all()
    callback.remove()
    plain = _generate(trainer)
    assert torch.equal(output["completion_ids"], plain["completion_ids"])
    loss = trainer.compute_loss(trainer.model, output)
    assert torch.allclose(loss, trainer.compute_loss(trainer.model, plain), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("args", "source", "path"),
    [
        ({}, "auto", "generation"),
        ({}, "forward", "forward"),
        ({"num_iterations": 2}, "auto", "old_logps"),
        ({"steps_per_generation": 2}, "old_logps", "old_logps"),
        ({"num_iterations": 2}, "generation", "generation"),
    ],
)
def test_every_hidden_source_gives_the_weights_of_an_independent_forward(tmp_path, args, source, path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path, args=args)
    callback = NTHRCallback(trainer, beta=0.0, eta=0.25, hidden_source=source)
    trainer.add_callback(callback)
    output = _generate(trainer)
    assert callback.last_path == path
    callback.remove()
    plain = _generate(trainer)["advantages"]
    weights = _reference_weights(trainer, output, plain, beta=0.0, eta=0.25)
    assert torch.equal(callback.last_weights, weights)
    assert callback.records[-1]["path"] == path


def test_forcing_an_unavailable_hidden_source_fails_clearly(tmp_path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path)
    trainer.add_callback(NTHRCallback(trainer, hidden_source="old_logps"))
    with pytest.raises(RuntimeError, match="hidden_source='old_logps' is not available"):
        _generate(trainer)


def test_weights_stay_aligned_through_shuffle_split_iterations_and_accumulation(tmp_path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(
        tmp_path,
        args={
            "num_iterations": 2,
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": GROUP_SIZE,
            "beta": 0.05,
            "max_steps": 4,
        },
    )
    callback = NTHRCallback(trainer, beta=0.0, eta=0.5)
    trainer.add_callback(callback)
    expected, seen = {}, []
    wrapped_generate, wrapped_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def keep_generation_batch(inputs):
        output = wrapped_generate(inputs)
        for row in range(output["completion_ids"].shape[0]):
            key = (tuple(output["prompt_ids"][row].tolist()), tuple(output["completion_ids"][row].tolist()))
            expected.setdefault(key, []).append(output["advantages"][row].clone())
        return output

    def keep_micro_batch(model, inputs):
        seen.append(inputs)
        return wrapped_loss(model, inputs)

    trainer._generate_and_score_completions = keep_generation_batch
    trainer._compute_loss = keep_micro_batch
    trainer.train()
    assert len(callback.records) == 2  # 4 optimizer steps, generation every num_iterations = 2 steps
    assert len(seen) == 8 and all(inputs["advantages"].shape == inputs["completion_ids"].shape for inputs in seen)
    for inputs in seen:
        for row in range(inputs["completion_ids"].shape[0]):
            key = (tuple(inputs["prompt_ids"][row].tolist()), tuple(inputs["completion_ids"][row].tolist()))
            assert any(torch.equal(inputs["advantages"][row], candidate) for candidate in expected[key])
    assert any((inputs["advantages"] != inputs["advantages"][:, :1]).any() for inputs in seen)  # some rows reweighted
    logged = [entry for entry in trainer.state.log_history if "nthr/frac_downweighted" in entry]
    assert logged and all(0 <= entry["nthr/time_fraction"] < 1 for entry in logged)


def test_records_carry_the_documented_fields_and_go_to_record_fn(tmp_path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path)
    received = []
    trainer.add_callback(NTHRCallback(trainer, record_fn=received.append))
    trainer.train()
    assert len(received) == 2
    documented = {"frac_downweighted", "tau", "eta", "s_neg_mean", "num_groups", "num_mixed_groups", "seconds"}
    for record in received:
        assert record["type"] == "nthr" and record["schema_version"] == 2
        assert documented <= set(record) and record["path"] == "generation"
        assert record["num_groups"] == NUM_PROMPTS
    assert [record["step"] for record in received] == [0, 1]
    assert received[1]["time_fraction"] is not None


def test_measure_only_mode_leaves_the_advantages_unchanged(tmp_path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path)
    callback = NTHRCallback(trainer, beta=0.0, eta=0.0, apply=False)
    trainer.add_callback(callback)
    output = _generate(trainer)
    assert output["advantages"].dim() == 1 and callback.last_stats.num_downweighted > 0


def test_every_generation_n_reweights_every_nth_generation_batch(tmp_path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path)
    callback = NTHRCallback(trainer, beta=0.0, every_generation=2)
    trainer.add_callback(callback)
    dims = [_generate(trainer, seed)["advantages"].dim() for seed in range(3)]
    assert dims == [2, 1, 2] and len(callback.records) == 2


def test_evaluation_batches_are_left_alone(tmp_path):
    from trl_ntk.integration.nthr import NTHRCallback

    trainer = _grpo_trainer(tmp_path)
    trainer.add_callback(NTHRCallback(trainer, beta=0.0))
    trainer.model.eval()
    output = trainer._generate_and_score_completions(_generation_inputs(trainer))
    assert output["advantages"].dim() == 1


def test_nthr_grpo_trainer_trains_with_its_options(tmp_path):
    from trl_ntk.integration.nthr import NTHRConfig, NTHRGRPOTrainer

    trainer = _grpo_trainer(tmp_path, trainer_class=NTHRGRPOTrainer, nthr_config=NTHRConfig(beta=0.0, eta=0.5))
    trainer.train()
    assert trainer.nthr_callback.config.eta == 0.5 and len(trainer.nthr_callback.records) == 2
    assert trainer.nthr_callback in trainer.callback_handler.callbacks


def test_callback_refuses_other_trainers_versions_and_a_second_install(tmp_path, monkeypatch):
    import trl

    from trl_ntk.integration.nthr import NTHRCallback

    with pytest.raises(TypeError, match="needs a trl.GRPOTrainer"):
        NTHRCallback(object())
    trainer = _grpo_trainer(tmp_path)
    NTHRCallback(trainer)
    with pytest.raises(RuntimeError, match="already has an NTHRCallback"):
        NTHRCallback(trainer)
    monkeypatch.setattr(trl, "__version__", "0.9.6")
    with pytest.raises(RuntimeError, match=r"found trl 0\.9\.6"):
        NTHRCallback(trainer)


_DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_nthr
from trl_ntk.integration.nthr import NTHRCallback
test_nthr.NUM_PROMPTS = 1
out = Path({out!r})
# 2 completions per rank, groups of 4: every group spans both ranks
trainer = test_nthr._grpo_trainer(out, args={{"per_device_train_batch_size": 2, "max_steps": 3, "seed": 1}})
callback = NTHRCallback(trainer, beta=0.0, eta=0.5)
trainer.add_callback(callback)
stats = []
wrapped = trainer._generate_and_score_completions
def keep(inputs):
    output = wrapped(inputs)
    stats.append(callback.last_stats.as_tuple())
    return output
trainer._generate_and_score_completions = keep
trainer.train()
rank = trainer.accelerator.process_index
(out / f"rank{{rank}}.json").write_text(json.dumps({{"stats": stats, "records": callback.records}}))
"""


@pytest.mark.distributed
def test_callback_under_two_processes_counts_groups_that_span_ranks_once(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_nthr.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    path = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    log = tmp_path / "ddp.log"
    with open(log, "w") as stream:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
            env={**os.environ, "PYTHONPATH": path},
            stdout=stream,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert result.returncode == 0, log.read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["stats"] == ranks[1]["stats"] and len(ranks[0]["stats"]) == 3
    assert ranks[1]["records"] == [] and len(ranks[0]["records"]) == 3
    assert all(record["num_groups"] == 1 for record in ranks[0]["records"])


def test_a_capture_that_disagrees_with_the_policy_falls_back_to_the_forward(tmp_path, monkeypatch, caplog):
    from trl_ntk.integration import nthr

    hook = nthr._HiddenCapture._hook

    def skewed(self, module, args, output):
        hook(self, module, args, output)
        if self.mode == "generation":
            self.generation_steps[-1] = 3 * self.generation_steps[-1]

    monkeypatch.setattr(nthr._HiddenCapture, "_hook", skewed)
    trainer = _grpo_trainer(tmp_path)
    callback = nthr.NTHRCallback(trainer, beta=0.0)
    trainer.add_callback(callback)
    with caplog.at_level("WARNING", logger="trl_ntk.integration.nthr"):
        _generate(trainer)
    assert callback.last_path == "forward" and "'generation' path" in caplog.text
    _generate(trainer, seed=1)
    assert callback.last_path == "forward" and callback._rejected_paths == {"generation"}
