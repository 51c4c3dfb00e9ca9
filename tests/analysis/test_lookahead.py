"""Look-ahead scores against independent references: the trainer's own `.grad` with autograd probe gradients
(float64), and the observed change of the probe log-probs after really taking the step (SGD and AdamW)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.trainer_factory import dpo_trainer, sft_trainer
from trl_ntk.analysis import lookahead
from trl_ntk.integration.lookahead import _default_probes, _inputs, score_trainer

FACTORIES = {"dpo": dpo_trainer, "sft": sft_trainer}


# ----------------------------------------------------------------------------------------------- references
def _probe_objectives(model, batch, weights) -> torch.Tensor:
    """`[R]` `weights @ lp~` with the log-probs from the model's own logits (no package code)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logprobs = torch.log_softmax(logits.double(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return weights.to(logprobs) @ logprobs[batch.target_mask[:, 1:]]


def _probes(trainer, kind):
    model = trainer.model
    encoded = _default_probes(trainer, kind).select(["chosen", "rejected", "completion", "irrelevant_train"])
    encoded = encoded.encode(trainer.processing_class)
    names, weights = lookahead.probe_weights(encoded, by="kind")
    return encoded, encoded.batch.to(next(model.parameters()).device), names, weights


def _example_grad(trainer, row: int) -> dict[str, torch.Tensor]:
    """The trainer's own `.grad` of its loss on example `row` alone."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, _inputs(trainer, [row], next(model.parameters()).device)).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def rank(x: torch.Tensor) -> torch.Tensor:
        return x.argsort().argsort().double()

    ra, rb = rank(a) - rank(a).mean(), rank(b) - rank(b).mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _check_accuracy(predicted: torch.Tensor, observed: torch.Tensor, names: list[str]) -> None:
    """Spearman >= 0.9 and 10% relative error on effects above 10% of the largest one, per objective."""
    for col, name in enumerate(names):
        pred, obs = predicted[:, col], observed[:, col]
        assert _spearman(pred, obs) >= 0.9, (name, _spearman(pred, obs))
        large = obs.abs() >= 0.1 * obs.abs().max()
        relative = ((pred - obs).abs() / obs.abs())[large]
        assert relative.max() <= 0.1, (name, float(relative.max()))


# ----------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_example_effects_match_trainer_grad_and_autograd_probe_gradient_float64(tmp_path, kind):
    trainer = FACTORIES[kind](tmp_path, n=6, dtype=torch.float64)
    model = trainer.model.eval()
    encoded, probe_batch, names, weights = _probes(trainer, kind)
    lr = 1e-3
    result = score_trainer(trainer, _default_probes(trainer, kind).select(names), batch_size=1, lr=lr, jvp_rows=3)
    assert result.effects.names == names
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for col in range(len(names)):
        objective = _probe_objectives(model, probe_batch, weights)[col]
        probe_grads = dict(zip(named, torch.autograd.grad(objective, list(named.values()))))
        for row in range(6):
            grads = _example_grad(trainer, row)
            expected = -lr * sum(float((grads[n] * probe_grads[n]).sum()) for n in grads)
            got = float(result.effects.total[row, col])
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-9), (names[col], row)
    split = result.effects.positive + result.effects.negative
    torch.testing.assert_close(split, result.effects.total)
    if kind == "sft":
        assert torch.all(result.effects.negative == 0)  # SFT only pulls its tokens up


def test_batched_scores_sum_to_the_batch_step_and_joined_jvps_change_nothing(tmp_path):
    trainer = dpo_trainer(tmp_path, n=6, dtype=torch.float64)
    probes = _default_probes(trainer, "dpo").select(["chosen", "rejected"])
    joined = score_trainer(trainer, probes, batch_size=3, jvp_rows=64, lr=1e-3)
    single = score_trainer(trainer, probes, batch_size=3, jvp_rows=1, lr=1e-3)
    torch.testing.assert_close(joined.effects.total, single.effects.total, rtol=1e-9, atol=1e-12)
    encoded = probes.encode(trainer.processing_class)
    _, weights = lookahead.probe_weights(encoded)
    model = trainer.model.eval()
    objective = _probe_objectives(model, encoded.batch, weights)
    params = [p for p in model.parameters() if p.requires_grad]
    for col in range(2):
        probe_grads = torch.autograd.grad(objective[col], params, retain_graph=True)
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, _inputs(trainer, [0, 1, 2], torch.device("cpu"))).backward()
        expected = -1e-3 * sum(float((p.grad * g).sum()) for p, g in zip(params, probe_grads))
        assert float(joined.effects.total[:3, col].sum()) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------- accuracy
def _observed(trainer, rows, probe_batch, weights, take_step) -> torch.Tensor:
    """`[N, R]` observed change of the probe objectives after one real step on each example alone."""
    model = trainer.model
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = _probe_objectives(model, probe_batch, weights)
    out = []
    for row in rows:
        take_step(row)
        with torch.no_grad():
            out.append(_probe_objectives(model, probe_batch, weights) - before)
            for n, p in model.named_parameters():
                p.copy_(saved[n])
    return torch.stack(out)


def _sgd_accuracy(tmp_path, kind: str, n: int) -> None:
    trainer = FACTORIES[kind](tmp_path, n=n, dtype=torch.float64)
    model = trainer.model.eval()
    encoded, probe_batch, names, weights = _probes(trainer, kind)
    lr = 1e-5
    result = score_trainer(trainer, _default_probes(trainer, kind).select(names), batch_size=1, lr=lr)

    def sgd_step(row: int) -> None:
        grads = _example_grad(trainer, row)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in grads:
                    p -= lr * grads[name]

    observed = _observed(trainer, range(n), probe_batch, weights, sgd_step)
    _check_accuracy(result.effects.total, observed, names)


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_sgd_prediction_matches_the_real_step_on_each_example(tmp_path, kind):
    _sgd_accuracy(tmp_path, kind, n=16)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_sgd_prediction_matches_the_real_step_on_50_examples(tmp_path, kind):
    _sgd_accuracy(tmp_path, kind, n=50)


def _adam_accuracy(
    tmp_path, kind: str, n: int, warm_steps: int, share: float, view: str = "adam"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam view vs the real AdamW step from a state trained for `warm_steps` steps, the example's gradient taken with
    weight `share` (1: a step on the example alone). Returns `(predicted, observed)` scaled back by `1 / share`."""
    trainer = FACTORIES[kind](
        tmp_path,
        n=n,
        dtype=torch.float64,
        optim="adamw_torch",
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        per_device_train_batch_size=1,
        max_steps=warm_steps,
    )
    trainer.train()
    model = trainer.model.eval()
    optimizer = trainer.optimizer.optimizer
    encoded, probe_batch, names, weights = _probes(trainer, kind)
    result = score_trainer(trainer, _default_probes(trainer, kind).select(names), view=view)
    assert result.meta["view"] == view and result.meta["optimizer_step"] == warm_steps
    state = copy.deepcopy(optimizer.state_dict())

    def adam_step(row: int | None) -> None:
        grads = _example_grad(trainer, row) if row is not None else {}
        for name, p in model.named_parameters():
            p.grad = share * grads[name] if name in grads else torch.zeros_like(p)
        optimizer.step()
        optimizer.load_state_dict(copy.deepcopy(state))

    history = _observed(trainer, [None], probe_batch, weights, adam_step)[0]
    observed = (_observed(trainer, range(n), probe_batch, weights, adam_step) - history) / share
    for col, name in enumerate(names):
        assert result.meta["history_effect"][name] == pytest.approx(float(history[col]), rel=0.02, abs=1e-12)
    return result.effects.total, observed


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_adam_view_ranks_real_adamw_steps_on_one_example_alone(tmp_path, kind):
    """A step on one example alone also raises Adam's second moment where that example's gradient is large (its
    `(1 - b2) g^2` term), so the real step is smaller than the tangent at `g -> 0`: up to about 40% smaller (DPO and
    SFT) on the toy after 32 steps. The ranking holds."""
    predicted, observed = _adam_accuracy(tmp_path, kind, n=16, warm_steps=32, share=1.0)
    for col in range(predicted.shape[1]):
        assert _spearman(predicted[:, col], observed[:, col]) >= 0.9
        large = observed[:, col].abs() >= 0.1 * observed[:, col].abs().max()
        ratio = (observed[:, col] / predicted[:, col])[large]
        assert torch.all((ratio > 0.5) & (ratio <= 1.05)), ratio


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_exact_adam_view_matches_real_adamw_steps_on_one_example_alone(tmp_path, kind):
    """The optimizer's exact step on the example's own gradient (its `g^2` in `v_t` included), linear in the probe."""
    predicted, observed = _adam_accuracy(tmp_path, kind, n=16, warm_steps=32, share=1.0, view="adam_exact")
    _check_accuracy(predicted, observed, [str(c) for c in range(predicted.shape[1])])


