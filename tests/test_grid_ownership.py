"""One writer per cell: the ownership lock (exclusive; a live owner respected; a dead, recycled or lapsed one taken
over; on a disk and on a bucket), no cell outliving its launcher, and two launchers on one grid training each cell
once. Every wait here has a deadline, so a bug fails a test instead of hanging it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests import gcs_emulator, helpers
from vlm_jax.grid import backends, ownership, results, runner
from vlm_jax.grid.spec import GridJob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gcs_bucket = gcs_emulator.gcs_bucket   # the fixture (a real GCS emulator), for the bucket tests


def _listing(folder) -> list[str]:
    """Every path under `folder`, relative to it (for a failure's message)."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: it only waits to be collected), read from /proc directly."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def _python(code: str, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """A fresh interpreter running `code` with the repository importable."""
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + code, *args],
                            env={**os.environ, **(env or {})}, **popen)


@pytest.fixture
def reap():
    """Processes a test started (Popen objects or PIDs of their children), killed at its end, however it ended:
    a failing test leaves nothing running."""
    started = []
    yield started
    for p in started:
        pid = p.pid if isinstance(p, subprocess.Popen) else p
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if isinstance(p, subprocess.Popen):
            p.wait(10)


def _remote_record(lease_s: float, age_s: float) -> dict:
    """A lock record as another machine writes it, renewed `age_s` seconds ago."""
    return {"host": "elsewhere", "pid": 4242, "start": 1, "machine": "another-boot/pid:[1]", "role": "cell",
            "token": "theirs", "time": time.time() - age_s, "lease_s": lease_s}


def _plant(job_dir: str, record: dict) -> None:
    """Writes `record` as the lock of `job_dir`, as its owner's exclusive creation would."""
    assert ownership._store(ownership.lock_path(job_dir)).create(ownership._encode(record)) is not None


# (a) The lock, in a local folder.

HOLD = textwrap.dedent("""
    import os, sys, time
    from vlm_jax.grid import ownership
    job_dir, go, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if go:   # a start line: all racers are ready before any tries
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.005)
    try:
        lock = ownership.Lock(job_dir, renew_s=0.2, lease_s=5).acquire()
    except ownership.Owned as e:
        print("owned", e.record["pid"], flush=True)
        sys.exit(0)
    print("won", "took_over" if lock.took_over else "fresh", flush=True)
    time.sleep(seconds)
    lock.release()
""")


def test_only_one_of_several_racing_processes_takes_the_lock(tmp_path, reap):
    job_dir, go = str(tmp_path / "cell"), str(tmp_path / "go")
    procs = [_python(HOLD, job_dir, go, "2", stdout=subprocess.PIPE, text=True) for _ in range(6)]
    reap += procs
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 6
    open(go, "w").close()
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    winners = [p.pid for p, out in zip(procs, outs) if out[0] == "won"]
    assert len(winners) == 1, outs
    assert all(out == ["owned", str(winners[0])] for out in outs if out[0] == "owned")   # each loser names the winner
    assert not os.path.exists(ownership.lock_path(job_dir))   # released by its owner


def test_a_live_owner_is_respected_and_a_killed_one_taken_over(tmp_path, reap):
    job_dir = str(tmp_path / "cell")
    holder = _python(HOLD, job_dir, "", "600", stdout=subprocess.PIPE, text=True)
    reap.append(holder)
    assert holder.stdout.readline().split() == ["won", "fresh"]
    with pytest.raises(ownership.Owned) as owned:
        ownership.Lock(job_dir).acquire()
    assert owned.value.record["pid"] == holder.pid and f"pid {holder.pid}" in str(owned.value)
    assert ownership.owner(job_dir)["pid"] == holder.pid
    holder.kill()   # SIGKILL: no release; not yet collected either (a zombie is not an owner)
    _wait_until(lambda: not _alive(holder.pid), 10, "the killed holder to die")
    assert ownership.owner(job_dir) is None and ownership.read(job_dir)["pid"] == holder.pid
    with ownership.Lock(job_dir, renew_s=None) as lock:
        assert lock.took_over["pid"] == holder.pid
        assert ownership.owner(job_dir)["pid"] == os.getpid()
    assert ownership.read(job_dir) is None


