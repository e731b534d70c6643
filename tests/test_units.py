"""The caption job's work units and the model workers' part writer, without Ray: what the driver
plans from metadata alone, what a unit's worker skips on a rerun, and parts named so that a task
run twice writes its part once (pipelines.units, pipelines.sink.PartWriter)."""

from __future__ import annotations

import errno
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.shards import ShardColumns
from pipelines.sink import (WRITE_STATS, PartWriter, part_files, part_name, parts_by_unit, read_output,
                            remove_stale_temporaries, to_table)
from pipelines.sources import scan
from pipelines.units import UnitTally, expand_units, plan_shards, unit_rows
from tests.media_fixtures import png_bytes, write_hf_shards, write_tar

COLUMNS = ShardColumns(prompt="question", reference="answer")


def _specs(plan) -> list[dict]:
    return [json.loads(u["spec"]) for u in plan.units]


def test_the_plan_of_a_parquet_dataset_is_one_unit_per_row_group_from_metadata(tmp_path):
    write_hf_shards(str(tmp_path), shards=2, rows=3, row_group_size=2)
    plan = plan_shards(str(tmp_path), "parquet", COLUMNS, {})
    specs = _specs(plan)
    assert [(s["rel"], s["group"], s["offset"], s["rows"]) for s in specs] == [
        ("train-00000-of-00002.parquet", 0, 0, 2), ("train-00000-of-00002.parquet", 1, 2, 1),
        ("train-00001-of-00002.parquet", 0, 0, 2), ("train-00001-of-00002.parquet", 1, 2, 1)]
    assert plan.rows_total == 6 and len({s["unit"] for s in specs}) == 4 and plan.units_with_parts == 0
    # the units' rows are exactly the scan's rows (same sample ids, prompts, references)
    rows = [r for s in specs for r in unit_rows(s, prompt=None, frames=4, columns=COLUMNS)[0]]
    scanned = scan(str(tmp_path), columns=COLUMNS).rows
    strip = lambda r: {k: v for k, v in r.items() if k != "unit"}  # noqa: E731
    assert sorted(map(strip, rows), key=lambda r: r["sample_id"]) == sorted(scanned, key=lambda r: r["sample_id"])
    assert {r["unit"] for r in rows} == {s["unit"] for s in specs}


def test_a_tar_shard_is_one_unit_whose_size_its_worker_learns(tmp_path):
    write_tar(str(tmp_path / "a.tar"), {"k0": {"png": png_bytes(0), "txt": b"zero"}, "k1": {"jpg": b"not an image"}})
    plan = plan_shards(str(tmp_path), "webdataset", ShardColumns(), {})
    assert len(plan.units) == 1 and plan.rows_total is None and plan.unknown_units == 1 and plan.any_video
    rows, found = unit_rows(_specs(plan)[0], prompt=None, frames=4, columns=ShardColumns())
    assert found == {"rows": 2, "before": 0, "retried": 0, "duplicates": 0}
    assert sorted(r["source"] for r in rows) == ["a.tar:k0.png", "a.tar:k1.jpg"]


