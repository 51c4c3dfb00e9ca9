"""The report panels drawn from the attribution archives and the top tokens: the heat map with its step slider, and
the training tokens that pushed each probe up or down."""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from trl_ntk.output.drawing import display_token
from trl_ntk.report.figures import (
    PANELS,
    Panel,
    as_number,
)
from trl_ntk.report.load import RunData

logger = logging.getLogger(__name__)


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
            _add_archive(probes, step, path, kinds_by_probe, max_rows, max_cols)
        except Exception as error:  # noqa: BLE001 - a damaged archive (zip, zlib, npy errors) costs only its step
            logger.warning("cannot read %s (%s: %s); its heat maps are left out", path, type(error).__name__, error)
    if not probes:
        return None
    order = {kind: index for index, kind in enumerate(data.kinds)}
    ordered = dict(sorted(probes.items(), key=lambda item: (order.get(item[1]["kind"], len(order)), item[0])))
    from plotly.colors import get_colorscale

    return {"probes": ordered, "colorscale": get_colorscale("PiYG")}


def _add_archive(
    probes: dict[str, dict[str, Any]],
    step: int,
    path: Path,
    kinds_by_probe: Mapping[str, str],
    max_rows: int,
    max_cols: int,
) -> None:
    """Add one archive's blocks to `probes` (probe id -> kind, steps, block per step); raises if it is damaged."""
    blocks: dict[str, dict[str, Any]] = {}
    with np.load(path, allow_pickle=False) as archive:
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
            blocks[key] = attribution_block(matrix, tokens, train_tokens, train_rows, max_rows, max_cols)
    for key, block in blocks.items():  # only once the whole archive was read
        entry = probes.setdefault(key, {"kind": kinds_by_probe.get(key, "?"), "steps": [], "by_step": {}})
        entry["steps"].append(step)
        entry["by_step"][str(step)] = block


def attribution_block(
    matrix: np.ndarray,
    probe_tokens: Sequence[Any] | None,
    train_tokens: Sequence[Any] | None,
    train_rows: Sequence[int] | None,
    max_rows: int = 96,
    max_cols: int = 160,
) -> dict[str, Any]:
    """One heat-map block: the rows / columns of `matrix` with the largest total |a| (in their original order),
    values to 4 significant digits, and the labels the hover shows.

    Args:
        matrix (`np.ndarray[M, L]`): the attribution matrix `a[m, l]`.
        probe_tokens (length M), train_tokens (length L), train_rows (length L, the training row of each token):
            labels; a missing or short one falls back to indices (row 0).

    Returns:
        `{"z": [[float]] (m x l), "y": probe labels, "x": training labels, "row": rows of x, "shape": [M, L],
        "total": sum of a}`. Cost O(M L).
    """
    matrix = np.nan_to_num(np.asarray(matrix, dtype=np.float32))
    rows = _top(np.abs(matrix).sum(axis=1), max_rows)
    cols = _top(np.abs(matrix).sum(axis=0), max_cols)
    probe_tokens, train_tokens = list(probe_tokens or []), list(train_tokens or [])
    train_rows = list(train_rows or [])
    return {
        "z": _rounded(matrix[np.ix_(rows, cols)]),
        "y": [_plotly_label(probe_tokens[i]) if i < len(probe_tokens) else str(i) for i in rows],
        "x": [_plotly_label(train_tokens[j]) if j < len(train_tokens) else str(j) for j in cols],
        "row": [int(train_rows[j]) if j < len(train_rows) else 0 for j in cols],
        "shape": list(matrix.shape),
        "total": float(f"{float(matrix.sum()):.4g}"),
    }


