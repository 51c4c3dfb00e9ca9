"""The dashboard view model: what W&B, TensorBoard and trackio draw from one event's records (scalars per probe
kind, tables joined with the probe texts, heat maps and coloured tokens), computed once per event."""

from __future__ import annotations

import html
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from trl_ntk.output.drawing import display_token, render_attribution_heatmap, token_spans_html
from trl_ntk.output.schema import plain as _plain

WANDB_MAX_TABLE_ROWS = 10_000
WANDB_MAX_HISTOGRAM_BINS = 512

# Dashboard keys: W&B makes one panel section per prefix before the first "/", TensorBoard one group; so every key
# starts with one of these sections (plus the trainer's own `train`): ten at most.
SECTIONS = {
    "ntk_logp": "summed log-prob of the probe responses, one line per kind",
    "ntk_squeeze": "squeezing diagnostics per kind: argmax log-prob, max probability, entropy",
    "ntk_change": "observed and predicted change per analysed step, their gap, the optimizer history part",
    "ntk_split": "the predicted change split by gradient sign (positive / negative) and by adapter group",
    "ntk_lld": "GRPO lazy likelihood displacement (means over groups)",
    "ntk_nthr": "NTHR reweighting (only when no trainer logs it as train/nthr/*)",
    "ntk_attribution": "token attribution heat maps, coloured tokens and the histogram of attributions",
    "ntk_tables": "the probe and dynamics tables (every step) and the HTML report",
    "ntk_charts": "multi-line charts across kinds and signs, observed vs predicted scatter",
    "ntk_health": "analysis and sink failures, the last status message, the configuration",
}
PROBE_TABLE_KEY = "ntk_tables/probes"
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
DYNAMICS_TABLE_KEY = "ntk_tables/dynamics"
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

