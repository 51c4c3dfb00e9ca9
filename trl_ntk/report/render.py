"""A self-contained HTML report of one run folder (`dynamics.jsonl` and `attributions/*.npz`).

One file, plotly.js inlined: it opens from disk, offline, with no server. `trl-ntk report RUN_DIR` calls `main`.
Every panel sits in a `<section id="panel-...">` (see `PANEL_IDS`); a panel without data says so instead.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from trl_ntk.output.sinks import ATTRIBUTIONS_DIR, JSONL_NAME, display_token

logger = logging.getLogger(__name__)

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

KIND_ORDER = (
    "chosen",
    "rejected",
    "chosen_rephrase",
    "rejected_rephrase",
    "chosen_swapped",
    "irrelevant_train",
    "irrelevant_test",
    "shuffled_chosen",
    "shuffled_irrelevant",
    "greedy",
    "sample",
    "completion",
)
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
_DEDUPLICATED = {"probe": "probe_id", "dynamics": "probe_id", "lld": "group", "nthr": None}
_STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


# ---------------------------------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class RunData:
    """The records of one run folder, by type, and the attribution archives beside them.

    Args:
        run_dir (`Path`): the folder of `dynamics.jsonl`.
        records (`dict[str, list[dict]]`): record type -> records in file order; `probe`, `dynamics`, `lld` and
            `nthr` records repeated for the same step (a resumed run that was not truncated) keep the last one.
        probes (`dict[str, dict]`): `probe_id` -> its entry of the latest `probes` record.
        archives (`list[tuple[int, Path]]`): `(step, path)` of every `attributions/step_<step>.npz`, by step.
    """

    run_dir: Path
    records: dict[str, list[dict[str, Any]]]
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    archives: list[tuple[int, Path]] = field(default_factory=list)

    def of(self, record_type: str) -> list[dict[str, Any]]:
        return self.records.get(record_type, [])

    @property
    def kinds(self) -> list[str]:
        """Probe kinds present, built-in kinds in the paper's order first."""
        present = {r.get("kind") for t in ("probe", "dynamics") for r in self.of(t)}
        present.update(p.get("kind") for p in self.probes.values())
        present.discard(None)
        return [k for k in KIND_ORDER if k in present] + sorted(k for k in present if k not in KIND_ORDER)


def find_jsonl(run_dir: str | Path) -> Path:
    """The `dynamics.jsonl` of `run_dir`: the file itself, `run_dir/dynamics.jsonl`, or `run_dir/dynamics/...`."""
    path = Path(run_dir)
    for candidate in (path, path / JSONL_NAME, path / "dynamics" / JSONL_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {JSONL_NAME} at {path} (nor in {path / 'dynamics'}); pass the folder the learning-dynamics callback "
        "wrote, by default <output_dir>/dynamics"
    )


def load_run(run_dir: str | Path, progress: bool = True) -> RunData:
    """Read a run folder; lines that do not parse (a run killed mid-write) are skipped with one warning."""
    jsonl = find_jsonl(run_dir)
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    probes: dict[str, dict[str, Any]] = {}
    bad_lines = 0
    with (
        open(jsonl, encoding="utf-8") as lines,
        tqdm(
            total=jsonl.stat().st_size, unit="B", unit_scale=True, desc="reading records", disable=not progress
        ) as bar,
    ):
        for line in lines:
            bar.update(len(line.encode("utf-8")))
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad_lines += 1
                continue
            if not isinstance(record, dict) or "type" not in record:
                bad_lines += 1
                continue
            records[record["type"]].append(record)
            if record["type"] == "probes":
                probes.update({str(p["probe_id"]): p for p in record.get("probes", []) if "probe_id" in p})
    if bad_lines:
        logger.warning("%s: skipped %d line(s) that are not JSON records", jsonl, bad_lines)
    for record_type, identity in _DEDUPLICATED.items():
        if record_type in records:
            last: dict[tuple[Any, Any], dict[str, Any]] = {}
            for record in records[record_type]:
                last[(record.get("step"), record.get(identity) if identity else None)] = record
            records[record_type] = sorted(last.values(), key=lambda r: r.get("step", 0))
    archives = []
    for path in (jsonl.parent / ATTRIBUTIONS_DIR).glob("step_*.npz"):
        match = _STEP_FILE.match(path.name)
        if match:
            archives.append((int(match.group(1)), path))
    return RunData(jsonl.parent, dict(records), probes, sorted(archives))


