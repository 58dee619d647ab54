"""What a test (or run_grid.py) needs around the emulated service: the repository to clone, the worker's PATH, and
the tpu backend's config pointing at it all.

The workers run the code under test: `snapshot` commits this working tree as it is (edited tracked files, new files
under the project's folders) into a bare clone in a temporary folder, leaving this repository untouched, and the
backend runs that commit (config.tpu.commit) as it would run a pushed one.
"""

from __future__ import annotations

import os
import shlex
import site
import subprocess
import sys

from vlm_jax.grid import tpu
from vlm_jax.paths import REPO_ROOT

GCLOUD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcloud")
FOLDERS = ("launch", "vlm_jax", "configs", "tests", "benchmarks")   # new files here go into the snapshot


def snapshot(dest: str, repo: str = REPO_ROOT) -> tuple[str, str]:
    """(bare repository, commit): a bare clone of `repo` at dest/vlm-jax.git with one more commit, the working
    tree now, on branch `snapshot`. Objects and index are written under `dest` only."""
    bare = os.path.join(dest, "vlm-jax.git")
    subprocess.run(["git", "clone", "-q", "--bare", repo, bare], check=True)
    env = dict(os.environ, GIT_DIR=bare, GIT_WORK_TREE=repo, GIT_INDEX_FILE=os.path.join(dest, "snapshot.index"))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], env=env, check=True, capture_output=True, text=True).stdout.strip()

    git("read-tree", "HEAD")
    git("add", "-u")
    git("add", "--", *(f for f in FOLDERS if os.path.isdir(os.path.join(repo, f))))
    commit = git("commit-tree", git("write-tree"), "-p", "HEAD", "-m", "snapshot of the working tree")
    git("update-ref", "refs/heads/snapshot", commit)
    return bare, commit


def worker_bin(folder: str) -> str:
    """A PATH for the emulated VMs (and the gcloud stand-in): this folder, then /usr/bin:/bin. In it: `python3.11`
    and `python3`, this interpreter (the VM's Python; the set-up's search finds python3.11 first), and
    python3.12/python3.13 that are not installed (exit 127, as a pyenv shim without that version does)."""
    os.makedirs(folder, exist_ok=True)
    scripts = {name: f"exec {shlex.quote(sys.executable)} \"$@\"" for name in ("python3.11", "python3")}
    # (exec, not a symlink: a venv's python linked from elsewhere starts without the venv's packages)
    scripts.update({name: f"echo '{name}: command not found' >&2; exit 127" for name in ("python3.12", "python3.13")})
    for name, body in scripts.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"#!/bin/sh\n{body}\n")
        os.chmod(os.path.join(folder, name), 0o755)
    return os.pathsep.join([folder, "/usr/bin", "/bin"])


def install_command(check: bool = False) -> str:
    """config.tpu.install for the emulated workers: this interpreter's packages, linked into the worker's venv;
    with check, pip --no-index then confirms requirements.txt is satisfied."""
    return shlex.join(["python", "-m", "tests.emulated_tpu.install", *site.getsitepackages()]
                      + (["--check"] if check else []))


def tpu_config(repo_url: str, commit: str, **overrides):
    """config.tpu for the emulated service: fast polls, retries and heartbeats; the install from install_command."""
    cfg = tpu.default_config()
    cfg.update(dict(
        project="emulated", zone="local-a", accelerator_type="v5p-16", repo_url=repo_url, commit=commit,
        gcloud=GCLOUD, venv_args="--without-pip", install=install_command(),
        poll_seconds=0.2, provision_timeout_s=120.0, retries=4, retry_base_s=0.2, retry_max_s=1.0,
        heartbeat_s=0.5, heartbeat_timeout_s=30.0, settle_s=10.0, log_every_s=1.0, plan=False))
    cfg.update(overrides)
    return cfg