def test_a_recycled_pid_is_not_mistaken_for_the_owner(tmp_path):
    """The PID of a dead owner, now another live process (here: this one), with another start time: stale."""
    job_dir = str(tmp_path / "cell")
    mine = ownership.new_record("cell", 60)
    assert ownership.alive(mine)
    _plant(job_dir, dict(mine, start=mine["start"] - 1, token="old"))
    with ownership.Lock(job_dir, renew_s=None) as lock:
        assert lock.took_over["token"] == "old" and lock.took_over["pid"] == os.getpid()


def test_an_owner_on_another_machine_holds_its_lease_while_it_renews_it(tmp_path, monkeypatch):
    job_dir = str(tmp_path / "cell")
    _plant(job_dir, _remote_record(lease_s=30, age_s=5))   # renewed 5 s ago: alive, whatever its PID here
    with pytest.raises(ownership.Owned, match="host elsewhere pid 4242"):
        ownership.Lock(job_dir).acquire()
    os.remove(ownership.lock_path(job_dir))
    _plant(job_dir, _remote_record(lease_s=30, age_s=31))   # not renewed for longer than its lease: stale
    with ownership.Lock(job_dir, renew_s=None) as lock:
        assert lock.took_over["host"] == "elsewhere"

    # A real renewing owner, seen from another machine: alive past its lease time; once its renewals stop (a network
    # outage), stale after one lease; taken over, it learns at its next renewal that the lock is lost.
    monkeypatch.setattr(ownership, "_machine", lambda: "another-boot/pid:[1]")
    lost = threading.Event()
    holder = ownership.Lock(job_dir, renew_s=0.05, lease_s=0.5, on_lost=lambda lock: lost.set()).acquire()
    monkeypatch.undo()
    try:
        time.sleep(1.0)
        assert ownership.owner(job_dir)["token"] == holder.record["token"]
        real_replace = holder._store.replace

        def network_down(*_):
            raise OSError("network down")

        holder._store.replace = network_down
        taker = _wait_until(lambda: _try_acquire(job_dir), 5, "the lapsed lease to be taken over")
        assert taker.took_over["token"] == holder.record["token"]
        holder._store.replace = real_replace
        assert lost.wait(5)
        holder.release()   # not its lock any more: left alone
        assert ownership.read(job_dir)["token"] == taker.record["token"]
        taker.release()
    finally:
        holder.release()


def _try_acquire(job_dir):
    try:
        return ownership.Lock(job_dir, renew_s=None).acquire()
    except ownership.Owned:
        return None


def test_a_launchers_lock_passes_to_a_cell_but_to_no_other_launcher(tmp_path):
    """The launcher holds a job's lock while its process comes up; that process (a cell) takes it over, live; no other
    launcher does, and nothing takes a live cell's lock."""
    job_dir = str(tmp_path / "cell")
    handed = threading.Event()
    launcher = ownership.Lock(job_dir, role="launcher", renew_s=0.05, on_lost=lambda lock: handed.set()).acquire()
    with pytest.raises(ownership.Owned):
        ownership.Lock(job_dir, role="launcher").acquire()
    cell = ownership.Lock(job_dir, role="cell", renew_s=None).acquire()
    assert cell.took_over is None and ownership.owner(job_dir)["role"] == "cell"
    assert handed.wait(5)   # the launcher's next renewal finds it handed over
    launcher.release()   # leaves the cell's lock alone
    for role in ("launcher", "cell"):
        with pytest.raises(ownership.Owned):
            ownership.Lock(job_dir, role=role).acquire()
    cell.release()
    assert ownership.read(job_dir) is None


def test_renewal_refreshes_the_time_and_release_removes_only_its_own_lock(tmp_path):
    job_dir = str(tmp_path / "cell")
    lock = ownership.Lock(job_dir, renew_s=0.05).acquire()
    first = ownership.read(job_dir)["time"]
    _wait_until(lambda: ownership.read(job_dir)["time"] > first, 5, "a renewal")
    lock.release()
    assert ownership.read(job_dir) is None
    lock.release()   # twice: nothing


# The launcher's side: it writes nothing into a cell another live process owns.

