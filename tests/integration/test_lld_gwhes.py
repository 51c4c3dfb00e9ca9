"""GWHES in the `lld` records of a GRPO run, against the paper's `alpha`-weighted form (`trl_ntk.ntk.gwhes.gwhes`
with `logits`) computed directly from the model's own full forward (`output_hidden_states=True`, its logits) on the
inputs the trainer's `compute_loss` received, at the same weights (before the optimizer step)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.integration.test_exactness_matrix import grpo, run, tiny_model
from trl_ntk.ntk import gwhes


def _reference_scores(trainer, aggregation: str) -> list[list[dict[str, float]]]:
    """Wrap `trainer.compute_loss`: per call, GWHES of each group (the rows of one prompt, numbered in order of first
    appearance), computed directly."""
    calls: list[list[dict[str, float]]] = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        prompt, completion = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"]
        with torch.no_grad():
            out = trainer.model(
                input_ids=torch.cat([prompt, completion], 1),
                attention_mask=torch.cat([inputs["prompt_mask"], mask], 1),
                output_hidden_states=True,
            )
        hidden = out.hidden_states[-1][:, prompt.shape[1] - 1 : -1]
        logits = out.logits[:, prompt.shape[1] - 1 : -1].float()
        groups: dict[tuple, list[int]] = {}  # TRL shuffles the rows: a group is the rows of one prompt
        for row in range(prompt.shape[0]):
            groups.setdefault(tuple(prompt[row][inputs["prompt_mask"][row].bool()].tolist()), []).append(row)
        per_group = []
        for rows in groups.values():
            scores = gwhes.gwhes(
                hidden[rows],
                mask[rows],
                inputs["advantages"][rows],
                len(rows),
                aggregation=aggregation,
                logits=logits[rows],
                completion_ids=completion[rows],
                temperature=trainer.args.temperature,
            )
            names = ("gwhes", "gwhes_negative", "gwhes_positive")
            per_group.append(dict(zip(names, map(float, (scores.gwhes, scores.negative, scores.positive)))))
        calls.append(per_group)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return calls


@pytest.mark.parametrize(("loss_type", "aggregation"), [("grpo", "sequence_mean"), ("dapo", "token_sum")])
def test_lld_records_carry_the_gwhes_of_a_direct_computation(tmp_path, loss_type, aggregation):
    """`loss_type="grpo"` averages each completion's tokens (`W_j = S_j / |y_j|`), `"dapo"` sums them."""
    trainer = grpo(tmp_path, tiny_model("llama"), beta=0.0, max_steps=2, loss_type=loss_type)
    calls = _reference_scores(trainer, aggregation)
    records, _ = run(trainer)
    lld = [r for r in records if r["type"] == "lld"]
    steps = sorted({r["step"] for r in lld})
    assert len(steps) == len(calls) == 2
    compared = 0
    for step, reference in zip(steps, calls, strict=True):
        for record in (r for r in lld if r["step"] == step):
            expected = reference[record["group"]]
            if math.isnan(expected["gwhes"]):
                assert record["gwhes"] is None and record["gwhes_negative"] is None
                continue
            for name, value in expected.items():
                assert math.isclose(record[name], value, rel_tol=1e-4, abs_tol=1e-5), (name, record[name], value)
            assert math.isclose(record["gwhes"], record["gwhes_negative"] - record["gwhes_positive"], rel_tol=1e-6)
            compared += 1
    assert compared >= 2
