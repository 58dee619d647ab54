"""Run one job on one worker of a TPU slice, detached, and report it through the bucket (the tpu grid backend).

    nohup .venv/bin/python -m launch.worker --status_dir=gs://B/grid/cells/x/attempts/002 -- \
        python -m launch.cell --job_dir=gs://B/grid/cells/x --distributed &

Writes <status_dir>/worker-<i>.json: {"state": "running", "beats": n, ...} when it starts and every --heartbeat_s,
then {"state": "exited", "exit_code": c, "signal": name or null, ...} when the job ends; the job's output goes to
logs/attempt-<attempt>.log here and is copied to <status_dir>/worker-<i>.log every --log_every_s and at the end
(before the final status, so a reader who sees "exited" finds the whole log). The launcher polls those objects:
a dropped ssh connection, or a launcher restarted, costs the job nothing.

Worker i: --worker, else TPU_WORKER_ID, JAX_PROCESS_ID, the TPU VM's hostname (…-w-<i>), the metadata server.
One job per VM: a job of an earlier attempt still running here (logs/worker.pid) is stopped first (SIGTERM to its
process group, then SIGKILL after --stop_grace_s), so that it saves its checkpoint and frees the TPU; the same
attempt started twice (an ssh retried after a drop) runs once.

    .venv/bin/python -m launch.worker --stop      # SIGTERM to the job running here (the launcher is stopping)
"""

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from absl import flags, logging

flags.DEFINE_string("status_dir", "", "Where this attempt's worker-<i>.json and worker-<i>.log go (a bucket).")
flags.DEFINE_integer("worker", -1, "This worker's index (-1: from the environment; see the module docstring).")
flags.DEFINE_float("heartbeat_s", 30.0, "Seconds between heartbeats (the launcher gives up on silent workers).")
flags.DEFINE_float("log_every_s", 300.0, "Seconds between copies of the job's log to the bucket.")
flags.DEFINE_float("stop_grace_s", 300.0, "How long an earlier job here may take to stop (save its checkpoint).")
flags.DEFINE_string("pidfile", "logs/worker.pid", "Which job runs on this VM (relative to the working directory).")
flags.DEFINE_bool("stop", False, "Only send SIGTERM to the job running on this VM (its process group), and return.")
FLAGS = flags.FLAGS

METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"


def worker_index(explicit: int, environ=os.environ, hostname: str | None = None) -> int:
    if explicit >= 0:
        return explicit
    for key in ("TPU_WORKER_ID", "JAX_PROCESS_ID"):
        if environ.get(key, "").isdigit():
            return int(environ[key])
    match = re.search(r"-w-(\d+)$", hostname or socket.gethostname())
    if match:
        return int(match.group(1))
    try:
        request = urllib.request.Request(METADATA, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=5) as r:
            return int(r.read().decode().strip())
    except (OSError, ValueError) as e:
        raise SystemExit(f"launch.worker: cannot tell which worker this is ({e}); pass --worker") from e


def _exists(path: str) -> bool:
    from etils import epath
    return epath.Path(path).exists()


def _alive_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"launch.worker" in f.read()
    except OSError:
        return False


def take_over(pidfile: str, status_dir: str, grace_s: float) -> bool:
    """Claim this VM for the attempt: False if this very attempt runs here already; an earlier one is stopped.
    One worker at a time reads and writes the pidfile (an exclusive flock on <pidfile>.lock, released when this
    returns): two started at once for the same attempt would otherwise both find no job and both run it."""
    os.makedirs(os.path.dirname(pidfile) or ".", exist_ok=True)
    with open(pidfile + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _take_over(pidfile, status_dir, grace_s)


def _take_over(pidfile: str, status_dir: str, grace_s: float) -> bool:
    try:
        with open(pidfile) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        earlier = None
    if earlier and _alive_worker(earlier["pid"]):
        if earlier["status_dir"] == status_dir:
            return False
        logging.warning("stopping the job of %s (pid %d) first", earlier["status_dir"], earlier["pid"])
        group = os.getpgid(earlier["pid"])
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(1)
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)
    with open(pidfile + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "status_dir": status_dir}, f)
    os.replace(pidfile + ".tmp", pidfile)
    return True


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


