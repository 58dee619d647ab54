"""Where a grid job runs: one registry of backends, each turning a `Job` (an argv run on every host) into commands.

    local: the job's argv as a child process of this machine (the launcher runs k of them at a time);
    tpu:   a Cloud TPU slice per job (vlm_jax/grid/tpu.py).

A backend is one module with a `@register("name")` class; the package (vlm_jax/grid/__init__.py) imports every
backend module, so importing any part of vlm_jax.grid registers them all.

A backend has `commands(job) -> list[list[str]]` (what `--dry-run` prints, in order) and
`run(job, log_path) -> int` (runs them, appending stdout and stderr to `log_path`; the exit code of the job).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import ml_collections

from vlm_jax.paths import REPO_ROOT
from vlm_jax.registry import Registry

BACKENDS = Registry("grid backend", "config.backend")
register = BACKENDS.register


def make(name: str, cfg: ml_collections.ConfigDict):
    """The backend called `name`, configured by `cfg` (config.backend.<name>; may be empty)."""
    return BACKENDS.lookup(name)(cfg)


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of grid work: `argv` (a `python -m launch.…` command, run from the repository root on every host
    of the job's machine) and its name (unique in the grid, safe as a file and resource name)."""

    name: str
    argv: tuple[str, ...]


@register("local")
class LocalBackend:
    """Runs the job here, as a child process with this interpreter (`python` in argv[0] becomes sys.executable),
    from the repository root."""

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        self.cfg = cfg

    def commands(self, job: Job) -> list[list[str]]:
        argv = list(job.argv)
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        return [argv]

    def run(self, job: Job, log_path: str) -> int:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        rc = 0
        for argv in self.commands(job):
            with open(log_path, "ab") as log:
                rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=REPO_ROOT).returncode
            if rc:
                break
        return rc
