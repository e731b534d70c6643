"""MLflow tracking: the SQLite default, a real tracking server, and a server that is down."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import Tracker, cost_quality_plot, run_metrics, run_params, tracking_uri

SUMMARY = [
    {"method": "none", "keep_ratio": 1.0, "quality": 0.9, "flops_reduction": 0.0, "items_per_s": 2.0},
    {"method": "entropyprune", "keep_ratio": 0.33, "quality": 0.8, "flops_reduction": 0.5, "items_per_s": 3.0},
    {"method": "entropyprune", "keep_ratio": 0.11, "quality": 0.6, "flops_reduction": 0.7, "items_per_s": 3.5},
    {"method": "random", "keep_ratio": 0.33, "quality": 0.7, "flops_reduction": 0.5, "items_per_s": 3.0},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _health_server(status):
    """A loopback HTTP server answering each GET with ``status(path, authorization header)``;
    yields its port."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status(self.path, self.headers.get("Authorization")))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def _record_sweep(tracker: Tracker, out: Path) -> None:
    plot = cost_quality_plot(SUMMARY, out / "cost_quality.png", title="test sweep")
    with tracker.run("sweep", {"model": "tiny", "dataset": "unit", "n": 4}):
        tracker.experiment_tag("ep.kind", "unit-sweep")
        for row in SUMMARY:
            with tracker.run(f"{row['method']}@{row['keep_ratio']}", run_params({**row, "model": "tiny"}), nested=True):
                tracker.metrics(run_metrics(row))
        tracker.artifact(plot)
        tracker.table({"method": [r["method"] for r in SUMMARY], "quality": [r["quality"] for r in SUMMARY]},
                      "summary_table.json")


def _check_runs(client: MlflowClient, experiment: str) -> None:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == len(SUMMARY)
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.data.params["model"] == "tiny"
    by_name = {c.info.run_name: c for c in children}
    child = by_name["entropyprune@0.11"]
    assert child.data.params["method"] == "entropyprune" and child.data.params["keep_ratio"] == "0.11"
    assert child.data.metrics["quality"] == pytest.approx(0.6)
    assert child.data.metrics["flops_reduction"] == pytest.approx(0.7)
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == ["cost_quality.png", "summary_table.json"]
    assert exp.tags["ep.kind"] == "unit-sweep"


def test_default_store_is_sqlite_beside_the_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must not land in the working directory
    out = tmp_path / "out"
    assert tracking_uri(out) == f"sqlite:///{out.resolve() / '_mlflow.db'}"
    tracker = Tracker(out, "unit-sweep")
    _record_sweep(tracker, out)
    assert tracker.failure is None
    assert (out / "_mlflow.db").exists()
    _check_runs(MlflowClient(tracking_uri(out)), "unit-sweep")
    assert list(elsewhere.iterdir()) == [] and list((out / "_mlartifacts").rglob("cost_quality.png"))
    old = tmp_path / "old"
    old.mkdir()
    (old / "mlflow.db").touch()  # an output made before the store got its leading underscore keeps its store
    assert tracking_uri(old) == f"sqlite:///{old.resolve() / 'mlflow.db'}"


