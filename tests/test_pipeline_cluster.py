"""The caption job on more than one Ray node: a simulated two-node cluster that loses its
worker node mid-run, and a real `ray job submit` against a head started on 127.0.0.1."""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.sink import part_files, read_output
from pipelines.sources import scan
from tests.media_fixtures import save_tiny_llava

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return save_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


def image_dir(root: str, n: int) -> str:
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(os.path.join(root, f"im{i:03d}.png"))
    return root


def written_ids(output: str) -> list[str]:
    ids = []
    for path in part_files(output):
        ids += pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    return ids


def assert_exactly_once(output: str, inputs: str) -> None:
    ids = written_ids(output)
    assert not [i for i, n in collections.Counter(ids).items() if n > 1], "a row was written twice"
    assert set(ids) == {r["sample_id"] for r in scan(inputs).rows}


def test_two_node_cluster_losing_its_worker_node_mid_run(tiny_model, tmp_path):
    """The guarantee for a lost node is weaker than for a dead worker: the run goes on without
    the node and nothing it committed is lost or written twice, but blocks whose only copy was
    on the node may be given up by Ray Data; then the job ends incomplete (exit 1) and one rerun
    completes it, every row once. So: exactly once after at most one rerun, not recovery within the run."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.caption import CaptionConfig, run_caption

    inputs = image_dir(str(tmp_path / "imgs"), 40)
    out = str(tmp_path / "out")
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}}
    # 3 CPUs on the head: after the loss, the restarted actor and the surviving one take 2 and the
    # CPU stage (decode + preprocess) still has one; with 2, both actors would wait forever for input
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    removed = threading.Event()

    def remove_worker_after_first_file():
        deadline = time.monotonic() + 300
        while not part_files(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.remove_node(worker)
        removed.set()

    try:
        ray.init(address=cluster.address, runtime_env=env, logging_level="WARNING")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        killer = threading.Thread(target=remove_worker_after_first_file, daemon=True)
        killer.start()
        cfg = CaptionConfig(model=tiny_model, input=inputs, output=out, batch_size=2, max_new_tokens=6, flush_rows=2,
                            workers=2)
        summary = run_caption(cfg, quiet=True)
        killer.join(timeout=60)
        assert removed.is_set()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1
        if not summary.complete:  # Ray gave up blocks that lived on the lost node: one rerun must finish
            summary = run_caption(cfg, quiet=True)
        assert summary.complete
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_exactly_once(out, inputs)
    assert len(read_output(out)) == 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_head(tiny_model, tmp_path):
    inputs = image_dir(str(tmp_path / "imgs"), 12)
    out = str(tmp_path / "out")
    gcs_port, dash_port = free_port(), free_port()
    # its own temp dir: the head's session files (and its "current cluster" address file)
    # never land in the machine-wide /tmp/ray that other Ray users read
    ray_tmp = tempfile.mkdtemp(prefix="eprt", dir="/tmp")
    # This head's own token, given to the head and to the CLI alike (Ray enables token
    # authentication by default).
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
         "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(ray_tmp, "head.err"), "w"),
        start_new_session=True,
    )
    started: set[int] = set()
    try:
        address = f"http://127.0.0.1:{dash_port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", dash_port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None:
                    with open(os.path.join(ray_tmp, "head.err")) as fh:
                        raise AssertionError(f"ray start --head exited: {fh.read()[-2000:]}")
                time.sleep(0.5)
        started = _descendants(head.pid)
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", REPO,
             "--runtime-env-json", '{"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}}', "--",
             "python", "-m", "jobs.caption", "--model", tiny_model, "--input", inputs, "--output", out,
             "--batch-size", "4", "--max-new-tokens", "3", "--wait-for-gpus", "0"],  # a CPU-only cluster
            env=env, capture_output=True, text=True, timeout=400,
        )
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-3000:]
        assert "succeeded" in log, log[-3000:]
        assert "ep caption done: 12/12 rows" in log, log[-3000:]
    finally:
        started |= _descendants(head.pid)
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # the head's own process group, started above
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        for pid in started:  # Ray daemons that left the group: end them by their own pids
            _end(pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert_exactly_once(out, inputs)


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as fh:
                    kids = {int(x) for x in fh.read().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


def _end(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"ray" not in fh.read():
                return  # gone, and the pid since reused by something that is not ours
    except OSError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
