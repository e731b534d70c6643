"""The Parquet output: one schema, atomic part files, exactly-once resume.

An output directory holds ``part-<run_id>-<seq>.parquet`` files, each written whole to a
hidden temporary name and renamed into place, so a reader (and a rerun) only ever sees
complete files; a crash leaves at most a hidden ``.tmp`` file, which the next run removes.
A rerun reads the ``sample_id`` column of the existing parts and processes only the rest;
the writer also drops any id it has already written, so no row is ever written twice.

Error rows say their kind (``error_kind``, ``pipelines.failures``). Before a rerun processes
anything, :func:`drop_transient` rewrites each part that holds ``transient`` error rows without
them (write a hidden file, rename it over the part: atomic), so those samples count as not done
and are processed again, and the retried row never meets its old error row: every reader (this
module's :func:`read_output`, or any plain Parquet reader of the directory) sees one row per
``sample_id``. A crash between the two steps leaves a sample missing, never twice; the next run
writes it.
``_job.json`` records what the rows were computed with, so that a rerun with a different
model or pruning setting into the same directory is refused instead of mixing results.
``_lock.json`` (:func:`output_lock`) makes one job at a time the writer of a directory.

The output may be a local directory or an object-store prefix (``s3://bucket/captions``,
``pipelines.storage``): on an object store a part appears whole when its single put completes,
and there is no temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import socket
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("media_type", pa.string()),
        pa.field("frames", pa.int32()),
        pa.field("prompt", pa.string()),
        pa.field("output", pa.string()),
        pa.field("reference", pa.string()),
        pa.field("model", pa.string()),
        pa.field("method", pa.string()),
        pa.field("budget", pa.float64()),
        pa.field("keep_ratio", pa.float64()),
        pa.field("prune_layer", pa.int32()),
        pa.field("visual_tokens", pa.int32()),
        pa.field("visual_tokens_kept", pa.int32()),
        pa.field("prefill_flops", pa.float64()),
        pa.field("flops_reduction", pa.float64()),
        pa.field("latency_ms", pa.float64()),
        pa.field("error", pa.string()),
        pa.field("run_id", pa.string()),
        # beyond the docs/design.md §3 contract: what resume and tracking need
        pa.field("error_kind", pa.string()),  # input (permanent) or transient (retried by a rerun); null without error
        pa.field("flops_reduction_paper", pa.float64()),
        pa.field("kv_cache_bytes", pa.int64()),
        pa.field("prefill_ms", pa.float64()),
        pa.field("first_token_ids", pa.list_(pa.int32())),
        pa.field("first_token_logprobs", pa.list_(pa.float32())),
        pa.field("generate_rows", pa.int32()),  # rows that shared this row's generate call
        pa.field("padding_share", pa.float64()),  # padding share of that call's token slots
        pa.field("generated_at", pa.float64()),  # unix time at the end of that call
        pa.field("oom_splits", pa.int32()),  # halvings after out-of-memory errors before that call ran
        pa.field("keep_tokens", pa.int64()),  # PruneConfig.keep_tokens (the "k = B directly" budget), else null
    ]
)
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
TRANSIENT_ROWS_KEY = b"ep_transient_rows"  # a part's footer: how many of its rows are transient errors
ID_PREFIXES_KEY = b"ep_id_prefixes"  # a part's footer: its rows by id-hash prefix (pipelines.listing.prefix_counts)
NO_UNIT = "rows"  # the unit of rows that name none (parts written before units): every hash unit's ancestor
JOB_FILE = "_job.json"
LOCK_FILE = "_lock.json"


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts) → a table with exactly the output schema; missing keys become nulls."""
    return pa.Table.from_pylist([{c: r.get(c) for c in OUTPUT_COLUMNS} for r in rows], schema=OUTPUT_SCHEMA)


def part_files(output_dir: str) -> list[str]:
    if storage.is_uri(output_dir):
        return [f for f in storage.list_files(output_dir, recursive=False)
                if storage.basename(f).startswith("part-") and f.endswith(".parquet")]
    return sorted(glob.glob(os.path.join(glob.escape(output_dir), "part-*.parquet")))


