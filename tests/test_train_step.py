"""The update step's settings against hand-computed values: the learning-rate schedule, a bfloat16 step, and
preemption (SIGTERM) of a real training process."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from tests import helpers
from vlm_jax import checkpoints, optim, sharding, train
from vlm_jax.models import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_learning_rate_schedule_at_hand_computed_steps():
    # 200 steps, 5% warmup = 10 linear steps from 0 to 1e-3, then a cosine over the other 190 down to 0.
    lr = optim.schedule(common.train_config(steps=200, warmup_ratio=0.05, lr=1e-3))
    expected = {0: 0.0, 5: 0.5e-3, 10: 1e-3, 105: 0.5e-3, 200: 0.0,
                48: 0.5e-3 * (1 + math.cos(math.pi * 38 / 190))}
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, abs=1e-9), step


def _one_step_loss(dtype):
    config = helpers.tiny_config(compressor="quecc", num_tokens=4, batch_size=4)
    config.model.dtype = dtype
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, tx = train.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = jax.jit(train.make_train_step(vlm.VLM(config.model), tx))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        _, metrics = step(state, helpers.random_batch(config))
    return float(metrics["loss"]), float(metrics["grad_norm"])


def test_bfloat16_step_runs_and_its_loss_is_close_to_float32():
    loss32, grad32 = _one_step_loss("float32")
    loss16, grad16 = _one_step_loss("bfloat16")
    assert np.isfinite([loss16, grad16]).all()
    assert loss16 == pytest.approx(loss32, rel=2e-2)   # bf16 keeps ~3 significant digits
    assert grad16 == pytest.approx(grad32, rel=1e-1)
    assert loss16 != loss32                            # it really computed in bfloat16


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/smoke.py:llm=tiny-s,tokens=4,res=32",
           f"--config.run_dir={run_dir}", "--config.train.steps=100000", "--config.train.batch_size=4",
           "--config.train.log_every=1", "--config.train.checkpoint_every=100000", "--config.data.seq_len=24"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):   # the loop is running
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    steps = sorted(int(d) for d in os.listdir(checkpoints.directory(str(run_dir))) if d.isdigit())
    assert steps == [last_logged] and 3 <= last_logged < 100000   # saved where it stopped, not at a schedule
    _, params = train.load_params(str(run_dir))
    assert np.isfinite(np.asarray(params["llm"]["norm"]["weight"])).all()