def test_a_finished_tar_is_left_out_of_a_rerun_by_what_its_worker_recorded(tmp_path):
    """A tar's size is unknown until read: its worker records its rows and id digest in
    ``_units/``, so a rerun's plan leaves the finished tar out; a tar replaced under the same name,
    or one whose parts miss a row, goes to its worker again."""
    shard = str(tmp_path / "in" / "a.tar")
    os.makedirs(os.path.dirname(shard))
    write_tar(shard, {"k0": {"png": png_bytes(0)}, "k1": {"png": png_bytes(1)}, "k2": {"jpg": b"not an image"}})
    out = str(tmp_path / "out")
    plan = plan_shards(os.path.dirname(shard), "webdataset", ShardColumns(), {}, out)
    (spec,) = _specs(plan)
    rows, _ = unit_rows(spec, prompt=None, frames=4, columns=ShardColumns())
    assert json.loads(open(spec["marker"]).read())["rows"] == 3 and spec["marker"].startswith(os.path.join(out, "_units"))
    writer = PartWriter(_Echo, out, "r1")
    writer(pa.Table.from_pylist([{**r, "unit": spec["unit"]} for r in rows[:2]]))
    replan = lambda: plan_shards(os.path.dirname(shard), "webdataset", ShardColumns(), parts_by_unit(out), out)  # noqa: E731
    plan = replan()
    assert len(plan.units) == 1 and plan.rows_total == 3 and plan.unknown_units == 0  # a row missing: to its worker
    writer(pa.Table.from_pylist([{**rows[2], "unit": spec["unit"]}]))
    plan = replan()
    assert plan.units == [] and plan.units_done == 1 and plan.rows_before == plan.rows_total == 3
    write_tar(shard, {"k0": {"png": png_bytes(0)}, "k1": {"png": png_bytes(1)}, "k3": {"png": png_bytes(3)}, "k4": {"png": png_bytes(4)}})
    plan = replan()  # another tar under the same name: its size differs from the record
    assert len(plan.units) == 1 and plan.rows_total is None
    from pipelines.shards import _open_tar

    _open_tar.cache_clear()  # this process read the old tar (a worker keeps a few open)
    again, found = unit_rows(_specs(plan)[0], prompt=None, frames=4, columns=ShardColumns())
    assert sorted(r["source"] for r in again) == ["a.tar:k3.png", "a.tar:k4.png"] and found["before"] == 2


def test_each_tar_is_known_by_its_own_record_and_a_first_plan_reads_none(tmp_path, monkeypatch):
    """Each tar's worker records its size in ``<output>/_units/<unit>.json`` (docs/pipeline.md), so
    a rerun leaves out every finished tar, each by its own record; until then the plan counts the
    tars of unknown size. A first run's plan (no parts yet) reads no record: on an object store
    that would be one request per tar before any work starts."""
    from pipelines import units

    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    write_tar(str(inp / "a.tar"), {"k0": {"png": png_bytes(0)}, "k1": {"png": png_bytes(1)}})
    write_tar(str(inp / "b.tar"), {"k2": {"png": png_bytes(2)}, "k3": {"png": png_bytes(3)}, "k4": {"png": png_bytes(4)}})
    reads, read_marker = [], units.read_marker
    monkeypatch.setattr(units, "read_marker", lambda unit: reads.append(unit["rel"]) or read_marker(unit))
    replan = lambda: plan_shards(str(inp), "webdataset", ShardColumns(), parts_by_unit(out), out)  # noqa: E731
    plan = replan()
    assert (len(plan.units), plan.unknown_units, plan.rows_total, reads) == (2, 2, None, [])
    writer = PartWriter(_Echo, out, "r1")
    for spec in _specs(plan):
        rows, _ = unit_rows(spec, prompt=None, frames=4, columns=ShardColumns())
        writer(pa.Table.from_pylist([{**r, "unit": spec["unit"]} for r in rows]))
    assert sorted(os.listdir(os.path.join(out, "_units"))) == sorted(s["unit"] + ".json" for s in _specs(plan))
    plan = replan()
    assert (plan.units, plan.units_done, plan.rows_before, plan.rows_total, plan.unknown_units) == ([], 2, 5, 5, 0)
    assert sorted(reads) == ["a.tar", "b.tar"]


def test_a_tar_replaced_by_one_of_as_many_samples_is_done_by_its_ids_not_its_count(tmp_path):
    """A finished tar replaced by another with as many samples, whose worker recorded the new tar
    and stopped before writing: the parts hold as many rows as the record says, but the old
    tar's. Done-ness is read by id (the record's digest), so the new sample still goes to a worker."""
    from pipelines.shards import _open_tar

    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    shard = str(inp / "a.tar")
    write_tar(shard, {"k0": {"png": png_bytes(0)}, "k1": {"png": png_bytes(1)}, "k2": {"png": png_bytes(2)}})
    replan = lambda: plan_shards(str(inp), "webdataset", ShardColumns(), parts_by_unit(out), out)  # noqa: E731
    (spec,) = _specs(replan())
    rows, _ = unit_rows(spec, prompt=None, frames=4, columns=ShardColumns())
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist([{**r, "unit": spec["unit"]} for r in rows]))
    assert replan().units == []
    before = os.stat(shard).st_mtime_ns
    write_tar(shard, {"k0": {"png": png_bytes(0)}, "k1": {"png": png_bytes(1)}, "k3": {"png": png_bytes(3)}})
    os.utime(shard, ns=(before + 10**9, before + 10**9))  # a later time, whatever the clock's grain
    _open_tar.cache_clear()  # this process read the old tar
    (spec,) = _specs(replan())
    again, found = unit_rows(spec, prompt=None, frames=4, columns=ShardColumns())  # records the new tar; writes nothing
    assert [r["source"] for r in again] == ["a.tar:k3.png"] and found["before"] == 2
    plan = replan()
    assert len(plan.units) == 1 and (plan.rows_total, plan.units_done, plan.rows_before) == (3, 0, 0)


