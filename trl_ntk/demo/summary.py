"""The demo's summary of a run folder: each probe kind's start / end / peak, the summed prediction splits, LLD, the
checks of the expected effects, and the printed table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trl_ntk.report.render import kind_means, load_run


def _series_summary(series: tuple[list[int], list[float]]) -> dict[str, Any]:
    steps, values = series
    peak = max(range(len(values)), key=values.__getitem__)
    return {
        "logp_start": values[0],
        "logp_end": values[-1],
        "logp_peak": values[peak],
        "peak_step": steps[peak],
        "start_step": steps[0],
        "end_step": steps[-1],
    }


def _summed_over_steps(records: Sequence[Mapping[str, Any]], path: str) -> dict[str, float]:
    """kind -> sum over analysed steps of the mean of `path` over the kind's probes."""
    return {kind: float(sum(values)) for kind, (_, values) in kind_means(records, path).items()}


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Start / end / peak of every probe kind's mean log-prob and argmax log-prob, and the predicted change split
    into its positive- and negative-gradient parts (summed over the analysed steps), from a run's `dynamics.jsonl`.
    """
    data = load_run(run_dir, progress=False)
    probes = data.of("probe")
    dynamics = data.of("dynamics")
    logp = kind_means(probes, "logp_sum")
    argmax = kind_means(probes, "argmax_logp")
    split_positive = _summed_over_steps(dynamics, "split.positive")
    split_negative = _summed_over_steps(dynamics, "split.negative")
    predicted = _summed_over_steps(dynamics, "predicted")
    observed = _summed_over_steps(dynamics, "observed")
    kinds: dict[str, Any] = {}
    for kind in data.kinds:
        if kind not in logp:
            continue
        entry = _series_summary(logp[kind])
        entry.update({f"argmax_{k}": v for k, v in _series_summary(argmax[kind]).items() if k.startswith("logp_")})
        if kind in split_positive:
            entry.update(
                split_positive=split_positive[kind],
                split_negative=split_negative[kind],
                predicted=predicted[kind],
                observed=observed[kind],
            )
        kinds[kind] = entry
    summary: dict[str, Any] = {
        "kinds": kinds,
        "analysed_steps": len({int(r["step"]) for r in dynamics}),
        "scored_steps": len({int(r["step"]) for r in probes}),
    }
    reference = "chosen" if "chosen" in argmax else "completion" if "completion" in argmax else None
    if reference is not None:
        top = _series_summary(argmax[reference])
        summary.update(
            argmax_kind=reference,
            argmax_logp_start=top["logp_start"],
            argmax_logp_end=top["logp_end"],
            argmax_logp_peak=top["logp_peak"],
            argmax_peak_step=top["peak_step"],
        )
    lld = data.of("lld")
    if lld:
        observed_deltas = [r["delta_observed"] for r in lld if r.get("delta_observed") is not None]
        summary["lld"] = {
            "groups": len(lld),
            "delta_observed_mean": _mean(observed_deltas),
            "frac_groups_negative": _mean([float(d < 0) for d in observed_deltas]),
            "frac_groups_nonpositive": _mean([float(d <= 0) for d in observed_deltas]),
            "delta_predicted_mean": _mean([r["delta_predicted"] for r in lld if r.get("delta_predicted") is not None]),
            "delta_from_negative_mean": _mean(
                [r["delta_from_negative"] for r in lld if r.get("delta_from_negative") is not None]
            ),
        }
    nthr = data.of("nthr")
    if nthr:
        summary["nthr_stats"] = {
            "batches": len(nthr),
            "frac_downweighted_mean": _mean([r["frac_downweighted"] for r in nthr]),
            "seconds": float(sum(r.get("seconds") or 0.0 for r in nthr)),
            "paths": {path: sum(r.get("path") == path for r in nthr) for path in sorted({r.get("path") for r in nthr})},
        }
    summary["checks"] = checks(summary, data.of("run")[-1].get("trainer") if data.of("run") else None)
    return summary


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _change(kinds: Mapping[str, Any], kind: str) -> float | None:
    entry = kinds.get(kind)
    return None if entry is None else entry["logp_end"] - entry["logp_start"]


def checks(summary: Mapping[str, Any], trainer: str | None) -> dict[str, bool]:
    """The signature of each demo as named booleans (kinds that did not run are left out)."""
    kinds = summary["kinds"]
    change = {kind: _change(kinds, kind) for kind in kinds}
    out: dict[str, bool] = {}
    if trainer == "dpo" and "chosen" in kinds and "rejected" in kinds:
        chosen = kinds["chosen"]
        out["rejected_falls_more_than_chosen"] = change["rejected"] < change["chosen"]
        out["chosen_end_below_start"] = change["chosen"] < 0
        for kind in ("chosen_rephrase", "rejected_rephrase", "chosen_swapped", "irrelevant_train", "irrelevant_test"):
            if kind in change:
                out[f"{kind}_falls"] = change[kind] < 0
        if "argmax_logp_peak" in summary:
            out["argmax_peak_above_start"] = summary["argmax_logp_peak"] > summary["argmax_logp_start"]
        if "greedy" in change:
            out["greedy_end_above_start"] = change["greedy"] > 0
        if "split_negative" in chosen:
            out["negative_gradient_dominates_chosen_fall"] = chosen["split_negative"] < 0 and -chosen[
                "split_negative"
            ] > max(chosen["split_positive"], 0.0)
    elif trainer == "sft" and "chosen" in kinds:
        # Similar responses (same wording: the swapped fact, other training prompts' answers) rise less than chosen;
        # text in wording SFT does not train (the toy's rephrases) and shuffled text fall. (`irrelevant_test`, a
        # held-out prompt's answer, goes either way with the seed.)
        out["chosen_rises"] = change["chosen"] > 0
        for kind in ("chosen_swapped", "irrelevant_train"):
            if kind in change:
                out[f"{kind}_rises_less_than_chosen"] = 0 < change[kind] < change["chosen"]
        for kind in ("chosen_rephrase", "shuffled_chosen", "shuffled_irrelevant"):
            if kind in change:
                out[f"{kind}_falls"] = change[kind] < 0
    elif trainer == "grpo" and "lld" in summary:
        out["some_groups_displaced"] = (summary["lld"]["frac_groups_negative"] or 0.0) > 0
    return out


def nthr_checks(plain: Mapping[str, Any], nthr: Mapping[str, Any]) -> dict[str, bool]:
    """GRPO + NTHR against plain GRPO (same seed): less lazy likelihood displacement of the correct completions."""
    plain_lld, nthr_lld = plain.get("lld") or {}, nthr.get("lld") or {}
    if plain_lld.get("delta_observed_mean") is None or nthr_lld.get("delta_observed_mean") is None:
        return {}
    return {
        "nthr_raises_mean_delta": nthr_lld["delta_observed_mean"] > plain_lld["delta_observed_mean"],
        "nthr_fewer_displaced_groups": nthr_lld["frac_groups_negative"] < plain_lld["frac_groups_negative"],
    }


def squeeze_figures(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """A DPO run's squeezing figures (summed log-probs, nats, mean over the probe prompts): chosen and rejected end
    minus start, the teacher-forced argmax gain (end minus start), the chosen end, and the margin `chosen - rejected`
    at the end and its change."""
    kinds = summary["kinds"]
    chosen, rejected = kinds.get("chosen"), kinds.get("rejected")
    if chosen is None or rejected is None:
        return {}
    argmax_gain = None
    if "argmax_logp_start" in summary:
        argmax_gain = summary["argmax_logp_end"] - summary["argmax_logp_start"]
    margin_start = chosen["logp_start"] - rejected["logp_start"]
    margin_end = chosen["logp_end"] - rejected["logp_end"]
    return {
        "chosen_change": chosen["logp_end"] - chosen["logp_start"],
        "rejected_change": rejected["logp_end"] - rejected["logp_start"],
        "argmax_gain": argmax_gain,
        "chosen_end": chosen["logp_end"],
        "margin_end": margin_end,
        "margin_change": margin_end - margin_start,
    }


def fix_comparison(plain: Mapping[str, Any], fixes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each DPO fix against plain DPO (same seed): its squeezing figures, whether it reduces the squeezing (chosen
    falls less, the argmax gains less) and its margin cost (`margin_change` of plain minus the fix's; positive = the
    fix separates chosen from rejected less)."""
    base = squeeze_figures(plain)
    out: dict[str, Any] = {"plain": base}
    for name, summary in fixes.items():
        figures = squeeze_figures(summary)
        if not base or not figures:
            continue
        gains = (figures["argmax_gain"], base["argmax_gain"])
        out[name] = {
            **figures,
            "chosen_falls_less": figures["chosen_change"] > base["chosen_change"],
            "argmax_gains_less": None if None in gains else gains[0] < gains[1],
            "margin_cost": base["margin_change"] - figures["margin_change"],
        }
    return out