# ---------------------------------------------------------------------------------------- ranking, curation, output
def test_ranks_order_effects_most_harmful_first():
    total = torch.tensor([[0.3, -1.0], [-0.2, 2.0], [0.1, 0.0]])
    effects = lookahead.ExampleEffects(["a", "b"], total, total.clamp(min=0), total.clamp(max=0))
    assert effects.ranks().tolist() == [[3, 1], [1, 3], [2, 2]]


def test_curate_drops_or_downweights_the_most_harmful_rows():
    from datasets import Dataset

    data = Dataset.from_dict({"x": list(range(10))})
    total = torch.tensor([0.5, -3.0, 0.1, -1.0, 0.2, 0.3, -0.1, 0.4, 0.6, 0.7])[:, None]
    effects = lookahead.ExampleEffects(["chosen"], total, total, torch.zeros_like(total))
    assert lookahead.harmful_examples(effects, "chosen", 0.2) == [1, 3]
    assert lookahead.curate(data, effects, "chosen", fraction=0.2)["x"] == [0, 2, 4, 5, 6, 7, 8, 9]
    weighted = lookahead.curate(data, effects, "chosen", fraction=0.2, mode="downweight", repeat=3)["x"]
    assert weighted.count(1) == 1 and weighted.count(3) == 1 and weighted.count(0) == 3 and len(weighted) == 26
    with pytest.raises(ValueError, match="unknown probe objective"):
        lookahead.curate(data, effects, "rejected")


