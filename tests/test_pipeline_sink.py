"""pipelines.sink and the job config: the output contract, atomic parts, exactly-once, YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sink import (OUTPUT_SCHEMA, ParquetSink, check_job, done_ids, part_files, part_name, read_output,
                            remove_stale_temporaries, to_table)

DESIGN_COLUMNS = (
    "sample_id, source, media_type, frames, prompt, output, reference, model, method, budget, "
    "keep_ratio, prune_layer, visual_tokens, visual_tokens_kept, prefill_flops, flops_reduction, "
    "latency_ms, error, run_id"
).split(", ")


def test_schema_is_the_design_contract():
    assert OUTPUT_SCHEMA.names[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS  # extra tracking columns follow
    table = to_table([{"sample_id": "a", "output": "x", "unrelated": 1}])
    assert table.schema == OUTPUT_SCHEMA and table.column("error").to_pylist() == [None]


def test_sink_writes_each_id_once_and_atomically(tmp_path):
    out = str(tmp_path / "out")
    sink = ParquetSink(out, "r1")
    first = sink.write(to_table([{"sample_id": i} for i in "abc"]))
    assert os.path.basename(first) == part_name("rows", list("abc"))  # named by its unit and rows, not by the run
    assert sink.write(to_table([{"sample_id": i} for i in "cde"])) is not None
    assert sink.write(to_table([{"sample_id": "a"}])) is None
    assert sink.rows_written == 5 and sink.duplicates_dropped == 2
    assert done_ids(out) == set("abcde")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # a crashed writer's temporary file is ignored, and removed before the next run writes
    (tmp_path / "out" / ".part-dead-000000.parquet.tmp").write_bytes(b"partial")
    assert done_ids(out) == set("abcde") and remove_stale_temporaries(out) == 1
    assert not os.path.exists(tmp_path / "out" / ".part-dead-000000.parquet.tmp")
    sink2 = ParquetSink(out, "r2")
    assert sink2.write(to_table([{"sample_id": "e", "error": "x"}, {"sample_id": "f", "error": "bad: /p"}]))
    assert sink2.rows_written == 1 and sink2.errors_written == 1
    assert sorted(read_output(out).column("sample_id").to_pylist()) == list("abcdef")


def test_read_output_dedupes_defensively(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(to_table([{"sample_id": "a", "output": "first"}]), out / "part-x-000000.parquet")
    pq.write_table(to_table([{"sample_id": "a", "output": "second"}]), out / "part-y-000000.parquet")
    table = read_output(str(out))
    assert table.num_rows == 1 and table.column("output").to_pylist() == ["first"]


def test_output_dir_of_another_job_is_refused(tmp_path):
    out = str(tmp_path / "out")
    check_job(out, {"method": "none"})
    check_job(out, {"method": "random"})  # no rows yet: the new job takes the directory
    ParquetSink(out, "r").write(to_table([{"sample_id": "a"}]))
    check_job(out, {"method": "random"})
    with pytest.raises(ValueError, match="holds rows of a different job"):
        check_job(out, {"method": "entropyprune"})


def test_yaml_config_mirrors_flags_and_rejects_unknown_keys(tmp_path):
    import argparse

    from jobs.caption import add_arguments, config_from_args, load_yaml_config

    good = tmp_path / "good.yaml"
    good.write_text("model: m\ninput: in\noutput: out\nkeep-ratio: 0.25\nmethod: random\nbatch_size: 4\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(good), "--batch-size", "2"]))
    assert (cfg.model, cfg.prune.keep_ratio, cfg.prune.method, cfg.batch_size) == ("m", 0.25, "random", 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nbatchsize: 4\n")
    with pytest.raises(ValueError, match="unknown key 'batchsize'"):
        load_yaml_config(str(bad))
    typed = tmp_path / "typed.yaml"
    typed.write_text("frames: eight\n")
    with pytest.raises(ValueError, match="frames .* must be int"):
        load_yaml_config(str(typed))
    with pytest.raises(ValueError, match="missing required setting"):
        config_from_args(parser.parse_args(["--model", "m"]))


def test_shipped_yaml_configs_are_valid():
    import glob

    from jobs.caption import load_yaml_config

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "configs")
    files = glob.glob(os.path.join(root, "caption*.yaml"))
    assert files
    for path in files:
        load_yaml_config(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from jobs.caption import main

    (tmp_path / "in").mkdir()
    assert main(["--model", str(tmp_path / "nomodel"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("caption: error: cannot load model") and "\n" not in err
    assert main(["--model", "m", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["--model", "m", "--input", str(tmp_path / "in"), "--output", "o", "--method", "random"]) == 2
    assert "needs a budget" in capsys.readouterr().err


def test_a_write_that_dies_halfway_leaves_no_visible_part_and_a_clean_rerun(tmp_path, monkeypatch):
    """A crash while a part is written: readers never see a half file, the rerun writes it whole."""
    import pipelines.sink as sink_module

    rows = [{"sample_id": f"s{i}", "output": f"o{i}"} for i in range(4)]
    real_write = pq.write_table

    def dies_halfway(table, where, **kwargs):
        real_write(table, where, **kwargs)
        with open(where, "r+b") as fh:
            fh.truncate(os.path.getsize(where) // 2)
        raise OSError("disk went away")

    monkeypatch.setattr(sink_module.pq, "write_table", dies_halfway)
    with pytest.raises(OSError, match="disk went away"):
        ParquetSink(str(tmp_path), "r1").write(to_table(rows))
    monkeypatch.setattr(sink_module.pq, "write_table", real_write)

    assert part_files(str(tmp_path)) == [] and len(read_output(str(tmp_path))) == 0
    ParquetSink(str(tmp_path), "r2").write(to_table(rows))  # the rerun
    assert sorted(read_output(str(tmp_path)).column("sample_id").to_pylist()) == ["s0", "s1", "s2", "s3"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # the stale temporary is gone


def test_first_token_logprobs_are_the_prefills_not_a_later_steps(tmp_path):
    """The stored top-k is the first generated token's distribution: its argmax is the first
    token generated, and its values equal a direct prefill forward's log-softmax."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.infer import CaptionPredictor
    from pipelines.media import decode_row
    from tests.media_fixtures import save_tiny_llava

    model_dir = save_tiny_llava(str(tmp_path / "m"))
    path = str(tmp_path / "x.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
    row = decode_row({"sample_id": "x", "source": path, "path": path, "media_type": "image", "frames": 1,
                      "prompt": "describe this image"})
    predictor = CaptionPredictor(model=model_dir, max_new_tokens=4, device="cpu")
    out = predictor.predict_rows([row])[0]
    enc = predictor._encode(row)
    with torch.inference_mode():
        logits = predictor.model(**enc).logits[0, -1].float()
        logits[predictor.model.generation_config.suppress_tokens] = float("-inf")  # as generate does
        logprobs = torch.log_softmax(logits, dim=-1)
        first = predictor.model.generate(**enc, max_new_tokens=1, do_sample=False)[0, -1]
    top = logprobs.topk(len(out["first_token_ids"]))
    assert out["first_token_ids"][0] == int(first) == int(top.indices[0])
    np.testing.assert_allclose(out["first_token_logprobs"], top.values.numpy(), atol=1e-5)
    # near-equal logits of a random model may swap places: each stored id has its own logprob
    np.testing.assert_allclose(out["first_token_logprobs"], logprobs[out["first_token_ids"]].numpy(), atol=1e-5)


def test_a_row_that_breaks_generate_costs_that_row_only(tmp_path):
    """A batch whose ``generate`` raises is retried row by row: the poisoned row gets an error,
    the others their outputs (the fault is injected by wrapping the model's ``generate``)."""
    import numpy as np
    from PIL import Image

    from pipelines.infer import CaptionPredictor
    from pipelines.media import decode_row
    from tests.media_fixtures import save_tiny_llava

    predictor = CaptionPredictor(model=save_tiny_llava(str(tmp_path / "m")), max_new_tokens=2, device="cpu")
    poison = predictor.processor.tokenizer.convert_tokens_to_ids("many")
    real_generate = predictor.model.generate

    def generate(**inputs):
        if (inputs["input_ids"] == poison).any():
            raise RuntimeError("this row breaks the kernel")
        return real_generate(**inputs)

    predictor.model.generate = generate
    rows = []
    for i, prompt in enumerate(["describe this image", "how many", "what color"]):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        rows.append(decode_row({"sample_id": str(i), "source": path, "path": path, "media_type": "image",
                                "frames": 1, "prompt": prompt}))
    out = predictor.predict_rows(rows)
    assert [r.get("output") is not None for r in out] == [True, False, True]
    assert "this row breaks the kernel" in out[1]["error"] and out[1]["error"].endswith("1.png")
    assert out[0]["error"] is None and out[2]["error"] is None


def test_one_writer_per_output_directory(tmp_path, monkeypatch):
    """A second job into a directory another live job writes is refused with one line naming
    the owner; a lock left by a job that is gone (same host, no such process) is taken over;
    nested blocks of one process share the lock; any Parquet reader skips the lock file."""
    import socket
    import subprocess
    import sys

    from pipelines.sink import LOCK_FILE, output_lock

    out = str(tmp_path / "out")
    # SIGHUP reset to its default (a run under nohup would inherit it ignored): any signal but 0 ends it
    other = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); time.sleep(60)"])
    try:
        os.makedirs(out)
        with open(os.path.join(out, LOCK_FILE), "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": other.pid, "since": "now"}, fh)
        with pytest.raises(ValueError, match=f"is in use by another job \\(host .*, pid {other.pid}, since now\\)"):
            with output_lock(out):
                pass
    finally:
        other.kill()
        other.wait()
    with output_lock(out):  # its owner is gone now: taken over
        with output_lock(out):  # nested
            pass
        assert json.load(open(os.path.join(out, LOCK_FILE)))["pid"] == os.getpid()
        ParquetSink(out, "r").write(to_table([{"sample_id": "a"}]))
        assert pq.read_table(out).num_rows == 1  # _lock.json and _job.json are not read as data
    assert not os.path.exists(os.path.join(out, LOCK_FILE))


