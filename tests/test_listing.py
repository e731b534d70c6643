"""A folder's or a manifest's rows planned as hash units (pipelines.listing), without Ray: the
oracle is exactly-once: whatever the input became between two runs (files added, the unit width
grown), the rows the new plan's workers process and the rows already committed are every input
row, each once."""

from __future__ import annotations

import json
import os
import random
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import listing
from pipelines.listing import (RelatedParts, SortedRows, cut_units, id_digest, id_hashes, parse_unit, plan_listing,
                               remove_listings, unit_bits, unit_name)
from pipelines.sink import PartWriter, part_footer, parts_by_unit, read_output, to_table
from pipelines.sources import EntryStream, scan
from pipelines.units import unit_rows
from tests.media_fixtures import png_bytes


class _Echo:
    """A stand-in model stage: each row back as an output row (its error kept)."""

    def __init__(self, *, run_id: str, **_):
        self.run_id = run_id

    def __call__(self, batch):
        return to_table([{**{k: r.get(k) for k in ("sample_id", "source", "error", "error_kind")},
                          "run_id": self.run_id, "output": r.get("output", "caption")} for r in batch.to_pylist()])


def _folder(root, names):
    os.makedirs(root, exist_ok=True)
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            with open(path, "wb") as fh:
                fh.write(png_bytes(0))
    return str(root)


def _plan(inputs, out, *, rows_per_unit=2, run_id="r1"):
    return plan_listing(EntryStream(inputs), prompt=None, frames=4, output=out, run_id=run_id,
                        batch_size=rows_per_unit, parts=parts_by_unit(out))


def _specs(plan):
    return [json.loads(u["spec"]) for u in plan.units]


def _todo(plan):
    """What the plan's workers would process: each unit's rows less its committed ones."""
    return [r for s in _specs(plan) for r in unit_rows(s, prompt=None, frames=4, columns=None)[0]]


def test_unit_width_names_and_the_hash():
    assert [unit_bits(n, 8) for n in (0, 8, 9, 16, 17, 40, 64, 65, 512, 513)] == [0, 0, 1, 1, 2, 3, 3, 4, 6, 6]
    assert [unit_bits(n, 8) for n in (8 * 64 + 64, 64 * 1024, 64 * 1024 + 1, 1024 << 11)] == [6, 6, 7, 11]  # r = ⌈n/64⌉ up to 1,024
    assert unit_bits(10**9, 8) == listing.MAX_UNIT_BITS  # at most 4,096 units
    assert unit_name(3, 5) == "h3x5" and parse_unit("h3x5") == (3, 5) and parse_unit("h12xfff") == (12, 0xFFF)
    assert parse_unit("rows") == (0, 0)  # parts from before hash units: every unit's ancestor
    assert parse_unit("u0123456789abcdef") is None and parse_unit("hx") is None and parse_unit("h3xq") is None
    import hashlib

    (h,) = id_hashes(["abc"])
    assert int(h) == int.from_bytes(hashlib.sha1(b"abc").digest()[:8], "big")
    ids = [f"id{i}" for i in range(50)]
    assert id_digest(ids) == sum(int(x) for x in id_hashes(ids)) % (1 << 64)
    assert (id_digest(ids[:20]) + id_digest(ids[20:])) % (1 << 64) == id_digest(reversed(ids))


def test_related_parts_are_the_unit_its_ancestors_and_its_descendants():
    parts = {"h2x1": ["a"], "h1x0": ["b"], "h1x1": ["c"], "h3x2": ["d"], "h3x3": ["e"], "h3x4": ["f"],
             "rows": ["g"], "u00ff": ["shard"]}
    related = RelatedParts(2, parts)
    assert sorted(related.of(1)) == ["a", "b", "d", "e", "g"]  # 01: itself, 0 (ancestor), 010 and 011, the legacy root
    assert sorted(related.of(2)) == ["c", "f", "g"]  # 10: 1, 100
    assert sorted(related.of(3)) == ["c", "g"]
    assert sorted(RelatedParts(0, parts).of(0)) == ["a", "b", "c", "d", "e", "f", "g"]


