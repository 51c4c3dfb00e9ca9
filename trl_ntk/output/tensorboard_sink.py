"""The TensorBoard sink."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trl_ntk.output.dashboard import DashboardSink, markdown_cell
from trl_ntk.output.schema import plain as _plain
from trl_ntk.output.views import CONFIG_TEXT_KEY, Event, custom_scalar_layout


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
        self._laid_out: set[int] = set()

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
        writer = self.writer
        if id(writer) not in self._laid_out:  # one custom-scalars layout per writer: the sections as multi-line charts
            writer.add_custom_scalars(custom_scalar_layout())
            self._laid_out.add(id(writer))
        super().write_event(event)
        writer.flush()

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        writer = self.writer
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        shown = self._cap_rows(rows)[: self.max_text_table_rows]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(markdown_cell(value) for value in row) + " |" for row in shown]
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
        self.writer.add_text(CONFIG_TEXT_KEY, "```\n" + text + "\n```", 0)

    def close(self) -> None:
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None
