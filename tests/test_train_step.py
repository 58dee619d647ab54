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
from vlm_jax import state as state_lib
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
    # QueCC (its query pass through the LLM included) on the 2-layer LLM and a 2-block tower: every kind of layer
    # the dtype flows through, at the smallest depth.
    config = helpers.tiny_config(compressor="quecc", num_tokens=4, batch_size=4, llm="tiny-s")
    config.model.vision.depth = 2
    config.model.dtype = dtype
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, tx = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = jax.jit(state_lib.make_train_step(vlm.VLM(config.model), tx))
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


@pytest.mark.slow   # starts a training process and signals it
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_75(tmp_path):
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
    assert proc.returncode == 75, stderr[-3000:]   # stopped, resumable (EX_TEMPFAIL): not a finished run
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    steps = sorted(int(d) for d in os.listdir(checkpoints.directory(str(run_dir))) if d.isdigit())
    assert steps == [last_logged] and 3 <= last_logged < 100000   # saved where it stopped, not at a schedule
    _, params = state_lib.load_params(str(run_dir))
    assert np.isfinite(np.asarray(params["llm"]["norm"]["weight"])).all()


def test_eval_step_counts_answers_right_under_teacher_forcing_and_the_training_loss():
    config = helpers.tiny_config(num_tokens=4, batch_size=4)
    model = vlm.VLM(config.model)
    batch = helpers.random_batch(config)
    params = nn.meta.unbox(jax.jit(vlm.init_fn(config.model))(jax.random.key(0)))
    logits = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, **state_lib.model_inputs(b)))(params, batch))
    # Targets: the model's own argmax at answer tokens (right by construction), anything else elsewhere (not
    # scored); rows 2 and 3 get one answer token off.
    vocab = config.model.llm.vocab_size
    argmax = np.argmax(logits, -1).astype(np.int32)
    targets = np.where(batch["loss_mask"] > 0, argmax, (argmax + 1) % vocab).astype(np.int32)
    for row in (2, 3):
        pos = np.flatnonzero(batch["loss_mask"][row])[-1]
        targets[row, pos] = (targets[row, pos] + 1) % vocab
    batch = dict(batch, targets=targets, valid=np.array([1, 1, 1, 0], np.float32))
    batch["loss_mask"] = batch["loss_mask"] * batch["valid"][:, None]   # a filler row has no loss
    sums = jax.jit(state_lib.make_eval_step(model))(params, batch)
    assert float(sums["exact"]) == 2 and float(sums["rows"]) == 3
    loss, n = state_lib.masked_cross_entropy(logits, targets, batch["loss_mask"])
    assert float(sums["loss_sum"]) / float(sums["tokens"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(sums["tokens"]) == float(n)


def test_training_logs_validation_metrics_every_eval_every_steps(tmp_path):
    from configs import smoke
    config = smoke.get_config("llm=tiny-s,tokens=4,res=32")
    with config.unlocked():
        config.run_dir = str(tmp_path)
        config.data.seq_len = 24
        config.train.update(steps=5, batch_size=4, log_every=5, checkpoint_every=5, eval_every=2, eval_batches=2)
    last = train.run(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/loss" in r}
    assert sorted(evals) == [2, 4, 5]                  # every 2 steps, and at the end
    assert "loss" not in evals[2] and "loss" in evals[5]   # off-log evals get their own line
    for r in evals.values():
        assert r["eval/examples"] == 8 and np.isfinite(r["eval/loss"]) and 0 <= r["eval/exact_match"] <= 1
    assert last["eval/loss"] == evals[5]["eval/loss"]
    assert evals[5]["eval/loss"] < evals[2]["eval/loss"]   # the same validation batches, after more training
