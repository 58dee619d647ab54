"""Run a grid: the pretraining jobs first, then every cell through the backend, k at a time, each cell as soon as
the pretraining jobs it starts from are done; a failing job is recorded and never stops the others (a cell whose
pretraining failed is not run); a job another live process owns (vlm_jax/grid/ownership.py:
another launcher's cell) is left to it, waited for or skipped, never started twice. Progress (done / running /
failed, elapsed, ETA) after every job. Stopped (Ctrl-C, SIGTERM), it stops its running jobs and waits for them."""

from __future__ import annotations

import concurrent.futures
import fnmatch
import os
import posixpath
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import ml_collections

from vlm_jax import files, flops
from vlm_jax.grid import backends, ownership, results
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
        self.done = self.failed = self.skipped = self.running = 0
        self.durations: list[float] = []
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def started(self, n: int = 1):
        with self.lock:
            self.running += n

    def finished(self, job: GridJob, ok: bool | None, seconds: float, detail: str):
        """ok: done (True), failed (False), or neither (None: skipped, or stopped before its end)."""
        with self.lock:
            self.running -= 1
            if ok is None:
                self.skipped += 1
            else:
                self.done += ok
                self.failed += not ok
            self.durations.append(seconds)
            ended = self.done + self.failed + self.skipped
            left = self.total - ended
            elapsed = time.perf_counter() - self.start
            eta = (sum(self.durations) / len(self.durations)) * left / self.parallel
            skipped = f", {self.skipped} skipped" if self.skipped else ""
            self.echo(f"[{ended:>3}/{self.total} | {self.done} done, {self.running} running, "
                      f"{self.failed} failed{skipped} | {_fmt_s(elapsed)} elapsed, ETA {_fmt_s(eta) if left else '0s'}] "
                      f"{job.name}: {detail} ({_fmt_s(seconds)})")


def _summary_line(result: dict | None) -> str:
    if not result or "rows" not in result:
        return "ok"
    by_v: dict = {}
    for r in result["rows"]:
        by_v.setdefault(r["visual_tokens"], []).append(f"{r['task']} acc {r['accuracy']:.3f}")
    if len(by_v) == 1:
        return "  ".join(next(iter(by_v.values())))
    return " | ".join(f"V={v}: " + "  ".join(parts) for v, parts in by_v.items())   # an elastic cell


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


WAIT_POLL_S = 2.0   # how often a launcher waiting for a job another process owns looks at its lock


def _owned_by(record: dict | None) -> str:
    if not record:
        return "another process"
    who = "another launcher" if record.get("role") == "launcher" else "a cell of another launcher, or started by hand"
    return f"{ownership.describe(record)} ({who})"


def _claim(job: GridJob, echo: Callable[[str], None]) -> ownership.Lock | None:
    """Takes the job's lock (ownership.py; raises Owned while a live process holds it, takes a stale one over and
    says so) and writes job.json; the lock is renewed until the job's process takes it over (or it is released).
    None, writing nothing, where the job is done already (another launcher finished it since `select`)."""
    lock = ownership.Lock(job.dir, role="launcher", on_lost=lambda lock: None).acquire()   # "lost": handed over
    try:
        if lock.took_over:
            echo(f"{job.name}: the lock of {ownership.describe(lock.took_over)}, no longer running, taken over")
        if results.status(job, results.read_result(job.dir)) == "done":
            lock.release()
            return None
        files.write_json_atomic(os.path.join(job.dir, "job.json"), job.spec)
    except BaseException:
        lock.release()
        raise
    return lock


def _record_failure(job: GridJob, error: str, log_tail: str) -> dict | None:
    """Writes result.json (failed) under the job's lock; None once written, else the record of the live process that
    owns the job now (it runs the job again: its result will say how that went)."""
    try:
        with ownership.Lock(job.dir, role="launcher", renew_s=None):
            files.write_json_atomic(os.path.join(job.dir, "result.json"), {
                "status": "failed", "error": error, "log_tail": log_tail, "spec_digest": results.spec_digest(job.spec)})
    except ownership.Owned as e:
        return e.record or {}
    return None


def _log_tail(log_path: str) -> str:
    if not os.path.exists(log_path):
        return ""
    with open(log_path, errors="replace") as f:
        return "".join(f.readlines()[-20:])


