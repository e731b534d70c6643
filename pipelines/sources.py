"""Inputs → rows: a directory walked recursively, a manifest (.jsonl, .csv, .parquet), or a
sharded dataset (Parquet files whose rows hold image bytes, WebDataset tars: ``pipelines.shards``).

Every row gets a stable ``sample_id`` that every later stage carries unchanged and that the
sink uses for exactly-once resume:

* manifest rows with an ``id`` keep it verbatim (it must then be unique in the manifest);
* otherwise ``sample_id`` is a hash of the source path as the user wrote it, the frame spec
  (``image`` or ``video:N``) and the prompt, so the same command run again, from any working
  directory or cluster node, gives the same ids.

A manifest row whose file does not exist, or whose extension is not a known image or video
type, still becomes a row: it carries ``error`` and is written as an error row.

Every input may also sit on an object store (``--input s3://bucket/prefix``, ``pipelines.storage``),
and manifest rows may name objects (``s3://…``): listed here, read by the workers that decode
them. An object that cannot be read becomes that row's error there, not a check here (one
request per row would make the scan of millions of rows slow).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field

from pipelines import storage

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})
MANIFEST_EXTS = (".jsonl", ".csv", ".parquet")

DEFAULT_IMAGE_PROMPT = "Describe this image."
DEFAULT_VIDEO_PROMPT = "Describe this video."

def media_type_of(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def make_sample_id(source: str, frame_spec: str, prompt: str) -> str:
    """A stable id from a file's canonical key (its path relative to the input folder, or a
    manifest's normalised path), its frame spec and prompt: the first 24 hex digits of the
    SHA-256 of their JSON. File names that are not UTF-8 hash by their bytes (surrogateescape)."""
    key = json.dumps([source, frame_spec, prompt], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def canonical_key(source: str) -> str:
    """What identifies a manifest entry: a URI as given, a path normalised (``./x`` = ``x``)."""
    return source if "://" in source else os.path.normpath(source)


@dataclass
class SourceScan:
    """The rows of an input plus what was left out while scanning it."""

    rows: list[dict] = field(default_factory=list)
    skipped_files: int = 0  # files in a directory that are hidden, or neither images nor videos
    duplicates: int = 0  # identical (path, frames, prompt) rows in a manifest, kept once


INPUT_FORMATS = ("auto", "folder", "manifest", "parquet", "webdataset")


def scan(input_path: str, *, prompt: str | None = None, frames: int = 8,
         follow_symlinks_outside: bool = False, input_format: str = "auto", columns=None) -> SourceScan:
    """The rows of a directory, manifest or sharded dataset, sorted so that equal media types
    sit together.

    ``prompt`` overrides the default captioning prompt for rows that have none; ``frames`` is
    the number of uniformly spaced frames decoded per video. In a directory, a file symlink
    that resolves outside it is an error row unless ``follow_symlinks_outside``.
    ``input_format`` (``auto``: detected, see :func:`pipelines.shards.detect_format`) and
    ``columns`` (a :class:`pipelines.shards.ShardColumns`) say how to read a sharded dataset.
    """
    from pipelines.shards import ShardColumns, scan_parquet_dataset, scan_webdataset

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    input_path = storage.local(input_path)
    columns = columns or ShardColumns()
    input_format = resolve_format(input_path, input_format, columns)
    is_dir = storage.is_dir(input_path)
    if input_format in ("parquet", "webdataset"):
        entries = scan_parquet_dataset(input_path, columns) if input_format == "parquet" else scan_webdataset(input_path)
        if not entries:
            raise ValueError(f"input {input_path} holds no {input_format} samples (--input-format {input_format})")
        skipped, base = 0, None
    elif input_format == "folder" and not is_dir:
        raise ValueError(f"--input-format folder: {input_path} is not a directory")
    elif is_dir:
        found = (_list_objects(input_path) if storage.is_uri(input_path)
                 else _walk(input_path, follow_outside=follow_symlinks_outside))
        entries = [e for e in found if media_type_of(e["source"]) and not os.path.basename(e["source"]).startswith(".")]
        skipped = len(found) - len(entries)
        base = None
    elif input_path.lower().endswith(MANIFEST_EXTS):
        entries, skipped = _read_manifest(input_path), 0
        base = input_path.rsplit("/", 1)[0] if storage.is_uri(input_path) else os.path.dirname(os.path.abspath(input_path))
    else:
        raise ValueError(
            f"input must be a directory, a manifest ({', '.join(MANIFEST_EXTS)}), a Parquet dataset of image bytes "
            f"or WebDataset .tar shards, got {input_path}"
        )

    result = SourceScan(skipped_files=skipped)
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        row = make_row(entry, base, prompt, frames)
        sid = row["sample_id"]
        if sid in seen:
            if "id" in entry:
                raise ValueError(f"manifest {input_path}: id {sid!r} appears more than once (rows {seen[sid] + 1} and {i + 1})")
            result.duplicates += 1
            continue
        seen[sid] = i
        result.rows.append(row)
    result.rows.sort(key=lambda r: (r["media_type"] or "~", r["frames"] or 0, r["source"]))
    return result


def resolve_format(input_path: str, input_format: str = "auto", columns=None) -> str:
    """``input_format``, or for ``auto`` what ``input_path`` holds (``pipelines.shards.detect_format``;
    else ``folder`` for a directory, ``manifest`` for a file)."""
    from pipelines.shards import ShardColumns, detect_format

    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    if not storage.exists(input_path):
        raise FileNotFoundError(f"input not found: {input_path}")
    if input_format != "auto":
        return input_format
    return detect_format(input_path, columns or ShardColumns()) or ("folder" if storage.is_dir(input_path) else "manifest")


def _walk(root: str, follow_outside: bool = False) -> list[dict]:
    """Every file under ``root``, keyed by its path relative to ``root`` (so the same folder
    resumes however it is spelled). A file symlink that resolves outside ``root`` is kept as
    an error row (followed with ``follow_outside``); directory symlinks are not followed."""
    root = os.path.normpath(root)
    real_root = os.path.realpath(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):  # hidden files too: the scan counts them as skipped
            path = os.path.join(dirpath, name)
            entry = {"source": path, "key": os.path.relpath(path, root).replace(os.sep, "/")}
            if (not follow_outside and os.path.islink(path)
                    and os.path.commonpath([real_root, os.path.realpath(path)]) != real_root):
                entry["error"] = (f"symlink pointing outside the input folder ({os.path.realpath(path)}), not followed "
                                  f"(--follow-symlinks-outside follows it): {path}")
            out.append(entry)
    return out


def _list_objects(root: str) -> list[dict]:
    """Every object under an object-store prefix, keyed by its name relative to the prefix."""
    from pipelines.shards import relative

    return [{"source": uri, "key": relative(uri, root)} for uri in storage.list_files(root)]


def _read_manifest(path: str) -> list[dict]:
    import io

    lower = path.lower()
    try:
        if lower.endswith(".jsonl"):
            rows = []
            text = storage.read_bytes(path).decode("utf-8-sig")  # a byte-order mark is accepted
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"manifest {path}: line {n} is not valid JSON ({exc.msg})") from None
        elif lower.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(storage.read_bytes(path).decode("utf-8-sig"), newline="")))
        else:
            import pyarrow.parquet as pq

            with storage.open_input(path) as fh:
                rows = pq.read_table(fh).to_pylist()
    except UnicodeDecodeError:
        raise ValueError(f"manifest {path} is not UTF-8 text") from None
    if rows and not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"manifest {path}: every line must be a JSON object with a 'path' key")
    if not rows:
        return []
    if any("path" not in r for r in rows):
        raise ValueError(f"manifest {path} needs a 'path' column (optional: prompt, reference, id)")
    out = []
    for r in rows:
        entry = {"source": str(r["path"]) if r["path"] is not None else ""}
        for key in ("prompt", "reference", "id"):
            value = r.get(key)
            if value is not None and value != "":
                entry[key] = value
        out.append(entry)
    return out


FS_BYTES = "fs-bytes:"  # a portable path holding a file name's bytes (hex): not valid UTF-8


def readable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a file name that are not UTF-8 (held by Python as
    lone surrogates, ``surrogateescape``) become ``\\xNN`` escapes (``café`` in Latin-1 → ``caf\\xe9``)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def portable_path(path: str) -> str:
    """A local path as a UTF-8 string that keeps every byte: the path itself when it is valid
    UTF-8, else ``fs-bytes:`` + the hex of ``os.fsencode(path)``. :func:`local_path` inverts it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return FS_BYTES + os.fsencode(path).hex()
    return path