def test_plot_draws_one_line_per_method_and_the_unpruned_point(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real_savefig(fig, *a, **k)))
    path = cost_quality_plot(SUMMARY, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    flops_panel, speed_panel = fig.axes
    for panel, x_key in ((flops_panel, "flops_reduction"), (speed_panel, "items_per_s")):
        lines = {line.get_label(): line for line in panel.get_lines()}
        assert set(lines) == {"entropyprune", "random"}  # one line per pruning method
        ep = [r for r in SUMMARY if r["method"] == "entropyprune"]
        assert list(lines["entropyprune"].get_xdata()) == sorted(r[x_key] for r in ep)
        assert list(lines["entropyprune"].get_ydata()) == [r["quality"] for r in sorted(ep, key=lambda r: r[x_key])]
        (star,) = panel.collections  # the unpruned configuration
        assert star.get_offsets().tolist() == [[SUMMARY[0][x_key], SUMMARY[0]["quality"]]]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / '_mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start within 90 s")
    try:
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_real_tracking_server_over_http(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracker = Tracker(tmp_path / "out", "server-sweep")
    _record_sweep(tracker, tmp_path)
    assert tracker.failure is None
    assert not (tmp_path / "out" / "_mlflow.db").exists()
    _check_runs(MlflowClient(mlflow_server), "server-sweep")


def test_server_down_is_one_clear_line_and_no_exception(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    with caplog.at_level("WARNING", logger="pipelines.tracking"):
        tracker = Tracker(tmp_path, "down")
        _record_sweep(tracker, tmp_path)  # must not raise
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.tracking"]
    assert not tracker.active
    assert len(lines) == 1 and "MLflow tracking failed" in lines[0] and "unreachable" in lines[0]
    assert "Outputs are still written" in lines[0]


# ---------------------------------------------------------------------------- ep sweep, end to end
@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
    import json

    import numpy as np
    from PIL import Image

    from tests.media_fixtures import save_tiny_llava

    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("sweep_inputs")
    model = save_tiny_llava(str(root / "model"))
    rng = np.random.default_rng(0)
    with open(root / "manifest.jsonl", "w") as fh:
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
            fh.write(json.dumps({"path": f"{i}.png", "prompt": "what color", "reference": "red"}) + "\n")
    return model, str(root / "manifest.jsonl")


def _sweep(model: str, manifest: str, out: Path) -> int:
    from jobs.sweep import main

    return main(["--model", model, "--dataset", manifest, "--methods", "none,entropyprune", "--keep-ratios", "0.5",
                 "--output", str(out), "--batch-size", "4", "--max-new-tokens", "2", "--num-cpus", "2"])


def _check_sweep_runs(client: MlflowClient) -> None:
    experiment = client.get_experiment_by_name("sweep")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # a classic ML experiment
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["method"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and set(children) == {"none", "entropyprune"}
    parent = parents[0]
    assert {"summary.json", "quality_vs_flops.png", "outputs_sample.parquet", "summary_table.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    pruned, full = children["entropyprune"], children["none"]
    assert pruned.data.params["keep_ratio"] == "0.5" and pruned.data.params["prune_layer"] == "2"
    for key in ("items_per_s", "prefill_ms_per_item", "visual_tokens_kept_mean", "flops_reduction",
                "flops_reduction_paper", "kv_cache_bytes_mean", "errors", "quality", "agreement_with_full",
                "first_token_kl"):
        assert key in pruned.data.metrics, key
    assert full.data.metrics["agreement_with_full"] == 1.0 and full.data.metrics["first_token_kl"] == 0.0
    assert pruned.data.metrics["visual_tokens_kept_mean"] == 0.5 * full.data.metrics["visual_tokens_kept_mean"]
    assert pruned.data.metrics["kv_cache_bytes_mean"] < full.data.metrics["kv_cache_bytes_mean"]
    assert [a.path for a in client.list_artifacts(pruned.info.run_id)] == ["entropyprune@0.50.parquet"]


def test_sweep_recorded_in_the_default_store_and_on_a_server(sweep_inputs, tmp_path, monkeypatch, mlflow_server):
    model, manifest = sweep_inputs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = tmp_path / "local"
    assert _sweep(model, manifest, local) == 0
    _check_sweep_runs(MlflowClient(f"sqlite:///{local.resolve() / '_mlflow.db'}"))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    remote = tmp_path / "remote"
    assert _sweep(model, manifest, remote) == 0
    assert not (remote / "_mlflow.db").exists()
    _check_sweep_runs(MlflowClient(mlflow_server))


def test_a_job_does_not_leak_its_store_into_the_next(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Tracker(tmp_path / "a", "first")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert Tracker(tmp_path / "b", "second").uri == f"sqlite:///{(tmp_path / 'b').resolve() / '_mlflow.db'}"


def test_a_tracking_failure_in_the_middle_of_a_job_is_one_line_and_the_job_goes_on(tmp_path, monkeypatch, caplog):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path, "mid-job")
    assert tracker.active

    def store_gone(*args, **kwargs):
        raise ConnectionError("tracking store went away")

    with caplog.at_level("WARNING", logger="pipelines.tracking"):
        with tracker.run("caption", {"model": "tiny"}):
            monkeypatch.setattr(mlflow, "log_metrics", store_gone)
            tracker.metrics({"items_per_s": 1.0})  # must not raise
            tracker.metrics({"items_per_s": 2.0})  # already off: no second line
            tracker.artifact(tmp_path / "nothing.txt")
            reached = True
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.tracking"]
    assert reached and not tracker.active
    assert len(lines) == 1 and "log_metrics failed" in lines[0] and "went away" in lines[0]
    assert mlflow.active_run() is None  # the run was ended: the next job in this process can track


def test_output_metrics_count_error_rows_as_errors():
    from pipelines.sink import to_table
    from pipelines.tracking import output_metrics

    rows = [{"sample_id": "a", "output": "x", "visual_tokens_kept": 10},
            {"sample_id": "b", "error": "cannot decode image: b.png"},
            {"sample_id": "c", "error": "file not found: c.png"},
            {"sample_id": "d", "output": "y", "visual_tokens_kept": 20}]
    metrics = output_metrics(to_table(rows))
    assert (metrics["rows"], metrics["errors"]) == (4, 2)
    assert metrics["visual_tokens_kept_mean"] == 15  # means over the rows that produced an output


def test_output_metrics_are_means_over_the_rows_with_an_output():
    """Every cost metric by hand; the error rows carry values that would move each mean."""
    from pipelines.sink import to_table
    from pipelines.tracking import output_metrics

    def row(i, error=None, **values):
        return {"sample_id": i, "output": None if error else "x", "error": error, **values}

    costs = dict(prefill_ms=99.0, visual_tokens=999, visual_tokens_kept=999, flops_reduction=0.99,
                 flops_reduction_paper=0.99, kv_cache_bytes=999_999, generate_rows=8, padding_share=0.9)
    rows = [row("a", prefill_ms=10.0, visual_tokens=144, visual_tokens_kept=48, flops_reduction=0.4,
                flops_reduction_paper=0.5, kv_cache_bytes=1000, generate_rows=1, padding_share=0.0),
            row("b", prefill_ms=30.0, visual_tokens=576, visual_tokens_kept=64, flops_reduction=0.6,
                flops_reduction_paper=0.7, kv_cache_bytes=3000, generate_rows=4, padding_share=0.2),
            row("c", error="generation failed (OutOfMemoryError)", **costs)]
    assert output_metrics(to_table(rows)) == pytest.approx({
        "rows": 3, "errors": 1, "prefill_ms_per_item": 20.0, "visual_tokens_mean": 360.0,
        "visual_tokens_kept_mean": 56.0, "flops_reduction": 0.5, "flops_reduction_paper": 0.6,
        "kv_cache_bytes_mean": 2000.0,
        # a is a whole call, b a quarter of one: 2 rows / 1.25 calls; padding (0 + 0.2/4) / 1.25
        "rows_per_generate": 1.6, "padding_share": 0.04,
    })


def test_credentials_never_printed_and_basic_auth_servers_are_reachable(tmp_path, monkeypatch, caplog):
    """A password in the tracking URI appears in no message; the health check sends it as
    basic auth (urllib cannot take user info in a URL), so such a server counts as reachable."""
    import base64

    from pipelines.tracking import _server_reachable, redact

    assert redact("http://alice:S3cr3t@host:5000/x?token=abc") == "http://alice:***@host:5000/x?***"
    assert redact("https://tok@host") == "https://***@host" and redact("sqlite:///a/b.db") == "sqlite:///a/b.db"
    good = "Basic " + base64.b64encode(b"alice:S3cr3t").decode()

    with _health_server(lambda path, auth: 200 if path == "/health" and auth == good else 401) as port:
        assert _server_reachable(f"http://alice:S3cr3t@127.0.0.1:{port}") is None
        assert "401" in _server_reachable(f"http://alice:wrong@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:S3cr3tP4ss@127.0.0.1:1")
    with caplog.at_level("WARNING"):
        tracker = Tracker(tmp_path / "out", "secret")
    assert not tracker.active and "S3cr3tP4ss" not in caplog.text and "S3cr3tP4ss" not in tracker.failure
    assert "http://alice:***@127.0.0.1:1" in caplog.text and "S3cr3tP4ss" not in tracker.shown_uri


def test_store_dir_of_an_object_store_output_is_a_local_folder_named_after_it(tmp_path, monkeypatch):
    from pipelines.tracking import LOCAL_STORES, store_dir

    monkeypatch.chdir(tmp_path)
    assert store_dir("s3://bucket/a/b/") == tmp_path / LOCAL_STORES / "s3" / "bucket" / "a" / "b"
    assert store_dir("s3://Xbucket/runX/") == tmp_path / LOCAL_STORES / "s3" / "Xbucket" / "runX"  # only "/" stripped
    assert store_dir("gs://b://odd") == tmp_path / LOCAL_STORES / "gs" / "b://odd"  # split at the first ://
    assert store_dir("out/x") == (tmp_path / "out" / "x").resolve()


def test_redact_hides_passwords_holding_at_signs_and_colons():
    from pipelines.tracking import redact, redact_text

    assert redact("http://alice:p@ss:w0rd@host:5000/x") == "http://alice:***@host:5000/x"
    uri = "http://alice:pa:ss@host/x?token=abc"
    assert redact(uri) == "http://alice:***@host/x?***"
    said = redact_text(f"cannot reach {uri}; the password pa:ss and token=abc were sent", uri)
    assert said == "cannot reach http://alice:***@host/x?***; the password *** and *** were sent"


def test_params_and_metrics_keep_known_finite_values_only(tmp_path, monkeypatch):
    import math

    from pipelines.tracking import _clean

    assert _clean({"a": None, "b": math.nan, "c": 1.5, "d": "x", "e": 0}, ("a", "b", "c", "d", "e", "f")) == {
        "c": 1.5, "d": "x", "e": 0}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path, "filters")
    note = tmp_path / "note.txt"
    note.write_text("n")
    with tracker.run("r"):
        run_id = tracker.current_run_id
        tracker.metrics({"kept": 2, "flag": True, "nan": math.nan, "text": "x", "none": None}, step=7)
        tracker.artifact(note, "notes")
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(run_id)
    assert run.data.metrics == {"kept": 2.0}
    assert [m.step for m in client.get_metric_history(run_id, "kept")] == [7]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]


def test_health_check_under_a_path_prefix_wants_200_and_gives_up_in_time():
    import http.server
    import threading

    from pipelines.tracking import _server_reachable

    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            if self.path == "/slow/health":
                time.sleep(3)
            self.send_response({"/mlflow/health": 200, "/empty/health": 204}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _server_reachable(f"{base}/mlflow/") is None and seen[-1] == "/mlflow/health"
        assert "404" in _server_reachable(f"{base}/mlflowX/") and seen[-1] == "/mlflowX/health"  # only "/" stripped
        assert _server_reachable(f"{base}/empty") == "HTTP 204"
        assert "404" in _server_reachable(base)
        start = time.monotonic()
        assert "timed out" in _server_reachable(f"{base}/slow", timeout_s=0.5)
        assert time.monotonic() - start < 2.5
    finally:
        server.shutdown()
    assert _server_reachable("sqlite:///x.db") is None and _server_reachable("file:///x") is None
    down = _server_reachable("http://bob:Secret1@127.0.0.1:1")
    assert "refused" in down.lower() and "Secret1" not in down


def test_mark_killed_ends_a_running_run_once_and_says_why_it_cannot(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path, "killed")
    client = MlflowClient(tracking_uri=tracker.uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    left = client.create_run(experiment).info.run_id  # what a SIGKILLed job leaves: RUNNING
    done = client.create_run(experiment).info.run_id
    client.set_terminated(done, status="FINISHED")
    with caplog.at_level("INFO", logger="pipelines.tracking"):
        caplog.clear()
        assert tracker.mark_killed(left) is True and client.get_run(left).info.status == "KILLED"
    assert f"MLflow: run {left} of the job that was killed in this output is marked KILLED" in caplog.messages
    assert tracker.mark_killed(left) is False and tracker.mark_killed(done) is False
    assert client.get_run(done).info.status == "FINISHED"
    with caplog.at_level("WARNING", logger="pipelines.tracking"):
        caplog.clear()  # an earlier test may have left pipelines.tracking at INFO: keep only this call's lines
        assert tracker.mark_killed("0" * 32) is False
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipelines.tracking" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"MLflow: could not mark the killed job's run {'0' * 32}: ")
    assert "None" not in warnings[0].split(": ", 2)[-1]  # the store's own reason follows
    assert Tracker(tmp_path, "off", enabled=False).mark_killed(left) is False


def test_metric_tally_merged_call_by_call_equals_output_metrics_of_all_rows():
    """What the driver adds up from the model workers' per-call states is what output_metrics
    computes from every row at once (the oracle): split the rows into calls in any way."""
    from pipelines.sink import to_table
    from pipelines.tracking import MetricTally, output_metrics

    rows = [{"sample_id": f"s{i}", "output": None if i % 4 == 3 else "x", "error": "bad: /p" if i % 4 == 3 else None,
             "prefill_ms": 5.0 + i, "visual_tokens": 100 + 7 * i, "visual_tokens_kept": 10 + i % 5,
             "flops_reduction": 0.1 * (i % 7), "flops_reduction_paper": 0.05 * (i % 3), "kv_cache_bytes": 1000 * i,
             "generate_rows": 1 + i % 3, "padding_share": 0.01 * (i % 5), "latency_ms": 10.0, "generated_at": 100.0 + i}
            for i in range(11)]
    rows[2]["prefill_ms"] = None  # a missing value is left out of its mean only
    merged = MetricTally()
    for start, stop in ((0, 3), (3, 4), (4, 11)):
        merged.merge(MetricTally().add(to_table(rows[start:stop]).to_pylist()).state())
    assert merged.metrics() == pytest.approx(output_metrics(to_table(rows)))
    one_call = MetricTally()  # a call that commits several units' parts adds each part's rows
    for start, stop in ((0, 5), (5, 11)):
        one_call.add(to_table(rows[start:stop]).to_pylist())
    assert one_call.metrics() == pytest.approx(output_metrics(to_table(rows)))
    assert merged.metrics()["errors"] == 2 and merged.metrics()["rows"] == 11
    assert MetricTally().metrics()["prefill_ms_per_item"] is None  # nothing written: no mean


def _drawn_figure(summary, tmp_path, monkeypatch, **kwargs):
    import matplotlib.figure

    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real_savefig(fig, *a, **k)))
    cost_quality_plot(summary, tmp_path / "p.png", **kwargs)
    (fig,) = drawn
    return fig


@pytest.mark.parametrize("case", ["none last", "keep ratio 1 only", "none without a keep ratio", "first unpruned without quality"])
def test_the_unpruned_star_is_the_unpruned_configuration_wherever_it_is_in_the_summary(case, tmp_path, monkeypatch):
    """The star marks the configuration with method ``none`` or keep ratio 1, found by either
    test alone, in any position, skipping one without a quality."""
    pruned = [dict(r) for r in SUMMARY[1:]]
    unpruned = {"method": "none", "keep_ratio": 1.0, "quality": 0.9, "flops_reduction": 0.0, "items_per_s": 2.0}
    summary = {
        "none last": pruned + [unpruned],
        "keep ratio 1 only": pruned + [{**unpruned, "method": "entropyprune"}],
        "none without a keep ratio": pruned + [{k: v for k, v in unpruned.items() if k != "keep_ratio"}],
        "first unpruned without quality": [{**unpruned, "quality": None, "flops_reduction": 0.1, "items_per_s": 1.0}, *pruned, unpruned],
    }[case]
    fig = _drawn_figure(summary, tmp_path, monkeypatch)
    assert fig._suptitle is None  # no title given, none drawn
    for panel, x_key, x_label in zip(fig.axes, ("flops_reduction", "items_per_s"),
                                     ("prefill FLOPs reduction (exact LM count)", "throughput (items/s)")):
        (star,) = panel.collections
        assert star.get_offsets().tolist() == [[unpruned[x_key], unpruned["quality"]]]
        assert star.get_label() == "unpruned" and panel.get_xlabel() == x_label
        assert all(line.get_marker() == "o" for line in panel.get_lines())


def test_health_check_speaks_https_sends_a_user_without_password_and_says_why_a_server_is_down():
    import base64

    from pipelines.tracking import _server_reachable

    seen = []
    with _health_server(lambda path, auth: seen.append((path, auth)) or 200) as port:
        assert _server_reachable(f"http://token@127.0.0.1:{port}") is None
        assert seen[-1] == ("/health", "Basic " + base64.b64encode(b"token:").decode())
        assert _server_reachable(f"http://al:p@ss@127.0.0.1:{port}") is None  # an unescaped @ in the password
        assert seen[-1] == ("/health", "Basic " + base64.b64encode(b"al:p@ss").decode())
        answer = _server_reachable(f"https://127.0.0.1:{port}")  # TLS against a plain-HTTP server
        assert answer is not None and "urlopen error" not in answer
    down = _server_reachable("http://127.0.0.1:1")
    assert "refused" in down.lower() and not down.startswith("<urlopen error")


def test_a_tracker_sets_fail_fast_http_defaults_keeps_the_users_uri_and_reopens_its_experiment(tmp_path, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    assert Tracker(tmp_path / "off", "e", enabled=False).failure == "disabled"
    nested = tmp_path / "a" / "b" / "out"  # parents created
    first = Tracker(nested, "again")
    assert first.active and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10" and "MLFLOW_TRACKING_URI" not in os.environ
    assert Tracker(nested, "again").active  # the experiment exists now: found, not created twice
    user = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user)
    assert Tracker(tmp_path / "other", "mine").active and os.environ["MLFLOW_TRACKING_URI"] == user


def test_a_store_that_cannot_be_opened_is_one_line_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    tracker = Tracker(blocker / "out", "e")
    assert not tracker.active
    assert tracker.failure.startswith(f"could not open MLflow store sqlite:///{blocker / 'out'}")
    assert "Errno" in tracker.failure and "None" not in tracker.failure


def test_store_dir_of_an_object_store_uri_never_leaves_the_local_stores(tmp_path, monkeypatch):
    from pipelines.tracking import LOCAL_STORES, store_dir

    monkeypatch.chdir(tmp_path)
    assert store_dir("s3:///bucket/x/") == tmp_path / LOCAL_STORES / "s3" / "bucket" / "x"