def _fake_jobs(grid: str, n: int) -> list[GridJob]:
    return [GridJob(f"c{i}", os.path.join(grid, "cells", f"c{i}"),
                    {"row": {"cell": f"c{i}", "n_params": 1, "visual_tokens": 1}, "stages": [], "eval": None})
            for i in range(n)]


class _Recording(backends.LocalBackend):
    def __init__(self):
        super().__init__()
        self.started = []

    def commands(self, job):
        self.started.append(job.name)
        return [[sys.executable, "-c", "raise SystemExit(3)"]]


def _run_jobs_in_thread(*args, **kwargs):
    """runner.run_jobs with a deadline."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(progress=runner.run_jobs(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "run_jobs did not return"
    return out["progress"]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_launcher_skips_or_waits_for_an_owned_cell_and_writes_nothing_there(where, tmp_path, monkeypatch, request):
    grid = request.getfixturevalue("gcs_bucket") + f"/grid-{os.getpid()}" if where == "bucket" else str(tmp_path)
    monkeypatch.chdir(tmp_path)   # a bucket job's log goes to runs/grid-logs/ here
    (job,) = _fake_jobs(grid, 1)
    _plant(job.dir, _remote_record(lease_s=60, age_s=0))
    backend, lines = _Recording(), []
    progress = _run_jobs_in_thread([], [job], backend, 1, echo=lines.append, if_owned="skip")
    assert backend.started == [] and (progress.done, progress.failed, progress.skipped) == (0, 0, 1)
    assert any("c0: owned by host elsewhere pid 4242" in x and "skipped" in x for x in lines), lines
    assert not results.exists(os.path.join(job.dir, "job.json")) and results.read_result(job.dir) is None

    # Waiting: the lease lapses (its owner is gone), the lock is taken over, saying so, and the job runs here.
    store = ownership._store(ownership.lock_path(job.dir))
    assert store.replace(ownership._encode(_remote_record(lease_s=1.0, age_s=0)), store.read()[1])
    monkeypatch.setattr(runner, "WAIT_POLL_S", 0.1)
    lines.clear()
    progress = _run_jobs_in_thread([], [job], backend, 1, echo=lines.append)
    assert backend.started == ["c0"] and progress.failed == 1   # (the stand-in command fails)
    assert any("c0: owned by host elsewhere pid 4242" in x and "waiting for it" in x for x in lines), lines
    assert any("its owner stopped before the end; running it here" in x for x in lines), lines
    assert any("c0: the lock of host elsewhere pid 4242, no longer running, taken over" in x for x in lines), lines
    assert results.read_result(job.dir)["error"] == "exit code 3 and no result.json"


def test_launch_cell_exits_73_and_writes_nothing_when_its_directory_is_owned(tmp_path):
    """The real launch.cell (after its re-execution and JAX start-up) finds the lock held and leaves."""
    job_dir = str(tmp_path / "cell")
    with ownership.Lock(job_dir, renew_s=None):
        out = subprocess.run([sys.executable, "-m", "launch.cell", f"--job_dir={job_dir}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert ownership.read(job_dir)["pid"] == os.getpid()
    assert out.returncode == ownership.EXIT_OWNED, out.stderr[-3000:]
    assert "is owned by host" in out.stderr and f"pid {os.getpid()}" in out.stderr
    assert sorted(os.listdir(job_dir)) == [".owner.guard"]


# (b) No orphans: a launcher's cells end with it.

FAKE_CELL = textwrap.dedent("""
    import ctypes, os, signal, sys, time
    from vlm_jax.grid import backends
    job_dir, mode = sys.argv[1], sys.argv[2]
    if len(sys.argv) == 3:   # re-execute once, as launch.cell does (launch/runtime.py)
        os.execv(sys.executable, [sys.executable, *sys.argv, "again"])
    sig = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig))   # PR_GET_PDEATHSIG, after the execve
    backends.forward_parent_death()   # as launch.cell does
    stopping = []

    def on_term(*_):   # as a training cell: note it, and exit after a while (its checkpoint)
        stopping.append(time.monotonic())
        with open(os.path.join(job_dir, "terminated"), "a") as f:
            f.write("SIGTERM\\n")

    signal.signal(signal.SIGTERM, on_term)
    with open(os.path.join(job_dir, "cell.pid.tmp"), "w") as f:
        f.write(f"{os.getpid()} {sig.value}")
    os.replace(os.path.join(job_dir, "cell.pid.tmp"), os.path.join(job_dir, "cell.pid"))
    while not (stopping and mode != "stubborn" and time.monotonic() > stopping[0] + 0.5):
        time.sleep(0.02)