# record field -> key prefix, aggregated as the mean over the probes of one kind: `<prefix>/<kind>`
PROBE_SCALARS = {
    "logp_sum": "ntk_logp",
    "argmax_logp": "ntk_squeeze/argmax_logp",
    "max_prob_mean": "ntk_squeeze/max_prob",
    "entropy_mean": "ntk_squeeze/entropy",
}
DYNAMICS_SCALARS = {
    "observed": "ntk_change/observed",
    "predicted": "ntk_change/predicted",
    "gap": "ntk_change/gap",
    "history": "ntk_change/history",
}
ATTRIBUTION_HISTOGRAM_KEY = "ntk_attribution/values"
STATUS_TEXT_KEY = "ntk_health/status"
CONFIG_TEXT_KEY = "ntk_health/config"
LLD_SCALARS = ("delta_observed", "delta_predicted", "delta_from_negative", "gwhes")
NTHR_SCALARS = ("frac_downweighted", "tau", "eta", "s_neg_mean", "seconds")

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def _mean(values: Iterable[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def key_part(name: Any) -> str:
    return _KEY_UNSAFE.sub("_", str(name)) or "_"


def aggregate_scalars(records: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Dashboard scalars of some records, per record step: means over the probes of a kind, not one per token.

    Keys (kind and group names made key-safe):
        `probe`: `ntk_logp/<kind>`, `ntk_squeeze/argmax_logp/<kind>`, `ntk_squeeze/max_prob/<kind>`,
            `ntk_squeeze/entropy/<kind>`;
        `dynamics`: `ntk_change/observed/<kind>`, `ntk_change/predicted/<kind>`, `ntk_change/gap/<kind>`,
            `ntk_change/history/<kind>`, `ntk_split/positive/<kind>`, `ntk_split/negative/<kind>`,
            `ntk_split/group_<group>/<kind>`;
        `lld` (mean over groups): `ntk_lld/delta_observed`, `ntk_lld/delta_predicted`, `ntk_lld/delta_from_negative`,
            `ntk_lld/gwhes`, `ntk_lld/frac_groups_negative` (share of groups whose positive completions lost
            likelihood);
        `nthr`: `ntk_nthr/frac_downweighted`, `ntk_nthr/tau`, `ntk_nthr/eta`, `ntk_nthr/s_neg_mean`,
            `ntk_nthr/seconds`;
        `status`: `ntk_health/analysis_failures`, `ntk_health/sink_failures` (summed over sinks),
            `ntk_health/untrusted_steps` (steps so far whose explanation is not trusted);
        the truth guard, from the step's `dynamics` records: `ntk_health/gradient_cosine` and
            `ntk_health/gradient_relative_error` (the gradient check: the captured signal's reconstruction of the
            applied gradient against `.grad`), `ntk_health/trusted` (1 when the step's explanation is trusted, 0
            when not).

    Returns:
        `dict[int, dict[str, float]]`: step -> key -> value; keys whose values are all missing or non-finite are
        left out.
    """
    samples: dict[int, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        kind_of = record.get("type")
        step = int(record.get("step", 0))
        bucket = samples[step]
        kind = key_part(record.get("kind", "unknown"))
        if kind_of == "probe":
            for source, name in PROBE_SCALARS.items():
                bucket[f"{name}/{kind}"].append(record.get(source))
        elif kind_of == "dynamics":
            for source, name in DYNAMICS_SCALARS.items():
                bucket[f"{name}/{kind}"].append(record.get(source))
            for sign, value in (record.get("split") or {}).items():
                bucket[f"ntk_split/{key_part(sign)}/{kind}"].append(value)
            for group, value in (record.get("groups") or {}).items():
                bucket[f"ntk_split/group_{key_part(group)}/{kind}"].append(value)
            _add_guard(bucket, record)
        elif kind_of == "lld":
            for name in LLD_SCALARS:
                bucket[f"ntk_lld/{name}"].append(record.get(name))
            delta = record.get("delta_observed")
            if isinstance(delta, (int, float)) and math.isfinite(delta):
                bucket["ntk_lld/frac_groups_negative"].append(1.0 if delta < 0 else 0.0)
        elif kind_of == "nthr":
            for name in NTHR_SCALARS:
                bucket[f"ntk_nthr/{name}"].append(record.get(name))
        elif kind_of == "status":
            bucket["ntk_health/analysis_failures"].append(record.get("analysis_failures"))
            sink_failures = record.get("sink_failures") or {}
            failed = sum(v for v in sink_failures.values() if isinstance(v, (int, float)))
            bucket["ntk_health/sink_failures"].append(failed)
            bucket["ntk_health/untrusted_steps"].append(record.get("untrusted_steps"))
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
    """Rows of the `ntk_tables/probes` table (`PROBE_TABLE_COLUMNS`): one per `probe` record, by step then probe id."""
    rows = []
    for record in records:
        if record.get("type") != "probe":
            continue
        entry = memory.probes.get(str(record.get("probe_id")), {})
        values = {"prompt": entry.get("prompt", ""), "response": entry.get("response", ""), **record}
        rows.append([_plain(values.get(column)) for column in PROBE_TABLE_COLUMNS])
    return sorted(rows, key=lambda row: (row[0], str(row[1])))


def dynamics_table_rows(records: Iterable[Mapping[str, Any]], memory: RunMemory) -> list[list[Any]]:
    """Rows of the `ntk_tables/dynamics` table (`DYNAMICS_TABLE_COLUMNS`): one per `dynamics` record, by step, then
    probe id.

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
        """`ntk_tables/probes` and `ntk_tables/dynamics` -> (columns, rows), for the record types the event has."""
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
    def heatmap_inputs(self) -> dict[str, list[dict[str, Any]]]:
        """probe kind -> at most `max_images_per_kind` probes, each `{"caption", "matrix" [M, L], "probe_tokens" (M),
        "train_tokens" (L), "train_rows" (L, the training row of each token; None if unknown)}`."""
        inputs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        rows = self.attributions.get("train.row") if self.attributions else None
        train_rows = np.asarray(rows).astype(int).tolist() if rows is not None else None
        for kind, record, matrix in self._matrices():
            if len(inputs[kind]) >= self.max_images_per_kind or matrix.ndim != 2:
                continue
            probe_key = (record.get("matrix") or {}).get("key", record.get("probe_id"))
            inputs[kind].append(
                {
                    "caption": f"{record.get('probe_id')} ({kind}) step {record.get('step')}",
                    "matrix": matrix,
                    "probe_tokens": self._tokens(f"{probe_key}.tokens", matrix.shape[0]),
                    "train_tokens": self._tokens("train.tokens", matrix.shape[1]),
                    "train_rows": train_rows if train_rows is not None and len(train_rows) == matrix.shape[1] else None,
                }
            )
        return dict(inputs)

    @cached_property
    def heatmaps(self) -> dict[str, list[tuple[np.ndarray, str]]]:
        """`ntk_attribution/<kind>` -> [(RGB image, caption)], at most `max_images_per_kind` probes per kind."""
        return {
            f"ntk_attribution/{key_part(kind)}": [
                (
                    render_attribution_heatmap(
                        item["matrix"], item["probe_tokens"], item["train_tokens"], item["caption"]
                    ),
                    item["caption"],
                )
                for item in items
            ]
            for kind, items in self.heatmap_inputs.items()
        }

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
        """`ntk_attribution/tokens_<kind>` -> (HTML, plain text): probe responses coloured by per-token predicted
        change, and the training tokens coloured by how much each moved the response (column sums of the attribution
        matrix)."""
        parts: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for kind, record, matrix in self._matrices():
            key = f"ntk_attribution/tokens_{key_part(kind)}"
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


def _add_guard(bucket: dict[str, list[Any]], record: Mapping[str, Any]) -> None:
    """The truth guard's scalars of one dynamics record (every record of a step carries the same check)."""
    check = record.get("gradient_check") or {}
    bucket["ntk_health/gradient_cosine"].append(check.get("cosine"))
    bucket["ntk_health/gradient_relative_error"].append(check.get("relative_error"))
    trusted = record.get("trusted")
    if isinstance(trusted, bool):
        bucket["ntk_health/trusted"].append(1.0 if trusted else 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Views of the whole run (the end of training): layout, multi-line series, summary


def custom_scalar_layout() -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's `add_custom_scalars` layout: one category per section, one multi-line chart per metric (every
    probe kind on one chart; positive against negative on one chart)."""
    return {
        "ntk_logp": {"summed log-prob by kind": ["Multiline", [r"ntk_logp/.*"]]},
        "ntk_squeeze": {
            f"{name} by kind": ["Multiline", [rf"ntk_squeeze/{name}/.*"]]
            for name in ("argmax_logp", "max_prob", "entropy")
        },
        "ntk_change": {
            f"{name} by kind": ["Multiline", [rf"ntk_change/{name}/.*"]]
            for name in ("observed", "predicted", "gap", "history")
        },
        "ntk_split": {
            "positive vs negative, by kind": ["Multiline", [r"ntk_split/positive/.*", r"ntk_split/negative/.*"]],
            "by adapter group": ["Multiline", [r"ntk_split/group_.*"]],
        },
        "ntk_lld": {"displacement": ["Multiline", [r"ntk_lld/.*"]]},
        "ntk_nthr": {"reweighting": ["Multiline", [r"ntk_nthr/.*"]]},
        "ntk_health": {
            "failures": ["Multiline", [r"ntk_health/.*_failures", r"ntk_health/untrusted_steps"]],
            "truth guard": ["Multiline", [r"ntk_health/gradient_.*", r"ntk_health/trusted"]],
        },
    }


def series_by_suffix(history: Mapping[int, Mapping[str, float]], prefix: str) -> dict[str, tuple[list[int], list]]:
    """From a step -> key -> value history, the keys `<prefix>/<name>` as name -> (steps, values), steps ascending."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(history):
        for key, value in history[step].items():
            if key.startswith(prefix + "/") and "/" not in key[len(prefix) + 1 :]:
                steps, values = series.setdefault(key[len(prefix) + 1 :], ([], []))
                steps.append(step)
                values.append(value)
    return series


def _correlation(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def run_summary(history: Mapping[int, Mapping[str, float]], records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The run's summary for the runs table of a dashboard (sortable across a sweep).

    Keys: `ntk/<kind>/logp_start`, `.../logp_end`, `.../logp_peak`, `.../logp_change` (from the per-kind mean
    log-prob of `history`); `ntk/prediction/median_abs_gap` and `ntk/prediction/correlation` (Pearson, observed
    against predicted over every `dynamics` record); `ntk/lld/<field>_mean` and `ntk/nthr/<field>_mean` (means over
    every `lld` / `nthr` record). Missing data leaves its keys out.
    """
    summary: dict[str, float] = {}
    for kind, (_, values) in series_by_suffix(history, "ntk_logp").items():
        summary[f"ntk/{kind}/logp_start"] = values[0]
        summary[f"ntk/{kind}/logp_end"] = values[-1]
        summary[f"ntk/{kind}/logp_peak"] = max(values)
        summary[f"ntk/{kind}/logp_change"] = values[-1] - values[0]
    pairs, lld, nthr = [], defaultdict(list), defaultdict(list)
    for record in records:
        kind_of = record.get("type")
        if kind_of == "dynamics" and _is_number(record.get("observed"), record.get("predicted")):
            pairs.append((float(record["observed"]), float(record["predicted"])))
        for name in LLD_SCALARS if kind_of == "lld" else NTHR_SCALARS if kind_of == "nthr" else ():
            if _is_number(record.get(name)):
                (lld if kind_of == "lld" else nthr)[name].append(float(record[name]))
    if pairs:
        observed, predicted = zip(*pairs)
        summary["ntk/prediction/median_abs_gap"] = float(np.median(np.abs(np.subtract(observed, predicted))))
        correlation = _correlation(list(observed), list(predicted))
        if correlation is not None:
            summary["ntk/prediction/correlation"] = correlation
    summary.update({f"ntk/lld/{name}_mean": sum(v) / len(v) for name, v in lld.items()})
    summary.update({f"ntk/nthr/{name}_mean": sum(v) / len(v) for name, v in nthr.items()})
    return summary
