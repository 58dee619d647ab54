"""A real one-node Slurm cluster on this machine, for the slurm backend's slow tests (no systemd needed; root).

    with slurm_cluster.cluster(folder) as c:   # installs slurm-wlm and munge with apt where sbatch is missing
        ...                                    # sbatch, squeue, scontrol, scancel now reach it (c.env: SLURM_CONF)

What it starts, as checked on this kind of machine (../shared/FACTS.md), everything in `folder` (a fresh key, the
munge socket, slurm.conf, state, spool, logs and pid files): munged, then slurmctld and slurmd, as root, one node
with this machine's CPUs and one partition. The cluster's commands find it through SLURM_CONF (and Slurm finds
munged through AuthInfo's socket), so /etc/slurm, /etc/munge and any system daemons are left alone. Stopped by
their pid files (never by name).

Settings that keep a test short: sched_interval=2 (the scheduler looks at the queue every 2 s, not 60), cred_expire=10 (a requeued job may start again after that many seconds rather than
the default 120), MinJobAge=600 (scontrol still shows an ended job for 10 minutes: the backend reads its exit code
there), KillWait=30 (the seconds a killed or requeued job's processes get between SIGTERM and SIGKILL: a cell
checkpoints in that time). The daemons run at nice 19 (the tests share a small machine; jobs inherit it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmctld", "slurmd")


class Unavailable(Exception):
    """Slurm cannot run here (and cannot be installed): the reason, for pytest.skip."""


def install() -> None:
    """slurm-wlm and munge with apt-get where `sbatch` is missing; Unavailable where that cannot be done."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and os.path.exists("/usr/sbin/munged"):
        return
    if os.geteuid() != 0:
        raise Unavailable("Slurm is not installed, and installing it (apt-get) needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed, and there is no apt-get to install it with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        out = subprocess.run(["nice", "-n", "19", *argv], env=env, capture_output=True, text=True)
        if out.returncode:
            raise Unavailable(f"{' '.join(argv)} failed (exit code {out.returncode}): {out.stderr[-2000:]}")


def slurm_conf(folder: str, host: str, cpus: int, memory_mb: int, socket_path: str) -> str:
    return "\n".join([
        "ClusterName=vlmjaxtest",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={socket_path},cred_expire=10",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=2",
        "ReturnToService=2",
        "JobRequeue=1",
        "MinJobAge=600",
        "KillWait=30",
        "MpiDefault=none",
        "SlurmctldPort=16817",
        "SlurmdPort=16818",
        f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ""])


def _pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(pid_file: str, timeout_s: float = 30.0) -> None:
    """SIGTERM to the daemon its pid file names, SIGKILL if it is still there after `timeout_s`."""
    pid = _pid(pid_file)
    if pid is None or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class Cluster:
    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.socket = os.path.join(self.folder, "munge", "munge.socket")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(argv), env=self.env, capture_output=True, text=True)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(argv)}: exit code {out.returncode}: {out.stdout}{out.stderr}")
        return out

    def start(self, cpus: int | None = None, memory_mb: int = 20000, timeout_s: float = 60.0) -> None:
        os.chmod(self.folder, 0o755)
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(self.folder, sub), mode=0o755, exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(slurm_conf(self.folder, self.host, cpus or os.cpu_count() or 1, memory_mb, self.socket))
        self._start_munge()
        for daemon in DAEMONS:   # slurmctld first: slurmd registers with it
            out = subprocess.run(["nice", "-n", "19", f"/usr/sbin/{daemon}", "-f", self.conf], env=self.env,
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{daemon} did not start ({out.returncode}): {out.stderr}\n{self.logs()}")
        deadline = time.monotonic() + timeout_s
        while True:   # until the node takes jobs
            state = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.strip()
            if state == "idle":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node is {state!r}, not idle, after {timeout_s:.0f} s\n{self.logs()}")
            time.sleep(0.5)

    def _start_munge(self) -> None:
        """munged with a fresh key, its socket, pid and log in this folder (AuthInfo points Slurm at the socket):
        /etc/munge and a system munged, if any, are left alone. It runs as root here (munged allows it); the socket's
        folders must be searchable by everyone (mkdtemp's 0700 is opened to 0755 by start())."""
        munge = os.path.join(self.folder, "munge")
        key = os.path.join(munge, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        out = subprocess.run(["nice", "-n", "19", "/usr/sbin/munged", f"--key-file={key}", f"--socket={self.socket}",
                              f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                              f"--seed-file={munge}/munged.seed"], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"munged did not start ({out.returncode}): {out.stderr}")

    def stop(self) -> None:
        """Every job cancelled, then the daemons stopped (slurmd first), each by its pid file."""
        if os.path.exists(self.conf):
            self.run("scancel", "--full", "--partition=test", check=False)
        for daemon in reversed(DAEMONS):
            _stop(os.path.join(self.folder, f"{daemon}.pid"))
        _stop(os.path.join(self.folder, "munge", "munged.pid"))

    def logs(self) -> str:
        out = []
        for daemon in DAEMONS:
            path = os.path.join(self.folder, f"{daemon}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {daemon}.log (tail)\n" + "".join(f.readlines()[-30:]))
        return "\n".join(out)


@contextlib.contextmanager
def cluster(folder: str, **start_args) -> Iterator[Cluster]:
    """A running one-node cluster in `folder`, stopped on exit; Unavailable where Slurm cannot run here."""
    install()
    c = Cluster(folder)
    try:
        c.start(**start_args)
        yield c
    finally:
        c.stop()
