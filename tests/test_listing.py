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
    assert parse_unit("u1x2") is None and parse_unit("h12") is None  # an "x" alone, or an "h" alone, names no hash unit
    for other in ("h3x0x5", "h 3x5", "h+3x5", "h3x5 ", "h3xF", "h1_0x5", "xh3x5"):  # nothing unit_name writes
        assert parse_unit(other) is None, other
    import hashlib

    (h,) = id_hashes(["abc"])
    assert int(h) == int.from_bytes(hashlib.sha1(b"abc").digest()[:8], "big")
    (h,) = id_hashes(["caf\udce9"])  # an id holding a file name's byte that is not UTF-8 (surrogateescape)
    assert int(h) == int.from_bytes(hashlib.sha1(b"caf\xe9").digest()[:8], "big")
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
    shard_first = {"u00ff": ["shard"], **parts}  # a name of no hash unit is passed over, wherever it comes
    assert sorted(RelatedParts(2, shard_first).of(1)) == ["a", "b", "d", "e", "g"]


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


def test_a_shared_part_of_transient_rows_is_dropped_by_the_driver_before_any_worker(tmp_path, monkeypatch):
    """A part of an ancestor unit serves several units of a wider run: the driver drops its
    transient rows before the workers start (two workers must not rewrite one part), and each
    retried row is then processed by its own unit, once. It reads and rewrites only the parts
    whose footers count transient rows: the others' rows stay unread on the driver."""
    import pipelines.sink as sink

    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    _folder(inputs, [f"{i}.png" for i in range(6)])
    plan = _plan(inputs, out, rows_per_unit=8)  # 6 rows: one unit, h0x0
    todo = _todo(plan)
    failed = [{**r, "error": "device fault", "error_kind": "transient", "output": None} for r in todo[:3]]
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist(failed))  # one part, all transient
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist(todo[3:4]))
    (transient_part,) = [p for p in parts_by_unit(out)["h0x0"] if part_footer(p)[1]]
    _folder(inputs, [f"{i}.png" for i in range(6, 40)])  # the folder grows: more bits, h0x0 is every unit's ancestor
    dropped_from, real = [], sink.drop_transient
    monkeypatch.setattr(sink, "drop_transient", lambda parts: dropped_from.append(list(parts)) or real(parts))
    plan = _plan(inputs, out, rows_per_unit=8, run_id="r2")
    assert dropped_from == [[transient_part]]  # not the part of good rows beside it
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


def test_prefix_counts_are_rows_transient_rows_and_the_digest_mod_2_64():
    """A part's footer by prefix: (rows, transient error rows, Σ h mod 2^64), whatever the order
    of its rows. id63 and id199 share the prefix 0xf46 (both h ≥ 2^63: their sum wraps)."""
    ids, transient = ["id63", "id199", "id0"], [True, False, False]  # the transient row first, a good one after
    h = [int(x) for x in id_hashes(ids)]
    shared, alone = h[0] >> 52, h[2] >> 52
    assert shared == h[1] >> 52 == 0xF46 and h[0] + h[1] >= 1 << 64
    counts = listing.prefix_counts(ids, transient)
    assert counts == {shared: (2, 1, h[0] + h[1] - (1 << 64)), alone: (1, 0, h[2])}
    assert listing.prefix_counts(ids[::-1], transient[::-1]) == counts
    assert listing.decode_prefixes(listing.encode_prefixes(counts)) == counts
    assert listing.unit_done([counts], listing.PREFIX_BITS, shared, 2, id_digest(ids[:2])) is False  # a transient row
    good = listing.prefix_counts(ids, [False] * 3)
    assert listing.unit_done([good], listing.PREFIX_BITS, shared, 2, id_digest(ids[:2])) is True


