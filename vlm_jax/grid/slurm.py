"""The 'slurm' grid backend: each job one Slurm batch job, its processes started by `srun` on every task.

Per job: a batch script is written to <job_dir>/slurm/job.sbatch (config.slurm.script_dir where the grid is on a
bucket), submitted with `sbatch --parsable`, then followed with `scontrol show job` every poll_s until it ends; the
job's output file (<script folder>/<job id>.out, appended to across requeues) is copied into the launcher's log as
it grows. The job's exit code is the batch script's, which is the cells': 0 only when `srun` ended 0 and the job
COMPLETED; the runner also requires the cell's result.json before it counts a job done.

The script runs `srun python -m launch.cell --job_dir=... --distributed`: on every task jax.distributed.initialize()
finds its peers from Slurm's variables (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID; the
coordinator on the first node, its port derived from the job id), as JAX's own cluster detection does.

Stopping and resuming:
- The time limit: `--signal=TERM@<signal_lead_s>` has Slurm send SIGTERM to every task of the job step (not to the
  batch shell, which must live on to requeue): the cell checkpoints at a step that JAX's preemption service agrees
  on across the tasks, and exits 75. The script then `scontrol requeue`s its own job (unless max_requeues requeues
  happened, or the launcher is stopping it): the job, same id, runs again and the cell resumes from its checkpoint.
- Preemption, or an admin's `scontrol requeue <id>`: Slurm sends the tasks SIGTERM (KillWait seconds before
  SIGKILL) and requeues the job itself (`--requeue`); the cell checkpoints if it has time, else it resumes from its
  last committed checkpoint.
- The launcher stopping (Ctrl-C: stop()): a marker file tells the script not to requeue, the running job's tasks
  get SIGTERM (`scancel --signal=TERM`: the cell checkpoints, exits 75), a pending job is cancelled; a re-run of the
  grid resumes them. A job still in the queue when the launcher comes back (it was killed) is followed again, not
  submitted twice (it is found by its name).

config.dir (or script_dir) must be a folder that this machine and every node see at the same path, and the
repository (config.slurm.workdir) with its Python environment too: the usual shared file system of a cluster.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import time

import ml_collections

from vlm_jax.grid import backends
from vlm_jax.paths import REPO_ROOT

EX_TEMPFAIL = backends.EX_TEMPFAIL
# Job states after which the job will not run again by itself (JOB_STATES in Slurm's slurm.h, as scontrol names
# them). REQUEUED, REQUEUE_HOLD, REQUEUE_FED, SPECIAL_EXIT, COMPLETING and every pending or running state are not.
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE")
STOP_FILE = "stop"   # in the script's folder: the launcher is stopping this job, do not requeue it


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        partition="",          # '' = the cluster's default partition
        account="", qos="",    # '' = none given
        nodes=1,               # nodes per job
        ntasks_per_node=1,     # processes per node (one JAX process each): 1, or one per GPU
        gpus_per_task=0,       # --gpus-per-task; 0 = not given
        gres="",               # e.g. 'gpu:8' (per node); '' = none
        cpus_per_task=0,       # 0 = the cluster's default
        mem="",                # per node, e.g. '200G'; '' = the cluster's default
        time="",               # time limit, e.g. '24:00:00'; '' = the partition's
        signal_lead_s=300,     # SIGTERM this long before the time limit: checkpoint, exit 75, requeue
        max_requeues=3,        # the script requeues a job stopped with exit 75 while Restarts < this
        sbatch_args="",        # more sbatch options, e.g. '--constraint=h100 --exclusive'
        srun_args="",          # more srun options
        python="",             # the tasks' Python; '' = this launcher's interpreter (a shared venv)
        workdir="",            # the repository on the nodes; '' = this checkout (a shared file system)
        setup="",              # shell lines before srun, e.g. 'module load cuda; export JAX_PLATFORMS=cpu'
        script_dir="",         # scripts and job output; '' = <job_dir>/slurm (required for a gs:// grid)
        name_prefix="vlmjax",
        poll_s=30.0,           # scontrol show job this often
        stop_grace_s=600.0,    # after stop(): SIGTERMed jobs still running this long are cancelled
    ))


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Clear errors for a config that sbatch would reject late, or that would run something else than intended."""
    for key in ("nodes", "ntasks_per_node"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"config.slurm.{key} must be a whole number >= 1, not {cfg[key]!r}")
    for key in ("gpus_per_task", "cpus_per_task", "signal_lead_s", "max_requeues"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ValueError(f"config.slurm.{key} must be a whole number >= 0, not {cfg[key]!r}")
    if cfg.poll_s <= 0:
        raise ValueError(f"config.slurm.poll_s must be > 0, not {cfg.poll_s!r}")
    if cfg.time and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE", cfg.time):
        raise ValueError(f"config.slurm.time {cfg.time!r}: not a Slurm time limit (minutes, 'HH:MM:SS', 'D-HH')")
    for key in ("sbatch_args", "srun_args"):
        try:
            shlex.split(cfg[key])
        except ValueError as e:
            raise ValueError(f"config.slurm.{key}: {e}") from None
    if cfg.script_dir and "://" in cfg.script_dir:
        raise ValueError(f"config.slurm.script_dir must be a shared file-system folder, not {cfg.script_dir}")


def job_dir(job: backends.Job) -> str:
    found = [a.split("=", 1)[1] for a in job.argv if a.startswith("--job_dir=")]
    if not found:
        raise ValueError(f"the slurm backend runs jobs by their --job_dir; {job.name} has none")
    return found[0].rstrip("/")


def job_name(prefix: str, job: backends.Job) -> str:
    """The Slurm job name: the grid job's, and a hash of its argv (its directory), so that two grids' jobs of one
    name are told apart in the queue (a launcher that comes back finds its own job by this name)."""
    digest = hashlib.sha256("\0".join((job.name, *job.argv)).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{prefix}-{job.name}-{digest}")


def script_folder(cfg: ml_collections.ConfigDict, job: backends.Job) -> str:
    folder = job_dir(job)
    if cfg.script_dir:
        return os.path.join(cfg.script_dir, job_name(cfg.name_prefix, job))
    if "://" in folder:
        raise ValueError(f"{job.name}: its directory {folder} is on a bucket, where Slurm cannot write the job's "
                         f"output: set config.slurm.script_dir to a folder every node and this machine share")
    return os.path.join(folder, "slurm")


def batch_script(cfg: ml_collections.ConfigDict, job: backends.Job) -> str:
    """The sbatch script of one job (no single quotes in it: runner.dry_run prints it inside some)."""
    validate(cfg)
    folder = script_folder(cfg, job)
    q = shlex.quote
    argv = list(job.argv)
    if argv and argv[0] == "python":
        argv[0] = cfg.python or sys.executable
    sbatch = [f"--job-name={job_name(cfg.name_prefix, job)}", f"--output={folder}/%j.out", "--open-mode=append",
              f"--nodes={cfg.nodes}", f"--ntasks-per-node={cfg.ntasks_per_node}", "--requeue"]
    if cfg.signal_lead_s:
        sbatch.append(f"--signal=TERM@{cfg.signal_lead_s}")   # the tasks, not the batch shell (B:): see the docstring
    sbatch += [f"--{flag}={cfg[key]}" for key, flag in (
        ("partition", "partition"), ("account", "account"), ("qos", "qos"), ("gpus_per_task", "gpus-per-task"),
        ("gres", "gres"), ("cpus_per_task", "cpus-per-task"), ("mem", "mem"), ("time", "time")) if cfg[key]]
    sbatch += shlex.split(cfg.sbatch_args)
    srun = ["srun", *shlex.split(cfg.srun_args), *argv, "--distributed"]
    stop, done = q(f"{folder}/{STOP_FILE}"), q(folder) + '/"$SLURM_JOB_ID".exit'
    lines = ["#!/bin/bash", *(f"#SBATCH {shlex.join([arg])}" for arg in sbatch),
             f"# {job.name}: written by the vlm-jax grid launcher (vlm_jax/grid/slurm.py); it resumes when run again",
             f"rm -f {done}",
             'echo "[slurm] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, run $((${SLURM_RESTART_COUNT:-0} + 1)), '
             '$(date -u +%FT%TZ)"',
             f"cd {q(cfg.workdir or REPO_ROOT)} || exit 1",
             *filter(None, [cfg.setup]),
             shlex.join(srun),
             "rc=$?",
             f'if [ "$rc" = {EX_TEMPFAIL} ] && [ ! -e {stop} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {cfg.max_requeues} ]; '
             "then",
             '  echo "[slurm] the cell stopped with its checkpoint saved (exit code 75): requeueing job $SLURM_JOB_ID"',
             '  scontrol requeue "$SLURM_JOB_ID" && exit "$rc"',
             "fi",
             f'echo "$rc" > {done}',
             'echo "[slurm] exit code $rc"',
             'exit "$rc"', ""]
    return "\n".join(lines)


def parse_job(text: str) -> dict[str, str]:
    """`scontrol show job -o` (one line of Key=Value) as a dict; values never hold spaces there, except Command's and
    a few free-text ones at the end, which are not read here."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z/:]+)=(\S*)", text.strip()))


def exit_status(field: str) -> int:
    """Slurm's 'code:signal' as one exit status: the code, or 128 + the signal when a signal ended the script."""
    code, _, sig = field.partition(":")
    code, sig = int(code or 0), int(sig or 0)
    return code if code or not sig else 128 + sig


def verdict(info: dict[str, str]) -> int | None:
    """The job's exit code once it has ended for good, else None. Only a COMPLETED job with exit code 0 is 0; a job
    that ended otherwise with exit code 0 (cancelled, timed out, its node lost) is 75 when Slurm stopped it (it can
    resume from its checkpoint: a re-run of the grid does) and 1 when it failed."""
    state = info.get("JobState", "")
    if state not in ENDED:
        return None
    rc = exit_status(info.get("ExitCode", "0:0"))
    if state == "COMPLETED":
        return rc
    if rc == 0:
        return EX_TEMPFAIL if state in ("CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "DEADLINE") else 1
    return rc


@backends.register("slurm")
class SlurmBackend(backends.FollowedJobs):
    """One Slurm batch job per grid job (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict | None):
        if cfg is None:
            raise ValueError("the slurm backend needs config.slurm (vlm_jax.grid.slurm.default_config())")
        validate(cfg)
        self.cfg = cfg
        super().__init__()

    def commands(self, job: backends.Job) -> list[list[str]]:
        """Write the script, submit it, follow the job (what --dry_run prints)."""
        folder = script_folder(self.cfg, job)
        path = f"{folder}/job.sbatch"
        write = f"mkdir -p {shlex.quote(folder)} && cat > {shlex.quote(path)} <<\\EOF\n{batch_script(self.cfg, job)}EOF"
        return [["sh", "-c", write], ["sbatch", "--parsable", path], ["scontrol", "show", "job", "-o", "JOBID"]]

    # -------------------------------------------------------------------------------------------- run

    # stop() (backends.FollowedJobs): each running job's cell is sent SIGTERM (it checkpoints and exits 75, and
    # its script does not requeue it), each pending one cancelled.

    def _run(self, job: backends.Job, log_path: str) -> int:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        with open(log_path, "ab") as log:
            return self._submit_and_follow(job, log)

    def _submit_and_follow(self, job: backends.Job, log) -> int:
        folder = script_folder(self.cfg, job)
        os.makedirs(folder, exist_ok=True)
        stop_file = os.path.join(folder, STOP_FILE)
        name = job_name(self.cfg.name_prefix, job)
        found = self._slurm(["squeue", "--noheader", f"--name={name}", "--format=%i"], log, quiet=True)
        queued = found.stdout.split() if found.returncode == 0 else []
        if queued:
            job_id = queued[0]
            self._note(log, f"{job.name}: Slurm job {job_id} ({name}) is in the queue already: following it")
        else:
            if os.path.exists(stop_file):
                os.unlink(stop_file)
            script = batch_script(self.cfg, job)
            path = os.path.join(folder, "job.sbatch")
            with open(path, "w") as f:
                f.write(script)
            self._note(log, f"{job.name}: {path}\n{script}")
            out = self._slurm(["sbatch", "--parsable", path], log)
            if out.returncode:
                return out.returncode
            job_id = out.stdout.strip().split(";")[0]   # 'id' or 'id;cluster'
            self._note(log, f"Slurm job {job_id}")
        return self._follow(job_id, folder, log)

    def _follow(self, job_id: str, folder: str, log) -> int:
        c = self.cfg
        output, copied, last, stopped, missing = os.path.join(folder, f"{job_id}.out"), 0, None, None, 0
        while True:
            copied = self._copy_output(output, copied, log)
            out = self._slurm(["scontrol", "show", "job", "-o", job_id], log, quiet=True)
            info = parse_job(out.stdout) if out.returncode == 0 else {}
            if out.returncode and "Invalid job id" in out.stderr:   # gone from slurmctld's memory (MinJobAge)
                rc = self._ended_elsewhere(job_id, folder, log)
                if rc is not None or missing >= 3:
                    self._copy_output(output, copied, log)
                    return 1 if rc is None else rc
                missing += 1
            seen = (info.get("JobState"), info.get("Reason"), info.get("Restarts"), info.get("NodeList"))
            if info and seen != last:
                self._note(log, f"[launcher] job {job_id}: {seen[0]} (reason {seen[1]}, restarts {seen[2]}, "
                                f"nodes {seen[3]})")
                last = seen
            rc = verdict(info) if info else None
            if rc is not None:
                self._copy_output(output, copied, log)
                self._note(log, f"[launcher] job {job_id} ended: {info.get('JobState')}, exit code "
                                f"{info.get('ExitCode')} -> {rc}")
                return rc
            if self._stopping.is_set() and info:
                now = time.monotonic()
                if stopped is None:
                    stopped = now
                    self._stop_job(job_id, info.get("JobState", ""), folder, log)
                elif now - stopped > c.stop_grace_s:
                    self._note(log, f"[launcher] job {job_id} still {info.get('JobState')} after "
                                    f"{c.stop_grace_s:g}s: cancelling it")
                    self._slurm(["scancel", job_id], log)
                    stopped = float("inf")
            self._pause(c.poll_s)

    def _stop_job(self, job_id: str, state: str, folder: str, log) -> None:
        with open(os.path.join(folder, STOP_FILE), "w") as f:
            f.write("the launcher stopped this job; a re-run of the grid resumes it\n")
        if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "SPECIAL_EXIT", "SUSPENDED"):
            self._note(log, f"[launcher] stopping: cancelling job {job_id} ({state})")
            self._slurm(["scancel", job_id], log)
        else:
            self._note(log, f"[launcher] stopping: SIGTERM to the tasks of job {job_id} (they checkpoint and exit)")
            self._slurm(["scancel", "--signal=TERM", job_id], log)

    def _ended_elsewhere(self, job_id: str, folder: str, log) -> int | None:
        """The exit code of a job scontrol no longer shows: from sacct where accounting runs, else from the file the
        script writes last (<folder>/<id>.exit); None if neither knows."""
        out = self._slurm(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job_id}",
                           "--format=State,ExitCode"], log, quiet=True)
        if out.returncode == 0 and out.stdout.strip():
            state, _, code = out.stdout.strip().splitlines()[-1].partition("|")
            rc = verdict({"JobState": state.split()[0], "ExitCode": code})
            if rc is not None:
                self._note(log, f"[launcher] job {job_id} (sacct): {state}, exit code {code} -> {rc}")
                return rc
        try:
            with open(os.path.join(folder, f"{job_id}.exit")) as f:
                rc = int(f.read().strip())
        except (OSError, ValueError):
            self._note(log, f"[launcher] job {job_id} is gone from scontrol, sacct has no record and it left no "
                            f"exit file: counted as failed")
            return None
        self._note(log, f"[launcher] job {job_id} is gone from scontrol; its script's exit code: {rc}")
        return rc

    @staticmethod
    def _copy_output(path: str, copied: int, log) -> int:
        """Appends what the job's output file gained since `copied` bytes to the log; the new count."""
        try:
            with open(path, "rb") as f:
                f.seek(copied)
                new = f.read()
        except OSError:
            return copied
        if new:
            log.write(new)
            log.flush()
        return copied + len(new)

    def _slurm(self, argv: list[str], log, quiet: bool = False) -> subprocess.CompletedProcess:
        """One Slurm command; its command line and output go to the log unless quiet (then only a failure's)."""
        if not quiet:
            self._note(log, "[launcher] $ " + shlex.join(argv))
        try:
            out = subprocess.run(argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            out = subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not found (is this a Slurm login node?)\n")
        if out.returncode or not quiet:
            log.write((out.stdout + out.stderr).encode())
            log.flush()
        return out

    def _pause(self, seconds: float) -> None:
        """Sleeps `seconds`; wakes early when the launcher starts stopping, and polls at least every second after."""
        if self._stopping.is_set():
            time.sleep(min(seconds, 1.0))
        else:
            self._stopping.wait(seconds)

    @staticmethod
    def _note(log, line: str) -> None:
        log.write((line + "\n").encode())
        log.flush()
