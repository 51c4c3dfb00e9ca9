"""Pictures of attribution matrices for the dashboards: a matplotlib heat map (Agg canvas, pyplot never touched)
and tokens as coloured HTML spans."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def display_token(token: Any) -> str:
    """A token as a short readable label: newlines and tabs escaped, whitespace-only tokens shown as `␣`."""
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return text if text.strip() else "␣" * max(1, len(text))


def _top_indices(weights: np.ndarray, limit: int) -> np.ndarray:
    if weights.shape[0] <= limit:
        return np.arange(weights.shape[0])
    return np.sort(np.argsort(-weights, kind="stable")[:limit])


def render_attribution_heatmap(
    matrix: np.ndarray,
    probe_tokens: Sequence[str],
    train_tokens: Sequence[str],
    title: str = "",
    max_rows: int = 48,
    max_cols: int = 96,
) -> np.ndarray:
    """Heat map of one attribution matrix as an RGB image (matplotlib, Agg canvas; pyplot is never touched).

    Probe tokens on y, training tokens on x, diverging colours centred at 0 (green raises the probe token's
    log-prob, pink lowers it). Matrices larger than `max_rows x max_cols` keep the rows / columns with the largest
    total `|a|`, in their original order.

    Args:
        matrix (`np.ndarray[M, L]`): `a[m, l]`.
        probe_tokens (`Sequence[str]`, length M), train_tokens (`Sequence[str]`, length L): axis labels.

    Returns:
        `np.ndarray[H, W, 3]`, uint8.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.nan_to_num(np.asarray(matrix, dtype=np.float32))
    rows = _top_indices(np.abs(matrix).sum(axis=1), max_rows)
    cols = _top_indices(np.abs(matrix).sum(axis=0), max_cols)
    block = matrix[np.ix_(rows, cols)]
    limit = float(np.abs(block).max()) if block.size else 0.0
    limit = limit if limit > 0 else 1.0
    y_labels = [display_token(probe_tokens[i])[:16] for i in rows]
    x_labels = [display_token(train_tokens[i])[:16] for i in cols]
    # fixed margins in inches (label lengths), so no layout engine has to measure every tick label
    left = 0.45 + 0.065 * max((len(label) for label in y_labels), default=1)
    bottom = 0.5 + 0.055 * max((len(label) for label in x_labels), default=1)
    top, right = 0.35, 1.05
    cell_width, cell_height = 0.13, 0.17
    width = left + right + min(max(cell_width * len(cols), 3.0), 16.0)
    height = bottom + top + min(max(cell_height * len(rows), 1.5), 10.0)
    figure = Figure(figsize=(width, height), dpi=100)
    canvas = FigureCanvasAgg(figure)
    plot_width, plot_height = (width - left - right) / width, (height - bottom - top) / height
    axes = figure.add_axes((left / width, bottom / height, plot_width, plot_height))
    colorbar_axes = figure.add_axes(((width - right + 0.15) / width, bottom / height, 0.12 / width, plot_height))
    image = axes.imshow(block, cmap="PiYG", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    axes.set_yticks(range(len(rows)), y_labels, fontsize=7)
    axes.set_xticks(range(len(cols)), x_labels, fontsize=6, rotation=90)
    axes.set_xlabel("training token", fontsize=8)
    axes.set_ylabel("probe token", fontsize=8)
    if title:
        axes.set_title(title, fontsize=9)
    figure.colorbar(image, cax=colorbar_axes).set_label("attribution a[m, l]", fontsize=8)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _colour(value: float, limit: float) -> str:
    strength = min(abs(value) / limit, 1.0) if limit > 0 else 0.0
    rgb = (77, 146, 33) if value >= 0 else (197, 27, 125)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.08 + 0.6 * strength:.2f})"


def token_spans_html(tokens: Sequence[str], values: Sequence[float]) -> str:
    """Tokens as `<span>`s coloured by `values` (green up, pink down), the value in each span's tooltip."""
    finite = [abs(float(v)) for v in values if v is not None and math.isfinite(float(v))]
    limit = max(finite) if finite else 0.0
    spans = []
    for token, value in zip(tokens, values):
        number = float(value) if value is not None and math.isfinite(float(value)) else 0.0
        spans.append(
            f'<span title="{number:+.4g}" style="background:{_colour(number, limit)};border-radius:3px;'
            f'padding:0 1px;white-space:pre-wrap">{html.escape(str(token))}</span>'
        )
    return "".join(spans)
