"""Two real training processes joined by jax.distributed on localhost (CPU, gloo collectives, one device each):
SIGTERM to one of them stops both after the same step with a checkpoint; both resume; the result equals one
process with two devices trained on the same global batches."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60
CONFIG = ["--config=configs/smoke.py:llm=tiny-s,tokens=4,res=32", f"--config.train.steps={STEPS}",
          "--config.train.batch_size=4", "--config.train.log_every=1", "--config.train.checkpoint_every=5",
          "--config.train.keep_checkpoints=20", "--config.data.seq_len=24"]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", VLM_JAX_COMPILATION_CACHE="")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(run_dir) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "launch.train", *CONFIG, f"--config.run_dir={run_dir}", "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _wait(procs, timeout=600) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resume_matches_one_process(tmp_path):
    run_dir = tmp_path / "two"
    procs = _start_pair(run_dir)
    deadline = time.time() + 400
    while not helpers.saved_steps(run_dir):   # the first checkpoint (step 5) is written: both are in the loop
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "no first checkpoint"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)   # one host only
    logs = _wait(procs)
    assert [p.returncode for p in procs] == [75, 75], logs[0][-2000:] + logs[1][-2000:]
    stopped = [re.findall(r"stopped on request after step (\d+)", log) for log in logs]
    assert stopped[0] and stopped[0] == stopped[1], stopped   # the same step on both, said by both
    stop_step = int(stopped[0][0])
    assert stop_step < STEPS and helpers.saved_steps(run_dir)[-1] == stop_step

    logs = _wait(_start_pair(run_dir))   # resume both
    assert all(f"resumed from step {stop_step}" in log for log in logs), logs[0][-2000:]
    assert helpers.saved_steps(run_dir)[-1] == STEPS
    two_processes = helpers.trained_params(run_dir)

    ref_dir = tmp_path / "one"
    ref = subprocess.run([sys.executable, "-m", "tests.two_shard_reference", *CONFIG, f"--config.run_dir={ref_dir}"],
                         cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=600, check=False)
    assert ref.returncode == 0, ref.stderr[-3000:]
    one_process = helpers.trained_params(ref_dir)
    assert set(one_process) == set(two_processes)
    for name, value in one_process.items():
        np.testing.assert_allclose(two_processes[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
