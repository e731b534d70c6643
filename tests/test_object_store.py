"""Inputs and outputs on an object store: a real S3 server (moto's, on 127.0.0.1, an ephemeral
port, stopped by its handle) that pyarrow reaches through ``AWS_ENDPOINT_URL``, as a user's
MinIO or Ceph would be reached; dummy credentials from the environment.

The storage layer and the sink against it (fast), the scan of every input kind on it, and
``ep caption --input s3://… --output s3://…`` end to end: a Parquet dataset of image bytes with
the driver killed hard mid-run and a rerun (every row exactly once), and a WebDataset shard with
corrupt members (one error row each); nothing is written outside the output prefix."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.media_fixtures import png_bytes, save_tiny_llava, write_hf_shards, write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """A boto3 client of a fresh S3 server; the environment points pyarrow (and Ray workers
    started afterwards) at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    from pipelines import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    storage._filesystem.cache_clear()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    yield client
    storage._filesystem.cache_clear()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def keys(client, bucket: str) -> list[str]:
    """The bucket's objects, less the empty directory markers ("a/b/") that pyarrow's S3
    file system puts back when it deletes the last object under a prefix."""
    return sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                  for o in page.get("Contents", []) if not o["Key"].endswith("/"))


def upload_dir(client, local: str, bucket: str, prefix: str) -> None:
    for name in sorted(os.listdir(local)):
        client.upload_file(os.path.join(local, name), bucket, f"{prefix}/{name}")


# ------------------------------------------------------------------------------ storage + sink


def test_the_sink_on_s3_commits_whole_parts_resumes_and_drops_transient_rows(s3):
    from pipelines.sink import (ParquetSink, check_job, done_ids, drop_transient, output_lock, part_files, part_name,
                                read_output, to_table)

    s3.create_bucket(Bucket="sink")
    out = "s3://sink/run/captions"
    with output_lock(out):
        check_job(out, {"model": "m"})
        sink = ParquetSink(out, "r1")
        sink.write(to_table([{"sample_id": "a", "output": "x"}, {"sample_id": "b", "error": "gone", "error_kind": "transient"}]))
        sink.write(to_table([{"sample_id": "a", "output": "again"}, {"sample_id": "c", "output": "z"}]))  # a: once
    parts = sorted([part_name("rows", ["a", "b"]), part_name("rows", ["c"])])  # named by their rows: no run, no counter
    assert [k.rsplit("/", 1)[1] for k in keys(s3, "sink")] == ["_job.json", *parts]
    assert part_files(out) == [f"{out}/{name}" for name in parts]
    assert done_ids(out) == {"a", "b", "c"} and sink.duplicates_dropped == 1
    assert drop_transient(part_files(out)) == 1 and done_ids(out) == {"a", "c"}  # b is processed again by a rerun
    assert sorted(read_output(out).select(["sample_id", "output"]).to_pylist(), key=str) == [
        {"sample_id": "a", "output": "x"}, {"sample_id": "c", "output": "z"}]
    with pytest.raises(ValueError, match="holds rows of a different job"):
        check_job(out, {"model": "other"})
    # a plain Parquet reader of the prefix sees the same rows (no temporaries, no lock left)
    from pipelines import storage

    fs, inner = storage.filesystem(out)
    assert sorted(pq.read_table(inner, filesystem=fs).column("sample_id").to_pylist()) == ["a", "c"]


def test_the_lock_on_s3_refuses_a_live_owner_and_takes_over_a_dead_one(s3):
    from pipelines.sink import LOCK_FILE, output_lock

    s3.create_bucket(Bucket="locks")
    out = "s3://locks/out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s3.put_object(Bucket="locks", Key=f"out/{LOCK_FILE}",
                  Body=json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "x", "mlflow_run": "r9"}))
    with output_lock(out) as stale:
        assert stale["mlflow_run"] == "r9"  # the killed job's lock, taken over
        assert json.loads(s3.get_object(Bucket="locks", Key=f"out/{LOCK_FILE}")["Body"].read())["pid"] == os.getpid()
    assert keys(s3, "locks") == []  # released
    s3.put_object(Bucket="locks", Key=f"out/{LOCK_FILE}",
                  Body=json.dumps({"host": "another-node", "pid": 1, "since": "today"}))
    with pytest.raises(ValueError, match="in use by another job .host another-node, pid 1"):
        with output_lock(out):
            pass