def local_path(text: str) -> str:
    """The file system path of a :func:`portable_path` (``os.fsdecode`` of its bytes)."""
    return os.fsdecode(bytes.fromhex(text[len(FS_BYTES):])) if text.startswith(FS_BYTES) else text


def _kind_of(path: str) -> str:
    """What a path that exists but is not a regular file is: a directory, a FIFO, a device …"""
    import stat

    mode = os.stat(path).st_mode
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _problem(source: str, path: str, media_type: str | None) -> str | None:
    """Why an entry cannot be read as a local image or video (None when it can)."""
    if not source:
        return "manifest row has an empty path"
    if media_type is None:
        return f"unsupported file type {os.path.splitext(source)[1] or '(no extension)'!r}: {source}"
    if storage.is_uri(path):
        return None  # read (or found missing) by the worker that decodes it
    if not os.path.exists(path):
        return f"file not found: {path}"
    if not os.path.isfile(path):
        return f"not a regular file ({_kind_of(path)}): {path}"
    return None


def make_row(entry: dict, base: str | None, prompt: str | None, frames: int) -> dict:
    """An input row (what the CPU stage decodes) from a scanned ``entry``: its ``path`` (a
    member reference, a URI, or an absolute local path; relative ones against ``base``), its
    prompt (the entry's, else ``prompt``, else the default for its media type), ``frames`` for
    a video, any problem found without reading it as ``error``, and its ``sample_id``: the
    entry's ``id``, else :func:`make_sample_id` of its key, frame spec and prompt."""
    source = entry["source"]
    if "ref" in entry:  # a member of a shard (pipelines.shards): its bytes are read by the decoder
        media_type, path = entry["media_type"], entry["ref"]
    elif storage.is_uri(source) or (base is not None and storage.is_uri(base)):
        media_type = media_type_of(source)
        path = source if storage.is_uri(source) else storage.join(base, source)
    else:
        media_type = media_type_of(source)
        path = storage.local(source)
        path = path if base is None or os.path.isabs(path) else os.path.join(base, path)
        path = os.path.abspath(path)
    n_frames = frames if media_type == "video" else None
    row_prompt = entry.get("prompt")
    if row_prompt is None:
        row_prompt = prompt or (DEFAULT_VIDEO_PROMPT if media_type == "video" else DEFAULT_IMAGE_PROMPT)
    row_prompt = str(row_prompt)
    reference = entry.get("reference")
    if reference is not None and not isinstance(reference, str):
        reference = json.dumps(reference, ensure_ascii=False)
    error = entry.get("error")
    key = entry.get("key") or canonical_key(source)
    frame_spec = f"video:{frames}" if media_type == "video" else "image"
    sample_id = str(entry["id"]) if "id" in entry else make_sample_id(key, frame_spec, row_prompt)
    if "ref" not in entry:
        error = error or _problem(readable(source), path, media_type)
    source, path = readable(source), portable_path(path)  # Parquet strings are UTF-8
    return {
        "sample_id": sample_id,
        "source": source,
        "path": path,
        "media_type": media_type,
        "frames": n_frames,
        "prompt": row_prompt,
        "reference": reference,
        "error": error,
    }
