"""A folder's or a manifest's rows, planned as units by the hash of their sample ids.

A folder or a manifest has no shards of its own, and it changes between runs: files are added
to a folder, rows appended to a manifest. Units made of "the next N rows" would move a row from
one unit to another when an input is added before it, and a rerun, whose unit reads only its
own parts, would then write that row twice. So a row's unit here depends on its ``sample_id``
alone:

* ``h(id)`` = the first 64 bits of sha1(id) (:func:`id_hashes`); a unit is every row whose
  ``h`` starts with the same ``bits`` bits, named ``h<bits>x<value in hex>`` (:func:`unit_name`);
* ``bits`` grows with the input (:func:`unit_bits`: units of a batch or more, up to about
  1,024 rows, and at most 2^:data:`MAX_UNIT_BITS` units). Prefixes nest, so a unit of an earlier run
  with another width is an ancestor or a descendant of units of this width: a unit's worker
  reads their parts too (:class:`RelatedParts`), and no row is written twice however the input grew.

The driver holds O(units), never the rows: it streams the entries (a lazy walk, a manifest read
in pieces: ``pipelines.sources.EntryStream``), makes each row, and past :data:`CHUNK_ROWS` rows
spills them to local temporary Arrow IPC files, partitioned by the top :data:`PARTITION_BITS`
bits of ``h`` (:class:`_Spill`): it holds one chunk, then one partition (rows / 256). Each partition is then sorted by ``(h, sample_id, order)``, which puts
repeated ids side by side (:func:`drop_repeats`: identical rows kept once, a manifest's own id
given twice refused), and cut into units. A unit whose parts' footers already hold all its rows,
by count and by id digest (:func:`unit_done`), is done; the others are written
to listing files under ``<output>/_listing/<run>/``, one row group per unit, which the unit's
worker reads (:func:`listing_rows`). Readers of the output ignore ``_listing`` (a ``_`` name).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.sink import NO_UNIT

log = logging.getLogger(__name__)

CHUNK_ROWS = 20_000  # rows the driver holds before it spills them to local temporary files
PARTITION_BITS = 8  # spill partitions: 2^8, each sorted alone (100 M inputs: ~400 k rows each)
MAX_UNIT_BITS = 12  # at most 2^12 = 4,096 units, however large the input
LISTING_FILE_ROWS = 100_000  # rows per listing file (an object-store listing file is built in memory, then put)
LISTING_DIR = "_listing"
LEGACY_UNIT = NO_UNIT  # parts written before hash units (or rows naming no unit): the ancestor of every unit
PREFIX_BITS = MAX_UNIT_BITS  # a part's footer counts its rows by this many top bits of h: any unit width is a sum of them
MIN_UNITS = 64  # an input is cut into at least this many units when it has the rows: its CPU tasks run side by side
MAX_UNIT_ROWS = 1024  # ... of at most about this many rows (a CPU task per unit: larger ones spread its cost)


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """``h(id)`` per id: the first 8 bytes of sha1(id in UTF-8, surrogateescape) as a big-endian
    unsigned 64-bit integer."""
    return np.fromiter((int.from_bytes(hashlib.sha1(i.encode("utf-8", "surrogateescape")).digest()[:8], "big")
                        for i in ids), dtype=np.uint64)


def id_digest(ids: Iterable[str]) -> int:
    """Σ h(id) mod 2^64 over ``ids``: the same for the same set of distinct ids in any order or
    split into any parts (the digests of the parts add up, mod 2^64, to the unit's)."""
    return int(np.sum(id_hashes(ids), dtype=np.uint64))


def prefix_counts(ids: list[str], transient: list[bool]) -> dict[int, tuple[int, int, int]]:
    """A part's rows by the top :data:`PREFIX_BITS` bits of their ``h`` (its footer keeps it):
    ``{prefix: (rows, transient error rows, Σ h mod 2^64)}``. From it, whether the part's rows
    cover a unit of any width ≤ PREFIX_BITS is known without reading them (:func:`unit_done`)."""
    counts: dict[int, list[int]] = {}
    for h, bad in zip(id_hashes(ids).tolist(), transient):
        entry = counts.setdefault(h >> (64 - PREFIX_BITS), [0, 0, 0])
        entry[0] += 1
        entry[1] += bool(bad)
        entry[2] = (entry[2] + h) % (1 << 64)
    return {p: tuple(v) for p, v in counts.items()}


def encode_prefixes(counts: dict[int, tuple[int, int, int]]) -> bytes:
    """:func:`prefix_counts` as footer bytes: JSON ``{"<prefix hex>": [rows, transient, digest]}``."""
    return json.dumps({f"{p:x}": list(v) for p, v in sorted(counts.items())}, separators=(",", ":")).encode()


def decode_prefixes(data: bytes) -> dict[int, tuple[int, int, int]]:
    """The inverse of :func:`encode_prefixes`."""
    return {int(p, 16): tuple(v) for p, v in json.loads(data).items()}


def unit_done(prefixes: Iterable[dict], bits: int, value: int, rows: int, digest: int) -> bool:
    """Whether the parts whose rows by id-hash prefix are ``prefixes`` (:func:`prefix_counts`)
    hold every row of the unit ``value`` at width ``bits``, which has ``rows`` rows of id digest
    ``digest``: their entries under the unit's prefix (prefix >> (PREFIX_BITS − bits) = value)
    count ``rows`` rows, none a transient error, and their digests add up to ``digest`` mod 2^64."""
    count, total = 0, 0
    for counts in prefixes:
        for prefix, (n, transient, part_digest) in counts.items():
            if prefix >> (PREFIX_BITS - bits) == value:
                if transient:
                    return False
                count, total = count + n, total + part_digest
    return count == rows and total % (1 << 64) == digest


def holds_unit(counts: dict, bits: int, value: int) -> bool:
    """Whether a part with these rows by prefix (:func:`prefix_counts`) holds a row of unit ``value``."""
    return any(prefix >> (PREFIX_BITS - bits) == value for prefix in counts)


def unit_bits(rows: int, batch_size: int) -> int:
    """The unit width for ``rows`` rows: the fewest bits b ≤ :data:`MAX_UNIT_BITS` with
    rows ≤ r · 2^b, where r = max(batch_size, min(MAX_UNIT_ROWS, ⌈rows / MIN_UNITS⌉)) is the
    rows a unit should hold: a batch at least, and else enough units to keep the CPU stage busy,
    each large enough that a task's start is a small part of its work."""
    target = max(batch_size, min(MAX_UNIT_ROWS, -(-rows // MIN_UNITS)))
    bits = 0
    while bits < MAX_UNIT_BITS and rows > target << bits:
        bits += 1
    return bits


def unit_values(hashes: np.ndarray, bits: int) -> np.ndarray:
    """The unit of each ``h`` at width ``bits``: its top ``bits`` bits, h >> (64 − bits) (0 for 0 bits)."""
    if bits == 0:
        return np.zeros(len(hashes), dtype=np.uint64)
    return hashes >> np.uint64(64 - bits)


def unit_name(bits: int, value: int) -> str:
    """``h<bits>x<value in hex>``: ``h3x5`` holds the rows whose h starts with the bits 101."""
    return f"h{bits}x{value:x}"


_UNIT_NAME = re.compile(r"h([0-9]+)x([0-9a-f]+)")  # as unit_name writes them


def parse_unit(name: str) -> tuple[int, int] | None:
    """``(bits, value)`` of a hash unit's name (:data:`LEGACY_UNIT` is ``(0, 0)``); None for any
    other name (a shard's unit)."""
    if name == LEGACY_UNIT:
        return 0, 0
    match = _UNIT_NAME.fullmatch(name)
    return (int(match[1]), int(match[2], 16)) if match else None


class RelatedParts:
    """Which existing parts may hold the rows of a unit of width ``bits``: those of the unit of
    the same name, of its ancestors (fewer bits, a prefix of it) and of its descendants (more
    bits). Built once from ``parts`` (``pipelines.sink.parts_by_unit``) in O(parts)."""

    def __init__(self, bits: int, parts: dict[str, list[str]]):
        self.bits = bits
        self.below: dict[int, list[str]] = {}  # value at this width → parts of that unit and its descendants
        self.above: dict[tuple[int, int], list[str]] = {}  # (bits, value) of an ancestor → its parts
        for name, paths in parts.items():
            parsed = parse_unit(name)
            if parsed is None:
                continue
            width, value = parsed
            if width >= bits:
                self.below.setdefault(value >> (width - bits), []).extend(paths)
            else:
                self.above.setdefault(parsed, []).extend(paths)
        self.widths = sorted({width for width, _ in self.above})

    def of(self, value: int) -> list[str]:
        """The parts that may hold rows of unit ``value``."""
        found = list(self.below.get(value, ()))
        for width in self.widths:
            found.extend(self.above.get((width, value >> (self.bits - width)), ()))
        return found


def _spill_schema() -> pa.Schema:
    from pipelines.units import source_schema

    return pa.schema([*source_schema(unit=False), pa.field("h", pa.uint64()), pa.field("order", pa.int64()),
                      pa.field("has_id", pa.bool_())])


class _Spill:
    """Rows spilled to local temporary Arrow IPC files, one per partition (the top
    :data:`PARTITION_BITS` bits of ``h``), each written a slice at a time: what the driver holds
    is one chunk (an IPC writer keeps nothing of what it wrote; a Parquet writer keeps every row
    group's metadata until it closes: 2.4 MB a chunk, measured). :meth:`tables` reads them back
    one partition at a time, in ``h`` order. The folder is ``ep-listing-<pid>-…`` in the
    temporary directory (``TMPDIR``); one that a killed driver left is removed by the next."""

    PREFIX = "ep-listing-"

    def __init__(self):
        _remove_stale_spills(self.PREFIX)
        _allow_open_files(2 ** PARTITION_BITS + 64)
        self.dir = tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-")
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def _path(self, partition: int) -> str:
        return f"{self.dir}/{partition:03d}.arrow"

    def add(self, table: pa.Table) -> None:
        table = table.sort_by("h")
        part = (table.column("h").to_numpy() >> np.uint64(64 - PARTITION_BITS)).astype(np.int64)
        starts = np.flatnonzero(np.diff(part, prepend=-1))
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(part)
            p = int(part[start])
            if p not in self.writers:
                self.writers[p] = pa.ipc.new_stream(self._path(p), table.schema)
            self.writers[p].write_table(table.slice(start, end - start))

    def tables(self) -> Iterator[pa.Table]:
        for p in sorted(self.writers):
            self.writers[p].close()
        for p in sorted(self.writers):
            with pa.OSFile(self._path(p)) as fh:
                yield pa.ipc.open_stream(fh).read_all()

    def close(self) -> None:
        for writer in self.writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _remove_stale_spills(prefix: str) -> None:
    """Delete the spill folders (``<prefix><pid>-…``) whose driver process is gone."""
    import glob

    from pipelines.sink import process_alive

    for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*-*")):
        pid = os.path.basename(folder)[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _allow_open_files(count: int) -> None:
    """Raise this process's soft limit of open files to at least ``count`` where the hard limit
    allows (the spill holds one file per partition open; macOS's default soft limit is 256)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        target = count if hard == resource.RLIM_INFINITY else min(count, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("h", "ascending"), ("sample_id", "ascending"), ("order", "ascending")])


def drop_repeats(table: pa.Table, where: str) -> tuple[pa.Table, int]:
    """A table sorted by (h, sample_id, order) without its repeated ids, and how many were
    dropped: the first row of each id in input order is kept. An id that the input gave itself
    (a manifest's ``id``) twice is an error that names ``where`` (``manifest <path>``) and both rows."""
    import pyarrow.compute as pc

    n = table.num_rows
    ids = table.column("sample_id")
    if n < 2:
        return table, 0
    repeat = pc.equal(ids.slice(1), ids.slice(0, n - 1)).combine_chunks()  # row i + 1 repeats row i
    if not pc.any(repeat).as_py():
        return table, 0
    second = pa.concat_arrays([pa.array([False]), repeat])  # a repeat: dropped
    first = pa.concat_arrays([repeat, pa.array([False])])  # the row a repeat repeats
    given = pc.and_(pc.or_(first, second), table.column("has_id").combine_chunks())
    if pc.any(given).as_py():
        sid = table.filter(given).column("sample_id")[0].as_py()
        orders = table.filter(pc.equal(ids, sid)).column("order").to_pylist()  # in input order: the sort's last key
        raise ValueError(f"{where}: id {sid!r} appears more than once (rows {orders[0] + 1} and {orders[1] + 1})")
    return table.filter(pc.invert(second)), pc.sum(second).as_py()


class SortedRows:
    """Rows (dicts from ``pipelines.sources.make_row``), sorted by ``(h, sample_id, order)`` and
    without repeats, holding one chunk of :data:`CHUNK_ROWS` rows while they come in and one
    partition (rows / 2^:data:`PARTITION_BITS`) while they go out: iterate it once for the tables of
    consecutive rows (a partition each, or one table when the input fits in a chunk); ``seen`` is
    how many rows came in, ``duplicates`` how many repeats were dropped (known once iterated). A
    row's ``has_id`` says that its id is the input's own (a repeat of it is an error)."""

    def __init__(self, rows: Iterable[dict], *, where: str, progress=None):
        self.where, self.duplicates, self.seen = where, 0, 0
        self._spill: _Spill | None = None
        self._schema = _spill_schema()
        buffer: list[dict] = []
        last_said = time.monotonic()
        try:
            for row in rows:
                buffer.append({**row, "order": self.seen, "has_id": bool(row.get("has_id"))})
                self.seen += 1
                if len(buffer) >= CHUNK_ROWS:
                    self._spill = self._spill or _Spill()
                    self._spill.add(self._table(buffer))
                    buffer = []
                    if progress is not None and time.monotonic() - last_said >= 10.0:
                        last_said = time.monotonic()
                        progress(self.seen)
            self._buffer = self._table(buffer)
            if self._spill is not None:
                self._spill.add(self._buffer)
                self._buffer = None
        except BaseException:  # a bad manifest line, an interrupt: no spill files left behind
            self.close()
            raise

    def _table(self, rows: list[dict]) -> pa.Table:
        # from_pylist takes each schema field's value from each row (None when it has none)
        table = pa.Table.from_pylist(rows, schema=self._schema.remove(self._schema.get_field_index("h")))
        return table.append_column("h", pa.array(id_hashes(table.column("sample_id").to_pylist()), pa.uint64()))

    def __iter__(self) -> Iterator[pa.Table]:
        tables = [self._buffer] if self._spill is None else self._spill.tables()
        for table in tables:
            table, dropped = drop_repeats(_sorted(table), self.where)
            self.duplicates += dropped
            if table.num_rows:
                yield table

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()


def cut_units(tables: Iterable[pa.Table], bits: int) -> Iterator[tuple[int, pa.Table]]:
    """``(value, rows)`` of each unit at width ``bits``, from tables of rows in ``h`` order
    (a unit may span tables when ``bits`` < :data:`PARTITION_BITS`)."""
    value, pieces = None, []
    for table in tables:
        values = unit_values(table.column("h").to_numpy(), bits)
        bounds = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(values)]
        for start, end in zip(bounds, bounds[1:]):
            here = int(values[start])
            if value is not None and here != value:
                yield value, pa.concat_tables(pieces)
                pieces = []
            value = here
            pieces.append(table.slice(start, end - start))
    if pieces:
        yield value, pa.concat_tables(pieces)


def _digest(hashes) -> int:
    """Σ h mod 2^64 of an ``h`` column (:func:`id_digest` without hashing again)."""
    return int(np.sum(np.asarray(hashes, dtype=np.uint64), dtype=np.uint64))


class _ListingWriter:
    """Units' rows into listing files ``<root>/<n>.parquet``, one row group per unit, a new file
    every :data:`LISTING_FILE_ROWS` rows. A local file is written in place (no worker reads it
    before the plan is made); an object-store file is built in memory and put whole."""

    def __init__(self, root: str):
        self.root, self.files = root, 0
        self.writer: pq.ParquetWriter | None = None
        self.buffer = self.path = None
        self.rows = self.groups = 0

    def add(self, table: pa.Table) -> tuple[str, int]:
        """Write ``table`` as one row group; returns ``(file, row group)``."""
        if self.writer is not None and self.rows >= LISTING_FILE_ROWS:
            self.close()
        if self.writer is None:
            self.path = storage.join(self.root, f"{self.files:05d}.parquet")
            self.files += 1
            self.rows = self.groups = 0
            if storage.is_uri(self.root):
                self.buffer = pa.BufferOutputStream()
                self.writer = pq.ParquetWriter(self.buffer, table.schema)
            else:
                storage.makedirs(self.root)
                self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table, row_group_size=max(1, table.num_rows))
        self.rows += table.num_rows
        self.groups += 1
        return self.path, self.groups - 1

    def close(self) -> None:
        """Finish the current file (an object-store one: put it)."""
        if self.writer is None:
            return
        self.writer.close()
        if self.buffer is not None:
            storage.write_atomic(self.path, self.buffer.getvalue())
        self.writer = self.buffer = None

    def abort(self) -> None:
        """Close the current file without putting it (the plan failed: nothing will read it)."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = self.buffer = None


def remove_listings(output: str) -> None:
    """Delete the listing files of every run under ``output`` (a finished run's, or a killed one's)."""
    storage.remove_tree(storage.join(output, LISTING_DIR))


def plan_listing(stream, *, prompt: str | None, frames: int, output: str, run_id: str, batch_size: int,
                 parts: dict[str, list[str]], say=None):
    """The :class:`pipelines.units.Plan` of a folder or a manifest (``stream``: a
    ``pipelines.sources.EntryStream``): its rows in hash units (:func:`unit_bits`), each with
    the existing parts that hold rows of it (:class:`RelatedParts` from ``parts``, the output's
    ``pipelines.sink.parts_by_unit``, kept where their rows by prefix say so: :func:`holds_unit`).
    A unit whose parts hold all its rows, by count and id digest, none a transient error
    (:func:`unit_done`), is done (counted in ``rows_before``, left out); the others' rows go to
    listing files under ``<output>/_listing/<run_id>/`` for their workers. Parts of ancestor
    units serve several units: their transient rows are dropped here, before any worker runs,
    so that no two workers rewrite one part. ``say(text)`` gets a line every 10 s while a long
    input is listed."""
    from pipelines.sink import drop_transient, part_prefixes
    from pipelines.units import Plan, source_schema

    remove_listings(output)
    prefixes = functools.lru_cache(maxsize=None)(part_prefixes)  # O(parts): a part may serve several units
    names = source_schema(unit=False).names

    def listed(count: int) -> None:
        if say is not None:
            say(f"[caption] listing {stream.input}: {count} inputs so far")

    rows = SortedRows(stream.rows(prompt, frames), where=stream.where, progress=listed)
    writer = _ListingWriter(storage.join(output, LISTING_DIR, run_id))
    plan = Plan(skipped_files=stream.skipped)
    try:
        bits = unit_bits(rows.seen, batch_size)
        related = RelatedParts(bits, parts)
        shared = [p for paths in related.above.values() for p in paths if any(v[1] for v in prefixes(p).values())]
        if shared:
            plan.transient_retried = drop_transient(shared)
            prefixes.cache_clear()
        for value, table in cut_units(rows, bits):
            name, count = unit_name(bits, value), table.num_rows
            plan.rows_known += count
            found = [p for p in related.of(value) if holds_unit(prefixes(p), bits, value)]
            plan.units_with_parts += bool(found)
            if found and unit_done(map(prefixes, found), bits, value, count, _digest(table.column("h"))):
                plan.units_done += 1
                plan.rows_before += count
                continue
            plan.any_video |= "video" in table.column("media_type").to_pylist()
            path, group = writer.add(table.select(names))
            plan.units.append({"spec": json.dumps(
                {"kind": "listing", "unit": name, "file": path, "group": group, "rows": count, "parts": found})})
        writer.close()
    finally:
        writer.abort()
        rows.close()
    plan.duplicates = rows.duplicates
    return plan


def listing_rows(spec: dict) -> list[dict]:
    """The rows of a listing unit (its row group of its listing file), as the driver made them."""
    with storage.open_input(spec["file"]) as fh:
        return pq.ParquetFile(fh).read_row_group(spec["group"]).to_pylist()
