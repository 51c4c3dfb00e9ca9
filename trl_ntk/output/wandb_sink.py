"""The Weights & Biases sink."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from trl_ntk.output.dashboard import StepPayloadSink, require
from trl_ntk.output.schema import plain as _plain


class WandbSink(StepPayloadSink):
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
        self._wandb = require("wandb", "wandb")
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
        body = html if html is not None else f"<pre>{escape(text)}</pre>"
        self._stage(step, {key: self._wandb.Html(body, inject=False, data_is_not_path=True)})

    def log_histogram(self, step: int, key: str, values: np.ndarray) -> None:
        counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=self.histogram_bins)
        self._stage(step, {key: self._wandb.Histogram(np_histogram=(counts, edges))})

    def log_config(self, config: Mapping[str, Any]) -> None:
        run = self._attach()
        if run is not None:
            run.config.update({"trl_ntk": _plain(dict(config))}, allow_val_change=True)
