"""One writer per job directory: `owner.json`, held by the process that writes the job for as long as it runs.

Without it, whatever starts a cell trains it: a re-run launcher while an orphaned cell still trains, two launchers
on one grid, a cell started by hand; each writes the same directory (two runs interleaved in metrics.jsonl, two
runs' checkpoints in one folder). `launch.cell` takes the lock before it touches its directory and keeps it to the
end (on a multi-host slice process 0 holds it for all of them). The launcher takes it first, writes job.json and
keeps it while the job's process comes up, which then takes it over (no gap in which another launcher could start
the job, however long a TPU slice takes to come up); it never starts, writes into or fails a job another live
process owns (vlm_jax/grid/runner.py).

The lock is a small JSON record, created only where none exists (a local file is hard-linked into place, which fails
when the name exists, as O_CREAT|O_EXCL does, and never shows half-written; a bucket object is uploaded with
`ifGenerationMatch=0`):

    host, pid, start (the process's start time: /proc/PID/stat field 22), machine (boot id + PID namespace),
    role ('cell' | 'launcher'), token (this acquisition), time (renewed every renew_s), lease_s

Its owner is alive when, on the same machine (same boot, same PID namespace), a process with that PID and that start
time exists (a recycled PID has another start time); from anywhere else, when `time` is younger than `lease_s` by
the reader's clock (hosts' clocks must agree to well within it: NTP does). A stale lock is taken over by
compare-and-swap (a local folder: read, compare, replace under an flock of `.owner.guard` beside it; a bucket:
`ifGenerationMatch=<the generation read>`), so of several processes taking over one stale lock exactly one wins.
Released, the lock is deleted, but only if it is still this process's (the same compare-and-swap).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote

log = logging.getLogger(__name__)

LOCK_NAME = "owner.json"
GUARD_NAME = ".owner.guard"
RENEW_S = 30.0    # a bucket object may change about once a second: this is far below that, and cheap
LEASE_S = 120.0   # four renewals: a missed one (a network hiccup) never makes a live owner look dead
# launch.cell's exit code when its directory is owned by another live process (or was taken from it): EX_CANTCREAT
# of sysexits.h, "cannot create an output file". The launcher reads it as "owned", never as a failure.
EXIT_OWNED = 73


class Owned(Exception):
    """A live process owns the job directory; `record` is its lock record (None where only process 0 read it)."""

    def __init__(self, job_dir: str, record: dict | None):
        self.job_dir, self.record = job_dir, record
        super().__init__(f"{job_dir} is owned by {describe(record) if record else 'another process'}")


def describe(record: dict) -> str:
    return f"host {record.get('host', '?')} pid {record.get('pid', '?')}"


def _proc_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or None when no such live
    process exists (a zombie is dead: it only waits for its parent to collect its exit status)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # after 'pid (comm) ': comm may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else int(fields[19])


@functools.cache
def _machine() -> str | None:
    """Where a PID means the same process: this boot of this kernel, this PID namespace (None off Linux: lease only)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def new_record(role: str, lease_s: float) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid), "machine": _machine(),
            "role": role, "token": uuid.uuid4().hex, "time": time.time(), "lease_s": lease_s}


def alive(record: dict, now: float | None = None) -> bool:
    """Whether the lock's owner lives: its PID and start time here, its lease elsewhere (module docstring)."""
    if record.get("machine") and record["machine"] == _machine():
        return record.get("start") is not None and _proc_start(record["pid"]) == record["start"]
    now = time.time() if now is None else now
    return now - float(record.get("time", 0)) <= float(record.get("lease_s", LEASE_S))


