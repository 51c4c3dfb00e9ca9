"""The arms panel: several runs of one comparison (plain DPO against each DPO fix, plain GRPO against NTHR) side by
side, from the `arms.json` manifest the demo writes beside the runs.

`arms.json` (one per comparison, in the folder that holds the arms' run folders):

    {"trainer": "dpo" | "grpo",
     "arms": [{"name": str, "run_dir": str (relative to the manifest), "rewards": {"steps": [...], "values": [...]}}],
     "table": {"columns": [str, ...], "rows": [[arm name, value or null, ...], ...], "note": str}}

`rewards` (GRPO, optional) is the trainer's logged mean reward per logging step. The trajectories are read from each
arm's own records: DPO, the chosen / rejected / greedy summed log-prob and the teacher-forced argmax log-prob along
chosen (mean over the probes of the kind); GRPO, the reward, the share of mixed groups whose correct completions'
log-likelihood did not rise (`delta_observed <= 0`) and the mean of that change per analysed step.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_ntk.report.figures import Panel, apply_layout, as_number, figure_html, kind_means, step_means
from trl_ntk.report.load import RunData, load_run

logger = logging.getLogger(__name__)

ARMS_FILE = "arms.json"
ARMS_PANEL = ("panel-arms", "Arms compared")
ARM_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")

Series = tuple[list[int], list[float]]


@dataclass
class Arm:
    """One arm: its name, its records, and (GRPO) the logged reward per step."""

    name: str
    data: RunData
    rewards: Series | None = None


@dataclass
class Arms:
    """The arms of one comparison and the demo's table of them (`columns`, one row per arm)."""

    trainer: str
    arms: list[Arm]
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""


def find_arms(run_dir: str | Path) -> Path | None:
    """The `arms.json` that lists `run_dir` (a run's `dynamics` folder) as one of its arms: looked for in the run
    folder's parent and grandparent (the demo's output folder holds the plain arm's `dynamics/` and one subfolder
    per other arm). None when there is none, or it lists a single arm."""
    run_dir = Path(run_dir).resolve()
    for folder in (run_dir.parent, run_dir.parent.parent):
        manifest = folder / ARMS_FILE
        if not manifest.is_file():
            continue
        try:
            entries = json.loads(manifest.read_text()).get("arms") or []
        except (OSError, ValueError, AttributeError) as error:
            logger.warning("cannot read %s: %s", manifest, error)
            continue
        dirs = {(folder / str(entry.get("run_dir", ""))).resolve() for entry in entries if isinstance(entry, dict)}
        if len(entries) > 1 and run_dir in dirs:
            return manifest
    return None