def test_a_transient_row_in_a_units_own_part_is_left_to_its_worker(tmp_path):
    """A unit's own part (same width) holding a transient error row: the unit is not done, its
    worker (not the driver: the part serves this unit alone) drops the row and processes it
    again. 1.png and 220.png have ids of one 12-bit prefix (0xfd2): the part's footer counts its
    good row after the transient one under the same prefix."""
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    _folder(inputs, ["1.png", "220.png"])
    todo = _todo(_plan(inputs, out, rows_per_unit=8))  # one unit, h0x0
    assert len({int(id_hashes([r["sample_id"]])[0]) >> 52 for r in todo}) == 1
    failed, good = {**todo[0], "error": "device fault", "error_kind": "transient", "output": None}, todo[1]
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist([failed, good]))
    (part,) = parts_by_unit(out)["h0x0"]
    before = (os.stat(part).st_mtime_ns, open(part, "rb").read())
    plan = _plan(inputs, out, rows_per_unit=8, run_id="r2")
    assert plan.units_done == 0 and [s["parts"] for s in _specs(plan)] == [[part]]
    assert plan.transient_retried == 0 and (os.stat(part).st_mtime_ns, open(part, "rb").read()) == before
    assert [r["sample_id"] for r in _todo(plan)] == [failed["sample_id"]]  # retried once, the good row kept


def test_a_plan_says_what_it_holds(tmp_path):
    """The plan of a folder: each unit as {"spec"}, its spec naming its
    row group and how many rows it holds; the rows as the driver made them (the run's prompt,
    a video's frames); whether any unit holds a video; no repeats counted where there are none."""
    from pipelines.listing import listing_rows

    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    _folder(inputs, [f"{i}.png" for i in range(10)] + ["video.mp4"])
    plan = plan_listing(EntryStream(inputs), prompt="Say what you see.", frames=3, output=out, run_id="r",
                        batch_size=2, parts={})
    specs = _specs(plan)
    assert plan.rows_total == 11 and plan.duplicates == 0 and len(specs) > 2
    rows = {s["unit"]: listing_rows(s) for s in specs}
    assert all(s["rows"] == len(rows[s["unit"]]) for s in specs)
    flat = [r for unit_rows_ in rows.values() for r in unit_rows_]
    assert {r["prompt"] for r in flat} == {"Say what you see."}
    assert {(r["media_type"], r["frames"]) for r in flat} == {("image", None), ("video", 3)}
    (video_unit,) = [u for u, rs in rows.items() if any(r["media_type"] == "video" for r in rs)]
    assert video_unit != specs[-1]["unit"]  # the video's unit is not the last one planned
    assert plan.any_video
    os.remove(os.path.join(inputs, "video.mp4"))
    plan = plan_listing(EntryStream(inputs), prompt=None, frames=3, output=out, run_id="r", batch_size=2, parts={})
    assert not plan.any_video and plan.duplicates == 0


def test_a_rerun_counts_the_units_done_and_those_with_parts(tmp_path):
    """Units whose parts hold all their rows are done (counted, with their rows, and left out);
    a unit with some of its rows written is planned, and counted among those with parts."""
    inputs, out = _folder(tmp_path / "in", [f"{i}.png" for i in range(40)]), str(tmp_path / "out")
    plan = _plan(inputs, out, rows_per_unit=2)
    specs, todo = _specs(plan), _todo(plan)
    whole = [s["unit"] for s in specs[::3]]
    partly = next(s["unit"] for s in specs if s["unit"] not in whole and s["rows"] > 1)
    written = [r for r in todo if r["unit"] in whole] + [next(r for r in todo if r["unit"] == partly)]
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist(written))
    again = _plan(inputs, out, rows_per_unit=2, run_id="r2")
    assert len(whole) >= 3 and again.units_done == len(whole) and again.units_with_parts == len(whole) + 1
    assert again.rows_before == sum(s["rows"] for s in specs if s["unit"] in whole)
    assert len(again.units) == len(specs) - len(whole) and again.rows_total == 40