def test_expand_yields_the_scans_rows_with_the_prompt_and_frames_given_in_blocks_of_one_schema(tmp_path):
    """What the expand tasks hand the decode stage: each unit's rows as the scan makes them (the
    job's prompt where a row has none, its frame count for a video: both go into the sample id),
    each tagged with its unit, without the pixel columns the decode stage adds, in blocks of one
    schema whatever their rows hold (a block whose rows have no reference still has a string
    column), which Ray puts together into the decode stage's batches."""
    write_tar(str(tmp_path / "a.tar"), {"k0": {"png": png_bytes(0), "txt": b"zero"}, "k1": {"jpg": png_bytes(1)},
                                        "k2": {"mp4": b"a video (not decoded here)"}})
    plan = plan_shards(str(tmp_path), "webdataset", ShardColumns(), {})
    blocks = list(expand_units(pa.Table.from_pylist(plan.units), prompt="Say what you see.", frames=3,
                               columns=ShardColumns(), block_rows=1))
    scanned = scan(str(tmp_path), input_format="webdataset", prompt="Say what you see.", frames=3).rows
    assert [b.num_rows for b in blocks] == [1, 1, 1] and [r["frames"] for r in scanned] == [None, None, 3]
    table = pa.concat_tables(blocks)  # as Ray batches them: fails on blocks of different schemas
    assert table.column_names == [*scanned[0], "unit"]
    assert table.to_pylist() == [{**r, "unit": _specs(plan)[0]["unit"]} for r in scanned]


def test_an_id_a_tar_repeats_is_kept_once_and_counted(tmp_path):
    """Samples whose json gives the same id are one row (the first), the others counted as
    duplicates (the job's summary reports them), and the samples after them are still read."""
    same = json.dumps({"id": "same"}).encode()
    write_tar(str(tmp_path / "a.tar"), {"k0": {"png": png_bytes(0)}, "k1": {"png": png_bytes(1), "json": same},
                                        "k2": {"png": png_bytes(2), "json": same},
                                        "k3": {"png": png_bytes(3), "json": same}, "k4": {"png": png_bytes(4)}})
    (spec,) = _specs(plan_shards(str(tmp_path), "webdataset", ShardColumns(), {}))
    rows, found = unit_rows(spec, prompt=None, frames=4, columns=ShardColumns())
    assert found == {"rows": 3, "before": 0, "retried": 0, "duplicates": 2}
    assert sorted((r["source"], r["sample_id"] == "same") for r in rows) == [
        ("a.tar:k0.png", False), ("a.tar:k1.png", True), ("a.tar:k4.png", False)]


def test_a_listing_units_rows_come_in_the_scans_order_a_row_of_no_media_type_included(tmp_path):
    """A manifest may name a file that is neither an image nor a video (an error row): its unit's
    rows are the scan's, in the scan's order (equal media types together, those rows last)."""
    from pipelines.listing import plan_listing
    from pipelines.sources import EntryStream
    from tests.media_fixtures import write_manifest

    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes(0))
    (tmp_path / "notes.txt").write_text("not media")
    manifest = write_manifest(str(tmp_path / "m.jsonl"), [{"path": p} for p in ("notes.txt", "b.png", "v.mp4", "a.png")])
    plan = plan_listing(EntryStream(manifest), prompt=None, frames=4, output=str(tmp_path / "out"), run_id="r",
                        batch_size=64, parts={})
    (spec,) = _specs(plan)
    rows, _ = unit_rows(spec, prompt=None, frames=4, columns=None)
    scanned = scan(manifest, frames=4).rows
    assert [r["media_type"] for r in scanned] == ["image", "image", "video", None]
    assert [{k: v for k, v in r.items() if k != "unit"} for r in rows] == scanned