def _encode(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def _decode(data: bytes) -> dict:
    """The record, or {} for an unreadable one (edited by hand): stale, since it names no live owner."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class _LocalStore:
    """The lock file in a local folder. Every change happens under an flock of the guard file beside it, so that
    compare-and-swap is read, compare, os.replace; readers take no lock (they see a whole file, old or new)."""

    def __init__(self, path: str):
        self.path, self.folder = path, os.path.dirname(path) or "."

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, GUARD_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # releases the flock

    def _temp(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".owner.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read(self) -> tuple[bytes, bytes] | None:
        """(content, version) or None; the version of a local file is its content (each write holds a new token or
        time)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> bytes | None:
        with self._guarded():
            tmp = self._temp(data)
            try:
                os.link(tmp, self.path)   # fails if the name exists: the exclusive creation
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        return data

    def replace(self, data: bytes, version: bytes) -> bytes | None:
        with self._guarded():
            current = self.read()
            if current is None or current[1] != version:
                return None
            os.replace(self._temp(data), self.path)
        return data

    def delete(self, version: bytes) -> bool:
        with self._guarded():
            current = self.read()
            if current is None or current[1] != version:
                return False
            os.unlink(self.path)
        return True


class _BucketStore:
    """The lock object on a GCS bucket, through gcsfs (the filesystem etils.epath reads gs:// with). Every change is
    a compare-and-swap on the server: uploads and deletes carry `ifGenerationMatch` (0: only if absent); a failed
    precondition (412) comes back from gcsfs as FileExistsError. A request gcsfs retries after a lost reply may find
    its own first attempt done; Lock compares tokens to tell that from a rival's write. (Uploads are multipart:
    fake-gcs-server, the tests' emulator, enforces preconditions there but not on media uploads nor on DELETE.)"""

    def __init__(self, path: str):
        import fsspec  # pylint: disable=import-outside-toplevel

        self.fs = fsspec.filesystem("gs")
        self.bucket, _, self.key = path[len("gs://"):].partition("/")

    def read(self) -> tuple[bytes, str] | None:
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None
        return data, headers["x-goog-generation"]   # the generation these bytes are (headers: case-insensitive)

    def _upload(self, data: bytes, generation: str) -> str | None:
        meta = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
                f"Content-Type: application/json\n\n").encode() + data + b"\n--==0==--"
        try:
            out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
                               uploadType="multipart", ifGenerationMatch=str(generation), data=body, json_out=True,
                               headers={"Content-Type": 'multipart/related; boundary="==0=="'})
        except FileExistsError:   # 412: the object is not at that generation (or, for 0, exists)
            return None
        return str(out["generation"])

    def create(self, data: bytes) -> str | None:
        return self._upload(data, "0")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._upload(data, version)

    def delete(self, version: str) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(version))
        except (FileNotFoundError, FileExistsError):
            return False
        return True


def lock_path(job_dir: str) -> str:
    job_dir = str(job_dir)
    return posixpath.join(job_dir, LOCK_NAME) if "://" in job_dir else os.path.join(job_dir, LOCK_NAME)


def _store(path: str):
    if path.startswith("gs://"):
        return _BucketStore(path)
    if "://" in path:
        raise ValueError(f"{path}: ownership locks work in local folders and on gs:// buckets only")
    return _LocalStore(path)


def read(job_dir: str) -> dict | None:
    """The lock record in `job_dir`, live or stale, or None."""
    current = _store(lock_path(job_dir)).read()
    return None if current is None else _decode(current[0])


def owner(job_dir: str) -> dict | None:
    """The record of the live process owning `job_dir`, or None (no lock, or a stale one)."""
    record = read(job_dir)
    return record if record is not None and alive(record) else None


def _exit_when_lost(lock: Lock) -> None:
    log.error("%s: the lock was taken over by another process (or removed): exiting at once, so that one process "
              "writes the job", lock.job_dir)
    logging.shutdown()
    os._exit(EXIT_OWNED)   # pylint: disable=protected-access