@pytest.mark.parametrize("store", ["local", "object store"])
def test_listing_files_hold_a_row_group_per_unit_and_a_new_file_past_the_file_rows(tmp_path, monkeypatch, store, request):
    """Listing files 00000.parquet, 00001.parquet, …: each unit one row group, a file closed once
    it holds LISTING_FILE_ROWS rows or more (before its last unit it held fewer); on an object
    store each file is put whole when closed. Every row is read back from its unit's group once."""
    from pipelines import storage
    from pipelines.listing import listing_rows

    if store == "local":
        out = str(tmp_path / "out")
    else:
        request.getfixturevalue("memory_store")
        out = "memory://bucket/out"
    inputs = _folder(tmp_path / "in", [f"{i}.png" for i in range(20)])
    for file_rows in (1, 3):
        monkeypatch.setattr(listing, "LISTING_FILE_ROWS", file_rows)
        plan = plan_listing(EntryStream(inputs), prompt=None, frames=4, output=out, run_id="r", batch_size=2, parts={})
        specs = _specs(plan)
        files = list(dict.fromkeys(s["file"] for s in specs))
        assert files == [storage.join(out, "_listing", "r", f"{i:05d}.parquet") for i in range(len(files))]
        for n, path in enumerate(files):
            mine = [s for s in specs if s["file"] == path]
            assert [s["group"] for s in mine] == list(range(len(mine)))
            with storage.open_input(path) as fh:
                meta = pq.ParquetFile(fh).metadata
            held = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            assert held == [s["rows"] for s in mine]
            assert sum(held) - held[-1] < file_rows and (n == len(files) - 1 or sum(held) >= file_rows)
        assert len(files) > 2
        rows = [r for s in specs for r in listing_rows(s)]
        assert sorted(r["sample_id"] for r in rows) == sorted(r["sample_id"] for r in scan(inputs).rows)
    remove_listings(out)
    assert not storage.exists(storage.join(out, "_listing"))


def _ticking(rows, clock):
    """``rows``, the clock reading i seconds when the i-th row (from 1) comes."""
    for i, row in enumerate(rows, 1):
        clock[0] = float(i)
        yield row


def test_a_long_listing_says_how_far_it_got_every_10_s(tmp_path, monkeypatch):
    """While rows come in (a chunk of CHUNK_ROWS spilled at a time), the driver says how many
    inputs it has read once 10 s have passed since it last said so; with no one to tell, it says
    nothing. One row a second here, chunks of 5 rows: at 10, 20 and 30 s."""
    import types

    clock = [0.0]
    monkeypatch.setattr(listing, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(listing, "CHUNK_ROWS", 5)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rows = [{"sample_id": f"s{i}"} for i in range(32)]
    said = []
    listed = SortedRows(_ticking(rows, clock), where="x", progress=said.append)
    listed.close()
    assert said == [10, 20, 30]
    clock[0] = 0.0
    quiet = SortedRows(_ticking(rows, clock), where="x")  # no progress callback: nothing to call
    assert sum(t.num_rows for t in quiet) == 32
    quiet.close()
    inputs = _folder(tmp_path / "in", [f"{i}.png" for i in range(12)])
    stream, lines = EntryStream(inputs), []
    stream.rows = lambda prompt, frames: _ticking(EntryStream.rows(stream, prompt, frames), clock)
    clock[0] = 0.0
    plan_listing(stream, prompt=None, frames=4, output=str(tmp_path / "out"), run_id="r", batch_size=2, parts={},
                 say=lines.append)
    assert lines == [f"[caption] listing {inputs}: 10 inputs so far"]


@pytest.mark.parametrize("soft,hard,asked", [
    (256, "inf", (320, "inf")),  # macOS's default: raised to what the spill needs
    (256, 300, (300, 300)),  # as far as the hard limit goes
    (1024, "inf", None),  # enough already: never lowered
    ("inf", "inf", None),
])
def test_the_spill_raises_the_open_file_limit_only_as_far_as_it_needs_and_may(monkeypatch, soft, hard, asked):
    """The spill holds a file per partition (256) open, plus the process's others: the soft limit
    is raised to 2^PARTITION_BITS + 64 where it is lower, within the hard limit; a refusal
    (ValueError, OSError) leaves it as it was, without an error."""
    import resource

    inf = resource.RLIM_INFINITY
    value = lambda v: inf if v == "inf" else v  # noqa: E731
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (value(soft), value(hard)) if which == resource.RLIMIT_NOFILE else None)
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append((which, limits)))
    listing._allow_open_files(2 ** listing.PARTITION_BITS + 64)
    assert calls == ([] if asked is None else [(resource.RLIMIT_NOFILE, tuple(map(value, asked)))])
    for refusal in (ValueError("not allowed"), OSError(1, "Operation not permitted")):
        def refuse(which, limits, refusal=refusal):
            raise refusal
        monkeypatch.setattr(resource, "setrlimit", refuse)
        listing._allow_open_files(2 ** listing.PARTITION_BITS + 64)


