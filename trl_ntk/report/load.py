"""Read a run folder for the report: the records of its latest run (through the schema's reader) and the attribution
archives beside them."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from trl_ntk.output.schema import ATTRIBUTIONS_DIR, JSONL_NAME, PROBE_KINDS, latest_run, read_jsonl

logger = logging.getLogger(__name__)

KIND_ORDER = PROBE_KINDS
"""Built-in probe kinds in the order the report shows them; other kinds follow, sorted by name."""
_DEDUPLICATED = {"probe": "probe_id", "dynamics": "probe_id", "lld": "group", "nthr": None}
_STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


@dataclass
class RunData:
    """The records of one run folder, by type, and the attribution archives beside them.

    Args:
        run_dir (`Path`): the folder of `dynamics.jsonl`.
        records (`dict[str, list[dict]]`): record type -> records in file order; `probe`, `dynamics`, `lld` and
            `nthr` records repeated for the same step (a resumed run that was not truncated) keep the last one.
        probes (`dict[str, dict]`): `probe_id` -> its entry of the latest `probes` record.
        archives (`list[tuple[int, Path]]`): `(step, path)` of every `attributions/step_<step>.npz`, by step.
        damaged_lines (`int`): lines of the file skipped as damaged (a write cut short).
        other_runs (`list[str]`): run ids in the file that are not the run shown (an older writer's mixed records).
    """

    run_dir: Path
    records: dict[str, list[dict[str, Any]]]
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    archives: list[tuple[int, Path]] = field(default_factory=list)
    damaged_lines: int = 0
    other_runs: list[str] = field(default_factory=list)

    def of(self, record_type: str) -> list[dict[str, Any]]:
        return self.records.get(record_type, [])

    @property
    def kinds(self) -> list[str]:
        """Probe kinds present, built-in kinds in `KIND_ORDER` first."""
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
    """Read a run folder with `schema.read_jsonl`: damaged lines are skipped and counted, an unknown schema version
    or a wrong-typed field raises `SchemaError`. When the file holds several runs (written by an older version),
    the latest one is kept with a warning naming the others."""
    jsonl = find_jsonl(run_dir)
    with tqdm(
        total=jsonl.stat().st_size, unit="B", unit_scale=True, desc="reading records", disable=not progress
    ) as bar:
        found = read_jsonl(jsonl, on_bytes=bar.update)
    kept, other_runs = latest_run(found.records)
    if other_runs:
        logger.warning(
            "%s holds records of %d other run(s) (%s); the report shows the latest run only",
            jsonl,
            len(other_runs),
            ", ".join(other_runs),
        )
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    probes: dict[str, dict[str, Any]] = {}
    for record in kept:
        records[record["type"]].append(record)
        if record["type"] == "probes":
            probes.update({str(p["probe_id"]): p for p in record.get("probes", []) if "probe_id" in p})
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
    return RunData(jsonl.parent, dict(records), probes, sorted(archives), found.damaged_lines, other_runs)