def test_a_changed_prompt_or_frame_count_is_a_different_job(tmp_path):
    from ep_core.config import PruneConfig
    from pipelines.caption import CaptionConfig

    base = dict(model="demo", input=str(tmp_path), output=str(tmp_path / "out"), prune=PruneConfig("none"))
    out = base["output"]
    check_job(out, CaptionConfig(**base, prompt="Describe.", frames=4).job_identity())
    ParquetSink(out, "r").write(to_table([{"sample_id": "a"}]))
    with pytest.raises(ValueError, match="prompt: 'Describe.' -> 'What color\\?'"):
        check_job(out, CaptionConfig(**base, prompt="What color?", frames=4).job_identity())
    with pytest.raises(ValueError, match="frames: 4 -> 8"):
        check_job(out, CaptionConfig(**base, prompt="Describe.", frames=8).job_identity())


# ---------------------------------------------------------------------------- mutation-testing oracles
def _part(out, name, rows, drop_error_kind=False):
    table = to_table(rows)
    if drop_error_kind:  # a part written before error kinds existed
        table = table.drop_columns(["error_kind"])
    pq.write_table(table, os.path.join(out, name))


def test_drop_transient_by_hand_over_clean_mixed_all_transient_and_old_parts(tmp_path):
    """Four parts, by hand: a clean one (untouched, even though its ok rows have a null kind),
    a mixed one (rewritten without its transient row, its ok row kept), an all-transient one
    (deleted) and an old one without the error_kind column (read as done). 1 + 2 = 3 dropped."""
    from pipelines.sink import drop_transient

    out = str(tmp_path)
    ok = lambda sid: {"sample_id": sid, "output": "x"}  # noqa: E731
    err = lambda sid, kind: {"sample_id": sid, "error": f"{kind}: /{sid}", "error_kind": kind}  # noqa: E731
    _part(out, "part-r-000000.parquet", [ok("a"), err("b", "input")])
    _part(out, "part-r-000001.parquet", [err("c", "transient"), ok("d")])
    _part(out, "part-r-000002.parquet", [err("e", "transient"), err("f", "transient")])
    _part(out, "part-s-000000.parquet", [ok("g"), {"sample_id": "h", "error": "decode: /h"}], drop_error_kind=True)
    clean_before = open(os.path.join(out, "part-r-000000.parquet"), "rb").read()
    assert drop_transient(part_files(out)) == 3
    assert sorted(os.listdir(out)) == ["part-r-000000.parquet", "part-r-000001.parquet", "part-s-000000.parquet"]
    assert open(os.path.join(out, "part-r-000000.parquet"), "rb").read() == clean_before  # not rewritten
    assert pq.read_table(os.path.join(out, "part-r-000001.parquet")).column("sample_id").to_pylist() == ["d"]
    assert done_ids(out) == {"a", "b", "d", "g", "h"}
    assert drop_transient(part_files(out)) == 0


