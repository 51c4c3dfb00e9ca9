"""The report panels drawn from the records: run summary, log-probs, squeezing, prediction, split, LLD, NTHR."""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from trl_ntk.report.figures import (
    PANELS,
    Panel,
    add_kind_lines,
    apply_layout,
    as_number,
    figure_html,
    kind_colours,
    kind_means,
    step_means,
)
from trl_ntk.report.load import RunData

logger = logging.getLogger(__name__)


def run_panel(data: RunData) -> Panel:
    runs, statuses = data.of("run"), data.of("status")
    rows = []
    if runs:
        last = runs[-1]
        rows.append(("trainer", html.escape(str(last.get("trainer", "?")))))
        restarts = [r.get("resumed_from") for r in runs if r.get("resumed_from") is not None]
        rows.append(("starts", f"{len(runs)} (resumed from {', '.join(map(str, restarts)) or 'none'})"))
        versions = last.get("versions") or {}
        rows.append(("versions", html.escape(", ".join(f"{k} {v}" for k, v in versions.items()))))
        config = json.dumps(last.get("config") or {}, indent=2, sort_keys=True)
        rows.append(("config", f"<details><summary>show</summary><pre>{html.escape(config)}</pre></details>"))
    counts = ", ".join(f"{t}: {len(rs)}" for t, rs in sorted(data.records.items()))
    rows.append(("records", html.escape(counts) or "none"))
    steps = sorted({int(r["step"]) for rs in data.records.values() for r in rs if "step" in r})
    if steps:
        rows.append(("steps", f"{steps[0]} to {steps[-1]}"))
    rows.append(("attribution archives", str(len(data.archives))))
    if runs and runs[-1].get("run_id"):
        rows.append(("run id", html.escape(str(runs[-1]["run_id"]))))
    if data.other_runs:
        rows.append(("other runs in the file (not shown)", html.escape(", ".join(data.other_runs))))
    if data.damaged_lines:
        rows.append(("damaged lines skipped", str(data.damaged_lines)))
    if statuses:
        status = statuses[-1]
        failures = status.get("sink_failures") or {}
        rows.append(("analysis failures", str(status.get("analysis_failures", 0))))
        rows.append(("steps not trusted (truth guard)", str(status.get("untrusted_steps", 0))))
        rows.append(("sink failures", html.escape(", ".join(f"{k}: {v}" for k, v in failures.items()) or "none")))
        if status.get("message"):
            rows.append(("last failure", html.escape(str(status["message"]))))
    body = '<table class="kv">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
    change = _change_table(data)
    if change:
        body += "<h3>Change of the summed log-prob over the run (mean over each kind's probes)</h3>" + change
    return Panel("panel-run", "Run", "What ran, and how each kind of probe response moved overall.", body)


