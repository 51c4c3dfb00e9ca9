"""The record schema of `docs/output-format.md`: its version, one builder per record type, and the one reader.

Builders take plain values and return plain dicts (no I/O); `records.py` turns scores and step explanations into
those values. The reader decodes a JSONL file line by line from bytes, so a write cut anywhere (mid-line, mid-UTF-8
character) costs only that line, which is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_ntk.probes.probe_set import PREFERENCE_KINDS, REFERENCE_KINDS, SAMPLED_KINDS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""`schema_version` of the records written."""
READABLE_SCHEMA_VERSIONS = (2,)
"""Versions the reader accepts; any other is refused with `SchemaError`."""

JSONL_NAME = "dynamics.jsonl"
ATTRIBUTIONS_DIR = "attributions"
RECORD_TYPES = ("run", "probes", "probe", "dynamics", "lld", "nthr", "status", "lookahead")
PROBE_KINDS = tuple(dict.fromkeys(PREFERENCE_KINDS + SAMPLED_KINDS + REFERENCE_KINDS))
"""Built-in probe kinds, in the order the report and the dashboards show them."""

_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_COMMON_FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "type": (str,),
    "step": (int,),
    "time": _OPTIONAL_NUMBER,
    "run_id": (str, type(None)),
}
FIELD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "run": {"trainer": (str, type(None)), "config": (dict,), "versions": (dict,), "resumed_from": (int, type(None))},
    "probes": {"probes": (list,)},
    "probe": {
        "probe_id": (str,),
        "prompt_id": (str,),
        "kind": (str,),
        "logp_sum": _OPTIONAL_NUMBER,
        "logp_mean": _OPTIONAL_NUMBER,
        "num_tokens": (int,),
        "token_logps": (list,),
    },
    "dynamics": {
        "probe_id": (str,),
        "prompt_id": (str,),
        "kind": (str,),
        "observed": _OPTIONAL_NUMBER,
        "predicted": _OPTIONAL_NUMBER,
        "gap": _OPTIONAL_NUMBER,
        "predicted_current": _OPTIONAL_NUMBER,
        "history": _OPTIONAL_NUMBER,
        "split": (dict,),
        "groups": (dict,),
        "cells": (dict,),
        "token_observed": (list,),
        "token_predicted": (list,),
        "gradient_check": (dict,),
        "trusted": (bool, type(None)),
        "trust_reason": (str, type(None)),
        "top_up": (list,),
        "top_down": (list,),
        "matrix": (dict,),
    },
    "lld": {
        "group": (int,),
        "delta_observed": _OPTIONAL_NUMBER,
        "delta_predicted": _OPTIONAL_NUMBER,
        "delta_from_negative": _OPTIONAL_NUMBER,
        "gwhes": _OPTIONAL_NUMBER,
        "gwhes_negative": _OPTIONAL_NUMBER,
        "gwhes_positive": _OPTIONAL_NUMBER,
        "trusted": (bool, type(None)),
        "trust_reason": (str, type(None)),
    },
    "nthr": {"frac_downweighted": _OPTIONAL_NUMBER, "tau": _OPTIONAL_NUMBER, "time_fraction": _OPTIONAL_NUMBER},
    "status": {"analysis_failures": (int,), "sink_failures": (dict,), "message": (str,)},
    "lookahead": {"view": (str,), "num_examples": (int,), "spearman": (dict,), "top_k_overlap": (dict,)},
}
"""Per record type, the type of each field the report and the dashboards read (`bool` is not a number here)."""


class SchemaError(ValueError):
    """A record file the package cannot read: unknown `schema_version`, or a field of the wrong type."""


# ---------------------------------------------------------------------------------------------------------------------
# Builders


def header(record_type: str, step: int) -> dict[str, Any]:
    """`schema_version`, `type`, `step`, `time` of every record (the writer adds `run_id`)."""
    if record_type not in RECORD_TYPES:
        raise ValueError(f"unknown record type {record_type!r}; expected one of {', '.join(RECORD_TYPES)}")
    return {"schema_version": SCHEMA_VERSION, "type": record_type, "step": int(step), "time": time.time()}


def attributions_file(step: int) -> str:
    """Path of step `step`'s attribution archive, relative to the run folder: `attributions/step_<step>.npz`."""
    return f"{ATTRIBUTIONS_DIR}/step_{int(step)}.npz"


def run_record(step: int, trainer_kind: str, config: dict, versions: dict, resumed_from: int | None) -> dict:
    """The `run` record of one (re)start."""
    return {
        **header("run", step),
        "trainer": trainer_kind,
        "config": config,
        "versions": versions,
        "resumed_from": resumed_from,
    }


