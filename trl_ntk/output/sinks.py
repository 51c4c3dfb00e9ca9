"""Where the records go: a JSONL file (always on, the source of truth) and the dashboards (W&B, TensorBoard, trackio).

One small protocol, `Sink`; `SinkGroup` fans each event out to several sinks, JSONL first, so that a failing
dashboard never loses a record and never stops training. The record schema is `docs/output-format.md`.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
JSONL_NAME = "dynamics.jsonl"
ATTRIBUTIONS_DIR = "attributions"
RECORD_TYPES = ("run", "probes", "probe", "dynamics", "lld", "nthr", "status")
DASHBOARDS = ("wandb", "tensorboard", "trackio")

WANDB_MAX_TABLE_ROWS = 10_000
WANDB_MAX_HISTOGRAM_BINS = 512

PROBE_TABLE_KEY = "ntk/probes"
PROBE_TABLE_COLUMNS = (
    "step",
    "probe_id",
    "prompt_id",
    "kind",
    "prompt",
    "response",
    "num_tokens",
    "logp_sum",
    "logp_mean",
    "argmax_logp",
    "max_prob_mean",
    "entropy_mean",
)
DYNAMICS_TABLE_KEY = "ntk/dynamics"
DYNAMICS_TABLE_COLUMNS = (
    "step",
    "probe_id",
    "prompt_id",
    "kind",
    "prompt",
    "response",
    "logp_sum",
    "observed",
    "predicted",
    "gap",
    "predicted_current",
    "history",
    "split_positive",
    "split_negative",
    "path",
    "top_up",
    "top_down",
)

# record field -> scalar name, aggregated as the mean over the probes of one kind: `ntk/<name>/<kind>`
PROBE_SCALARS = {
    "logp_sum": "logp",
    "argmax_logp": "argmax_logp",
    "max_prob_mean": "max_prob",
    "entropy_mean": "entropy",
}
DYNAMICS_SCALARS = {
    "observed": "observed",
    "predicted": "predicted",
    "gap": "gap",
    "history": "history",
}
LLD_SCALARS = ("delta_observed", "delta_predicted", "delta_from_negative")
NTHR_SCALARS = ("frac_downweighted", "tau", "eta", "s_neg_mean", "seconds")

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


# ---------------------------------------------------------------------------------------------------------------------
# Records and files


def make_record(type: str, step: int, **fields: Any) -> dict[str, Any]:
    """A record of `docs/output-format.md`: `schema_version`, `type`, `step`, `time`, then `fields`.

    Args:
        type (`str`): one of `RECORD_TYPES` (`"run"`, `"probes"`, `"probe"`, `"dynamics"`, `"lld"`, `"nthr"`,
            `"status"`).
        step (`int`): the trainer's `global_step` the record describes.
        **fields: the type's fields.
    """
    if type not in RECORD_TYPES:
        raise ValueError(f"unknown record type {type!r}; expected one of {', '.join(RECORD_TYPES)}")
    return {"schema_version": SCHEMA_VERSION, "type": type, "step": int(step), "time": time.time(), **fields}


def attributions_file(step: int) -> str:
    """Path of step `step`'s attribution archive, relative to the run folder: `attributions/step_<step>.npz`."""
    return f"{ATTRIBUTIONS_DIR}/step_{int(step)}.npz"


def save_attributions(run_dir: str | os.PathLike, step: int, arrays: Mapping[str, Any]) -> str:
    """Write one analysis step's attribution arrays to `run_dir/attributions/step_<step>.npz` (compressed).

    The keys follow `docs/output-format.md`: `<probe_id>` float32 `[M, L]`, `<probe_id>.tokens` `[M]`,
    `train.tokens` `[L]`, `train.row` `[L]`, `train.coeff` `[L]`. Tensors are moved to CPU, float matrices stored
    as float32 and token lists as unicode arrays, so the archive loads with `allow_pickle=False`. The file is
    written to a temporary name and renamed, so a reader never sees half an archive.

    Returns:
        `str`: the path relative to `run_dir`, as the `dynamics` records' `matrix.file` holds it.
    """
    relative = attributions_file(step)
    target = Path(run_dir) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {key: _as_array(value) for key, value in arrays.items()}
    tmp_path = _tmp_path(target)
    try:
        with open(tmp_path, "wb") as tmp:
            np.savez_compressed(tmp, **payload)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    return relative


def _tmp_path(target: Path) -> Path:
    """A sibling of `target` to write first and rename (same file system, so the rename is atomic)."""
    return target.with_name(f"{target.name}.{os.getpid()}.tmp")


