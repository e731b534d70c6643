"""The caption job's work units: what the driver plans, and what a CPU task turns into rows.

A *unit* is one piece of the input that one task reads:

* a row group of a Parquet shard, or a WebDataset tar shard (``pipelines.shards.shard_units``):
  the driver reads only the shards' metadata, so it holds O(shards), never a row. The task
  that expands the unit reads its rows, and on a rerun the unit's own part files (their names
  say which unit they belong to: ``pipelines.sink.part_name``): it drops their transient error
  rows, then skips the ids they hold (``pipelines.sink.committed``). Completion is read shard
  by shard, by the workers, never as one set of every finished id;
* the rows of a folder or a manifest whose sample ids hash to the same prefix
  (``pipelines.listing``): the driver streams the input into listing files, one row group per
  unit, in O(units) memory; the unit's worker reads its row group and the parts that may hold
  its rows, as a shard unit's does.

Each unit travels as ``{"unit": key, "spec": json}``; :func:`expand_units` (a Ray Data task)
yields its rows in blocks of at most ``block_rows``, each row tagged with its ``unit``, and
reports per unit what it found to a :class:`UnitTally` actor (rows, rows already done,
transient rows retried, duplicates): the driver's progress total and its summary come from there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import pyarrow as pa

from pipelines import storage

log = logging.getLogger(__name__)
SHARD_FORMATS = ("parquet", "webdataset")


def source_schema(*, unit: bool = True) -> pa.Schema:
    """The fields of an input row (``pipelines.sources.make_row``) and, with ``unit``, of the
    unit it belongs to: the decoded schema without the pixels."""
    from pipelines.media import DECODED_SCHEMA

    drop = ("pixels", "shape") if unit else ("pixels", "shape", "unit")
    return pa.schema([f for f in DECODED_SCHEMA if f.name not in drop])


@dataclass
class Plan:
    """What the driver knows before any row is read."""

    units: list[dict] = field(default_factory=list)  # {"spec": a unit's JSON}: what from_items ships
    rows_known: int = 0  # rows of the units whose size the metadata (or the listing) gives
    unknown_units: int = 0  # units whose size only their worker learns (tar shards)
    rows_before: int = 0  # rows of the units done already (the workers report the rest)
    transient_retried: int = 0  # "listing": transient rows the driver dropped from parts several units share
    skipped_files: int = 0  # "listing": a folder's files that are hidden or neither images nor videos
    duplicates: int = 0  # "listing": repeated rows kept once
    units_with_parts: int = 0  # units that a rerun finds partly or wholly done
    units_done: int = 0  # units whose parts hold all their rows (left out of ``units``)
    any_video: bool = False  # a unit may hold videos (a tar shard may, until read)

    @property
    def rows_total(self) -> int | None:
        """Input rows, when the metadata tells them all."""
        return self.rows_known if not self.unknown_units else None


def plan_shards(input_path: str, input_format: str, columns, parts: dict[str, list[str]],
                output: str | None = None) -> Plan:
    """One unit per Parquet row group or tar shard of ``input_path`` (metadata only), each with
    the part files the output already holds for it (``parts``: ``pipelines.sink.parts_by_unit``).
    A unit of known size whose parts' footers hold that many rows, none a transient error
    (:func:`unit_complete`), is done: it is counted in ``rows_before`` and left out of the plan,
    so a rerun of a finished job starts no worker. A tar's size is known once a worker has read
    it: its worker records it in ``<output>/_units/`` (:func:`write_marker`), where a rerun's
    driver finds it (:func:`read_marker`) and checks the tar's parts by id too."""
    from pipelines.shards import shard_units

    plan = Plan()
    for unit in shard_units(input_path, input_format, columns):
        unit["parts"] = parts.get(unit["unit"], [])
        plan.units_with_parts += bool(unit["parts"])
        marker = None
        if unit["kind"] == "tar" and output is not None:
            unit["marker"] = storage.join(output, UNITS_DIR, unit["unit"] + ".json")
            marker = read_marker(unit) if unit["parts"] else None
        rows = marker["rows"] if marker is not None else unit["rows"]
        if rows is None:
            plan.unknown_units += 1
        else:
            plan.rows_known += rows
        if unit["parts"] and rows is not None and _shard_done(unit["parts"], rows, marker):
            plan.units_done += 1
            plan.rows_before += rows
            continue
        plan.any_video |= unit.get("media", "video") == "video"
        plan.units.append({"spec": json.dumps(unit)})
    if not plan.units and not plan.units_done:  # every unit is in one or the other
        raise ValueError(f"input {input_path} holds no {input_format} shards (--input-format {input_format})")
    return plan


def _shard_done(parts: list[str], rows: int, marker: dict | None) -> bool:
    """Whether a shard unit of ``rows`` rows is done: by the ids its worker recorded (``marker``,
    a tar's: ``pipelines.listing.unit_done`` over the parts' rows by prefix), else by count
    (:func:`unit_complete`)."""
    from pipelines.listing import unit_done
    from pipelines.sink import part_prefixes

    if marker is not None:
        return unit_done(map(part_prefixes, parts), 0, 0, rows, marker["digest"])
    return unit_complete(parts, rows)