def _change_table(data: RunData) -> str:
    series = kind_means(data.of("probe"), "logp_sum")
    rows = []
    for kind in data.kinds:
        if kind not in series or not series[kind][0]:
            continue
        steps, values = series[kind]
        delta = values[-1] - values[0]
        arrow = "up" if delta > 0 else "down"
        rows.append(
            f"<tr><td>{html.escape(kind)}</td><td>{values[0]:.3f} (step {steps[0]})</td>"
            f"<td>{values[-1]:.3f} (step {steps[-1]})</td><td class='{arrow}'>{delta:+.3f}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<table class='data'><tr><th>kind</th><th>first</th><th>last</th><th>change</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def logp_panel(data: RunData, max_probe_lines: int = 200) -> Panel:
    import plotly.graph_objects as go

    note = (
        "Response log-probability of every probe kind over training (thick: mean over the kind's probes; thin: each "
        "probe). DPO's squeezing effect shows as chosen and rejected both going down while greedy responses go up. "
        "Buttons switch between the summed log-prob, the mean per token, and the change since the first step."
    )
    probes = data.of("probe")
    if not probes:
        return Panel("panel-logp", PANELS[1][1], note, None)
    kinds, colours = data.kinds, kind_colours(data.kinds)
    figure = go.Figure()
    views = (
        ("sum over the response", "logp_sum", False),
        ("mean per token", "logp_mean", False),
        ("change since first step", "logp_sum", True),
    )
    by_probe: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in probes:
        by_probe[str(record.get("probe_id"))].append(record)
    shown_probes = sorted(by_probe)[:max_probe_lines]
    visibility = []
    for view_index, (_, field_name, relative) in enumerate(views):
        start = len(figure.data)
        for probe_id in shown_probes:
            records = by_probe[probe_id]
            kind = str(records[0].get("kind"))
            points = [(int(r["step"]), v) for r in records if (v := as_number(r.get(field_name))) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            if relative:
                values = [v - values[0] for v in values]
            figure.add_trace(
                go.Scatter(
                    x=steps,
                    y=values,
                    mode="lines",
                    legendgroup=kind,
                    showlegend=False,
                    visible=view_index == 0,
                    line={"color": colours.get(kind, "#999"), "width": 0.8},
                    opacity=0.35,
                    name=probe_id,
                    hovertemplate=f"{html.escape(probe_id)} ({html.escape(kind)})<br>step %{{x}}<br>%{{y:.4g}}"
                    "<extra></extra>",
                )
            )
        series = kind_means(probes, field_name)
        if relative:
            series = {k: (s, [v - vs[0] for v in vs]) for k, (s, vs) in series.items() if vs}
        before = len(figure.data)
        add_kind_lines(figure, series, colours, kinds, legend=True)
        for trace in figure.data[before:]:
            trace.visible = view_index == 0
        visibility.append((start, len(figure.data)))
    total = len(figure.data)
    buttons = [
        {
            "label": label,
            "method": "update",
            "args": [{"visible": [lo <= i < hi for i in range(total)]}, {"yaxis.title.text": label}],
        }
        for (label, _, _), (lo, hi) in zip(views, visibility)
    ]
    apply_layout(
        figure,
        540,
        top=110,
        legend_top=50,
        xaxis_title="optimizer step",
        yaxis_title=views[0][0],
        updatemenus=[
            {
                "type": "buttons",
                "direction": "right",
                "buttons": buttons,
                "x": 0.0,
                "xanchor": "left",
                "y": 1 + (110 - 8) / (540 - 110 - 50),
                "yanchor": "top",
                "showactive": True,
            }
        ],
    )
    return Panel("panel-logp", PANELS[1][1], note, figure_html(figure, "figure-logp"))


def squeezing_panel(data: RunData) -> Panel:
    from plotly.subplots import make_subplots

    note = (
        "Teacher-forced diagnostics per kind: the argmax log-prob (how likely the model's own most likely "
        "continuation is along the response), the mean max-probability, and the mean predictive entropy. Squeezing "
        "pushes mass onto the argmax: max-probability up, entropy down."
    )
    probes = data.of("probe")
    if not probes:
        return Panel("panel-squeezing", PANELS[2][1], note, None)
    kinds, colours = data.kinds, kind_colours(data.kinds)
    fields = (
        ("argmax_logp", "argmax log-prob (sum)"),
        ("max_prob_mean", "mean max-probability"),
        ("entropy_mean", "mean entropy (nats)"),
    )
    figure = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title in fields], horizontal_spacing=0.07)
    for index, (field_name, _) in enumerate(fields):
        add_kind_lines(figure, kind_means(probes, field_name), colours, kinds, row=1, col=index + 1, legend=index == 0)
        figure.update_xaxes(title_text="optimizer step", row=1, col=index + 1)
    apply_layout(figure, 420)
    return Panel("panel-squeezing", PANELS[2][1], note, figure_html(figure, "figure-squeezing"))