class Reporter:
    """The worker's status and log objects; a bucket error is logged and retried at the next beat, never fatal."""

    def __init__(self, status_dir: str, worker: int, log_path: str, command: list[str]):
        self.status = os.path.join(status_dir, f"worker-{worker}.json")
        self.log_object = os.path.join(status_dir, f"worker-{worker}.log")
        self.log_path = log_path
        self.base = dict(worker=worker, host=socket.gethostname(), pid=os.getpid(), command=command,
                         started=time.time())
        self.beats = self.log_bytes = 0

    def copy_log(self) -> None:
        from etils import epath
        with open(self.log_path, "rb") as f:
            data = f.read()
        if len(data) != self.log_bytes:
            epath.Path(self.log_object).write_bytes(data)
            self.log_bytes = len(data)

    def write(self, state: str, **extra) -> None:
        from vlm_jax import files
        self.beats += 1
        files.write_json_atomic(self.status, dict(self.base, state=state, beats=self.beats, time=time.time(),
                                                  log_bytes=self.log_bytes, **extra))

    def safely(self, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:  # a bucket hiccup must not end the job it watches
            logging.warning("launch.worker: %s failed: %s", fn.__name__, e)
            return False


def stop(pidfile: str) -> None:
    """SIGTERM to the job this VM runs (the launcher is stopping): it saves its checkpoint and exits 75."""
    try:
        with open(pidfile) as f:
            pid = json.load(f)["pid"]
    except (OSError, ValueError, KeyError):
        print("launch.worker: no job runs here", flush=True)
        return
    if _alive_worker(pid):
        os.killpg(os.getpgid(pid), signal.SIGTERM)
        print(f"launch.worker: sent SIGTERM to the job of pid {pid}", flush=True)


def main(argv):
    if FLAGS.stop:
        stop(FLAGS.pidfile)
        return
    if not FLAGS.status_dir:
        raise SystemExit("launch.worker: --status_dir is required")
    command = list(argv[1:])
    if not command:
        raise SystemExit("launch.worker: no job command (give it after --)")
    if command[0] == "python":
        command[0] = sys.executable
    status_dir = FLAGS.status_dir.rstrip("/")
    worker = worker_index(FLAGS.worker)
    reporter = Reporter(status_dir, worker, os.path.join("logs", f"attempt-{os.path.basename(status_dir)}.log"),
                        command)
    try:   # first, so that the group a later attempt stops (take_over) is this worker's from the start
        os.setsid()   # its own session and process group: no hang-up from ssh, one group to stop
    except OSError:
        pass   # already a group leader (started by setsid)
    if _exists(reporter.status) or not take_over(FLAGS.pidfile, status_dir, FLAGS.stop_grace_s):
        print(f"launch.worker: {status_dir} already started on this worker", flush=True)
        return
    # The preemption notice (SIGTERM) reaches the job too: this process keeps beating while the job saves its
    # checkpoint, and reports how it ended. A Python-level handler, not SIG_IGN: the job starts with the default.
    signal.signal(signal.SIGTERM, lambda *_: logging.warning("launch.worker: SIGTERM; waiting for the job"))
    os.makedirs("logs", exist_ok=True)
    with open(reporter.log_path, "ab") as log:
        log.write(f"launch.worker {worker}: {' '.join(command)}\n".encode())
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    reporter.safely(reporter.write, "running")
    last_copy = time.monotonic()
    while True:
        try:
            child.wait(timeout=FLAGS.heartbeat_s)
            break
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() - last_copy >= FLAGS.log_every_s:
            reporter.safely(reporter.copy_log)
            last_copy = time.monotonic()
        reporter.safely(reporter.write, "running")
    code = child.returncode
    sig = signal.Signals(-code).name if code < 0 else None
    code = 128 - code if code < 0 else code
    for _ in range(5):   # the final word: retried, the launcher waits for it
        if reporter.safely(reporter.copy_log) and reporter.safely(reporter.write, "exited", exit_code=code,
                                                                   signal=sig):
            break
        time.sleep(10)
    sys.exit(code)


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
