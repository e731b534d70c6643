"""Sharded inputs: Parquet datasets whose rows hold the image (or video) bytes, and WebDataset
tar shards. The scan reads only what identifies and describes a row (Parquet metadata and the
small columns; tar headers and the small text members); the bytes are read later, by the
worker that decodes the row, through the row's ``path``: a *member reference*
``shard-member:["parquet" | "tar", <shard file>, <row index | member name>, <column>]``.

Layouts understood:

* **Parquet dataset** (the Hugging Face ``datasets`` layout, LAION-style shards): one file or a
  folder of ``.parquet`` files; an image column (default ``image``) that is either binary or a
  struct with a ``bytes`` field (``datasets.Image``), or a video column (default ``video``);
  optional prompt / reference / id columns (defaults ``prompt``, ``reference``, ``id``).
* **WebDataset**: one ``.tar`` or a folder of them; members grouped by key (the member name up
  to the first dot of its base name), each sample one image or video member (``jpg``, ``png``,
  ``mp4``, …) plus optional ``txt`` (the reference) and ``json`` (``prompt``, ``reference``,
  ``id``) members.

A row's ``source`` reads ``<shard>#<row>`` (Parquet) or ``<shard>:<member>`` (tar), relative
to the input folder; its ``sample_id`` is the id column / json ``id`` when there is one, else
the usual hash of that source, the frame spec and the prompt (:func:`pipelines.sources.make_sample_id`).

Shards may sit on local disk or on an object store (``s3://bucket/shards/``, ``pipelines.storage``):
the scan lists them and reads their footers and headers with ranged reads, and a worker reads
the bytes of one member the same way.
"""

from __future__ import annotations

import functools
import json
import os
import tarfile
import posixpath
from dataclasses import dataclass

from pipelines import storage

MEMBER_REF = "shard-member:"


@dataclass(frozen=True)
class ShardColumns:
    """Column names of a Parquet dataset (``--image-column`` …)."""

    image: str = "image"
    video: str = "video"
    prompt: str = "prompt"
    reference: str = "reference"
    id: str = "id"


def member_ref(kind: str, shard: str, key: int | str, column: str | None = None) -> str:
    """The ``path`` of a row whose bytes live inside a shard."""
    shard = shard if storage.is_uri(shard) else os.path.abspath(storage.local(shard))
    return MEMBER_REF + json.dumps([kind, shard, key, column], ensure_ascii=False)


def parse_member_ref(path: str) -> tuple[str, str, int | str, str | None] | None:
    """(kind, shard, key, column) of a member reference, or None for a plain path."""
    if not isinstance(path, str) or not path.startswith(MEMBER_REF):
        return None
    kind, shard, key, column = json.loads(path[len(MEMBER_REF):])
    return kind, shard, key, column


def read_member(path: str) -> bytes:
    """The bytes a member reference points at; OSError / ValueError when they cannot be read."""
    kind, shard, key, column = parse_member_ref(path)
    if kind == "parquet":
        return _parquet_value(shard, int(key), column)
    if kind == "tar":
        handle = _open_tar(shard)
        member = handle.extractfile(str(key))
        if member is None:
            raise ValueError(f"tar member {key} is not a regular file")
        return member.read()
    raise ValueError(f"unknown shard kind {kind!r}")


# ----------------------------------------------------------------------------- reading bytes


@functools.lru_cache(maxsize=16)
def _parquet_file(path: str):
    """The open file and the first row of each row group (a worker keeps a few shards open)."""
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(storage.open_input(path))
    starts, total = [], 0
    for g in range(handle.metadata.num_row_groups):
        starts.append(total)
        total += handle.metadata.row_group(g).num_rows
    return handle, starts, total


@functools.lru_cache(maxsize=4)
def _row_group_column(path: str, group: int, column: str):
    handle, _, _ = _parquet_file(path)
    return handle.read_row_group(group, columns=[column]).column(column)


def _parquet_value(path: str, row: int, column: str) -> bytes:
    import bisect

    _, starts, total = _parquet_file(path)
    if not 0 <= row < total:
        raise ValueError(f"row {row} is beyond the {total} rows of {path}")
    group = bisect.bisect_right(starts, row) - 1
    value = _row_group_column(path, group, column)[row - starts[group]].as_py()
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        raise ValueError(f"column {column!r} of row {row} holds no bytes")
    return bytes(value)


@functools.lru_cache(maxsize=16)
def _open_tar(path: str) -> tarfile.TarFile:
    handle = tarfile.open(fileobj=storage.open_input(path), mode="r:*") if storage.is_uri(path) else tarfile.open(path, "r:*")
    handle.getmembers()  # read the headers once: later lookups are by name
    return handle


# ----------------------------------------------------------------------------- detecting


def _visible(rel: str) -> bool:
    """Not hidden: no part of the relative path starts with ``.`` or ``_`` (``_SUCCESS``, ``.cache``)."""
    return not any(part.startswith((".", "_")) for part in rel.split("/"))


def _shard_files(path: str, ext: str) -> list[str]:
    if storage.is_file(path):
        return [path]
    return [f for f in storage.list_files(path) if f.lower().endswith(ext) and _visible(relative(f, path))]