def test_an_unwritable_bucket_is_refused_before_any_work(s3):
    from pipelines import storage

    with pytest.raises(PermissionError, match="output s3://no-such-bucket/x cannot be written"):
        storage.check_writable("s3://no-such-bucket/x")


# ------------------------------------------------------------------------------ scanning


def test_every_input_kind_is_scanned_and_decoded_from_s3(s3, tmp_path):
    from pipelines.media import decode_row
    from pipelines.sources import scan

    s3.create_bucket(Bucket="inputs")
    write_hf_shards(str(tmp_path / "hf"), shards=2, rows=3)
    upload_dir(s3, str(tmp_path / "hf"), "inputs", "hf")
    write_tar(str(tmp_path / "s.tar"), {"a": {"png": png_bytes(1), "txt": b"ref a"}, "b": {"png": b"not a png"}})
    s3.upload_file(str(tmp_path / "s.tar"), "inputs", "wds/s-000.tar")
    for i in range(2):
        s3.put_object(Bucket="inputs", Key=f"folder/sub/{i}.png", Body=png_bytes(i))
    s3.put_object(Bucket="inputs", Key="folder/notes.txt", Body=b"skipped")
    s3.put_object(Bucket="inputs", Key="m.jsonl", Body="\n".join(json.dumps(r) for r in [
        {"path": "folder/sub/0.png", "reference": "relative to the manifest"},
        {"path": "s3://inputs/folder/sub/1.png"}, {"path": "s3://inputs/missing.png"}]).encode())

    hf = scan("s3://inputs/hf", columns=None)
    assert len(hf.rows) == 6 and {r["source"] for r in hf.rows} >= {"train-00000-of-00002.parquet#0"}
    wds = {r["source"]: r for r in scan("s3://inputs/wds").rows}
    assert sorted(wds) == ["s-000.tar:a.png", "s-000.tar:b.png"] and wds["s-000.tar:a.png"]["reference"] == "ref a"
    folder = scan("s3://inputs/folder/")
    assert [r["source"] for r in folder.rows] == ["s3://inputs/folder/sub/0.png", "s3://inputs/folder/sub/1.png"]
    assert folder.skipped_files == 1
    manifest = {r["source"]: r for r in scan("s3://inputs/m.jsonl").rows}
    assert manifest["folder/sub/0.png"]["path"] == "s3://inputs/folder/sub/0.png"

    decoded = {r["source"]: decode_row(r) for r in [*hf.rows, *wds.values(), *folder.rows, *manifest.values()]}
    broken = {s: r["error"] for s, r in decoded.items() if r["error"]}
    assert sorted(broken) == ["s-000.tar:b.png", "s3://inputs/missing.png"], broken
    assert "cannot read the object" in broken["s3://inputs/missing.png"]
    assert all(r["pixels"] for s, r in decoded.items() if s not in broken)
    from PIL import Image

    first = Image.open(io.BytesIO(png_bytes(0)))  # what folder/sub/0.png holds, decoded from the store
    assert decoded["s3://inputs/folder/sub/0.png"]["shape"][1:] == [first.height, first.width]


