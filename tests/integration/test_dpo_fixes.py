"""The DPO fixes: the extended SFT dataset, and NTHR for DPO, whose gradient must equal a hand-weighted reference
(the NTHR weights, computed directly from the model's own full forward, applied to per-token log-prob gradients
computed by autograd) for every supported `loss_type`, and which refuses the others with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_exactness_matrix import dpo, tiny_model
from trl_ntk.demo import toy
from trl_ntk.integration.dpo_fixes import (
    REFUSED_LOSS_TYPES,
    SUPPORTED_LOSS_TYPES,
    DPONTHRCallback,
    extended_sft_dataset,
)
from trl_ntk.ntk.nthr import token_weights

BETA, ETA = 0.0, 0.25  # tau = 0: every rejected token with a positive hidden reward is down-weighted


# ---------------------------------------------------------------------------------------------- dataset extension
def test_extended_sft_dataset_holds_every_chosen_and_rejected_response_once():
    preferences = toy.preference_dataset(n=6, seed=0)
    extended = extended_sft_dataset(preferences)
    assert set(extended.column_names) == {"prompt", "completion", "source"}
    expected = sorted(json.dumps([r["prompt"], r[s], s]) for r in preferences for s in ("chosen", "rejected"))
    assert sorted(json.dumps([r["prompt"], r["completion"], r["source"]]) for r in extended) == expected
    only_rejected = extended_sft_dataset(preferences, include_chosen=False, shuffle_seed=None)
    assert [r["completion"] for r in only_rejected] == [r["rejected"] for r in preferences]


def test_extended_sft_dataset_trains_with_sft_trainer(tmp_path):
    from trl import SFTConfig, SFTTrainer

    data = extended_sft_dataset(toy.preference_dataset(n=4, seed=0))
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        max_length=96,
        disable_tqdm=True,
    )
    tokenizer = toy.model_and_tokenizer(warmup="pretrain")[1]
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.train().training_loss > 0


# ------------------------------------------------------------------------------------------------- NTHR for DPO
def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _gradient(trainer, batch, keep_log_probs: list | None = None) -> list[torch.Tensor]:
    """The parameters' `.grad` after the trainer's own loss and backward on `batch`."""
    model = trainer.model
    model.zero_grad()
    handle = None
    if keep_log_probs is not None:

        def keep(module, args, kwargs, output):
            if kwargs.get("fused_lm_head") and output.log_probs.requires_grad:
                output.log_probs.retain_grad()
                keep_log_probs.append(output.log_probs)

        handle = model.register_forward_hook(keep, with_kwargs=True)
    trainer.compute_loss(model, batch).backward()
    if handle is not None:
        handle.remove()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _reference(trainer, batch, coeffs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`grad sum_l w_l c_l lp_l` by autograd from the model's full forward, with `w` from `token_weights` on the
    full forward's hidden states and logits (pairs as groups of two); and `w`."""
    model = trainer.model
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    targets = labels != -100
    out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    logits, hidden = out.logits[:, :-1], out.hidden_states[-1][:, :-1]
    pairs = input_ids.shape[0] // 2
    order = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], 1).flatten()
    weights = token_weights(
        hidden[order].detach(),
        logits[order].detach(),
        labels.clamp(min=0)[order],
        targets[order],
        torch.tensor([1.0, -1.0]).repeat(pairs),
        2,
        beta=BETA,
        eta=ETA,
        vocab="group",
    )
    weights = torch.empty_like(weights).index_copy_(0, order, weights)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    objective = (coeffs * weights * lp)[targets].sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(objective, params)), weights


@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
def test_dpo_nthr_gradient_equals_the_hand_weighted_reference(tmp_path, loss_type):
    options = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
    trainer = dpo(tmp_path, tiny_model("llama"), loss_type=[loss_type], **options)
    trainer.model.train()
    batch = _batch(trainer)
    kept: list = []
    plain = _gradient(trainer, batch, kept)
    coeffs = kept[0].grad.detach()  # dL/d lp_l of the unweighted loss: one coefficient per rejected response
    callback = DPONTHRCallback(trainer, beta=BETA, eta=ETA)
    fixed = _gradient(trainer, batch)
    callback.remove()
    reference, weights = _reference(trainer, batch, coeffs)
    rejected = torch.zeros_like(weights, dtype=torch.bool)
    rejected[weights.shape[0] // 2 :] = True
    assert bool((weights[~rejected] == 1).all()) and bool((weights[rejected] == ETA).any())
    assert callback.stats.num_downweighted == int((weights == ETA).sum())
    norm = torch.sqrt(sum((r.double() ** 2).sum() for r in reference))
    error = torch.sqrt(sum(((f - r).double() ** 2).sum() for f, r in zip(fixed, reference, strict=True)))
    change = torch.sqrt(sum(((f - p).double() ** 2).sum() for f, p in zip(fixed, plain, strict=True)))
    assert norm > 0 and error <= 1e-5 * norm, (float(error), float(norm))
    assert change > 1e3 * error  # the reweighting moved the gradient far more than the reference's tolerance


@pytest.mark.parametrize("loss_type", sorted(REFUSED_LOSS_TYPES))
def test_dpo_nthr_refuses_loss_types_whose_gradient_does_not_factor_per_pair(tmp_path, loss_type):
    trainer = dpo(tmp_path, tiny_model("llama"), loss_type=[loss_type])
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}'"):
        DPONTHRCallback(trainer)


def test_dpo_nthr_refuses_ld_alpha_and_auto_eta(tmp_path):
    trainer = dpo(tmp_path, tiny_model("llama"), ld_alpha=0.5)
    with pytest.raises(ValueError, match="ld_alpha"):
        DPONTHRCallback(trainer)
    trainer = dpo(tmp_path, tiny_model("llama"))
    with pytest.raises(ValueError, match="eta='auto'"):
        DPONTHRCallback(trainer, eta="auto")


def test_dynamics_callback_explains_the_reweighted_update_exactly(tmp_path):
    """The capture records the scaled `dL/d lp` (the reweighting hook is prepended, so it runs first even when the
    capture's hooks were installed earlier): the gradient check against the trainer's `.grad` and the predictions
    stay exact."""
    import json
    from pathlib import Path

    from tests.integration.test_exactness_matrix import assert_exact
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    trainer = dpo(tmp_path, tiny_model("llama"))
    dynamics = LearningDynamicsCallback(trainer, every_n_steps=1, attribution="sums", num_prompts=2, generate=False)
    nthr = DPONTHRCallback(trainer, beta=BETA, eta=ETA)
    trainer.add_callback(dynamics)
    trainer.add_callback(nthr)
    trainer.train()
    path = Path(trainer.args.output_dir) / "dynamics" / "dynamics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert nthr.stats.num_downweighted > 0
    assert_exact(records)
