"""Error kinds and device faults without Ray: which errors poison the device, the attempt
ledger, the sink dropping transient rows so that any Parquet reader sees one row per sample,
and the bare predictor after a device fault. (On Ray: tests/test_pipeline.py.)"""

from __future__ import annotations

import os

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.failures import AttemptLedger, batch_key, is_device_fault, is_out_of_memory
from pipelines.sink import ParquetSink, done_ids, drop_transient, part_files, read_output, to_table


def test_device_faults_are_told_from_out_of_memory_and_from_other_errors():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom) and not is_device_fault(oom)
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory")) and not is_device_fault(RuntimeError("CUDA error: out of memory"))
    for message in ("CUDA error: an illegal memory access was encountered", "CUDA error: unspecified launch failure",
                    "CUDA error: uncorrectable ECC error encountered", "CUDA error: device-side assert triggered",
                    "CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"):
        assert is_device_fault(RuntimeError(message)) and not is_out_of_memory(RuntimeError(message)), message
    if hasattr(torch, "AcceleratorError"):
        assert is_device_fault(torch.AcceleratorError("anything"))
    for other in (RuntimeError("shape mismatch: [2, 3] vs [3, 2]"), ValueError("CUDA error: not a RuntimeError"), KeyError("x")):
        assert not is_device_fault(other) and not is_out_of_memory(other)


def test_ledger_counts_attempts_per_batch_whatever_the_row_order():
    ledger = AttemptLedger()
    key = batch_key(["b", "a", "c"])
    assert key == batch_key(["a", "b", "c"]) != batch_key(["a", "b"])
    assert ledger.begin(key) == (1, None)
    ledger.fault(key, "CUDA error: boom")
    assert ledger.begin(key) == (2, "CUDA error: boom")
    assert ledger.begin(batch_key(["x"])) == (1, None)
    assert ledger.repeats() == 1
    ledger.finish(key)
    assert ledger.begin(key) == (1, None) and ledger.repeats() == 1


def _row(sid: str, kind: str | None = None, output: str | None = None) -> dict:
    return {"sample_id": sid, "output": output, "error": f"{kind} failure: /{sid}" if kind else None, "error_kind": kind}


def test_transient_rows_are_dropped_so_a_rerun_gives_any_reader_one_row_per_sample(tmp_path):
    out = str(tmp_path / "out")
    sink = ParquetSink(out, "r1")
    sink.write(to_table([_row("a", output="ok"), _row("b", "transient"), _row("c", "input")]))
    sink.write(to_table([_row("d", "transient"), _row("e", "transient")]))
    sink.write(to_table([_row("f", output="ok")]))
    assert (sink.rows_written, sink.errors_written, sink.transient_written) == (6, 4, 3)
    files = sorted(os.listdir(out))

    assert drop_transient(part_files(out)) == 3
    assert done_ids(out) == {"a", "c", "f"}  # input errors count as done; transient ones do not
    assert len(os.listdir(out)) == len(files) - 1  # the all-transient part is gone, the others rewritten
    assert not [f for f in os.listdir(out) if f.startswith(".")]
    assert drop_transient(part_files(out)) == 0

    rerun = ParquetSink(out, "r2", already_done=done_ids(out))  # what the rerun writes for the retried rows
    rerun.write(to_table([_row("b", output="ok"), _row("d", output="ok"), _row("e", "transient")]))
    for table in (read_output(out), pq.read_table(out), pads.dataset(out, format="parquet").to_table()):
        ids = table.column("sample_id").to_pylist()
        assert sorted(ids) == list("abcdef"), ids
    rows = {r["sample_id"]: r for r in read_output(out).to_pylist()}
    assert rows["b"]["output"] == "ok" and rows["b"]["error"] is None and rows["c"]["error_kind"] == "input"


def test_parts_written_before_error_kinds_existed_read_as_done(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = to_table([_row("a", output="ok"), {"sample_id": "b", "error": "decoding failed: /b"}]).drop_columns(["error_kind"])
    pq.write_table(old, out / "part-old-000000.parquet")
    assert drop_transient(part_files(str(out))) == 0 and done_ids(str(out)) == {"a", "b"}
    assert read_output(str(out)).column("error_kind").to_pylist() == [None, None]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.media_fixtures import save_tiny_llava

    os.environ["HF_HUB_OFFLINE"] = "1"
    return save_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "m"))


