"""The caption job on a local Ray (2 CPUs) with the tiny LLaVA: one row per input, exactly once,
errors exactly where the input is bad, resume after a dying worker or a killed driver.

One Ray session serves the whole module (Ray startup is slow on 2 cores)."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.sink import OUTPUT_SCHEMA, part_files, read_output
from tests import faults
from tests.media_fixtures import make_corpus, save_tiny_llava, write_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def worker_exit_spec(tmp_path_factory) -> str:
    """Write ``N MARKER`` here to make a model worker die on its N-th batch (tests/faults.py)."""
    return str(tmp_path_factory.mktemp("faults") / "worker_exit")


@pytest.fixture(scope="module")
def device_fault_spec(tmp_path_factory) -> str:
    """Write a JSON fault spec here to make generate calls fail (tests/faults.py)."""
    return str(tmp_path_factory.mktemp("faults") / "device_fault.json")


@pytest.fixture(scope="module")
def ray_session(worker_exit_spec, device_fault_spec):
    """Ray with the test faults installed in every worker: the decoder hangs / crashes on the
    corpus's fault files, a model worker dies when ``worker_exit_spec`` says so, generate calls
    run out of memory or fault the device when ``device_fault_spec`` says so."""
    import ray
    import ray.data  # noqa: F401 - its console log handler binds sys.stderr at import: pytest's, not one test's capsys

    os.environ["HF_HUB_OFFLINE"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env=faults.ray_runtime_env(worker_exit_spec, device_fault_spec))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return save_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


def caption(args: list[str]) -> int:
    from jobs.caption import main

    return main(args)


def rows_by_source(output: str) -> dict:
    table = read_output(output)
    assert table.schema == OUTPUT_SCHEMA
    return {r["source"]: r for r in table.to_pylist()}


def assert_exactly_once(output: str, expected_ids: set[str]) -> None:
    ids = []
    for path in part_files(output):
        import pyarrow.parquet as pq

        ids += pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    dupes = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not dupes, f"rows written twice: {dupes}"
    assert set(ids) == expected_ids


def image_dir(root: str, n: int) -> str:
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(os.path.join(root, f"img{i:03d}.png"))
    return root


def test_bad_and_odd_corpus_end_to_end_then_resume(ray_session, tiny_model, tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "corpus")
    expect = make_corpus(root)
    entries = [{"path": rel} for rel in sorted(expect)]
    entries[0]["prompt"] = "What color is this?"
    entries[0]["reference"] = "red"
    entries.append({"path": "does/not/exist.png"})
    manifest = write_manifest(os.path.join(root, "manifest.jsonl"), entries)
    out = str(tmp_path / "out")
    args = ["--model", tiny_model, "--input", manifest, "--output", out, "--method", "random", "--keep-ratio", "0.5",
            "--frames", "3", "--batch-size", "4", "--max-new-tokens", "3", "--decode-timeout", "3", "--flush-rows", "8"]

    assert caption(args) == 0
    printed = capsys.readouterr().out
    summary = printed.strip().splitlines()[-1]
    n_bad = sum(expect.values()) + 1
    assert summary.startswith(f"ep caption done: {len(entries)}/{len(entries)} rows")
    assert f"{n_bad} errors" in summary and "items/s" in summary
    assert "rows written" in printed  # progress while running

    rows = rows_by_source(out)
    assert len(rows) == len(entries) == len(read_output(out))
    for entry in entries:
        row = rows[entry["path"]]
        bad = expect.get(entry["path"], True)
        if bad:
            assert row["error"] and row["output"] is None, entry["path"]
            assert row["error"].rstrip().endswith(os.path.basename(entry["path"])), row["error"]
        else:
            assert row["error"] is None and isinstance(row["output"], str), (entry["path"], row["error"])
            assert row["visual_tokens"] > 0 and row["visual_tokens_kept"] < row["visual_tokens"]
            assert row["latency_ms"] > 0 and row["prune_layer"] == 2 and row["keep_ratio"] == 0.5
            assert 0 < row["flops_reduction"] < 1 and 0 < row["flops_reduction_paper"] < 1
            assert row["prefill_flops"] > 0 and row["kv_cache_bytes"] > 0 and 0 < row["prefill_ms"] <= row["latency_ms"]
            assert len(row["first_token_ids"]) == len(row["first_token_logprobs"]) > 0
            assert all(a >= b for a, b in zip(row["first_token_logprobs"], row["first_token_logprobs"][1:]))
        assert row["method"] == "random" and row["model"] == tiny_model and row["run_id"]
    first = rows[entries[0]["path"]]
    assert first["prompt"] == "What color is this?" and first["reference"] == "red"
    video = rows["video/moving.avi"]
    assert video["media_type"] == "video" and video["frames"] == 3
    assert video["visual_tokens"] == 3 * rows["ok/plain.png"]["visual_tokens"]  # N frames as N images
    assert rows["ok/plain.png"]["frames"] is None

    # the same command again: nothing to do, nothing written
    files = part_files(out)
    assert caption(args) == 0
    assert "nothing to do: every input is in" in capsys.readouterr().out
    assert part_files(out) == files

    # lose one part file (as if its rows were never committed): only those rows are redone
    lost = set(read_output(out).column("sample_id").to_pylist())
    os.remove(files[0])
    missing = lost - set(read_output(out).column("sample_id").to_pylist())
    assert missing
    assert caption(args) == 0
    assert f"({len(missing)} new, {len(lost) - len(missing)} already there)" in capsys.readouterr().out
    assert_exactly_once(out, lost)


def test_worker_dying_mid_run_loses_and_duplicates_nothing(ray_session, tiny_model, tmp_path, worker_exit_spec):
    """The guarantee: a model worker that dies mid-run is restarted by Ray and its batch run again
    within the same job, which ends complete (exit 0) with every row once; no rerun is needed."""
    inputs = image_dir(str(tmp_path / "imgs"), 16)
    out = str(tmp_path / "out")
    marker = str(tmp_path / "worker-died")
    args = ["--model", tiny_model, "--input", inputs, "--output", out, "--batch-size", "1", "--max-new-tokens", "2",
            "--flush-rows", "2"]  # the actor takes 4 rows (batch size × PACK_WINDOW) per call: 4 calls
    with open(worker_exit_spec, "w") as fh:
        fh.write(f"3 {marker}")
    try:
        rc = caption(args)
    finally:
        os.remove(worker_exit_spec)
    assert os.path.exists(marker), "the fault did not fire"
    assert rc == 0, "the job did not recover from the worker's death by itself"
    from pipelines.sources import scan

    assert_exactly_once(out, {r["sample_id"] for r in scan(inputs).rows})


def _kinds(output: str) -> collections.Counter:
    return collections.Counter("output" if r["output"] is not None else r["error_kind"] for r in read_output(output).to_pylist())


def _plain_reader_ids(output: str) -> list[str]:
    """The sample ids a reader that knows nothing of this project sees: pyarrow.dataset on the directory."""
    import pyarrow.dataset as pads

    return pads.dataset(output, format="parquet").to_table(columns=["sample_id"]).column("sample_id").to_pylist()


def test_out_of_memory_in_a_job_then_a_rerun_retries_the_transient_rows(ray_session, tiny_model, tmp_path, device_fault_spec, capsys):
    """Every call runs out of memory, even one row alone: all rows are transient errors, the job
    exits 1 and says to rerun. A rerun where one row fits but two do not: the calls split down
    to one row, the transient rows are replaced by outputs, any reader sees one row per sample."""
    inputs = image_dir(str(tmp_path / "imgs"), 6)
    out = str(tmp_path / "out")
    args = ["--model", tiny_model, "--input", inputs, "--output", out, "--batch-size", "4", "--max-new-tokens", "2"]
    with open(device_fault_spec, "w") as fh:
        json.dump({"oom_above_tokens": 1}, fh)
    try:
        assert caption(args) == 1
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert "6 errors (0 input, 6 transient)" in summary and "run the same command again to retry" in summary, summary
        assert _kinds(out) == {"transient": 6}
        message = read_output(out).column("error").to_pylist()[0]
        tokens = int(message.split("this row alone (")[1].split()[0])  # the token count the error reports
        with open(device_fault_spec, "w") as fh:
            json.dump({"oom_above_tokens": tokens}, fh)  # one row fits, two do not
        assert caption(args) == 0
    finally:
        os.remove(device_fault_spec)
    printed = capsys.readouterr().out
    summary = printed.strip().splitlines()[-1]
    assert "6 transient errors retried" in summary and "6 rows ran in calls split after running out of memory" in summary, summary
    assert _kinds(out) == {"output": 6}
    assert all(r["oom_splits"] >= 1 and r["generate_rows"] == 1 for r in read_output(out).to_pylist())
    assert sorted(_plain_reader_ids(out)) == sorted(read_output(out).column("sample_id").to_pylist())
    assert len(set(_plain_reader_ids(out))) == 6
    assert caption(args) == 0 and "nothing to do" in capsys.readouterr().out


def test_a_poisoned_device_restarts_the_actor_and_loses_nothing(ray_session, tiny_model, tmp_path, device_fault_spec, capsys):
    """A CUDA fault once on one batch: the actor ends, Ray restarts it, the batch runs again and
    its rows get outputs. A batch that faults on every attempt: after 3 attempts its rows are
    transient errors; a rerun without the fault gives them outputs. Nothing lost or doubled."""
    from pipelines.failures import DEVICE_ATTEMPTS
    from pipelines.sources import scan

    inputs = image_dir(str(tmp_path / "imgs"), 8)
    out = str(tmp_path / "out")
    markers = tmp_path / "markers"
    markers.mkdir()
    args = ["--model", tiny_model, "--input", inputs, "--output", out, "--batch-size", "1", "--max-new-tokens", "2",
            "--flush-rows", "2"]  # actor calls of up to 4 rows (batch size × PACK_WINDOW)
    with open(device_fault_spec, "w") as fh:
        json.dump({"poison": {"img001": 1, "img006": 99}, "marker_dir": str(markers)}, fh)
    try:
        rc = caption(args)
    finally:
        os.remove(device_fault_spec)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    once = [f for f in os.listdir(markers) if f.startswith("img001.")]
    always = [f for f in os.listdir(markers) if f.startswith("img006.")]
    assert len(once) == 1 and len(always) == DEVICE_ATTEMPTS, os.listdir(markers)
    assert len({f.split(".")[1] for f in once + always}) == 1 + DEVICE_ATTEMPTS  # each fault ended its process
    all_ids = {r["sample_id"] for r in scan(inputs).rows}
    assert_exactly_once(out, all_ids)
    rows = {os.path.basename(source): row for source, row in rows_by_source(out).items()}
    assert rows["img001.png"]["output"] is not None  # ran again on the restarted actor
    assert rows["img006.png"]["error_kind"] == "transient" and "illegal memory access" in rows["img006.png"]["error"]
    kinds = _kinds(out)
    assert rc == 1 and 1 <= kinds["transient"] <= 4 and kinds["output"] == 8 - kinds["transient"], (kinds, summary)
    assert f"{kinds['transient']} transient" in summary and "batches ran again after their model worker ended" in summary

    assert caption(args) == 0
    assert _kinds(out) == {"output": 8}
    assert_exactly_once(out, all_ids)
    assert sorted(_plain_reader_ids(out)) == sorted(all_ids)


def test_no_gpu_is_an_error_for_a_big_model_unless_device_cpu(ray_session, tiny_model, tmp_path, monkeypatch, capsys):
    import pipelines.caption

    monkeypatch.setattr(pipelines.caption, "CPU_PARAMETER_LIMIT", 1000)  # the tiny model counts as big
    inputs = image_dir(str(tmp_path / "imgs"), 2)
    args = ["--model", tiny_model, "--input", inputs, "--output", str(tmp_path / "out"), "--max-new-tokens", "2",
            "--wait-for-gpus", "2", "--no-tracking"]
    start = time.monotonic()
    assert caption(args) == 2
    waited = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert 2 <= waited < 30 and len(err) == 1, (waited, err)
    assert "no GPU after waiting 2 s" in err[0] and "--device cpu" in err[0], err
    assert caption([*args, "--device", "cpu"]) == 0
    assert _kinds(str(tmp_path / "out")) == {"output": 2}
    # GPUs asked for explicitly that the cluster does not have: an error, not a job waiting forever
    explicit = [*args[:-3], "--num-gpus", "1", "--wait-for-gpus", "1", "--no-tracking", "--output", str(tmp_path / "o2")]
    assert caption(explicit) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--num-gpus 1 per model worker, but the Ray cluster has 0 GPUs after waiting 1 s; "
                            "start GPU workers, lower --num-gpus, or use --device cpu"), err


def test_driver_killed_hard_then_rerun_completes_exactly_once(ray_session, tiny_model, tmp_path, monkeypatch):
    inputs = image_dir(str(tmp_path / "imgs"), 40)
    out = str(tmp_path / "out")
    args = ["--model", tiny_model, "--input", inputs, "--output", out, "--batch-size", "2", "--max-new-tokens", "8",
            "--flush-rows", "2"]
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.caption", *args, "--address", address, "--wait-for-gpus", "0"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not part_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert part_files(out), f"no output file appeared (driver exit status {proc.poll()})"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group, started above
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    written = len(read_output(out))
    from pipelines.sources import scan

    all_ids = {r["sample_id"] for r in scan(inputs).rows}
    assert 0 < written < len(all_ids), "the driver was not killed mid-run"
    assert caption(args) == 0
    assert_exactly_once(out, all_ids)
    assert json.load(open(os.path.join(out, "_job.json")))["model"] == tiny_model


def test_caption_run_is_tracked_and_a_down_server_costs_no_work(ray_session, tiny_model, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    images = image_dir(str(tmp_path / "imgs"), 6)
    base = ["--model", tiny_model, "--input", images, "--method", "entropyprune", "--keep-ratio", "0.25",
            "--batch-size", "3", "--max-new-tokens", "2"]

    # a tracking server that is down: the Parquet output is complete, the failure is said once
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    down = str(tmp_path / "down")
    assert caption(base + ["--output", down]) == 0
    err = capsys.readouterr().err
    assert err.count("MLflow tracking failed") == 1 and dead in err
    assert len(read_output(down)) == 6 and read_output(down).column("error").null_count == 6

    # the default store: sqlite:///<output>/_mlflow.db, one run with params and metrics
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    out = str(tmp_path / "tracked")
    assert caption(base + ["--output", out, "--experiment", "unit-caption"]) == 0
    printed = capsys.readouterr().out
    assert "MLflow: run recorded" in printed
    assert "3.00 rows per generate call (0.0% padding)" in printed  # 6 equal images, calls of --batch-size 3
    client = MlflowClient(f"sqlite:///{os.path.abspath(out)}/_mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("unit-caption").experiment_id])
    assert run.data.params["method"] == "entropyprune" and run.data.params["keep_ratio"] == "0.25"
    assert run.data.params["model"] == tiny_model and run.data.params["prune_layer"] == "2"
    metrics = run.data.metrics
    assert metrics["errors"] == 0 and metrics["rows_new"] == 6 and metrics["items_per_s"] > 0
    rows = read_output(out).to_pylist()
    assert metrics["visual_tokens_kept_mean"] == pytest.approx(np.mean([r["visual_tokens_kept"] for r in rows]))
    assert metrics["flops_reduction"] == pytest.approx(np.mean([r["flops_reduction"] for r in rows]))
    for key in ("prefill_ms_per_item", "flops_reduction_paper", "kv_cache_bytes_mean"):
        assert metrics[key] > 0
    assert {r["run_id"] for r in rows} == {run.info.run_id}  # rows point at their MLflow run
    assert metrics["rows_per_generate"] == pytest.approx(3) and metrics["padding_share"] == 0
    assert {r["generate_rows"] for r in rows} == {3}

    # model actors that would take every CPU leave the CPU stage none: refused, not hung
    assert caption(base + ["--output", str(tmp_path / "starved"), "--workers", "2", "--no-tracking"]) == 2
    assert "take all 2 CPUs of the cluster" in capsys.readouterr().err


def test_sigterm_commits_what_arrived_marks_the_run_killed_and_a_rerun_finishes(ray_session, tiny_model, tmp_path,
                                                                               capsys):
    """A second job into the output of a running one is refused in one line (exit 2). SIGTERM
    to the running driver: exit 143 with one line, the parts written stay, the lock is released,
    the MLflow run is KILLED (not FINISHED or RUNNING); the same command again finishes, and a
    plain Parquet read of the folder sees one row per sample."""
    from mlflow.tracking import MlflowClient

    from pipelines.sink import LOCK_FILE
    from pipelines.sources import scan

    inputs = image_dir(str(tmp_path / "imgs"), 40)
    out = str(tmp_path / "out")
    args = ["--model", tiny_model, "--input", inputs, "--output", out, "--batch-size", "2", "--max-new-tokens", "8",
            "--flush-rows", "2"]
    address = ray_session.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.caption", *args, "--address", address, "--wait-for-gpus", "0"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not part_files(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert part_files(out), f"no output file appeared (driver exit status {proc.poll()})"
        capsys.readouterr()
        assert caption(args) == 2  # the second job: refused while the first one writes
        refused = capsys.readouterr().err.strip().splitlines()
        assert len(refused) == 1 and f"output directory {out} is in use by another job" in refused[0]
        assert f"pid {proc.pid}" in refused[0] and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("caption: stopped by SIGTERM; what was written is kept: "
                                            "run the same command again to resume")
    written = len(read_output(out))
    all_ids = {r["sample_id"] for r in scan(inputs).rows}
    assert 0 < written < len(all_ids) and not os.path.exists(os.path.join(out, LOCK_FILE))
    runs = MlflowClient(f"sqlite:///{os.path.abspath(out)}/_mlflow.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{os.path.abspath(out)}/_mlflow.db").search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert caption(args) == 0
    assert_exactly_once(out, all_ids)
    import pyarrow.parquet as pq

    ids = pq.read_table(out).column("sample_id").to_pylist()  # any Parquet reader of the folder
    assert len(ids) == len(set(ids)) == len(all_ids)


def test_a_video_reaches_a_video_native_model_as_one_video(ray_session, tmp_path, capsys):
    """``ep caption`` on an mp4 and an image with a tiny Qwen2-VL: the video goes through the
    processor's video input (its ``video_pad`` tokens, frames / temporal patch × grid), both rows
    share one generate call, and the family's prune layer (1) is used when none is given."""
    from tests.media_fixtures import write_mp4
    from tests.tiny_models import QWEN_MERGE, QWEN_PATCH, QWEN_TEMPORAL
    from tests.video_standins import save_tiny_qwen_vl

    model = save_tiny_qwen_vl(str(tmp_path / "qwen"))
    root = tmp_path / "media"
    root.mkdir()
    rng = np.random.default_rng(0)
    write_mp4(str(root / "clip.mp4"), [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(12)])
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(root / "photo.png")  # H 24, W 40
    output = str(tmp_path / "out")
    frames = 4
    assert caption(["--model", model, "--input", str(root), "--output", output, "--method", "entropyprune",
                    "--keep-ratio", "0.5", "--max-new-tokens", "4", "--frames", str(frames)]) == 0
    rows = rows_by_source(output)
    assert len(rows) == 2 and all(r["error"] is None and r["output"] for r in rows.values())
    video, image = rows[str(root / "clip.mp4")], rows[str(root / "photo.png")]
    side = 16  # the stand-in video processor's frame size
    video_tokens = frames // QWEN_TEMPORAL * (side // QWEN_PATCH) ** 2 // QWEN_MERGE**2
    image_tokens = (24 // QWEN_PATCH) * (40 // QWEN_PATCH) // QWEN_MERGE**2
    assert (video["media_type"], video["frames"], video["visual_tokens"]) == ("video", frames, video_tokens)
    assert image["visual_tokens"] == image_tokens
    for row in (video, image):
        assert row["visual_tokens_kept"] == int(0.5 * row["visual_tokens"] + 0.5)
        assert row["prune_layer"] == 1 and row["generate_rows"] == 2


def test_a_full_disk_mid_run_keeps_the_committed_rows_says_so_in_one_line_and_a_rerun_resumes(
        ray_session, tiny_model, tmp_path, device_fault_spec, capsys):
    """The model workers' part files hit ENOSPC (tests/faults.py): no temporary file is left,
    the job ends (exit 1) with one line that says what happened, and the same command resumes
    (the sink keeping the parts committed before: tests/test_failures.py)."""
    import json

    images = image_dir(str(tmp_path / "in"), 6)
    out = str(tmp_path / "out")
    args = ["--model", tiny_model, "--input", images, "--output", out, "--method", "fastv", "--keep-ratio", "0.5",
            "--batch-size", "2", "--max-new-tokens", "2", "--no-tracking"]
    with open(device_fault_spec, "w") as fh:
        json.dump({"full_disk": True}, fh)
    try:
        assert caption(args) == 1
    finally:
        os.remove(device_fault_spec)
    printed = capsys.readouterr()
    said = [line for line in (printed.out + printed.err).splitlines() if "no space left" in line]
    assert said and "run the same command again to resume" in said[0] and "Traceback" not in printed.err
    assert printed.out.strip().splitlines()[-1].startswith("ep caption INCOMPLETE")
    assert part_files(out) == [] and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert caption(args) == 0
    assert "(6 new, 0 already there)" in capsys.readouterr().out
    from pipelines.sources import scan

    assert_exactly_once(out, {r["sample_id"] for r in scan(images).rows})


def test_a_parquet_dataset_of_image_bytes_is_captioned_once_per_row_and_resumes(ray_session, tiny_model, tmp_path, capsys,
                                                                                 monkeypatch):
    """``--input`` a folder of ``datasets``-style Parquet shards (image bytes, question and answer
    columns): one output row per dataset row, its prompt and reference from the columns, decoded
    on the workers from the row's bytes; the same command again has nothing to do, and sees it
    from the parts' footers alone: it starts no Ray session."""
    from tests.media_fixtures import write_hf_shards

    root = str(tmp_path / "ds")
    write_hf_shards(root, shards=2, rows=3)
    out = str(tmp_path / "out")
    args = ["--model", tiny_model, "--input", root, "--output", out, "--method", "dart", "--keep-ratio", "0.5",
            "--batch-size", "4", "--max-new-tokens", "2", "--prompt-column", "question", "--reference-column", "answer",
            "--no-tracking"]
    assert caption(args) == 0
    printed = capsys.readouterr().out
    assert "6 inputs" in printed and "(6 new, 0 already there)" in printed
    rows = rows_by_source(out)
    assert set(rows) == {f"train-{s:05d}-of-00002.parquet#{i}" for s in range(2) for i in range(3)}
    row = rows["train-00001-of-00002.parquet#2"]
    assert row["prompt"] == "what is in image 1-2?" and row["reference"] == "answer 1-2"
    assert all(r["error"] is None and r["visual_tokens_kept"] < r["visual_tokens"] for r in rows.values())
    def no_ray(*_, **__):
        raise AssertionError("a finished job's rerun started Ray")

    monkeypatch.setattr("pipelines.caption.ray_session", no_ray)
    assert caption(args) == 0
    assert "6/6 rows" in (printed := capsys.readouterr().out) and "(0 new, 6 already there)" in printed
    assert "nothing to do" in printed and "4 done already (6 rows" in printed