def test_the_plan_reads_the_image_column_it_is_told_and_says_whether_a_unit_to_do_holds_videos(tmp_path):
    """A Parquet dataset's image column may have another name (--image-column); the plan says
    whether any unit to do may hold videos (the CPU stage reserves memory for a video's frames
    then): not for images only, yes when one shard holds videos, wherever it comes."""
    def shard(path, column, seeds):
        pq.write_table(pa.table({column: pa.array([{"bytes": png_bytes(i), "path": f"{i}.png"} for i in seeds])}), path)

    images, mixed = tmp_path / "images", tmp_path / "mixed"
    images.mkdir(), mixed.mkdir()
    shard(images / "a.parquet", "img", [0, 1])
    plan = plan_shards(str(images), "parquet", ShardColumns(image="img"), {})
    assert (len(plan.units), plan.rows_total, plan.any_video) == (1, 2, False)
    shard(mixed / "a.parquet", "video", [0])  # sorted first: its unit is planned before the image shard's
    shard(mixed / "b.parquet", "image", [1])
    plan = plan_shards(str(mixed), "parquet", ShardColumns(), {})
    assert [s["media"] for s in _specs(plan)] == ["video", "image"] and plan.any_video


def test_a_rerun_unit_skips_its_committed_rows_and_retries_its_transient_ones(tmp_path):
    """A unit's worker reads only that unit's parts: committed ids are skipped, transient error
    rows are dropped from the part (so the retried row never meets its old one) and done again."""
    data = tmp_path / "ds"
    write_hf_shards(str(data), shards=1, rows=3, row_group_size=3)
    out = str(tmp_path / "out")
    spec = _specs(plan_shards(str(data), "parquet", COLUMNS, {}))[0]
    rows, _ = unit_rows(spec, prompt=None, frames=4, columns=COLUMNS)
    done = [{**rows[0], "output": "x", "error_kind": None}, {**rows[1], "output": None, "error": "device", "error_kind": "transient"}]
    writer = PartWriter(_Echo, out, "r1")
    writer(pa.Table.from_pylist([{**r, "unit": spec["unit"]} for r in done]))
    plan = plan_shards(str(data), "parquet", COLUMNS, parts_by_unit(out))
    assert plan.units_with_parts == 1
    again, found = unit_rows(_specs(plan)[0], prompt=None, frames=4, columns=COLUMNS)
    assert found == {"rows": 3, "before": 1, "retried": 1, "duplicates": 0}
    assert {r["sample_id"] for r in again} == {rows[1]["sample_id"], rows[2]["sample_id"]}
    assert read_output(out).column("sample_id").to_pylist() == [rows[0]["sample_id"]]  # the transient row is gone


def test_a_unit_whose_parts_hold_all_its_rows_is_done_from_their_footers(tmp_path):
    """A rerun's plan leaves out a unit whose parts' footers hold all its rows with no transient
    error; a unit with a transient row, a missing row, or a part whose footer lacks the
    transient count (an older version's part) goes to its worker."""
    data = tmp_path / "ds"
    write_hf_shards(str(data), shards=1, rows=5, row_group_size=2)  # units of 2, 2 and 1 rows
    specs = _specs(plan_shards(str(data), "parquet", COLUMNS, {}))
    unit_rows_ = [unit_rows(s, prompt=None, frames=4, columns=COLUMNS)[0] for s in specs]
    out = str(tmp_path / "out")
    writer = PartWriter(_Echo, out, "r1")
    for spec, rows, cut in zip(specs, unit_rows_, ([0], [0, 1], [0])):
        writer(pa.Table.from_pylist([{**rows[i], "unit": spec["unit"]} for i in cut]))  # one part per call
    plan = plan_shards(str(data), "parquet", COLUMNS, parts_by_unit(out))
    assert [s["unit"] for s in _specs(plan)] == [specs[0]["unit"]] and plan.rows_before == 3  # unit 0: 1 row of 2
    assert (plan.units_with_parts, plan.units_done) == (3, 2)  # the plan line: 3 - 2 = 1 unit partly done
    writer(pa.Table.from_pylist([{**unit_rows_[0][1], "unit": specs[0]["unit"]}]))  # unit 0 complete over two parts
    plan = plan_shards(str(data), "parquet", COLUMNS, parts_by_unit(out))
    assert plan.units_done == 3 and plan.units == [] and plan.rows_before == 5 and plan.rows_total == 5

    unit1 = parts_by_unit(out)[specs[1]["unit"]][0]
    table = pq.read_table(unit1)
    pq.write_table(table.replace_schema_metadata(None), unit1)  # the footer of a part written before the count
    plan = plan_shards(str(data), "parquet", COLUMNS, parts_by_unit(out))
    assert [s["unit"] for s in _specs(plan)] == [specs[1]["unit"]] and plan.rows_before == 3
    PartWriter(_Echo, out, "r2")(pa.Table.from_pylist([{**unit_rows_[2][0], "error": "device", "error_kind": "transient", "output": None,
                                  "unit": specs[2]["unit"]}]))  # the same row, now a transient error (its part, same name)
    plan = plan_shards(str(data), "parquet", COLUMNS, parts_by_unit(out))
    assert {s["unit"] for s in _specs(plan)} == {specs[1]["unit"], specs[2]["unit"]} and plan.rows_before == 2


