"""The 'tpu' grid backend: each job on a Cloud TPU slice of its own, through `gcloud` queued resources.

Per job: create a queued resource (the runtime version its accelerator generation needs), wait until ACTIVE, set up
every worker (this launcher's exact commit of repo_url; a Python >= 3.11, installed with apt where the image has
none; a virtual environment ~/vlm-jax/.venv with requirements.txt, jax[tpu] and gcsfs), start the job detached on
every worker under launch.worker, and follow it through the bucket (<job_dir>/attempts/<n>/worker-<i>.json:
heartbeats, then the exit status; the job's log beside it) and `describe`: a dropped ssh connection costs nothing.
A job that exits 75 (stopped by SIGTERM, its checkpoint saved), a slice preempted, suspended, failed or gone, or
workers gone silent: the slice is deleted, a new one provisioned and the job resumed, up to config.tpu.max_attempts;
never a success. gcloud's transient failures are retried with exponential backoff. The slice is deleted at the end
whatever happened (unless config.tpu.keep). config.dir must be shared by the workers and this machine (gs://...).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

import ml_collections

from vlm_jax.grid import backends
from vlm_jax.paths import REPO_ROOT

EX_TEMPFAIL = backends.EX_TEMPFAIL
MIN_PYTHON = (3, 11)   # jax 0.10, flax, orbax and grain

# Accelerator type prefix -> (runtime version, what the type's number counts). Cloud TPU docs, "TPU software
# versions" (PyTorch and JAX): v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older
# tpu-ubuntu2204-base. v5e and v6e types count chips (one host up to 8, else 4 a host); v5p and v4 TensorCores
# (8 a host).
GENERATIONS = {
    "v6e": ("v2-alpha-tpuv6e", "chips"),
    "v5litepod": ("v2-alpha-tpuv5-lite", "chips"),
    "v5p": ("v2-alpha-tpuv5", "cores"),
    "v4": ("tpu-ubuntu2204-base", "cores"),
    "v3": ("tpu-ubuntu2204-base", "cores"),
    "v2": ("tpu-ubuntu2204-base", "cores"),
}
# describe's states that end a slice's life (or never let it start): the job on it, if any, is resumed elsewhere.
LOST = ("PREEMPTED", "SUSPENDING", "SUSPENDED", "DELETING", "NOT_FOUND")
# gcloud errors that a retry cannot fix.
PERMANENT = ("INVALID_ARGUMENT", "PERMISSION_DENIED", "FAILED_PRECONDITION", "ALREADY_EXISTS", "NOT_FOUND")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        project="", zone="",
        accelerator_type="v5litepod-16",
        accelerator_types="",           # 'qwen1.5-7b_*=v5litepod-64,...': fnmatch on job names, first match wins
        runtime_version="",             # '' = GENERATIONS[the type's generation]; set, it is used for every slice
        hosts=0,                        # workers per slice; 0 = from the accelerator type (GENERATIONS)
        spot=False, reserved=False,
        repo_url="",
        commit="",                      # what the workers run; '' = this checkout's HEAD, which must be clean
        allow_dirty=False,              # run HEAD although tracked files here have uncommitted changes
        python="python3.13 python3.12 python3.11 python3",   # on the VM: the first >= 3.11 makes ~/vlm-jax/.venv
        venv_args="",                   # e.g. --system-site-packages
        # Run in ~/vlm-jax with the venv active: one resolve, jax[tpu] within the pins; gcsfs lets etils.epath
        # read and write gs:// run directories.
        install="python -m pip install -q -r requirements.txt 'jax[tpu]' gcsfs",
        setup="",                       # more shell after the install, e.g. mount the data bucket at /data
        name_prefix="vlmjax",
        poll_seconds=60.0, provision_timeout_s=6 * 3600.0,
        max_attempts=3,                 # slices a job may use: the first, then one per preemption or exit 75
        retries=5, retry_base_s=5.0, retry_max_s=300.0,   # a failing gcloud command: 5 s, 10 s, ... up to 5 retries
        heartbeat_s=30.0,               # workers report this often ...
        heartbeat_timeout_s=1800.0,     # ... and a worker silent this long has lost its job: resumed elsewhere
        settle_s=600.0,                 # after a worker failed or the slice was lost: how long the others may take
        log_every_s=300.0,              # workers copy the job's log to the bucket this often (and at the end)
        keep=False,                     # leave the slice up after the job (debugging); it is billed until deleted
        # Compile every cell for its slice here first (launch.plan; needs libtpu) and provision none that cannot
        # fit; plan_mfu only shapes the printed estimates.
        plan=True,
        gcloud="gcloud",
    ))


# ------------------------------------------------------------------------------------------------ slices

def resource_name(prefix: str, job: backends.Job) -> str:
    """A GCP-safe name (lowercase letters, digits, hyphens; starts with a letter; <= 63 chars). The hash covers the
    job's name and argv (its directory), so two grids, or two names that clean up alike, never share a slice."""
    digest = hashlib.sha256("\0".join((job.name, *job.argv)).encode()).hexdigest()[:6]
    stem = re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{job.name}".lower()).strip("-")
    if not stem[:1].isalpha():
        stem = "j-" + stem
    return f"{stem[:63 - 7].rstrip('-')}-{digest}"