def probes_record(step: int, probes: list[dict[str, Any]]) -> dict:
    """The `probes` record: the catalogue, one entry per probe response (`EncodedProbes.describe`)."""
    return {**header("probes", step), "probes": list(probes)}


def probe_record(step: int, *, probe_id: str, prompt_id: str, kind: str, **scores: Any) -> dict:
    """One `probe` record: a response's scores at `step` (`logp_sum`, ..., `num_tokens`, `token_logps`)."""
    return {**header("probe", step), "probe_id": probe_id, "prompt_id": prompt_id, "kind": kind, **scores}


def dynamics_record(
    step: int,
    *,
    probe_id: str,
    prompt_id: str,
    kind: str,
    observed: float,
    predicted: float,
    trusted: bool | None = None,
    trust_reason: str | None = None,
    **fields: Any,
) -> dict:
    """One `dynamics` record: observed vs predicted change of a response over the update of `step`.

    `gap = observed - predicted` is filled here; `trusted` / `trust_reason` say whether the step's gradient check
    passed (None: not judged).
    """
    return {
        **header("dynamics", step),
        "probe_id": probe_id,
        "prompt_id": prompt_id,
        "kind": kind,
        "observed": observed,
        "predicted": predicted,
        "gap": observed - predicted,
        **fields,
        "trusted": trusted,
        "trust_reason": trust_reason,
    }


def lld_record(
    step: int, *, group: int, trusted: bool | None = None, trust_reason: str | None = None, **fields: Any
) -> dict:
    """One `lld` record: a GRPO group's likelihood displacement (`delta_observed`, `delta_predicted`, ...) and its
    GWHES (`gwhes`, `gwhes_negative`, `gwhes_positive`)."""
    return {**header("lld", step), "group": int(group), **fields, "trusted": trusted, "trust_reason": trust_reason}


def nthr_record(step: int, stats: Any, seconds: float, path: str, time_fraction: float | None) -> dict[str, Any]:
    """The `nthr` record of one generation batch from an `NTHRStats`; NaN means become `None`."""

    def finite(value: float) -> float | None:
        return None if math.isnan(value) else value

    return {
        **header("nthr", step),
        "frac_downweighted": stats.frac_downweighted,
        "tau": finite(stats.tau),
        "eta": finite(stats.eta),
        "s_neg_mean": finite(stats.s_neg_mean),
        "num_groups": stats.num_groups,
        "num_mixed_groups": stats.num_mixed_groups,
        "seconds": seconds,
        "path": path,
        "time_fraction": time_fraction,
    }


def status_record(
    step: int, analysis_failures: int, sink_failures: Mapping[str, int], message: str, untrusted_steps: int = 0
) -> dict:
    """The `status` record: failure counts so far, the analysed steps whose gradient check failed (their records
    carry `trusted: false`), and the last failure's text."""
    return {
        **header("status", step),
        "analysis_failures": int(analysis_failures),
        "untrusted_steps": int(untrusted_steps),
        "sink_failures": dict(sink_failures),
        "message": message,
    }