def test_expand_yields_blocks_of_at_most_block_rows_and_reports_each_unit_once(tmp_path):
    write_hf_shards(str(tmp_path), shards=1, rows=5, row_group_size=5)
    plan = plan_shards(str(tmp_path), "parquet", COLUMNS, {})
    reports = []

    class Tally:  # what the Ray actor handle offers: report.remote(...)
        class report:  # noqa: N801
            @staticmethod
            def remote(*args):
                reports.append(args)

    blocks = list(expand_units(pa.Table.from_pylist(plan.units), prompt=None, frames=4, columns=COLUMNS,
                               block_rows=2, tally=Tally))
    assert [b.num_rows for b in blocks] == [2, 2, 1]
    assert reports == [(_specs(plan)[0]["unit"], 5, 0, 0, 0)]
    tally = UnitTally()
    tally.report("u1", 5, 1, 0, 0)
    tally.report("u1", 5, 1, 0, 0)  # a task Ray ran again: counted once
    tally.report("u2", 3, 0, 1, 2)
    assert tally.totals() == {"units": 2, "rows": 8, "before": 1, "retried": 1, "duplicates": 2}


class _Echo:
    """A stand-in model stage: each row back as an output row, with its error if it has one."""

    def __init__(self, *, run_id: str, **_):
        self.run_id = run_id

    def __call__(self, batch):
        rows = batch.to_pylist()
        return to_table([{**{k: r.get(k) for k in ("sample_id", "source", "error", "error_kind", "output")},
                          "run_id": self.run_id, "output": r.get("output", "caption")} for r in rows])


def test_the_part_writer_writes_one_part_per_unit_named_by_its_rows_so_a_rerun_task_overwrites_it(tmp_path):
    out = str(tmp_path)
    batch = pa.Table.from_pylist([{"sample_id": s, "source": s, "unit": u} for s, u in
                                  (("a", "u1"), ("b", "u2"), ("c", "u1"), ("d", None))])
    stats = PartWriter(_Echo, out, "r1")(batch)
    assert stats.schema == WRITE_STATS and stats.num_rows == 1
    figures = stats.to_pylist()[0]
    assert {k: figures[k] for k in ("rows", "errors", "transient", "duplicates", "write_errno", "write_error")} == {
        "rows": 4, "errors": 0, "transient": 0, "duplicates": 0, "write_errno": None, "write_error": None}
    names = sorted(os.path.basename(p) for p in part_files(out))
    assert names == sorted([part_name("u1", ["a", "c"]), part_name("u2", ["b"]), part_name("rows", ["d"])])
    assert part_name("u1", ["c", "a"]) == part_name("u1", ["a", "c"]) != part_name("u1", ["a"])
    PartWriter(_Echo, out, "r1")(batch)  # the same batch again (Ray ran the task again, in a new actor)
    assert sorted(os.path.basename(p) for p in part_files(out)) == names
    assert sorted(read_output(out).column("sample_id").to_pylist()) == ["a", "b", "c", "d"]
    assert {u: len(p) for u, p in parts_by_unit(out).items()} == {"u1": 1, "u2": 1, "rows": 1}
    PartWriter(_Echo, out, "r1")(pa.Table.from_pylist([{"sample_id": "e", "source": "e"}]))  # a batch without a unit column
    assert part_name("rows", ["e"]) in {os.path.basename(p) for p in part_files(out)}


