"""Push a small grid through the emulated Cloud TPU: the GCS emulator as the bucket, the gcloud stand-in, slices of 2
local worker processes each, `launch.grid` with backend tpu, as a person runs the paper grid on Cloud TPU.

    python -m tests.emulated_tpu.run_grid                       # tiny-xs x V in {1, 4}, a few steps each
    python -m tests.emulated_tpu.run_grid --preempt             # ... and preempt the first cell's slice in stage 2
    python -m tests.emulated_tpu.run_grid -- --dry_run          # anything after -- goes to launch.grid

Everything lives under --workdir (default /tmp/vlm-jax-emulated-tpu): the repository snapshot the workers clone
(this working tree, committed into a bare clone there), the service's state (service/calls.jsonl: every gcloud
call), the workers' homes (service/vms/), the bucket (gcs/; a local folder bucket/ with --local_bucket or when the
GCS emulator cannot run). The launcher's logs go to runs/grid-logs/ as for any bucket grid.

Tests run grids through the same functions: `tpu_flags` (the backend's flags for the emulated service), `launch`
(one launch.grid run: exit code, output, wall time, results.jsonl rows, the gcloud calls) and `call_lines` (the
calls, repeats counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from tests.emulated_tpu import fake_gcloud, harness
from vlm_jax.paths import REPO_ROOT

# A few steps of batch 4 per stage, 8 evaluation questions per family: the path, not the science.
SMALL = ["--config.cell.train.batch_size=4", "--config.cell.data.read_threads=1",
         "--config.tower.overrides.train.steps=4", "--config.tower.overrides.train.batch_size=4",
         "--config.llm_pretrain.overrides.train.steps=4", "--config.llm_pretrain.overrides.train.batch_size=4",
         "--config.stages.stage1.train.steps=4", "--config.stages.stage2.train.steps=6",
         "--config.eval.synthetic_per_family=8", "--config.eval.batch_size=8", "--config.fit.bootstrap=20",
         "--config.parallel=1", "--config.seeds=(0,)"]


def tpu_flags(repo_url: str, commit: str, **overrides) -> list[str]:
    """--config.backend=tpu and its --config.tpu.* flags for the emulated service: the repository the workers clone
    (and its commit), the gcloud stand-in, the install step, 2 hosts a slice, polls and heartbeats fit for a run of
    minutes; `overrides` replace or add config.tpu keys."""
    settings = dict(
        project="emulated", zone="local-a", accelerator_type="v5litepod-16", hosts=2, repo_url=repo_url,
        commit=commit, gcloud=harness.GCLOUD, venv_args="--without-pip", install=harness.install_command(),
        plan=False, poll_seconds=1.0, retry_base_s=1.0, heartbeat_s=5.0, heartbeat_timeout_s=300.0, settle_s=60.0,
        log_every_s=5.0)
    settings.update(overrides)
    return ["--config.backend=tpu", *(f"--config.tpu.{key}={value}" for key, value in settings.items())]


@dataclasses.dataclass
class GridRun:
    """One launch.grid run."""
    rc: int
    output: str                                # the launcher's stdout and stderr
    wall_s: float
    rows: list[dict]                           # results.jsonl ([] when there is none)
    calls: list[list[str]] = dataclasses.field(default_factory=list)   # the service's gcloud calls, in order


def read_rows(grid_dir: str) -> list[dict]:
    """<grid_dir>/results.jsonl (a local folder or gs://), or [] when there is none."""
    from etils import epath
    path = epath.Path(grid_dir) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def launch(grid: str, grid_dir: str, flags: Sequence[str] = (), *, env: dict | None = None, cwd: str = REPO_ROOT,
           service: str | None = None, echo: Callable[[str], None] = print) -> GridRun:
    """`python -m launch.grid --config=<grid> --config.dir=<grid_dir> <flags>`, its output echoed line by line as
    it comes; `service` is the emulated service's state folder (its gcloud calls are returned). The launcher leads a
    process group of its own, ended (SIGKILL) if this call ends early (an exception, e.g. a test's deadline)."""
    command = [sys.executable, "-m", "launch.grid", f"--config={grid}", f"--config.dir={grid_dir}", *flags]
    echo("$ " + " ".join(command[1:]))
    start = time.monotonic()
    lines = []
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    try:
        for line in proc.stdout:
            lines.append(line)
            echo(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    wall_s = time.monotonic() - start
    return GridRun(rc, "".join(lines), wall_s, read_rows(grid_dir), fake_gcloud.calls(service) if service else [])


def call_lines(calls: list[list[str]], words: int = 5) -> list[str]:
    """'gcloud <the first `words` words of each call>', consecutive repeats counted: '... (x35)'."""
    out = []
    for argv in calls:
        line = "gcloud " + " ".join(argv[:words])
        if out and out[-1][0] == line:
            out[-1][1] += 1
        else:
            out.append([line, 1])
    return [line + (f"  (x{n})" if n > 1 else "") for line, n in out]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vlm-jax-emulated-tpu")
    parser.add_argument("--grid", default="configs/grid.py:smoke,llms=tiny-xs,tokens=1+4")
    parser.add_argument("--local_bucket", action="store_true", help="a local folder as the bucket, not gs://")
    parser.add_argument("--preempt", action="store_true", help="preempt one slice once its stage 2 has begun")
    parser.add_argument("grid_flags", nargs="*", help="more launch.grid flags (after --)")
    args = parser.parse_args(argv)

    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    bare, commit = harness.snapshot(work)
    os.environ.update(PATH=harness.worker_bin(os.path.join(work, "bin")), **{
        fake_gcloud.ROOT_ENV: os.path.join(work, "service"), fake_gcloud.HOSTS_ENV: "2"})
    stop = lambda: None  # noqa: E731
    bucket = os.path.join(work, "bucket")
    if not args.local_bucket:
        from tests import gcs_emulator
        try:
            env, stop = gcs_emulator.start_emulator(os.path.join(work, "gcs"))
            gcs_emulator.apply_env(env)   # the launcher, the stand-in and every worker reach it
            bucket = f"gs://{gcs_emulator.BUCKET}"
        except gcs_emulator.EmulatorUnavailable as e:
            print(f"GCS emulator unavailable ({e}): a local folder is the bucket")
    grid_dir = f"{bucket}/grid"
    preempt = []
    if args.preempt:   # the slice of the cell that trains first (the costliest) is preempted in its stage 2
        fake_gcloud.write_faults(os.environ[fake_gcloud.ROOT_ENV], [
            {"action": "preempt", "slice": "*-v4-*", "when_exists": f"{grid_dir}/cells/tiny-xs_v4/stage2/metrics.jsonl",
             "grace_s": 60}])
        # long enough to be caught in the middle: metrics from step 5 on, checkpoints every 20 steps
        preempt = ["--config.stages.stage2.train.steps=80", "--config.cell.train.log_every=5",
                   "--config.cell.train.checkpoint_every=20"]
    service = os.environ[fake_gcloud.ROOT_ENV]
    try:
        run = launch(args.grid, grid_dir, [*tpu_flags(bare, commit), *SMALL, *preempt, *args.grid_flags],
                     service=service, echo=lambda line: print(line, flush=True))
    finally:
        fake_gcloud.kill_all(service)
        stop()
    print(f"\nlaunch.grid: exit code {run.rc} in {run.wall_s:.1f}s; {len(run.rows)} rows in {grid_dir}/results.jsonl")
    print("gcloud calls, in order (repeats counted):")
    for line in call_lines(run.calls):
        print(f"  {line}")
    return run.rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