def _read_part(path: str, **kwargs) -> pa.Table:
    if storage.is_uri(path):
        fs, inner = storage.filesystem(path)
        return pq.read_table(inner, filesystem=fs, **kwargs)
    return pq.read_table(path, **kwargs)


def done_ids(output_dir: str) -> set[str]:
    """The sample ids already written to ``output_dir`` (empty if it does not exist)."""
    ids: set[str] = set()
    for path in part_files(output_dir):
        ids.update(_read_part(path, columns=["sample_id"]).column("sample_id").to_pylist())
    return ids


def drop_transient(parts: list[str]) -> int:
    """Remove the ``transient`` error rows from ``parts`` (each part rewritten atomically, a part
    left empty deleted, a part already gone skipped), so that a rerun processes them again.
    Returns how many rows were dropped."""
    import pyarrow.compute as pc

    dropped = 0
    for path in parts:
        try:
            table = _read_part(path, schema=OUTPUT_SCHEMA)
        except FileNotFoundError:  # deleted since it was listed (it held transient rows only)
            continue
        transient = _is_transient(table)
        count = pc.sum(transient).as_py() or 0
        if not count:
            continue
        if count == table.num_rows:
            storage.remove(path)
        else:
            _atomic_write_table(table.filter(pc.invert(transient)), path)
        dropped += count
    return dropped