def _bytes_column(schema, name: str) -> bool:
    import pyarrow as pa

    if name not in schema.names:
        return False
    kind = schema.field(name).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def detect_format(path: str, columns: ShardColumns = ShardColumns()) -> str | None:
    """``parquet`` or ``webdataset`` when ``path`` (a file, or a folder with no images or videos
    of its own) is a sharded input; None for a folder of media files or a manifest."""
    from pipelines.sources import media_type_of

    lower = path.lower()
    if storage.is_file(path):
        if lower.endswith(".tar"):
            return "webdataset"
        if lower.endswith(".parquet"):
            schema = _schema(path)
            if "path" not in schema.names and (_bytes_column(schema, columns.image) or _bytes_column(schema, columns.video)):
                return "parquet"
        return None
    if not storage.is_dir(path):
        return None
    kinds = set()
    for name in storage.list_files(path):
        if not _visible(relative(name, path)):
            continue
        if media_type_of(name):
            return None  # a folder of images / videos
        kinds.add(os.path.splitext(name)[1].lower())
    if ".tar" in kinds:
        return "webdataset"
    if ".parquet" in kinds:
        schema = _schema(_shard_files(path, ".parquet")[0])
        if _bytes_column(schema, columns.image) or _bytes_column(schema, columns.video):
            return "parquet"
    return None


def _schema(path: str):
    import pyarrow.parquet as pq

    with storage.open_input(path) as fh:
        return pq.read_schema(fh)


def relative(path: str, root: str) -> str:
    """``path`` relative to the folder ``root`` (``/``-separated; local paths or URIs)."""
    if storage.is_uri(path):
        return posixpath.relpath(path, root.rstrip("/")) if path != root else posixpath.basename(path)
    return os.path.relpath(path, root).replace(os.sep, "/")


def _root(path: str) -> str:
    """The folder a shard input's relative names start from: itself, or a single shard's folder."""
    if storage.is_uri(path):
        return path.rstrip("/") if storage.is_dir(path) else posixpath.dirname(path)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


# ----------------------------------------------------------------------------- scanning


def scan_parquet_dataset(path: str, columns: ShardColumns = ShardColumns()) -> list[dict]:
    """One entry per row of every shard: ``source`` ``<shard>#<row>``, ``media_type``, ``ref``
    (the member reference), and the prompt / reference / id columns where present. Reads the
    metadata and the small columns only."""
    import pyarrow.parquet as pq

    root = _root(path)
    entries = []
    for shard in _shard_files(path, ".parquet"):
        handle = pq.ParquetFile(storage.open_input(shard))
        schema = handle.schema_arrow
        rel = relative(shard, root)
        if _bytes_column(schema, columns.image):
            media, column = "image", columns.image
        elif _bytes_column(schema, columns.video):
            media, column = "video", columns.video
        else:
            raise ValueError(f"Parquet shard {shard} has no image column {columns.image!r} or video column "
                             f"{columns.video!r} of bytes (columns: {', '.join(schema.names)}); "
                             "name yours with --image-column / --video-column")
        fields = {name: column_name for name, column_name in
                  (("prompt", columns.prompt), ("reference", columns.reference), ("id", columns.id))
                  if column_name in schema.names}
        table = handle.read(columns=list(fields.values())) if fields else None
        values = {name: table.column(c).to_pylist() for name, c in fields.items()}
        for i in range(handle.metadata.num_rows):
            entry = {"source": f"{rel}#{i}", "key": f"{rel}#{i}", "media_type": media,
                     "ref": member_ref("parquet", shard, i, column)}
            entry.update({name: column_values[i] for name, column_values in values.items()
                          if column_values[i] is not None})
            entries.append(entry)
    return entries


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: (key, extension), at the first dot of the base name."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def scan_webdataset(path: str) -> list[dict]:
    """One entry per sample key with an image or video member of every tar shard: ``source``
    ``<shard>:<member>``, ``media_type``, ``ref``; its ``txt`` member becomes the reference,
    its ``json`` member may give ``prompt``, ``reference`` and ``id``."""
    from pipelines.sources import media_type_of

    root = _root(path)
    entries = []
    for shard in _shard_files(path, ".tar"):
        rel = relative(shard, root)
        try:
            handle = _open_tar(shard)
        except (OSError, tarfile.TarError) as exc:
            entries.append({"source": rel, "key": rel, "media_type": "image", "ref": member_ref("tar", shard, ""),
                            "error": f"not a readable tar shard ({exc}): {shard}"})
            continue
        samples: dict[str, dict] = {}
        for member in handle.getmembers():
            if not member.isfile():
                continue
            key, ext = _member_key(member.name)
            samples.setdefault(key, {})[ext] = member.name
        for key, members in samples.items():
            media = [(ext, name) for ext, name in sorted(members.items()) if media_type_of("x." + ext)]
            if not media:
                continue
            ext, name = media[0]
            entry = {"source": f"{rel}:{name}", "key": f"{rel}:{name}", "media_type": media_type_of("x." + ext),
                     "ref": member_ref("tar", shard, name)}
            if "txt" in members:
                entry["reference"] = handle.extractfile(members["txt"]).read().decode("utf-8", "replace").strip()
            if "json" in members:
                try:
                    meta = json.loads(handle.extractfile(members["json"]).read())
                except ValueError:
                    meta = {}
                for name_ in ("prompt", "reference", "id"):
                    if isinstance(meta, dict) and meta.get(name_) is not None:
                        entry[name_] = meta[name_]
            entries.append(entry)
    return entries

