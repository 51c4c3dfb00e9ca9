"""Fan-out with failure isolation (`SinkGroup`) and the factory that builds the sinks a run asks for."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trl_ntk.output.dashboard import require
from trl_ntk.output.files import JsonlSink
from trl_ntk.output.schema import JSONL_NAME, attributions_file, status_record
from trl_ntk.output.tensorboard_sink import TensorBoardSink
from trl_ntk.output.trackio_sink import TrackioSink
from trl_ntk.output.views import Event, RunMemory
from trl_ntk.output.wandb_sink import WandbSink

logger = logging.getLogger(__name__)

DASHBOARDS = ("wandb", "tensorboard", "trackio")


@runtime_checkable
class Sink(Protocol):
    """Something that receives the records of `docs/output-format.md`: the JSONL file or a dashboard.

    How the callback talks to sinks: it builds all records of one trainer event (the `probe` records of a scoring
    step; the `dynamics` and `lld` records of an analysis step; or a single `run`, `probes`, `nthr`, `status`
    record) as plain dicts and hands them over *together*, through a `SinkGroup`:

        sinks = make_sinks(None, output_dir, trainer=trainer)      # follows trainer.args.report_to
        sinks.truncate_after(checkpoint_step)                      # on resume only
        sinks.write_event(step, [run_record])                      # or sinks.write(run_record)
        sinks.write_event(t, probe_records)                        # scores before the update of step t
        file = sinks.save_attributions(t, arrays)                  # "tokens" level: the .npz content
        sinks.write_event(t, dynamics_records + lld_records)       # records with matrix={"file": file, "key": id}
        sinks.write_status(step, analysis_failures, message)       # at the first failure and at the end
        sinks.close()

    Handing a whole event over at once lets a dashboard aggregate per probe kind and send one payload per step.

    Methods:
        write_event(event): all records of one `Event`. The JSONL sink appends them; dashboards draw the event's
            views (per-kind scalars, tables, heat maps, coloured tokens).
        close(): flush; release what the sink opened itself, never what it attached to.
    """

    name: str

    def write_event(self, event: Event) -> None: ...

    def close(self) -> None: ...


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
    def run_id(self) -> str | None:
        """The id the JSONL sink stamps on every record of this start of the run."""
        jsonl = self.jsonl
        return jsonl.run_id if jsonl is not None else None

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

    def write_status(
        self, step: int, analysis_failures: int, message: str = "", untrusted_steps: int = 0
    ) -> dict[str, Any]:
        """Write a `status` record now (call it at the first analysis failure and at the end of training).

        `sink_failures` are the counts so far; `message` defaults to the last sink failure.

        Returns:
            `dict`: the record written.
        """
        record = status_record(
            step, analysis_failures, self.failures, message or self.last_error or "", untrusted_steps
        )
        self.write_event(step, [record])
        return record

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
    by_trainer = trainer is not None  # the trainer logs NTHR's scalars itself (train/nthr/*)
    for name in resolve_report_to(report_to):
        if name == "wandb":
            sinks.append(WandbSink(start_run=True, run_dir=output_dir, skip_nthr_scalars=by_trainer))
        elif name == "tensorboard":
            require("tensorboard", "tensorboard")
            sinks.append(
                TensorBoardSink(trainer=trainer, log_dir=output_dir / "tensorboard", skip_nthr_scalars=by_trainer)
            )
        elif name == "trackio":
            sinks.append(TrackioSink(start_run=True, skip_nthr_scalars=by_trainer))
    return SinkGroup(sinks, strict=strict)