def _cells(path: Path, max_rows: int, max_cols: int) -> int:
    """Values one archive contributes to the heat-map panel (0 if it cannot be read)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes = [archive[key].shape for key in archive.files if not key.startswith("train.")]
    except Exception:  # noqa: BLE001 - a damaged archive counts for nothing here; attribution_data reports it
        return 0
    return sum(min(shape[0], max_rows) * min(shape[1], max_cols) for shape in shapes if len(shape) == 2)


def _top(weights: np.ndarray, limit: int) -> np.ndarray:
    if weights.shape[0] <= limit:
        return np.arange(weights.shape[0])
    return np.sort(np.argsort(-weights, kind="stable")[:limit])


def _json_for_script(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


DRAW_SCRIPT = """
function drawAttribution(target, block, heading, colorscale) {
  var text = block.y.map(function (probeToken) {
    return block.x.map(function (trainToken, j) {
      return "probe token: " + probeToken + "<br>training token: " + trainToken + " (row " + block.row[j] + ")";
    });
  });
  var index = function (n) { var out = []; for (var i = 0; i < n; i++) { out.push(i); } return out; };
  var trace = {
    type: "heatmap", z: block.z, x: index(block.x.length), y: index(block.y.length), text: text,
    hovertemplate: "%{text}<br>a = %{z:.4g}<extra></extra>", colorscale: colorscale, zmid: 0,
    colorbar: {title: {text: "a[m, l]"}}
  };
  var shown = block.z.length + " x " + block.x.length + " of " + block.shape[0] + " x " + block.shape[1];
  var layout = {
    template: "plotly_white",
    title: {text: heading + "; sum of a: " + block.total + "; shown " + shown},
    height: Math.max(320, 16 * block.y.length + 190),
    margin: {l: 110, r: 30, t: 60, b: 120},
    xaxis: {title: {text: "training token"}, tickvals: index(block.x.length), ticktext: block.x, tickangle: -90,
            tickfont: {size: 9}},
    yaxis: {title: {text: "probe token"}, tickvals: index(block.y.length), ticktext: block.y, autorange: "reversed",
            tickfont: {size: 10}}
  };
  Plotly.react(target, [trace], layout, {displaylogo: false, responsive: true});
}
"""
"""The one heat-map figure (JavaScript, drawn with plotly.js): `drawAttribution(div id, block, heading, colorscale)`
with a block of `attribution_block`; the hover names the probe token, the training token with its row, and a."""

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
    label.textContent = "step " + step + " (" + (+slider.value + 1) + " of " + probe.steps.length + ")";
    drawAttribution("attribution-heatmap", probe.by_step[String(step)],
                    select.value + " (" + probe.kind + "), step " + step, data.colorscale);
  }
  select.addEventListener("change", draw);
  slider.addEventListener("input", draw);
  draw();
})();
"""

_STANDALONE_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("attribution-data").textContent);
  drawAttribution("attribution-heatmap", data.block, data.heading, data.colorscale);
})();
"""


def attribution_figure_html(block: Mapping[str, Any], heading: str) -> str:
    """A self-contained HTML page (plotly.js inlined, no network) drawing one `attribution_block` with the report's
    heat-map figure: hovering a cell shows the probe token, the training token with its row, and the value.

    Requires plotly. About 4.7 MB (the plotly.js bundle) plus the block.
    """
    from plotly.colors import get_colorscale
    from plotly.offline import get_plotlyjs

    data = {"block": dict(block), "heading": heading, "colorscale": get_colorscale("PiYG")}
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0;font-family:sans-serif">'
        f"<script>{get_plotlyjs()}</script>"
        '<div id="attribution-heatmap" class="plotly-graph-div"></div>'
        f'<script type="application/json" id="attribution-data">{_json_for_script(data)}</script>'
        f'<script id="attribution-draw">{DRAW_SCRIPT}{_STANDALONE_SCRIPT}</script></body></html>'
    )


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
        f"<script>{DRAW_SCRIPT}{_ATTRIBUTION_SCRIPT}</script>"
    )
    return Panel("panel-attribution", PANELS[5][1], note, body)


def _chips(entries: Any, direction: str) -> str:
    chips = []
    for entry in entries or []:
        value = as_number(entry.get("value"))
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
            observed, predicted = as_number(record.get("observed")), as_number(record.get("predicted"))
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