def prediction_panel(data: RunData) -> Panel:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    note = (
        "Left: each point is one probe response at one analysed step; x is the change predicted to first order "
        "along the real update (<grad lp, dw>), y the change observed after the step. On the diagonal the local "
        "(eNTK) picture holds; far from it the step was too large for it. Right: the linearization gap "
        "(observed - predicted), mean per kind. Below: the truth guard of each analysed step, the gradient check "
        "(how well the captured signal reconstructs the gradient the optimizer applied: 1 - cosine and relative "
        "error); a step whose check fails, or whose set-up the analysis does not reproduce, is not trusted: its "
        "points are crosses and it is named with the reason."
    )
    dynamics = [
        r
        for r in data.of("dynamics")
        if as_number(r.get("observed")) is not None and as_number(r.get("predicted")) is not None
    ]
    if not dynamics:
        return Panel("panel-prediction", PANELS[3][1], note, None)
    kinds, colours = data.kinds, kind_colours(data.kinds)
    figure = make_subplots(
        rows=1, cols=2, subplot_titles=("observed vs predicted change", "gap per kind"), horizontal_spacing=0.1
    )
    for kind in kinds:
        points = [r for r in dynamics if r.get("kind") == kind]
        if not points:
            continue
        figure.add_trace(
            go.Scatter(
                x=[r["predicted"] for r in points],
                y=[r["observed"] for r in points],
                mode="markers",
                name=kind,
                legendgroup=kind,
                marker={
                    "color": colours[kind],
                    "size": 7,
                    "opacity": 0.8,
                    "symbol": ["x" if r.get("trusted") is False else "circle" for r in points],
                },
                text=[
                    f"{html.escape(str(r.get('probe_id')))} step {r['step']}<br>gap {as_number(r.get('gap')) or 0:+.4g}"
                    + ("<br>NOT TRUSTED" if r.get("trusted") is False else "")
                    for r in points
                ],
                hovertemplate="%{text}<br>predicted %{x:.4g}<br>observed %{y:.4g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    values = [r["predicted"] for r in dynamics] + [r["observed"] for r in dynamics]
    low, high = min(values), max(values)
    figure.add_trace(
        go.Scatter(
            x=[low, high],
            y=[low, high],
            mode="lines",
            name="observed = predicted",
            line={"color": "#444", "dash": "dot", "width": 1},
            hoverinfo="skip",
        ),
        row=1,
        col=1,
    )
    gaps = {r_kind: series for r_kind, series in kind_means(dynamics, "gap").items()}
    add_kind_lines(figure, gaps, colours, kinds, row=1, col=2, legend=False)
    figure.update_xaxes(title_text="predicted change", row=1, col=1)
    figure.update_yaxes(title_text="observed change", row=1, col=1)
    figure.update_xaxes(title_text="optimizer step", row=1, col=2)
    figure.update_yaxes(title_text="observed - predicted", row=1, col=2)
    apply_layout(figure, 460)
    paths = defaultdict(int)
    for record in dynamics:
        paths[str(record.get("path", "?"))] += 1
    observed = np.array([r["observed"] for r in dynamics])
    predicted = np.array([r["predicted"] for r in dynamics])
    summary = f"{len(dynamics)} points; computed by {', '.join(f'{k} ({v})' for k, v in sorted(paths.items()))}"
    if len(dynamics) > 1 and observed.std() > 0 and predicted.std() > 0:
        summary += f"; correlation {np.corrcoef(observed, predicted)[0, 1]:.3f}"
    median_gap = float(np.median(np.abs(observed - predicted)))
    summary += f"; median |gap| {median_gap:.3g} nats"
    body = f"<p class='summary'>{html.escape(summary)}</p>" + figure_html(figure, "figure-prediction")
    return Panel("panel-prediction", PANELS[3][1], note, body + _guard_html(guard_by_step(data.of("dynamics"))))


@dataclass(frozen=True)
class GuardStep:
    """The truth guard of one analysed step: its gradient check and verdict (`trusted` None: not judged)."""

    step: int
    cosine: float | None
    relative_error: float | None
    trusted: bool | None
    reason: str | None


def guard_by_step(dynamics: list[dict[str, Any]]) -> list[GuardStep]:
    """One `GuardStep` per analysed step, in step order, from its dynamics records (which share the check); a step
    is untrusted when any of its records is."""
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in dynamics:
        by_step[int(record["step"])].append(record)
    steps = []
    for step, records in sorted(by_step.items()):
        check = next((r["gradient_check"] for r in records if isinstance(r.get("gradient_check"), dict)), {})
        verdicts = [r.get("trusted") for r in records if isinstance(r.get("trusted"), bool)]
        trusted = None if not verdicts else all(verdicts)
        reason = next((r.get("trust_reason") for r in records if r.get("trusted") is False), None)
        steps.append(
            GuardStep(step, as_number(check.get("cosine")), as_number(check.get("relative_error")), trusted, reason)
        )
    return steps


_GUARD_FLOOR = 1e-17
"""Smallest value drawn on the guard's log axis (an exact cosine of 1 has 1 - cosine = 0)."""


def _guard_html(steps: list[GuardStep]) -> str:
    """The guard's figure (1 - cosine and relative error per step, log scale, untrusted steps as red crosses) and
    a line naming the untrusted steps with the first reason."""
    import plotly.graph_objects as go

    checked = [s for s in steps if s.cosine is not None]
    if not checked:
        return ""
    untrusted = [s for s in steps if s.trusted is False]
    figure = go.Figure()
    x = [s.step for s in checked]
    series = {
        "1 - cosine": [max(1 - s.cosine, _GUARD_FLOOR) for s in checked],
        "relative error": [max(s.relative_error or 0.0, _GUARD_FLOOR) for s in checked],
    }
    for (name, values), colour in zip(series.items(), ("#1f77b4", "#ff7f0e")):
        figure.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=name, line={"color": colour}))
    if untrusted:
        marked = [s for s in checked if s.trusted is False]
        figure.add_trace(
            go.Scatter(
                x=[s.step for s in marked],
                y=[max(1 - s.cosine, _GUARD_FLOOR) for s in marked],
                mode="markers",
                name="not trusted",
                marker={"color": "#d62728", "symbol": "x", "size": 12},
                text=[html.escape(s.reason or "") for s in marked],
                hovertemplate="step %{x}: not trusted<br>%{text}<extra></extra>",
            )
        )
    figure.update_yaxes(type="log", title_text="gradient check")
    figure.update_xaxes(title_text="optimizer step")
    apply_layout(figure, 280, top=60)
    if untrusted:
        names = ", ".join(str(s.step) for s in untrusted[:20]) + (", ..." if len(untrusted) > 20 else "")
        line = (
            f"<p class='summary guard-untrusted' style='color:#b00020'><b>{len(untrusted)} of {len(steps)} analysed "
            f"steps not trusted</b> (steps {names}): {html.escape(untrusted[0].reason or 'no reason recorded')}</p>"
        )
    else:
        judged = sum(s.trusted is not None for s in steps)
        worst = min(s.cosine for s in checked)
        line = (
            f"<p class='summary guard-trusted'>truth guard: {judged} of {len(steps)} analysed steps judged, all "
            f"trusted; lowest gradient-check cosine {worst:.12g}</p>"
        )
    return "<h3>Truth guard</h3>" + line + figure_html(figure, "figure-guard")