def run_one(job: GridJob, backend, progress: Progress, if_owned: str = "wait",
            stopping: threading.Event | None = None) -> str:
    """Run one job unless a live process owns its directory (vlm_jax/grid/ownership.py: its cell, started by another
    launcher or by hand); returns 'done', 'failed', 'skipped', 'stopped' or 'owned'. A job found owned is, by
    `if_owned`: 'wait' — waited for, then its owner's result taken (or, where the owner stopped before the end, the
    job run here); 'skip' — skipped; 'defer' — nothing counted, 'owned' returned (run_jobs comes back to it after the
    others). On failure, result.json holds the error and the log's tail, unless another process owns the job by
    then. A launcher that finds the job owned writes nothing into its directory. Never raises."""
    stopping = stopping or threading.Event()
    progress.started()
    start = time.perf_counter()
    log_path = log_file(job)

    def finish(outcome: str, ok: bool | None, detail: str) -> str:
        progress.finished(job, ok, time.perf_counter() - start, detail)
        return outcome

    waiting = False
    while True:
        if stopping.is_set():
            return finish("stopped", None, "not started: the launcher is stopping")
        record = error = None
        try:
            lock = _claim(job, progress.echo)
            if lock is None:
                return finish("done", True, f"done by another launcher: {_summary_line(results.read_result(job.dir))}")
            try:
                rc = backend.run(job_command(job), log_path)
            finally:
                lock.release()   # (deletes nothing once the job's process has taken it over)
            if rc != ownership.EXIT_OWNED:   # its cell ran (or could not start): its outcome is this launcher's
                result = results.read_result(job.dir)
                if rc == 0 and results.status(job, result) == "done":
                    return finish("done", True, _summary_line(result))
                error = f"exit code {rc}" + ("" if result else " and no result.json")
            else:   # its cell found another cell's lock (one started by hand took ours, or our lease lapsed)
                record = ownership.owner(job.dir)
        except ownership.Owned as e:
            record = e.record
        except Exception:  # pylint: disable=broad-except   # a launcher-side error fails this job only
            error = traceback.format_exc(limit=3)
        if error is not None:
            if stopping.is_set():
                return finish("stopped", None, "stopped by the launcher; a re-run resumes it")
            try:
                owner = _record_failure(job, error, _log_tail(log_path))
            except Exception:  # pylint: disable=broad-except
                owner, error = None, error + "\n(and result.json could not be written: " \
                    + traceback.format_exc(limit=1).strip().splitlines()[-1] + ")"
            note = "" if owner is None else f"; not recorded: owned now by {_owned_by(owner)}"
            return finish("failed", False, f"FAILED ({error}){note}; log: {log_path}")

        # Owned by another live process.
        if if_owned == "defer":
            progress.started(-1)
            return "owned"
        if if_owned == "skip" and job.is_cell:   # a pretraining job is always waited for: the cells need it
            return finish("skipped", None, f"owned by {_owned_by(record)}, skipped")
        if not waiting:
            progress.echo(f"{job.name}: owned by {_owned_by(record)}, waiting for it")
            waiting = True
        try:
            before = results.read_result(job.dir)
            while ownership.owner(job.dir) is not None and not stopping.wait(WAIT_POLL_S):
                pass
            result = results.read_result(job.dir)
        except Exception as e:  # pylint: disable=broad-except   # not ours to record: its owner's result will say
            return finish("failed", False, f"FAILED (while waiting for its owner: {e!r}); not recorded")
        if stopping.is_set():
            continue
        if result != before and results.status(job, result) in ("done", "failed"):
            ok = results.status(job, result) == "done"
            detail = (f"done by another launcher: {_summary_line(result)}" if ok else
                      f"FAILED under another launcher ({result.get('error')}); see {job.dir}/result.json")
            return finish("done" if ok else "failed", ok, detail)
        progress.echo(f"{job.name}: its owner stopped before the end; running it here")


def refuse(job: GridJob, error: str) -> None:
    """Record a job as failed without running it (e.g. it cannot fit its TPU slice); --retry_failed retries it. Not
    where another live process owns the job (it is running it)."""
    _record_failure(job, error, "")


def dry_run(jobs: Sequence[GridJob], backend, echo: Callable[[str], None]) -> None:
    for job in jobs:
        echo(f"# {job.name}: write {os.path.join(job.dir, 'job.json')}")
        for argv in backend.commands(job_command(job)):
            echo(shlex.join(argv))


def cost(job: GridJob) -> float:
    """A job's relative cost: parameters x tokens per sequence, summed over its stages (steps x batch); a cell counts
    its LLM's parameters (its row's N), a pretraining job every parameter of its model."""
    row = job.spec["row"]
    total = 0.0
    for stage in job.spec["stages"]:
        cfg = stage["config"]
        tokens = cfg["model"]["compressor"]["num_tokens"]
        n = row["n_params"] if row else sum(flops.param_counts(ml_collections.ConfigDict(cfg["model"])).values())
        total += n * (cfg["data"]["seq_len"] + tokens) * cfg["train"]["steps"] * cfg["train"]["batch_size"]
    return total


def start_order(jobs: Sequence[GridJob]) -> list[GridJob]:
    """The costliest first (so that no slot idles at the end behind one long job), seed by seed: a cell's second
    seed starts after every first seed, and finds the programs its first seed compiled in the persistent
    compilation cache (seeds run the same programs; started side by side, both would compile them)."""
    seed_of = lambda job: (job.spec["row"] or {}).get("seed", 0)  # noqa: E731
    rank = {seed: i for i, seed in enumerate(sorted({seed_of(job) for job in jobs}))}
    return sorted(jobs, key=lambda job: (rank[seed_of(job)], -cost(job)))


