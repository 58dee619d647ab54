"""Running Python in a fresh process from the repository root: what a benchmark does to measure a launcher, a cold
cache or another library's setting without this process's state."""

import subprocess
import sys

from vlm_jax.paths import REPO_ROOT


def run_python(args: list[str], env: dict, what: str) -> str:
    """`python ARGS` with the whole environment `env`; its last line of output. A failure raises with the end of its
    error output, naming `what` failed."""
    out = subprocess.run([sys.executable, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