def _image_rows(tmp_path, n: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    from pipelines.media import decode_row

    rows = []
    for i in range(n):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        rows.append(decode_row({"sample_id": str(i), "source": path, "path": path, "media_type": "image",
                                "frames": 1, "prompt": "describe"}))
    rows.append({"sample_id": "bad", "source": "bad.png", "media_type": "image", "error": "file not found: bad.png"})
    return rows


def test_a_device_fault_without_ray_makes_this_and_later_rows_transient(tiny_model, tmp_path):
    from pipelines.infer import CaptionPredictor

    predictor = CaptionPredictor(model=tiny_model, max_new_tokens=2, device="cpu", batch_size=2)
    real, calls = predictor._generate, []

    def generate(encs):
        calls.append(len(encs))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(encs)

    predictor._generate = generate
    rows = _image_rows(tmp_path, 6)
    out = {r["sample_id"]: r for r in predictor.predict_rows(rows)}
    assert calls == [2, 2]  # no retry on a poisoned device, and no later call touches it
    done = [s for s, r in out.items() if r.get("output") is not None]
    transient = [s for s, r in out.items() if r["error_kind"] == "transient"]
    assert len(done) == 2 and len(transient) == 4
    assert all("illegal memory access" in out[s]["error"] for s in transient)
    assert out["bad"]["error_kind"] == "input" and out["bad"].get("output") is None
    again = predictor.predict_rows(rows[:2])
    assert [r["error_kind"] for r in again] == ["transient", "transient"] and calls == [2, 2]


def test_a_generate_error_that_is_not_the_device_costs_only_its_row_as_an_input_error(tiny_model, tmp_path):
    from pipelines.infer import CaptionPredictor

    predictor = CaptionPredictor(model=tiny_model, max_new_tokens=2, device="cpu", batch_size=4)
    rows = _image_rows(tmp_path, 4)
    poisoned = predictor._encode(rows[2])["pixel_values"]
    real = predictor._generate

    def generate(encs):
        if any(torch.equal(e["pixel_values"], poisoned) for e in encs):
            raise ValueError("this image breaks the model")
        return real(encs)

    predictor._generate = generate
    out = {r["sample_id"]: r for r in predictor.predict_rows(rows)}
    assert out["2"]["error_kind"] == "input" and "this image breaks the model" in out["2"]["error"]
    assert all(out[s].get("output") is not None and out[s]["error_kind"] is None for s in ("0", "1", "3"))


def test_an_output_without_free_space_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    from jobs.caption import main

    (tmp_path / "in").mkdir()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (3 << 20), 3 << 20))
    rc = main(["--model", "demo", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "only 3 MiB free" in err[0] and "at least 64 MiB" in err[0] and str(tmp_path) in err[0]


def test_a_part_that_cannot_be_written_leaves_no_file_and_says_how_to_resume(tmp_path, monkeypatch):
    import errno

    sink = ParquetSink(str(tmp_path), "run1")
    rows = [{"sample_id": str(i), "source": f"{i}.png", "output": "x"} for i in range(4)]
    sink.write(to_table(rows[:2]))

    def full(table, where, *a, **kw):
        open(where, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipelines.sink.pq.write_table", full)
    from pipelines.sink import OutputWriteError

    with pytest.raises(OutputWriteError, match=r"no space left on the device holding .*the 2 rows this run committed"):
        sink.write(to_table(rows[2:]))
    from pipelines.sink import part_name

    assert sorted(os.listdir(tmp_path)) == [part_name("rows", ["0", "1"])]
    assert read_output(str(tmp_path)).column("sample_id").to_pylist() == ["0", "1"]


def test_the_run_of_a_killed_job_is_marked_killed_by_the_next_job_in_that_output(tmp_path, monkeypatch, caplog):
    """A SIGKILLed job leaves its lock (with its MLflow run) and a RUNNING run; the next job in
    the same output takes the lock over and ends that run as KILLED."""
    import json
    import socket
    import subprocess
    import sys

    import mlflow

    from jobs.caption import main
    from pipelines.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    (tmp_path / "in").mkdir()  # nothing to caption: the job ends without starting Ray
    tracker = Tracker(str(out), "caption")
    run = mlflow.tracking.MlflowClient().create_run(mlflow.get_experiment_by_name("caption").experiment_id)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (out / "_lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then",
                                                "mlflow_run": run.info.run_id, "mlflow_uri": tracker.shown_uri}))
    assert mlflow.tracking.MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"
    import pipelines.caption

    seen = []  # what the lock says while this job runs: its own MLflow run, for the job after it
    real_annotate = pipelines.caption.annotate_lock

    def spy(output_dir, **fields):
        real_annotate(output_dir, **fields)
        seen.append(json.loads((out / "_lock.json").read_text()))

    monkeypatch.setattr(pipelines.caption, "annotate_lock", spy)
    with caplog.at_level("INFO", logger="pipelines.tracking"):
        assert main(["--model", "demo", "--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    assert len(seen) == 1 and seen[0]["pid"] == os.getpid() and seen[0]["mlflow_uri"] == tracker.shown_uri
    assert seen[0]["mlflow_run"] not in (None, run.info.run_id)
    assert mlflow.tracking.MlflowClient().get_run(run.info.run_id).info.status == "KILLED"
    assert "marked KILLED" in caplog.text and not (out / "_lock.json").exists()
    runs = mlflow.search_runs(experiment_names=["caption"], output_format="list")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # this job's own run ended normally
