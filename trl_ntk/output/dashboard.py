"""The base of the dashboard sinks: an `Event` becomes `log_*` calls; `StepPayloadSink` batches them into one
payload per step for the wandb-like APIs (W&B, trackio), with `train/global_step` as a key, never `step=`."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from trl_ntk.output.views import (
    ATTRIBUTION_HISTOGRAM_KEY,
    STATUS_TEXT_KEY,
    WANDB_MAX_HISTOGRAM_BINS,
    WANDB_MAX_TABLE_ROWS,
    Event,
    RunMemory,
)

logger = logging.getLogger(__name__)


class DashboardSink:
    """Base of the dashboard sinks: turns an `Event` into `log_*` calls; subclasses implement the `log_*` methods.

    Args:
        max_table_rows (`int`, *optional*, defaults to `10000`): rows kept per table (W&B's limit).
        histogram_bins (`int`, *optional*, defaults to `64`): bins of the attribution histogram (at most 512).
        skip_nthr_scalars (`bool`, *optional*, defaults to `False`): leave out the `ntk_nthr/*` scalars, because the
            trainer already logs them as `train/nthr/*` (`make_sinks` sets it when it has a trainer).
    """

    name = "dashboard"

    def __init__(
        self, max_table_rows: int = WANDB_MAX_TABLE_ROWS, histogram_bins: int = 64, skip_nthr_scalars: bool = False
    ):
        if not 1 <= histogram_bins <= WANDB_MAX_HISTOGRAM_BINS:
            raise ValueError(f"histogram_bins must be in [1, {WANDB_MAX_HISTOGRAM_BINS}], got {histogram_bins}")
        self.max_table_rows = min(max_table_rows, WANDB_MAX_TABLE_ROWS)
        self.histogram_bins = histogram_bins
        self.skip_nthr_scalars = skip_nthr_scalars
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
                if self.skip_nthr_scalars:
                    scalars = {key: value for key, value in scalars.items() if not key.startswith("ntk_nthr/")}
                if scalars:
                    self.log_scalars(step, scalars)
            for key, (columns, rows) in event.tables.items():
                self.log_table(event.step, key, columns, rows)
            for key, images in event.heatmaps.items():
                self.log_images(event.step, key, [image for image, _ in images], [caption for _, caption in images])
            for key, (html_text, text) in event.token_texts.items():
                self.log_text(event.step, key, text, html_text)
            if event.attribution_values is not None and event.attribution_values.size:
                self.log_histogram(event.step, ATTRIBUTION_HISTOGRAM_KEY, event.attribution_values)
            if event.status_message:
                self.log_text(event.step, STATUS_TEXT_KEY, event.status_message)

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


class StepPayloadSink(DashboardSink):
    """A dashboard with a wandb-like `log(dict)`: one payload per step, `train/global_step` as a key, no `step=`."""

    def __init__(self, start_run: bool = False, project: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.start_run = start_run
        self.project = project
        self._pending: dict[int, dict[str, Any]] = {}
        self._batching = False
        self._owned_run: Any = None
        self._warned_no_run = False
        self.start_failure: str | None = None

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        if self._batching:  # nested: the outer batch commits
            yield
            return
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
        """The open run (attached), a run started here when `start_run`, or None (one warning).

        Starting a run is tried once: if it fails (no network, bad credentials), the sink is off for the rest of
        the run and every later write raises at once (counted by the `SinkGroup`), never trying again.
        """
        if self.start_failure is not None:
            raise RuntimeError(f"{self.name} is off for this run: starting a run failed ({self.start_failure})")
        run = self._current_run()
        if run is None and self.start_run:
            try:
                run = self._owned_run = self._open_run()
            except Exception as error:
                self.start_failure = f"{type(error).__name__}: {error}"
                raise
        if run is None and not self._warned_no_run:
            logger.warning(
                "%s: no run is open and start_run=False; dashboard output is dropped (the JSONL has it)", self.name
            )
            self._warned_no_run = True
        return run

    def close(self) -> None:
        if self.start_failure is None:
            self._commit()
        self._pending = {}
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


def markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def require(module: str, package: str) -> Any:
    if module in sys.modules:
        return sys.modules[module]
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"report_to asks for {module!r} but the {module!r} package is not installed; run `pip install {package}`"
            f" or drop {module!r} from report_to"
        )
    return importlib.import_module(module)
