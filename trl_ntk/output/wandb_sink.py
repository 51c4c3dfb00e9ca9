"""The Weights & Biases sink: sections of at most ten prefixes, incremental tables, and at the end of training the
multi-line charts, the observed-vs-predicted scatter, the run summary and (opt-in) the report and the run folder."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from trl_ntk.output.dashboard import StepPayloadSink, require
from trl_ntk.output.files import LOCK_NAME
from trl_ntk.output.schema import plain as _plain
from trl_ntk.output.views import SECTIONS, Event, key_part, run_summary, series_by_suffix

logger = logging.getLogger(__name__)

LOG_REPORT_ENV = "TRL_NTK_WANDB_LOG_REPORT"
"""Set to `true` (or `1`, `end`) to log, at the end of training, the HTML report as `wandb.Html` and the run folder as
an artifact; `report` logs the report only. Off by default, like `WANDB_LOG_MODEL`."""
CHART_KEYS = {
    "ntk_logp": "ntk_charts/logp_by_kind",
    "ntk_change/observed": "ntk_charts/observed_by_kind",
    "ntk_change/predicted": "ntk_charts/predicted_by_kind",
}
SPLIT_CHART_KEY = "ntk_charts/split_positive_negative"
SCATTER_KEY = "ntk_charts/observed_vs_predicted"
REPORT_KEY = "ntk_tables/report"
INTERACTIVE_PREFIX = "ntk_attribution/interactive_"
"""At `"tokens"` steps, `ntk_attribution/interactive_<kind>`: the report's plotly heat map of each probe kind's first
attribution matrix as `wandb.Html` (hover: probe token, training token with its row, value). Needs plotly."""
_KEPT_FIELDS = ("type", "step", "kind", "probe_id", "observed", "predicted", "delta_observed", "delta_predicted")
_KEPT_FIELDS += ("delta_from_negative", "frac_downweighted", "tau", "eta", "s_neg_mean", "seconds")


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
        run_dir (`str` or `PathLike`, *optional*): the run folder, for the report and the artifact of `LOG_REPORT_ENV`.
        max_table_rows, histogram_bins, skip_nthr_scalars: see `DashboardSink`.

    Keys start with one of `SECTIONS` (W&B makes one panel section per prefix). Tables are incremental
    (`log_mode="INCREMENTAL"`, every step kept); a wandb without them gets a new table per step. At `"tokens"`
    steps each probe kind also gets an interactive heat map (`INTERACTIVE_PREFIX<kind>`, needs plotly). At `close()` the
    sink adds the multi-line charts (`CHART_KEYS`, `SPLIT_CHART_KEY`), the scatter (`SCATTER_KEY`) and
    `run.summary` (`views.run_summary`).
    """

    name = "wandb"

    def __init__(
        self,
        start_run: bool = False,
        project: str | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        run_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        self._wandb = require("wandb", "wandb")
        super().__init__(start_run=start_run, project=project, **kwargs)
        self.init_kwargs = dict(init_kwargs or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._defined_for: str | None = None
        self._history: dict[int, dict[str, float]] = {}
        self._records: list[dict[str, Any]] = []
        self._tables: dict[str, Any] = {}
        # TRL_NTK_WANDB_INTERACTIVE=0 keeps the PNGs only (each interactive page inlines plotly.js, ~4.7 MB)
        self._wanted = os.environ.get("TRL_NTK_WANDB_INTERACTIVE", "1").strip().lower() not in ("0", "false", "no")
        self._interactive = self._wanted and importlib.util.find_spec("plotly") is not None
        self._warned_no_plotly = False

    def _current_run(self) -> Any:
        run = self._wandb.run
        if run is not None and self._defined_for != run.id:
            run.define_metric("train/global_step")
            for section in SECTIONS:
                run.define_metric(f"{section}/*", step_metric="train/global_step", step_sync=True)
            self._defined_for = run.id
        return run

    def _open_run(self) -> Any:
        self._wandb.init(project=self.project or os.getenv("WANDB_PROJECT", "trl_ntk"), **self.init_kwargs)
        return self._current_run()

    def _finish_run(self, run: Any) -> None:
        run.finish()

    def _send(self, run: Any, payload: dict[str, Any]) -> None:
        run.log(payload)

    def write_event(self, event: Event) -> None:
        with self._batch():  # one payload per step with the other views of the event
            super().write_event(event)
            if event.heatmap_inputs:
                self._log_interactive_heatmaps(event)
        for record in event.records:
            if record.get("type") in ("dynamics", "lld", "nthr"):
                self._records.append({name: record[name] for name in _KEPT_FIELDS if name in record})

    def _log_interactive_heatmaps(self, event: Event) -> None:
        """`INTERACTIVE_PREFIX<kind>` at the event's step: the first probe of each kind (PNG only without plotly)."""
        if not self._wanted:
            return
        if not self._interactive:
            if not self._warned_no_plotly:
                logger.warning(
                    "plotly is not installed: W&B gets the attribution heat maps as PNG images only, without the "
                    "interactive ones; `pip install 'trl-ntk[report]'` adds them"
                )
                self._warned_no_plotly = True
            return
        from trl_ntk.report.attribution import attribution_block, attribution_figure_html

        pages = {}
        for kind, items in event.heatmap_inputs.items():
            if items:
                item = items[0]
                block = attribution_block(
                    item["matrix"], item["probe_tokens"], item["train_tokens"], item["train_rows"]
                )
                page = attribution_figure_html(block, item["caption"])
                pages[f"{INTERACTIVE_PREFIX}{key_part(kind)}"] = self._wandb.Html(page, inject=False)
        if pages:
            self._stage(event.step, pages)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._history.setdefault(int(step), {}).update(scalars)
        self._stage(step, scalars)

    def log_table(self, step: int, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        rows = [list(r) for r in self._cap_rows(rows)]
        if key not in self._tables:
            self._tables[key] = self._incremental_table(columns)
        table = self._tables[key]
        if table is None:  # no incremental tables in this wandb: one table per step
            table = self._wandb.Table(columns=list(columns), data=rows, allow_mixed_types=True)
        else:
            for row in rows:
                table.add_data(*row)
        self._stage(step, {key: table})

    def _incremental_table(self, columns: Sequence[str]) -> Any:
        try:
            return self._wandb.Table(columns=list(columns), allow_mixed_types=True, log_mode="INCREMENTAL")
        except (TypeError, ValueError):
            logger.info("this wandb has no incremental tables; each step logs its own table")
            return None

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

    # ------------------------------------------------------------------------------------------ end of training
    def close(self) -> None:
        """Log the end-of-training views and the summary to the run, then commit and finish a run started here."""
        if self.start_failure is None and self._history:
            run = self._current_run()  # never start a run just for these
            if run is not None:
                self._log_end_of_run(run)
        super().close()

    def _log_end_of_run(self, run: Any) -> None:
        last = max(self._history)
        charts = self._line_charts()
        scatter = self._scatter()
        if scatter is not None:
            charts[SCATTER_KEY] = scatter
        if charts:
            self._stage(last, charts)
        run.summary.update(run_summary(self._history, self._records))
        mode = os.getenv(LOG_REPORT_ENV, "").strip().lower()
        if mode in ("1", "true", "yes", "end", "report") and self.run_dir is not None:
            self._log_report(run, last, with_folder=mode != "report")

    def _line_charts(self) -> dict[str, Any]:
        """Multi-line charts across probe kinds and across the sign split (none before a second step)."""
        charts: dict[str, Any] = {}
        if len(self._history) < 2:
            return charts
        for prefix, key in CHART_KEYS.items():
            series = series_by_suffix(self._history, prefix)
            if series:
                charts[key] = self._wandb.plot.line_series(
                    xs=[steps for steps, _ in series.values()],
                    ys=[values for _, values in series.values()],
                    keys=list(series),
                    title=f"{prefix.split('/')[-1].removeprefix('ntk_')} by probe kind",
                    xname="train/global_step",
                )
        split = {
            f"{sign} {kind}": values
            for sign in ("positive", "negative")
            for kind, values in series_by_suffix(self._history, f"ntk_split/{sign}").items()
        }
        if split:
            charts[SPLIT_CHART_KEY] = self._wandb.plot.line_series(
                xs=[steps for steps, _ in split.values()],
                ys=[values for _, values in split.values()],
                keys=list(split),
                title="predicted change from positive vs negative gradients, by probe kind",
                xname="train/global_step",
            )
        return charts

    def _scatter(self) -> Any:
        rows = [
            [r["predicted"], r["observed"], r.get("kind"), r["step"], r.get("probe_id")]
            for r in self._records
            if r["type"] == "dynamics" and _is_finite(r.get("predicted"), r.get("observed"))
        ]
        if not rows:
            return None
        table = self._wandb.Table(columns=["predicted", "observed", "kind", "step", "probe_id"], data=rows)
        return self._wandb.plot.scatter(
            table, "predicted", "observed", title="observed vs predicted change (each probe, each analysed step)"
        )

    def _log_report(self, run: Any, step: int, with_folder: bool) -> None:
        from trl_ntk.report.render import build_report

        path = build_report(self.run_dir, progress=False)
        self._stage(step, {REPORT_KEY: self._wandb.Html(path.read_text(encoding="utf-8"), inject=False)})
        if with_folder:
            artifact = self._wandb.Artifact(f"trl_ntk-{run.id}", type="trl_ntk_run")
            for file in sorted(self.run_dir.rglob("*")):
                if file.is_file() and file.name != LOCK_NAME:
                    artifact.add_file(str(file), name=str(file.relative_to(self.run_dir)))
            run.log_artifact(artifact)


def _is_finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)
