"""The LLD panel: the GWHES-vs-observed-change scatter appears exactly when `lld` records carry a GWHES."""

from __future__ import annotations

from pathlib import Path

from trl_ntk.output import schema
from trl_ntk.report import panels
from trl_ntk.report.load import RunData


def _records(with_gwhes: bool) -> list[dict]:
    out = []
    for step in (0, 1):
        for group, (delta, score) in enumerate([(-0.3, 4.0), (0.1, -2.0), (0.05, None)]):
            fields = {"gwhes": score, "gwhes_negative": None, "gwhes_positive": None} if with_gwhes else {}
            out.append(
                schema.lld_record(
                    step,
                    group=group,
                    delta_observed=delta + step,
                    delta_predicted=delta,
                    delta_from_negative=-0.1,
                    num_positive=2,
                    num_negative=2,
                    **fields,
                )
            )
    return out


def _figure(monkeypatch, records: list[dict]):
    """The plotly figure `lld_panel` renders."""
    figures = []
    monkeypatch.setattr(panels, "figure_html", lambda figure, div_id: figures.append(figure) or "")
    panels.lld_panel(RunData(Path("."), {"lld": records}))
    (figure,) = figures
    return figure


def test_lld_panel_plots_gwhes_against_the_observed_change(monkeypatch):
    figure = _figure(monkeypatch, _records(with_gwhes=True))
    scatter = [t for t in figure.data if t.xaxis == "x3"]
    assert len(scatter) == 1
    # groups without a GWHES (not mixed) are left out; one point per (step, group) otherwise
    assert list(scatter[0].x) == [4.0, -2.0, 4.0, -2.0]
    assert list(scatter[0].y) == [-0.3, 0.1, 0.7, 1.1]


def test_lld_panel_without_gwhes_has_two_columns(monkeypatch):
    figure = _figure(monkeypatch, _records(with_gwhes=False))
    assert not [t for t in figure.data if t.xaxis == "x3"]
    assert "GWHES vs observed change" not in [a.text for a in figure.layout.annotations]