def _is_transient(table: pa.Table) -> pa.ChunkedArray:
    """True at the rows whose ``error_kind`` is ``transient`` (the device failed them)."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.equal(table.column("error_kind"), "transient"), False)


def committed(parts: list[str]) -> tuple[set[str], int]:
    """What one unit's ``parts`` hold, read by the worker that processes the unit on a rerun:
    their transient error rows dropped first (:func:`drop_transient`), then the ids left, which
    the unit skips. Returns ``(ids, transient rows dropped)``."""
    dropped = drop_transient(parts)
    ids: set[str] = set()
    for path in parts:
        try:
            ids.update(_read_part(path, columns=["sample_id"]).column("sample_id").to_pylist())
        except FileNotFoundError:  # a part of transient rows only is gone now
            continue
    return ids, dropped


def part_footer(path: str) -> tuple[int, int | None, dict | None]:
    """``(rows, transient error rows, rows by id-hash prefix)`` of a part, from its footer alone
    (one ranged read on an object store); the last two are None for a part written before
    footers kept them (the prefixes: ``pipelines.listing.prefix_counts``)."""
    from pipelines.listing import decode_prefixes

    with storage.open_input(path) as f:
        meta = pq.read_metadata(f)
    kept = meta.metadata or {}
    transient, prefixes = kept.get(TRANSIENT_ROWS_KEY), kept.get(ID_PREFIXES_KEY)
    return (meta.num_rows, int(transient) if transient is not None else None,
            decode_prefixes(prefixes) if prefixes is not None else None)


def part_prefixes(path: str) -> dict[int, tuple[int, int, int]]:
    """A part's rows by id-hash prefix (``pipelines.listing.prefix_counts``): from its footer, or,
    for a part written before footers kept them, counted from its ids and error kinds (one read
    of those two columns). Empty for a part that is gone."""
    from pipelines.listing import prefix_counts

    try:
        counts = part_footer(path)[2]
        if counts is not None:
            return counts
        table = _read_part(path, schema=OUTPUT_SCHEMA, columns=["sample_id", "error_kind"])
    except FileNotFoundError:
        return {}
    return prefix_counts(table.column("sample_id").to_pylist(), _is_transient(table).to_pylist())


def part_name(unit: str, ids: list[str]) -> str:
    """``part-<unit>-<h>.parquet``, h = the first 16 hex digits of sha1 over the sorted ids: the
    same rows of the same unit get the same name, so a task that Ray runs again overwrites its
    own part instead of adding a second copy."""
    import hashlib

    digest = hashlib.sha1("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:16]
    return f"part-{unit}-{digest}.parquet"


def parts_by_unit(output_dir: str) -> dict[str, list[str]]:
    """The part files of ``output_dir`` by the unit named in them (file names only: nothing is
    read)."""
    units: dict[str, list[str]] = {}
    for path in part_files(output_dir):
        units.setdefault(storage.basename(path).split("-")[1], []).append(path)
    return units


def remove_stale_temporaries(output_dir: str) -> int:
    """Delete the hidden ``.part-*.tmp`` files a crashed run left (their rows were never
    committed); run by the driver before any worker writes. An object store has none."""
    if storage.is_uri(output_dir) or not os.path.isdir(output_dir):
        return 0
    stale = glob.glob(os.path.join(glob.escape(output_dir), ".part-*.tmp"))
    for path in stale:
        os.remove(path)
    return len(stale)


def read_output(output_dir: str) -> pa.Table:
    """All rows of an output directory, one per ``sample_id`` (the first written wins)."""
    files = part_files(output_dir)
    if not files:
        return OUTPUT_SCHEMA.empty_table()
    table = pa.concat_tables([_read_part(f, schema=OUTPUT_SCHEMA) for f in files])
    ids = table.column("sample_id").to_pylist()
    seen: set[str] = set()
    keep = []
    for i, sid in enumerate(ids):
        if sid not in seen:
            seen.add(sid)
            keep.append(i)
    return table if len(keep) == len(ids) else table.take(keep)


@contextlib.contextmanager
def output_lock(output_dir: str):
    """Be the only writer of ``output_dir`` for the block: create ``_lock.json`` exclusively
    (host, pid, start time), remove it at the end. A lock whose owner is gone (same host, no such
    process) is taken over, and the block receives what that lock said (``as stale``: a dict,
    e.g. the killed job's MLflow run; None otherwise); any other is refused with one line that
    names its owner. Nested blocks of one process share the outer block's lock.

    On an object store there is no exclusive create: the lock is written, read back and kept
    only if it still names this process, which catches all but two jobs started within the
    same moment (one job per output prefix stays the user's rule there)."""
    storage.makedirs(output_dir)
    path = storage.join(output_dir, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    stale = None
    for _ in range(2):
        try:
            fd = _create_exclusive(path, me)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None and (owner.get("host"), owner.get("pid")) == (me["host"], me["pid"]):
                yield None  # this process holds it already (an outer block): nested, nothing to do
                return
            if owner is not None and owner.get("host") == me["host"] and not process_alive(owner.get("pid")):
                storage.remove(path)  # its job ended without removing it (killed): take it over
                stale = owner
                continue
            who = f"host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since')}" if owner else "unknown owner"
            raise ValueError(
                f"output directory {output_dir} is in use by another job ({who}); wait for it to end, use another "
                f"--output, or remove {path} if that job is gone"
            ) from None
        if fd is not None:
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        break
    try:
        yield stale
    finally:
        if (_lock_owner(path) or {}).get("pid") == me["pid"]:
            storage.remove(path)


def _create_exclusive(path: str, me: dict) -> int | None:
    """Create the lock file ``path`` or raise FileExistsError: locally with ``O_EXCL`` (returns the
    descriptor to write ``me`` to); on an object store by a put that is read back (returns None)."""
    if not storage.is_uri(path):
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    if storage.exists(path):
        raise FileExistsError(path)
    mine = {**me, "token": uuid.uuid4().hex}
    storage.write_atomic(path, json.dumps(mine).encode())
    if (_lock_owner(path) or {}).get("token") != mine["token"]:
        raise FileExistsError(path)  # another job's put landed after ours
    return None


def annotate_lock(output_dir: str, **fields) -> None:
    """Add ``fields`` to the ``_lock.json`` this process holds (e.g. its MLflow run, so that the
    next job can mark that run KILLED if this one is killed); nothing if it holds none."""
    path = storage.join(output_dir, LOCK_FILE)
    owner = _lock_owner(path)
    if owner is not None and (owner.get("host"), owner.get("pid")) == (socket.gethostname(), os.getpid()):
        storage.write_atomic(path, json.dumps({**owner, **fields}).encode())


def _lock_owner(path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path).decode("utf-8"))
    except (OSError, ValueError):
        return None


def process_alive(pid) -> bool:
    """Whether a process of this host with that pid runs (one of another user, or an unreadable
    pid, counts as running)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or an unreadable pid: assume it is alive
    return True


def check_job(output_dir: str, job: dict) -> None:
    """Record ``job`` in ``output_dir``, or refuse when the directory holds another job's rows."""
    storage.makedirs(output_dir)
    path = storage.join(output_dir, JOB_FILE)
    if storage.exists(path):
        old = json.loads(storage.read_bytes(path).decode("utf-8"))
        diff = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
        if diff and part_files(output_dir):
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {job.get(k)!r}" for k in diff)
            raise ValueError(
                f"output directory {output_dir} holds rows of a different job ({shown}); "
                "use another --output, or delete that directory to start over"
            )
    storage.write_atomic(path, json.dumps(job, indent=2, sort_keys=True).encode())


def _atomic_write_table(table: pa.Table, path: str) -> None:
    """Write ``table`` to a hidden temporary file, sync it, rename it to ``path``: a reader sees
    the old file or the new one, never a part of one. A failed write leaves no temporary file.
    On an object store: the file built in memory, then one put (``storage.write_atomic``).
    The footer records how many rows are transient errors, and the rows by id-hash prefix (:func:`part_footer`)."""
    import pyarrow.compute as pc

    from pipelines.listing import encode_prefixes, prefix_counts

    is_transient = _is_transient(table)
    transient = pc.sum(is_transient).as_py() or 0
    prefixes = prefix_counts(table.column("sample_id").to_pylist(), is_transient.to_pylist())
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), TRANSIENT_ROWS_KEY: str(transient).encode(),
                                           ID_PREFIXES_KEY: encode_prefixes(prefixes)})
    if storage.is_uri(path):
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        storage.write_atomic(path, buffer.getvalue())
        return
    storage.replace_atomic(path, lambda tmp: pq.write_table(table, tmp))


