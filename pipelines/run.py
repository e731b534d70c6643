"""The captioning job: sources → CPU decode tasks → model actor pool → Parquet, on Ray Data.

:func:`run_caption` is what ``ep caption`` and ``python -m jobs.caption`` call. The driver
scans the inputs, drops the sample ids already in the output directory, streams the rest
through Ray Data and commits the results in atomic part files as they arrive (see
``pipelines.sink``): a rerun after a crash or a kill processes only what is missing.

Ray starts locally unless ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets)
names a cluster. Model actors ask for one GPU each when the cluster has GPUs, else run on CPU.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa

from pipelines.media import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, decode_row
from pipelines.sink import ParquetSink, check_job, done_ids
from pipelines.sources import scan

DECODED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("media_type", pa.string()),
        ("frames", pa.int32()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("error", pa.string()),
        ("pixels", pa.large_binary()),
        ("shape", pa.list_(pa.int32())),
    ]
)


@dataclass
class CaptionConfig:
    """Everything a captioning job needs; ``ep caption`` flags and YAML keys map 1:1 onto it."""

    model: str
    input: str
    output: str
    method: str = "none"
    budget: float | None = None
    keep_ratio: float | None = None
    prune_layer: int = 2
    seed: int = 0
    prompt: str | None = None
    max_new_tokens: int = 32
    frames: int = 8
    batch_size: int = 8
    workers: int = 1
    address: str | None = None
    num_gpus: float | None = None  # per model actor; None = 1 if the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0  # per model actor (CPU actors also use this many torch threads)
    dtype: str = "auto"
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_S
    flush_rows: int = 256
    flush_seconds: float = 30.0
    num_cpus: int | None = None  # CPUs of a Ray instance started locally (default: all)
    run_id: str | None = None

    def validate(self) -> None:
        from ep_core.config import PruneConfig

        for name in ("model", "input", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        PruneConfig(self.method, self.budget, self.keep_ratio, self.prune_layer, self.seed)
        for name in ("max_new_tokens", "frames", "batch_size", "workers", "max_side", "max_pixels", "flush_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not self.decode_timeout > 0:
            raise ValueError(f"decode-timeout must be > 0 seconds, got {self.decode_timeout!r}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num-gpus must be >= 0, got {self.num_gpus!r}")

    def job_identity(self) -> dict:
        """What the rows of an output directory depend on (a rerun must match it)."""
        keys = ("model", "method", "budget", "keep_ratio", "prune_layer", "seed", "max_new_tokens", "max_side")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Summary:
    rows_total: int = 0  # rows of the input
    rows_before: int = 0  # already in the output when the job started
    rows_new: int = 0  # written by this run
    errors_new: int = 0  # error rows among them
    missing: int = 0  # rows neither written before nor by this run (the job did not finish)
    seconds: float = 0.0
    output: str = ""
    run_id: str = ""
    failure: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.rows_new / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.failure is None

    def line(self) -> str:
        done = self.rows_before + self.rows_new
        state = "done" if self.complete else "INCOMPLETE"
        text = (
            f"ep caption {state}: {done}/{self.rows_total} rows in {self.output} "
            f"({self.rows_new} new, {self.rows_before} already there), {self.errors_new} errors, "
            f"{self.items_per_s:.2f} items/s"
        )
        if not self.complete:
            text += f"; {self.missing} rows missing: run the same command again to finish them"
        return text


def _decode_memory(cfg: CaptionConfig) -> int:
    pixels = cfg.batch_size * max(1, cfg.frames) * cfg.max_side * cfg.max_side * 3
    return int(max(256 << 20, 2 * pixels))


def _decode_batch(batch: pa.Table, *, max_pixels: int, max_side: int, timeout_s: float, faults: bool) -> pa.Table:
    rows = [
        decode_row(r, max_pixels=max_pixels, max_side=max_side, timeout_s=timeout_s, faults=faults)
        for r in batch.to_pylist()
    ]
    return pa.Table.from_pylist([{k: r.get(k) for k in DECODED_SCHEMA.names} for r in rows], schema=DECODED_SCHEMA)


def _test_faults() -> tuple[bool, str | None]:
    """``EP_TEST_FAULTS`` (tests only): ``decoder`` arms the decoder fault switch,
    ``exit_after:N:MARKER`` makes a model worker die once on its N-th batch."""
    spec = os.environ.get("EP_TEST_FAULTS", "")
    parts = [p for p in spec.split(",") if p]
    actor = next((p for p in parts if p.startswith("exit_after:")), None)
    return "decoder" in parts, actor


def _ensure_ray(cfg: CaptionConfig, log) -> bool:
    """Connect to / start Ray; True if this call started it (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"address": address, "log_to_driver": True, "logging_level": "WARNING"}
    if address is None:
        kwargs["address"] = "local"  # a new local instance, never a stale one found on disk
        kwargs["num_cpus"] = cfg.num_cpus
        log("[caption] starting a local Ray instance (use --address or RAY_ADDRESS to join a cluster)")
    else:
        log(f"[caption] joining the Ray cluster at {address}")
    ray.init(**kwargs)
    return True


