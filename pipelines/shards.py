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
    for directory, _, names in storage.walk(path):  # lazily: a folder of images says so at its first one
        for name in map(functools.partial(storage.join, directory), names):
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


def shard_units(path: str, input_format: str, columns: ShardColumns = ShardColumns()) -> list[dict]:
    """The pieces of a sharded input that one task reads, from metadata alone (what the driver
    holds: O(shards), never a row): one unit per row group of every Parquet shard, with its
    row count; one per tar shard (its sample count is known once a worker reads its headers).
    Each unit has ``unit`` (a stable key: :func:`unit_key`), ``kind``, ``shard``, ``rel`` (its
    path relative to the input folder) and ``rows`` (None when unknown)."""
    import pyarrow.parquet as pq

    root = _root(path)
    units = []
    if input_format == "webdataset":
        for shard in _shard_files(path, ".tar"):
            rel = relative(shard, root)
            units.append({"unit": unit_key("tar", rel), "kind": "tar", "shard": shard, "rel": rel, "rows": None})
        return units
    for shard in _shard_files(path, ".parquet"):
        handle = pq.ParquetFile(storage.open_input(shard))
        meta, schema = handle.metadata, handle.schema_arrow
        rel = relative(shard, root)
        if _bytes_column(schema, columns.image):
            media, column = "image", columns.image
        elif _bytes_column(schema, columns.video):
            media, column = "video", columns.video
        else:
            raise ValueError(f"Parquet shard {shard} has no image column {columns.image!r} or video column "
                             f"{columns.video!r} of bytes (columns: {', '.join(schema.names)}); "
                             "name yours with --image-column / --video-column")
        offset = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append({"unit": unit_key("parquet", rel, group), "kind": "parquet", "shard": shard, "rel": rel,
                          "group": group, "offset": offset, "rows": rows, "media": media, "column": column})
            offset += rows
    return units


def unit_key(kind: str, rel: str, group: int = 0) -> str:
    """A unit's key, ``u`` + 16 hex digits of sha1(kind | shard path relative to the input | row
    group): the same shard piece gets the same key in every run, and names its part files."""
    import hashlib

    return "u" + hashlib.sha1(f"{kind}|{rel}|{group}".encode("utf-8")).hexdigest()[:16]


def unit_entries(unit: dict, columns: ShardColumns = ShardColumns()) -> list[dict]:
    """The entries of one unit (a worker's read): Parquet, one per row of the row group, with
    ``source`` ``<shard>#<row>`` and the prompt / reference / id columns where present (the
    image bytes are not read here); tar, one per sample (:func:`tar_entries`)."""
    import pyarrow.parquet as pq

    if unit["kind"] == "tar":
        return tar_entries(unit["shard"], unit["rel"])
    handle = pq.ParquetFile(storage.open_input(unit["shard"]))
    names = handle.schema_arrow.names
    fields = {name: column_name for name, column_name in
              (("prompt", columns.prompt), ("reference", columns.reference), ("id", columns.id))
              if column_name in names}
    table = handle.read_row_group(unit["group"], columns=list(fields.values())) if fields else None
    values = {name: table.column(c).to_pylist() for name, c in fields.items()}
    entries = []
    for i in range(unit["rows"]):
        row = unit["offset"] + i
        entry = {"source": f"{unit['rel']}#{row}", "key": f"{unit['rel']}#{row}", "media_type": unit["media"],
                 "ref": member_ref("parquet", unit["shard"], row, unit["column"])}
        entry.update({name: column_values[i] for name, column_values in values.items() if column_values[i] is not None})
        entries.append(entry)
    return entries


def scan_parquet_dataset(path: str, columns: ShardColumns = ShardColumns()) -> list[dict]:
    """Every entry of a Parquet dataset (:func:`unit_entries` of each unit), read here at once."""
    return [e for unit in shard_units(path, "parquet", columns) for e in unit_entries(unit, columns)]


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: (key, extension), at the first dot of the base name."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def scan_webdataset(path: str) -> list[dict]:
    """Every entry of a WebDataset input (:func:`tar_entries` of each shard), read here at once."""
    return [e for unit in shard_units(path, "webdataset") for e in tar_entries(unit["shard"], unit["rel"])]


def tar_entries(shard: str, rel: str) -> list[dict]:
    """One entry per sample key with an image or video member of the tar ``shard``: ``source``
    ``<rel>:<member>``, ``media_type``, ``ref``; its ``txt`` member becomes the reference, its
    ``json`` member may give ``prompt``, ``reference`` and ``id``. An unreadable shard is one
    entry with an ``error``."""
    from pipelines.sources import media_type_of

    try:
        handle = _open_tar(shard)
    except (OSError, tarfile.TarError) as exc:
        return [{"source": rel, "key": rel, "media_type": "image", "ref": member_ref("tar", shard, ""),
                 "error": f"not a readable tar shard ({exc}): {shard}"}]
    samples: dict[str, dict] = {}
    for member in handle.getmembers():
        if not member.isfile():
            continue
        key, ext = _member_key(member.name)
        samples.setdefault(key, {})[ext] = member.name
    entries = []
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