def split_panel(data: RunData) -> Panel:
    from plotly.subplots import make_subplots

    note = (
        "The current-gradient part of the predicted change, split by the sign of each training token's gradient "
        "coefficient c_l: positive gradient (c_l < 0, the token is pulled up) and negative gradient (c_l > 0, pushed "
        "down); beside them the part carried over by the optimizer (momentum, weight decay). Second row: the same "
        "change split by the trainer's groups (DPO chosen / rejected, GRPO positive / negative advantage)."
    )
    dynamics = data.of("dynamics")
    if not dynamics:
        return Panel("panel-split", PANELS[4][1], note, None)
    kinds, colours = data.kinds, kind_colours(data.kinds)
    groups = sorted({g for r in dynamics for g in (r.get("groups") or {})})[:3]
    top = (
        ("split.positive", "positive gradient (pulled up)"),
        ("split.negative", "negative gradient (pushed down)"),
        ("history", "optimizer history"),
    )
    rows = 2 if groups else 1
    titles = [t for _, t in top] + [f"group: {g}" for g in groups] + [""] * (3 - len(groups) if groups else 0)
    figure = make_subplots(rows=rows, cols=3, subplot_titles=titles, horizontal_spacing=0.07, vertical_spacing=0.16)
    for index, (path, _) in enumerate(top):
        add_kind_lines(figure, kind_means(dynamics, path), colours, kinds, row=1, col=index + 1, legend=index == 0)
    for index, group in enumerate(groups):
        add_kind_lines(
            figure, kind_means(dynamics, f"groups.{group}"), colours, kinds, row=2, col=index + 1, legend=False
        )
    figure.update_xaxes(title_text="optimizer step")
    figure.update_yaxes(title_text="predicted change (nats)", col=1)
    apply_layout(figure, 420 * rows)
    return Panel("panel-split", PANELS[4][1], note, figure_html(figure, "figure-split"))


def lld_panel(data: RunData) -> Panel:
    from plotly.subplots import make_subplots

    note = (
        "Per GRPO group, the mean change of the log-likelihood of its positive-advantage (correct) completions over "
        "one step: observed, predicted, and the part due to negative-advantage completions. Lazy likelihood "
        "displacement is this change being small or negative. Middle: the share of groups where it was negative. "
        "Right (when recorded): each group's GWHES before the step against its observed change; a high GWHES "
        "(wrong completions close to the right ones in hidden space) flags groups prone to displacement."
    )
    records = data.of("lld")
    if not records:
        return Panel("panel-lld", PANELS[7][1], note, None)
    scored = [
        r for r in records if as_number(r.get("gwhes")) is not None and as_number(r.get("delta_observed")) is not None
    ]
    titles = ["change of positive completions' log-likelihood", "groups with change < 0"]
    widths = [0.65, 0.35]
    if scored:
        titles.append("GWHES vs observed change")
        widths = [0.45, 0.2, 0.35]
    figure = make_subplots(
        rows=1, cols=len(titles), column_widths=widths, horizontal_spacing=0.08, subplot_titles=titles
    )
    _add_lld_changes(figure, records)
    _add_lld_negative_share(figure, records)
    if scored:
        _add_gwhes_scatter(figure, scored)
    figure.add_hline(y=0, line={"color": "#444", "width": 1}, row=1, col=1)
    figure.update_xaxes(title_text="optimizer step", row=1, col=1)
    figure.update_xaxes(title_text="optimizer step", row=1, col=2)
    figure.update_yaxes(title_text="nats", row=1, col=1)
    figure.update_yaxes(range=[0, 1], row=1, col=2)
    apply_layout(figure, 420)
    return Panel("panel-lld", PANELS[7][1], note, figure_html(figure, "figure-lld"))


