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


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


REEXEC = """
import os, sys
print("before", os.getpid(), flush=True)
from launch import runtime
runtime.start(distributed=False)
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
def test_launchers_rerun_themselves_with_huge_page_malloc_in_the_same_process():
    def lines(huge_pages: str) -> list[list[str]]:
        env = dict(os.environ, VLM_JAX_HUGE_PAGES=huge_pages, VLM_JAX_COMPILATION_CACHE="", PYTHONPATH=REPO_ROOT)
        env.pop("GLIBC_TUNABLES", None)
        out = subprocess.run([sys.executable, "-c", REEXEC], env=env, capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT)
        return [line.split() for line in out.stdout.splitlines()]
    on = lines("1")   # the code before start() runs twice (the process is re-executed), in one PID
    assert [x[0] for x in on] == ["before", "before", "after"] and len({x[1] for x in on}) == 1
    assert "glibc.malloc.hugetlb=1" in on[-1][2]
    off = lines("0")
    assert [x[0] for x in off] == ["before", "after"] and len(off[-1]) == 2   # no tunables set


@pytest.mark.slow   # ~40 s: two processes build and run the smoke train step
@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages on request (madvise mode); "
                    "'always' gives them without asking, 'never' not at all")
def test_huge_page_malloc_stops_steps_faulting_their_temporaries_in_4k_pages():
    def faults_per_step(huge_pages: str) -> float:
        env = dict(os.environ, VLM_JAX_HUGE_PAGES=huge_pages, VLM_JAX_COMPILATION_CACHE="", PYTHONPATH=REPO_ROOT)
        env.pop("GLIBC_TUNABLES", None)
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT)
        return float(out.stdout.strip().splitlines()[-1])
    off, on = faults_per_step("0"), faults_per_step("1")
    assert off > 163 * 2**20 / 4096 * 0.8   # each step faults its temporaries in anew, 4 KiB at a time
    assert on < off / 20