def test_a_part_gone_since_it_was_listed_does_not_hide_the_parts_after_it(tmp_path):
    """A unit's parts are listed before they are read, and one may be gone by then (it held
    transient rows only and was deleted): the rerun reads past it, so it still drops the
    transient rows and skips the committed ids of the parts listed after it."""
    from pipelines.sink import committed

    out = str(tmp_path)
    ok = lambda sid: {"sample_id": sid, "output": "x"}  # noqa: E731
    err = lambda sid: {"sample_id": sid, "error": f"device: /{sid}", "error_kind": "transient"}  # noqa: E731
    _part(out, "part-u-1.parquet", [err("a")])  # transient only: deleted by the rerun's first step
    _part(out, "part-u-2.parquet", [ok("b"), err("c")])
    _part(out, "part-u-3.parquet", [ok("d")])
    gone = os.path.join(out, "part-u-0.parquet")  # listed, then deleted before it was read
    assert committed([gone, *part_files(out)]) == ({"b", "d"}, 2)
    assert sorted(read_output(out).column("sample_id").to_pylist()) == ["b", "d"]


def test_a_parts_rows_by_prefix_come_from_its_footer_else_from_its_ids(tmp_path, monkeypatch):
    """pipelines.sink.part_prefixes, which a listing rerun's driver asks of every part: a part
    written now answers from its footer alone (no column read); a part written before footers
    held the counts, even one from before error kinds, gives what its ids and kinds make."""
    import pipelines.sink as sink_module
    from pipelines.listing import prefix_counts
    from pipelines.sink import part_prefixes

    out = str(tmp_path)
    rows = [{"sample_id": "a", "output": "x"}, {"sample_id": "b", "error": "device: /b", "error_kind": "transient"}]
    path = ParquetSink(out, "r").write(to_table(rows))
    expected = prefix_counts(["a", "b"], [False, True])
    old, older = os.path.join(out, "part-o-1.parquet"), os.path.join(out, "part-o-2.parquet")
    table = pq.read_table(path).replace_schema_metadata(None)
    pq.write_table(table, old)  # before the footers kept the counts
    pq.write_table(table.drop_columns(["error_kind"]), older)  # and before error kinds
    assert part_prefixes(old) == expected and part_prefixes(older) == prefix_counts(["a", "b"], [False, False])

    def no_read(*a, **kw):
        raise AssertionError("a column read")

    monkeypatch.setattr(sink_module, "_read_part", no_read)
    assert part_prefixes(path) == expected