def test_a_spill_asks_for_a_file_per_partition_and_64_more(tmp_path, monkeypatch):
    """A spill holds one file per partition (2^PARTITION_BITS) open at once, beside the process's
    own: it asks for that many plus 64, no more."""
    asked = []
    monkeypatch.setattr(listing, "_allow_open_files", asked.append)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    listing._Spill().close()
    assert asked == [2 ** listing.PARTITION_BITS + 64]


def test_the_spill_works_under_a_soft_limit_lower_than_its_partitions(tmp_path, monkeypatch):
    """Every one of the 256 partitions spilled at once (3,000 ids) with the soft limit of open
    files at 200: the spill raises it first, and each partition comes back as one table of the
    rows of its top byte of h."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the hard limit must allow the spill its 320
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(listing, "CHUNK_ROWS", 1000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
    try:
        listed = SortedRows(({"sample_id": f"s{i}"} for i in range(3000)), where="x")
        tables = list(listed)
        listed.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    tops = [{int(h) >> 56 for h in t.column("h").to_pylist()} for t in tables]
    assert tops == [{p} for p in range(256)]
    assert sorted(r for t in tables for r in t.column("sample_id").to_pylist()) == sorted(f"s{i}" for i in range(3000))


def test_a_spilled_chunk_without_rows_of_partition_0_comes_back_whole(tmp_path, monkeypatch):
    """A chunk's rows are cut at each change of partition, the first at its first row whatever
    partition that is (here 1)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(listing, "CHUNK_ROWS", 4)
    by_part = {}
    for i in range(3000):
        by_part.setdefault(int(id_hashes([f"c{i}"])[0]) >> 56, []).append(f"c{i}")
    ids = by_part[1][:1] + by_part[2][:1] + by_part[200][:2]  # one chunk, partitions 1, 2, 200
    listed = SortedRows(({"sample_id": i} for i in ids), where="x")
    assert sorted(r for t in listed for r in t.column("sample_id").to_pylist()) == sorted(ids)
    listed.close()