""")

LAUNCHER = textwrap.dedent("""
    import signal, sys
    # Ctrl-C reaches the launcher as at a terminal, whatever the test process passed on: a job started in the
    # background by a shell without job control (`cmd &`, nohup) ignores SIGINT, and so would every child of it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    from vlm_jax.grid import backends, results, runner
    from vlm_jax.grid.spec import GridJob
    grid, n, parallel, if_owned, cell_script, mode, grace = sys.argv[1:8]
    jobs = [GridJob(f"c{i}", f"{grid}/cells/c{i}", {"row": {"cell": f"c{i}", "n_params": 1, "visual_tokens": 1},
                                                     "stages": [], "eval": None}) for i in range(int(n))]

    class Fake(backends.LocalBackend):
        STOP_GRACE_S = float(grace)

        def commands(self, job):   # job.argv: python -m launch.cell --job_dir=DIR
            return [[sys.executable, cell_script, job.argv[-1].split("=", 1)[1], mode]]

    p = runner.run_jobs([], jobs, Fake(), int(parallel), echo=lambda line: print(line, flush=True),
                        if_owned=if_owned)
    print("END", p.done, p.failed, p.skipped, flush=True)
    print("TABLE", results.write_table(f"{grid}/table-{sys.argv[8]}.jsonl", jobs), flush=True)
""")


def _start_launcher(tmp_path, grid, n, parallel, cell_code, mode="plain", if_owned="wait", grace=60, tag="0",
                    prelude="", env=None):
    cell_script = tmp_path / "cell.py"
    cell_script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + cell_code)
    return _python(prelude + LAUNCHER, str(grid), str(n), str(parallel), if_owned, str(cell_script), mode,
                   str(grace), tag, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cell_pids(jobs, timeout=30):
    def read():
        pids = []
        for job in jobs:
            path = os.path.join(job.dir, "cell.pid")
            if not os.path.exists(path):
                return None
            pids.append(tuple(int(x) for x in open(path).read().split()))
        return pids
    return _wait_until(read, timeout, "every cell to start")


def test_a_killed_launcher_leaves_no_cell_running(tmp_path, reap):
    grid = tmp_path / "grid"
    jobs = _fake_jobs(str(grid), 2)
    # Both cells at once, from two of the pool's eight threads: as the dying launcher's threads end one by one, the
    # kernel signals each cell again; it must see one SIGTERM (a second one tells a training cell "exit now").
    launcher = _start_launcher(tmp_path, grid, 2, 8, FAKE_CELL)
    reap.append(launcher)
    cells = _cell_pids(jobs)
    reap += [pid for pid, _ in cells]
    assert [sig for _, sig in cells] == [backends.PARENT_DEATH_SIGNAL] * 2   # set, and kept through the execve
    launcher.kill()   # SIGKILL: the launcher runs nothing more
    launcher.wait(10)
    start = time.monotonic()
    _wait_until(lambda: not any(_alive(pid) for pid, _ in cells), 10, "the orphaned cells to end")
    print(f"cells ended {time.monotonic() - start:.2f}s after the launcher's SIGKILL")
    assert [open(os.path.join(job.dir, "terminated")).read() for job in jobs] == ["SIGTERM\n"] * 2


ONE_FORWARD = textwrap.dedent("""
    import os, signal, time
    from vlm_jax.grid import backends
    terms = []
    signal.signal(signal.SIGTERM, lambda *_: terms.append(time.monotonic()))
    backends.forward_parent_death()
    forward = signal.getsignal(backends.PARENT_DEATH_SIGNAL)
    forward(backends.PARENT_DEATH_SIGNAL, None)   # the first signal from the dying launcher
    forward(backends.PARENT_DEATH_SIGNAL, None)   # a repeat that came in before that call could ignore it
    os.kill(os.getpid(), backends.PARENT_DEATH_SIGNAL)   # a later repeat
    time.sleep(0.2)
    print("SIGTERMS", len(terms), flush=True)
