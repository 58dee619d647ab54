"""The 'tpu' grid backend: each job on a Cloud TPU slice of its own, through `gcloud` queued resources.

Per job: create a queued resource, wait until it is ACTIVE, clone the repository and install it on every worker,
run the job's argv on every worker with `--distributed`, and delete the slice, even when the job fails. The job's
directory must be shared by the workers and this machine (config.dir = gs://...).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time

import ml_collections

from vlm_jax.grid import backends


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        project="", zone="",
        accelerator_type="v5litepod-16",
        accelerator_types="",           # 'qwen1.5-7b_*=v5litepod-64,...': fnmatch on job names, first match wins
        runtime_version="v2-alpha-tpuv5-lite",   # must suit every accelerator type used (v5e here)
        spot=False, reserved=False,
        repo_url="", repo_ref="main",
        # one resolve: jax[tpu] within the pins; gcsfs lets etils.epath read and write gs:// run directories
        setup="python3 -m pip install -q -r requirements.txt 'jax[tpu]' gcsfs",
        name_prefix="vlmjax",
        poll_seconds=60, provision_timeout_s=6 * 3600,
        keep=False,                     # leave the slice up after the job (debugging); it is billed until deleted
        # Compile every cell for its slice here first (launch.plan; needs libtpu) and provision none that cannot
        # fit; plan_mfu only shapes the printed estimates.
        plan=True,
        gcloud="gcloud",
    ))


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


@backends.register("tpu")
class TpuBackend:
    """One queued-resource TPU slice per job, deleted when the job ends (unless config.tpu.keep)."""

    def __init__(self, cfg: ml_collections.ConfigDict | None):
        if cfg is None:
            raise ValueError("the tpu backend needs config.tpu (vlm_jax.grid.tpu.default_config())")
        for key in ("project", "zone", "repo_url"):
            if not cfg.get(key):
                raise ValueError(f"config.tpu.{key} is not set")
        if cfg.spot and cfg.reserved:
            raise ValueError("config.tpu.spot and config.tpu.reserved are exclusive")
        self.cfg = cfg
        parse_types(cfg.accelerator_types)   # a malformed list fails here, before any job

    def accelerator_type(self, job_name: str) -> str:
        return accelerator_type(self.cfg, job_name)

    def commands(self, job: backends.Job) -> list[list[str]]:
        """create, describe (polled until ACTIVE), set up every worker, the job on every worker, delete."""
        c, name = self.cfg, resource_name(self.cfg.name_prefix, job)
        where = [f"--project={c.project}", f"--zone={c.zone}"]
        qr, ssh = [c.gcloud, "compute", "tpus", "queued-resources"], [c.gcloud, "compute", "tpus", "tpu-vm", "ssh"]
        setup = (f"(test -d ~/vlm-jax || git clone -q {shlex.quote(c.repo_url)} ~/vlm-jax) && cd ~/vlm-jax"
                 f" && git fetch -q origin {shlex.quote(c.repo_ref)} && git checkout -q FETCH_HEAD && {c.setup}")
        argv = list(job.argv)
        if argv[:1] == ["python"]:   # Ubuntu TPU VM images may have no `python`
            argv[0] = "python3"
        commands = [
            qr + ["create", name, f"--node-id={name}", *where, f"--accelerator-type={self.accelerator_type(job.name)}",
                  f"--runtime-version={c.runtime_version}"]
               + (["--spot"] if c.spot else []) + (["--reserved"] if c.reserved else []),
            qr + ["describe", name, *where, "--format=value(state.state)"],
            ssh + [name, "--worker=all", *where, f"--command={setup}"],
            ssh + [name, "--worker=all", *where, f"--command=cd ~/vlm-jax && {shlex.join(argv)} --distributed"],
        ]
        if not c.keep:
            commands.append(qr + ["delete", name, *where, "--force", "--quiet"])
        return commands

    def run(self, job: backends.Job, log_path: str) -> int:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        create, describe, setup, work, *delete = self.commands(job)
        with open(log_path, "ab") as log:
            try:
                rc = self._call(create, log)
                rc = rc or self._wait_active(describe, log)
                rc = rc or self._call(setup, log)
                return rc or self._call(work, log)
            finally:
                if delete and self._call(delete[0], log):  # a leaked slice is billed: say so loudly
                    print(f"WARNING: could not delete the TPU slice of {job.name}; see {log_path}", file=sys.stderr)

    def _call(self, argv: list[str], log) -> int:
        self._note(log, "$ " + shlex.join(argv))
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode

    def _wait_active(self, describe: list[str], log) -> int:
        """0 once the slice is ACTIVE; 1 if it failed, was suspended, or is not up within provision_timeout_s."""
        deadline = time.monotonic() + self.cfg.provision_timeout_s
        self._note(log, "$ " + shlex.join(describe) + f"  (every {self.cfg.poll_seconds}s until ACTIVE)")
        while True:
            out = subprocess.run(describe, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
            state = out.stdout.strip()
            if out.returncode or state in ("FAILED", "SUSPENDING", "SUSPENDED"):
                self._note(log, f"queued resource state {state or '?'} (exit code {out.returncode}): giving up")
                return out.returncode or 1
            if state == "ACTIVE":
                return 0
            if time.monotonic() >= deadline:
                self._note(log, f"queued resource still {state} after {self.cfg.provision_timeout_s}s: giving up")
                return 1
            time.sleep(self.cfg.poll_seconds)

    @staticmethod
    def _note(log, line: str) -> None:
        log.write((line + "\n").encode())
        log.flush()