def needs(cell: GridJob, first: Sequence[GridJob]) -> list[GridJob]:
    """The jobs of `first` whose trained run a cell's stages start from (config.init sources)."""
    sources = {source[0] for stage in cell.spec["stages"] for source in stage["config"].get("init", ())}
    return [job for job in first if job.spec["stages"][0]["config"]["run_dir"] in sources]


def pretraining_order(first: Sequence[GridJob], cells: Sequence[GridJob]) -> list[GridJob]:
    """What the most cells need first (the tower: every cell), then the costliest: a cell starts once its own
    pretraining is done, and none can start before the job they all need."""
    users = {job.name: 0 for job in first}
    for cell in cells:
        for job in needs(cell, first):
            users[job.name] += 1
    return sorted(start_order(first), key=lambda job: -users[job.name])   # (stable: costliest first among equals)


SIGNAL_POLL_S = 0.5   # how often the launcher's main thread wakes while it waits for its jobs


def _result(future: concurrent.futures.Future):
    """future.result(), waking every SIGNAL_POLL_S. The kernel may hand Ctrl-C or SIGTERM to any thread (one of the
    pool's, waiting for its cell); Python then only flags it for the main thread, and a main thread asleep in a
    wait without a timeout would never see it: the launcher would neither stop nor stop its cells."""
    while True:
        try:
            return future.result(timeout=SIGNAL_POLL_S)
        except TimeoutError:
            pass


def _outcome(future: concurrent.futures.Future) -> str:
    try:
        return future.result()
    except concurrent.futures.CancelledError:   # the launcher is stopping
        return "stopped"


def _raise_keyboard_interrupt(*_):
    raise KeyboardInterrupt


def run_jobs(first: Sequence[GridJob], cells: Sequence[GridJob], backend, parallel: int,
             echo: Callable[[str], None] = print, if_owned: str = "wait") -> Progress:
    """The pretraining jobs still to run (tower, LLMs) `parallel` at a time in `pretraining_order`, then the cells
    in `start_order`, each once the pretraining jobs it starts from (`needs`) are done: a slot freed by the last
    LLM's pretraining starts that LLM's cells while the others still pretrain. A cell whose pretraining failed is
    not run (the others are).

    Jobs another live process owns (another launcher's cells) come last: then waited for, their results taken as
    their owners write them (`if_owned='wait'`), or skipped ('skip'); a pretraining job is always waited for.

    Stopped by Ctrl-C or SIGTERM, it starts no other job, has the backend stop the running ones and waits for them
    (backend.stop: a local cell checkpoints and exits), records none of them as failed (a re-run resumes them), and
    exits (SystemExit 130 or 143). A second Ctrl-C or SIGTERM kills the running jobs at once."""
    if if_owned not in ("wait", "skip"):
        raise ValueError(f"if_owned must be 'wait' or 'skip', not {if_owned!r}")
    first, cells = pretraining_order(first, cells), start_order(cells)
    progress = Progress(len(first) + len(cells), max(1, parallel), echo)
    stopping = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max(1, parallel))

    def after(job: GridJob, waits: list) -> str:
        """`job` once every future in `waits` is done: they were submitted before it, so each is running or done
        when it starts (the pool takes work in order): waiting here never holds up what it waits for."""
        failed = [name for name, future in waits if _outcome(future) != "done"]
        if failed and stopping.is_set():
            return "stopped"
        if failed:
            progress.started()
            progress.finished(job, None, 0.0, f"not run: its pretraining ({', '.join(failed)}) did not finish; "
                              f"see {', '.join(log_file(j) for j in first if j.name in failed)}")
            return "blocked"
        return run_one(job, backend, progress, "defer", stopping)

    def run_all() -> None:
        """Every job once; those found owned after all the others, handled as `if_owned` says (a pretraining job
        is always waited for, in its turn: the cells need it)."""
        futures = {job.name: pool.submit(run_one, job, backend, progress, "wait", stopping) for job in first}
        later = [(cell, pool.submit(after, cell, [(j.name, futures[j.name]) for j in needs(cell, first)]))
                 for cell in cells]
        owned = [cell for cell, future in later if _result(future) == "owned"]
        for future in [pool.submit(run_one, cell, backend, progress, if_owned, stopping) for cell in owned]:
            _result(future)
        for future in futures.values():
            _result(future)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM)) if main_thread else None
    try:
        run_all()
    except (KeyboardInterrupt, SystemExit) as e:
        stopping.set()
        if main_thread:   # from now on, another SIGTERM is a second Ctrl-C: kill the running jobs at once
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        pool.shutdown(wait=False, cancel_futures=True)
        stop = getattr(backend, "stop", None)
        echo(f"stopping: {progress.running} running job(s) "
             + ("asked to checkpoint and exit (Ctrl-C again kills them now)" if stop else "left to end"))
        if stop is not None:
            stop()
        pool.shutdown(wait=True)
        echo("stopped; a re-run resumes the unfinished jobs")
        raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else e.code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True)
    return progress