def format_fix_comparison(comparison: Mapping[str, Any]) -> str:
    """The arms side by side: chosen / rejected change, argmax gain, chosen end, margin change, and the verdicts."""
    header = (
        f"{'arm':<16} {'chosen':>8} {'rejected':>9} {'argmax':>8} {'chosen end':>11} {'margin':>8}  reduces squeeze?"
    )
    lines = [header, "-" * len(header)]
    for name, row in comparison.items():
        verdict = ""
        if name != "plain":
            verdict = (
                f"chosen falls less: {'yes' if row['chosen_falls_less'] else 'no'}, argmax gains less: "
                f"{'yes' if row['argmax_gains_less'] else 'no'}; margin cost {row['margin_cost']:+.2f}"
            )
        lines.append(
            f"{name:<16} {row['chosen_change']:>+8.2f} {row['rejected_change']:>+9.2f} "
            f"{_optional(row['argmax_gain']):>8} {row['chosen_end']:>11.2f} {row['margin_change']:>+8.2f}  {verdict}"
        )
    lines.append(
        "changes are end - start of each arm's DPO run (summed log-probs, nats); sft_extension starts DPO from the "
        "model after its SFT stage, so compare 'chosen end' across arms too"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- table

_TABLE_KINDS_FIRST = ("chosen", "rejected", "completion", "greedy")


def format_table(summary: Mapping[str, Any]) -> str:
    """The start -> end (peak) table of a summary, one row per probe kind, as plain text."""
    header = f"{'kind':<20} {'start':>9} {'end':>9} {'change':>9} {'peak':>9} {'pred +':>9} {'pred -':>9}"
    lines = [header, "-" * len(header)]
    kinds = summary["kinds"]
    order = [k for k in _TABLE_KINDS_FIRST if k in kinds] + [k for k in kinds if k not in _TABLE_KINDS_FIRST]
    for kind in order:
        entry = kinds[kind]
        positive = entry.get("split_positive")
        negative = entry.get("split_negative")
        lines.append(
            f"{kind:<20} {entry['logp_start']:>9.2f} {entry['logp_end']:>9.2f} "
            f"{entry['logp_end'] - entry['logp_start']:>+9.2f} {entry['logp_peak']:>9.2f} "
            f"{_optional(positive):>9} {_optional(negative):>9}"
        )
    if "argmax_logp_start" in summary:
        lines.append(
            f"{'argmax (' + summary['argmax_kind'] + ')':<20} {summary['argmax_logp_start']:>9.2f} "
            f"{summary['argmax_logp_end']:>9.2f} {summary['argmax_logp_end'] - summary['argmax_logp_start']:>+9.2f} "
            f"{summary['argmax_logp_peak']:>9.2f}"
        )
    every = (summary.get("config") or {}).get("every_n_steps")
    lines.append(
        "log-probs: summed over the response, mean over the kind's probes (nats); peak: the highest value over the "
        "run.\npred +/-: predicted change due to the positive-gradient (pulled-up) / negative-gradient (pushed-down) "
        f"training tokens, summed over the {summary['analysed_steps']} analysed steps"
        + (f" (one in {every})" if every else "")
    )
    return "\n".join(lines)


def _optional(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:+.2f}"


def format_checks(checks_: Mapping[str, bool]) -> str:
    return "\n".join(f"  [{'x' if ok else ' '}] {name.replace('_', ' ')}" for name, ok in checks_.items())


# --------------------------------------------------------------------------------------------------------- run


def reward_summary(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The trainer's logged mean reward: first, middle (the logging step nearest half the run), last, mean over the
    logging steps, and the curve (`steps`, `values`). Each logged value is TRL's mean over the steps since the last
    log; with the demo's 0/1 reward it is the sampled accuracy."""
    logged = [(int(entry.get("step", i)), entry["reward"]) for i, entry in enumerate(log_history) if "reward" in entry]
    if not logged:
        return {}
    steps, rewards = [s for s, _ in logged], [r for _, r in logged]
    middle = min(range(len(steps)), key=lambda i: abs(steps[i] - steps[-1] / 2))
    return {
        "first": rewards[0],
        "middle": rewards[middle],
        "middle_step": steps[middle],
        "last": rewards[-1],
        "mean": _mean(rewards),
        "steps": steps,
        "values": rewards,
    }


# ------------------------------------------------------------------------------------------------------ arms

ARM_COLUMNS = {
    "dpo": [
        "arm",
        "chosen change",
        "rejected change",
        "argmax change",
        "greedy change",
        "chosen end",
        "margin change",
        "margin cost",
    ],
    "grpo": [
        "arm",
        "groups",
        "mean delta",
        "share delta<=0",
        "delta from negatives",
        "reward first",
        "reward middle",
        "reward last",
        "reward mean",
        "negative tokens down-weighted",
        "train seconds",
    ],
}


def arm_row(trainer: str, name: str, summary: Mapping[str, Any], plain: Mapping[str, Any]) -> list[Any]:
    """One arm's row of `ARM_COLUMNS[trainer]` (DPO: end - start of each figure, `squeeze_figures`; the margin cost
    is plain's margin change minus the arm's)."""
    if trainer == "grpo":
        lld, reward = summary.get("lld") or {}, summary.get("reward") or {}
        stats = summary.get("nthr_stats") or {}
        return [
            name,
            lld.get("groups"),
            lld.get("delta_observed_mean"),
            lld.get("frac_groups_nonpositive"),
            lld.get("delta_from_negative_mean"),
            reward.get("first"),
            reward.get("middle"),
            reward.get("last"),
            reward.get("mean"),
            stats.get("frac_downweighted_mean"),
            summary.get("train_seconds"),
        ]
    figures, base = squeeze_figures(summary), squeeze_figures(plain)
    greedy = _change(summary["kinds"], "greedy")
    cost = base["margin_change"] - figures["margin_change"] if figures and base else None
    changes = [figures.get(k) for k in ("chosen_change", "rejected_change", "argmax_gain")]
    return [name, *changes, greedy, figures.get("chosen_end"), figures.get("margin_change"), cost]


def format_arms(table: Mapping[str, Any]) -> str:
    """The arms table (`arms_manifest(...)["table"]`) as plain text, one row per arm."""
    widths = [max(len(column), 9) for column in table["columns"]]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(table["columns"], widths, strict=True))]
    for row in table["rows"]:
        cells = [str(row[0]), *(_optional(v) if isinstance(v, float) else str(v or "") for v in row[1:])]
        lines.append("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines) + "\n" + table["note"]


def arms_manifest(trainer: str, summaries: Mapping[str, Mapping[str, Any]], run_dirs: Mapping[str, str]) -> dict:
    """The `arms.json` content the report's arms panel reads (`trl_ntk.report.arms`): each arm's run folder
    (relative), its reward curve (GRPO) and the table of `arm_row`s. `summaries` maps arm names to summaries, the
    plain arm first."""
    plain = next(iter(summaries.values()))
    arms = []
    for name, summary in summaries.items():
        reward = summary.get("reward") or {}
        entry: dict[str, Any] = {"name": name, "run_dir": run_dirs[name]}
        if reward.get("steps"):
            entry["rewards"] = {"steps": reward["steps"], "values": reward["values"]}
        arms.append(entry)
    note = (
        "Changes are end - start of each arm's run (summed log-probs, nats, mean over the probe prompts); "
        "sft_extension starts DPO from the model after its SFT stage, so compare 'chosen end' too."
        if trainer == "dpo"
        else "delta: change over one step of the correct completions' summed log-likelihood per mixed group, over "
        "the analysed steps; reward: the trainer's logged mean (the sampled accuracy)."
    )
    rows = [arm_row(trainer, name, summary, plain) for name, summary in summaries.items()]
    return {"trainer": trainer, "arms": arms, "table": {"columns": ARM_COLUMNS[trainer], "rows": rows, "note": note}}


def print_summary(summary: Mapping[str, Any], stream: Any) -> None:
    title = f"trl-ntk demo: {summary['trainer'].upper()} on the toy default, {summary['steps']} steps"
    stream.write(f"\n{title} ({summary['train_seconds']:.0f} s training)\n\n{format_table(summary)}\n")
    chosen = summary["kinds"].get("chosen", {})
    if summary["trainer"] == "dpo" and "split_negative" in chosen:
        stream.write(
            f"\nwhy chosen moved (predicted, {summary['analysed_steps']} analysed steps): pulled up by the "
            f"positive-gradient (chosen) tokens {chosen['split_positive']:+.2f}, pushed down by the "
            f"negative-gradient (rejected) tokens {chosen['split_negative']:+.2f}\n"
        )
    if summary.get("checks"):
        stream.write("\n" + format_checks(summary["checks"]) + "\n")
    if "lld" in summary:
        stream.write(_lld_line("GRPO", summary) + "\n")
    if "fix_comparison" in summary:
        stream.write("\nDPO fixes against plain DPO (same seed):\n" + format_fix_comparison(summary["fix_comparison"]))
        for name, fix in summary.get("fixes", {}).items():
            stream.write(f"\n{name} report: {fix['report']}")
        stream.write("\n")
    if "nthr_run" in summary:
        nthr = summary["nthr_run"]
        stream.write(_lld_line("GRPO + NTHR", nthr) + "\n")
        stats = nthr.get("nthr_stats") or {}
        if stats.get("frac_downweighted_mean") is not None:
            stream.write(
                f"NTHR down-weighted {100 * stats['frac_downweighted_mean']:.1f}% of the negative-advantage tokens "
                f"(mean over {stats['batches']} generation batches, {stats['seconds']:.1f} s)\n"
            )
        stream.write(f"\nNTHR report: {nthr['report']}\n")
    if "arms" in summary:
        stream.write("\nThe arms side by side (also in the report's arms panel):\n")
        stream.write(format_arms(summary["arms"]) + "\n")
    stream.write(f"\nreport: {summary['report']}\n")
    stream.flush()


def _lld_line(name: str, summary: Mapping[str, Any]) -> str:
    lld = summary.get("lld") or {}
    reward = summary.get("reward") or {}
    return (
        f"{name:<12} LLD: mean delta {lld.get('delta_observed_mean', float('nan')):+.3f} over "
        f"{lld.get('groups', 0)} groups, {100 * (lld.get('frac_groups_negative') or 0):.0f}% negative; "
        f"reward {reward.get('first', float('nan')):.2f} -> {reward.get('last', float('nan')):.2f}"
    )