def test_stale_spill_folders_are_told_by_the_pid_before_the_first_dash(tmp_path, monkeypatch):
    """``ep-listing-<pid>-…``: the pid is what comes before the first dash after the prefix;
    a folder of a dead pid goes, whatever follows; others, and a live pid's, stay."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    names = {"ep-listing-999999999-a-b": False, f"ep-listing-{os.getpid()}-a-b": True, "ep-listing-x-1": True,
             "ep-listing-999999999x-1": True, "other-999999999-a": True}
    for name in names:
        (tmp_path / name).mkdir()
    listing._remove_stale_spills(listing._Spill.PREFIX)
    assert {name: (tmp_path / name).exists() for name in names} == names


def test_two_drivers_removing_one_stale_spill_both_go_on(tmp_path, monkeypatch):
    """Two drivers that start together find the same stale spill; one removes it while the
    other does: the other goes on."""
    import shutil

    import pipelines.sink as sink

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "ep-listing-999999999-abc"
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "000.arrow").write_bytes(b"x")

    def gone_meanwhile(pid):
        shutil.rmtree(stale)  # the other driver's removal, done between our listing and ours
        return False

    monkeypatch.setattr(sink, "process_alive", gone_meanwhile)
    listing._remove_stale_spills(listing._Spill.PREFIX)
    assert not stale.exists()


def test_the_spill_of_a_driver_that_died_is_removed_by_the_next(tmp_path, monkeypatch):
    """A driver killed while it holds a spill leaves its folder; the next driver's spill finds
    it by name (``ep-listing-<pid>-…``) and removes it once that pid is gone."""
    import pipelines.sink as sink

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = listing._Spill()  # never closed: its driver "died"
    monkeypatch.setattr(sink, "process_alive", lambda pid: int(pid) != os.getpid())
    alive = listing._Spill()
    try:
        assert not os.path.exists(dead.dir) and os.listdir(tmp_path) == [os.path.basename(alive.dir)]
    finally:
        alive.close()
        dead.close()


class _FullDisk:
    """A writer on a full disk: writing fails, and so does closing."""

    def __init__(self, *args, **kwargs):
        pass

    def write_table(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    close = write_table


@pytest.mark.parametrize("writing", ["spill", "listing"])
def test_a_full_disk_fails_the_listing_with_its_own_error_and_leaves_no_spill(tmp_path, monkeypatch, writing):
    """A spill or listing file that cannot be written: the user sees that error (the writer's
    failing close is not a second one in its place), and no spill folder is left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    if writing == "spill":
        monkeypatch.setattr(listing, "CHUNK_ROWS", 3)
        monkeypatch.setattr(pa.ipc, "new_stream", _FullDisk)
    else:
        monkeypatch.setattr(pq, "ParquetWriter", _FullDisk)
    inputs = _folder(tmp_path / "in", [f"{i}.png" for i in range(8)])
    with pytest.raises(OSError, match="No space left on device"):
        plan_listing(EntryStream(inputs), prompt=None, frames=4, output=str(tmp_path / "out"), run_id="r",
                     batch_size=2, parts={})
    assert os.listdir(tmp_path / "tmp") == []


def _open_files_under(root: str) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_manifest_id_given_twice_fails_the_plan_naming_the_manifest_and_closes_the_listing(tmp_path, monkeypatch):
    """A manifest whose id column repeats an id in its last partition, found after units were
    listed: the error names the manifest and both rows, and the listing file left is closed."""
    monkeypatch.setattr(listing, "CHUNK_ROWS", 4)
    ids = [f"m{i}" for i in range(20)]
    last = max(ids, key=lambda i: int(id_hashes([i])[0]))
    rows = [{"path": f"{i}.png", "id": sid} for i, sid in enumerate(ids)] + [{"path": "x.png", "id": last}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    with pytest.raises(ValueError) as failed:
        plan_listing(EntryStream(str(manifest)), prompt=None, frames=4, output=out, run_id="r", batch_size=2, parts={})
    assert str(failed.value) == f"manifest {manifest}: id {last!r} appears more than once (rows {ids.index(last) + 1} and 21)"
    listed = os.path.join(out, "_listing", "r")
    assert os.listdir(listed) and _open_files_under(listed) == []  # units were listed before the error; closed


def test_a_repeated_row_beside_an_id_the_input_gave_is_kept_once(tmp_path):
    """Identical made rows are kept once, even next to a row whose id the input gave (sorted
    after them); an id the input gave that equals another row's is refused, naming both rows."""
    low = "a"
    given = next(f"g{i}" for i in range(100) if int(id_hashes([f"g{i}"])[0]) > int(id_hashes([low])[0]))
    listed = SortedRows(iter([{"sample_id": low, "has_id": False}, {"sample_id": low, "has_id": False},
                              {"sample_id": given, "has_id": True}]), where="manifest m.jsonl")
    assert [r for t in listed for r in t.column("sample_id").to_pylist()] == [low, given] and listed.duplicates == 1
    with pytest.raises(ValueError, match=r"^manifest m.jsonl: id 's' appears more than once \(rows 1 and 2\)$"):
        list(SortedRows(iter([{"sample_id": "s", "has_id": False}, {"sample_id": "s", "has_id": True}]),
                        where="manifest m.jsonl"))
