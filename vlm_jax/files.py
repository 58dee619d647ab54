"""Writing run files that survive a kill, on a local disk or a bucket (gs://, through etils.epath)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable

from etils import epath

_CHUNK = 64 * 2**20   # bytes per read while streaming a local file to a bucket


def is_remote(path) -> bool:
    return "://" in str(path)


def inner_path(name: str) -> str | None:
    """`name` normalised as a relative path that stays inside its folder ('a/../b' -> 'b'; '\\' read as '/'), or
    None when it is empty, absolute, a URL or climbs out by '..': a name read from data (a record's image, an
    index's shard) must never make us open a file elsewhere."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    if not name or "://" in name or posixpath.isabs(norm) or norm in (".", "..") or norm.startswith("../"):
        return None
    return norm


@contextlib.contextmanager
def _replacing(path: str):
    """Yields a temporary path beside local `path`; once the block has written it: fsync, rename over `path`
    (atomic on POSIX). On an error the temporary file is removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, rename over `path`; on a bucket, one object upload
    (an object appears only once its upload completes)."""
    path = str(path)
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_file_atomic(path, write: Callable[[str], None]) -> None:
    """`write(local_path)` makes the file (e.g. safetensors' save_file); it then replaces `path` as a whole. For a
    file too big to hold twice in memory (a multi-GB shard): a bucket gets it from a local temporary file as one
    streamed, chunked (resumable) upload instead of one in-memory bytes object; a failed upload leaves no object."""
    path = str(path)
    if not is_remote(path):
        with _replacing(path) as tmp:
            write(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="upload-") as folder:
        tmp = os.path.join(folder, posixpath.basename(path))
        write(tmp)
        with open(tmp, "rb") as src:
            dst = epath.Path(path).open("wb")
            try:
                shutil.copyfileobj(src, dst, _CHUNK)
            except BaseException:
                if hasattr(dst, "discard"):   # gcsfs: cancel the upload (closing would commit a partial object)
                    dst.discard()
                raise
            dst.close()


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def append_line(path, line: str) -> None:
    """Append one line to a local file; an object store (gs://) cannot append, so there the file is rewritten."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(line + "\n")
        return
    p = epath.Path(path)
    p.write_text((p.read_text() if p.exists() else "") + line + "\n")
