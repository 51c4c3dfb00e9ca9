"""Where the records go: a JSONL file (always on, the source of truth) and the dashboards (W&B, TensorBoard, trackio).

The protocol every sink follows is `Sink` (a name, `write_event`, `close`); `SinkGroup` fans each event out, JSONL
first, so that a failing dashboard never loses a record and never stops training. The pieces live by role:

    schema.py            record builders, the version, the one reader
    files.py             JsonlSink and the attribution archives
    views.py             the dashboard view model of one event (scalars, tables, heat maps, coloured tokens)
    drawing.py           matplotlib heat maps and coloured token HTML
    dashboard.py         the dashboard base classes
    wandb_sink.py, tensorboard_sink.py, trackio_sink.py   the backends
    group.py             SinkGroup and make_sinks
"""

from __future__ import annotations

from trl_ntk.output.dashboard import DashboardSink, StepPayloadSink
from trl_ntk.output.files import JsonlSink, RunFolderInUse, load_attributions, new_run_id, save_attributions
from trl_ntk.output.group import DASHBOARDS, Sink, SinkGroup, make_sinks, resolve_report_to
from trl_ntk.output.schema import (
    ATTRIBUTIONS_DIR,
    JSONL_NAME,
    RECORD_TYPES,
    SCHEMA_VERSION,
    attributions_file,
    encode_record,
    read_records,
)
from trl_ntk.output.tensorboard_sink import TensorBoardSink
from trl_ntk.output.trackio_sink import TrackioSink
from trl_ntk.output.views import (
    DYNAMICS_TABLE_COLUMNS,
    DYNAMICS_TABLE_KEY,
    PROBE_TABLE_COLUMNS,
    PROBE_TABLE_KEY,
    Event,
    RunMemory,
    aggregate_scalars,
    dynamics_table_rows,
    probe_table_rows,
)
from trl_ntk.output.wandb_sink import WandbSink

__all__ = [
    "ATTRIBUTIONS_DIR",
    "DASHBOARDS",
    "DYNAMICS_TABLE_COLUMNS",
    "DYNAMICS_TABLE_KEY",
    "JSONL_NAME",
    "PROBE_TABLE_COLUMNS",
    "PROBE_TABLE_KEY",
    "RECORD_TYPES",
    "SCHEMA_VERSION",
    "DashboardSink",
    "Event",
    "JsonlSink",
    "RunFolderInUse",
    "RunMemory",
    "Sink",
    "SinkGroup",
    "StepPayloadSink",
    "TensorBoardSink",
    "TrackioSink",
    "WandbSink",
    "aggregate_scalars",
    "attributions_file",
    "dynamics_table_rows",
    "encode_record",
    "load_attributions",
    "make_sinks",
    "new_run_id",
    "probe_table_rows",
    "read_records",
    "resolve_report_to",
    "save_attributions",
]