def parse_types(text: str) -> list[tuple[str, str]]:
    """'pattern=type,...' -> [(pattern, type)] in order."""
    pairs = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        pattern, eq, kind = (s.strip() for s in entry.partition("="))
        if not (eq and pattern and kind) or "=" in kind:
            raise ValueError(f"config.tpu.accelerator_types: {entry!r} is not 'pattern=accelerator-type'")
        pairs.append((pattern, kind))
    return pairs


def accelerator_type(cfg: ml_collections.ConfigDict, job_name: str) -> str:
    """The slice a job gets: the first `accelerator_types` pattern matching its name, else `accelerator_type`."""
    return next((kind for pattern, kind in parse_types(cfg.accelerator_types)
                 if fnmatch.fnmatchcase(job_name, pattern)), cfg.accelerator_type)


def _generation(kind: str) -> tuple[str, int]:
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", kind)
    if not match or match.group(1) not in GENERATIONS:
        raise ValueError(f"accelerator type {kind!r}: not one of {', '.join(f'{g}-N' for g in GENERATIONS)}; "
                         f"set config.tpu.runtime_version and config.tpu.hosts for it")
    return match.group(1), int(match.group(2))


def runtime_version(cfg: ml_collections.ConfigDict, kind: str) -> str:
    """config.tpu.runtime_version if set, else the one the accelerator type's generation needs."""
    return cfg.runtime_version or GENERATIONS[_generation(kind)[0]][0]


