"""``ep caption``: caption / answer questions about a folder or manifest of images and videos.

    ep caption --model PATH_OR_ID --input DIR_OR_MANIFEST --output DIR [--method M]
               [--budget B | --keep-ratio R | --keep-tokens T] [--prune-layer K] [--prompt TEXT]
               [--max-new-tokens N] [--frames N] [--batch-size N] [--batch-tokens T] [--workers N]
               [--address RAY_ADDRESS]
    python -m jobs.caption --config jobs/configs/NAME.yaml [flags that override it]

The YAML file holds the same settings as the flags (``keep_ratio`` or ``keep-ratio``); an
unknown key is an error. Output: Parquet rows (one per input, exactly once) under --output;
rerunning the same command resumes, and retries the rows whose error is ``transient`` (out
of memory, a device fault). Exit status 0 when every row is written, input-error rows
included; 1 when the job stopped early or left transient errors (rerun to finish); 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import prune_layer_arg

# flag → (type, help); every flag is also a YAML key. Defaults live in CaptionConfig.
_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "local model directory or hub id (LLaVA / Qwen-VL families)"),
    "input": (str, "a directory (walked recursively), a .jsonl/.csv/.parquet manifest with a 'path' column, "
                   "a Parquet dataset whose rows hold image bytes, or WebDataset .tar shards (a file or a folder)"),
    "input_format": (str, "auto (default: detected from what --input holds), folder, manifest, parquet or webdataset"),
    "image_column": (str, "Parquet dataset: the column of image bytes, binary or a struct with 'bytes' (default image)"),
    "video_column": (str, "Parquet dataset: the column of video bytes (default video)"),
    "prompt_column": (str, "Parquet dataset: the column of per-row prompts (default prompt)"),
    "reference_column": (str, "Parquet dataset: the column of reference answers or captions (default reference)"),
    "id_column": (str, "Parquet dataset: the column of sample ids (default id; else ids hash shard, row and prompt)"),
    "output": (str, "output directory for the Parquet part files (rerun to resume)"),
    "method": (str, "pruning method: none, entropyprune, random, fastv, dart (default none)"),
    "budget": (float, "layer-averaged visual-token budget B (the papers' 192/128/64)"),
    "keep_ratio": (float, "share of visual tokens kept after the prune layer, 0..1"),
    "keep_tokens": (int, "visual tokens kept per row after the prune layer, min(T, N): the official LLaVA-1.6 path (e.g. 320)"),
    "prune_layer": (prune_layer_arg, "decoder layer K where pruning happens (default: the family's, 2 for LLaVA, 1 for Qwen-VL), or 'auto': K from the calibration profile (ep calibrate), else the family's default"),
    "profile": (str, "with --prune-layer auto: the profile file to read (default: the model's profile written by ep calibrate)"),
    "seed": (int, "seed of the random method (default 0)"),
    "prompt": (str, "prompt for rows without one (default: a captioning prompt)"),
    "max_new_tokens": (int, "tokens to generate per input (default 32)"),
    "frames": (int, "uniformly spaced frames per video (default: as many as fit the model's context, at most 8; LLaVA-1.5: 6)"),
    "batch_size": (int, "rows per generate call, at most (default 8)"),
    "batch_tokens": (int, "prompt tokens per generate call, rows × longest prompt (default: from the GPU's free memory; 16384 on CPU)"),
    "workers": (int, "model actors, one GPU each on a GPU cluster (default 1)"),
    "address": (str, "Ray cluster address (default: RAY_ADDRESS, else start Ray locally)"),
    "num_gpus": (float, "GPUs per model actor (default: 1 if the cluster has GPUs, else 0)"),
    "device": (str, "auto, cuda or cpu (default auto: GPUs when the cluster has them; a model over 1 B parameters never falls back to CPU unless --device cpu)"),
    "wait_for_gpus": (float, "seconds to wait for GPU workers to join before deciding there are none (default: 300 with a cluster address, 0 locally)"),
    "cpus_per_worker": (float, "CPUs per model actor (default 1)"),
    "dtype": (str, "auto, float32, float16 or bfloat16 (default auto)"),
    "attn_implementation": (str, "attention backend: sdpa, eager or flash_attention_2 (default: flash_attention_2 on a GPU when flash-attn is installed, else sdpa)"),
    "max_side": (int, "downscale decoded images/frames to this longer side (default 1024)"),
    "max_pixels": (int, "refuse images with more pixels (decompression bombs; default 100000000)"),
    "decode_timeout": (float, "seconds allowed to decode one video (default 60)"),
    "flush_rows": (int, "rows a model worker takes per call, and so per output part file at most (default 4 x batch size)"),
    "num_cpus": (int, "CPUs of a locally started Ray (default: all)"),
}


# on/off flags (``--name``; YAML ``name: true``); off unless given
_SWITCHES: dict[str, str] = {
    "follow_symlinks_outside": "follow a folder input's file symlinks that resolve outside it (default: each is an error row)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same settings as the flags (flags override it)")
    parser.add_argument("--experiment", default="caption", help="MLflow experiment name (default caption)")
    parser.add_argument("--no-tracking", action="store_true", help="do not record the run in MLflow")
    for name, (kind, help_text) in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text)
    for name, help_text in _SWITCHES.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=help_text)


def load_yaml_config(path: str) -> dict:
    """The settings of a YAML job file, keys normalised to ``snake_case``; unknown keys refused."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of settings, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in _SWITCHES:
            if not isinstance(value, bool):
                raise ValueError(f"{key} in {path} must be true or false, got {value!r}")
            out[name] = value
            continue
        if name not in _FLAGS:
            raise ValueError(f"unknown key {key!r} in {path}; known keys: {', '.join([*_FLAGS, *_SWITCHES])}")
        kind = _FLAGS[name][0]
        if value is not None:
            try:
                if kind is int and (isinstance(value, bool) or float(value) != int(value)):
                    raise ValueError
                value = kind(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                what = "an integer or 'auto'" if kind is prune_layer_arg else kind.__name__
                raise ValueError(f"{key} in {path} must be {what}, got {value!r}") from None
        out[name] = value
    return out


_PRUNE_FLAGS = ("method", "budget", "keep_ratio", "keep_tokens", "prune_layer", "seed")


def config_from_args(args: argparse.Namespace):
    """The :class:`CaptionConfig` of the YAML file and flags (flags win); its pruning flags
    become one ``PruneConfig``."""
    from ep_core.config import PruneConfig
    from pipelines.caption import CaptionConfig

    settings = load_yaml_config(args.config) if getattr(args, "config", None) else {}
    for name in (*_FLAGS, *_SWITCHES):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    missing = [n for n in ("model", "input", "output") if not settings.get(n)]
    if missing:
        raise ValueError(f"missing required setting(s): {', '.join('--' + m for m in missing)}")
    settings = {k: v for k, v in settings.items() if v is not None}
    prune = {k: settings.pop(k) for k in _PRUNE_FLAGS if k in settings}
    prune.setdefault("method", "none")
    profile = settings.pop("profile", None)
    from ep_core.ecl import resolve_prune_layer

    # not given: the family's default K (2 for LLaVA, 1 for Qwen-VL); auto: the calibrated one
    try:
        prune["prune_layer"] = resolve_prune_layer(prune.get("prune_layer"), settings["model"], profile)
    except (ValueError, OSError):
        if "prune_layer" in prune or profile is not None:
            raise
        # the model's config cannot be read: the preflight (CaptionJob) says why, in its order

    return CaptionConfig(prune=PruneConfig(**prune), **settings)


def run(args: argparse.Namespace) -> int:
    from pipelines.caption import CaptionJob

    job = CaptionJob(config_from_args(args))  # the preflight: usage errors in one line, before anything starts
    summary, tracker = job.run_tracked(experiment=args.experiment or "caption", tracking=not args.no_tracking)
    if tracker.active:
        print(f"MLflow: run recorded in {tracker.shown_uri} (experiment {tracker.experiment!r})", flush=True)
    print(summary.line(), flush=True)  # the summary stays the last line
    return 0 if summary.final else 1


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import module_main

    return module_main(sys.modules[__name__], "caption", argv)


if __name__ == "__main__":
    sys.exit(main())
