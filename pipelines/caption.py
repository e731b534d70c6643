"""The captioning job: sources → CPU tasks (decode, preprocess) → model actor pool →
Parquet, on Ray Data.

:class:`CaptionJob` is what ``ep caption`` runs. Constructing it is the preflight: the input
exists, and the model's config alone (no weights, no Ray) says that the family supports the
method and the prune layer fits the decoder. :meth:`CaptionJob.run` then plans work units
(``pipelines.units``: a shard's row groups or tars from their metadata, a folder's or a
manifest's rows by the hash of their ids, ``pipelines.listing``), leaves out the units the
output holds whole, streams the rest through Ray Data, and the model workers commit atomic part
files as they go (``pipelines.sink``): a rerun after a crash or a kill processes only what is
missing, each unit's worker reading only the parts that may hold its rows.
:meth:`CaptionJob.run_tracked` does the same inside one MLflow run.

Ray is joined or started by ``pipelines.cluster.ray_session``. Model actors ask for one GPU
each when the cluster has GPUs (waiting up to ``wait_for_gpus`` seconds for GPU workers to
join), else run on CPU, which a model over :data:`CPU_PARAMETER_LIMIT` parameters does only
with ``device="cpu"``. Error rows are ``input`` (kept) or ``transient`` (a rerun's unit worker
drops them and processes them again: ``pipelines.sink.committed``); a device fault restarts the model
actor (``pipelines.failures``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

from ep_core.config import PruneConfig
from ep_core.loading import ATTENTION_BACKENDS, DTYPES, flash_attention_available
from pipelines import storage
from pipelines.cluster import check_reachable, ray_session
from pipelines.failures import AttemptLedger
from pipelines.media import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from pipelines.packing import CallTally
from pipelines.preprocess import prepare_block
from pipelines.listing import plan_listing, remove_listings
from pipelines.sink import (OutputWriteError, PartWriter, write_error, annotate_lock, check_job, output_lock,
                            parts_by_unit, remove_stale_temporaries)
from pipelines.sources import EntryStream, resolve_format
from pipelines.tracking import MetricTally
from pipelines.units import SHARD_FORMATS, UnitTally, expand_units, plan_shards

log = logging.getLogger(__name__)
PACK_WINDOW = 4  # a model actor packs generate calls from batch_size × PACK_WINDOW rows at a time
CPU_PARAMETER_LIMIT = 1_000_000_000  # decoder weights above which a model runs on CPU only with device="cpu"
CLUSTER_GPU_WAIT_S = 300.0  # default wait for GPU workers to join, on a cluster address
DEVICES = ("auto", "cuda", "cpu")
SAMPLE_ID_SCHEME = 2  # 2: a folder input's files keyed by their path relative to the folder


@dataclass
class CaptionConfig:
    """Everything a captioning job needs. ``ep caption`` flags and YAML keys map onto it; the
    pruning flags (method, budget, keep ratio, prune layer, seed) travel as one
    :class:`~ep_core.config.PruneConfig` in ``prune``. Values are checked on construction."""

    model: str
    input: str
    output: str
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(method="none"))
    prompt: str | None = None
    max_new_tokens: int = 32
    frames: int | None = None  # per video; None: what fits the model's context (ep_core.families.default_frames)
    batch_size: int = 8  # rows per generate call, at most
    batch_tokens: int | None = None  # prompt tokens per generate call (None: from the device's free memory)
    workers: int = 1
    address: str | None = None
    num_gpus: float | None = None  # per model actor; None = 1 if the cluster has GPUs, else 0
    device: str = "auto"  # auto: GPUs when the cluster has them; cuda: GPUs or an error; cpu: CPU, whatever the model
    wait_for_gpus: float | None = None  # seconds to wait for GPU workers; None: 300 on a cluster address, 0 locally
    cpus_per_worker: float = 1.0  # per model actor (CPU actors also use this many torch threads)
    dtype: str = "auto"
    attn_implementation: str | None = None  # sdpa, eager, flash_attention_2; None: flash on a GPU when installed, else sdpa
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_S
    flush_rows: int | None = None  # rows per model-actor call, so per part file at most; None: PACK_WINDOW × batch_size
    num_cpus: int | None = None  # CPUs of a Ray instance started locally (default: all)
    follow_symlinks_outside: bool = False  # a folder input's file symlinks that leave it: error rows unless True
    input_format: str = "auto"  # folder, manifest, parquet (rows of image bytes), webdataset; auto: detected
    image_column: str = "image"  # the columns of a Parquet dataset (pipelines.shards.ShardColumns)
    video_column: str = "video"
    prompt_column: str = "prompt"
    reference_column: str = "reference"
    id_column: str = "id"
    run_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if not isinstance(self.prune, PruneConfig):
            raise TypeError(f"prune must be a PruneConfig, got {type(self.prune).__name__}")
        for name in ("max_new_tokens", "frames", "batch_size", "workers", "max_side", "max_pixels", "flush_rows"):
            value = getattr(self, name)
            if name in ("frames", "flush_rows") and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.batch_tokens is not None and (isinstance(self.batch_tokens, bool) or not isinstance(self.batch_tokens, int) or self.batch_tokens < 1):
            raise ValueError(f"batch-tokens must be an integer >= 1, got {self.batch_tokens!r}")
        if self.dtype not in DTYPES:  # the loader's list: checked here before any work
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in (None, *ATTENTION_BACKENDS):
            raise ValueError(f"attn-implementation must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attn_implementation!r}")
        if not self.decode_timeout > 0:
            raise ValueError(f"decode-timeout must be > 0 seconds, got {self.decode_timeout!r}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num-gpus must be >= 0, got {self.num_gpus!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cpu" and self.num_gpus:
            raise ValueError(f"--device cpu with --num-gpus {self.num_gpus:g}: drop one of them")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("--device cuda with --num-gpus 0: give the model workers a GPU share above 0")
        if self.wait_for_gpus is not None and not self.wait_for_gpus >= 0:
            raise ValueError(f"wait-for-gpus must be >= 0 seconds, got {self.wait_for_gpus!r}")

    def shard_columns(self):
        """The Parquet dataset columns to read (``--image-column`` …)."""
        from pipelines.shards import ShardColumns

        return ShardColumns(image=self.image_column, video=self.video_column, prompt=self.prompt_column,
                            reference=self.reference_column, id=self.id_column)

    def job_identity(self) -> dict:
        """What the rows of an output directory depend on (a rerun must match it): every setting
        that changes an output, and the scheme of the sample ids (2: a folder's files by their
        path relative to the folder)."""
        return {"model": self.model, **self.prune.to_dict(), "max_new_tokens": self.max_new_tokens,
                "max_side": self.max_side, "dtype": self.dtype, "attn_implementation": self.attn_implementation,
                "prompt": self.prompt, "frames": self.frames, "sample_ids": SAMPLE_ID_SCHEME}

    def run_params(self) -> dict:
        """The MLflow params of a caption run (docs/design.md §3)."""
        return {"model": self.model, **self.prune.to_dict(), "batch_size": self.batch_size,
                "batch_tokens": self.batch_tokens, "dataset": self.input, "max_new_tokens": self.max_new_tokens,
                "dtype": self.dtype, "attn_implementation": self.attn_implementation}


@dataclass
class Summary:
    rows_total: int = 0  # rows of the input
    rows_before: int = 0  # already in the output when the job started
    rows_new: int = 0  # written by this run
    errors_new: int = 0  # error rows among them
    transient_new: int = 0  # transient error rows among those (a rerun retries them)
    transient_retried: int = 0  # transient error rows of earlier runs dropped to be processed again
    missing: int = 0  # rows neither written before nor by this run (the job did not finish)
    seconds: float = 0.0
    output: str = ""
    run_id: str = ""
    failure: str | None = None
    metrics: dict = field(default_factory=dict)  # pipelines.tracking.output_metrics of the rows this run wrote
    extra: dict = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.rows_new / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        """Every input has its row (outputs and error rows of either kind)."""
        return self.missing == 0 and self.failure is None

    @property
    def final(self) -> bool:
        """Complete, and no row waits for a rerun (no transient error rows from this run)."""
        return self.complete and self.transient_new == 0

    def line(self) -> str:
        done = self.rows_before + self.rows_new
        state = "done" if self.complete else "INCOMPLETE"
        errors = f"{self.errors_new} errors"
        if self.transient_new:
            errors += f" ({self.errors_new - self.transient_new} input, {self.transient_new} transient)"
        retried = f", {self.transient_retried} transient errors retried" if self.transient_retried else ""
        text = (
            f"ep caption {state}: {done}/{self.rows_total} rows in {self.output} "
            f"({self.rows_new} new, {self.rows_before} already there{retried}), {errors}, "
            f"{self.items_per_s:.2f} items/s"
        )
        if self.extra.get("rows_per_generate"):
            text += (f", {self.extra['rows_per_generate']:.2f} rows per generate call "
                     f"({100 * self.extra['padding_share']:.1f}% padding)")
        if self.extra.get("oom_split_rows"):
            text += f"; {self.extra['oom_split_rows']} rows ran in calls split after running out of memory"
        if self.extra.get("batch_repeats"):
            text += f"; {self.extra['batch_repeats']} batches ran again after their model worker ended"
        if not self.complete:
            text += f"; {self.missing} rows missing: run the same command again to finish them"
        elif self.transient_new:
            text += "; run the same command again to retry the transient errors"
        return text


CPU_STAGE_BASE_BYTES = 512 << 20  # a CPU-stage worker before any block: Python, torch, transformers, the processor


def _cpu_stage_memory(cfg: CaptionConfig, rows_per_block: int, any_video: bool) -> int:
    """Bytes one CPU-stage task (decode + preprocess) holds: the worker's base, plus per image
    (``frames`` images per row when the block may hold videos) its decoded pixels twice
    (decoded + Arrow copy), 2·max_side²·3, and its float32 pixel tensors, crops·3·S²·4 (S the
    vision tower's image size; 5 crops for anyres families, else 1)."""
    from ep_core.families import default_crops
    from ep_core.loading import load_model_config

    config = load_model_config(cfg.model)
    side = int(getattr(getattr(config, "vision_config", None), "image_size", 336) or 336)
    crops = default_crops(config)
    images = rows_per_block * (max(1, cfg.frames) if any_video else 1)
    return CPU_STAGE_BASE_BYTES + images * (2 * cfg.max_side * cfg.max_side * 3 + crops * 3 * side * side * 4)


MIN_FREE_BYTES = 64 << 20  # free space an output needs to start: part files, the MLflow store, the job files


def _check_writable(output: str) -> None:
    """Refuse an output directory that cannot be created or written (checked on the nearest
    existing ancestor), or whose file system has less than :data:`MIN_FREE_BYTES` free, before
    any work. An object-store output: a probe object put and deleted (``storage.check_writable``)."""
    import shutil

    if storage.is_uri(output):
        storage.check_writable(output)
        return
    path = os.path.abspath(output)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output {output} cannot be written ({path} is not a writable directory); choose another --output")
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise ValueError(f"output {output}: only {free >> 20} MiB free on its file system ({path}); "
                         f"ep caption needs at least {MIN_FREE_BYTES >> 20} MiB: free some space or choose another --output")


class CaptionJob:
    """One captioning job. Constructing it is the preflight: everything the config and the
    model's config.json can tell (no weights, no Ray) is checked here, so that a usage error
    costs seconds and one line. :meth:`run` then streams the inputs through Ray Data."""

    def __init__(self, cfg: CaptionConfig):
        from ep_core.families import check_supported, default_frames
        from ep_core.loading import load_model_config

        if not storage.exists(cfg.input):
            raise FileNotFoundError(f"input not found: {cfg.input}")
        _check_writable(cfg.output)
        check_reachable(cfg.address or os.environ.get("RAY_ADDRESS"))  # seconds, not Ray's minutes of retries
        model_config = load_model_config(cfg.model)
        check_supported(model_config, cfg.prune)  # family, method and prune layer
        if cfg.attn_implementation == "flash_attention_2" and not flash_attention_available():
            raise ValueError(
                "--attn-implementation flash_attention_2 needs the flash-attn package on every GPU node "
                "(pip install flash-attn --no-build-isolation), or use sdpa"
            )
        if cfg.frames is None:
            cfg.frames = default_frames(model_config, cfg.max_new_tokens)
            log.debug(f"[caption] {cfg.frames} frames per video (what fits the model's context; --frames to change)")
        self.cfg = cfg

    def run(self, *, progress=None, quiet: bool = False) -> Summary:
        """Run (or resume) the job; returns its summary. Bad inputs become error rows.

        ``progress(rows_written, seconds)``, if given, is called on the driver whenever progress
        is reported (the caption job logs it to MLflow as stepped throughput). ``quiet`` logs
        the progress lines at DEBUG instead of INFO (the sweep runs many jobs)."""
        cfg = self.cfg
        say = log.debug if quiet else log.info
        input_format = resolve_format(cfg.input, cfg.input_format, cfg.shard_columns())
        stream = None  # a folder or a manifest: its entries, streamed into hash units (pipelines.listing)
        if input_format not in SHARD_FORMATS:
            stream = EntryStream(cfg.input, input_format, follow_symlinks_outside=cfg.follow_symlinks_outside)
        with output_lock(cfg.output):  # one writer per output directory
            return self._run_locked(cfg, input_format, stream, say, progress, quiet)

    def _run_locked(self, cfg: CaptionConfig, input_format: str, stream, say, progress, quiet: bool) -> Summary:
        identity = cfg.job_identity()
        if stream is None:
            identity["parts"] = "per-shard"  # part files named by their input shard (pipelines.units)
        check_job(cfg.output, identity)
        run_id = cfg.run_id or uuid.uuid4().hex[:12]
        remove_stale_temporaries(cfg.output)  # a crashed run's unfinished files: before any worker writes
        try:
            plan = self._plan(cfg, input_format, stream, run_id, say)
            summary = Summary(rows_total=plan.rows_known, rows_before=plan.rows_before, output=cfg.output, run_id=run_id)
            if plan.units:
                with ray_session(cfg.address, cfg.num_cpus, quiet=quiet):
                    _stream(cfg, plan, run_id, summary, say, progress)
        finally:
            if stream is not None:
                remove_listings(cfg.output)  # the listing served this run only
        return summary

    @staticmethod
    def _plan(cfg: CaptionConfig, input_format: str, stream, run_id: str, say):
        """The work units (``pipelines.units``), from the shards' metadata or from the folder's or
        manifest's streamed listing, less those the output holds whole; one line says what it found."""
        parts = parts_by_unit(cfg.output)
        if stream is None:
            plan = plan_shards(cfg.input, input_format, cfg.shard_columns(), parts, cfg.output)
            what = "Parquet row groups" if input_format == "parquet" else "tar shards"
        else:
            plan = plan_listing(stream, prompt=cfg.prompt, frames=cfg.frames, output=cfg.output, run_id=run_id,
                                batch_size=cfg.batch_size, parts=parts, say=say)
            what = "rows grouped by the hash of their ids"
        notes = []
        if plan.skipped_files:
            notes.append(f"{plan.skipped_files} files skipped (hidden, or neither images nor videos)")
        if plan.duplicates:
            notes.append(f"{plan.duplicates} repeated rows kept once")
        partly = plan.units_with_parts - plan.units_done
        total = plan.rows_total
        inputs = f"{total} inputs in " if total is not None else ""
        say(f"[caption] {inputs}{len(plan.units) + plan.units_done} units ({what})"
            + (f"; {plan.units_done} done already ({plan.rows_before} rows in {cfg.output})" if plan.units_done else "")
            + (f"; {partly} have rows in {cfg.output} already (their workers skip those)" if partly else "")
            + (f" ({'; '.join(notes)})" if notes else ""))
        if not plan.units:
            say("[caption] nothing to do: " + (f"every input is in {cfg.output} already" if plan.rows_known
                                               else f"{cfg.input} holds nothing to caption"))
        return plan

    def run_tracked(self, *, experiment: str = "caption", tracking: bool = True):
        """:meth:`run` inside one MLflow run (``pipelines.tracking``: params from the config,
        stepped items/s while it runs, then the cost metrics of the rows this run wrote).
        Returns ``(summary, tracker)``; a tracking failure never stops the job."""
        cfg = self.cfg
        with output_lock(cfg.output) as stale:  # before the MLflow store beside the outputs is opened
            return self._run_tracked_locked(experiment, tracking, stale)

    def _run_tracked_locked(self, experiment: str, tracking: bool, stale: dict | None = None):
        from pipelines.tracking import Tracker

        cfg = self.cfg
        tracker = Tracker(cfg.output, experiment, enabled=tracking)
        if stale and stale.get("mlflow_run") and stale.get("mlflow_uri") == tracker.shown_uri:
            tracker.mark_killed(stale["mlflow_run"])  # the job before this one was killed: say so in its run
        with tracker.run(f"caption-{cfg.prune.method}", cfg.run_params()):
            cfg.run_id = cfg.run_id or tracker.current_run_id  # output rows point at their MLflow run
            if tracker.current_run_id:
                annotate_lock(cfg.output, mlflow_run=tracker.current_run_id, mlflow_uri=tracker.shown_uri)
            summary = self.run(progress=lambda rows, seconds: tracker.metrics({"items_per_s": rows / seconds}, step=rows))
            if tracker.active:  # the metrics of the rows this run wrote, added up from the workers' figures
                tracker.metrics(summary.metrics | {"items_per_s": summary.items_per_s,
                                                   "rows_total": summary.rows_total, "rows_new": summary.rows_new})
        return summary, tracker


def run_caption(cfg: CaptionConfig, *, progress=None, quiet: bool = False) -> Summary:
    """``CaptionJob(cfg).run(...)``: preflight, then run (or resume) the job."""
    return CaptionJob(cfg).run(progress=progress, quiet=quiet)


def _gpus_per_worker(cfg: CaptionConfig, say) -> float:
    """GPUs per model actor: 0 with ``device="cpu"``; ``num_gpus`` when given, once the cluster has
    that many; else 1 once it has any, waiting up to ``wait_for_gpus`` seconds for GPU workers
    to join (asking an autoscaler for them meanwhile). Without them: an error when ``num_gpus``
    was given or ``device="cuda"``, or for a model over :data:`CPU_PARAMETER_LIMIT` parameters,
    unless ``device="cpu"``."""
    import ray

    if cfg.device == "cpu" or cfg.num_gpus == 0:
        return 0.0
    need = cfg.num_gpus or 0.0  # GPUs one model worker asks for (any at all when not given)

    def enough() -> bool:
        have = ray.cluster_resources().get("GPU", 0)
        return have >= need and have > 0

    wait = cfg.wait_for_gpus if cfg.wait_for_gpus is not None else (CLUSTER_GPU_WAIT_S if _joins_cluster(cfg) else 0.0)
    deadline = time.monotonic() + wait
    if not enough() and wait > 0:
        say(f"[caption] waiting up to {wait:g} s for GPU workers to join the cluster (--wait-for-gpus)")
        _request_gpus(cfg.workers)
        while not enough() and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        _request_gpus(0)
    if enough():
        return float(cfg.num_gpus) if cfg.num_gpus is not None else 1.0
    waited = f" after waiting {wait:g} s" if wait else ""
    if cfg.num_gpus is not None:  # asked for explicitly: a model worker would wait for it forever
        have = ray.cluster_resources().get("GPU", 0)
        raise ValueError(f"--num-gpus {cfg.num_gpus:g} per model worker, but the Ray cluster has {have:g} GPUs{waited}; "
                         "start GPU workers, lower --num-gpus, or use --device cpu")
    if cfg.device == "cuda":
        raise ValueError(f"--device cuda but the Ray cluster has no GPU{waited}; start GPU workers or raise --wait-for-gpus")
    from ep_core.flops import decoder_parameters
    from ep_core.loading import load_model_config

    params = decoder_parameters(load_model_config(cfg.model))
    if params > CPU_PARAMETER_LIMIT:
        raise ValueError(
            f"the Ray cluster has no GPU{waited} and {cfg.model} has {params / 1e9:.1f} B parameters, too many to caption on "
            "CPU; start GPU workers (or raise --wait-for-gpus for them to join), or pass --device cpu to run on CPU anyway"
        )
    return 0.0


def _joins_cluster(cfg: CaptionConfig) -> bool:
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def _request_gpus(workers: int) -> None:
    """Ask a Ray autoscaler for ``workers`` GPUs (0: withdraw the request); nothing without one."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": 1}] * workers)
    except Exception:  # noqa: BLE001 - no autoscaler (a local or fixed cluster): just wait
        log.debug("[caption] no autoscaler to ask for GPUs", exc_info=True)


def _stream(cfg: CaptionConfig, plan, run_id: str, summary: Summary, say, progress) -> None:
    """Stream the plan's units through the stages: expand (a unit → its rows still to do,
    ``pipelines.units``), decode + preprocess (CPU tasks), the model actors, which write their
    own part files (``pipelines.sink.PartWriter``). The driver receives one row of figures per
    model call (:data:`pipelines.sink.WRITE_STATS`) and adds them up: it holds O(units), no row."""
    import ray

    from pipelines.infer import CaptionPredictor

    gpus = _gpus_per_worker(cfg, say)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus and cfg.workers * cfg.cpus_per_worker >= cpus:
        raise ValueError(
            f"{cfg.workers} model worker(s) × {cfg.cpus_per_worker:g} CPU take all {cpus:g} CPUs of the cluster and the "
            "decode/preprocess stage needs at least one: lower --workers or --cpus-per-worker, or add CPUs"
        )
    # The job's two small actors live on the driver's node: on a worker node that is lost they
    # would die with their state, and every model call that asks the ledger would fail after it.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    ledger = ray.remote(num_cpus=0, scheduling_strategy=here)(AttemptLedger).remote()  # attempts per batch, across actor restarts
    tally = ray.remote(num_cpus=0, scheduling_strategy=here)(UnitTally).remote()  # what the expand tasks found in each unit
    where = f"{cfg.workers} model worker(s) with {gpus:g} GPU each" if gpus else f"{cfg.workers} model worker(s) on CPU"
    say(f"[caption] {where}, batch size {cfg.batch_size}, method {cfg.prune.method}")

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.raise_original_map_exception = True  # a worker's OutputWriteError reaches the driver as itself
    # What one CPU task holds (the decoded pixels of a block and their pixel tensors). The two CPU
    # stages ask for the same resources, so Ray Data fuses them into one task per unit (a unit's
    # rows never travel between them); the model actors' requests differ, so CPU tasks run on
    # their own CPUs while the actors generate.
    cpu_stage = {"num_cpus": 1, "memory": _cpu_stage_memory(cfg, cfg.batch_size, plan.any_video)}
    ds = ray.data.from_items(plan.units, override_num_blocks=max(1, min(len(plan.units), 20_000)))
    ds = ds.map_batches(
        expand_units,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"prompt": cfg.prompt, "frames": cfg.frames, "columns": cfg.shard_columns(),
                   "block_rows": cfg.batch_size, "tally": tally},  # blocks of at most batch_size rows
        **cpu_stage,
    )
    ds = ds.map_batches(
        prepare_block,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"model": cfg.model, "max_pixels": cfg.max_pixels, "max_side": cfg.max_side,
                   "timeout_s": cfg.decode_timeout},
        **cpu_stage,
    )
    ds = ds.map_batches(
        PartWriter,
        fn_constructor_kwargs={
            "stage": CaptionPredictor,
            "output_dir": cfg.output,
            "run_id": run_id,
            "model": cfg.model,
            "prune": cfg.prune,
            "max_new_tokens": cfg.max_new_tokens,
            "dtype": cfg.dtype,
            "attn_implementation": cfg.attn_implementation,
            "device": "cuda" if gpus else "cpu",
            "torch_threads": None if gpus else max(1, int(cfg.cpus_per_worker)),
            "batch_size": cfg.batch_size,
            "batch_tokens": cfg.batch_tokens,
            "attempts": ledger,
        },
        batch_format="pyarrow",
        batch_size=_actor_rows(cfg),  # the rows one actor call packs into generate calls, and writes
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_gpus=gpus,
        num_cpus=cfg.cpus_per_worker,
        # Ray Data restarts a model actor that ends (a device fault, a killed worker) and runs its
        # batch again (its defaults for actors: max_restarts=-1, max_task_retries=-1): the part it
        # writes has the same name as before (pipelines.sink.part_name); the ledger turns a batch
        # that faults on every attempt into transient error rows
    )

    start = time.monotonic()
    last_log = start
    written = {"rows": 0, "errors": 0, "transient": 0, "duplicates": 0}
    calls = CallTally()  # what the output rows say about their generate calls
    metrics = MetricTally()  # the cost metrics of the rows written, added up call by call
    first_batch = None  # (seconds until the first results arrived, their rows): start-up cost

    def report(now: float) -> None:
        total, before = _total_and_before(plan, _tally_totals(tally))
        rate = written["rows"] / (now - start) if now > start else 0.0
        left = None if total is None else max(0, total - before - written["rows"])
        eta = f", about {_duration(left / rate)} left" if left and rate > 0 else ""
        say(
            f"[caption] {before + written['rows']}/{total if total is not None else '?'} rows written, "
            f"{written['errors']} errors ({written['transient']} transient), {rate:.2f} items/s{eta}"
        )
        if progress is not None:
            progress(written["rows"], now - start)

    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    try:
        for stats in batches:
            for row in stats.to_pylist():
                for key in written:
                    written[key] += row[key]
                calls.merge(row)
                metrics.merge(row)
                if first_batch is None and row["rows"]:
                    first_batch = (time.monotonic() - start, row["rows"])
                if row["write_error"] is not None and summary.failure is None:
                    summary.failure = write_error(OSError(row["write_errno"], row["write_error"]), cfg.output,
                                                  written["rows"]).strerror
            if summary.failure is not None:  # a part could not be written: what is committed stays
                log.warning(f"[caption] {summary.failure}")  # a warning: shown even when the progress lines are quiet
                break
            now = time.monotonic()
            if now - last_log >= 10.0:
                last_log = now
                report(now)
    except Exception as exc:  # noqa: BLE001 - keep what is done, say how to resume
        cause = _root_cause(exc)
        if isinstance(cause, OutputWriteError):  # the disk is full or the folder unwritable: what is committed stays
            summary.failure = cause.strerror
            log.warning(f"[caption] {cause.strerror}")  # a warning: shown even when the progress lines are quiet
        else:
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            summary.failure = f"{type(cause).__name__}: {first}"
            say(f"[caption] the job failed ({summary.failure}); rows already written are kept")
    finally:
        with contextlib.suppress(Exception):
            batches.close()  # a job that stops early: its tasks and model actors stop too, no part comes later
    summary.seconds = time.monotonic() - start
    summary.rows_new = written["rows"]
    summary.errors_new = written["errors"]
    summary.transient_new = written["transient"]
    summary.metrics = metrics.metrics()
    found = None
    try:
        summary.extra["batch_repeats"] = ray.get(ledger.repeats.remote(), timeout=30)
        found = _tally_totals(tally)
    except Exception:  # noqa: BLE001 - report figures only
        pass
    finally:
        ray.kill(ledger)  # one ledger and one tally per job: a long-lived Ray session would collect them
        ray.kill(tally)
    total, before = _total_and_before(plan, found)
    if found is not None:
        summary.rows_before, summary.transient_retried = before, plan.transient_retried + found["retried"]
        summary.rows_total = total if total is not None else found["rows"]
        summary.extra["duplicates_in_input"] = plan.duplicates + found["duplicates"]
    # rows neither there before nor written now; a unit no worker reported counts as missing
    unreported = len(plan.units) - found["units"] if found is not None else 0
    summary.missing = max(0, summary.rows_total - summary.rows_before - written["rows"]) + (
        unreported if total is None else 0)
    summary.extra["duplicates_dropped"] = written["duplicates"]
    figures = calls.figures()
    if figures:
        summary.extra["rows_per_generate"] = figures["rows_per_generate"]
        summary.extra["padding_share"] = figures["padding_share"]
        # the share of the model actors' wall time, from their first generate call to their last,
        # spent inside generate (the rest: preprocessing, collating, waiting for input)
        if figures["span_s"] > 0:
            summary.extra["actor_busy_share"] = figures["generate_s"] / (cfg.workers * figures["span_s"])
        summary.extra["oom_split_rows"] = figures["oom_split_rows"]
    if first_batch is not None and written["rows"] > first_batch[1]:
        summary.extra["first_output_s"] = first_batch[0]
        summary.extra["steady_items_per_s"] = (written["rows"] - first_batch[1]) / (summary.seconds - first_batch[0])


def _actor_rows(cfg: CaptionConfig) -> int:
    """Rows per model-actor call: ``flush_rows`` when given (at least ``batch_size``), else
    :data:`PACK_WINDOW` × ``batch_size``. An actor writes at most one part per call and unit."""
    return max(cfg.flush_rows, cfg.batch_size) if cfg.flush_rows else cfg.batch_size * PACK_WINDOW


def _tally_totals(tally) -> dict:
    """What the expand tasks reported so far (:meth:`UnitTally.totals`)."""
    import ray

    return ray.get(tally.totals.remote(), timeout=30)


def _total_and_before(plan, found: dict | None) -> tuple[int | None, int]:
    """Input rows (None while a unit of unknown size is unread) and rows done before this run:
    the plan's sizes with what the workers found so far (``found``: ``UnitTally.totals``) added
    to the units the plan found done."""
    if found is None:
        return plan.rows_total, plan.rows_before
    total = plan.rows_total
    if total is None and found["units"] >= len(plan.units):
        total = plan.rows_before + found["rows"]  # rows_before: those of the units the plan found done
    return total, plan.rows_before + found["before"]


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``: an ETA, rounded as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _root_cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (a task's error travels as ``RayTaskError``
    with ``cause``; Ray Data may chain another exception over it)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc
