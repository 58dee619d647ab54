"""Where a grid job runs: one registry of backends, each turning a `Job` (an argv run on every host) into commands.

    local: the job's argv as a child process of this machine (the launcher runs k of them at a time; on a node of
           GPUs each cell may get devices of its own: `local_config`);
    tpu:   a Cloud TPU slice per job (vlm_jax/grid/tpu.py).

A backend is one module with a `@register("name")` class; the package (vlm_jax/grid/__init__.py) imports every
backend module, so importing any part of vlm_jax.grid registers them all.

A backend has `commands(job) -> list[list[str]]` (what `--dry-run` prints, in order) and
`run(job, log_path) -> int` (runs them, appending stdout and stderr to `log_path`; the exit code of the job), and
may have `stop()` (the launcher is being stopped: end the running jobs, start no other, return once they ended).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import ml_collections

from vlm_jax.paths import REPO_ROOT
from vlm_jax.registry import Registry

BACKENDS = Registry("grid backend", "config.backend")
register = BACKENDS.register

# A job's exit status when it stopped with its checkpoint saved: resumable, not finished (sysexits.h EX_TEMPFAIL;
# launch.runtime.EXIT_STOPPED, vlm_jax.train.Preempted.EXIT_CODE).
EX_TEMPFAIL = 75


def make(name: str, cfg: ml_collections.ConfigDict):
    """The backend called `name`, configured by `cfg` (config.backend.<name>; may be empty)."""
    return BACKENDS.lookup(name)(cfg)


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of grid work: `argv` (a `python -m launch.…` command, run from the repository root on every host
    of the job's machine) and its name (unique in the grid, safe as a file and resource name)."""

    name: str
    argv: tuple[str, ...]


class FollowedJobs:
    """A backend whose jobs run elsewhere and are followed from here (tpu, slurm). `run` counts the jobs in flight
    and starts none once `stop` has begun (EX_TEMPFAIL: resumable); `stop` returns once every `run` has returned.
    A subclass's `_run(job, log_path)` runs one job and, seeing `_stopping` set, ends it on a checkpoint."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._running = 0

    def stop(self) -> None:
        with self._idle:
            self._stopping.set()
            self._idle.wait_for(lambda: self._running == 0)

    def run(self, job: Job, log_path: str) -> int:
        with self._idle:
            if self._stopping.is_set():
                return EX_TEMPFAIL
            self._running += 1
        try:
            return self._run(job, log_path)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def _run(self, job: Job, log_path: str) -> int:
        raise NotImplementedError


# The signal the kernel sends a local child when its launcher dies, however it dies (SIGKILL included, where nothing
# in the launcher could run): Linux's prctl(PR_SET_PDEATHSIG). Not SIGTERM itself: a dying multi-threaded parent's
# children pass to its next live thread, and the kernel signals them again at each such step (measured: two from
# one SIGKILLed launcher), while a training cell reads a second SIGTERM as "exit now, without a checkpoint".
# SIGUSR1's default action ends a process, as SIGTERM's does; launch.cell turns the first one into one SIGTERM and
# ignores the others (forward_parent_death).
PARENT_DEATH_SIGNAL = signal.SIGUSR1

# What a child runs first: ask for the signal, end at once where the launcher died before that took effect (the
# child's parent is then another process: nothing would ever signal it), then become the job's command (execve
# keeps the setting, except into a set-user-ID or set-group-ID binary). A preexec_fn could do the same inside
# Python's fork, but the launcher has other threads (its pool's, JAX's): unsafe there, and JAX warns at every fork.
_PRELUDE = ("import ctypes, os, sys\n"
            "ctypes.CDLL(None).prctl(1, int(sys.argv[1]), 0, 0, 0)\n"   # 1: PR_SET_PDEATHSIG
            "if os.getppid() != int(sys.argv[2]):\n"
            "    os._exit(128 + int(sys.argv[1]))\n"
            "os.execvp(sys.argv[3], sys.argv[3:])\n")


def with_parent_death(argv: Sequence[str], parent_pid: int, sig: int = PARENT_DEATH_SIGNAL) -> list[str]:
    """`argv`, run so that the kernel sends it `sig` when its parent dies (Linux; elsewhere `argv` as it is).

    The "parent" of PR_SET_PDEATHSIG is the *thread* that started the child: `LocalBackend.run` waits for its child
    in the thread that started it, so that thread outlives the child unless the whole launcher dies (a grid's jobs
    run in a thread pool whose threads live until the pool is done)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-S", "-c", _PRELUDE, str(int(sig)), str(parent_pid), *argv]


def forward_parent_death(to: int = signal.SIGTERM) -> None:
    """In a child of LocalBackend (launch.cell, first thing): the first parent-death signal becomes one `to` to this
    process (a training cell checkpoints and exits; anything else exits); the repeats are ignored.

    Once, whatever the timing: Python runs a handler at a bytecode boundary of the main thread, and a repeat that
    arrives after that call has begun but before it ignores the signal (the main thread may give up the interpreter
    lock in between, to a data-reading thread) calls it again. A test-and-set in one C call (a lock acquired without
    blocking) cannot be split so."""
    once = threading.Lock()

    def forward(*_):
        if not once.acquire(blocking=False):
            return
        signal.signal(PARENT_DEATH_SIGNAL, signal.SIG_IGN)
        os.write(2, b"the launcher is gone (parent-death signal): stopping this job\n")   # (no Python-level lock)
        os.kill(os.getpid(), to)
    signal.signal(PARENT_DEATH_SIGNAL, forward)


def local_config() -> ml_collections.ConfigDict:
    """config.local: how the local backend shares this machine's accelerators between the cells it runs at once."""
    c = ml_collections.ConfigDict()
    c.devices_per_cell = 0   # 0: every cell sees every device (a CPU, one GPU); k: each running cell gets k of its own
    c.devices = ""   # the ids to share, e.g. '0,1,2,3' ('' = the launcher's CUDA_VISIBLE_DEVICES, else nvidia-smi -L)
    c.visible_devices_env = "CUDA_VISIBLE_DEVICES"   # the variable that tells a cell its devices (GPUs)
    return c


