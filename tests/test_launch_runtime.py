"""Launchers turn on XLA's persistent compilation cache: a second process loads what the first compiled."""

import json
import os
import subprocess
import sys

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
