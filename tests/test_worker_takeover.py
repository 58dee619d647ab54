"""launch.worker's claim of a TPU VM (take_over): one job per VM, the same attempt run once however many times its
start is retried, an earlier attempt's job stopped first."""

import os
import subprocess
import sys
import threading
import time

from launch import worker


def test_the_same_attempt_started_twice_at_once_runs_once(tmp_path, monkeypatch):
    """Two starts of one attempt (an ssh retried while the first still ran) reach take_over together; a slow disk
    between reading the pidfile and writing it lets both read "no job here" unless they take turns."""
    pidfile = str(tmp_path / "logs" / "worker.pid")
    monkeypatch.setattr(worker, "_alive_worker", lambda pid: pid == os.getpid())   # (both are this process)
    real_open = open

    def slow_open(path, *args, **kwargs):   # after the pidfile is read (found or not), a pause
        try:
            return real_open(path, *args, **kwargs)
        finally:
            if str(path) == pidfile:
                time.sleep(0.3)
    monkeypatch.setattr(worker, "open", slow_open, raising=False)
    claimed, start = [], threading.Barrier(2)

    def start_worker():
        start.wait()
        claimed.append(worker.take_over(pidfile, "gs://b/grid/cells/x/attempts/002", grace_s=5))
    threads = [threading.Thread(target=start_worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == [False, True]


def test_a_later_attempt_stops_the_earlier_job_on_the_vm_first(tmp_path):
    pidfile = str(tmp_path / "worker.pid")
    # The earlier attempt's worker (its command line names launch.worker), leading a process group of its own;
    # collected as soon as it ends (on a VM, init does that: a zombie would still count as its group).
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "launch.worker"],
                               process_group=0)
    ended = {}
    reaper = threading.Thread(target=lambda: ended.setdefault("code", earlier.wait()))
    reaper.start()
    try:
        with open(pidfile, "w") as f:
            f.write(f'{{"pid": {earlier.pid}, "status_dir": "gs://b/x/attempts/001"}}')
        start = time.monotonic()
        assert worker.take_over(pidfile, "gs://b/x/attempts/002", grace_s=30)
        reaper.join(10)
        assert ended.get("code") == -15 and time.monotonic() - start < 10   # SIGTERM to its group, then no wait
        with open(pidfile) as f:
            assert f.read() == f'{{"pid": {os.getpid()}, "status_dir": "gs://b/x/attempts/002"}}'
    finally:
        if earlier.poll() is None:
            earlier.kill()
        reaper.join(10)