class OutputWriteError(OSError):
    """A part file could not be written (the disk is full, the folder became read-only, ...):
    what was committed before stays, and a rerun resumes from it."""


def write_error(exc: OSError, output_dir: str, rows_written: int) -> OutputWriteError:
    """The one-line error for a part that could not be written: what happened (``exc``), that
    the ``rows_written`` committed before stay, and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"no space left on the device holding {output_dir}"
        fix = "free some space, then run the same command again to resume"
    else:
        what = f"cannot write to {output_dir} ({exc.strerror or exc})"
        fix = "fix the folder, then run the same command again to resume"
    return OutputWriteError(exc.errno, f"{what}; the {rows_written} rows this run committed before stay; {fix}")


class ParquetSink:
    """Writes row batches to ``output_dir`` atomically, each ``sample_id`` at most once per
    sink, one part per (batch, unit) named by :func:`part_name`."""

    def __init__(self, output_dir: str, run_id: str, already_done: set[str] | None = None, on_commit=None):
        self.output_dir = output_dir
        self.on_commit = on_commit  # called with each table committed (the model worker's figures)
        self.run_id = run_id
        storage.makedirs(output_dir)
        self._written: set[str] = set(already_done if already_done is not None else done_ids(output_dir))
        self.rows_written = 0
        self.errors_written = 0
        self.transient_written = 0
        self.duplicates_dropped = 0

    def write(self, table: pa.Table, unit: str = NO_UNIT) -> str | None:
        """Commit the rows of ``table`` not written before as one part of ``unit``; returns the
        new file (or None)."""
        table = table.select(list(OUTPUT_COLUMNS)).cast(OUTPUT_SCHEMA)
        ids = table.column("sample_id").to_pylist()
        keep, batch_ids = [], set()
        for i, sid in enumerate(ids):
            if sid in self._written or sid in batch_ids:
                self.duplicates_dropped += 1
            else:
                batch_ids.add(sid)
                keep.append(i)
        if not keep:
            return None
        if len(keep) != len(ids):
            table = table.take(keep)
        final = storage.join(self.output_dir, part_name(unit, list(batch_ids)))
        try:
            _atomic_write_table(table, final)
        except OSError as exc:
            raise write_error(exc, self.output_dir, self.rows_written) from exc
        self._written |= batch_ids
        if self.on_commit is not None:
            self.on_commit(table)
        self.rows_written += len(keep)
        self.errors_written += len(keep) - table.column("error").null_count
        self.transient_written += table.column("error_kind").to_pylist().count("transient")
        return final


class PartWriter:
    """The model stage writing its own output (a Ray Data actor): ``stage(**kwargs)`` (the
    model, ``pipelines.infer.CaptionPredictor``) is built once per actor; each call runs it on a
    batch, commits the result as one part per unit (the ``unit`` column of the batch; rows
    without one go to :data:`NO_UNIT`), and returns one row of figures (:data:`WRITE_STATS`) for
    the driver to add up: output rows never travel to the driver. A part that cannot be written
    (a full disk, an unwritable folder) is reported in that row (``write_errno``, ``write_error``)
    rather than raised, so that the driver ends the job with one line, not a worker's traceback."""

    def __init__(self, stage, output_dir: str, run_id: str, **kwargs):
        self.stage = stage(run_id=run_id, **kwargs)
        self.sink = ParquetSink(output_dir, run_id, already_done=set(), on_commit=self._committed)
        self._tallies = None

    def _committed(self, table: pa.Table) -> None:
        rows = table.to_pylist()
        for tally in self._tallies:
            tally.add(rows)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.packing import CallTally
        from pipelines.tracking import MetricTally

        units = batch.column("unit").to_pylist() if "unit" in batch.column_names else [None] * batch.num_rows
        unit_of = dict(zip(batch.column("sample_id").to_pylist(), units))
        out = self.stage(batch)
        before = (self.sink.rows_written, self.sink.errors_written, self.sink.transient_written, self.sink.duplicates_dropped)
        groups: dict[str, list[int]] = {}
        for i, sid in enumerate(out.column("sample_id").to_pylist()):
            groups.setdefault(unit_of.get(sid) or NO_UNIT, []).append(i)
        failure = {}  # write_errno, write_error: null (WRITE_STATS) unless a part could not be written
        calls, metrics = self._tallies = (CallTally(), MetricTally())  # of the rows committed by this call
        try:
            for unit, index in groups.items():
                self.sink.write(out if len(index) == out.num_rows else out.take(index), unit=unit)
        except OutputWriteError as exc:  # the driver ends the job with one line (pipelines.caption)
            cause = exc.__cause__  # the OSError that ParquetSink.write raised it from
            failure = {"write_errno": cause.errno, "write_error": cause.strerror or str(cause)}
        after = (self.sink.rows_written, self.sink.errors_written, self.sink.transient_written, self.sink.duplicates_dropped)
        figures = dict(zip(("rows", "errors", "transient", "duplicates"), (a - b for a, b in zip(after, before))))
        return pa.Table.from_pylist([{**figures, **calls.state(), **metrics.state(), **failure}], schema=WRITE_STATS)


def _write_stats_schema() -> pa.Schema:
    from pipelines.packing import CallTally
    from pipelines.tracking import MetricTally

    return pa.schema([(name, pa.int64()) for name in ("rows", "errors", "transient", "duplicates")]
                     + [(name, pa.float64()) for name in CallTally.STATE + tuple(MetricTally().state())]
                     + [("write_errno", pa.int64()), ("write_error", pa.string())])  # a part that could not be written


WRITE_STATS = _write_stats_schema()  # what a PartWriter call returns to the driver
