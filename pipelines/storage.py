"""Where inputs and outputs live: a local path or an object-store URI (``s3://bucket/prefix``,
``gs://…``, anything pyarrow or fsspec knows), behind one small set of file operations.

Local paths keep the local file system's guarantees: a file is written to a hidden temporary
name beside its final one, synced and renamed into place. On an object store an object appears
only when its upload completes, so a whole file is written with a single put of its bytes:
a reader sees the old object or the new one, never a part of one.

Credentials and endpoints come from where the user's tools read them, never from us:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``~/.aws/config``, and a
custom endpoint (MinIO, Ceph, a local test server) from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, which pyarrow reads as boto3 does; for GCS, the usual Google application
credentials. Nothing here prints or logs them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import uuid
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    """True for ``scheme://…`` other than ``file://`` (a local path in URI spelling)."""
    return "://" in path and not path.startswith("file://")


def local(path: str) -> str:
    """A local path from a plain path or a ``file://`` URI."""
    return urlsplit(path).path if path.startswith("file://") else path


def join(base: str, *names: str) -> str:
    """``base`` / ``names``: with ``/`` for URIs, ``os.path.join`` for local paths."""
    return posixpath.join(base.rstrip("/"), *names) if is_uri(base) else os.path.join(local(base), *names)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_uri(path) else os.path.basename(path)


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str):
    """One pyarrow file system per (scheme, bucket): pyarrow's own (S3, GCS, HDFS), else
    fsspec's wrapped in pyarrow's handler."""
    import pyarrow.fs as pafs

    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
        return fs
    except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError: a scheme pyarrow lacks
        first = exc
    try:
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open {scheme}:// storage ({first}; fsspec: {exc}); "
                         "check the URI, or install the fsspec package for that scheme") from None


def filesystem(uri: str):
    """``(pyarrow file system, path inside it)`` of an object-store URI."""
    parts = urlsplit(uri)
    fs = _filesystem(parts.scheme, parts.netloc)
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.PyFileSystem):  # fsspec paths keep their bucket / host
        return fs, (parts.netloc + parts.path).rstrip("/") or parts.netloc
    return fs, (parts.netloc + parts.path).rstrip("/")


def _info(path: str):
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(local(path))
    import pyarrow.fs as pafs

    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    """A local directory, or an object-store prefix that holds objects (or a bucket)."""
    if not is_uri(path):
        return os.path.isdir(local(path))
    import pyarrow.fs as pafs

    info = _info(path)
    if info.type == pafs.FileType.Directory:
        return True
    if info.type == pafs.FileType.File:
        return False
    return bool(list_files(path))


def is_file(path: str) -> bool:
    if not is_uri(path):
        return os.path.isfile(local(path))
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def list_files(root: str, *, recursive: bool = True) -> list[str]:
    """Every file under ``root`` (sorted; URIs for an object store, paths for a local folder;
    empty when there is none)."""
    if not is_uri(root):
        root = local(root)
        if not os.path.isdir(root):
            return []
        if not recursive:
            return sorted(os.path.join(root, n) for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))
        return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)
    import pyarrow.fs as pafs

    fs, inner = filesystem(root)
    scheme = urlsplit(root).scheme
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(f"{scheme}://{info.path}" for info in infos if info.type == pafs.FileType.File)


def size(path: str) -> int:
    return os.path.getsize(local(path)) if not is_uri(path) else _info(path).size


def stamp(path: str) -> list:
    """``[size, modification time]`` of a file: what changes when it is written again (a tar
    padded to the same size still gets a new time). The time is a string, as each store gives it."""
    if not is_uri(path):
        info = os.stat(local(path))
        return [info.st_size, str(info.st_mtime_ns)]
    info = _info(path)
    return [info.size, str(info.mtime)]


def read_bytes(path: str) -> bytes:
    if not is_uri(path):
        with open(local(path), "rb") as fh:
            return fh.read()
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as fh:
        return fh.read()


def open_input(path: str):
    """A seekable binary file (ranged reads on an object store)."""
    if not is_uri(path):
        return open(local(path), "rb")
    fs, inner = filesystem(path)
    return fs.open_input_file(inner)


def makedirs(path: str) -> None:
    """Create a local directory (and its parents); nothing on an object store (prefixes are implicit)."""
    if not is_uri(path):
        os.makedirs(local(path), exist_ok=True)


def remove(path: str) -> None:
    """Delete a file; no error when it is already gone."""
    if not is_uri(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(local(path))
        return
    fs, inner = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(inner)


def hidden_tmp(path: str) -> str:
    """A hidden temporary name beside ``path``: ``.<name>.<random>.tmp``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all. Locally: through :func:`replace_atomic`.
    On an object store: one put of the whole buffer (an object appears only when its upload
    completes)."""
    if is_uri(path):
        fs, inner = filesystem(path)
        with fs.open_output_stream(inner) as fh:
            fh.write(data)
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    replace_atomic(local(path), write)


def replace_atomic(path: str, write) -> None:
    """``write(tmp)`` to a hidden temporary file beside the local ``path``, sync it, rename it
    over ``path``: a reader sees the old file or the new one, never a part of one. A failed
    write leaves no temporary file."""
    tmp = hidden_tmp(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_writable(uri: str) -> None:
    """Refuse an object-store output that cannot be written, before any work: put a small probe
    object under it and delete it. Raises PermissionError with one line."""
    probe = join(uri, f"_write_check-{uuid.uuid4().hex}")
    try:
        write_atomic(probe, b"")
        remove(probe)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PermissionError(f"output {uri} cannot be written ({first}); check the bucket, the credentials "
                              "(AWS_ACCESS_KEY_ID / AWS_PROFILE …) and the endpoint (AWS_ENDPOINT_URL)") from None


def walk(root: str):
    """Every directory under ``root``, as ``os.walk`` gives them: ``(directory, subdirectory
    names, file names)``, ``root`` first, then depth first, names sorted; a directory's names at
    a time, never the whole tree (directory symlinks are not followed). On an object store the
    directories are the prefixes of a delimiter listing: one listing per prefix."""
    if not is_uri(root):
        for directory, dirs, files in os.walk(local(root), followlinks=False):
            dirs.sort()
            files.sort()
            yield directory, dirs, files
        return
    import pyarrow.fs as pafs

    fs, inner = filesystem(root)
    top = root.rstrip("/")
    stack = [(inner, top)]
    while stack:
        prefix, uri = stack.pop()
        try:
            infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=False, allow_not_found=True))
        except FileNotFoundError:
            continue
        dirs = sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)
        files = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
        yield uri, dirs, files
        stack.extend((posixpath.join(prefix, d), f"{uri}/{d}") for d in reversed(dirs))


def remove_tree(path: str) -> None:
    """Delete a directory and everything under it (an object-store prefix: every object under it);
    nothing when there is none, one warning when it cannot be deleted."""
    if not is_uri(path):
        import shutil

        shutil.rmtree(local(path), ignore_errors=True)
        return
    if not exists(path):
        return
    fs, inner = filesystem(path)
    try:
        fs.delete_dir(inner)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(f"could not delete {path} ({first}); delete it by hand")
