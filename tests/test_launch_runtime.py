"""Launchers turn on XLA's persistent compilation cache: a second process loads what the first compiled."""

import json
import os
import subprocess
import sys

import pytest

from vlm_jax.grid.backends import REPO_ROOT

PROBE = """
import json, jax, jax.numpy as jnp
from launch import runtime
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
runtime.start(distributed=False)
jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _probe(cache: str) -> dict:
    env = dict(os.environ, VLM_JAX_COMPILATION_CACHE=cache, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_hits_the_cache_the_first_filled(tmp_path):
    cache = str(tmp_path / "xla")
    first = _probe(cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert os.listdir(cache)
    second = _probe(cache)
    assert second["hits"] >= 1 and second["misses"] == 0


def test_an_empty_setting_turns_the_cache_off(tmp_path):
    off = _probe("")
    assert off == {"hits": 0, "misses": 0}


FAULTS = """
import resource, sys
import jax, numpy as np, flax.linen as nn
from configs import smoke
from launch import runtime
from vlm_jax import sharding, train
from vlm_jax.models import vlm
runtime.start(distributed=False)
c = smoke.get_config(None)   # its train step allocates 163 MiB of temporaries on every run
mesh = sharding.make_mesh(c.mesh)
state, _, tx = train.create_state(c.model, c.train, mesh, jax.random.key(0))
b, length, s, v, lq = c.train.batch_size, c.data.seq_len + c.model.compressor.num_tokens, c.model.vision.image_size, \\
    c.model.compressor.num_tokens, c.data.question_len
ints = lambda *shape: np.ones(shape, np.int32)
batch = dict(pixels=np.zeros((b, s, s, 3), np.float32), tokens=ints(b, length), targets=ints(b, length),
             loss_mask=np.ones((b, length), np.float32), attention_mask=ints(b, length), image_positions=ints(b, v),
             question_tokens=ints(b, lq), question_mask=ints(b, lq))
step = jax.jit(train.make_train_step(vlm.VLM(c.model), tx), donate_argnums=(0,))
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state, m = step(state, batch)
    jax.block_until_ready(m)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        state, m = step(state, batch)
        jax.block_until_ready(m)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.slow   # ~40 s: two processes build and run the smoke train step
def test_launchers_keep_freed_memory_so_steps_stop_faulting_their_temporaries_in():
    def faults_per_step(keep: str) -> float:
        env = dict(os.environ, VLM_JAX_KEEP_FREED_MEMORY=keep, VLM_JAX_COMPILATION_CACHE="", PYTHONPATH=REPO_ROOT)
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT)
        return float(out.stdout.strip().splitlines()[-1])
    off, on = faults_per_step("0"), faults_per_step("1")
    assert off > 163 * 2**20 / 4096 * 0.8   # each step faults its temporaries in anew (4 KiB pages)
    assert on < off / 3