# ------------------------------------------------------------------------------ ep caption


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return save_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def ray_on_s3(s3):
    """A local Ray whose workers see the S3 environment (started after it is set)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ep_caption_from_s3_to_s3_survives_a_hard_kill_and_writes_every_row_once(s3, ray_on_s3, tiny_model, tmp_path,
                                                                                  monkeypatch, capsys):
    from jobs.caption import main
    from pipelines import storage
    from pipelines.sink import part_files, read_output
    from pipelines.sources import scan

    monkeypatch.chdir(tmp_path)  # the MLflow store of an object-store output: ./_ep_mlflow/
    s3.create_bucket(Bucket="corpus")
    write_hf_shards(str(tmp_path / "hf"), shards=4, rows=10, row_group_size=4)
    upload_dir(s3, str(tmp_path / "hf"), "corpus", "hf")
    inputs = set(keys(s3, "corpus"))
    out = "s3://corpus/captions/hf"
    args = ["--model", tiny_model, "--input", "s3://corpus/hf", "--output", out, "--batch-size", "2",
            "--max-new-tokens", "8", "--flush-rows", "2", "--address", ray_on_s3, "--wait-for-gpus", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.caption", *args], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not part_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert part_files(out), f"no part appeared on S3 (driver exit status {proc.poll()})"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ids = {r["sample_id"] for r in scan("s3://corpus/hf").rows}
    assert len(ids) == 40 and 0 < len(read_output(out)) < 40, "the driver was not killed mid-run"

    assert main(args) == 0  # the rerun: takes over the dead driver's lock, writes the rest
    fs, prefix = storage.filesystem(out)
    written = pq.read_table(prefix, filesystem=fs, columns=["sample_id", "error"])  # a plain Parquet reader
    assert sorted(written.column("sample_id").to_pylist()) == sorted(ids)  # every row exactly once, in plain Parquet
    assert written.column("error").null_count == 40
    assert all(k in inputs or k.startswith("captions/hf/") for k in keys(s3, "corpus")), keys(s3, "corpus")
    assert (tmp_path / "_ep_mlflow" / "s3" / "corpus" / "captions" / "hf" / "_mlflow.db").exists()

    # a WebDataset shard with corrupt members: one error row each, the good ones captioned
    write_tar(str(tmp_path / "w.tar"), {"good1": {"png": png_bytes(3)}, "good2": {"png": png_bytes(4), "txt": b"four"},
                                        "bad": {"png": b"\x89PNG but no more"}, "cut": {"png": png_bytes(5)[:40]}})
    s3.upload_file(str(tmp_path / "w.tar"), "corpus", "wds/w-000.tar")
    out_wds = "s3://corpus/captions/wds"
    assert main([*args[:2], "--input", "s3://corpus/wds", "--output", out_wds, *args[6:]]) == 0
    rows = {r["source"]: r for r in read_output(out_wds).to_pylist()}
    assert sorted(rows) == ["w-000.tar:bad.png", "w-000.tar:cut.png", "w-000.tar:good1.png", "w-000.tar:good2.png"]
    assert [s for s, r in rows.items() if r["error"]] == ["w-000.tar:bad.png", "w-000.tar:cut.png"]
    assert rows["w-000.tar:good2.png"]["reference"] == "four" and rows["w-000.tar:good1.png"]["output"]
    capsys.readouterr()
    assert main([*args[:2], "--input", "s3://corpus/wds", "--output", out_wds, *args[6:]]) == 0  # what its worker recorded
    assert "nothing to do" in capsys.readouterr().out and len(read_output(out_wds)) == 4

    # a manifest naming objects: its listing goes to the output prefix for the workers, then away
    for i in range(5):
        s3.put_object(Bucket="corpus", Key=f"imgs/{i}.png", Body=png_bytes(i))
    s3.put_object(Bucket="corpus", Key="m.jsonl", Body="\n".join(
        json.dumps({"path": f"imgs/{i % 5}.png", "prompt": f"q{i // 5}"}) for i in range(10)).encode())
    out_m = "s3://corpus/captions/m"
    assert main([*args[:2], "--input", "s3://corpus/m.jsonl", "--output", out_m, *args[6:]]) == 0
    made = read_output(out_m).to_pylist()
    assert len(made) == 10 and all(r["output"] and r["error"] is None for r in made)
    assert not [k for k in keys(s3, "corpus") if "_listing" in k]
    assert all(k in inputs or k.startswith(("captions/hf/", "captions/wds/", "captions/m/", "wds/", "imgs/", "m.jsonl"))
               for k in keys(s3, "corpus"))
