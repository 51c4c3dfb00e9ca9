"""The trackio sink (trackio's wandb-like API)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trl_ntk.output.dashboard import StepPayloadSink, require
from trl_ntk.output.schema import plain as _plain


class TrackioSink(StepPayloadSink):
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
        self._trackio = require("trackio", "trackio")
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