def test_read_output_reads_parts_of_old_and_new_schemas_together(tmp_path):
    out = str(tmp_path)
    _part(out, "part-a-000000.parquet", [{"sample_id": "a", "output": "x", "error_kind": None}], drop_error_kind=True)
    _part(out, "part-b-000000.parquet", [{"sample_id": "b", "error": "e", "error_kind": "input"}])
    table = read_output(out)
    assert table.schema == OUTPUT_SCHEMA
    assert table.column("sample_id").to_pylist() == ["a", "b"] and table.column("error_kind").to_pylist() == [None, "input"]


def test_sink_names_parts_by_unit_and_rows_counts_rows_and_never_writes_a_duplicate(tmp_path):
    """part-<unit>-<sha1 of the sorted ids>.parquet; the counters by hand; a batch's duplicates
    are not in its part file (any Parquet reader sees each id once)."""
    out = str(tmp_path / "out")
    sink = ParquetSink(out, "r1")
    assert (sink.rows_written, sink.errors_written, sink.transient_written, sink.duplicates_dropped) == (0, 0, 0, 0)
    e = lambda sid, kind: {"sample_id": sid, "error": f"{kind}: /{sid}", "error_kind": kind}  # noqa: E731
    names = [os.path.basename(sink.write(to_table([{"sample_id": "a", "output": "x"}, e("b", "transient")]))),
             # a again (dropped), c twice in the batch (once kept), two more errors, one transient
             os.path.basename(sink.write(to_table([{"sample_id": "a"}, e("c", "input"), e("c", "input"),
                                                   e("d", "transient"), {"sample_id": "f", "output": "y"}]))),
             os.path.basename(sink.write(to_table([e("g", "input")]), unit="s0003"))]
    import hashlib

    h = lambda ids: hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]  # noqa: E731
    assert names == [f"part-rows-{h(['a', 'b'])}.parquet", f"part-rows-{h(['c', 'd', 'f'])}.parquet",
                     f"part-s0003-{h(['g'])}.parquet"]
    # the same rows of the same unit: the same name, whatever the order (a rerun task overwrites its part)
    assert part_name("rows", ["f", "c", "d"]) == names[1] and part_name("s0003", ["c", "d", "f"]) != names[1]
    # rows a b | c d f | g = 6; errors b | c d | g = 4; transient b | d = 2; dropped a, c = 2
    assert (sink.rows_written, sink.errors_written, sink.transient_written, sink.duplicates_dropped) == (6, 4, 2, 2)
    assert pq.read_table(os.path.join(out, names[1])).column("sample_id").to_pylist() == ["c", "d", "f"]
    assert sorted(pq.read_table(out).column("sample_id").to_pylist()) == list("abcdfg")


