"""``ep bench scale``: the caption job's data plane alone, at 10 k, 100 k and 1 M rows.

The inputs are generated tiny PNG images (8 × 8) on local disk. ``--input parquet`` (the
default): a Parquet dataset in the Hugging Face ``datasets`` layout (an ``image`` struct with
``bytes``), ``--shard-rows`` rows per shard, planned from the shards' footers. ``--input
manifest``: a CSV manifest of that many rows (an ``id`` column, paths to 64 PNG files, cycled),
planned by streaming it into hash units (``pipelines.listing``): what a folder or a manifest of
millions of files costs the driver. Each size runs ``ep caption``'s own code (scan, Ray Data, decode and preprocess tasks,
the actor pool, the Parquet sink) in a fresh driver process on a local Ray with 2 CPUs, with
one change: **the model stage is a stand-in** (:class:`FixedCaption`) that returns the fixed
caption ``"a stand-in caption"`` for each row without loading a model, so what is measured is
everything around the model. The stand-in reserves no CPU (it does no work), so every core
serves the data plane. The preprocessing stage still runs the demo model's processor, one call
per group of rows sharing a prompt (``pipelines.preprocess.encode_group``): still most of a
row's CPU time (docs/measurements.md, 2026-12-03).

Reported per size: ``rows`` (written), ``driver_peak_rss_mb`` (the driver process's peak
resident memory, ``getrusage``; Ray's own processes are not counted) and ``rows_per_s`` (rows
written / the job's streaming time; the plan and Ray's start are not in it, ``plan_s`` says what
the plan took: the shards' footers, or the manifest streamed, sorted and cut into units). Goals (issue 17): the peak RSS at 1 M rows ≤ 1.5 × its value at 10 k, rows/s not
falling as the input grows, ≥ 2,000 rows/s on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

FIXED_CAPTION = "a stand-in caption"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default="10000,100000,1000000",
                        help="comma-separated input sizes (default 10000,100000,1000000)")
    parser.add_argument("--shard-rows", type=int, default=10_000, help="rows per Parquet shard (default 10000)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per model batch (default 64)")
    parser.add_argument("--input", dest="input_kind", choices=("parquet", "manifest"), default="parquet",
                        help="parquet: shards of image bytes (default); manifest: a CSV of paths to PNG files")


class FixedCaption:
    """The stand-in model stage: the rows of a preprocessed block with a fixed caption, no model.
    Takes (and ignores) :class:`pipelines.infer.CaptionPredictor`'s constructor arguments."""

    def __init__(self, *, model: str, run_id: str, **_ignored):
        self.model, self.run_id = model, run_id

    def __call__(self, batch):
        from pipelines.sink import to_table

        keep = ("sample_id", "source", "media_type", "prompt", "reference", "error")
        rows = batch.select([c for c in keep if c in batch.column_names]).to_pylist()
        for row in rows:
            row.update(model=self.model, run_id=self.run_id, output=None if row.get("error") else FIXED_CAPTION,
                       error_kind="input" if row.get("error") else None)
        return to_table(rows)


def write_dataset(root: str, rows: int, shard_rows: int) -> str:
    """``rows`` tiny PNGs in Parquet shards of ``shard_rows`` under ``root`` (64 distinct images, cycled)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    os.makedirs(root, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for shard, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        column = pa.array([{"bytes": images[(start + i) % 64], "path": None} for i in range(n)], type=image_type)
        pq.write_table(pa.table({"image": column}), os.path.join(root, f"train-{shard:05d}.parquet"), row_group_size=1000)
    return root


def write_manifest(root: str, rows: int) -> str:
    """A CSV manifest of ``rows`` rows under ``root`` (``id`` 0 … rows − 1, ``path`` one of 64
    distinct 8 × 8 PNG files beside it, cycled)."""
    import csv

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:02d}.png"))
    path = os.path.join(root, "manifest.csv")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path"])
        writer.writerows([i, f"{i % 64:02d}.png"] for i in range(rows))
    return path


def _child(inputs: str, output: str, batch_size: int) -> dict:
    """One size in this (fresh) process: the caption job with the stand-in model stage."""
    import resource
    from unittest import mock

    from ep_core.loading import resolve_model_name
    from pipelines.caption import CaptionConfig, CaptionJob
    from pipelines.cluster import ray_session

    # the stand-in does no work, so it reserves no CPU: both cores serve the data plane
    cfg = CaptionConfig(model=resolve_model_name("demo"), input=inputs, output=output, batch_size=batch_size,
                        workers=1, cpus_per_worker=0.0, device="cpu")
    planned = CaptionJob._plan
    plan_s = []

    def timed_plan(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return planned(*args, **kwargs)
        finally:
            plan_s.append(time.perf_counter() - begin)

    start = time.perf_counter()
    with (mock.patch("pipelines.infer.CaptionPredictor", FixedCaption), mock.patch.object(CaptionJob, "_plan", staticmethod(timed_plan)),
          ray_session(num_cpus=2, quiet=True)):
        summary = CaptionJob(cfg).run(quiet=True)
    total_s = time.perf_counter() - start
    return {
        "rows": summary.rows_new,
        "plan_s": round(sum(plan_s), 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows_per_s": round(summary.rows_new / summary.seconds, 1) if summary.seconds else 0.0,
        "job_s": round(total_s, 1),
        "complete": summary.complete,
    }


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = [int(s) for s in str(getattr(args, "rows", "10000,100000,1000000")).split(",") if s.strip()]
    shard_rows = getattr(args, "shard_rows", 10_000)
    batch_size = getattr(args, "batch_size", 64)
    kind = getattr(args, "input_kind", "parquet")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    with tempfile.TemporaryDirectory(prefix="ep-bench-scale-") as tmp:
        for rows in sizes:
            log.info(f"[bench scale] {rows} rows: writing the {kind} input, then the job in a fresh driver")
            inputs = (write_dataset(os.path.join(tmp, f"in-{rows}"), rows, shard_rows) if kind == "parquet"
                      else write_manifest(os.path.join(tmp, f"in-{rows}"), rows))
            code = ("import json, sys; from bench.scale import _child; "
                    f"print('EP_SCALE ' + json.dumps(_child({inputs!r}, {os.path.join(tmp, f'out-{rows}')!r}, {batch_size})))")
            env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
            done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("EP_SCALE ")), None)
            if line is None:
                raise RuntimeError(f"the {rows}-row run failed: {done.stderr.strip().splitlines()[-1:]}")
            results.append(json.loads(line[len("EP_SCALE "):]))
            log.info(f"[bench scale] {rows} rows: {results[-1]['rows_per_s']} rows/s, "
                     f"driver peak RSS {results[-1]['driver_peak_rss_mb']} MB")
    first, last = results[0], results[-1]
    return {
        "stand_in": f"model stage replaced by a fixed caption ({FIXED_CAPTION!r})",
        "input": kind,
        "shard_rows": shard_rows if kind == "parquet" else None,
        "batch_size": batch_size,
        "results": results,
        "rss_growth": round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"], 3),
    }
