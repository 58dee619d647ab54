"""`config.init` across the LLM's two decoder-layer layouts: a checkpoint saved with looped layers
(`llm/layers_<i>/...`, as on a CPU host) is read by a model that scans them (`llm/layers/...`, [num_layers, ...], as
on TPU), and the other way round."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests import helpers
from vlm_jax import checkpoints, optim, sharding
from vlm_jax import state as state_lib


def _config(scan: bool, num_layers: int = 2):
    """The tiny model with the tiny-xs LLM, its layers scanned (`scan`) or looped."""
    config = helpers.tiny_config(llm="tiny-xs")
    config.model.llm.scan_layers = scan
    config.model.llm.num_layers = num_layers
    return config


def _mesh(**axes):
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, **axes})


def _flat(state) -> dict:
    return {k: np.asarray(v) for k, v in
            traverse_util.flatten_dict(optim.merge(state.params, state.frozen), sep="/").items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{scan: (run directory, saved parameters by name)}: a train state of the tiny model, every number drawn at
    random (no two layers alike), saved with each layer layout."""
    rng = np.random.default_rng(0)
    out = {}
    for scan in (False, True):
        config = _config(scan)
        _, abstract, _ = state_lib.state_layout(config.model, config.train, _mesh())
        state = jax.tree.map(lambda a: jax.device_put(np.asarray(rng.standard_normal(a.shape), a.dtype), a.sharding),
                             abstract)
        run_dir = str(tmp_path_factory.mktemp(f"scan_{scan}"))
        mngr = checkpoints.manager(checkpoints.directory(run_dir))
        checkpoints.save(mngr, 5, state, force=True)
        checkpoints.wait(mngr)
        mngr.close()
        out[scan] = run_dir, _flat(state)
    return out


def _init_from(run_dir: str, scan: bool):
    """The state config.init builds for a model with layout `scan`, every parameter taken from `run_dir`."""
    config = _config(scan)
    state, shardings, _ = state_lib.create_state(config.model, config.train, _mesh(), jax.random.key(2),
                                                 sources=[(run_dir, ".*")])
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    return _flat(state)


def test_a_looped_checkpoint_initialises_a_scanned_model(saved):
    run_dir, looped = saved[False]
    got = _init_from(run_dir, scan=True)
    stacked = [k for k in got if k.startswith("llm/layers/")]
    assert stacked and not any(k.startswith("llm/layers_") for k in got)
    for name, value in got.items():
        if name in stacked:
            assert value.shape[0] == 2
            for i in range(2):   # row i of the stack is the checkpoint's layer i
                np.testing.assert_array_equal(value[i], looped[name.replace("llm/layers/", f"llm/layers_{i}/")],
                                              err_msg=f"{name}[{i}]")
        else:
            np.testing.assert_array_equal(value, looped[name], err_msg=name)
    assert len(got) == len(looped) - len(stacked)   # 2 looped arrays per stacked one


def test_a_scanned_checkpoint_initialises_a_looped_model(saved):
    run_dir, scanned = saved[True]
    got = _init_from(run_dir, scan=False)
    per_layer = [k for k in got if k.startswith("llm/layers_")]
    assert per_layer and not any(k.startswith("llm/layers/") for k in got)
    for name, value in got.items():
        if name in per_layer:
            i, rest = name.removeprefix("llm/layers_").split("/", 1)   # layer i is row i of the stack
            np.testing.assert_array_equal(value, scanned[f"llm/layers/{rest}"][int(i)], err_msg=name)
        else:
            np.testing.assert_array_equal(value, scanned[name], err_msg=name)
    assert len(got) == len(scanned) + len(per_layer) // 2   # 2 looped arrays per stacked one


def _abstract(scan: bool, num_layers: int = 2, mesh=None) -> dict:
    config = _config(scan, num_layers)
    _, abstract, _ = state_lib.state_layout(config.model, config.train, mesh or _mesh())
    return traverse_util.flatten_dict(optim.merge(abstract.params, abstract.frozen), sep="/")


def test_a_layer_the_other_layout_lacks_is_named(saved):
    # A 3-layer scanned model from the 2-layer looped checkpoint: its layer 2 is missing.
    with pytest.raises(ValueError, match=r"no parameter 'llm/layers/down_proj/kernel', nor "
                                         r"'llm/layers_2/down_proj/kernel' of the other layer layout"):
        checkpoints.restore_matching(saved[False][0], "llm/.*", _abstract(scan=True, num_layers=3))
    # A 3-layer looped model from the 2-layer scanned checkpoint: the stack has 2 layers, the model 3.
    with pytest.raises(ValueError, match=r"'llm/layers/down_proj/kernel' has shape \(2, 86, 32\) in the checkpoint, "
                                         r"reading 'llm/layers_0/down_proj/kernel' of shape \(86, 32\) needs "
                                         r"\(3, 86, 32\)"):
        checkpoints.restore_matching(saved[True][0], "llm/.*", _abstract(scan=False, num_layers=3))


def sharded_worker(looped_dir: str, scanned_dir: str):
    """Run with 4 CPU devices: both conversions onto a (fsdp=2, tensor=2) mesh. Each parameter lands on its own
    sharding, split where the rules split it, every shard holding the checkpoint's numbers (read in the
    checkpoint's own layout, the unconverted path, for reference)."""
    mesh = _mesh(fsdp=2, tensor=2)
    for source, own_layout, scan in ((looped_dir, False, True), (scanned_dir, True, False)):
        abstract = _abstract(scan, mesh=mesh)
        got = checkpoints.restore_matching(source, ".*", abstract)
        ref = {k: np.asarray(v) for k, v in
               checkpoints.restore_matching(source, ".*", _abstract(own_layout, mesh=mesh)).items()}
        layers = [k for k in got if k.startswith("llm/layers")]
        assert any(not got[k].sharding.is_fully_replicated for k in layers)
        for name, value in got.items():
            assert value.sharding == abstract[name].sharding, name
            if scan and name in layers:
                want = np.stack([ref[name.replace("llm/layers/", f"llm/layers_{i}/")] for i in range(2)])
            elif name in layers:
                i, rest = name.removeprefix("llm/layers_").split("/", 1)
                want = ref[f"llm/layers/{rest}"][int(i)]
            else:
                want = ref[name]
            for shard in value.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=name)


@pytest.mark.slow   # a process with 4 devices
def test_converted_parameters_land_on_their_shardings_over_several_devices(saved):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=root)
    code = (f"from tests.test_checkpoint_layouts import sharded_worker; "
            f"sharded_worker({saved[False][0]!r}, {saved[True][0]!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
