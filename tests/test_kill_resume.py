"""A training process killed outright (SIGKILL: no handler runs) or stopped by SIGTERM mid-run resumes to exactly
the parameters of a run that was never interrupted; a checkpoint left half-written by a kill is never restored; a
checkpoint that cannot be written stops the run clearly and the one before it resumes. Real processes."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers
from vlm_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(run_dir, steps=12):
    return [sys.executable, "-m", "launch.train", "--config=configs/smoke.py:llm=tiny-s,tokens=4,res=32",
            f"--config.run_dir={run_dir}", f"--config.train.steps={steps}", "--config.train.batch_size=4",
            "--config.train.log_every=1", "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=10",
            "--config.data.seq_len=24"]


def _finished(run_dir, steps=12) -> dict:
    proc = subprocess.run(_command(run_dir, steps), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return helpers.trained_params(run_dir)


@pytest.mark.slow
def test_sigkill_after_the_first_checkpoint_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    steps = 60   # enough that the kill, up to 1.5 s after the first save, still lands before the end
    reference = _finished(tmp_path / "uninterrupted", steps)

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_command(run_dir, steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not helpers.saved_steps(run_dir):
            assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
            time.sleep(0.05)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))   # anywhere after it: mid-step, mid-save, ...
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # What a kill during a save leaves behind (orbax writes into a temporary directory, then renames it):
    ckpt = checkpoints.directory(str(run_dir))
    half = os.path.join(ckpt, "999.orbax-checkpoint-tmp-1")
    os.makedirs(os.path.join(half, "state"))
    with open(os.path.join(half, "state", "garbage"), "wb") as f:
        f.write(b"\x00" * 100)

    resumed = _finished(run_dir, steps)
    assert 999 not in helpers.saved_steps(run_dir)
    assert set(resumed) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


@pytest.mark.slow
def test_sigterm_mid_run_saves_exits_75_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    steps = 300   # long enough that the signal lands mid-run
    reference = _finished(tmp_path / "uninterrupted", steps)
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(_command(run_dir, steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 300
        while not helpers.saved_steps(run_dir):
            assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stderr[-3000:]   # stopped, resumable (EX_TEMPFAIL): not a finished run
    stopped = int(re.search(r"stopped on request after step (\d+) of 300", stderr).group(1))
    assert helpers.saved_steps(run_dir)[-1] == stopped < steps
    resumed = _finished(run_dir, steps)
    for name, value in reference.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def _limited_file_size(max_bytes):
    """preexec_fn: files this process writes cannot grow past max_bytes (EFBIG), as on a full disk; applies to
    root too, unlike a read-only directory."""
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_stops_the_run_clearly_and_the_previous_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, VLM_JAX_COMPILATION_CACHE="")
    first = subprocess.run(_command(run_dir) + ["--config.train.steps=3"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert helpers.saved_steps(run_dir) == [3]

    longer = _command(run_dir) + ["--allow_config_change"]   # 12 steps; the step-6 save cannot be written
    full = subprocess.run(longer, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
                          preexec_fn=_limited_file_size(64 << 10))
    assert full.returncode != 0
    assert "writing a checkpoint under" in full.stderr and "File too large" in full.stderr, full.stderr[-3000:]
    assert "the last complete checkpoint is step 3" in full.stderr
    assert helpers.saved_steps(run_dir) == [3]   # the failed step left only a temporary directory

    again = subprocess.run(longer, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 3" in again.stderr
    assert helpers.saved_steps(run_dir)[-1] == 12