def test_the_part_writer_builds_its_stage_with_the_run_id_and_options_it_is_given(tmp_path):
    """The model stage is built once per actor with the job's run id (every output row carries
    it) and the options the driver passes on (pipelines.caption: the model, its pruning, ...)."""
    built = []

    class Stage(_Echo):
        def __init__(self, *, run_id, **options):
            super().__init__(run_id=run_id)
            built.append(options)

    PartWriter(Stage, str(tmp_path), "r1", model="m", batch_size=2)(pa.Table.from_pylist([{"sample_id": "a", "unit": "u1"}]))
    assert built == [{"model": "m", "batch_size": 2}]
    assert read_output(str(tmp_path)).column("run_id").to_pylist() == ["r1"]


def test_the_part_writers_figures_are_those_of_the_rows_it_committed(tmp_path):
    """The metric and call state a call returns is output_metrics' of the rows it wrote (the
    oracle), and rows it dropped as already written add nothing."""
    from pipelines.tracking import MetricTally, output_metrics

    writer = PartWriter(_Echo, str(tmp_path), "r1")
    batch = pa.Table.from_pylist([{"sample_id": "a", "unit": "u1", "error": None}, {"sample_id": "b", "unit": "u1", "error": "bad: /b"}])
    first, again = writer(batch).to_pylist()[0], writer(batch).to_pylist()[0]
    assert MetricTally().merge(first).metrics() == output_metrics(read_output(str(tmp_path)))
    assert (first["metric_rows"], first["metric_errors"]) == (2, 1)
    assert (again["rows"], again["duplicates"], again["metric_rows"]) == (0, 2, 0)


def test_actor_calls_take_flush_rows_rows_else_four_batches():
    from pipelines.caption import PACK_WINDOW, CaptionConfig, _actor_rows

    cfg = lambda **kw: CaptionConfig(model="m", input="i", output="o", batch_size=8, **kw)  # noqa: E731
    assert (_actor_rows(cfg()), _actor_rows(cfg(flush_rows=100)), _actor_rows(cfg(flush_rows=2))) == (8 * PACK_WINDOW, 100, 8)


def test_a_part_the_writer_cannot_write_is_reported_to_the_driver_not_raised(tmp_path, monkeypatch):
    def full(table, where, *a, **kw):
        open(where, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipelines.sink.pq.write_table", full)
    stats = PartWriter(_Echo, str(tmp_path), "r1")(pa.Table.from_pylist([{"sample_id": "a", "unit": "u1"}])).to_pylist()[0]
    assert (stats["rows"], stats["write_errno"], stats["write_error"]) == (0, errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []  # no part, no temporary

    def gone(table, where, *a, **kw):  # an OSError with no errno nor strerror: its message is what the user sees
        raise OSError("the volume was unmounted")

    monkeypatch.setattr("pipelines.sink.pq.write_table", gone)
    stats = PartWriter(_Echo, str(tmp_path), "r1")(pa.Table.from_pylist([{"sample_id": "a", "unit": "u1"}])).to_pylist()[0]
    assert (stats["write_errno"], stats["write_error"]) == (None, "the volume was unmounted")


def test_stale_temporaries_are_removed_before_any_worker_writes(tmp_path):
    (tmp_path / ".part-u1-x.parquet.tmp").write_bytes(b"PAR1")
    pq.write_table(to_table([{"sample_id": "a"}]), tmp_path / part_name("u1", ["a"]))
    assert remove_stale_temporaries(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == [part_name("u1", ["a"])]
    assert remove_stale_temporaries(str(tmp_path / "missing")) == 0


def test_a_folder_without_shards_is_refused_as_a_shard_input(tmp_path):
    with pytest.raises(ValueError, match="holds no parquet shards"):
        plan_shards(str(tmp_path), "parquet", COLUMNS, {})
