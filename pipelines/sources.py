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

import contextlib
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


class EntryStream:
    """The entries of a folder or a manifest, read lazily: iterate it once (:meth:`rows` for the
    rows). A folder is walked directory by directory (``pipelines.storage.walk``: a directory's
    names at a time, never the whole tree); a manifest is read a line or a batch at a time.
    ``skipped`` counts a folder's files that are hidden or neither images nor videos (known once
    iterated); ``base`` is the folder a manifest's relative paths start from.

    ``follow_symlinks_outside``: a folder's file symlinks that resolve outside it are followed
    instead of becoming error rows."""

    def __init__(self, input_path: str, input_format: str = "auto", *, follow_symlinks_outside: bool = False):
        input_path = storage.local(input_path)
        input_format = resolve_format(input_path, input_format)
        is_dir = storage.is_dir(input_path)
        if input_format == "folder" and not is_dir:
            raise ValueError(f"--input-format folder: {input_path} is not a directory")
        if input_format in ("parquet", "webdataset") or not (is_dir or input_path.lower().endswith(MANIFEST_EXTS)):
            raise ValueError(
                f"input must be a directory, a manifest ({', '.join(MANIFEST_EXTS)}), a Parquet dataset of image bytes "
                f"or WebDataset .tar shards, got {input_path}"
            )
        self.input, self.folder, self.follow = input_path, is_dir, follow_symlinks_outside
        self.where = f"{'folder' if is_dir else 'manifest'} {input_path}"  # how errors name it
        self.skipped = 0
        self.base = None
        if not is_dir:
            self.base = (input_path.rsplit("/", 1)[0] if storage.is_uri(input_path)
                         else os.path.dirname(os.path.abspath(input_path)))
            _check_manifest_columns(input_path)  # a missing path column: refused before any row is read

    def __iter__(self):
        if not self.folder:
            yield from _manifest_entries(self.input)
            return
        found = _list_objects(self.input) if storage.is_uri(self.input) else _walk(self.input, follow_outside=self.follow)
        for entry in found:
            if media_type_of(entry["source"]) and not os.path.basename(entry["source"]).startswith("."):
                yield entry
            else:
                self.skipped += 1

    def rows(self, prompt: str | None, frames: int):
        """Each entry's row (:func:`make_row`), with ``has_id`` when its id is the input's own."""
        for entry in self:
            yield {**make_row(entry, self.base, prompt, frames), "has_id": "id" in entry}


def scan(input_path: str, *, prompt: str | None = None, frames: int = 8,
         follow_symlinks_outside: bool = False, input_format: str = "auto", columns=None) -> SourceScan:
    """Every row of a directory, manifest or sharded dataset, in one list (for inputs that fit
    in memory: the caption job streams them instead, ``pipelines.listing``), sorted so that equal
    media types sit together. Repeated rows are kept once, as the caption job keeps them.

    ``prompt`` overrides the default captioning prompt for rows that have none; ``frames`` is
    the number of uniformly spaced frames decoded per video. In a directory, a file symlink
    that resolves outside it is an error row unless ``follow_symlinks_outside``.
    ``input_format`` (``auto``: detected, see :func:`pipelines.shards.detect_format`) and
    ``columns`` (a :class:`pipelines.shards.ShardColumns`) say how to read a sharded dataset.
    """
    from pipelines.listing import SortedRows
    from pipelines.shards import ShardColumns, scan_parquet_dataset, scan_webdataset

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    input_path = storage.local(input_path)
    columns = columns or ShardColumns()
    input_format = resolve_format(input_path, input_format, columns)
    result = SourceScan()
    if input_format in ("parquet", "webdataset"):
        entries = scan_parquet_dataset(input_path, columns) if input_format == "parquet" else scan_webdataset(input_path)
        if not entries:
            raise ValueError(f"input {input_path} holds no {input_format} samples (--input-format {input_format})")
        rows = [{**make_row(e, None, prompt, frames), "has_id": "id" in e} for e in entries]
        where, stream = f"input {input_path}", None
    else:
        stream = EntryStream(input_path, input_format, follow_symlinks_outside=follow_symlinks_outside)
        rows, where = stream.rows(prompt, frames), stream.where
    listed = SortedRows(rows, where=where)
    try:
        names = _source_names()
        result.rows = [{k: r[k] for k in names} for table in listed for r in table.to_pylist()]
    finally:
        listed.close()
    result.duplicates = listed.duplicates
    result.skipped_files = stream.skipped if stream is not None else 0
    result.rows.sort(key=lambda r: (r["media_type"] or "~", r["frames"] or 0, r["source"]))
    return result