def detected_devices(env_name: str = "CUDA_VISIBLE_DEVICES") -> list[str]:
    """This machine's accelerator ids: those the launcher itself was given (`env_name`), else one per GPU that
    `nvidia-smi -L` lists; [] where neither says anything."""
    given = os.environ.get(env_name, "").strip()
    if given:
        return [d.strip() for d in given.split(",") if d.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


class DevicePool:
    """Devices handed to cells in fixed groups of `per_cell` consecutive ids ([0,1], [2,3], ...: on a GPU node,
    neighbours by number usually share the fastest links), one group per running cell; a cell waits for a free
    group. Ids left over after the last whole group go unused."""

    def __init__(self, devices: Sequence[str], per_cell: int):
        devices = list(devices)
        if per_cell < 1:
            raise ValueError(f"devices_per_cell must be >= 1 here, got {per_cell}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"config.local.devices lists a device twice: {','.join(devices)}")
        if per_cell > len(devices):
            raise ValueError(f"config.local.devices_per_cell={per_cell}, but only {len(devices)} device(s) to share"
                             f" ({','.join(devices) or 'none found'}): set config.local.devices or fewer per cell")
        self.groups = [devices[i:i + per_cell] for i in range(0, len(devices) - per_cell + 1, per_cell)]
        self.unused = devices[len(self.groups) * per_cell:]
        self._free = list(range(len(self.groups)))
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def lease(self, cancelled=lambda: False) -> Iterator[list[str] | None]:
        """The lowest free group while the block runs (None where `cancelled()` turned true while waiting)."""
        with self._cond:
            while not self._free and not cancelled():
                self._cond.wait(0.5)
            group = None if cancelled() else self._free.pop(0)
        try:
            yield None if group is None else list(self.groups[group])
        finally:
            if group is not None:
                with self._cond:
                    self._free.append(group)
                    self._free.sort()
                    self._cond.notify_all()


@register("local")
class LocalBackend:
    """Runs the job here, as a child process with this interpreter (`python` in argv[0] becomes sys.executable),
    from the repository root.

    Children never outlive the launcher. If it dies, however (SIGKILL included), the kernel signals each child
    (with_parent_death), which launch.cell turns into one SIGTERM: a training cell checkpoints at the end of its step
    and exits, anything else exits at once (launch/runtime.py); any other command just ends. No one is left to
    escalate: a cell that hung would keep its ownership lock (vlm_jax/grid/ownership.py), so a re-run would still
    not train it twice, and would name its PID. If the launcher is stopped (Ctrl-C, SIGTERM: the runner calls
    `stop`), it sends SIGTERM itself, waits up to STOP_GRACE_S, then SIGKILLs what is left. Each child leads a
    process group of its own: a Ctrl-C in the terminal reaches the launcher only, which stops the cells as above (a
    SIGINT would end a training step without a checkpoint), and `stop` signals a cell with any process it started.

    With `devices_per_cell` (config.local, `local_config`), each cell gets a group of devices of its own through
    the environment (CUDA_VISIBLE_DEVICES=2,3): 8 one-GPU cells at once on an 8-GPU node, or one cell over all 8;
    `slots` is then how many cells can run at once."""

    STOP_GRACE_S = 120.0   # a checkpoint of a local (small) model is written in seconds; a bucket may take longer

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        self.cfg = cfg
        self._running: set[subprocess.Popen] = set()
        self._mutex = threading.Lock()
        self._stopping = False
        per_cell = int(cfg.get("devices_per_cell", 0)) if cfg else 0
        self._env_name = cfg.get("visible_devices_env", "CUDA_VISIBLE_DEVICES") if cfg else "CUDA_VISIBLE_DEVICES"
        self.pool = None
        if per_cell:
            listed = [d.strip() for d in str(cfg.get("devices", "")).split(",") if d.strip()]
            self.pool = DevicePool(listed or detected_devices(self._env_name), per_cell)
        self.slots = len(self.pool.groups) if self.pool else None

    def commands(self, job: Job) -> list[list[str]]:
        argv = list(job.argv)
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        return [argv]

    def run(self, job: Job, log_path: str) -> int:
        if self.pool is None:
            return self._run(job, log_path, None)
        with self.pool.lease(cancelled=lambda: self._stopping) as devices:
            if devices is None:
                return -signal.SIGTERM
            return self._run(job, log_path, {**os.environ, self._env_name: ",".join(devices)})

    def _run(self, job: Job, log_path: str, env: dict | None) -> int:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        rc = 0
        for argv in self.commands(job):
            with open(log_path, "ab") as log:
                with self._mutex:   # no child starts once `stop` has begun
                    if self._stopping:
                        return -signal.SIGTERM
                    proc = subprocess.Popen(with_parent_death(argv, os.getpid()), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
                                            process_group=0, env=env)
                    self._running.add(proc)
                try:
                    rc = proc.wait()   # in this thread: see with_parent_death
                finally:
                    with self._mutex:
                        self._running.discard(proc)
            if rc:
                break
        return rc

    def stop(self, grace_s: float | None = None) -> None:
        """Stops every running child and starts no other: SIGTERM to each one's process group, SIGKILL to those still
        running after `grace_s` (default STOP_GRACE_S) or at a second Ctrl-C; returns once all have exited."""
        with self._mutex:
            self._stopping = True
            procs = list(self._running)
        grace_s = self.STOP_GRACE_S if grace_s is None else grace_s
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        try:
            for proc in procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        except KeyboardInterrupt:   # a second Ctrl-C: kill them now
            pass
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
        for proc in procs:
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the child's process group (it leads one: process_group=0), or to the child alone if that is gone."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
