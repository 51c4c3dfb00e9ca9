"""What every report panel shares: the panel list, colours per probe kind, per-kind series, the `Panel` section
and the plotly helpers."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PANELS = (
    ("panel-run", "Run"),
    ("panel-logp", "Log-probability of the probe responses"),
    ("panel-squeezing", "Squeezing diagnostics"),
    ("panel-prediction", "Predicted vs observed change"),
    ("panel-split", "Positive vs negative gradient"),
    ("panel-attribution", "Token attributions"),
    ("panel-top-tokens", "Training tokens that moved each probe"),
    ("panel-lld", "GRPO: lazy likelihood displacement"),
    ("panel-nthr", "GRPO: NTHR reweighting"),
)
PANEL_IDS = tuple(panel_id for panel_id, _ in PANELS)

KIND_COLOURS = {
    "chosen": "#1f77b4",
    "rejected": "#d62728",
    "chosen_rephrase": "#6baed6",
    "rejected_rephrase": "#f4a582",
    "chosen_swapped": "#9467bd",
    "irrelevant_train": "#8c564b",
    "irrelevant_test": "#c49c94",
    "shuffled_chosen": "#7f7f7f",
    "shuffled_irrelevant": "#bcbd22",
    "greedy": "#2ca02c",
    "sample": "#98df8a",
    "completion": "#17becf",
}
_EXTRA_COLOURS = ("#e377c2", "#ff7f0e", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")


# ---------------------------------------------------------------------------------------------------------------------
# Series and colours


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _get(record: Mapping[str, Any], path: str) -> float | None:
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return as_number(value)


def kind_means(records: Iterable[Mapping[str, Any]], path: str) -> dict[str, tuple[list[int], list[float]]]:
    """kind -> (steps, mean of `path` over the kind's probes at each step); `path` may be nested (`split.positive`)."""
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        value = _get(record, path)
        if value is not None:
            sums[str(record.get("kind"))][int(record["step"])].append(value)
    return {
        kind: (sorted(by_step), [sum(by_step[s]) / len(by_step[s]) for s in sorted(by_step)])
        for kind, by_step in sums.items()
    }


def step_means(records: Iterable[Mapping[str, Any]], path: str) -> tuple[list[int], list[float]]:
    """(steps, mean of `path` over the records of each step)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for record in records:
        value = _get(record, path)
        if value is not None:
            by_step[int(record["step"])].append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def kind_colours(kinds: Sequence[str]) -> dict[str, str]:
    colours, extra = {}, 0
    for kind in kinds:
        if kind in KIND_COLOURS:
            colours[kind] = KIND_COLOURS[kind]
        else:
            colours[kind] = _EXTRA_COLOURS[extra % len(_EXTRA_COLOURS)]
            extra += 1
    return colours


# ---------------------------------------------------------------------------------------------------------------------
# Panels


@dataclass
class Panel:
    """One section of the report: an id from `PANEL_IDS`, a heading, an explanation and its body (or a no-data note)."""

    panel_id: str
    title: str
    note: str
    body: str | None

    def html(self) -> str:
        body = self.body if self.body is not None else '<p class="no-data">No data for this panel in this run.</p>'
        return (
            f'<section class="panel" id="{self.panel_id}"><h2>{html.escape(self.title)}</h2>'
            f'<p class="note">{html.escape(self.note)}</p>{body}</section>'
        )


def figure_html(figure: Any, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(
        figure,
        include_plotlyjs=False,
        full_html=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def apply_layout(figure: Any, height: int, top: int = 95, legend_top: int = 8, **kwargs: Any) -> None:
    """Common look; the legend sits in the top margin, `legend_top` pixels below the top, above subplot titles."""
    figure.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": top, "b": 50},
        legend={"orientation": "h", "yref": "container", "yanchor": "top", "y": 1 - legend_top / height, "x": 0},
        hovermode="closest",
        **kwargs,
    )


def add_kind_lines(
    figure: Any,
    series: Mapping[str, tuple[list[int], list[float]]],
    colours: Mapping[str, str],
    kinds: Sequence[str],
    row: int | None = None,
    col: int | None = None,
    legend: bool = True,
    dash: str | None = None,
    suffix: str = "",
) -> None:
    import plotly.graph_objects as go

    for kind in kinds:
        if kind not in series:
            continue
        steps, values = series[kind]
        trace = go.Scatter(
            x=steps,
            y=values,
            mode="lines+markers",
            name=kind + suffix,
            legendgroup=kind,
            showlegend=legend,
            line={"color": colours[kind], "width": 2.5, "dash": dash},
            marker={"size": 5},
            hovertemplate=f"{html.escape(kind)}{suffix}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
        )
        if row is None:
            figure.add_trace(trace)
        else:
            figure.add_trace(trace, row=row, col=col)