def test_sink_trusts_the_given_already_done_set(tmp_path):
    """``already_done`` replaces the directory scan: an id in it is dropped although no part holds it."""
    out = str(tmp_path / "out")
    sink = ParquetSink(out, "r", already_done={"x"})
    sink.write(to_table([{"sample_id": "x"}, {"sample_id": "y"}]))
    assert done_ids(out) == {"y"} and sink.duplicates_dropped == 1


def test_a_failed_write_goes_through_a_hidden_temporary_beside_the_part_and_removes_it(tmp_path, monkeypatch):
    """The temporary file is written beside the part (same directory: the rename is atomic), not
    in the working directory, and a write that fails removes it; a crash's leftover (a process
    killed mid-write cannot remove it) is removed before the next run writes."""
    import pipelines.sink as sink_module

    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    written = []

    def dies(table, where, **kwargs):
        written.append(where)
        with open(where, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk went away")

    monkeypatch.setattr(sink_module.pq, "write_table", dies)
    with pytest.raises(OSError):
        ParquetSink(str(out), "r1").write(to_table([{"sample_id": "a"}]))
    (where,) = written
    name = os.path.basename(where)
    assert os.path.dirname(where) == str(out) and name.startswith(f".{part_name('rows', ['a'])}.") and name.endswith(".tmp")
    assert os.listdir(out) == [] and os.listdir(cwd) == []
    (out / name).write_bytes(b"half")  # what a killed writer leaves
    monkeypatch.undo()
    assert remove_stale_temporaries(str(out)) == 1 and os.listdir(out) == []


def test_part_files_of_a_directory_whose_name_has_glob_characters(tmp_path):
    out = str(tmp_path / "run[1]*")
    sink = ParquetSink(out, "r")
    sink.write(to_table([{"sample_id": "a"}]))
    assert done_ids(out) == {"a"} and read_output(out).num_rows == 1


def test_check_job_records_the_job_in_the_output_dir_and_names_every_changed_key(tmp_path, monkeypatch):
    """_job.json lands in the output directory (not the working directory); a key only one of
    the two jobs has is a difference too; every difference is named, then what to do."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    check_job(out, {"method": "none"})
    assert json.load(open(os.path.join(out, "_job.json"))) == {"method": "none"} and not os.path.exists("_job.json")
    ParquetSink(out, "r").write(to_table([{"sample_id": "a"}]))
    with pytest.raises(ValueError) as refused:
        check_job(out, {"method": "random", "budget": 64})
    assert str(refused.value) == (
        f"output directory {out} holds rows of a different job (budget: None -> 64, method: 'none' -> 'random'); "
        "use another --output, or delete that directory to start over"
    )
    with pytest.raises(ValueError, match=r"\(seed: 1 -> None\)"):
        check_job(out, {"method": "none", "seed": 1} if False else {"method": "none"}) if False else None
        check_job(str(tmp_path / "out"), {"method": "none"})  # same job: accepted
        json.dump({"method": "none", "seed": 1}, open(os.path.join(out, "_job.json"), "w"))
        check_job(out, {"method": "none"})  # a key the old job had and the new one lacks


def test_lock_left_by_an_unreadable_owner_is_refused_and_a_live_owner_is_not_signalled(tmp_path):
    """A lock whose pid cannot be read (or whose file is not JSON) is assumed alive: refused, not
    taken over. Asking whether the owner lives sends it no signal (signal 0): it keeps running."""
    import socket
    import subprocess
    import sys

    from pipelines.sink import LOCK_FILE, output_lock

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILE
    for pid in ("not-a-pid", None):
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": "then"}))
        with pytest.raises(ValueError, match=f"pid {pid}, since then"):
            with output_lock(str(out)):
                pass
    lock.write_text("{not json")
    with pytest.raises(ValueError, match="unknown owner"):
        with output_lock(str(out)):
            pass
    # SIGHUP reset to its default (a run under nohup would inherit it ignored): any signal but 0 ends it
    other = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "since": "now"}))
        with pytest.raises(ValueError, match="in use by another job"):
            with output_lock(str(out)):
                pass
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=1)  # still alive
    finally:
        other.kill()
        other.wait()


# ---------------------------------------------------------------- on an object store (fsspec's memory://)
# The same code paths as S3 (pipelines.storage: any URI), without a server; tests/test_object_store.py
# runs them against a real S3-compatible one.


def test_sink_on_an_object_store_lists_only_its_own_parts_and_reads_them_back(memory_store):
    from pipelines import storage
    from pipelines.sink import part_files

    out = "memory://bucket/run"
    sink = ParquetSink(out, "r1")
    sink.write(to_table([{"sample_id": "a", "output": "x"}, {"sample_id": "b", "error": "gone", "error_kind": "transient"}]))
    for name, data in (("sub/part-r0-000000.parquet", b"nested"), ("other.parquet", b"not a part"),
                       ("part-notes.txt", b"not parquet"), ("_job.json", b"{}")):
        storage.write_atomic(f"{out}/{name}", data)
    assert [storage.basename(p) for p in part_files(out)] == [part_name("rows", ["a", "b"])]
    assert done_ids(out) == {"a", "b"}
    assert read_output(out).column("output").to_pylist() == ["x", None]
    assert (sink.rows_written, sink.errors_written, sink.transient_written) == (2, 1, 1)


def test_parts_of_old_and_new_schemas_on_an_object_store_are_read_as_on_a_disk(memory_store):
    """An object store's parts are read through their filesystem with the same arguments as local
    ones: a part from before error kinds reads as done next to a new one, by read_output and by a
    unit's rerun (pipelines.sink.committed); no temporary file exists there to remove."""
    from pipelines import storage
    from pipelines.sink import committed

    out = "memory://bucket/mixed"
    for name, rows, old in (("part-a-0.parquet", [{"sample_id": "a", "output": "x"}], True),
                            ("part-b-0.parquet", [{"sample_id": "b", "error": "e", "error_kind": "input"}], False)):
        table = to_table(rows).drop_columns(["error_kind"]) if old else to_table(rows)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        storage.write_atomic(f"{out}/{name}", buffer.getvalue())
    table = read_output(out)
    assert table.schema == OUTPUT_SCHEMA and table.column("error_kind").to_pylist() == [None, "input"]
    assert committed(part_files(out)) == ({"a", "b"}, 0) and remove_stale_temporaries(out) == 0


def test_lock_on_an_object_store_is_a_put_read_back(memory_store, monkeypatch):
    """Taken by a put; a second job is refused; a put that another job's put overwrote before
    the read-back is a lost race: refused, not taken."""
    import socket

    import pipelines.sink as sink_module
    from pipelines import storage
    from pipelines.sink import LOCK_FILE, output_lock

    out = "memory://bucket/locked"
    with output_lock(out):
        mine = json.loads(storage.read_bytes(f"{out}/{LOCK_FILE}"))
        assert (mine["host"], mine["pid"]) == (socket.gethostname(), os.getpid()) and mine["token"]
    assert not storage.exists(f"{out}/{LOCK_FILE}")
    other = {"host": "elsewhere", "pid": 1, "since": "then"}
    storage.write_atomic(f"{out}/{LOCK_FILE}", json.dumps(other).encode())
    with pytest.raises(ValueError, match="host elsewhere, pid 1"):
        with output_lock(out):
            pass
    storage.remove(f"{out}/{LOCK_FILE}")
    real_put = storage.write_atomic

    def overwritten(path, data):  # another job's put lands between ours and the read-back
        real_put(path, data)
        real_put(path, json.dumps({**other, "token": "theirs"}).encode())

    monkeypatch.setattr(sink_module.storage, "write_atomic", overwritten)
    with pytest.raises(ValueError, match="host elsewhere, pid 1"):
        with output_lock(out):
            pass


def test_a_local_lock_is_an_exclusive_create_not_a_check_then_write(tmp_path, monkeypatch):
    """Locally O_EXCL closes the race a check-then-write leaves open: even when the check says
    "no lock" (another job created it just after), the create fails and the job is refused.
    The lock file is readable by others (0644 under the umask)."""
    import stat

    import pipelines.sink as sink_module
    from pipelines.sink import LOCK_FILE, output_lock

    out = tmp_path / "out"
    with output_lock(str(out)):
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(os.stat(out / LOCK_FILE).st_mode) == 0o644 & ~umask
    (out / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    monkeypatch.setattr(sink_module.storage, "exists", lambda path: False)
    with pytest.raises(ValueError, match="host elsewhere"):
        with output_lock(str(out)):
            pass


def test_write_errors_say_what_failed_where_and_how_to_resume(tmp_path, monkeypatch):
    import errno

    import pipelines.sink as sink_module
    from pipelines.sink import OutputWriteError

    out = str(tmp_path / "out")
    sink = ParquetSink(out, "r1")
    sink.write(to_table([{"sample_id": "a"}, {"sample_id": "b"}, {"sample_id": "c"}]))
    for code, what, fix in ((errno.ENOSPC, f"no space left on the device holding {out}", "free some space"),
                            (errno.EACCES, f"cannot write to {out} (Permission denied)", "fix the folder")):
        def fails(table, where, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(sink_module.pq, "write_table", fails)
        with pytest.raises(OutputWriteError) as caught:
            sink.write(to_table([{"sample_id": "d"}]))
        assert caught.value.errno == code
        assert caught.value.strerror == (f"{what}; the 3 rows this run committed before stay; {fix}, "
                                         "then run the same command again to resume")


def test_a_write_that_fails_before_its_temporary_exists_raises_the_write_error(tmp_path, monkeypatch):
    """Nothing to remove: the clean-up's own error (no such file) is swallowed, the write's surfaces."""
    import pipelines.sink as sink_module

    def fails(table, where, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sink_module.pq, "write_table", fails)
    with pytest.raises(OSError, match="Input/output error"):
        ParquetSink(str(tmp_path / "out"), "r1").write(to_table([{"sample_id": "a"}]))


def test_annotate_lock_adds_fields_to_this_processs_lock_only(tmp_path):
    from pipelines.sink import LOCK_FILE, annotate_lock, output_lock

    out = tmp_path / "out"
    with output_lock(str(out)):
        annotate_lock(str(out), mlflow_run="r1", mlflow_uri="sqlite:///x")
        lock = json.loads((out / LOCK_FILE).read_text())
        assert (lock["mlflow_run"], lock["mlflow_uri"], lock["pid"]) == ("r1", "sqlite:///x", os.getpid())
    other = {"host": "elsewhere", "pid": 1, "since": "then"}
    (out / LOCK_FILE).write_text(json.dumps(other))
    annotate_lock(str(out), mlflow_run="mine")  # not this process's lock: left as it is
    assert json.loads((out / LOCK_FILE).read_text()) == other
    annotate_lock(str(tmp_path / "none"), mlflow_run="x")  # no lock at all: nothing, no error
    assert not (tmp_path / "none").exists()


def test_process_alive_asks_without_signalling_the_process():
    """``process_alive(pid)`` sends signal 0, which only asks: a running process is alive and goes
    on running; once it has exited and been reaped it is not; an unreadable pid counts as alive."""
    from pipelines.sink import process_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid) and process_alive(str(child.pid))
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)  # still running: nothing was sent to it
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)
    assert process_alive(None) and process_alive("not a pid")