def load_arms(manifest: str | Path) -> Arms:
    """Read `arms.json` and every arm's records (`load_run` on its `run_dir`)."""
    manifest = Path(manifest)
    content = json.loads(manifest.read_text())
    arms = []
    for entry in content["arms"]:
        rewards = entry.get("rewards") or {}
        series = (list(rewards["steps"]), list(rewards["values"])) if rewards.get("steps") else None
        data = load_run(manifest.parent / entry["run_dir"], progress=False)
        arms.append(Arm(str(entry["name"]), data, series))
    table = content.get("table") or {}
    return Arms(
        str(content.get("trainer", "")),
        arms,
        list(table.get("columns", [])),
        [list(row) for row in table.get("rows", [])],
        str(table.get("note", "")),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Trajectories


def dpo_series(data: RunData) -> dict[str, Series]:
    """`{"chosen", "rejected", "argmax (chosen)", "greedy"}` -> (steps, mean summed log-prob) of one DPO arm (the
    kinds it scored)."""
    probes = data.of("probe")
    logp = kind_means(probes, "logp_sum")
    out = {kind: logp[kind] for kind in ("chosen", "rejected") if kind in logp}
    argmax = kind_means(probes, "argmax_logp")
    if "chosen" in argmax:
        out["argmax (chosen)"] = argmax["chosen"]
    if "greedy" in logp:
        out["greedy"] = logp["greedy"]
    return out


def lld_series(data: RunData) -> dict[str, Series]:
    """Per analysed step of one GRPO arm: the share of groups with `delta_observed <= 0` and the mean
    `delta_observed` (the change of the correct completions' summed log-likelihood over the step)."""
    records = data.of("lld")
    nonpositive: dict[int, list[float]] = defaultdict(list)
    for record in records:
        value = as_number(record.get("delta_observed"))
        if value is not None:
            nonpositive[int(record["step"])].append(1.0 if value <= 0 else 0.0)
    steps = sorted(nonpositive)
    out: dict[str, Series] = {}
    if steps:
        out["share of groups with delta <= 0"] = (steps, [sum(nonpositive[s]) / len(nonpositive[s]) for s in steps])
        out["mean delta of the positives (nats)"] = step_means(records, "delta_observed")
    return out


def arm_series(arms: Arms) -> list[tuple[str, dict[str, Series]]]:
    """Per arm, its trajectories by subplot title (GRPO: the reward first)."""
    out = []
    for arm in arms.arms:
        if arms.trainer == "grpo":
            series = {"reward (mean per logging step)": arm.rewards} if arm.rewards else {}
            series.update(lld_series(arm.data))
        else:
            series = dpo_series(arm.data)
        out.append((arm.name, series))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Panel


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("yes" if value else "no")
    if isinstance(value, int | float):
        return f"{value:+.3f}" if math.isfinite(value) else ""
    return html.escape(str(value))


def arms_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The demo's arm table as HTML (numbers with 3 decimals and their sign)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="data" id="arms-table"><tr>{head}</tr>{body}</table>'


def _titles(per_arm: Sequence[tuple[str, Mapping[str, Series]]]) -> list[str]:
    titles: list[str] = []
    for _, series in per_arm:
        titles += [t for t in series if t not in titles]
    return titles


def arms_panel(arms: Arms | None) -> Panel | None:
    """The arms side by side (one subplot per trajectory, one colour per arm) and the demo's table; None for a
    single run (no panel)."""
    if arms is None or len(arms.arms) < 2:
        return None
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    note = (
        "Every arm of the comparison, trained from the same start and seed. "
        + (
            "DPO: mean summed log-prob of the chosen, rejected and greedy responses and the teacher-forced argmax "
            "along chosen; a fix that reduces the squeeze keeps chosen higher and the argmax lower than plain DPO."
            if arms.trainer != "grpo"
            else "GRPO: logged mean reward; per analysed step, the share of mixed groups whose correct completions' "
            "log-likelihood did not rise (delta <= 0, lazy likelihood displacement) and the mean of that change."
        )
        + (f" {arms.note}" if arms.note else "")
    )
    per_arm = arm_series(arms)
    titles = _titles(per_arm)
    body = ""
    if titles:
        figure = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.06)
        for index, (name, series) in enumerate(per_arm):
            colour = ARM_COLOURS[index % len(ARM_COLOURS)]
            for col, title in enumerate(titles, start=1):
                if title not in series:
                    continue
                steps, values = series[title]
                figure.add_trace(
                    go.Scatter(
                        x=steps,
                        y=values,
                        mode="lines+markers",
                        name=name,
                        legendgroup=name,
                        showlegend=col == 1,
                        line={"color": colour, "width": 2.5},
                        marker={"size": 5},
                        hovertemplate=f"{html.escape(name)}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
                figure.update_xaxes(title_text="optimizer step", row=1, col=col)
        apply_layout(figure, 420)
        body += figure_html(figure, "figure-arms")
    if arms.columns:
        body += "<h3>The arms (as the demo prints them)</h3>" + arms_table(arms.columns, arms.rows)
    return Panel(ARMS_PANEL[0], ARMS_PANEL[1], note, body or None)