@pytest.mark.parametrize("chunk", [1000, 7])
def test_sorted_rows_spilled_or_not_are_the_rows_once_in_hash_order(chunk, monkeypatch):
    """Spilled to partitions (a chunk of 7 rows) or held whole, the same rows come back in
    (h, id) order, each id once, the first in input order kept."""
    monkeypatch.setattr(listing, "CHUNK_ROWS", chunk)
    rows = [{"sample_id": f"s{i % 40}", "source": f"{i}.png", "media_type": "image"} for i in range(60)]
    listed = SortedRows(iter(rows), where="folder x")
    tables = list(listed)
    listed.close()
    if chunk == 7:
        assert len(tables) > 1 and not os.path.exists(listed._spill.dir)  # partitions, and gone after close
    out = pa.concat_tables(tables)
    hashes = out.column("h").to_numpy()
    assert list(hashes) == sorted(hashes) and listed.seen == 60 and listed.duplicates == 20
    assert dict(zip(out.column("sample_id").to_pylist(), out.column("source").to_pylist())) == {
        f"s{i}": f"{i}.png" for i in range(40)}


def test_an_id_the_input_gives_twice_is_refused_with_both_rows(monkeypatch):
    monkeypatch.setattr(listing, "CHUNK_ROWS", 3)
    rows = [{"sample_id": f"x{i}", "has_id": True} for i in range(9)] + [{"sample_id": "x4", "has_id": True}]
    with pytest.raises(ValueError, match=r"^manifest m.csv: id 'x4' appears more than once \(rows 5 and 10\)$"):
        list(SortedRows(iter(rows), where="manifest m.csv"))


@pytest.mark.parametrize("bits", [0, 1, 5, 9])
def test_units_cut_at_every_change_of_the_top_bits(bits):
    ids = [f"r{i}" for i in range(300)]
    table = pa.table({"sample_id": ids, "h": pa.array(id_hashes(ids), pa.uint64())}).sort_by("h")
    pieces = [table.slice(0, 100), table.slice(100, 150), table.slice(250)]  # units may span tables
    units = list(cut_units(pieces, bits))
    assert sum(t.num_rows for _, t in units) == 300
    values = [v for v, _ in units]
    assert values == sorted(set(values))  # each unit once, in order
    for value, t in units:
        assert {int(h) >> (64 - bits) if bits else 0 for h in t.column("h").to_pylist()} == {value}


def test_a_folder_plan_writes_one_row_group_per_unit_and_the_listing_is_removed(tmp_path):
    inputs = _folder(tmp_path / "in", [f"d{i % 3}/{i}.png" for i in range(20)] + ["notes.txt", ".hidden.png"])
    out = str(tmp_path / "out")
    plan = _plan(inputs, out, rows_per_unit=4)
    specs = _specs(plan)
    assert plan.rows_total == 20 and plan.skipped_files == 2 and len(specs) == 8  # 20 rows / 4 → 3 bits
    assert all(s["kind"] == "listing" and s["parts"] == [] for s in specs)
    files = {s["file"] for s in specs}
    assert all(f.startswith(os.path.join(out, "_listing", "r1")) for f in files)
    assert sum(pq.ParquetFile(f).metadata.num_row_groups for f in files) == len(specs)
    rows = _todo(plan)
    assert sorted(r["sample_id"] for r in rows) == sorted(r["sample_id"] for r in scan(inputs).rows)
    assert all(r["unit"] == unit_name(3, int(id_hashes([r["sample_id"]])[0]) >> 61) for r in rows)
    remove_listings(out)
    assert not os.path.exists(os.path.join(out, "_listing"))


def test_a_growing_folder_is_captioned_exactly_once_across_reruns(tmp_path):
    """The oracle: rerun after rerun, with files added between runs (so the unit width grows and
    units split) and each run stopped after some units, the rows written are every input's, each
    once; and a finished input's rerun plans nothing."""
    rng = random.Random(0)
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    names = [f"{i:03d}.png" for i in range(6)]
    for run in range(6):
        _folder(inputs, names)
        plan = _plan(inputs, out, rows_per_unit=3, run_id=f"r{run}")
        todo = _todo(plan)
        written = set(read_output(out).column("sample_id").to_pylist())
        assert not written & {r["sample_id"] for r in todo}  # nothing committed is done again
        writer = PartWriter(_Echo, out, f"r{run}")
        for spec in _specs(plan)[: rng.randint(1, len(plan.units))]:  # the run stops after some units
            rows = [r for r in todo if r["unit"] == spec["unit"]]
            if rows:
                writer(pa.Table.from_pylist(rows))
        names += [f"{rng.randint(0, 999):03d}x{run}.png" for _ in range(rng.randint(3, 12))]
    plan = _plan(inputs, out, rows_per_unit=3, run_id="last")
    PartWriter(_Echo, out, "last")(pa.Table.from_pylist(_todo(plan)))
    ids = read_output(out).column("sample_id").to_pylist()
    all_parts = [p for paths in parts_by_unit(out).values() for p in paths]
    assert sum(part_footer(p)[0] for p in all_parts) == len(ids)  # no id in two parts
    assert sorted(ids) == sorted(r["sample_id"] for r in scan(inputs).rows)
    again = _plan(inputs, out, rows_per_unit=3, run_id="again")
    assert again.units == [] and again.rows_before == again.rows_total == len(ids)


