"""Writing run files that survive a kill, on a local disk or a bucket (gs://, through etils.epath)."""

from __future__ import annotations

import json
import os
import posixpath
import tempfile

from etils import epath


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


def write_text_atomic(path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, rename over `path` (atomic on POSIX); on a bucket,
    one object upload (an object appears only once its upload completes)."""
    path = str(path)
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