def run_caption(cfg: CaptionConfig, *, log=None, progress=None) -> Summary:
    """Run (or resume) a captioning job; returns its summary. Bad inputs become error rows.

    ``progress(rows_written, seconds)``, if given, is called on the driver whenever progress
    is printed (the caption job logs it to MLflow as stepped throughput)."""
    log = log or (lambda msg: print(msg, flush=True))
    cfg.validate()
    scanned = scan(cfg.input, prompt=cfg.prompt, frames=cfg.frames)
    from ep_core.loading import model_type_of

    model_type_of(cfg.model)  # a wrong model path fails here, in one line, before Ray starts
    check_job(cfg.output, cfg.job_identity())
    run_id = cfg.run_id or uuid.uuid4().hex[:12]
    before = done_ids(cfg.output)
    todo = [r for r in scanned.rows if r["sample_id"] not in before]
    summary = Summary(
        rows_total=len(scanned.rows),
        rows_before=len(scanned.rows) - len(todo),
        output=cfg.output,
        run_id=run_id,
    )
    notes = []
    if scanned.skipped_files:
        notes.append(f"{scanned.skipped_files} files that are neither images nor videos skipped")
    if scanned.duplicates:
        notes.append(f"{scanned.duplicates} duplicate manifest rows kept once")
    log(
        f"[caption] {len(scanned.rows)} inputs, {summary.rows_before} already in {cfg.output}, "
        f"{len(todo)} to process" + (f" ({'; '.join(notes)})" if notes else "")
    )
    if not todo:
        return summary

    started_ray = _ensure_ray(cfg, log)
    try:
        _stream(cfg, todo, before, run_id, summary, log, progress)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return summary


def _stream(cfg: CaptionConfig, todo: list[dict], before: set[str], run_id: str, summary: Summary, log, progress) -> None:
    import ray

    decoder_faults, actor_fault = _test_faults()
    gpus = cfg.num_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    where = f"{cfg.workers} model worker(s) with {gpus:g} GPU each" if gpus else f"{cfg.workers} model worker(s) on CPU"
    log(f"[caption] {where}, batch size {cfg.batch_size}, method {cfg.method}")

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    n_blocks = max(1, min(len(todo) // cfg.batch_size, 20_000))
    from pipelines.infer import CaptionPredictor

    ds = ray.data.from_items(todo, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        _decode_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={
            "max_pixels": cfg.max_pixels,
            "max_side": cfg.max_side,
            "timeout_s": cfg.decode_timeout,
            "faults": decoder_faults,
        },
        num_cpus=1,
        # What one decode task holds (the decoded pixels of a block). Resource requests that
        # differ from the model stage's also keep Ray Data from fusing decoding into the
        # model actors: decode tasks run on their own CPUs while the actors generate.
        memory=_decode_memory(cfg),
    )
    ds = ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={
            "model": cfg.model,
            "method": cfg.method,
            "budget": cfg.budget,
            "keep_ratio": cfg.keep_ratio,
            "prune_layer": cfg.prune_layer,
            "seed": cfg.seed,
            "max_new_tokens": cfg.max_new_tokens,
            "dtype": cfg.dtype,
            "device": "cuda" if gpus else "cpu",
            "torch_threads": None if gpus else max(1, int(cfg.cpus_per_worker)),
            "run_id": run_id,
            "fault": actor_fault,
        },
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_gpus=gpus,
        num_cpus=cfg.cpus_per_worker,
    )

    sink = ParquetSink(cfg.output, run_id, already_done=before)
    start = time.monotonic()
    last_flush = last_log = start
    buffer: list[pa.Table] = []
    buffered = 0
    first_batch = None  # (seconds until the first results arrived, their rows): start-up cost

    def flush() -> None:
        nonlocal buffer, buffered, last_flush
        if buffer:
            sink.write(pa.concat_tables(buffer))
            buffer, buffered = [], 0
        last_flush = time.monotonic()

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if batch.num_rows == 0:
                continue
            if first_batch is None:
                first_batch = (time.monotonic() - start, batch.num_rows)
            buffer.append(batch)
            buffered += batch.num_rows
            now = time.monotonic()
            if buffered >= cfg.flush_rows or now - last_flush >= cfg.flush_seconds:
                flush()
            if now - last_log >= 10.0 or (buffered == 0 and now - last_log >= 2.0):
                last_log = now
                rate = sink.rows_written / (now - start) if now > start else 0.0
                log(
                    f"[caption] {summary.rows_before + sink.rows_written}/{summary.rows_total} rows written, "
                    f"{sink.errors_written} errors, {rate:.2f} items/s"
                )
                if progress is not None:
                    progress(sink.rows_written, now - start)
        flush()
    except Exception as exc:  # noqa: BLE001 - keep what is done, say how to resume
        flush()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        summary.failure = f"{type(exc).__name__}: {first}"
        log(f"[caption] the job failed ({summary.failure}); rows already written are kept")
    summary.seconds = time.monotonic() - start
    summary.rows_new = sink.rows_written
    summary.errors_new = sink.errors_written
    summary.missing = len(todo) - sink.rows_written
    summary.extra["duplicates_dropped"] = sink.duplicates_dropped
    if first_batch is not None and sink.rows_written > first_batch[1]:
        summary.extra["first_output_s"] = first_batch[0]
        summary.extra["steady_items_per_s"] = (sink.rows_written - first_batch[1]) / (summary.seconds - first_batch[0])


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(CaptionConfig)}