@pytest.mark.parametrize("first,then", [(2, 8), (8, 2)])
def test_a_rerun_with_another_batch_size_writes_nothing_twice(tmp_path, first, then):
    """The unit width follows --batch-size: a rerun with a larger one has wider units, whose
    workers read their descendants' parts; a smaller one, narrower units reading their ancestors'."""
    inputs, out = _folder(tmp_path / "in", [f"{i}.png" for i in range(40)]), str(tmp_path / "out")
    plan = _plan(inputs, out, rows_per_unit=first)
    todo = _todo(plan)
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist([r for r in todo if r["unit"] in {s["unit"] for s in _specs(plan)[::2]}]))
    done = set(read_output(out).column("sample_id").to_pylist())
    plan = _plan(inputs, out, rows_per_unit=then, run_id="r2")
    assert {r["sample_id"] for r in _todo(plan)} == {r["sample_id"] for r in todo} - done


def test_a_unit_with_as_many_rows_but_other_ids_is_not_done(tmp_path):
    """A file removed and another added in the same unit: the parts' footers count as many rows
    as the unit has, but their id digest differs, so the unit goes to its worker, which
    captions the new file."""
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    _folder(inputs, ["a.png"])
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist(_todo(_plan(inputs, out, rows_per_unit=8))))
    assert _plan(inputs, out, rows_per_unit=8).units == []
    os.remove(os.path.join(inputs, "a.png"))
    _folder(inputs, ["b.png"])  # one row, one unit (0 bits), as before
    plan = _plan(inputs, out, rows_per_unit=8)
    assert [r["source"] for r in _todo(plan)] == [os.path.join(inputs, "b.png")]
    PartWriter(_Echo, out, "r2")(pa.Table.from_pylist(_todo(plan)))
    (first, second) = (part_footer(p)[2] for p in sorted(parts_by_unit(out)["h0x0"], key=os.path.getmtime))
    assert [sum(v[0] for v in c.values()) for c in (first, second)] == [1, 1]
    # the parts hold a row more than the unit (a's, whose file is gone): its worker reads them, finds nothing to do
    plan = _plan(inputs, out, rows_per_unit=8)
    assert len(plan.units) == 1 and _todo(plan) == []


def test_parts_of_the_version_before_hash_units_are_read_where_they_hold_rows(tmp_path):
    """Parts named by no unit (``part-rows-…``, written before hash units, with no prefix
    counts in their footers) are every unit's ancestors: their ids are hashed once on the
    driver, and each unit lists only those that hold rows of it."""
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    _folder(inputs, [f"{i}.png" for i in range(10)])
    rows = scan(inputs).rows
    PartWriter(_Echo, out, "old")(pa.Table.from_pylist([{**r, "unit": None} for r in rows[:4]]))  # part-rows-…
    (legacy,) = parts_by_unit(out)["rows"]
    pq.write_table(pq.read_table(legacy).replace_schema_metadata(None), legacy)  # the older footer
    plan = _plan(inputs, out, rows_per_unit=2)
    assert sorted(r["sample_id"] for r in _todo(plan)) == sorted(r["sample_id"] for r in rows[4:])
    old_units = {unit_name(plan_bits(plan), int(h) >> (64 - plan_bits(plan))) for h in id_hashes(r["sample_id"] for r in rows[:4])}
    assert {s["unit"] for s in _specs(plan) if s["parts"]} <= old_units
    assert all(s["parts"] in ([], [legacy]) for s in _specs(plan))


def plan_bits(plan) -> int:
    return parse_unit(_specs(plan)[0]["unit"])[0]