def test_adam_view_refuses_an_optimizer_without_state():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="has not stepped yet"):
        lookahead.adam_view(torch.optim.AdamW(model.parameters()), model)


def test_jsonl_records_and_cli_on_the_toy(tmp_path):
    from trl_ntk.cli import main

    assert main(["lookahead", "--trainer", "sft", "--output-dir", str(tmp_path), "--max-examples", "5"]) == 0
    assert "Most harmful for" in (tmp_path / "lookahead.html").read_text()
    lines = [json.loads(line) for line in (tmp_path / "lookahead.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "lookahead_run" and lines[0]["view"] == "sgd" and lines[0]["trainer"] == "sft"
    examples = lines[1:]
    assert [r["index"] for r in examples] == list(range(5))
    for objective in lines[0]["objectives"]:
        assert sorted(r["rank"][objective] for r in examples) == [1, 2, 3, 4, 5]
        for r in examples:
            split = r["positive_gradient"][objective] + r["negative_gradient"][objective]
            assert split == pytest.approx(r["effect"][objective], rel=1e-6, abs=1e-12)


def test_report_section_shows_the_most_harmful_and_helpful_examples_with_their_text(tmp_path):
    from trl_ntk.integration.lookahead import LookaheadResult
    from trl_ntk.report.lookahead import build_lookahead_report, lookahead_panel

    total = torch.tensor([[0.5, 1.0], [-3.0, 0.0], [0.1, -2.0], [2.0, 0.5]], dtype=torch.float64)
    effects = lookahead.ExampleEffects(["chosen", "rejected"], total, total.clamp(min=0), total.clamp(max=0))
    texts = [{"prompt": f"question {i}", "chosen": f"answer <{i}>"} for i in range(4)]
    result = LookaheadResult(effects, [10, 11, 12, 13], texts, {"view": "sgd", "trainer": "dpo"})
    page = build_lookahead_report(result.write_jsonl(tmp_path / "lookahead.jsonl")).read_text()
    harmful, helpful = page.index("Most harmful for chosen"), page.index("Most helpful for chosen")
    assert harmful < page.index("answer &lt;1&gt;") < helpful < page.index("answer &lt;3&gt;")
    assert (
        page.index("answer &lt;3&gt;") < page.index("answer &lt;0&gt;") < page.index("<h3>Distribution of the effects")
    )
    assert "1 of 4 examples are predicted to lower it" in page
    panel = lookahead_panel(result.records(), "rejected", top=1).html()
    assert "answer &lt;2&gt;" in panel and "answer &lt;1&gt;" not in panel and "answer &lt;0&gt;" in panel


def test_parquet_table_holds_the_effects_ranks_and_text(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from trl_ntk.integration.lookahead import LookaheadResult

    total = torch.tensor([[0.5], [-3.0], [0.1]], dtype=torch.float64)
    effects = lookahead.ExampleEffects(["chosen"], total, total.clamp(min=0), total.clamp(max=0))
    result = LookaheadResult(effects, [4, 5, 6], [{"prompt": "a"}, {"prompt": "b"}, {}], {"view": "adam"})
    table = pd.read_parquet(result.write_parquet(tmp_path / "la.parquet"))
    assert table["index"].tolist() == [4, 5, 6] and table["rank_chosen"].tolist() == [3, 1, 2]
    assert table["effect_chosen"].tolist() == [0.5, -3.0, 0.1] and table["negative_chosen"].tolist() == [0, -3.0, 0]
    assert table["text_prompt"].tolist()[:2] == ["a", "b"]
