"""A cheap stand-in for `launch.cell` on an emulated slice: a job that really joins its workers.

    python -m tests.emulated_tpu.fake_job --job_dir=DIR --distributed

Joins the other workers through launch.runtime.start (jax.distributed over JAX_COORDINATOR_ADDRESS; the process
count and index from the environment), agrees with them on where to start (DIR/checkpoint.json, written by process
0 after every step), runs the remaining steps and writes DIR/fake_result.json. DIR/fake_job.json says how:
{"steps": 3, "step_s": 0.2, "exit_code": 0, "stop": false}. Like launch.cell when preempted, SIGTERM (to any one
process: the others follow through a marker file) saves the checkpoint and exits 75; "stop": true exits 75 every
time, at once. Process 0 creates DIR/running once all have joined (a trigger for the emulator's faults).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

from absl import flags
from etils import epath

from vlm_jax import files

flags.DEFINE_string("job_dir", None, "The job's directory (shared by the workers: a local folder or gs://).")
flags.DEFINE_bool("distributed", False, "Join the other workers (jax.distributed).")
FLAGS = flags.FLAGS

EX_TEMPFAIL = 75


def _read(path: str, default):
    try:
        return json.loads(epath.Path(path).read_text())
    except (OSError, ValueError):
        return default


def _write(path: str, obj) -> None:
    files.write_json_atomic(path, obj)


def _touch(path: str) -> None:
    epath.Path(path).write_text("")


def main(argv):
    del argv
    from launch import runtime
    runtime.start(FLAGS.distributed)
    stopping = []   # after jax.distributed, whose preemption notifier takes SIGTERM otherwise
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    job_dir, me = FLAGS.job_dir, jax.process_index()
    spec = _read(os.path.join(job_dir, "fake_job.json"), {})
    checkpoint = os.path.join(job_dir, "checkpoint.json")
    mine = np.array([_read(checkpoint, {"step": 0})["step"], random.randrange(1 << 30), me])
    agreed = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
    start, run = int(agreed[0, 0]), int(agreed[0, 1])   # process 0's view; its token names this run
    stop_marker = os.path.join(job_dir, f"stop-{run}")
    print(f"fake job: process {me} of {jax.process_count()}, joined {agreed[:, 2].tolist()}, from step {start}",
          flush=True)
    if me == 0:
        _touch(os.path.join(job_dir, "running"))
    if spec.get("stop"):
        print("fake job: told to stop: exit 75", flush=True)
        os._exit(EX_TEMPFAIL)
    for step in range(start, spec.get("steps", 3)):
        deadline = time.monotonic() + spec.get("step_s", 0.2)
        while time.monotonic() < deadline:
            if stopping or epath.Path(stop_marker).exists():
                _touch(stop_marker)
                print(f"fake job: process {me} stopped in step {step}, checkpoint at step {step}: exit 75",
                      flush=True)
                jax.distributed.shutdown()   # together (a barrier): no process outlives the coordinator
                os._exit(EX_TEMPFAIL)   # as launch.cell: never a result while partial
            time.sleep(0.1)
        if me == 0:
            _write(checkpoint, {"step": step + 1})
    multihost_utils.sync_global_devices("fake job: end")
    if me == 0:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        _write(os.path.join(job_dir, "fake_result.json"), dict(
            processes=agreed[:, 2].tolist(), resumed_from=start, prefix=sys.prefix, cwd=os.getcwd(), commit=commit,
            python=list(sys.version_info[:2])))
    print(f"fake job: process {me} done", flush=True)
    sys.exit(spec.get("exit_code", 0))


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