def lookahead_record(
    step: int, *, view: str, num_examples: int, spearman: Mapping, top_k_overlap: Mapping, **fields: Any
) -> dict:
    """One `lookahead` record (`LookaheadCallback`): the re-scored ranking's drift since the previous scoring
    (`spearman`, `top_k_overlap` per objective, None the first time) and its summary (`top_harmful`, `quantiles`)."""
    return {
        **header("lookahead", step),
        "view": view,
        "num_examples": int(num_examples),
        "spearman": dict(spearman),
        "top_k_overlap": dict(top_k_overlap),
        **fields,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Encoding


def encode_record(record: Mapping[str, Any], non_finite: list[str] | None = None) -> str:
    """One JSONL line (no newline) for `record`: strict JSON, UTF-8 text.

    numpy and torch scalars/arrays become plain numbers and lists; non-finite floats (NaN, inf) become `null` and
    their field paths are appended to `non_finite` (the writer warns about them), so any JSON reader accepts the file.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"a record is a dict, got {type(record).__name__}")
    for required in ("type", "step"):
        if required not in record:
            raise ValueError(f"record has no {required!r} field; build records with the builders of schema.py")
    full = {"schema_version": SCHEMA_VERSION, "type": record["type"], "step": record["step"], "time": time.time()}
    full.update(record)
    try:  # most records are plain and finite already: no copy
        return json.dumps(full, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_not_plain)
    except (ValueError, TypeError):  # a non-finite float, or numpy / torch / path values: the converting copy
        pass
    found = non_finite if non_finite is not None else []
    return json.dumps(plain(full, found), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _not_plain(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not plain JSON")


def plain(value: Any, non_finite: list[str] | None = None, where: str = "") -> Any:
    """JSON-ready copy of `value`: numpy/torch to Python, non-finite floats to None (paths noted in `non_finite`)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if non_finite is not None:
            non_finite.append(where or "value")
        return None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(item, non_finite, f"{where}.{k}" if where else str(k)) for k, item in value.items()}
    if isinstance(value, (list, tuple)):
        inner = f"{where}[]"
        # finite floats (most items: per-token values) are kept as they are without a call
        finite = math.isfinite
        return [item if type(item) is float and finite(item) else plain(item, non_finite, inner) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        return plain(value.item(), non_finite, where)
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # torch.Tensor
        return plain(value.detach().cpu().tolist(), non_finite, where)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy array
        return plain(value.tolist(), non_finite, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} to JSON: {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class RecordFile:
    """What `read_jsonl` found: the records in file order and how many lines it skipped as damaged."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    damaged_lines: int = 0


def decode_line(line: bytes) -> dict[str, Any] | None:
    """One JSONL line (bytes, without the newline) as a record; None when it is damaged (not UTF-8, not a JSON
    object with a `type`), as a write cut short leaves it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("type"), str) else None


def check_record(record: Mapping[str, Any], where: str) -> None:
    """Refuse a record of an unknown `schema_version` or with a field of the wrong type (`SchemaError`); a record
    without `schema_version` (made by hand) is read as the current version."""
    version = record.get("schema_version", SCHEMA_VERSION)
    if version not in READABLE_SCHEMA_VERSIONS:
        raise SchemaError(
            f"{where}: schema_version {version!r} is not one this trl_ntk reads "
            f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); read it with the trl_ntk version that wrote it"
        )
    expected = {**_COMMON_FIELDS, **FIELD_TYPES.get(str(record.get("type")), {})}
    for name, types in expected.items():
        if name not in record:
            continue
        value = record[name]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise SchemaError(
                f"{where}: field {name!r} of a {record.get('type')!r} record is {type(value).__name__} "
                f"{json.dumps(value)[:40]}, expected {names}"
            )


def read_jsonl(
    path: str | os.PathLike,
    types: Iterable[str] | None = None,
    *,
    check: bool = True,
    on_bytes: Callable[[int], Any] | None = None,
) -> RecordFile:
    """Read a `dynamics.jsonl` line by line from bytes; damaged lines are skipped and counted (one warning).

    Args:
        path (`str` or `PathLike`): the JSONL file.
        types (`Iterable[str]`, *optional*): keep only these record types.
        check (`bool`, *optional*, defaults to `True`): refuse unknown schema versions and wrong-typed fields
            (`SchemaError`, naming the line).
        on_bytes (`Callable[[int], Any]`, *optional*): called with the size of each line read (progress bars).
    """
    wanted = set(types) if types is not None else None
    result = RecordFile(Path(path))
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if on_bytes is not None:
                on_bytes(len(line))
            if not line.strip():
                continue
            record = decode_line(line.rstrip(b"\r\n"))
            if record is None:
                result.damaged_lines += 1
                continue
            if check:
                check_record(record, f"{path}:{number}")
            if wanted is None or record["type"] in wanted:
                result.records.append(record)
    if result.damaged_lines:
        logger.warning(
            "%s: skipped %d line(s) that are not JSON records (an interrupted write?)", path, result.damaged_lines
        )
    return result


def read_records(path: str | os.PathLike, types: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL file in file order (see `read_jsonl`)."""
    return read_jsonl(path, types).records


def latest_run(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of the file's latest run: its last fresh start (a `run` record with `resumed_from` null) and the
    resumed starts after it, told apart by `run_id`.

    Returns:
        `(records, other_run_ids)`: the latest run's records in file order, and the run ids left out (empty when the
        file holds one run, or when its records carry no run id).
    """
    starts = [r for r in records if r.get("type") == "run" and r.get("run_id")]
    if not starts:
        return records, []
    fresh = max((i for i, r in enumerate(starts) if r.get("resumed_from") is None), default=0)
    kept = {r["run_id"] for r in starts[fresh:]}
    others = list(dict.fromkeys(r["run_id"] for r in starts[:fresh] if r["run_id"] not in kept))
    others += [i for i in dict.fromkeys(r.get("run_id") for r in records) if i and i not in kept and i not in others]
    return [r for r in records if r.get("run_id") in kept], others