def _source_names() -> list[str]:
    from pipelines.units import source_schema

    return source_schema(unit=False).names


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


def _walk(root: str, follow_outside: bool = False):
    """Every file under ``root``, keyed by its path relative to ``root`` (so the same folder
    resumes however it is spelled), a directory at a time. A file symlink that resolves outside
    ``root`` is kept as an error row (followed with ``follow_outside``); directory symlinks are
    not followed."""
    root = os.path.normpath(root)
    real_root = os.path.realpath(root)
    for dirpath, _, filenames in storage.walk(root):
        for name in filenames:  # hidden files too: the stream counts them as skipped
            path = os.path.join(dirpath, name)
            entry = {"source": path, "key": os.path.relpath(path, root).replace(os.sep, "/")}
            if (not follow_outside and os.path.islink(path)
                    and os.path.commonpath([real_root, os.path.realpath(path)]) != real_root):
                entry["error"] = (f"symlink pointing outside the input folder ({os.path.realpath(path)}), not followed "
                                  f"(--follow-symlinks-outside follows it): {path}")
            yield entry


def _list_objects(root: str):
    """Every object under an object-store prefix, keyed by its name relative to the prefix, a
    prefix level at a time."""
    from pipelines.shards import relative

    for prefix, _, names in storage.walk(root):
        for name in names:
            uri = storage.join(prefix, name)
            yield {"source": uri, "key": relative(uri, root)}


MANIFEST_COLUMNS = ("prompt", "reference", "id")
MANIFEST_BATCH_ROWS = 10_000  # rows of a Parquet manifest read at a time


def _check_manifest_columns(path: str) -> None:
    """Refuse a CSV or Parquet manifest without a ``path`` column from its header alone (a JSONL
    manifest says it line by line: :func:`_manifest_entries`)."""
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return
    if lower.endswith(".csv"):
        with _manifest_text(path) as text:
            names = next(csv.reader(text), None)
    else:
        import pyarrow.parquet as pq

        with storage.open_input(path) as fh:
            names = pq.read_schema(fh).names
    if names is not None and "path" not in names:
        raise ValueError(f"manifest {path} needs a 'path' column (optional: prompt, reference, id)")


@contextlib.contextmanager
def _manifest_text(path: str):
    """A text manifest as UTF-8 lines (a byte-order mark accepted); one line of error if it is not UTF-8."""
    import io

    with storage.open_input(path) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
        try:
            yield text
        except UnicodeDecodeError:
            raise ValueError(f"manifest {path} is not UTF-8 text") from None


def _manifest_entries(path: str):
    """The entries of a manifest, a line (JSONL, CSV) or a batch (Parquet) at a time."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.open_input(path) as fh:
            handle = pq.ParquetFile(fh)
            names = [c for c in ("path", *MANIFEST_COLUMNS) if c in handle.schema_arrow.names]
            for batch in handle.iter_batches(batch_size=MANIFEST_BATCH_ROWS, columns=names):
                for row in batch.to_pylist():
                    yield _manifest_entry(row, path)
        return
    with _manifest_text(path) as text:
        if lower.endswith(".csv"):
            for row in csv.DictReader(text):
                yield _manifest_entry(row, path)
            return
        for n, line in enumerate(text, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"manifest {path}: line {n} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"manifest {path}: every line must be a JSON object with a 'path' key (line {n})")
            if "path" not in row:
                raise ValueError(f"manifest {path} needs a 'path' column (optional: prompt, reference, id); line {n} has none")
            yield _manifest_entry(row, path)


def _manifest_entry(row: dict, path: str) -> dict:
    entry = {"source": str(row["path"]) if row.get("path") is not None else ""}
    for key in MANIFEST_COLUMNS:
        value = row.get(key)
        if value is not None and value != "":
            entry[key] = value
    return entry


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