# ---------------------------------------------------------------------------------------------------------------------
# Series and colours


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _get(record: Mapping[str, Any], path: str) -> float | None:
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return _number(value)


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


def _figure_html(figure: Any, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(
        figure,
        include_plotlyjs=False,
        full_html=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def _layout(figure: Any, height: int, top: int = 95, legend_top: int = 8, **kwargs: Any) -> None:
    """Common look; the legend sits in the top margin, `legend_top` pixels below the top, above subplot titles."""
    figure.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": top, "b": 50},
        legend={"orientation": "h", "yref": "container", "yanchor": "top", "y": 1 - legend_top / height, "x": 0},
        hovermode="closest",
        **kwargs,
    )


def _add_kind_lines(
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
    if statuses:
        status = statuses[-1]
        failures = status.get("sink_failures") or {}
        rows.append(("analysis failures", str(status.get("analysis_failures", 0))))
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
            points = [(int(r["step"]), v) for r in records if (v := _number(r.get(field_name))) is not None]
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
        _add_kind_lines(figure, series, colours, kinds, legend=True)
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
    _layout(
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
    return Panel("panel-logp", PANELS[1][1], note, _figure_html(figure, "figure-logp"))


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
        _add_kind_lines(figure, kind_means(probes, field_name), colours, kinds, row=1, col=index + 1, legend=index == 0)
        figure.update_xaxes(title_text="optimizer step", row=1, col=index + 1)
    _layout(figure, 420)
    return Panel("panel-squeezing", PANELS[2][1], note, _figure_html(figure, "figure-squeezing"))


def prediction_panel(data: RunData) -> Panel:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    note = (
        "Left: each point is one probe response at one analysed step; x is the change predicted to first order "
        "along the real update (<grad lp, dw>), y the change observed after the step. On the diagonal the local "
        "(eNTK) picture holds; far from it the step was too large for it. Right: the linearization gap "
        "(observed - predicted), mean per kind."
    )
    dynamics = [
        r
        for r in data.of("dynamics")
        if _number(r.get("observed")) is not None and _number(r.get("predicted")) is not None
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
                marker={"color": colours[kind], "size": 7, "opacity": 0.8},
                text=[
                    f"{html.escape(str(r.get('probe_id')))} step {r['step']}<br>gap {_number(r.get('gap')) or 0:+.4g}"
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
    _add_kind_lines(figure, gaps, colours, kinds, row=1, col=2, legend=False)
    figure.update_xaxes(title_text="predicted change", row=1, col=1)
    figure.update_yaxes(title_text="observed change", row=1, col=1)
    figure.update_xaxes(title_text="optimizer step", row=1, col=2)
    figure.update_yaxes(title_text="observed - predicted", row=1, col=2)
    _layout(figure, 460)
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
    body = f"<p class='summary'>{html.escape(summary)}</p>" + _figure_html(figure, "figure-prediction")
    return Panel("panel-prediction", PANELS[3][1], note, body)


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
        _add_kind_lines(figure, kind_means(dynamics, path), colours, kinds, row=1, col=index + 1, legend=index == 0)
    for index, group in enumerate(groups):
        _add_kind_lines(
            figure, kind_means(dynamics, f"groups.{group}"), colours, kinds, row=2, col=index + 1, legend=False
        )
    figure.update_xaxes(title_text="optimizer step")
    figure.update_yaxes(title_text="predicted change (nats)", col=1)
    _layout(figure, 420 * rows)
    return Panel("panel-split", PANELS[4][1], note, _figure_html(figure, "figure-split"))


def _plotly_label(token: Any) -> str:
    return html.escape(display_token(token), quote=False)


def _rounded(matrix: np.ndarray) -> list[list[float]]:
    return [[float(f"{value:.4g}") for value in row] for row in matrix.tolist()]


def attribution_data(
    data: RunData,
    max_steps: int = 40,
    max_rows: int = 96,
    max_cols: int = 160,
    max_cells: int = 1_500_000,
    progress: bool = True,
) -> dict[str, Any] | None:
    """What the heat-map panel draws: per probe, per step, the attribution block and its token labels.

    At most `max_rows` probe tokens and `max_cols` training tokens per block (those with the largest total |a|, in
    their original order), values to 4 significant digits; at most `max_steps` archives, fewer if the blocks of that
    many steps would exceed `max_cells` values in all (evenly spaced over the run, last included), so the report
    stays small enough to open.
    """
    if not data.archives:
        return None
    cells_per_step = _cells(data.archives[-1][1], max_rows, max_cols)
    steps = max(1, min(max_steps, max_cells // max(cells_per_step, 1)))
    archives = data.archives
    if len(archives) > steps:
        picks = np.unique(np.linspace(0, len(archives) - 1, steps).round().astype(int))
        archives = [archives[i] for i in picks]
    kinds_by_probe = {pid: str(entry.get("kind")) for pid, entry in data.probes.items()}
    kinds_by_probe.update({str(r.get("probe_id")): str(r.get("kind")) for r in data.of("dynamics")})
    probes: dict[str, dict[str, Any]] = {}
    for step, path in tqdm(archives, desc="attribution maps", disable=not progress):
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            logger.warning("cannot read %s (%s); skipped", path, error)
            continue
        with archive:
            keys = set(archive.files)
            train_tokens = archive["train.tokens"].tolist() if "train.tokens" in keys else None
            train_rows = archive["train.row"].tolist() if "train.row" in keys else None
            for key in sorted(keys):
                if key.startswith("train.") or key.endswith(".tokens"):
                    continue
                matrix = np.nan_to_num(np.asarray(archive[key], dtype=np.float32))
                if matrix.ndim != 2 or matrix.size == 0:
                    continue
                tokens = archive[f"{key}.tokens"].tolist() if f"{key}.tokens" in keys else None
                rows = _top(np.abs(matrix).sum(axis=1), max_rows)
                cols = _top(np.abs(matrix).sum(axis=0), max_cols)
                block = matrix[np.ix_(rows, cols)]
                y = [_plotly_label(tokens[i]) if tokens and i < len(tokens) else str(i) for i in rows]
                x = [_plotly_label(train_tokens[j]) if train_tokens and j < len(train_tokens) else str(j) for j in cols]
                row_of = [int(train_rows[j]) if train_rows and j < len(train_rows) else 0 for j in cols]
                entry = probes.setdefault(key, {"kind": kinds_by_probe.get(key, "?"), "steps": [], "by_step": {}})
                entry["steps"].append(step)
                entry["by_step"][str(step)] = {
                    "z": _rounded(block),
                    "y": y,
                    "x": x,
                    "row": row_of,
                    "shape": list(matrix.shape),
                    "total": float(f"{float(matrix.sum()):.4g}"),
                }
    if not probes:
        return None
    order = {kind: index for index, kind in enumerate(data.kinds)}
    ordered = dict(sorted(probes.items(), key=lambda item: (order.get(item[1]["kind"], len(order)), item[0])))
    from plotly.colors import get_colorscale

    return {"probes": ordered, "colorscale": get_colorscale("PiYG")}


def _cells(path: Path, max_rows: int, max_cols: int) -> int:
    """Values one archive contributes to the heat-map panel (0 if it cannot be read)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes = [archive[key].shape for key in archive.files if not key.startswith("train.")]
    except (OSError, ValueError):
        return 0
    return sum(min(shape[0], max_rows) * min(shape[1], max_cols) for shape in shapes if len(shape) == 2)


def _top(weights: np.ndarray, limit: int) -> np.ndarray:
    if weights.shape[0] <= limit:
        return np.arange(weights.shape[0])
    return np.sort(np.argsort(-weights, kind="stable")[:limit])


def _json_for_script(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


_ATTRIBUTION_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("attribution-data").textContent);
  var select = document.getElementById("attribution-probe");
  var slider = document.getElementById("attribution-step");
  var label = document.getElementById("attribution-step-label");
  function draw() {
    var probe = data.probes[select.value];
    slider.max = probe.steps.length - 1;
    if (+slider.value > probe.steps.length - 1) { slider.value = probe.steps.length - 1; }
    var step = probe.steps[+slider.value];
    var block = probe.by_step[String(step)];
    label.textContent = "step " + step + " (" + (+slider.value + 1) + " of " + probe.steps.length + ")";
    var text = block.y.map(function (probeToken) {
      return block.x.map(function (trainToken, j) {
        return "probe token: " + probeToken + "<br>training token: " + trainToken + " (row " + block.row[j] + ")";
      });
    });
    var index = function (n) { var out = []; for (var i = 0; i < n; i++) { out.push(i); } return out; };
    var trace = {
      type: "heatmap", z: block.z, x: index(block.x.length), y: index(block.y.length), text: text,
      hovertemplate: "%{text}<br>a = %{z:.4g}<extra></extra>", colorscale: data.colorscale, zmid: 0,
      colorbar: {title: {text: "a[m, l]"}}
    };
    var shown = block.z.length + " x " + block.x.length + " of " + block.shape[0] + " x " + block.shape[1];
    var layout = {
      template: "plotly_white",
      title: {text: select.value + " (" + probe.kind + "), step " + step + "; sum of a: " + block.total +
                    "; shown " + shown},
      height: Math.max(320, 16 * block.y.length + 190),
      margin: {l: 110, r: 30, t: 60, b: 120},
      xaxis: {title: {text: "training token"}, tickvals: index(block.x.length), ticktext: block.x, tickangle: -90,
              tickfont: {size: 9}},
      yaxis: {title: {text: "probe token"}, tickvals: index(block.y.length), ticktext: block.y, autorange: "reversed",
              tickfont: {size: 10}}
    };
    Plotly.react("attribution-heatmap", [trace], layout, {displaylogo: false, responsive: true});
  }
  select.addEventListener("change", draw);
  slider.addEventListener("input", draw);
  draw();
})();
"""


def attribution_panel(data: RunData, attribution: dict[str, Any] | None) -> Panel:
    note = (
        "The attribution matrix a[m, l] of one probe response at one analysed step: how much training token l "
        "(x) moved the log-prob of probe token m (y) through the optimizer's current-gradient step. Green raises the "
        "probe token, pink lowers it. Hover a cell for both tokens. Pick a probe, slide through the steps. Large "
        "matrices show the rows and columns with the largest total |a|."
    )
    if attribution is None:
        return Panel("panel-attribution", PANELS[5][1], note, None)
    options = "".join(
        f'<option value="{html.escape(pid, quote=True)}">{html.escape(pid)} ({html.escape(entry["kind"])})</option>'
        for pid, entry in attribution["probes"].items()
    )
    first = next(iter(attribution["probes"].values()))
    body = (
        '<div class="controls"><label>probe <select id="attribution-probe">' + options + "</select></label>"
        f'<label>step <input type="range" id="attribution-step" min="0" max="{len(first["steps"]) - 1}" '
        f'value="{len(first["steps"]) - 1}" step="1"></label><span id="attribution-step-label"></span></div>'
        '<div id="attribution-heatmap" class="plot"></div>'
        f'<script type="application/json" id="attribution-data">{_json_for_script(attribution)}</script>'
        f"<script>{_ATTRIBUTION_SCRIPT}</script>"
    )
    return Panel("panel-attribution", PANELS[5][1], note, body)


def _chips(entries: Any, direction: str) -> str:
    chips = []
    for entry in entries or []:
        value = _number(entry.get("value"))
        title = f"context: {entry.get('context', '')!s}\nrow {entry.get('row', '?')}"
        chips.append(
            f'<span class="chip {direction}" title="{html.escape(title, quote=True)}">'
            f"{html.escape(display_token(entry.get('text', '')))} "
            f"<small>{'' if value is None else f'{value:+.3g}'}</small></span>"
        )
    return " ".join(chips) or "<span class='muted'>none</span>"


_TOP_SCRIPT = """
(function () {
  var select = document.getElementById("top-step");
  function show() {
    document.querySelectorAll("#panel-top-tokens .top-step").forEach(function (block) {
      block.style.display = block.getAttribute("data-step") === select.value ? "" : "none";
    });
  }
  select.addEventListener("change", show);
  show();
})();
"""


def top_tokens_panel(data: RunData, max_steps: int = 200) -> Panel:
    note = (
        "For each probe response, the training tokens whose gradient pushed its log-prob up the most and down the "
        "most at the chosen step (column sums of the attribution matrix). Hover a token for its context."
    )
    dynamics = [r for r in data.of("dynamics") if r.get("top_up") or r.get("top_down")]
    if not dynamics:
        return Panel("panel-top-tokens", PANELS[6][1], note, None)
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in dynamics:
        by_step[int(record["step"])].append(record)
    steps = sorted(by_step)[-max_steps:]
    order = {kind: index for index, kind in enumerate(data.kinds)}
    blocks = []
    for step in steps:
        rows = []
        for record in sorted(
            by_step[step], key=lambda r: (order.get(r.get("kind"), len(order)), str(r.get("probe_id")))
        ):
            observed, predicted = _number(record.get("observed")), _number(record.get("predicted"))
            rows.append(
                f"<tr><td>{html.escape(str(record.get('probe_id')))}</td><td>{html.escape(str(record.get('kind')))}</td>"
                f"<td>{'' if observed is None else f'{observed:+.3g}'}</td>"
                f"<td>{'' if predicted is None else f'{predicted:+.3g}'}</td>"
                f"<td>{_chips(record.get('top_up'), 'up')}</td><td>{_chips(record.get('top_down'), 'down')}</td></tr>"
            )
        blocks.append(
            f'<div class="top-step" data-step="{step}"><table class="data"><tr><th>probe</th><th>kind</th>'
            "<th>observed</th><th>predicted</th><th>pushed up by</th><th>pushed down by</th></tr>"
            + "".join(rows)
            + "</table></div>"
        )
    options = "".join(f'<option value="{s}"{" selected" if s == steps[-1] else ""}>step {s}</option>' for s in steps)
    body = (
        f'<div class="controls"><label>step <select id="top-step">{options}</select></label></div>'
        + "".join(blocks)
        + f"<script>{_TOP_SCRIPT}</script>"
    )
    return Panel("panel-top-tokens", PANELS[6][1], note, body)


def lld_panel(data: RunData) -> Panel:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    note = (
        "Per GRPO group, the mean change of the log-likelihood of its positive-advantage (correct) completions over "
        "one step: observed, predicted, and the part due to negative-advantage completions. Lazy likelihood "
        "displacement is this change being small or negative. Right: the share of groups where it was negative."
    )
    records = data.of("lld")
    if not records:
        return Panel("panel-lld", PANELS[7][1], note, None)
    figure = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.65, 0.35],
        horizontal_spacing=0.1,
        subplot_titles=("change of positive completions' log-likelihood", "groups with change < 0"),
    )
    figure.add_trace(
        go.Scatter(
            x=[r["step"] for r in records if _number(r.get("delta_observed")) is not None],
            y=[r["delta_observed"] for r in records if _number(r.get("delta_observed")) is not None],
            mode="markers",
            name="observed, per group",
            marker={"color": "#bbb", "size": 6},
            text=[f"group {r.get('group')}" for r in records if _number(r.get("delta_observed")) is not None],
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
            figure.add_trace(
                go.Scatter(
                    x=steps,
                    y=values,
                    mode="lines+markers",
                    name=name,
                    line={"color": colour, "dash": dash, "width": 2.5},
                ),
                row=1,
                col=1,
            )
    negative: dict[int, list[float]] = defaultdict(list)
    for record in records:
        value = _number(record.get("delta_observed"))
        if value is not None:
            negative[int(record["step"])].append(1.0 if value < 0 else 0.0)
    steps = sorted(negative)
    figure.add_trace(
        go.Bar(
            x=steps,
            y=[sum(negative[s]) / len(negative[s]) for s in steps],
            name="share < 0",
            marker={"color": "#d62728"},
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    figure.add_hline(y=0, line={"color": "#444", "width": 1}, row=1, col=1)
    figure.update_xaxes(title_text="optimizer step")
    figure.update_yaxes(title_text="nats", row=1, col=1)
    figure.update_yaxes(range=[0, 1], row=1, col=2)
    _layout(figure, 420)
    return Panel("panel-lld", PANELS[7][1], note, _figure_html(figure, "figure-lld"))


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
    _layout(figure, 360)
    return Panel("panel-nthr", PANELS[8][1], note, _figure_html(figure, "figure-nthr"))


# ---------------------------------------------------------------------------------------------------------------------
# The page

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f7f9; color: #222; }
header { background: #1f2937; color: #fff; padding: 16px 28px; }
header h1 { margin: 0 0 6px 0; font-size: 22px; }
header nav a { color: #cbd5e1; margin-right: 14px; font-size: 13px; text-decoration: none; }
main { max-width: 1400px; margin: 0 auto; padding: 12px 24px 40px; }
.panel { background: #fff; border: 1px solid #e3e6ea; border-radius: 8px; padding: 14px 20px; margin: 18px 0; }
.panel h2 { margin: 0 0 4px 0; font-size: 18px; }
.panel h3 { font-size: 14px; margin: 16px 0 6px; }
.note { color: #555; font-size: 13px; margin: 2px 0 10px; max-width: 1100px; }
.no-data { color: #888; font-style: italic; }
.summary { font-size: 13px; color: #333; }
table.kv th { text-align: left; padding: 2px 14px 2px 0; color: #555; font-weight: 600; vertical-align: top; }
table.kv td { padding: 2px 0; }
table.data { border-collapse: collapse; font-size: 13px; }
table.data th, table.data td { border-bottom: 1px solid #eee; padding: 4px 10px; text-align: left; }
table.data td { vertical-align: top; }
td.up { color: #2e7d32; } td.down { color: #c2185b; }
.controls { display: flex; gap: 18px; align-items: center; margin: 6px 0 10px; font-size: 13px; }
.controls input[type=range] { width: 320px; vertical-align: middle; }
.chip { display: inline-block; border-radius: 4px; padding: 0 5px; margin: 1px; font-family: monospace; }
.chip.up { background: #dcedc8; } .chip.down { background: #f8bbd0; }
.muted { color: #999; }
pre { font-size: 12px; background: #f6f7f9; padding: 8px; overflow: auto; max-height: 400px; }
"""


def render_report(data: RunData, max_heatmap_steps: int = 40, progress: bool = True) -> str:
    """The report page of `data` as one HTML string (plotly.js inlined)."""
    from plotly.offline import get_plotlyjs

    attribution = attribution_data(data, max_steps=max_heatmap_steps, progress=progress)
    panels = [
        run_panel(data),
        logp_panel(data),
        squeezing_panel(data),
        prediction_panel(data),
        split_panel(data),
        attribution_panel(data, attribution),
        top_tokens_panel(data),
        lld_panel(data),
        nthr_panel(data),
    ]
    nav = "".join(f'<a href="#{panel.panel_id}">{html.escape(panel.title)}</a>' for panel in panels)
    runs = data.of("run")
    trainer = str(runs[-1].get("trainer", "")) if runs else ""
    title = f"Learning dynamics report: {data.run_dir.name}" + (f" ({trainer})" if trainer else "")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<header><h1>{html.escape(title)}</h1><nav>{nav}</nav></header><main>"
        + "".join(panel.html() for panel in panels)
        + "</main></body></html>\n"
    )


def build_report(
    run_dir: str | Path, out_path: str | Path | None = None, *, max_heatmap_steps: int = 40, progress: bool = True
) -> Path:
    """Write the self-contained HTML report of a run folder.

    Usage:
        path = build_report("out/dynamics")             # -> out/dynamics/report.html

    Args:
        run_dir (`str` or `Path`): the folder with `dynamics.jsonl` (or the trainer's output dir above it, or the
            JSONL file itself).
        out_path (`str` or `Path`, *optional*): defaults to `report.html` beside the JSONL.
        max_heatmap_steps (`int`, *optional*, defaults to `40`): attribution archives drawn in the heat-map panel
            (evenly spaced over the run, last included).
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    Returns:
        `Path`: the report file.
    """
    data = load_run(run_dir, progress=progress)
    out = Path(out_path) if out_path is not None else data.run_dir / "report.html"
    page = render_report(data, max_heatmap_steps=max_heatmap_steps, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    logger.info("wrote %s", out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`trl-ntk report RUN_DIR [-o OUT]`: `argv` are the arguments after `report`."""
    parser = argparse.ArgumentParser(
        prog="trl-ntk report", description="Write the self-contained HTML report of a learning-dynamics run folder."
    )
    parser.add_argument("run_dir", help="folder with dynamics.jsonl (e.g. <output_dir>/dynamics)")
    parser.add_argument("-o", "--output", default=None, help="report file (default: RUN_DIR/report.html)")
    parser.add_argument("--max-heatmap-steps", type=int, default=40, help="attribution steps in the heat-map panel")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        path = build_report(
            args.run_dir, args.output, max_heatmap_steps=args.max_heatmap_steps, progress=not args.quiet
        )
    except FileNotFoundError as error:
        parser.exit(2, f"trl-ntk report: {error}\n")
    sys.stdout.write(f"{path}\n")
    return 0