def load_attributions(run_dir: str | os.PathLike, file: str) -> dict[str, np.ndarray]:
    """Read an archive written by `save_attributions` (`file` relative to `run_dir`) into a dict of arrays."""
    with np.load(Path(run_dir) / file, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def encode_record(record: Mapping[str, Any]) -> str:
    """One JSONL line (no newline) for `record`: strict JSON, UTF-8 text.

    numpy and torch scalars/arrays become plain numbers and lists; non-finite floats (NaN, inf) become `null`,
    so any JSON reader (jq, browsers) accepts the file.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"a record is a dict, got {type(record).__name__}")
    for required in ("type", "step"):
        if required not in record:
            raise ValueError(f"record has no {required!r} field; build records with make_record(type, step, ...)")
    full = {"schema_version": SCHEMA_VERSION, "type": record["type"], "step": record["step"], "time": time.time()}
    full.update(record)
    return json.dumps(_plain(full), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def read_records(path: str | os.PathLike, types: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file, in file order; lines that do not parse (a run killed mid-write) are skipped.

    Args:
        path (`str` or `PathLike`): the `dynamics.jsonl` file.
        types (`Iterable[str]`, *optional*): keep only these record types.
    """
    wanted = set(types) if types is not None else None
    records, bad_lines = [], 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad_lines += 1
                continue
            if not isinstance(record, dict):
                bad_lines += 1
                continue
            if wanted is None or record.get("type") in wanted:
                records.append(record)
    if bad_lines:
        logger.warning("%s: skipped %d line(s) that are not JSON records (an interrupted write?)", path, bad_lines)
    return records


def _plain(value: Any) -> Any:
    """JSON-ready copy of `value`: numpy/torch to Python, non-finite floats to None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # torch.Tensor
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} to JSON: {value!r}")


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif array.dtype.kind == "O":
        array = array.astype(str)
    return array


# ---------------------------------------------------------------------------------------------------------------------
# One event and what the dashboards draw from it


def _mean(values: Iterable[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _key_part(name: Any) -> str:
    return _KEY_UNSAFE.sub("_", str(name)) or "_"


def aggregate_scalars(records: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Dashboard scalars of some records, per record step: means over the probes of a kind, not one per token.

    Keys (kind and group names made key-safe):
        `probe`: `ntk/logp/<kind>`, `ntk/argmax_logp/<kind>`, `ntk/max_prob/<kind>`, `ntk/entropy/<kind>`;
        `dynamics`: `ntk/observed/<kind>`, `ntk/predicted/<kind>`, `ntk/gap/<kind>`, `ntk/history/<kind>`,
            `ntk/split/positive/<kind>`, `ntk/split/negative/<kind>`, `ntk/group/<group>/<kind>`;
        `lld` (mean over groups): `lld/delta_observed`, `lld/delta_predicted`, `lld/delta_from_negative`,
            `lld/frac_groups_negative` (share of groups whose positive completions lost likelihood);
        `nthr`: `nthr/frac_downweighted`, `nthr/tau`, `nthr/eta`, `nthr/s_neg_mean`, `nthr/seconds`;
        `status`: `ntk/analysis_failures`, `ntk/sink_failures` (summed over sinks).

    Returns:
        `dict[int, dict[str, float]]`: step -> key -> value; keys whose values are all missing or non-finite are
        left out.
    """
    samples: dict[int, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        kind_of = record.get("type")
        step = int(record.get("step", 0))
        bucket = samples[step]
        kind = _key_part(record.get("kind", "unknown"))
        if kind_of == "probe":
            for source, name in PROBE_SCALARS.items():
                bucket[f"ntk/{name}/{kind}"].append(record.get(source))
        elif kind_of == "dynamics":
            for source, name in DYNAMICS_SCALARS.items():
                bucket[f"ntk/{name}/{kind}"].append(record.get(source))
            for sign, value in (record.get("split") or {}).items():
                bucket[f"ntk/split/{_key_part(sign)}/{kind}"].append(value)
            for group, value in (record.get("groups") or {}).items():
                bucket[f"ntk/group/{_key_part(group)}/{kind}"].append(value)
        elif kind_of == "lld":
            for name in LLD_SCALARS:
                bucket[f"lld/{name}"].append(record.get(name))
            delta = record.get("delta_observed")
            if isinstance(delta, (int, float)) and math.isfinite(delta):
                bucket["lld/frac_groups_negative"].append(1.0 if delta < 0 else 0.0)
        elif kind_of == "nthr":
            for name in NTHR_SCALARS:
                bucket[f"nthr/{name}"].append(record.get(name))
        elif kind_of == "status":
            bucket["ntk/analysis_failures"].append(record.get("analysis_failures"))
            sink_failures = record.get("sink_failures") or {}
            bucket["ntk/sink_failures"].append(sum(v for v in sink_failures.values() if isinstance(v, (int, float))))
    scalars: dict[int, dict[str, float]] = {}
    for step, bucket in sorted(samples.items()):
        values = {key: mean for key, items in bucket.items() if (mean := _mean(items)) is not None}
        if values:
            scalars[step] = values
    return scalars


def _format_top(entries: Any, limit: int = 5) -> str:
    if not entries:
        return ""
    parts = []
    for entry in list(entries)[:limit]:
        value = entry.get("value")
        number = f"{value:+.3g}" if isinstance(value, (int, float)) else "?"
        parts.append(f"{entry.get('text', '')!r} {number}")
    return "; ".join(parts)


class RunMemory:
    """What the dashboards remember across events: the probe catalogue and every probe's latest `probe` record.

    `probes`: `probe_id` -> its entry of the latest `probes` record (texts, tokens). `scores`: `probe_id` -> its
    latest `probe` record, so that a `dynamics` record can be shown beside the log-prob it started from.
    """

    def __init__(self) -> None:
        self.probes: dict[str, Mapping[str, Any]] = {}
        self.scores: dict[str, Mapping[str, Any]] = {}

    def update(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            if record.get("type") == "probes":
                self.probes.update({str(p["probe_id"]): p for p in record.get("probes", []) if "probe_id" in p})
            elif record.get("type") == "probe":
                self.scores[str(record.get("probe_id"))] = record

    def copy(self) -> RunMemory:
        memory = RunMemory()
        memory.probes, memory.scores = dict(self.probes), dict(self.scores)
        return memory


def probe_table_rows(records: Iterable[Mapping[str, Any]], memory: RunMemory) -> list[list[Any]]:
    """Rows of the `ntk/probes` table (`PROBE_TABLE_COLUMNS`): one per `probe` record, by step then probe id."""
    rows = []
    for record in records:
        if record.get("type") != "probe":
            continue
        entry = memory.probes.get(str(record.get("probe_id")), {})
        values = {"prompt": entry.get("prompt", ""), "response": entry.get("response", ""), **record}
        rows.append([_plain(values.get(column)) for column in PROBE_TABLE_COLUMNS])
    return sorted(rows, key=lambda row: (row[0], str(row[1])))


def dynamics_table_rows(records: Iterable[Mapping[str, Any]], memory: RunMemory) -> list[list[Any]]:
    """Rows of the `ntk/dynamics` table (`DYNAMICS_TABLE_COLUMNS`): one per `dynamics` record, by step then probe id.

    `logp_sum` is the probe's log-prob before the update: its `probe` record of the same step, from these records or
    from `memory` (the callback writes the scores before the update in an earlier event).
    """
    records = list(records)
    scores = {
        (int(r["step"]), str(r.get("probe_id"))): r.get("logp_sum")
        for r in [*memory.scores.values(), *records]
        if r.get("type") == "probe"
    }
    rows = []
    for record in records:
        if record.get("type") != "dynamics":
            continue
        probe_id = str(record.get("probe_id"))
        entry = memory.probes.get(probe_id, {})
        split = record.get("split") or {}
        values = {
            **record,
            "prompt": entry.get("prompt", ""),
            "response": entry.get("response", ""),
            "logp_sum": scores.get((int(record["step"]), probe_id)),
            "split_positive": split.get("positive"),
            "split_negative": split.get("negative"),
            "top_up": _format_top(record.get("top_up")),
            "top_down": _format_top(record.get("top_down")),
        }
        rows.append([_plain(values.get(column)) for column in DYNAMICS_TABLE_COLUMNS])
    return sorted(rows, key=lambda row: (row[0], str(row[1])))


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


@dataclass
class Event:
    """The records one trainer event produced, and what the dashboards draw from them (computed once, cached).

    Args:
        step (`int`): the trainer's `global_step` at the event; attribution images and the table are logged at it,
            scalars at each record's own `step`.
        records (`list[dict]`): the event's records (`docs/output-format.md`), in order.
        attributions (`Mapping[str, array]`, *optional*): the content of `attributions/step_<step>.npz` (see
            `save_attributions`), when the analysis ran at the `"tokens"` level.
        memory (`RunMemory`, *optional*): what earlier events said (probe texts, latest scores); this event's
            `probes` and `probe` records are added on top.
        max_images_per_kind (`int`, *optional*, defaults to `1`): attribution heat maps drawn per probe kind.
        max_html_probes_per_kind (`int`, *optional*, defaults to `4`): probes shown as coloured text per kind.
    """

    step: int
    records: list[dict[str, Any]]
    attributions: Mapping[str, Any] | None = None
    memory: RunMemory = field(default_factory=RunMemory)
    max_images_per_kind: int = 1
    max_html_probes_per_kind: int = 4

    @cached_property
    def tables(self) -> dict[str, tuple[Sequence[str], list[list[Any]]]]:
        """`ntk/probes` and `ntk/dynamics` -> (columns, rows), for the record types the event has."""
        memory = self.memory.copy()
        memory.update(r for r in self.records if r.get("type") == "probes")
        tables = {}
        if rows := probe_table_rows(self.records, memory):
            tables[PROBE_TABLE_KEY] = (PROBE_TABLE_COLUMNS, rows)
        if rows := dynamics_table_rows(self.records, memory):
            tables[DYNAMICS_TABLE_KEY] = (DYNAMICS_TABLE_COLUMNS, rows)
        return tables

    @cached_property
    def scalars(self) -> dict[int, dict[str, float]]:
        """step -> key -> value, see `aggregate_scalars`."""
        return aggregate_scalars(self.records)

    @cached_property
    def config(self) -> dict[str, Any] | None:
        """The `DynamicsConfig` of the event's `run` record, with the trainer name and versions; None if absent."""
        for record in self.records:
            if record.get("type") == "run":
                return {
                    "config": record.get("config") or {},
                    "trainer": record.get("trainer"),
                    "versions": record.get("versions") or {},
                    "resumed_from": record.get("resumed_from"),
                }
        return None

    @cached_property
    def status_message(self) -> str | None:
        """Text of the event's last `status` record with a message, if any."""
        message = None
        for record in self.records:
            if record.get("type") == "status" and record.get("message"):
                message = (
                    f"step {record['step']}: {record['message']} (analysis failures: "
                    f"{record.get('analysis_failures', 0)}, sink failures: {record.get('sink_failures') or {}})"
                )
        return message

    def _matrices(self) -> Iterator[tuple[str, Mapping[str, Any], np.ndarray]]:
        """(kind, dynamics record, matrix) for every dynamics record whose matrix is in `attributions`."""
        if not self.attributions:
            return
        for record in self.records:
            if record.get("type") != "dynamics":
                continue
            key = (record.get("matrix") or {}).get("key", record.get("probe_id"))
            if key in self.attributions:
                yield str(record.get("kind", "unknown")), record, np.asarray(self.attributions[key])

    def _tokens(self, key: str, length: int) -> list[str]:
        tokens = self.attributions.get(key) if self.attributions else None
        if tokens is None or len(tokens) != length:
            return [str(i) for i in range(length)]
        return [str(t) for t in np.asarray(tokens).tolist()]

    @cached_property
    def heatmaps(self) -> dict[str, list[tuple[np.ndarray, str]]]:
        """`ntk/attribution/<kind>` -> [(RGB image, caption)], at most `max_images_per_kind` probes per kind."""
        images: dict[str, list[tuple[np.ndarray, str]]] = defaultdict(list)
        for kind, record, matrix in self._matrices():
            key = f"ntk/attribution/{_key_part(kind)}"
            if len(images[key]) >= self.max_images_per_kind or matrix.ndim != 2:
                continue
            probe_key = (record.get("matrix") or {}).get("key", record.get("probe_id"))
            probe_tokens = self._tokens(f"{probe_key}.tokens", matrix.shape[0])
            train_tokens = self._tokens("train.tokens", matrix.shape[1])
            caption = f"{record.get('probe_id')} ({kind}) step {record.get('step')}"
            images[key].append((render_attribution_heatmap(matrix, probe_tokens, train_tokens, caption), caption))
        return dict(images)

    @cached_property
    def attribution_values(self) -> np.ndarray | None:
        """All attribution entries of the event (for a histogram), or None without attributions."""
        matrices = [matrix.ravel() for _, _, matrix in self._matrices()]
        if not matrices:
            return None
        values = np.concatenate(matrices).astype(np.float64)
        return values[np.isfinite(values)]

    @cached_property
    def token_texts(self) -> dict[str, tuple[str, str]]:
        """`ntk/tokens/<kind>` -> (HTML, plain text): probe responses coloured by per-token predicted change, and the
        training tokens coloured by how much each moved the response (column sums of the attribution matrix)."""
        parts: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for kind, record, matrix in self._matrices():
            key = f"ntk/tokens/{_key_part(kind)}"
            if len(parts[key]) >= self.max_html_probes_per_kind or matrix.ndim != 2:
                continue
            probe_key = (record.get("matrix") or {}).get("key", record.get("probe_id"))
            probe_tokens = self._tokens(f"{probe_key}.tokens", matrix.shape[0])
            train_tokens = self._tokens("train.tokens", matrix.shape[1])
            row_sums, col_sums = matrix.sum(axis=1).tolist(), matrix.sum(axis=0).tolist()
            title = html.escape(f"{record.get('probe_id')} ({kind}), step {record.get('step')}")
            observed, predicted = record.get("observed"), record.get("predicted")
            summary = f"observed {observed:+.4g}, predicted {predicted:+.4g}" if _is_number(observed, predicted) else ""
            block = (
                f"<div style='margin:0 0 12px 0'><b>{title}</b> <i>{html.escape(summary)}</i>"
                f"<div style='font-family:monospace;margin:4px 0'>response: "
                f"{token_spans_html(probe_tokens, row_sums)}</div>"
                f"<div style='font-family:monospace;margin:4px 0'>training tokens: "
                f"{token_spans_html(train_tokens, col_sums)}</div></div>"
            )
            ranked = sorted(zip(probe_tokens, row_sums), key=lambda pair: -abs(pair[1]))[:10]
            text = f"**{record.get('probe_id')}** ({kind}) {summary}: " + ", ".join(
                f"`{display_token(token)}` {value:+.3g}" for token, value in ranked
            )
            parts[key].append((block, text))
        return {
            key: (
                "<div style='font-family:sans-serif'>" + "".join(b for b, _ in blocks) + "</div>",
                "\n\n".join(t for _, t in blocks),
            )
            for key, blocks in parts.items()
        }


def _is_number(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


# ---------------------------------------------------------------------------------------------------------------------
# The protocol


@runtime_checkable
class Sink(Protocol):
    """Something that receives the records of `docs/output-format.md`: the JSONL file or a dashboard.

    How the callback talks to sinks: it builds all records of one trainer event (the `probe` records of a scoring
    step; the `dynamics` and `lld` records of an analysis step; or a single `run`, `probes`, `nthr`, `status`
    record) as plain dicts and hands them over *together*, through a `SinkGroup`:

        sinks = make_sinks(None, output_dir, trainer=trainer)      # follows trainer.args.report_to
        sinks.truncate_after(checkpoint_step)                      # on resume only
        sinks.write_event(step, [run_record])                      # or sinks.write(run_record)
        sinks.write_event(step, [probes_record])
        sinks.write_event(t, probe_records)                        # scores before the update of step t
        file = sinks.save_attributions(t, arrays)                  # "tokens" level: the .npz content
        sinks.write_event(t, dynamics_records + lld_records)       # records with matrix={"file": file, "key": id}
        sinks.write_event(step, [status_record])                   # status_record uses sinks.failures
        sinks.close()

    `sinks.write_event(t, records, attributions=arrays)` does the last two steps in one call (the records then point
    at `attributions_file(t)`). Handing a whole event over at once is what lets a dashboard aggregate per probe kind
    (`ntk/logp/<kind>` is the mean over the kind's probes at that step) and send one payload per step; the group
    remembers the probe texts and the latest scores, so the `ntk/dynamics` table shows prompt, response and the
    log-prob each update started from.

    Methods:
        write(record): one record, as a one-record event.
        write_event(event): all records of one `Event`. The JSONL sink appends them; dashboards draw the event's
            views (per-kind scalars, tables, heat maps, coloured tokens) through the `log_*` methods below.
        log_scalars(step, scalars): `{key: float}` at `train/global_step = step`.
        log_table(step, key, columns, rows): a table (at most `WANDB_MAX_TABLE_ROWS` rows are kept).
        log_images(step, key, images, captions): RGB images `[H, W, 3]` uint8 (attribution heat maps).
        log_text(step, key, text, html=None): text, with an HTML rendering for dashboards that show HTML.
        log_histogram(step, key, values): a histogram of `values` (at most `WANDB_MAX_HISTOGRAM_BINS` bins).
        log_config(config): the run's configuration (once per (re)start).
        close(): flush; release what the sink opened itself, never what it attached to.
    The JSONL sink implements the `log_*` methods as no-ops: its records already hold everything.
    """

    name: str

    def write(self, record: Mapping[str, Any]) -> None: ...

    def write_event(self, event: Event) -> None: ...

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...

    def log_images(self, step: int, key: str, images: Sequence[np.ndarray], captions: Sequence[str]) -> None: ...

    def log_text(self, step: int, key: str, text: str, html: str | None = None) -> None: ...

    def log_histogram(self, step: int, key: str, values: np.ndarray) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends records to a JSONL file, one JSON object per line, flushed after every event: the source of truth.

    Usage:
        sink = JsonlSink("out/dynamics/dynamics.jsonl")
        sink.truncate_after(120)               # resuming from checkpoint-120: drop what came after it
        sink.write(make_record("status", 120, analysis_failures=0, sink_failures={}, message=""))
        sink.close()

    Args:
        path (`str` or `PathLike`): the JSONL file; its folder is the run folder, with `attributions/` beside it.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix != ".jsonl":
            raise ValueError(f"JsonlSink writes a .jsonl file, got {self.path}; pass e.g. {self.path / JSONL_NAME}")
        self.run_dir = self.path.parent
        self._file = None

    def _handle(self):
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        return self._file

    def write(self, record: Mapping[str, Any]) -> None:
        handle = self._handle()
        handle.write(encode_record(record) + "\n")
        handle.flush()

    def write_event(self, event: Event) -> None:
        """Append the event's records and flush once."""
        lines = "".join(encode_record(record) + "\n" for record in event.records)
        handle = self._handle()
        handle.write(lines)
        handle.flush()

    def save_attributions(self, step: int, arrays: Mapping[str, Any]) -> str:
        """Write `attributions/step_<step>.npz` beside the JSONL; returns its path relative to the run folder."""
        return save_attributions(self.run_dir, step, arrays)

    def truncate_after(self, step: int) -> int:
        """Drop records with `step > step` and their attribution archives, so a resumed run continues the file.

        The file is rewritten to a temporary name and renamed. Lines that do not parse (a write cut short) are
        dropped too.

        Returns:
            `int`: how many lines were dropped.
        """
        self.close()
        for archive in (self.run_dir / ATTRIBUTIONS_DIR).glob("step_*.npz"):
            match = _STEP_FILE.match(archive.name)
            if match and int(match.group(1)) > step:
                archive.unlink()
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    keep = isinstance(record, dict) and int(record["step"]) <= step
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    keep = False
                if keep:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        tmp_path = _tmp_path(self.path)
        with open(tmp_path, "w", encoding="utf-8") as tmp:
            tmp.writelines(kept)
        os.replace(tmp_path, self.path)
        if dropped:
            logger.info("%s: dropped %d record(s) after step %d to resume", self.path, dropped, step)
        return dropped

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        return None

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        return None

    def log_images(self, step: int, key: str, images: Sequence[np.ndarray], captions: Sequence[str]) -> None:
        return None

    def log_text(self, step: int, key: str, text: str, html: str | None = None) -> None:
        return None

    def log_histogram(self, step: int, key: str, values: np.ndarray) -> None:
        return None

    def log_config(self, config: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class DashboardSink:
    """Base of the dashboard sinks: turns an `Event` into `log_*` calls; subclasses implement the `log_*` methods.

    Args:
        max_table_rows (`int`, *optional*, defaults to `10000`): rows kept per table (W&B's limit).
        histogram_bins (`int`, *optional*, defaults to `64`): bins of the attribution histogram (at most 512).
    """

    name = "dashboard"

    def __init__(self, max_table_rows: int = WANDB_MAX_TABLE_ROWS, histogram_bins: int = 64):
        if not 1 <= histogram_bins <= WANDB_MAX_HISTOGRAM_BINS:
            raise ValueError(f"histogram_bins must be in [1, {WANDB_MAX_HISTOGRAM_BINS}], got {histogram_bins}")
        self.max_table_rows = min(max_table_rows, WANDB_MAX_TABLE_ROWS)
        self.histogram_bins = histogram_bins
        self._memory = RunMemory()
        self._warned_rows = False

    def write(self, record: Mapping[str, Any]) -> None:
        event = Event(int(record["step"]), [dict(record)], memory=self._memory.copy())
        self._memory.update([record])
        self.write_event(event)

    def write_event(self, event: Event) -> None:
        with self._batch():
            if event.config is not None:
                self.log_config(event.config)
            for step, scalars in event.scalars.items():
                self.log_scalars(step, scalars)
            for key, (columns, rows) in event.tables.items():
                self.log_table(event.step, key, columns, rows)
            for key, images in event.heatmaps.items():
                self.log_images(event.step, key, [image for image, _ in images], [caption for _, caption in images])
            for key, (html_text, text) in event.token_texts.items():
                self.log_text(event.step, key, text, html_text)
            if event.attribution_values is not None and event.attribution_values.size:
                self.log_histogram(event.step, "ntk/attribution/values", event.attribution_values)
            if event.status_message:
                self.log_text(event.step, "ntk/status", event.status_message)

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Group the `log_*` calls of one event; sinks that send one payload per step override it."""
        yield

    def _cap_rows(self, rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
        if len(rows) <= self.max_table_rows:
            return rows
        if not self._warned_rows:
            logger.warning("%s: a table has %d rows; keeping the first %d", self.name, len(rows), self.max_table_rows)
            self._warned_rows = True
        return rows[: self.max_table_rows]

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        raise NotImplementedError

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def log_images(self, step: int, key: str, images: Sequence[np.ndarray], captions: Sequence[str]) -> None:
        raise NotImplementedError

    def log_text(self, step: int, key: str, text: str, html: str | None = None) -> None:
        raise NotImplementedError

    def log_histogram(self, step: int, key: str, values: np.ndarray) -> None:
        raise NotImplementedError

    def log_config(self, config: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class _StepPayloadSink(DashboardSink):
    """A dashboard with a wandb-like `log(dict)`: one payload per step, `train/global_step` as a key, no `step=`."""

    def __init__(self, start_run: bool = False, project: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.start_run = start_run
        self.project = project
        self._pending: dict[int, dict[str, Any]] = {}
        self._batching = False
        self._owned_run: Any = None
        self._warned_no_run = False

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
        self._commit()

    def _stage(self, step: int, values: Mapping[str, Any]) -> None:
        self._pending.setdefault(int(step), {}).update(values)
        if not self._batching:
            self._commit()

    def _commit(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        run = self._attach()
        if run is None:
            return
        for step in sorted(pending):
            self._send(run, {**pending[step], "train/global_step": step})

    def _attach(self) -> Any:
        """The open run (attached), a run started here when `start_run`, or None (one warning)."""
        run = self._current_run()
        if run is None and self.start_run:
            run = self._owned_run = self._open_run()
        if run is None and not self._warned_no_run:
            logger.warning(
                "%s: no run is open and start_run=False; dashboard output is dropped (the JSONL has it)", self.name
            )
            self._warned_no_run = True
        return run

    def close(self) -> None:
        self._commit()
        if self._owned_run is not None:
            owned, self._owned_run = self._owned_run, None
            self._finish_run(owned)

    def _current_run(self) -> Any:
        raise NotImplementedError

    def _open_run(self) -> Any:
        raise NotImplementedError

    def _finish_run(self, run: Any) -> None:
        raise NotImplementedError

    def _send(self, run: Any, payload: dict[str, Any]) -> None:
        raise NotImplementedError


class WandbSink(_StepPayloadSink):
    """Logs to the Weights & Biases run that is open (normally the one transformers' `WandbCallback` opened).

    Every payload carries `train/global_step` as a key (the x-axis transformers defines); `wandb.log(step=...)` is
    never called, so the trainer's own history is not disturbed. A run this sink did not start is never finished.

    Usage:
        sink = WandbSink()                     # attach to `wandb.run` at the first write
        sink = WandbSink(start_run=True)       # start one if none is open; finished at `close()`

    Args:
        start_run (`bool`, *optional*, defaults to `False`): when no run is open at the first write, start one
            (`wandb.init(project=project)`) and finish it at `close()`. `make_sinks` sets it when W&B was asked for.
        project (`str`, *optional*): project of a run started here; defaults to `$WANDB_PROJECT` or `"trl_ntk"`.
        init_kwargs (`dict`, *optional*): more `wandb.init` arguments for a run started here.
        max_table_rows, histogram_bins: see `DashboardSink`.
    """

    name = "wandb"

    def __init__(
        self,
        start_run: bool = False,
        project: str | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        self._wandb = _require("wandb", "wandb")
        super().__init__(start_run=start_run, project=project, **kwargs)
        self.init_kwargs = dict(init_kwargs or {})
        self._defined_for: str | None = None

    def _current_run(self) -> Any:
        run = self._wandb.run
        if run is not None and self._defined_for != run.id:
            run.define_metric("train/global_step")
            for namespace in ("ntk/*", "lld/*", "nthr/*"):
                run.define_metric(namespace, step_metric="train/global_step", step_sync=True)
            self._defined_for = run.id
        return run

    def _open_run(self) -> Any:
        self._wandb.init(project=self.project or os.getenv("WANDB_PROJECT", "trl_ntk"), **self.init_kwargs)
        return self._current_run()

    def _finish_run(self, run: Any) -> None:
        run.finish()

    def _send(self, run: Any, payload: dict[str, Any]) -> None:
        run.log(payload)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._stage(step, scalars)

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        table = self._wandb.Table(
            columns=list(columns), data=[list(r) for r in self._cap_rows(rows)], allow_mixed_types=True
        )
        self._stage(step, {key: table})

    def log_images(self, step: int, key: str, images: Sequence[np.ndarray], captions: Sequence[str]) -> None:
        self._stage(step, {key: [self._wandb.Image(image, caption=c) for image, c in zip(images, captions)]})

    def log_text(self, step: int, key: str, text: str, html: str | None = None) -> None:
        body = html if html is not None else f"<pre>{_escape(text)}</pre>"
        self._stage(step, {key: self._wandb.Html(body, inject=False, data_is_not_path=True)})

    def log_histogram(self, step: int, key: str, values: np.ndarray) -> None:
        counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=self.histogram_bins)
        self._stage(step, {key: self._wandb.Histogram(np_histogram=(counts, edges))})

    def log_config(self, config: Mapping[str, Any]) -> None:
        run = self._attach()
        if run is not None:
            run.config.update({"trl_ntk": _plain(dict(config))}, allow_val_change=True)


class TrackioSink(_StepPayloadSink):
    """Logs to the open trackio run (trackio's wandb-like API); trackio is imported only when this sink is made.

    Usage:
        sink = TrackioSink(start_run=True)

    Args:
        start_run (`bool`, *optional*, defaults to `False`): start a run (`trackio.init(project=project)`) when none
            is open at the first write, and finish it at `close()`.
        project (`str`, *optional*): project of a run started here; defaults to `$TRACKIO_PROJECT` or `"trl_ntk"`.
        max_table_rows, histogram_bins: see `DashboardSink`.
    """

    name = "trackio"

    def __init__(self, start_run: bool = False, project: str | None = None, **kwargs: Any):
        self._trackio = _require("trackio", "trackio")
        super().__init__(start_run=start_run, project=project, **kwargs)

    def _current_run(self) -> Any:
        context = getattr(self._trackio, "context_vars", None)
        return context.current_run.get() if context is not None else None

    def _open_run(self) -> Any:
        return self._trackio.init(project=self.project or os.getenv("TRACKIO_PROJECT", "trl_ntk"))

    def _finish_run(self, run: Any) -> None:
        run.finish()

    def _send(self, run: Any, payload: dict[str, Any]) -> None:
        run.log(payload)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._stage(step, scalars)

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if hasattr(self._trackio, "Table"):
            self._stage(
                step, {key: self._trackio.Table(columns=list(columns), data=[list(r) for r in self._cap_rows(rows)])}
            )

    def log_images(self, step: int, key: str, images: Sequence[np.ndarray], captions: Sequence[str]) -> None:
        if hasattr(self._trackio, "Image"):
            for index, (image, caption) in enumerate(zip(images, captions)):
                self._stage(step, {f"{key}/{index}": self._trackio.Image(image, caption=caption)})

    def log_text(self, step: int, key: str, text: str, html: str | None = None) -> None:
        if hasattr(self._trackio, "Markdown"):
            self._stage(step, {key: self._trackio.Markdown(text)})

    def log_histogram(self, step: int, key: str, values: np.ndarray) -> None:
        if hasattr(self._trackio, "Histogram"):
            self._stage(step, {key: self._trackio.Histogram(np.asarray(values), num_bins=self.histogram_bins)})

    def log_config(self, config: Mapping[str, Any]) -> None:
        run = self._attach()
        run_config = getattr(run, "config", None)
        if run_config is not None and hasattr(run_config, "update"):
            run_config.update({"trl_ntk": _plain(dict(config))})


class TensorBoardSink(DashboardSink):
    """Logs to TensorBoard through the trainer's `TensorBoardCallback` writer when there is one, else its own.

    The writer is looked up at every event: transformers opens its writer at `on_train_begin` and closes it at
    `on_train_end`; in between this sink writes with it, otherwise with a `SummaryWriter` of its own in the same
    folder (or `log_dir`). Only the sink's own writer is closed at `close()`.

    Usage:
        sink = TensorBoardSink(trainer=trainer)
        sink = TensorBoardSink(log_dir="out/dynamics/tensorboard")

    Args:
        trainer (`transformers.Trainer`, *optional*): whose `TensorBoardCallback` writer to reuse.
        log_dir (`str` or `PathLike`, *optional*): folder of the sink's own writer when the trainer has no
            `TensorBoardCallback` (with one, its folder is used); defaults to `./runs`.
        max_table_rows, histogram_bins: see `DashboardSink`.
    """

    name = "tensorboard"
    max_text_table_rows = 200

    def __init__(self, trainer: Any = None, log_dir: str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.trainer = trainer
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._own_writer: Any = None

    def _trainer_callback(self) -> Any:
        if self.trainer is None:
            return None
        from transformers.integrations import TensorBoardCallback

        for callback in getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []):
            if isinstance(callback, TensorBoardCallback):
                return callback
        return None

    @property
    def writer(self) -> Any:
        """The `SummaryWriter` the next write goes to."""
        callback = self._trainer_callback()
        if callback is not None and callback.tb_writer is not None:
            return callback.tb_writer
        if self._own_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.log_dir
            if callback is not None and callback.logging_dir is not None:
                log_dir = Path(callback.logging_dir)
            self._own_writer = SummaryWriter(log_dir=str(log_dir) if log_dir is not None else None)
        return self._own_writer

    def write_event(self, event: Event) -> None:
        super().write_event(event)
        self.writer.flush()

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        writer = self.writer
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        shown = self._cap_rows(rows)[: self.max_text_table_rows]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_markdown_cell(value) for value in row) + " |" for row in shown]
        if len(rows) > len(shown):
            lines.append(f"\n({len(rows) - len(shown)} more rows in the JSONL)")
        self.writer.add_text(key, "\n".join(lines), step)

    def log_images(self, step: int, key: str, images: Sequence[np.ndarray], captions: Sequence[str]) -> None:
        writer = self.writer
        for index, image in enumerate(images):
            writer.add_image(f"{key}/{index}", np.asarray(image), step, dataformats="HWC")

    def log_text(self, step: int, key: str, text: str, html: str | None = None) -> None:
        self.writer.add_text(key, text, step)

    def log_histogram(self, step: int, key: str, values: np.ndarray) -> None:
        self.writer.add_histogram(key, np.asarray(values, dtype=np.float64), step, bins=self.histogram_bins)

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(_plain(dict(config)), indent=2, sort_keys=True)
        self.writer.add_text("ntk/config", "```\n" + text + "\n```", 0)

    def close(self) -> None:
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None


def _escape(text: str) -> str:
    return html.escape(text)


def _markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _require(module: str, package: str) -> Any:
    if module in sys.modules:
        return sys.modules[module]
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"report_to asks for {module!r} but the {module!r} package is not installed; run `pip install {package}`"
            f" or drop {module!r} from report_to"
        )
    return importlib.import_module(module)


# ---------------------------------------------------------------------------------------------------------------------
# Fan-out with failure isolation, and the factory


class SinkGroup:
    """Fans every event out to several sinks, JSONL first; a sink that raises loses only its own output.

    A failing sink gets one warning (its first failure) and a failure count; the others, the JSONL above all, go on,
    and training is never stopped. `status()` gives the counts for a `status` record.

    Usage:
        sinks = SinkGroup([JsonlSink(path), WandbSink()])
        sinks.write_event(step, records, attributions=arrays)
        sinks.failures                         # {"jsonl": 0, "wandb": 0}

    Args:
        sinks (`Sequence[Sink]`): the sinks; `JsonlSink`s are moved to the front.
        strict (`bool`, *optional*, defaults to `False`): re-raise a sink's exception instead (tests).
        max_images_per_kind, max_html_probes_per_kind: see `Event`.
    """

    def __init__(
        self,
        sinks: Sequence[Sink],
        strict: bool = False,
        max_images_per_kind: int = 1,
        max_html_probes_per_kind: int = 4,
    ):
        self.sinks = sorted(sinks, key=lambda sink: not isinstance(sink, JsonlSink))
        names = [sink.name for sink in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique, got {names}")
        self.strict = strict
        self.max_images_per_kind = max_images_per_kind
        self.max_html_probes_per_kind = max_html_probes_per_kind
        self.failures: dict[str, int] = dict.fromkeys(names, 0)
        self.last_error: str | None = None
        self._memory = RunMemory()
        self._saved: tuple[str, Mapping[str, Any]] | None = None

    @property
    def jsonl(self) -> JsonlSink | None:
        """The JSONL sink, if the group has one."""
        return next((sink for sink in self.sinks if isinstance(sink, JsonlSink)), None)

    @property
    def run_dir(self) -> Path | None:
        """The folder of the JSONL file (where `attributions/` and `report.html` go)."""
        jsonl = self.jsonl
        return jsonl.run_dir if jsonl is not None else None

    def _call(self, sink: Sink, action: str, *args: Any) -> Any:
        try:
            return getattr(sink, action)(*args)
        except Exception as error:
            if self.strict:
                raise
            self.failures[sink.name] = self.failures.get(sink.name, 0) + 1
            self.last_error = f"{sink.name}.{action}: {type(error).__name__}: {error}"
            if self.failures[sink.name] == 1:
                warnings.warn(
                    f"trl_ntk sink {sink.name!r} failed ({self.last_error}); training and the other sinks go on, "
                    "further failures of this sink are only counted",
                    RuntimeWarning,
                    stacklevel=3,
                )
            logger.debug("sink %s failed", sink.name, exc_info=True)
            return None

    def save_attributions(self, step: int, arrays: Mapping[str, Any]) -> str | None:
        """Save one analysis step's attribution archive beside the JSONL (see `save_attributions`) and keep the arrays
        for the dashboards, which draw them when the `dynamics` records pointing at the file arrive.

        Returns:
            `str | None`: the file relative to the run folder, for the records' `matrix.file`; None if writing it
            failed (counted as a JSONL failure) or the group has no JSONL sink.
        """
        jsonl = self.jsonl
        self._saved = (attributions_file(step), arrays)
        return self._call(jsonl, "save_attributions", step, arrays) if jsonl is not None else None

    def write(self, record: Mapping[str, Any]) -> None:
        """One record, as a one-record event."""
        self.write_event(int(record["step"]), [dict(record)])

    def write_event(
        self, step: int, records: Sequence[Mapping[str, Any]], attributions: Mapping[str, Any] | None = None
    ) -> None:
        """All records of one trainer event, to every sink, JSONL first.

        Args:
            step (`int`): the trainer's `global_step` of the event; for an analysis step, the `dynamics` step.
            records (`Sequence[dict]`): the event's records (`docs/output-format.md`).
            attributions (`Mapping[str, array]`, *optional*): the step's attribution arrays, saved first as
                `attributions_file(step)` (the `dynamics` records' `matrix.file`). Without it, the arrays of the
                last `save_attributions` call are drawn if these records point at its file.
        """
        records = [dict(record) for record in records]
        if attributions is not None:
            self.save_attributions(step, attributions)
        files = {(r.get("matrix") or {}).get("file") for r in records if r.get("type") == "dynamics"}
        if self._saved is not None and self._saved[0] in files:
            attributions = self._saved[1]
            self._saved = None
        event = Event(
            int(step),
            records,
            attributions,
            memory=self._memory.copy(),
            max_images_per_kind=self.max_images_per_kind,
            max_html_probes_per_kind=self.max_html_probes_per_kind,
        )
        self._memory.update(records)
        for sink in self.sinks:
            self._call(sink, "write_event", event)

    def truncate_after(self, step: int) -> None:
        """Resume: drop JSONL records (and attribution archives) after `step`."""
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                self._call(sink, "truncate_after", step)

    def status(self) -> dict[str, Any]:
        """`sink_failures` and `message` fields of a `status` record."""
        return {"sink_failures": dict(self.failures), "message": self.last_error or ""}

    def close(self) -> None:
        for sink in self.sinks:
            self._call(sink, "close")


def resolve_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """The dashboards among `report_to` (transformers' values): `"wandb"`, `"tensorboard"`, `"trackio"`.

    `"all"` means those installed; `"none"`/None means none; other integrations (mlflow, comet, ...) are ignored.
    """
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        return [name for name in DASHBOARDS if importlib.util.find_spec(name) is not None]
    chosen = [name for name in DASHBOARDS if name in names]
    ignored = [name for name in names if name not in DASHBOARDS and name != "none"]
    if ignored:
        logger.info("trl_ntk has no sink for %s; its records still go to the JSONL file", ", ".join(ignored))
    return chosen


def make_sinks(
    report_to: str | Sequence[str] | None = None,
    output_dir: str | os.PathLike | None = None,
    trainer: Any = None,
    strict: bool = False,
) -> SinkGroup:
    """The JSONL sink plus one dashboard sink per requested dashboard, as a `SinkGroup`.

    Usage:
        sinks = make_sinks(output_dir="out/dynamics", trainer=trainer)   # follows trainer.args.report_to
        sinks = make_sinks(["wandb"], "out/dynamics")                     # override

    Args:
        report_to (`str` or `list[str]`, *optional*): `"wandb"`, `"tensorboard"`, `"trackio"`, `"all"`, `"none"`
            or a list; defaults to `trainer.args.report_to`, else none.
        output_dir (`str` or `PathLike`, *optional*): the run folder (`dynamics.jsonl`, `attributions/`); defaults
            to `<trainer.args.output_dir>/dynamics`.
        trainer (`transformers.Trainer`, *optional*): the trainer whose `report_to` and TensorBoard writer to follow.
        strict (`bool`, *optional*, defaults to `False`): see `SinkGroup`.
    """
    args = getattr(trainer, "args", None)
    if report_to is None and args is not None:
        report_to = args.report_to
    if output_dir is None:
        if args is None:
            raise ValueError("make_sinks needs output_dir, or a trainer whose args.output_dir to write under")
        output_dir = Path(args.output_dir) / "dynamics"
    output_dir = Path(output_dir)
    sinks: list[Sink] = [JsonlSink(output_dir / JSONL_NAME)]
    for name in resolve_report_to(report_to):
        if name == "wandb":
            sinks.append(WandbSink(start_run=True))
        elif name == "tensorboard":
            _require("tensorboard", "tensorboard")
            sinks.append(TensorBoardSink(trainer=trainer, log_dir=output_dir / "tensorboard"))
        elif name == "trackio":
            sinks.append(TrackioSink(start_run=True))
    return SinkGroup(sinks, strict=strict)