""")


def test_a_repeated_parent_death_signal_becomes_one_sigterm_even_when_its_handler_runs_twice():
    """CPython may run the handler a second time for a repeat that arrived while the first call ran (the main
    thread can give up the interpreter lock mid-handler). A second SIGTERM tells a training cell "exit now, without
    a checkpoint", so the handler itself must act once."""
    out = subprocess.run([sys.executable, "-c", ONE_FORWARD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SIGTERMS 1" in out.stdout, out.stdout + out.stderr[-3000:]
    assert out.stderr.count("the launcher is gone") == 1, out.stderr


@pytest.mark.parametrize("how,mode,code", [(signal.SIGINT, "plain", 130), (signal.SIGTERM, "plain", 143),
                                           (signal.SIGTERM, "stubborn", 143)])
def test_a_stopped_launcher_stops_its_cells_and_waits_for_them(tmp_path, reap, how, mode, code):
    """Ctrl-C or SIGTERM: the cells get SIGTERM (a stubborn one SIGKILL after the grace period), the launcher exits
    after them, records none as failed, and starts no other cell."""
    grid = tmp_path / "grid"
    jobs = _fake_jobs(str(grid), 3)
    launcher = _start_launcher(tmp_path, grid, 3, 2, FAKE_CELL, mode=mode, grace=1.5)
    reap.append(launcher)
    cells = _cell_pids(jobs[:2])   # (the third waits for a free slot)
    reap += [pid for pid, _ in cells]
    os.kill(launcher.pid, how)
    out = launcher.communicate(timeout=120)[0]   # seconds when idle; a loaded 2-core machine has taken over 30
    assert launcher.returncode == code, out
    assert not any(_alive(pid) for pid, _ in cells)   # ended before the launcher did
    assert all(open(os.path.join(job.dir, "terminated")).read() == "SIGTERM\n" for job in jobs[:2])
    assert not os.path.exists(os.path.join(jobs[2].dir, "cell.pid"))   # never started
    assert all(results.read_result(job.dir) is None for job in jobs), out   # stopped, not failed
    assert "stopping: 2 running job(s)" in out and "stopped; a re-run resumes" in out


# In the launcher: once two cells run, the signal goes to one of the pool's threads (each waits for its cell), as
# the kernel may deliver a Ctrl-C or SIGTERM sent to the process.
TO_A_POOL_THREAD = textwrap.dedent("""
    import os, signal, sys, threading, time

    def deliver(how, pids):
        while not all(os.path.exists(p) for p in pids):
            time.sleep(0.05)
        pool = [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]
        print(f"signal {how} to thread {pool[0].name}", flush=True)
        signal.pthread_kill(pool[0].ident, how)
    threading.Thread(target=deliver, daemon=True, args=(
        int(os.environ["TO_A_POOL_THREAD"]), [f"{sys.argv[1]}/cells/c{i}/cell.pid" for i in (0, 1)])).start()
""")


@pytest.mark.parametrize("how,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_launcher_stops_when_the_signal_reaches_another_of_its_threads(tmp_path, reap, how, code):
    """Python runs a signal's handler in the main thread only; a main thread waiting without a timeout would
    sleep through a signal the kernel gave to a pool thread, and the launcher would never stop (a CI run hung so).
    It wakes to look, and stops its cells as for a signal it received itself."""
    grid = tmp_path / "grid"
    jobs = _fake_jobs(str(grid), 3)
    launcher = _start_launcher(tmp_path, grid, 3, 2, FAKE_CELL, grace=1.5, prelude=TO_A_POOL_THREAD,
                               env={"TO_A_POOL_THREAD": str(int(how))})
    reap.append(launcher)
    cells = _cell_pids(jobs[:2])
    reap += [pid for pid, _ in cells]
    out = launcher.communicate(timeout=60)[0]
    assert f"signal {int(how)} to thread ThreadPoolExecutor" in out
    assert launcher.returncode == code, out
    assert not any(_alive(pid) for pid, _ in cells)
    assert all(open(os.path.join(job.dir, "terminated")).read() == "SIGTERM\n" for job in jobs[:2])
    assert not os.path.exists(os.path.join(jobs[2].dir, "cell.pid"))
    assert all(results.read_result(job.dir) is None for job in jobs), out
    assert "stopping: 2 running job(s)" in out and "stopped; a re-run resumes" in out


def test_a_child_whose_parent_died_before_it_asked_ends_at_once(tmp_path):
    """The race with_parent_death closes: the launcher died between fork and prctl (here: the 'parent' it expects
    is another process), so the kernel would never signal the child; it ends before running anything."""
    marker = tmp_path / "ran"
    argv = backends.with_parent_death([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], parent_pid=1)
    assert subprocess.run(argv, timeout=30).returncode == 128 + backends.PARENT_DEATH_SIGNAL and not marker.exists()
    assert subprocess.run(backends.with_parent_death(argv[-3:], os.getpid()), timeout=30).returncode == 0
    assert marker.exists()


def test_the_parent_death_signal_follows_the_thread_that_started_the_child(tmp_path, reap):
    """Why LocalBackend.run waits in the thread that started its child: a child started from a thread that then
    ends gets SIGTERM, though its launcher lives; one started through a pool thread, which lives on, does not."""
    orphaned, running = {}, tmp_path / "running"

    def start_and_leave():   # (once the child has asked for the signal: before, it would bind to the next thread)
        orphaned["proc"] = subprocess.Popen(backends.with_parent_death(
            [sys.executable, "-c", f"import time; open({str(running)!r}, 'w'); time.sleep(60)"], os.getpid()))
        _wait_until(running.exists, 30, "the child to run")

    thread = threading.Thread(target=start_and_leave)
    thread.start()
    thread.join()
    reap.append(orphaned["proc"])
    assert orphaned["proc"].wait(timeout=30) == -backends.PARENT_DEATH_SIGNAL

    import concurrent.futures

    backend = backends.LocalBackend()
    job = backends.Job("j", (sys.executable, "-c", "import time; time.sleep(1.5)"))
    quick = backends.Job("q", (sys.executable, "-c", "pass"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(backend.run, job, str(tmp_path / "slow.txt"))
        assert pool.submit(backend.run, quick, str(tmp_path / "quick.txt")).result(timeout=30) == 0
        assert slow.result(timeout=30) == 0


# (c) Two launchers at once on one grid directory.

COUNTING_CELL = textwrap.dedent("""
    import json, os, sys, time
    from vlm_jax import files
    from vlm_jax.grid import ownership, results
    job_dir = sys.argv[1]
    try:
        with ownership.held(job_dir):
            spec = json.load(open(os.path.join(job_dir, "job.json")))
            with open(os.path.join(job_dir, "starts.txt"), "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(1.0)
            files.write_json_atomic(os.path.join(job_dir, "result.json"), {
                "status": "ok", "spec_digest": results.spec_digest(spec),
                "rows": [dict(spec["row"], task="t", accuracy=0.5)]})
    except ownership.Owned as e:
        print(e, file=sys.stderr)
        sys.exit(ownership.EXIT_OWNED)
""")


@pytest.mark.parametrize("if_owned", ["wait", "skip"])
def test_two_launchers_at_once_run_every_cell_exactly_once(tmp_path, reap, if_owned):
    grid = tmp_path / "grid"
    jobs = _fake_jobs(str(grid), 5)
    launchers = [_start_launcher(tmp_path, grid, 5, 2, COUNTING_CELL, if_owned=if_owned, tag=str(i)) for i in (0, 1)]
    reap += launchers   # (their cells end with them)
    outs = [p.communicate(timeout=120)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outs
    starts = {job.name: open(os.path.join(job.dir, "starts.txt")).read().split() for job in jobs}
    assert all(len(s) == 1 for s in starts.values()), starts
    ends = [[int(x) for x in next(line for line in out.splitlines() if line.startswith("END")).split()[1:]]
            for out in outs]
    assert all(failed == 0 for _, failed, _ in ends), outs
    if if_owned == "wait":   # each launcher ends with every cell done, and the same table
        assert all(done == 5 and skipped == 0 for done, _, skipped in ends), outs
        tables = [open(grid / f"table-{i}.jsonl").read() for i in (0, 1)]
        assert tables[0] == tables[1] and len(tables[0].splitlines()) == 5
    else:
        assert all(done + skipped == 5 for done, _, skipped in ends) and ends[0][0] + ends[1][0] >= 5, outs
    assert all(ownership.read(job.dir) is None for job in jobs)   # every lock released


# (d) The lock on a bucket (a real GCS emulator: generation preconditions on the server).

def test_bucket_lock_is_exclusive_and_renewed_as_a_lease(gcs_bucket, monkeypatch):
    job_dir = f"{gcs_bucket}/grid-{os.getpid()}/cells/a"
    lock = ownership.Lock(job_dir, renew_s=0.1).acquire()
    try:
        with pytest.raises(ownership.Owned, match=f"pid {os.getpid()}"):
            ownership.Lock(job_dir).acquire()
        first = lock._version
        _wait_until(lambda: lock._version != first, 5, "a renewal (a new generation)")
        assert ownership.read(job_dir)["time"] > 0 and ownership.owner(job_dir)["token"] == lock.record["token"]
        # A write at a generation that is no longer current is refused by the server: that is what CAS rests on.
        assert lock._store.replace(b"{}", first) is None
        assert lock._store.create(b"{}") is None
    finally:
        lock.release()
    assert ownership.read(job_dir) is None

    # A lapsed lease of another machine's owner, taken over by compare-and-swap; that owner's next renewal fails.
    monkeypatch.setattr(ownership, "_machine", lambda: "another-boot/pid:[1]")
    lost = threading.Event()
    holder = ownership.Lock(job_dir, renew_s=0.1, lease_s=1.0, on_lost=lambda lock: lost.set()).acquire()
    monkeypatch.undo()
    try:
        time.sleep(1.5)   # longer than its lease, but renewed
        assert _try_acquire(job_dir) is None
        real_replace = holder._store.replace
        holder._store.replace = lambda *_: (_ for _ in ()).throw(OSError("network down"))
        taker = _wait_until(lambda: _try_acquire(job_dir), 10, "the lapsed lease to be taken over", poll=0.2)
        assert taker.took_over["token"] == holder.record["token"]
        holder._store.replace = real_replace
        assert lost.wait(10)
        assert ownership.read(job_dir)["token"] == taker.record["token"]
        taker.release()
    finally:
        holder.release()


def test_bucket_lock_of_a_killed_owner_goes_to_exactly_one_of_several_takers(gcs_bucket, tmp_path, reap):
    job_dir = f"{gcs_bucket}/grid-{os.getpid()}/cells/b"
    holder = _python(HOLD, job_dir, "", "600", env=gcs_bucket.env, stdout=subprocess.PIPE, text=True)
    reap.append(holder)
    assert holder.stdout.readline().split() == ["won", "fresh"]
    holder.kill()
    holder.wait(10)
    assert ownership.read(job_dir)["pid"] == holder.pid and ownership.owner(job_dir) is None
    go = str(tmp_path / "go")
    takers = [_python(HOLD, job_dir, go, "2", env=gcs_bucket.env, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    reap += takers
    assert [p.stdout.readline().strip() for p in takers] == ["ready"] * 4
    open(go, "w").close()
    outs = [p.communicate(timeout=60)[0].split() for p in takers]
    assert sorted(out[0] for out in outs) == ["owned"] * 3 + ["won"], outs
    assert ["won", "took_over"] in outs
    assert ownership.read(job_dir) is None


# The real launcher and cells.

def _grid_cli(g, **overrides):
    """`python -m launch.grid` on a grid `helpers.tiny_grid` built (same overrides, so the same jobs)."""
    values = {"dir": g.dir, "cell.train.batch_size": 4, "cell.data.read_threads": 1,
              "tower.overrides.train.steps": 2, "tower.overrides.train.batch_size": 4, "llm_pretrain.pretrain": False,
              "stages.stage1.train.steps": 2, "stages.stage2.train.steps": 3, "eval.synthetic_per_family": 8,
              "eval.batch_size": 8, "parallel": 1, "fit.bootstrap": 20, "seeds": "(0,)", **overrides}
    return [sys.executable, "-m", "launch.grid", "--config=configs/grid.py:smoke,llms=tiny-xs,tokens=1+4",
            *[f"--config.{k}={v}" for k, v in values.items()]]


@pytest.mark.slow   # ~20-30 s: real cells training
def test_killing_the_real_launcher_stops_its_training_cells_with_a_checkpoint(tmp_path, reap):
    g = helpers.tiny_grid(tmp_path)
    with g.unlocked():
        g.tower.pretrain = False
        g.stages.stage1.train.steps = 100000   # still training when the launcher is killed
    _, cells = helpers.grid_jobs(g)
    launcher = subprocess.Popen(_grid_cli(g, **{"tower.pretrain": False, "stages.stage1.train.steps": 100000,
                                                "parallel": 2}),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reap.append(launcher)
    metrics = [os.path.join(c.spec["stages"][0]["config"]["run_dir"], "metrics.jsonl") for c in cells]
    _wait_until(lambda: all(os.path.exists(m) for m in metrics), 240, "both cells to train (logged metrics)", 0.5)
    owners = [ownership.owner(c.dir) for c in cells]
    assert all(o and o["role"] == "cell" for o in owners), owners
    pids = [o["pid"] for o in owners]
    reap += pids
    launcher.kill()
    out = launcher.communicate(timeout=10)[0]
    start = time.monotonic()
    _wait_until(lambda: not any(_alive(pid) for pid in pids), 60, "the cells to end", 0.2)
    assert "os.fork()" not in out, out   # cells start without a fork in Python (JAX warns of those)
    print(f"cells ended {time.monotonic() - start:.1f}s after the launcher's SIGKILL")
    for cell in cells:
        assert ownership.owner(cell.dir) is None
        run_dir = cell.spec["stages"][0]["config"]["run_dir"]
        log = open(os.path.join(cell.dir, "log.txt")).read()
        steps = helpers.saved_steps(run_dir)
        # saved on SIGTERM, mid-stage (on failure: what the cell logged last, and what its checkpoint folder holds)
        assert steps and steps[-1] >= 100, (run_dir, steps, _listing(run_dir), log[-4000:])
        assert log.count("the launcher is gone") == 1 and "stopped on request" in log, log[-4000:]


REAL_LAUNCHER = textwrap.dedent("""
    import pathlib, sys
    from tests import helpers
    from vlm_jax.grid import backends, results, runner
    g = helpers.tiny_grid(pathlib.Path(sys.argv[1]))
    first, cells = helpers.grid_jobs(g)
    todo, _ = runner.select(first + cells, [], retry_failed=False)   # what launch.grid does, without the report
    p = runner.run_jobs([j for j in todo if not j.is_cell], [j for j in todo if j.is_cell], backends.LocalBackend(),
                        1, echo=lambda line: print(line, flush=True))
    print("END", p.done, p.failed, p.skipped, flush=True)
    results.write_table(sys.argv[2], cells)
""")


@pytest.mark.slow   # ~45-90 s: two launchers of real cells (launch.cell) on two cores
def test_two_real_launchers_at_once_train_every_job_once(tmp_path, reap):
    g = helpers.tiny_grid(tmp_path)
    first, cells = helpers.grid_jobs(g)
    procs = [_python(REAL_LAUNCHER, str(tmp_path), str(tmp_path / f"table-{i}.jsonl"), cwd=ROOT,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    reap += procs   # (their cells end with them)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    n = len(first) + len(cells)
    assert all(f"END {n} 0 0" in o for o in outs), outs   # each launcher: every job done, by itself or the other
    assert any("owned by" in o for o in outs), outs   # they met
    for job in first + cells:
        log = open(os.path.join(job.dir, "log.txt")).read()
        for stage in job.spec["stages"]:
            assert log.count(f"stage {stage['name']}: training") == 1, (job.name, stage["name"], log[-3000:])
            lines = [json.loads(x) for x in open(os.path.join(stage["config"]["run_dir"], "metrics.jsonl"))]
            steps = [x["step"] for x in lines]
            assert steps == sorted(set(steps)), (job.name, steps)   # one run: strictly increasing
        assert ownership.read(job.dir) is None
    tables = [open(tmp_path / f"table-{i}.jsonl").read() for i in (0, 1)]
    assert tables[0] == tables[1] and len(tables[0].splitlines()) == 2 * len(cells)   # the same rows
