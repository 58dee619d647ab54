"""Push a small grid through the emulated Cloud TPU: the GCS emulator as the bucket, the gcloud stand-in, slices of 2
local worker processes each, `launch.grid` with backend tpu, as a person runs the paper grid on Cloud TPU.

    python -m tests.emulated_tpu.run_grid                       # tiny-xs x V in {1, 4}, a few steps each
    python -m tests.emulated_tpu.run_grid --preempt             # ... and preempt the first cell's slice in stage 2
    python -m tests.emulated_tpu.run_grid -- --dry_run          # anything after -- goes to launch.grid

Everything lives under --workdir (default /tmp/vlm-jax-emulated-tpu): the repository snapshot the workers clone
(this working tree, committed into a bare clone there), the service's state (service/calls.jsonl: every gcloud
call), the workers' homes (service/vms/), the bucket (gcs/; a local folder bucket/ with --local_bucket or when the
GCS emulator cannot run). The launcher's logs go to runs/grid-logs/ as for any bucket grid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from tests.emulated_tpu import fake_gcloud, harness
from vlm_jax.paths import REPO_ROOT

# A few steps of batch 4 per stage, 8 evaluation questions per family: the path, not the science.
SMALL = ["--config.cell.train.batch_size=4", "--config.cell.data.read_threads=1",
         "--config.tower.overrides.train.steps=4", "--config.tower.overrides.train.batch_size=4",
         "--config.llm_pretrain.overrides.train.steps=4", "--config.llm_pretrain.overrides.train.batch_size=4",
         "--config.stages.stage1.train.steps=4", "--config.stages.stage2.train.steps=6",
         "--config.eval.synthetic_per_family=8", "--config.eval.batch_size=8", "--config.fit.bootstrap=20",
         "--config.parallel=1"]


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
    tpu_flags = [f"--config.tpu.{key}={value}" for key, value in dict(
        project="emulated", zone="local-a", accelerator_type="v5litepod-16", hosts=2, repo_url=bare, commit=commit,
        gcloud=harness.GCLOUD, venv_args="--without-pip", install=harness.install_command(), plan=False,
        poll_seconds=1.0, retry_base_s=1.0, heartbeat_s=5.0, heartbeat_timeout_s=300.0, settle_s=60.0,
        log_every_s=5.0).items()]
    command = [sys.executable, "-m", "launch.grid", f"--config={args.grid}", f"--config.dir={grid_dir}",
               "--config.backend=tpu", *tpu_flags, *SMALL, *preempt, *args.grid_flags]
    print("$", " ".join(command[1:]), flush=True)
    try:
        rc = subprocess.run(command, cwd=REPO_ROOT).returncode
    finally:
        fake_gcloud.kill_all(os.environ[fake_gcloud.ROOT_ENV])
        stop()
    print("\ngcloud calls, in order (repeats counted):")
    calls = [" ".join(call[:5]) for call in fake_gcloud.calls(os.environ[fake_gcloud.ROOT_ENV])]
    for i, call in enumerate(calls):
        if i + 1 == len(calls) or calls[i + 1] != call:
            repeats = next((k for k in range(i + 1) if calls[i - k] != call), i + 1)
            print(f"  gcloud {call}" + (f"  (x{repeats})" if repeats > 1 else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
