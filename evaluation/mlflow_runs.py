"""The MLflow runs of a sweep: one parent run, one child run per configuration.

Through ``pipelines.tracking.Tracker`` (``MLFLOW_TRACKING_URI``, else SQLite in the output
directory; a tracking failure is one logged line and never stops the job):

* the experiment is tagged a classic ML experiment (``mlflow.experimentKind``);
* the parent run holds the sweep's settings as params, the summary as an MLflow table
  (``summary_table.json``: the printed table's columns, one row per configuration), the first
  output rows of every configuration (``outputs_sample.parquet``) and the given artifacts
  (summary.json, the plot, ...);
* each child run, named ``method@keep_ratio``, holds the configuration's params and metrics
  and its first output rows.

To see the comparison in the MLflow UI, open the runs view in the classic ML mode with the
runs sorted by a metric (which lists every child run flat, not folded under the parent) in
chart mode: ``evaluation.dashboard_screenshot.dashboard_url``.
"""

from __future__ import annotations

import os
import time

from evaluation.report import configuration_name, table_columns

# MLflow's classic-ML experiment kind; the UI of MLflow 3.17 itself follows its global
# "GenAI / Model training" switch (the dashboard URL sets it), earlier 3.x UIs read this tag
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
CHILD_PARAM_KEYS = ("model", "batch_size", "dataset", "n", "seed", "max_new_tokens")
EXTRA_CHILD_METRICS = ("generate_items_per_s", "n_vqa_accuracy", "n_caption_object_f1", "n_video_accuracy")


def log_sweep(output: str, params: dict, summary: list[dict], artifacts: list[str], experiment: str = "sweep") -> str | None:
    """Record a finished sweep (see the module docstring); the tracking URI, or None when
    tracking is off or failed."""
    from pipelines.tracking import Tracker, run_metrics, run_params

    tracker = Tracker(output, experiment)
    tracker.experiment_tag(*EXPERIMENT_KIND)
    with tracker.run(f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}", params):
        for row in summary:
            name = configuration_name(row)
            with tracker.run(name, run_params(row | {k: params.get(k) for k in CHILD_PARAM_KEYS}), nested=True):
                tracker.metrics(run_metrics(row) | {k: row[k] for k in EXTRA_CHILD_METRICS if row.get(k) is not None})
                sample = outputs_sample(row.get("output"), os.path.join(output, "samples", f"{name}.parquet"))
                if sample:
                    tracker.artifact(sample)
        tracker.table(table_columns(summary), "summary_table.json")
        parent_sample = outputs_sample(
            [row.get("output") for row in summary], os.path.join(output, "samples", "outputs_sample.parquet")
        )
        if parent_sample:
            tracker.artifact(parent_sample)
        for path in artifacts:
            if path and os.path.exists(path):
                tracker.artifact(path)
    return tracker.shown_uri if tracker.active else None


def outputs_sample(dirs, path: str, rows_per_dir: int = 20) -> str | None:
    """The first ``rows_per_dir`` output rows of each configuration directory, as one Parquet
    file (an MLflow artifact); None when there is nothing to sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.sink import read_output

    dirs = [dirs] if isinstance(dirs, str) else [d for d in (dirs or []) if d]
    tables = [read_output(d).slice(0, rows_per_dir) for d in dirs if os.path.isdir(d)]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.concat_tables(tables), path)
    return path
