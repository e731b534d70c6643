"""MLflow tracking, from the driver only: workers return figures, they never open a run.

- Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<output>/_mlflow.db`` (the
  file store is deprecated in MLflow 3), whose artifacts go to ``<output>/_mlartifacts``; for
  an object-store output, in ``./_ep_mlflow/<scheme>/<bucket>/<prefix>/`` instead (:func:`store_dir`). The
  leading ``_`` keeps them out of what Parquet readers (pyarrow, Spark, DuckDB) read when
  given the output directory; an output that already holds a ``mlflow.db`` keeps using it.
- One experiment per job name; ``ep caption`` records one run, ``ep sweep`` one parent run
  with one child run per (method, keep ratio or budget).
- Tracking never costs work: if the store or server cannot be reached, or a call fails half
  way, :class:`Tracker` logs one clear warning, switches itself off and the job goes on writing
  its Parquet output.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PARAM_KEYS = (
    "model", "method", "budget", "keep_ratio", "prune_layer", "batch_size", "dataset", "n", "seed", "max_new_tokens",
)
METRIC_KEYS = (
    "items_per_s", "prefill_ms_per_item", "visual_tokens_kept_mean", "flops_reduction", "flops_reduction_paper",
    "kv_cache_bytes_mean", "errors", "quality", "vqa_accuracy", "caption_object_f1", "video_accuracy", "accuracy",
    "caption_token_f1", "agreement_with_full", "first_token_kl",
)


STORE_FILE = "_mlflow.db"  # the default store in an output directory
ARTIFACTS_DIR = "_mlartifacts"
_OLD_STORE_FILE = "mlflow.db"  # its name before 2026-12: still used where it exists


LOCAL_STORES = "_ep_mlflow"  # under the working directory: default stores of object-store outputs


def store_dir(output_dir: str | os.PathLike) -> Path:
    """The local folder of ``output_dir``'s default store: the output directory itself, or for an
    object-store output (SQLite cannot live there) ``./_ep_mlflow/<scheme>/<bucket>/<prefix>``."""
    from pipelines import storage

    text = os.fspath(output_dir)
    if storage.is_uri(text):
        scheme, rest = text.split("://", 1)
        return Path.cwd() / LOCAL_STORES / scheme / rest.strip("/")
    return Path(storage.local(text)).resolve()


def default_store(output_dir: str | os.PathLike) -> Path:
    """The SQLite file of the default store of ``output_dir``."""
    old = store_dir(output_dir) / _OLD_STORE_FILE
    return old if old.exists() else store_dir(output_dir) / STORE_FILE


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store beside the job's outputs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{default_store(output_dir)}"


def redact(uri: str) -> str:
    """``uri`` fit to print: a password or token in its user info becomes ``***`` and its query
    string (where tokens travel) is dropped. ``http://alice:pw@host/x?t=1`` → ``http://alice:***@host/x?***``."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _server_reachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """None if an http(s) tracking server answers ``/health``, else why not. Basic-auth user
    info in the URI (``http://user:password@host``) is sent as an Authorization header, as
    MLflow's own client does."""
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(url)
    if parts.username is not None:
        import base64

        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return redact_text(str(getattr(exc, "reason", exc)), uri)


def redact_text(text: str, uri: str) -> str:
    """``text`` with every appearance of ``uri``'s secrets replaced by :func:`redact`'s form."""
    parts = urllib.parse.urlsplit(uri)
    text = text.replace(uri, redact(uri))
    for secret in (parts.password, parts.query):
        if secret:
            text = text.replace(secret, "***")
    return text


def _clean(values: dict, keys: tuple[str, ...]) -> dict:
    """Known keys with a usable value (numbers finite); None and NaN are left out."""
    out = {}
    for key in keys:
        value = values.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        out[key] = value
    return out


class Tracker:
    """Failure-tolerant MLflow logging for one job. Use ``enabled=False`` to switch it off."""

    def __init__(self, output_dir: str | os.PathLike, experiment: str, *, enabled: bool = True):
        self.uri = tracking_uri(output_dir)
        self.experiment = experiment
        self.failure: str | None = None
        self.run_ids: list[str] = []
        self._mlflow = None
        if not enabled:
            self.failure = "disabled"
            return
        # fail fast when a tracking server goes down mid-job instead of retrying for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        problem = _server_reachable(self.uri)
        if problem is not None:
            self._fail(f"tracking server {redact(self.uri)} is unreachable ({problem})")
            return
        try:
            import mlflow

            store_dir(output_dir).mkdir(parents=True, exist_ok=True)
            user_uri = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(self.uri)
            # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that, or the next job in
            # this process would log into this job's store instead of its own default
            if user_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
                if mlflow.get_experiment_by_name(experiment) is None:
                    # the default store keeps its artifacts beside it, not in ./mlruns of the cwd
                    artifacts = (store_dir(output_dir) / ARTIFACTS_DIR).as_uri()
                    mlflow.create_experiment(experiment, artifact_location=artifacts)
            mlflow.set_experiment(experiment)
            self._mlflow = mlflow
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the job
            self._fail(f"could not open MLflow store {redact(self.uri)}: {redact_text(str(exc), self.uri)}")

    @property
    def current_run_id(self) -> str | None:
        """The id of the run most recently started, while tracking works."""
        return self.run_ids[-1] if self.active and self.run_ids else None

    @property
    def active(self) -> bool:
        return self._mlflow is not None and self.failure is None

    @property
    def shown_uri(self) -> str:
        """The tracking URI fit to print (:func:`redact`)."""
        return redact(self.uri)

    def _fail(self, why: str) -> None:
        why = redact_text(why, self.uri)
        self.failure = why
        self._mlflow = None
        log.warning(f"MLflow tracking failed: {why}. Outputs are still written; nothing else is lost.")

    @contextmanager
    def run(self, name: str, params: dict | None = None, *, nested: bool = False) -> Iterator["Tracker"]:
        """A run (child of the active one when ``nested``); yields this tracker."""
        if not self.active:
            yield self
            return
        mlflow = self._mlflow  # kept: a failure inside the run switches tracking off, the run must still end
        try:
            active = mlflow.start_run(run_name=name, nested=nested)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"could not start run {name!r}: {exc}")
            yield self
            return
        self.run_ids.append(active.info.run_id)
        status = "FINISHED"
        try:
            if params:
                self.params(params)
            yield self
        except KeyboardInterrupt:  # SIGINT, or SIGTERM as jobs.cli turns it into one
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            try:
                mlflow.end_run(status=status)  # even after a failure: no run is left active in this process
            except Exception as exc:  # noqa: BLE001
                if self.active:
                    self._fail(f"could not end run {name!r}: {exc}")

    def mark_killed(self, run_id: str) -> bool:
        """End the run ``run_id`` of a job that was killed (still RUNNING in the store) as
        KILLED; True if it was marked. A failure only logs its one line."""
        if not self.active:
            return False
        try:
            client = self._mlflow.tracking.MlflowClient()
            if client.get_run(run_id).info.status != "RUNNING":
                return False
            client.set_terminated(run_id, status="KILLED")
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the job
            log.warning(f"MLflow: could not mark the killed job's run {run_id}: {redact_text(str(exc), self.uri)}")
            return False
        log.info(f"MLflow: run {run_id} of the job that was killed in this output is marked KILLED")
        return True

    def params(self, values: dict) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            self._call("log_params", values)

    def metrics(self, values: dict, step: int | None = None) -> None:
        """Log the known metrics of ``values`` (see ``METRIC_KEYS``) plus any extra numbers."""
        numbers = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if numbers:
            self._call("log_metrics", numbers, step=step)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path)

    def table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table artifact of the active run (``mlflow.log_table``), shown as a table in the UI."""
        self._call("log_table", data=columns, artifact_file=artifact_file)

    def experiment_tag(self, key: str, value: str) -> None:
        self._call("set_experiment_tag", key, value)

    def _call(self, name: str, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            getattr(self._mlflow, name)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"{name} failed: {exc}")


def run_params(values: dict) -> dict:
    """The documented params of one configuration (docs/design.md §3), None left out."""
    return _clean(values, PARAM_KEYS)


def run_metrics(values: dict) -> dict:
    """The documented metrics of one configuration, None/NaN left out."""
    return _clean(values, METRIC_KEYS)


MEANS = {  # metric: the output column it is the mean of, over the rows that produced an output
    "prefill_ms_per_item": "prefill_ms",
    "visual_tokens_mean": "visual_tokens",
    "visual_tokens_kept_mean": "visual_tokens_kept",
    "flops_reduction": "flops_reduction",
    "flops_reduction_paper": "flops_reduction_paper",
    "kv_cache_bytes_mean": "kv_cache_bytes",
}


class MetricTally:
    """:func:`output_metrics` added up batch by batch, so that the driver holds a few numbers,
    never the rows (each model worker sends the :meth:`state` of what it wrote):

        rows, errors = Σ rows, Σ rows with an error;   mean(c) = Σ c / #(rows without error, c set)

    and the generate-call figures of the rows without error (``pipelines.packing.CallTally``)."""

    STATE = (("metric_rows", "metric_errors") + tuple(f"metric_sum_{c}" for c in MEANS.values())
             + tuple(f"metric_n_{c}" for c in MEANS.values()))

    def __init__(self) -> None:
        from pipelines.packing import CallTally

        self.sums = dict.fromkeys(self.STATE, 0.0)
        self.calls = CallTally()

    def add(self, rows: list[dict]) -> "MetricTally":
        ok = [r for r in rows if r.get("error") is None]
        self.sums["metric_rows"] += len(rows)
        self.sums["metric_errors"] += len(rows) - len(ok)
        for column in MEANS.values():
            values = [r[column] for r in ok if r.get(column) is not None]
            self.sums[f"metric_sum_{column}"] += sum(values)
            self.sums[f"metric_n_{column}"] += len(values)
        self.calls.add(ok)
        return self

    def state(self) -> dict:
        """The sums (:data:`STATE`) and the call tally's state with ``ok_`` before each name."""
        return {**self.sums, **{f"ok_{k}": v for k, v in self.calls.state().items()}}

    def merge(self, state: dict) -> "MetricTally":
        for key in self.STATE:
            self.sums[key] += state[key]
        self.calls.merge({k[len("ok_"):]: v for k, v in state.items() if k.startswith("ok_")})
        return self

    def metrics(self) -> dict:
        """The figures :func:`output_metrics` gives, from the sums."""
        s = self.sums
        calls = self.calls.figures()
        return {
            "rows": int(s["metric_rows"]),
            "errors": int(s["metric_errors"]),
            **{name: s[f"metric_sum_{c}"] / s[f"metric_n_{c}"] if s[f"metric_n_{c}"] else None for name, c in MEANS.items()},
            "rows_per_generate": calls.get("rows_per_generate"),
            "padding_share": calls.get("padding_share"),
        }