UNITS_DIR = "_units"  # what the workers learnt of the tar units: their size and id digest


def write_marker(spec: dict, ids: list[str], stamp: list) -> None:
    """Record what a tar unit holds, for a rerun's plan: its rows (``ids``, repeats dropped), their
    id digest (``pipelines.listing.id_digest``) and the tar's size and time (``storage.stamp``,
    taken before the tar was read: a tar replaced while it was read is read again next time), at
    ``spec["marker"]``."""
    from pipelines.listing import id_digest

    marker = {"rows": len(ids), "digest": id_digest(ids), "shard": stamp}
    storage.makedirs(os.path.dirname(spec["marker"]))
    storage.write_atomic(spec["marker"], json.dumps(marker).encode())


def read_marker(unit: dict) -> dict | None:
    """What a tar unit's worker recorded (:func:`write_marker`); None when there is none, it
    cannot be read, or the tar has been written again since (a new tar under the old name)."""
    try:
        marker = json.loads(storage.read_bytes(unit["marker"]))
        return marker if marker["shard"] == storage.stamp(unit["shard"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unit_complete(parts: list[str], rows: int) -> bool:
    """Whether a shard unit of ``rows`` input rows is done: its ``parts`` hold that many rows and
    no transient error row, by their footers alone (``pipelines.sink.part_footer``). A part whose
    footer lacks the transient count (written by an older version), or fewer rows (a unit with
    a repeated id, or one stopped midway), leaves the unit to its worker, which reads its ids.
    (A listing unit, whose ids the driver knows, is checked by id too: ``pipelines.listing.unit_done``.)"""
    from pipelines.sink import part_footer

    total = 0
    for path in parts:
        count, transient, _ = part_footer(path)
        if transient is None or transient:
            return False
        total += count
    return total == rows


class UnitTally:
    """What the workers found in each unit (a Ray actor with no CPU): one report per unit,
    keyed by it, so a task that Ray runs again reports once. The driver asks for the sums."""

    def __init__(self):
        self.units: dict[str, tuple[int, int, int, int]] = {}

    def report(self, unit: str, rows: int, before: int, retried: int, duplicates: int) -> None:
        self.units[unit] = (rows, before, retried, duplicates)

    def totals(self) -> dict:
        """``units`` reported, and the sums of ``rows``, ``before``, ``retried``, ``duplicates``."""
        sums = [sum(v[i] for v in self.units.values()) for i in range(4)]
        return {"units": len(self.units), **dict(zip(("rows", "before", "retried", "duplicates"), sums))}


def unit_rows(spec: dict, *, prompt: str | None, frames: int, columns) -> tuple[list[dict], dict]:
    """The rows still to process of one unit, each tagged with ``unit``, and what was found
    (``rows``, ``before``, ``retried``, ``duplicates``). A listing unit's rows are read from its
    row group (``pipelines.listing.listing_rows``); a shard unit's are made here
    (``pipelines.sources.make_row``; an id seen twice in the unit is kept once). Then the part
    files that may hold them are read for what they already hold (``pipelines.sink.committed``)."""
    from pipelines.listing import listing_rows
    from pipelines.shards import unit_entries
    from pipelines.sink import committed
    from pipelines.sources import make_row

    duplicates = 0
    if spec["kind"] == "listing":
        rows = listing_rows(spec)
    else:
        rows, seen = [], set()
        stamp = storage.stamp(spec["shard"]) if spec.get("marker") else None  # before the read: see write_marker
        for entry in unit_entries(spec, columns):
            row = make_row(entry, None, prompt, frames)
            if row["sample_id"] in seen:
                duplicates += 1
                continue
            seen.add(row["sample_id"])
            rows.append(row)
        if spec.get("marker"):
            write_marker(spec, list(seen), stamp)
    done, retried = committed(spec["parts"])  # no parts: nothing read
    total = len(rows)
    rows = [r for r in rows if r["sample_id"] not in done]
    found = {"rows": total, "before": total - len(rows), "retried": retried, "duplicates": duplicates}
    for row in rows:
        row["unit"] = spec["unit"]
    rows.sort(key=lambda r: (r["media_type"] or "~", r["frames"] or 0, r["source"]))
    return rows, found


def expand_units(batch: pa.Table, *, prompt: str | None, frames: int, columns, block_rows: int, tally=None):
    """The caption job's first stage (a Ray Data task): the rows of each unit in ``batch``
    (:func:`unit_rows`), yielded in blocks of at most ``block_rows`` so that the decode stage
    never holds a whole row group; each unit's findings go to ``tally`` (a :class:`UnitTally`)."""
    schema = source_schema()
    for text in batch.column("spec").to_pylist():
        spec = json.loads(text)
        rows, found = unit_rows(spec, prompt=prompt, frames=frames, columns=columns)
        if tally is not None:
            tally.report.remote(spec["unit"], found["rows"], found["before"], found["retried"], found["duplicates"])
        for i in range(0, len(rows), block_rows):
            yield pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows[i:i + block_rows]], schema=schema)
