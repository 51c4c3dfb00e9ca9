"""The run folder on disk: `dynamics.jsonl` (appended by `JsonlSink`, the source of truth) and the attribution
archives `attributions/step_<step>.npz`.

Each `JsonlSink` is one start of a run: it stamps its `run_id` on every record, holds a lock on the folder while it
writes (a second writer is refused), sets a previous run's files aside when a fresh run starts in a used folder, and
truncates on bytes when a run resumes, so records are never mixed, duplicated or lost to a torn line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trl_ntk.output.schema import ATTRIBUTIONS_DIR, JSONL_NAME, attributions_file, decode_line, encode_record

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writer is not detected
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".dynamics.jsonl.lock"
PREVIOUS_DIR = "previous"
_STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


class RunFolderInUse(RuntimeError):
    """Another writer (another process, or another callback in this process) holds the run folder."""


def new_run_id() -> str:
    """A run id that sorts by start time: `YYYYmmdd-HHMMSS-<8 hex>`."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def open_binary(path: str | os.PathLike, mode: str) -> BinaryIO:
    """`open(path, mode)` unbuffered: every write reaches the file or raises, so a failed write can be rolled back."""
    return open(path, mode, buffering=0)  # noqa: SIM115


def _write_all(handle: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[written:]


def _tmp_path(target: Path) -> Path:
    """A sibling of `target` to write first and rename (same file system, so the rename is atomic)."""
    return target.with_name(f"{target.name}.{os.getpid()}.tmp")


# ---------------------------------------------------------------------------------------------------------------------
# Attribution archives


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif array.dtype.kind == "O":
        array = array.astype(str)
    return array


def save_attributions(run_dir: str | os.PathLike, step: int, arrays: Mapping[str, Any]) -> str:
    """Write one analysis step's attribution arrays to `run_dir/attributions/step_<step>.npz` (compressed).

    The keys follow `docs/output-format.md`: `<probe_id>` float32 `[M, L]`, `<probe_id>.tokens` `[M]`,
    `train.tokens` `[L]`, `train.row` `[L]`, `train.coeff` `[L]`. Tensors are moved to CPU, float matrices stored
    as float32 and token lists as unicode arrays, so the archive loads with `allow_pickle=False`. The file is
    written to a temporary name and renamed, so a reader never sees half an archive; a failed write (disk full)
    leaves neither the archive nor the temporary file.

    Returns:
        `str`: the path relative to `run_dir`, as the `dynamics` records' `matrix.file` holds it.
    """
    relative = attributions_file(step)
    target = Path(run_dir) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {key: _as_array(value) for key, value in arrays.items()}
    tmp_path = _tmp_path(target)
    try:
        with open_binary(tmp_path, "wb") as tmp:
            np.savez_compressed(tmp, **payload)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    return relative


def load_attributions(run_dir: str | os.PathLike, file: str) -> dict[str, np.ndarray]:
    """Read an archive written by `save_attributions` (`file` relative to `run_dir`) into a dict of arrays."""
    with np.load(Path(run_dir) / file, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


# ---------------------------------------------------------------------------------------------------------------------
# The JSONL file


class JsonlSink:
    """Appends records to a JSONL file, one JSON object per line, flushed after every event: the source of truth.

    One sink is one start of a run: every record it writes carries its `run_id`. At the first write it takes a lock
    on the folder (`RunFolderInUse` if another writer holds it) and, unless `truncate_after` was called first (a
    resume), moves the files of an earlier run in the folder to `previous/<time>/` with a warning, so two runs are
    never merged. A write that fails half-way (disk full) is rolled back, so no torn line is left behind.

    Usage:
        sink = JsonlSink("out/dynamics/dynamics.jsonl")
        sink.truncate_after(120)               # resuming from checkpoint-120: drop what came after it
        sink.write_records([status_record(120, 0, {}, "")])
        sink.close()

    Args:
        path (`str` or `PathLike`): the JSONL file; its folder is the run folder, with `attributions/` beside it.
        run_id (`str`, *optional*): this start's id; a new one (`new_run_id()`) by default.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, run_id: str | None = None):
        self.path = Path(path)
        if self.path.suffix != ".jsonl":
            raise ValueError(f"JsonlSink writes a .jsonl file, got {self.path}; pass e.g. {self.path / JSONL_NAME}")
        self.run_dir = self.path.parent
        self.run_id = run_id or new_run_id()
        self.non_finite_fields: set[str] = set()
        self._file: BinaryIO | None = None
        self._lock: BinaryIO | None = None  # a file object, so a sink dropped without close() still frees the folder
        self._resuming = False
        self._needs_newline = False
        self._refused: RunFolderInUse | None = None

    # -------------------------------------------------------------------------------------------- the folder
    def _acquire(self) -> None:
        """Take the folder's lock; a sink refused once stays refused (it never writes after the other run ends)."""
        if self._refused is not None:
            raise self._refused
        if self._lock is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = open_binary(self.run_dir / LOCK_NAME, "ab")
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                self._refused = RunFolderInUse(
                    f"{self.run_dir} is being written by another run (another process, or a second learning-dynamics "
                    "callback on this trainer); its records are not mixed in: give each run its own output folder "
                    "(output_dir=...), or add the callback once"
                )
                raise self._refused from None
        self._lock = lock

    def _set_aside_previous_run(self) -> Path | None:
        """Move an earlier run's `dynamics.jsonl`, `attributions/` and `report.html` to `previous/<time>/`."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.path.stat().st_mtime))
        target = self.run_dir / PREVIOUS_DIR / stamp
        suffix = 1
        while target.exists():
            target, suffix = self.run_dir / PREVIOUS_DIR / f"{stamp}-{suffix}", suffix + 1
        target.mkdir(parents=True)
        for name in (JSONL_NAME, ATTRIBUTIONS_DIR, "report.html"):
            if (self.run_dir / name).exists():
                shutil.move(str(self.run_dir / name), str(target / name))
        warnings.warn(
            f"{self.run_dir} held the records of an earlier run; they were moved to {target} so that this fresh run "
            "is not merged with them (pass another output folder to keep runs side by side)",
            UserWarning,
            stacklevel=4,
        )
        return target

    def _handle(self) -> BinaryIO:
        if self._file is None:
            self._acquire()
            if not self._resuming:
                self._set_aside_previous_run()
            self._file = open_binary(self.path, "ab")
            size = os.fstat(self._file.fileno()).st_size
            if size:
                with open(self.path, "rb") as existing:
                    existing.seek(size - 1)
                    self._needs_newline = existing.read(1) != b"\n"
        return self._file

    # -------------------------------------------------------------------------------------------- writing
    def _encode(self, records: Iterable[Mapping[str, Any]]) -> bytes:
        lines, fields = [], set()
        for record in records:
            found: list[str] = []
            stamped = {**record, "run_id": record.get("run_id") or self.run_id}
            lines.append(encode_record(stamped, found) + "\n")
            fields |= {f"{record.get('type')}.{path.split('.')[0].split('[')[0]}" for path in found}
        new = fields - self.non_finite_fields
        if new:
            self.non_finite_fields |= new
            warnings.warn(
                f"non-finite values (NaN or inf) in {', '.join(sorted(new))} were written as null",
                RuntimeWarning,
                stacklevel=4,
            )
        return "".join(lines).encode("utf-8")

    def write_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append `records` and flush once; a failed write is rolled back to the last complete line."""
        records = list(records)
        data = self._encode(records)
        handle = self._handle()
        if self._needs_newline:
            data = b"\n" + data
        start = os.fstat(handle.fileno()).st_size
        try:
            _write_all(handle, data)
            handle.flush()
            self._needs_newline = False
        except BaseException:
            try:
                os.ftruncate(handle.fileno(), start)
            except OSError:
                self._needs_newline = True  # the next write starts a fresh line; the torn one is skipped by readers
            raise

    def write_event(self, event: Any) -> None:
        """Append the records of an `Event` and flush once."""
        self.write_records(event.records)

    def write(self, record: Mapping[str, Any]) -> None:
        self.write_records([record])

    def save_attributions(self, step: int, arrays: Mapping[str, Any]) -> str:
        """Write `attributions/step_<step>.npz` beside the JSONL; returns its path relative to the run folder."""
        self._acquire()
        return save_attributions(self.run_dir, step, arrays)

    # -------------------------------------------------------------------------------------------- resume
    def truncate_after(self, step: int) -> int:
        """Resume: drop records with `step > step`, damaged lines (a cut write, even mid-character) and the later
        attribution archives, so the resumed start continues the file with every step once.

        The file is read as bytes, rewritten to a temporary name and renamed.

        Returns:
            `int`: how many lines were dropped.
        """
        self._close_file()
        self._acquire()
        self._resuming = True
        for archive in (self.run_dir / ATTRIBUTIONS_DIR).glob("step_*.npz"):
            match = _STEP_FILE.match(archive.name)
            if match and int(match.group(1)) > step:
                archive.unlink()
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            record = decode_line(line)
            if record is not None and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + b"\n")
            else:
                dropped += 1
        tmp_path = _tmp_path(self.path)
        with open_binary(tmp_path, "wb") as tmp:
            _write_all(tmp, b"".join(kept))
        os.replace(tmp_path, self.path)
        if dropped:
            logger.info("%s: dropped %d line(s) after step %d to resume", self.path, dropped, step)
        return dropped

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the file and release the folder's lock."""
        self._close_file()
        if self._lock is not None:
            if fcntl is not None:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