def output_metrics(table) -> dict:
    """Cost metrics of one configuration from its output rows (a pyarrow table).

    ``prefill_ms_per_item``, ``visual_tokens_kept_mean``, ``flops_reduction`` (exact LM count),
    ``flops_reduction_paper`` and ``kv_cache_bytes_mean`` are means over the rows that produced
    an output (:data:`MEANS`); ``errors`` counts the rows with an error; ``rows_per_generate`` and
    ``padding_share`` describe their generate calls (``pipelines.packing.CallTally``). The same
    figures, added up call by call: :class:`MetricTally`.
    """
    return MetricTally().add(table.to_pylist()).metrics()


def cost_quality_plot(summary: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Quality against FLOPs reduction and against items/s, one line per method.

    ``summary`` holds one dict per configuration with ``method``, ``quality``,
    ``flops_reduction`` and ``items_per_s``; the unpruned configuration (method ``none`` or
    keep ratio 1) is drawn as a star on both panels. Lines marked ``no mutate`` only style the
    figure; tests/test_tracking.py pins what is drawn (each line's points, the star).
    """
    import matplotlib

    matplotlib.use("Agg")  # pragma: no mutate
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))  # pragma: no mutate
    methods = sorted({row["method"] for row in summary if row["method"] != "none"})
    unpruned = [row for row in summary if row["method"] == "none" or row.get("keep_ratio") == 1.0]
    for ax, x_key, x_label in (
        (axes[0], "flops_reduction", "prefill FLOPs reduction (exact LM count)"),
        (axes[1], "items_per_s", "throughput (items/s)"),
    ):
        for method in methods:
            rows = [r for r in summary if r["method"] == method and r.get("quality") is not None and r.get(x_key) is not None]
            rows.sort(key=lambda r: r[x_key])
            if rows:
                ax.plot([r[x_key] for r in rows], [r["quality"] for r in rows], marker="o", label=method)
        base = [r for r in unpruned if r.get("quality") is not None and r.get(x_key) is not None]
        if base:
            ax.scatter([base[0][x_key]], [base[0]["quality"]], marker="*", s=220, color="black", zorder=5, label="unpruned")
        ax.set_xlabel(x_label)  # pragma: no mutate
        ax.set_ylabel("quality")  # pragma: no mutate
        ax.grid(alpha=0.3)  # pragma: no mutate
    axes[0].legend(loc="best", fontsize=8)  # pragma: no mutate
    if title:
        fig.suptitle(title)  # pragma: no mutate
    fig.tight_layout()  # pragma: no mutate
    path.parent.mkdir(parents=True, exist_ok=True)  # pragma: no mutate
    fig.savefig(path, dpi=110)  # pragma: no mutate
    plt.close(fig)  # pragma: no mutate
    return path
