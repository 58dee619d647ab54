"""Run a grid: the pretraining jobs first (cells need them), then every cell through the backend, k at a time; a
failing job is recorded and never stops the others. Progress (done / running / failed, elapsed, ETA) after every job."""

from __future__ import annotations

import concurrent.futures
import fnmatch
import os
import posixpath
import shlex
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from vlm_jax import files
from vlm_jax.grid import backends, results
from vlm_jax.grid import spec as spec_lib
from vlm_jax.grid.spec import GridJob


def job_command(job: GridJob) -> backends.Job:
    return backends.Job(job.name, ("python", "-m", "launch.cell", f"--job_dir={job.dir}"))


def select(jobs: Sequence[GridJob], only: Sequence[str], retry_failed: bool) -> tuple[list[GridJob], list[str]]:
    """(jobs to run, notes): done jobs are skipped; `only` (fnmatch patterns of cell names) narrows the cells;
    `retry_failed` runs only the cells that failed before. A job done under another spec is an error; one that
    failed under another spec is redone like any failed job: its result holds nothing to keep."""
    todo, notes = [], []
    for job in jobs:
        result = results.read_result(job.dir)
        state = results.status(job, result)
        failed_before = state == "failed" or (state == "stale" and result.get("status") != "ok")
        if state == "stale" and not failed_before:
            raise ValueError(f"{job.dir} holds a finished job with a different spec (the grid config changed); "
                             f"use a new config.dir, or delete that directory to redo it")
        if job.is_cell and only and not any(fnmatch.fnmatch(job.name, p) for p in only):
            continue
        if state == "done":
            notes.append(f"{job.name}: done, skipped")
        elif retry_failed and not failed_before and job.is_cell:
            continue
        else:
            todo.append(job)
            if state == "stale":
                notes.append(f"{job.name}: failed under another spec, redone")
    return todo, notes


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Thread-safe counters and one line per finished job."""

    def __init__(self, total: int, parallel: int, echo: Callable[[str], None]):
        self.total, self.parallel, self.echo = total, parallel, echo
        self.done = self.failed = self.running = 0
        self.durations: list[float] = []
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def started(self):
        with self.lock:
            self.running += 1

    def finished(self, job: GridJob, ok: bool, seconds: float, detail: str):
        with self.lock:
            self.running -= 1
            self.done += ok
            self.failed += not ok
            self.durations.append(seconds)
            left = self.total - self.done - self.failed
            elapsed = time.perf_counter() - self.start
            eta = (sum(self.durations) / len(self.durations)) * left / self.parallel
            self.echo(f"[{self.done + self.failed:>3}/{self.total} | {self.done} done, {self.running} running, "
                      f"{self.failed} failed | {_fmt_s(elapsed)} elapsed, ETA {_fmt_s(eta) if left else '0s'}] "
                      f"{job.name}: {detail} ({_fmt_s(seconds)})")


def _summary_line(result: dict | None) -> str:
    if not result or "rows" not in result:
        return "ok"
    return "  ".join(f"{r['task']} acc {r['accuracy']:.3f}" for r in result["rows"])


def grid_dir(job: GridJob) -> str:
    """The grid directory a job belongs to (spec.py's layout: <grid>/cells/<cell>, <grid>/<pretraining job>)."""
    parent = posixpath.dirname(job.dir.rstrip("/"))
    return posixpath.dirname(parent) if job.is_cell else parent


def log_file(job: GridJob) -> str:
    """Where the job's output goes: beside it, or (for a bucket, where files cannot be appended to) under
    runs/grid-logs/<grid folder name>-<digest of the grid's path>/ here: two grids never append to one file, even
    grids of one name in two buckets."""
    if files.is_remote(job.dir):
        grid = grid_dir(job)
        folder = f"{posixpath.basename(grid)}-{spec_lib.digest(grid)}"
        return os.path.join("runs", "grid-logs", folder, f"{job.name}.txt")
    return os.path.join(job.dir, "log.txt")


def run_one(job: GridJob, backend, progress: Progress) -> bool:
    """Run one job; on failure write result.json with the error and the log's tail (never raises)."""
    progress.started()
    start = time.perf_counter()
    log_path = log_file(job)
    try:
        files.write_json_atomic(os.path.join(job.dir, "job.json"), job.spec)
        rc = backend.run(job_command(job), log_path)
        result = results.read_result(job.dir)
        ok = rc == 0 and results.status(job, result) == "done"
        error = None if ok else f"exit code {rc}" + ("" if result else " and no result.json")
    except Exception:  # a launcher-side error fails this job only
        ok, error, result = False, traceback.format_exc(limit=3), None
    if not ok:
        tail = ""
        if os.path.exists(log_path):
            with open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-20:])
        files.write_json_atomic(os.path.join(job.dir, "result.json"), {
            "status": "failed", "error": error, "log_tail": tail, "spec_digest": results.spec_digest(job.spec)})
        detail = f"FAILED ({error}); log: {log_path}"
    else:
        detail = _summary_line(result)
    progress.finished(job, ok, time.perf_counter() - start, detail)
    return ok


def refuse(job: GridJob, error: str) -> None:
    """Record a job as failed without running it (e.g. it cannot fit its TPU slice); --retry_failed retries it."""
    files.write_json_atomic(os.path.join(job.dir, "result.json"), {
        "status": "failed", "error": error, "log_tail": "", "spec_digest": results.spec_digest(job.spec)})


def dry_run(jobs: Sequence[GridJob], backend, echo: Callable[[str], None]) -> None:
    for job in jobs:
        echo(f"# {job.name}: write {os.path.join(job.dir, 'job.json')}")
        for argv in backend.commands(job_command(job)):
            echo(shlex.join(argv))


def cost(job: GridJob) -> float:
    """A cell's relative cost: LLM parameters x tokens per sequence, summed over its stages (steps x batch)."""
    row = job.spec["row"]
    return sum(row["n_params"] * (s["config"]["data"]["seq_len"] + row["visual_tokens"])
               * s["config"]["train"]["steps"] * s["config"]["train"]["batch_size"] for s in job.spec["stages"])


def run_jobs(first: Sequence[GridJob], cells: Sequence[GridJob], backend, parallel: int,
             echo: Callable[[str], None] = print) -> Progress:
    """The pretraining jobs still to run (tower, LLMs) `parallel` at a time, then the cells, the costliest first (so
    that no slot idles at the end behind one long cell). If a pretraining job fails, no cell runs."""
    cells = sorted(cells, key=cost, reverse=True)
    progress = Progress(len(first) + len(cells), max(1, parallel), echo)
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        failed = [job for job, ok in zip(first, pool.map(lambda job: run_one(job, backend, progress), first))
                  if not ok]
        if failed:
            echo(f"pretraining failed ({', '.join(j.name for j in failed)}): no cell can run; see "
                 f"{', '.join(log_file(j) for j in failed)}")
            return progress
        list(pool.map(lambda job: run_one(job, backend, progress), cells))
    return progress
