"""The look-ahead section of the report: the most harmful and most helpful training examples for one probe objective,
with their text, and the distribution of the predicted effects over every objective.

Input: the records of a `lookahead.jsonl` (`LookaheadResult.records()`: one `lookahead_run` header, then one
`lookahead_example` per scored example). `build_lookahead_report` writes a self-contained page (plotly.js inlined);
`lookahead_panel` returns the section alone for a larger page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trl_ntk.report.figures import Panel, apply_layout, figure_html, kind_colours

PANEL_ID = "panel-lookahead"
_TEXT_ORDER = ("prompt", "chosen", "rejected", "completion", "messages", "text")


def read_lookahead(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `lookahead.jsonl` (blank and damaged lines skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and str(record.get("type", "")).startswith("lookahead"):
            out.append(record)
    return out


def _split(records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[Mapping[str, Any]]]:
    header = next((r for r in records if r.get("type") == "lookahead_run"), {})
    examples = [r for r in records if r.get("type") in ("lookahead_example", "lookahead") and "effect" in r]
    return dict(header), examples


def ranked(examples: Sequence[Mapping[str, Any]], objective: str, top: int) -> tuple[list, list]:
    """`(most harmful, most helpful)`: the `top` examples with the most negative / most positive effect on
    `objective`, in that order (examples without a finite value are left out)."""
    valued = [e for e in examples if isinstance(e["effect"].get(objective), (int, float))]
    order = sorted(valued, key=lambda e: e["effect"][objective])
    harmful = [e for e in order[:top] if e["effect"][objective] < 0]
    helpful = [e for e in order[::-1][:top] if e["effect"][objective] > 0]
    return harmful, helpful


def _text_cell(text: Mapping[str, str]) -> str:
    parts = [
        f"<b>{html.escape(column)}</b>: {html.escape(str(text[column]))}" for column in _TEXT_ORDER if column in text
    ]
    return "<br>".join(parts) or '<span class="muted">(no text)</span>'


def _number(value: Any) -> str:
    return f"{value:+.3e}" if isinstance(value, (int, float)) else "n/a"


def _table(examples: Sequence[Mapping[str, Any]], objective: str) -> str:
    if not examples:
        return '<p class="no-data">None.</p>'
    rows = []
    for example in examples:
        effect = example["effect"][objective]
        rows.append(
            f"<tr><td>{int(example['index'])}</td>"
            f'<td class="{"down" if effect < 0 else "up"}">{_number(effect)}</td>'
            f"<td>{_number(example.get('positive_gradient', {}).get(objective))}</td>"
            f"<td>{_number(example.get('negative_gradient', {}).get(objective))}</td>"
            f"<td>{_text_cell(example.get('text', {}))}</td></tr>"
        )
    head = "<tr><th>row</th><th>effect</th><th>pulled-up part</th><th>pushed-down part</th><th>text</th></tr>"
    return f'<table class="data">{head}{"".join(rows)}</table>'


def _distribution(examples: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> str:
    import plotly.graph_objects as go

    colours = kind_colours(list(objectives))
    figure = go.Figure()
    for objective in objectives:
        values = [e["effect"][objective] for e in examples if isinstance(e["effect"].get(objective), (int, float))]
        figure.add_trace(
            go.Box(x=values, name=objective, marker_color=colours.get(objective), boxpoints="all", jitter=0.4)
        )
    apply_layout(figure, height=120 + 40 * len(objectives), top=40, showlegend=False)
    figure.update_xaxes(title_text="predicted change of the objective's log-prob from one step on the example")
    return figure_html(figure, "lookahead-distribution")


def lookahead_panel(records: Sequence[Mapping[str, Any]], objective: str | None = None, top: int = 10) -> Panel:
    """The look-ahead section: the view, the `top` most harmful and most helpful examples for `objective` (default
    `chosen`, else the first objective) with their text, and a box plot of the effects of every objective."""
    header, examples = _split(records)
    objectives = list(header.get("objectives") or (examples[0]["effect"] if examples else []))
    note = (
        "Predicted first-order change of each probe objective's log-prob from one optimizer step on each training "
        "example, before training. Negative: the step lowers it. Compare examples, not absolute values."
    )
    if not examples or not objectives:
        return Panel(PANEL_ID, "Look-ahead", note, None)
    objective = objective or ("chosen" if "chosen" in objectives else objectives[0])
    if objective not in objectives:
        raise ValueError(f"unknown objective {objective!r}; scored: {objectives}")
    harmful, helpful = ranked(examples, objective, top)
    values = [e["effect"][objective] for e in examples if isinstance(e["effect"].get(objective), (int, float))]
    negative = sum(v < 0 for v in values)
    view = html.escape(str(header.get("view", "?")))
    summary = (
        f'<p class="summary">view <b>{view}</b>, trainer {html.escape(str(header.get("trainer", "?")))}, '
        f"{len(examples)} examples; objective <b>{html.escape(objective)}</b>: {negative} of {len(values)} "
        "examples are predicted to lower it.</p>"
    )
    if header.get("estimate"):
        summary += f'<p class="summary">{html.escape(str(header["estimate"]))}</p>'
    body = (
        summary
        + f"<h3>Most harmful for {html.escape(objective)}</h3>{_table(harmful, objective)}"
        + f"<h3>Most helpful for {html.escape(objective)}</h3>{_table(helpful, objective)}"
        + f"<h3>Distribution of the effects</h3>{_distribution(examples, objectives)}"
    )
    return Panel(PANEL_ID, "Look-ahead", note, body)


def render_lookahead(records: Sequence[Mapping[str, Any]], objective: str | None = None, top: int = 10) -> str:
    """A self-contained page with the look-ahead section (plotly.js inlined)."""
    from plotly.offline import get_plotlyjs

    from trl_ntk.report.render import _STYLE

    panel = lookahead_panel(records, objective, top)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Look-ahead</title>"
        f'<style>{_STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<header><h1>Look-ahead</h1></header><main>{panel.html()}</main></body></html>\n"
    )


def build_lookahead_report(
    path: str | Path, out_path: str | Path | None = None, *, objective: str | None = None, top: int = 10
) -> Path:
    """Write the page of a `lookahead.jsonl` to `out_path` (default `lookahead.html` beside it); returns its path."""
    path = Path(path)
    out = Path(out_path) if out_path is not None else path.with_name("lookahead.html")
    out.write_text(render_lookahead(read_lookahead(path), objective, top), encoding="utf-8")
    return out