def hosts(cfg: ml_collections.ConfigDict, kind: str) -> int:
    """Worker VMs of a slice: config.tpu.hosts if set, else from the accelerator type."""
    if cfg.hosts:
        return cfg.hosts
    generation, n = _generation(kind)
    if GENERATIONS[generation][1] == "chips":
        return 1 if n <= 8 else n // 4
    return max(1, n // 8)


def job_dir(job: backends.Job) -> str:
    """The job's directory (its `--job_dir=`): shared by the workers and this machine; the attempts live there."""
    found = [a.split("=", 1)[1] for a in job.argv if a.startswith("--job_dir=")]
    if not found:
        raise ValueError(f"the tpu backend follows a job through its --job_dir; {job.name} has none")
    return found[0].rstrip("/")


# ------------------------------------------------------------------------------------------------ the commit

def launcher_commit(repo: str = REPO_ROOT) -> tuple[str, list[str]]:
    """(HEAD's commit, tracked files with uncommitted changes) of the checkout this launcher runs from."""
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    head = git("rev-parse", "--verify", "HEAD")
    if head.returncode:
        raise RuntimeError(f"{repo} is not a git checkout with a commit ({head.stderr.strip()}): "
                           f"set config.tpu.commit to the commit of config.tpu.repo_url the workers should run")
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.splitlines()
    return head.stdout.strip(), [line[3:] for line in dirty]


# ------------------------------------------------------------------------------------------------ worker scripts

# Bash: PY = the first candidate on PATH whose version is >= @MAJOR@.@MINOR@ (SEEN lists the others); else
# python@MAJOR@.@MINOR@ from apt-get where there is one; else an error naming what was found. SUDO is kept for
# later apt-get calls.
FIND_PYTHON = r"""vlmjax_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
vlmjax_new_enough() {
  case "$1" in [0-9]*.[0-9]*) ;; *) return 1 ;; esac
  [ "${1%%.*}" -gt @MAJOR@ ] 2>/dev/null || { [ "${1%%.*}" -eq @MAJOR@ ] && [ "${1#*.}" -ge @MINOR@ ]; } 2>/dev/null
}
export DEBIAN_FRONTEND=noninteractive
SUDO=; [ "$EUID" = 0 ] || SUDO="sudo DEBIAN_FRONTEND=noninteractive"
PY=; SEEN=
for c in @CANDIDATES@; do
  command -v "$c" >/dev/null 2>&1 || continue
  v=$(vlmjax_version "$c") || continue
  if vlmjax_new_enough "$v"; then PY=$c; break; fi
  SEEN="$SEEN $c ($v)"
done
if [ -z "$PY" ] && command -v apt-get >/dev/null 2>&1; then
  echo "no Python >= @MAJOR@.@MINOR@ on this VM (found:${SEEN:- none}): installing python@MAJOR@.@MINOR@ with apt-get"
  $SUDO apt-get -qq -o DPkg::Lock::Timeout=600 update >/dev/null && $SUDO apt-get -y -qq -o DPkg::Lock::Timeout=600 \
    install python@MAJOR@.@MINOR@ python@MAJOR@.@MINOR@-venv >/dev/null || true
  if vlmjax_new_enough "$(vlmjax_version python@MAJOR@.@MINOR@)"; then PY=python@MAJOR@.@MINOR@; fi
fi
[ -n "$PY" ] || { echo "ERROR: the job needs Python >= @MAJOR@.@MINOR@; this VM has${SEEN:- none}, and no \
python@MAJOR@.@MINOR@ could be installed (no apt-get, or it failed)" >&2; exit 1; }
echo "Python: $PY ($(vlmjax_version "$PY"))"
"""


def find_python(candidates: str, minimum: tuple[int, int] = MIN_PYTHON) -> str:
    """FIND_PYTHON for these candidates (a space-separated list of commands) and minimum version."""
    return (FIND_PYTHON.replace("@CANDIDATES@", candidates).replace("@MAJOR@", str(minimum[0]))
            .replace("@MINOR@", str(minimum[1])).strip())


def setup_script(cfg: ml_collections.ConfigDict, commit: str) -> str:
    """What every worker runs once its slice is ACTIVE (idempotent: a retried set-up redoes only what is missing):
    the repository at `commit` in ~/vlm-jax, a Python >= 3.11, the venv ~/vlm-jax/.venv, cfg.install, cfg.setup."""
    url, sha = shlex.quote(cfg.repo_url), shlex.quote(commit)
    has_commit = f"git cat-file -e {sha}^{{commit}} 2>/dev/null"
    venv = f'"$PY" -m venv {cfg.venv_args} .venv'.replace("  ", " ")
    lines = [
        "set -e",
        "cd ~",
        f"[ -d vlm-jax/.git ] || git clone -q {url} vlm-jax",
        "cd vlm-jax",
        f"{has_commit} || git fetch -q origin || true",
        f"{has_commit} || git fetch -q origin {sha} || true   # a commit on no branch, fetched by its hash",
        f'{has_commit} || {{ echo "ERROR: commit {commit} is not in {cfg.repo_url}: push it" >&2; exit 1; }}',
        f"git checkout -q --detach {sha}",
        'echo "$(hostname): vlm-jax at $(git rev-parse HEAD)"',
        find_python(cfg.python),
        "if [ ! -f .venv/.vlmjax-ready ]; then",
        "  rm -rf .venv",
        f'  {venv} || {{ $SUDO apt-get -y -qq install "python$(vlmjax_version "$PY")-venv" >/dev/null'
        f" && rm -rf .venv && {venv}; }}",
        "  touch .venv/.vlmjax-ready",
        "fi",
        ". .venv/bin/activate",
        cfg.install,
    ]
    if cfg.setup:
        lines.append(cfg.setup)
    return "\n".join(lines)


def start_command(cfg: ml_collections.ConfigDict, job: backends.Job, status_dir: str) -> str:
    """Starts the job on a worker, detached (it outlives the ssh connection), under launch.worker."""
    worker = [".venv/bin/python", "-m", "launch.worker", f"--status_dir={status_dir}",
              f"--heartbeat_s={cfg.heartbeat_s:g}", f"--log_every_s={cfg.log_every_s:g}", "--",
              *job.argv, "--distributed"]
    return (f"cd ~/vlm-jax && mkdir -p logs && setsid nohup {shlex.join(worker)} >> logs/worker.out 2>&1"
            " < /dev/null & echo \"$(hostname): started launch.worker (pid $!)\"")


# ------------------------------------------------------------------------------------------------ retries

def retry(call: Callable[[], subprocess.CompletedProcess], transient: Callable[[subprocess.CompletedProcess], bool],
          retries: int, base_s: float, max_s: float, note: Callable[[str], None] = lambda line: None,
          sleep: Callable[[float], None] = time.sleep) -> subprocess.CompletedProcess:
    """call() until it succeeds, fails for good (not transient), or has been retried `retries` times, waiting
    base_s, 2 base_s, 4 base_s, ... (at most max_s) in between."""
    for attempt in range(retries + 1):
        out = call()
        if out.returncode == 0 or not transient(out) or attempt == retries:
            return out
        delay = min(max_s, base_s * 2 ** attempt)
        note(f"exit code {out.returncode}: retrying in {delay:g}s ({attempt + 1}/{retries})")
        sleep(delay)
    raise AssertionError("unreachable")


def _transient(out: subprocess.CompletedProcess) -> bool:
    return not any(code in (out.stderr or "") for code in PERMANENT)


def fresh_path(path: str):
    """epath.Path(path), its filesystem's listing cache dropped first: the launcher reads objects that workers
    rewrite, and gcsfs would otherwise answer from a listing (names, sizes) made before they wrote."""
    from etils import epath
    if "://" in path:
        try:
            from etils.epath import backend
            backend.fsspec_backend.fs(path).invalidate_cache()
        except (ImportError, AttributeError):   # another backend, or none loaded: nothing cached
            pass
    return epath.Path(path)


# ------------------------------------------------------------------------------------------------ the backend

@backends.register("tpu")
class TpuBackend(backends.FollowedJobs):
    """One queued-resource TPU slice per job (and per resumption), deleted when the job ends (unless keep)."""

    def __init__(self, cfg: ml_collections.ConfigDict | None):
        if cfg is None:
            raise ValueError("the tpu backend needs config.tpu (vlm_jax.grid.tpu.default_config())")
        for key in ("project", "zone", "repo_url"):
            if not cfg.get(key):
                raise ValueError(f"config.tpu.{key} is not set")
        if cfg.spot and cfg.reserved:
            raise ValueError("config.tpu.spot and config.tpu.reserved are exclusive")
        if cfg.max_attempts < 1:
            raise ValueError("config.tpu.max_attempts must be at least 1")
        self.cfg = cfg
        for kind in {cfg.accelerator_type, *(k for _, k in parse_types(cfg.accelerator_types))}:
            try:   # a malformed list or an unknown type fails here, before any job
                runtime_version(cfg, kind), hosts(cfg, kind)
            except ValueError as e:
                raise ValueError(f"config.tpu.accelerator_type(s): {e}") from None
        super().__init__()

    def accelerator_type(self, job_name: str) -> str:
        return accelerator_type(self.cfg, job_name)

    def commit(self, strict: bool = True) -> str:
        """config.tpu.commit, else this checkout's HEAD; strict: refuse a checkout with uncommitted changes to
        tracked files (the workers would run other code than this launcher) unless config.tpu.allow_dirty."""
        if self.cfg.commit:
            return self.cfg.commit
        with self._lock:
            sha, dirty = launcher_commit()
            if dirty and strict and not self.cfg.allow_dirty:
                raise RuntimeError(
                    f"uncommitted changes to tracked files in {REPO_ROOT} ({', '.join(dirty[:5])}"
                    f"{', ...' if len(dirty) > 5 else ''}): the workers would run {sha[:12]} without them. Commit "
                    f"and push them, or pass --config.tpu.allow_dirty=True (or --config.tpu.commit=...)")
            return sha

    # -------------------------------------------------------------------------------------------- commands

    def _where(self) -> list[str]:
        return [f"--project={self.cfg.project}", f"--zone={self.cfg.zone}"]

    def _queued(self, verb: str, name: str, *extra: str) -> list[str]:
        return [self.cfg.gcloud, "compute", "tpus", "queued-resources", verb, name, *extra]

    def create_argv(self, name: str, kind: str) -> list[str]:
        c = self.cfg
        return (self._queued("create", name, f"--node-id={name}", *self._where(), f"--accelerator-type={kind}",
                             f"--runtime-version={runtime_version(c, kind)}")
                + (["--spot"] if c.spot else []) + (["--reserved"] if c.reserved else []))

    def describe_argv(self, name: str) -> list[str]:
        return self._queued("describe", name, *self._where(), "--format=value(state.state)")

    def delete_argv(self, name: str) -> list[str]:
        return self._queued("delete", name, *self._where(), "--force", "--quiet")

    def ssh_argv(self, name: str, command: str) -> list[str]:
        return [self.cfg.gcloud, "compute", "tpus", "tpu-vm", "ssh", name, "--worker=all", *self._where(),
                f"--command={command}"]

    def commands(self, job: backends.Job) -> list[list[str]]:
        """create, describe (polled until ACTIVE), set up every worker, start the job on every worker (then
        followed through <job_dir>/attempts/<n>/), delete."""
        name, kind = resource_name(self.cfg.name_prefix, job), self.accelerator_type(job.name)
        try:
            commit = self.commit(strict=False)
        except RuntimeError:
            commit = "COMMIT"   # not a git checkout: run() says so
        commands = [
            self.create_argv(name, kind),
            self.describe_argv(name),
            self.ssh_argv(name, setup_script(self.cfg, commit)),
            self.ssh_argv(name, start_command(self.cfg, job, f"{job_dir(job)}/attempts/001")),
        ]
        if not self.cfg.keep:
            commands.append(self.delete_argv(name))
        return commands

    # -------------------------------------------------------------------------------------------- run

    # stop() (backends.FollowedJobs): every running job gets SIGTERM on its workers (it saves its checkpoint and
    # exits 75), its slice is deleted; no job starts.

    def _run(self, job: backends.Job, log_path: str) -> int:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        c = self.cfg
        name, kind = resource_name(c.name_prefix, job), self.accelerator_type(job.name)
        folder, commit = job_dir(job), self.commit()
        with open(log_path, "ab") as log:
            self._note(log, f"{job.name}: slice {name} ({kind}, runtime {runtime_version(c, kind)}, "
                            f"{hosts(c, kind)} worker(s)); workers run commit {commit} of {c.repo_url}")
            try:
                for attempt in range(1, c.max_attempts + 1):
                    outcome, detail = self._attempt(job, name, kind, folder, log)
                    if outcome == "done":
                        return detail
                    if self._stopping.is_set():
                        self._note(log, f"{detail}; the launcher is stopping: a re-run resumes the job")
                        return EX_TEMPFAIL
                    self._note(log, f"attempt {attempt}/{c.max_attempts} interrupted: {detail}")
                    if attempt < c.max_attempts:
                        self._note(log, "deleting the slice, then provisioning another to resume the job")
                        self._delete(name, log)
                self._note(log, f"no attempt left (config.tpu.max_attempts={c.max_attempts}): exit code "
                                f"{EX_TEMPFAIL}; run the grid again (--retry_failed) to resume from the checkpoint")
                return EX_TEMPFAIL
            finally:
                if not c.keep and not self._delete(name, log):   # a leaked slice is billed: say so loudly
                    print(f"WARNING: could not delete the TPU slice {name} of {job.name}; see {log_path}",
                          file=sys.stderr)

    def _attempt(self, job, name: str, kind: str, folder: str, log) -> tuple[str, object]:
        """('done', exit code) or ('resume', why) for one slice."""
        out = self._gcloud(self.create_argv(name, kind), log, transient=_transient)
        if out.returncode and "ALREADY_EXISTS" not in out.stderr:
            return "done", out.returncode
        state = self._wait_active(name, log)
        if self._stopping.is_set():
            return "done", EX_TEMPFAIL
        if state in LOST:
            return "resume", f"the slice is {state} before it was ACTIVE"
        if state != "ACTIVE":
            return "done", 1
        rc = self._ssh(name, setup_script(self.cfg, self.commit()), log)
        if rc:
            state = self._describe(name, log)
            if state != "ACTIVE" and state is not None:
                return "resume", f"the set-up ended with exit code {rc} on a slice now {state}"
            self._note(log, f"the set-up failed (exit code {rc}; its output is above)")
            return "done", rc
        if self._stopping.is_set():
            return "done", EX_TEMPFAIL
        status_dir = self._next_status_dir(folder)
        rc = self._ssh(name, start_command(self.cfg, job, status_dir), log)
        if rc:
            self._note(log, f"starting the job: exit code {rc}; following {status_dir} anyway")
        return self._follow(name, status_dir, hosts(self.cfg, kind), log)

    def _wait_active(self, name: str, log) -> str | None:
        """The state that ends the wait: ACTIVE, FAILED, a LOST one, or None (no answer, or provision_timeout_s)."""
        deadline = time.monotonic() + self.cfg.provision_timeout_s
        self._note(log, "$ " + shlex.join(self.describe_argv(name)) + f"  (every {self.cfg.poll_seconds}s until "
                        f"ACTIVE)")
        last = None
        while True:
            state = self._describe(name, log)
            if state != last:
                self._note(log, f"queued resource {name}: {state or 'no answer'}")
                last = state
            if state is None:
                self._note(log, "describe keeps failing: giving up")
                return None
            if state == "ACTIVE" or state == "FAILED" or state in LOST:
                return state
            if time.monotonic() >= deadline:
                self._note(log, f"queued resource still {state} after {self.cfg.provision_timeout_s:g}s: giving up")
                return None
            if self._pause(self.cfg.poll_seconds):
                return None

    def _follow(self, name: str, status_dir: str, n: int, log) -> tuple[str, object]:
        """Polls the workers' status objects and the slice until every worker has exited, the slice is lost, or a
        worker is silent for heartbeat_timeout_s."""
        c = self.cfg
        self._note(log, f"following {n} worker(s) through {status_dir}/worker-<i>.json")
        began, first_failure, stopped, lost = time.monotonic(), None, None, None
        beats: dict[int, tuple[object, float]] = {}   # worker -> (its last beat count, when it changed here)
        copied: dict[int, int] = {}                   # worker -> bytes of its log appended to ours
        while True:
            statuses = {i: self._read_status(status_dir, i, log) for i in range(n)}
            self._copy_logs(status_dir, statuses, copied, log)
            now = time.monotonic()
            for i, s in statuses.items():
                if s and beats.get(i, (None,))[0] != s.get("beats"):
                    beats[i] = (s.get("beats"), now)
            exited = {i: s for i, s in statuses.items() if s and s.get("state") == "exited"}
            if any(s.get("exit_code") for s in exited.values()):
                first_failure = first_failure or now
            if len(exited) == n or (first_failure and now - first_failure >= c.settle_s):
                return self._verdict(name, exited, n, log)
            if self._stopping.is_set() and stopped is None:
                self._note(log, "the launcher is stopping: SIGTERM to the job on every worker")
                self._ssh(name, "cd ~/vlm-jax && .venv/bin/python -m launch.worker --stop", log)
                stopped = now
            if stopped is not None and now - stopped >= c.settle_s:
                return "done", EX_TEMPFAIL
            quiet = {i: now - beats.get(i, (None, began))[1] for i in range(n) if i not in exited}
            if lost is None:
                state = self._describe(name, log)
                if state is not None and state != "ACTIVE":   # the job may be saving its checkpoint: let it end
                    self._note(log, f"the slice is {state}: waiting for the workers' last word")
                    lost = (now, state)
            elif now - lost[0] >= c.settle_s or all(q > 3 * c.heartbeat_s for q in quiet.values()):
                return "resume", f"the slice is {lost[1]}"
            silent = [i for i, q in quiet.items() if q > c.heartbeat_timeout_s]
            if silent:
                return "resume", f"no word from worker(s) {silent} for {c.heartbeat_timeout_s:g}s"
            self._pause(c.poll_seconds)

    def _verdict(self, name: str, exited: dict, n: int, log) -> tuple[str, object]:
        codes = {i: (s["exit_code"], s.get("signal")) for i, s in sorted(exited.items())}
        self._note(log, "workers ended: " + ", ".join(
            f"{i}: exit code {code}" + (f" ({sig})" if sig else "") for i, (code, sig) in codes.items())
            + (f"; {n - len(exited)} still running" if len(exited) < n else ""))
        failed = [code for code, _ in codes.values() if code]
        if not failed and len(exited) == n:
            return "done", 0
        state = self._describe(name, log)
        if any(code == EX_TEMPFAIL or sig for code, sig in codes.values()):
            return "resume", f"the job was stopped (exit code 75 or a signal); the slice is {state or 'unknown'}"
        if state is not None and state != "ACTIVE":
            return "resume", f"the job failed on a slice now {state}"
        return "done", failed[0]

    # -------------------------------------------------------------------------------------------- bucket

    @staticmethod
    def _next_status_dir(folder: str) -> str:
        """<job_dir>/attempts/<n>, n one more than any there (a re-run of the grid never reads an old status)."""
        attempts = fresh_path(f"{folder}/attempts")
        done = [int(p.name) for p in attempts.iterdir() if p.name.isdigit()] if attempts.exists() else []
        return f"{folder}/attempts/{max(done, default=0) + 1:03d}"

    def _read_status(self, status_dir: str, i: int, log) -> dict | None:
        path = fresh_path(f"{status_dir}/worker-{i}.json")
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except ValueError:
            return None   # being replaced (a local folder): read it at the next poll
        except OSError as e:   # a bucket hiccup: the heartbeat timeout decides, not one failed read
            self._note(log, f"reading {path}: {e}")
            return None

    def _copy_logs(self, status_dir: str, statuses: dict, copied: dict, log) -> None:
        """Appends what the workers' logs gained since the last poll to ours, each line marked with its worker."""
        for i, s in statuses.items():
            if not s or s.get("log_bytes", 0) <= copied.get(i, 0):
                continue
            try:
                data = fresh_path(f"{status_dir}/worker-{i}.log").read_bytes()
            except OSError:
                continue
            new, copied[i] = data[copied.get(i, 0):], len(data)
            log.write(b"".join(b"[worker %d] " % i + line for line in new.splitlines(keepends=True)))
            if not new.endswith(b"\n"):
                log.write(b"\n")
            log.flush()

    # -------------------------------------------------------------------------------------------- gcloud

    def _gcloud(self, argv: list[str], log, transient, quiet: bool = False) -> subprocess.CompletedProcess:
        """One gcloud command, retried while it fails transiently; its output goes to the log (unless quiet and
        it succeeded)."""
        def call():
            if not quiet:
                self._note(log, "$ " + shlex.join(argv))
            out = subprocess.run(argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
            if out.returncode or not quiet:
                log.write((out.stdout + out.stderr).encode())
                log.flush()
            return out
        return retry(call, transient, self.cfg.retries, self.cfg.retry_base_s, self.cfg.retry_max_s,
                     lambda line: self._note(log, f"{argv[3]} {argv[4]}: {line}"))

    def _describe(self, name: str, log) -> str | None:
        """The queued resource's state, NOT_FOUND, or None when describe failed through every retry."""
        out = self._gcloud(self.describe_argv(name), log, lambda o: "NOT_FOUND" not in o.stderr, quiet=True)
        if out.returncode:
            return "NOT_FOUND" if "NOT_FOUND" in out.stderr else None
        return out.stdout.strip()

    def _delete(self, name: str, log) -> bool:
        out = self._gcloud(self.delete_argv(name), log, _transient)
        return out.returncode == 0 or "NOT_FOUND" in out.stderr

    def _ssh(self, name: str, command: str, log) -> int:
        """The command on every worker, its output into the log; retried when ssh itself fails (exit code 255):
        the set-up and start are idempotent."""
        argv = self.ssh_argv(name, command)

        def call():
            self._note(log, "$ " + shlex.join(argv))
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            return subprocess.CompletedProcess(argv, rc)
        return retry(call, lambda out: out.returncode == 255, self.cfg.retries, self.cfg.retry_base_s,
                     self.cfg.retry_max_s, lambda line: self._note(log, f"ssh: {line}")).returncode

    def _pause(self, seconds: float) -> bool:
        """Sleeps `seconds`, in steps of at most one, and ends early when the launcher stops (then True)."""
        deadline = time.monotonic() + seconds
        while True:
            time.sleep(max(0.0, min(deadline - time.monotonic(), 1.0)))
            if self._stopping.is_set() or time.monotonic() >= deadline:
                return self._stopping.is_set()

    @staticmethod
    def _note(log, line: str) -> None:
        log.write((line + "\n").encode())
        log.flush()
