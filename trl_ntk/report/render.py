"""A self-contained HTML report of one run folder (`dynamics.jsonl` and `attributions/*.npz`).

One file, plotly.js inlined: it opens from disk, offline, with no server. `trl-ntk report RUN_DIR` calls `main`.
Every panel sits in a `<section id="panel-...">` (see `PANEL_IDS`); a panel without data says so instead. A run that
is one arm of a comparison (an `arms.json` beside it lists it, see `trl_ntk.report.arms`) also gets the arms panel,
`panel-arms`, after the run panel.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from trl_ntk.output.schema import SchemaError
from trl_ntk.report.arms import Arms, arms_panel, find_arms, load_arms
from trl_ntk.report.attribution import attribution_data, attribution_panel, top_tokens_panel
from trl_ntk.report.figures import PANEL_IDS, PANELS, kind_means, step_means
from trl_ntk.report.load import KIND_ORDER, RunData, find_jsonl, load_run
from trl_ntk.report.panels import (
    lld_panel,
    logp_panel,
    nthr_panel,
    prediction_panel,
    run_panel,
    split_panel,
    squeezing_panel,
)

__all__ = [
    "KIND_ORDER",
    "PANELS",
    "PANEL_IDS",
    "RunData",
    "attribution_data",
    "build_report",
    "find_jsonl",
    "kind_means",
    "load_run",
    "main",
    "render_report",
    "step_means",
]

logger = logging.getLogger(__name__)


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


def render_report(data: RunData, max_heatmap_steps: int = 40, progress: bool = True, arms: Arms | None = None) -> str:
    """The report page of `data` as one HTML string (plotly.js inlined); `arms`, the comparison `data` is one arm of,
    adds the arms panel."""
    from plotly.offline import get_plotlyjs

    attribution = attribution_data(data, max_steps=max_heatmap_steps, progress=progress)
    compared = arms_panel(arms)
    panels = [
        run_panel(data),
        *([compared] if compared is not None else []),
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
        out_path (`str` or `Path`, *optional*): the report file, or a folder to write `report.html` in; defaults to
            `report.html` beside the JSONL. The page is written to a temporary file and renamed; no temporary file
            is left behind, even on failure.
        max_heatmap_steps (`int`, *optional*, defaults to `40`): attribution archives drawn in the heat-map panel
            (evenly spaced over the run, last included).
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    An `arms.json` in the run folder's parent or grandparent that lists the run as one of several arms adds the arms
    panel (`trl_ntk.report.arms`).

    Returns:
        `Path`: the report file.
    """
    if isinstance(max_heatmap_steps, bool) or not isinstance(max_heatmap_steps, int) or max_heatmap_steps < 1:
        raise ValueError(f"max_heatmap_steps must be a positive integer, got {max_heatmap_steps!r}")
    data = load_run(run_dir, progress=progress)
    out = Path(out_path) if out_path is not None else data.run_dir / "report.html"
    if out.is_dir():
        out = out / "report.html"
    manifest = find_arms(data.run_dir)
    arms = load_arms(manifest) if manifest is not None else None
    page = render_report(data, max_heatmap_steps=max_heatmap_steps, progress=progress, arms=arms)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    logger.info("wrote %s", out)
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """`trl-ntk report RUN_DIR [-o OUT]`: `argv` are the arguments after `report`."""
    parser = argparse.ArgumentParser(
        prog="trl-ntk report", description="Write the self-contained HTML report of a learning-dynamics run folder."
    )
    parser.add_argument("run_dir", help="folder with dynamics.jsonl (e.g. <output_dir>/dynamics)")
    parser.add_argument(
        "-o",
        "--output-dir",
        "--output",
        dest="output",
        default=None,
        help="where the report goes: a folder (gets report.html) or an .html file (default: RUN_DIR/report.html)",
    )
    parser.add_argument(
        "--max-heatmap-steps", type=_positive_int, default=40, help="attribution steps in the heat-map panel"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        path = build_report(
            args.run_dir, args.output, max_heatmap_steps=args.max_heatmap_steps, progress=not args.quiet
        )
    except (OSError, SchemaError) as error:
        parser.exit(2, f"trl-ntk report: {error}\n")
    except ImportError as error:
        parser.exit(2, f"trl-ntk report: {error}; the report needs plotly: pip install plotly\n")
    sys.stdout.write(f"{path}\n")
    return 0