def _add_lld_changes(figure: Any, records: list[dict]) -> None:
    """Column 1: every group's observed change (grey points) and the per-step means of the three changes."""
    import plotly.graph_objects as go

    observed = [r for r in records if as_number(r.get("delta_observed")) is not None]
    figure.add_trace(
        go.Scatter(
            x=[r["step"] for r in observed],
            y=[r["delta_observed"] for r in observed],
            mode="markers",
            name="observed, per group",
            marker={"color": "#bbb", "size": 6},
            text=[f"group {r.get('group')}" for r in observed],
            hovertemplate="%{text}<br>step %{x}<br>%{y:.4g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    styles = (
        ("delta_observed", "observed (mean)", "#1f77b4", None),
        ("delta_predicted", "predicted (mean)", "#ff7f0e", "dash"),
        ("delta_from_negative", "due to negative completions", "#d62728", "dot"),
    )
    for path, name, colour, dash in styles:
        steps, values = step_means(records, path)
        if steps:
            line = {"color": colour, "dash": dash, "width": 2.5}
            figure.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=name, line=line), row=1, col=1)


def _add_lld_negative_share(figure: Any, records: list[dict]) -> None:
    """Column 2: per step, the share of groups whose observed change is negative."""
    import plotly.graph_objects as go

    negative: dict[int, list[float]] = defaultdict(list)
    for record in records:
        value = as_number(record.get("delta_observed"))
        if value is not None:
            negative[int(record["step"])].append(1.0 if value < 0 else 0.0)
    steps = sorted(negative)
    shares = [sum(negative[s]) / len(negative[s]) for s in steps]
    bar = go.Bar(x=steps, y=shares, name="share < 0", marker={"color": "#d62728"}, showlegend=False)
    figure.add_trace(bar, row=1, col=2)


def _add_gwhes_scatter(figure: Any, scored: list[dict]) -> None:
    """Column 3: one point per group and analysed step, GWHES (x) against the observed change (y)."""
    import plotly.graph_objects as go

    figure.add_trace(
        go.Scatter(
            x=[r["gwhes"] for r in scored],
            y=[r["delta_observed"] for r in scored],
            mode="markers",
            name="group (GWHES, observed change)",
            marker={"color": "#2ca02c", "size": 7},
            text=[f"step {r['step']}, group {r.get('group')}" for r in scored],
            hovertemplate="%{text}<br>GWHES %{x:.4g}<br>change %{y:.4g}<extra></extra>",
            showlegend=False,
        ),
        row=1,
        col=3,
    )
    figure.add_hline(y=0, line={"color": "#444", "width": 1}, row=1, col=3)
    figure.update_xaxes(title_text="GWHES (before the step)", row=1, col=3)


def nthr_panel(data: RunData) -> Panel:
    from plotly.subplots import make_subplots

    note = (
        "NTHR down-weights the negative-advantage tokens whose hidden reward s- (their lm-head gradient inner "
        "product with the group's positive tokens) exceeds tau. Per generation batch: the fraction of negative tokens "
        "down-weighted, the threshold tau, the weight eta applied, and the mean s- of negative tokens."
    )
    records = data.of("nthr")
    if not records:
        return Panel("panel-nthr", PANELS[8][1], note, None)
    fields = (
        ("frac_downweighted", "fraction down-weighted"),
        ("tau", "tau"),
        ("eta", "eta"),
        ("s_neg_mean", "mean s- of negative tokens"),
    )
    figure = make_subplots(rows=1, cols=4, subplot_titles=[t for _, t in fields], horizontal_spacing=0.06)
    import plotly.graph_objects as go

    for index, (path, title) in enumerate(fields):
        steps, values = step_means(records, path)
        figure.add_trace(
            go.Scatter(
                x=steps,
                y=values,
                mode="lines+markers",
                name=title,
                showlegend=False,
                line={"color": "#9467bd", "width": 2.5},
            ),
            row=1,
            col=index + 1,
        )
    figure.update_xaxes(title_text="optimizer step")
    apply_layout(figure, 360)
    return Panel("panel-nthr", PANELS[8][1], note, figure_html(figure, "figure-nthr"))
