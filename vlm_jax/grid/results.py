"""Job results and the grid's results table, written so that a kill at any moment leaves a readable file.

Every job writes `<job_dir>/result.json` ({status, rows, ...}) by write-then-rename; `results.jsonl` (one row per
(cell, task): the columns `launch.fit` reads plus accuracies, FLOPs and times) is rebuilt from them the same way,
in the grid's cell order, so a re-run after a kill produces the same table. Paths go through etils.epath, so a
grid directory may be a bucket (gs://, where an object appears only once its upload completes: atomic as well).
"""

from __future__ import annotations

import json

from etils import epath

from vlm_jax.files import write_text_atomic
from vlm_jax.grid import spec as spec_lib


def spec_digest(spec: dict) -> str:
    return spec_lib.digest(spec)


def read_result(job_dir: str) -> dict | None:
    """The job's result.json, or None when it has none (never ran, or was killed before the end)."""
    path = epath.Path(job_dir) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def read_json(path: str) -> dict:
    return json.loads(epath.Path(path).read_text())


def status(job, result: dict | None) -> str:
    """'done' | 'failed' | 'stale' (done under another spec) | 'todo'."""
    if result is None:
        return "todo"
    if result.get("spec_digest") != spec_digest(job.spec):
        return "stale"
    return "done" if result.get("status") == "ok" else "failed"


def table_rows(jobs) -> tuple[list[dict], int]:
    """(the finished cells' rows in the grid's order, how many cells finished under another spec: stale)."""
    rows, stale = [], 0
    for job in jobs:
        result = read_result(job.dir) if job.is_cell else None
        state = status(job, result)
        if state == "done":
            rows += result["rows"]
        stale += state == "stale"
    return rows, stale


def write_rows(path: str, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_table(path: str, jobs) -> list[dict]:
    """Rebuild results.jsonl from the finished cells' rows, in the grid's order; returns the rows."""
    rows, _ = table_rows(jobs)
    write_rows(path, rows)
    return rows