class Lock:
    """Ownership of one job directory by this process: `acquire` (raises Owned while a live process holds it; takes
    over a stale lock, saying so, and keeps the replaced record in `took_over`), renewal every `renew_s` seconds in a
    daemon thread (None: no renewal, for a hold of a moment), `release`. A context manager.

    Renewal writes a fresh time by compare-and-swap on the version this process wrote last; if that fails, another
    process took the lock over (it found this one's lease expired, or was handed it) or it was deleted, and
    `on_lost(lock)` runs: by default the process ends at once (exit code EXIT_OWNED), since two writers is what the
    lock exists to prevent.

    A cell takes a launcher's lock over even while that launcher lives: a launcher holds a job's lock from before it
    starts the job to its end (runner.py), so the job's process finds its launcher's lock and takes it. A cell
    started by hand may take it first; the launcher's own cell then finds a live cell's lock and leaves (EXIT_OWNED),
    and the launcher waits for that one: still one writer."""

    def __init__(self, job_dir: str, role: str = "cell", renew_s: float | None = RENEW_S, lease_s: float = LEASE_S,
                 on_lost: Callable[[Lock], None] = _exit_when_lost):
        self.job_dir, self.role, self.renew_s, self.lease_s, self.on_lost = str(job_dir), role, renew_s, lease_s, on_lost
        self.took_over: dict | None = None
        self._store = _store(lock_path(self.job_dir))
        self._record: dict | None = None
        self._version = None
        self._mutex = threading.Lock()   # renewal against release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def record(self) -> dict | None:
        return self._record

    def acquire(self) -> Lock:
        record = new_record(self.role, self.lease_s)
        data = _encode(record)
        found: dict | None = None
        for _ in range(20):   # a round is lost only to another process's create, release or takeover in between
            version = self._store.create(data)
            if version is None:
                current = self._store.read()
                if current is None:
                    continue   # released in between: create again
                found = _decode(current[0])
                handed_over = self.role == "cell" and found.get("role") == "launcher"
                if found.get("token") == record["token"]:
                    version = current[1]   # our own write, whose reply was lost and whose retry was refused
                elif alive(found) and not handed_over:
                    raise Owned(self.job_dir, found)
                else:
                    version = self._store.replace(data, current[1])
                    if version is None:
                        continue   # someone else changed it first: look again
                    if handed_over:
                        log.info("%s: the lock passed from the launcher (%s) to this process", self.job_dir,
                                 describe(found))
                    else:
                        self.took_over = found
                        log.warning("%s: took over the stale lock of %s (%s)", self.job_dir, describe(found),
                                    "lease expired" if found.get("machine") != _machine() else "process gone")
            self._record, self._version = record, version
            if self.renew_s:
                self._stop.clear()
                self._thread = threading.Thread(target=self._renew_loop, name=f"lock-renewal {self.job_dir}",
                                                daemon=True)
                self._thread.start()
            return self
        raise Owned(self.job_dir, found)

    def renew(self) -> bool:
        """Writes a fresh time; False when the lock is no longer this process's."""
        with self._mutex:
            if self._record is None:
                return False
            record = dict(self._record, time=time.time())
            data = _encode(record)
            version = self._store.replace(data, self._version)
            if version is None:
                current = self._store.read()
                if current is None or current[0] != data:
                    return False
                version = current[1]   # our own write, whose reply was lost
            self._record, self._version = record, version
            return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                if self.renew():
                    continue
            except Exception as e:  # pylint: disable=broad-except   # a network error: the lease outlasts a few
                log.warning("%s: could not renew the lock (%s); trying again in %.0fs", self.job_dir, e, self.renew_s)
                continue
            if not self._stop.is_set():
                self.on_lost(self)
            return

    def release(self) -> None:
        """Deletes the lock if it is still this process's; never raises (a lock left behind is stale once this
        process has ended, or its lease has run out)."""
        self._stop.set()
        with self._mutex:
            if self._record is None:
                return
            try:
                self._store.delete(self._version)
            except Exception as e:  # pylint: disable=broad-except
                log.warning("%s: could not release the lock (%s); it is stale once this process ends", self.job_dir, e)
            finally:
                self._record = self._version = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def from_process_0(value: int) -> int:
    """Process 0's `value`, on every process of a multi-host job (a broadcast; one process: `value` itself)."""
    import jax  # pylint: disable=import-outside-toplevel

    if jax.process_count() == 1:
        return value
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def agree_across_processes(acquired: bool) -> bool:
    """Process 0's answer, on every process of a multi-host job."""
    return bool(from_process_0(int(acquired)))


@contextlib.contextmanager
def held(job_dir: str, holder: bool = True, agree: Callable[[bool], bool] | None = None,
         **lock_args) -> Iterator[Lock | None]:
    """The writer's hold on its job directory for the whole job (launch.cell): the holder (process 0) takes the lock,
    every process learns through `agree` whether it did (multi-host: agree_across_processes), and all raise Owned
    together when it did not, so that no process of the slice starts; released on exit, however the job ends."""
    lock, error = (Lock(job_dir, role="cell", **lock_args) if holder else None), None
    if lock is not None:
        try:
            lock.acquire()
        except Owned as e:
            error = e
    try:
        if agree is not None and not agree(error is None):
            raise error or Owned(str(job_dir), None)
        if error is not None:
            raise error
        yield lock
    finally:
        if lock is not None:
            lock.release()   # nothing to do where it was not acquired