def test_a_shared_part_of_transient_rows_is_dropped_by_the_driver_before_any_worker(tmp_path):
    """A part of an ancestor unit serves several units of a wider run: the driver drops its
    transient rows before the workers start (two workers must not rewrite one part), and each
    retried row is then processed by its own unit, once."""
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    _folder(inputs, [f"{i}.png" for i in range(6)])
    plan = _plan(inputs, out, rows_per_unit=8)  # 6 rows: one unit, h0x0
    todo = _todo(plan)
    failed = [{**r, "error": "device fault", "error_kind": "transient", "output": None} for r in todo[:3]]
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist(failed))  # one part, all transient
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist(todo[3:4]))
    _folder(inputs, [f"{i}.png" for i in range(6, 40)])  # the folder grows: more bits, h0x0 is every unit's ancestor
    plan = _plan(inputs, out, rows_per_unit=8, run_id="r2")
    assert plan.transient_retried == 3 and len(parts_by_unit(out)["h0x0"]) == 1  # the all-transient part is gone
    again = _todo(plan)
    assert sorted(r["sample_id"] for r in again) == sorted(r["sample_id"] for r in scan(inputs).rows if r["sample_id"] != todo[3]["sample_id"])


def test_an_empty_folder_plans_nothing_and_counts_what_it_skipped(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    plan = _plan(str(tmp_path), str(tmp_path / "out"))
    assert plan.units == [] and plan.rows_total == 0 and plan.skipped_files == 1


def test_a_killed_drivers_spill_is_removed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "ep-listing-999999999-abc"
    stale.mkdir()
    (stale / "000.arrow").write_bytes(b"x")
    mine = tmp_path / f"ep-listing-{os.getpid()}-def"
    mine.mkdir()
    spill = listing._Spill()
    try:
        assert not stale.exists() and mine.exists()  # a live driver's (this one's) is kept
    finally:
        spill.close()


def test_a_manifest_is_read_in_pieces_and_its_rows_are_the_scans(tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.sources.MANIFEST_BATCH_ROWS", 3)
    monkeypatch.setattr(listing, "CHUNK_ROWS", 4)
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
    rows = [{"path": f"{i % 5}.png", "prompt": f"q{i}"} for i in range(12)] + [{"path": "0.png", "prompt": "q0"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet", row_group_size=4)
    out = str(tmp_path / "out")
    plan = plan_listing(EntryStream(str(tmp_path / "m.parquet")), prompt=None, frames=4, output=out, run_id="r",
                        batch_size=3, parts={})
    assert plan.rows_total == 12 and plan.duplicates == 1
    assert sorted((r["source"], r["prompt"]) for r in _todo(plan)) == sorted((r["path"], r["prompt"]) for r in rows[:12])


def test_a_manifest_without_a_path_column_is_refused_before_any_row(tmp_path):
    (tmp_path / "m.csv").write_text("file,prompt\na.png,hi\n")
    with pytest.raises(ValueError, match=r"manifest .*m.csv needs a 'path' column"):
        EntryStream(str(tmp_path / "m.csv"))
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"manifest .*m.parquet needs a 'path' column"):
        EntryStream(str(tmp_path / "m.parquet"))
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="every line must be a JSON object with a 'path' key \\(line 2\\)"):
        list(EntryStream(str(tmp_path / "m.jsonl")))
    (tmp_path / "latin.csv").write_bytes("path\ncaf\xe9.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        list(EntryStream(str(tmp_path / "latin.csv")))


def test_the_walk_is_a_directory_at_a_time(tmp_path, monkeypatch):
    """The folder is walked lazily: the first rows come before the last directory is listed."""
    _folder(tmp_path, [f"d{i}/{j}.png" for i in range(4) for j in range(3)])
    listed = []
    real = os.walk

    def spy(*args, **kwargs):
        for step in real(*args, **kwargs):
            listed.append(step[0])
            yield step

    monkeypatch.setattr("pipelines.storage.os.walk", spy)
    stream = EntryStream(str(tmp_path))
    assert len(listed) == 2  # telling a folder of images from shards: the root and d0, up to the first image
    listed.clear()
    stream = iter(stream)
    first = next(stream)
    assert first["key"] == "d0/0.png" and len(listed) == 2  # the root and d0, nothing more yet
    assert len(list(stream)) == 11 and len(listed) == 5


def test_a_bad_line_after_a_spill_leaves_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "CHUNK_ROWS", 2)
    made = []
    real = listing._Spill.__init__

    def spy(self):
        real(self)
        made.append(self.dir)

    monkeypatch.setattr(listing._Spill, "__init__", spy)
    (tmp_path / "m.jsonl").write_text("".join(f'{{"path": "{i}.png"}}\n' for i in range(5)) + "not json\n")
    with pytest.raises(ValueError, match="line 6 is not valid JSON"):
        SortedRows(EntryStream(str(tmp_path / "m.jsonl")).rows(None, 4), where="m")
    assert made and not any(os.path.exists(d) for d in made)
