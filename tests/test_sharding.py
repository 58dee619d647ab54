"""One train step, and greedy generation, on 1 device and on 8 fake CPU devices (data=2, fsdp=2, tensor=2) give
the same result; stage 1 on 8 devices keeps its (sharded) frozen parameters bit-identical.

JAX fixes its device count when the backend starts, so the 8-device run happens in a subprocess.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# ~35 s: one process with 8 devices runs every case below (the fast suite's 1-device tests cover the same code).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_step(mesh_cfg, devices):
    import flax.linen as nn
    import jax
    from flax import traverse_util

    from tests import helpers
    from vlm_jax import sharding
    from vlm_jax import state as state_lib
    from vlm_jax.models import vlm

    config = helpers.tiny_config(compressor="avgpool", num_tokens=4, batch_size=8)
    config.model.llm.scan_layers = True   # the stacked layout TPUs and GPUs run (a leading layers axis)
    # Adam's first update is lr * g / (|g| + eps): for gradients near eps it amplifies float32 summation-order
    # noise (which differs between meshes) into O(lr) differences. eps=1e-6 still let one embedding entry differ by
    # 1.4e-5 on one CI run; eps=1e-4 keeps that amplification far below the tolerance without hiding real
    # disagreements (a wrong shard changes the loss itself, checked to 1e-5, and gradients at 1e-2).
    config.train.eps = 1e-4
    mesh = sharding.make_mesh(mesh_cfg, devices)
    state, shardings, tx = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = jax.jit(state_lib.make_train_step(vlm.VLM(config.model), tx),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        batch = sharding.put_batch(helpers.random_batch(config), mesh)
        state, metrics = step(state, batch)
    flat = traverse_util.flatten_dict(state.params, sep="/")
    split = {k: [list(v.shape), list(v.addressable_shards[0].data.shape), str(v.sharding.spec)]
             for k, v in flat.items()}
    params = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
    return float(metrics["loss"]), params, split


def _greedy_tokens(mesh_cfg, devices):
    """Greedy generation with parameters sharded over the mesh (as `launch.evaluate --mesh` loads them)."""
    import flax.linen as nn
    import jax

    from tests import helpers
    from tests.test_generate import PREFIX, _prompts
    from vlm_jax import sharding
    from vlm_jax.evaluation import generate
    from vlm_jax.models import vlm

    config = helpers.tiny_config(num_tokens=4, seq_len=20)
    config.model.llm.scan_layers = True   # the stacked layout TPUs and GPUs run (a leading layers axis)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    init = vlm.init_fn(config.model)
    shardings = sharding.logical_to_sharding(jax.eval_shape(init, jax.random.key(1)), mesh)
    params = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)(jax.random.key(1))
    generator = generate.Generator(vlm.VLM(config.model), generate.GenerationConfig(max_new_tokens=6))
    batch = _prompts(config, [9, 14, 20, 12], prefix=PREFIX, image_at=len(PREFIX))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        out = generator(params, batch)
        prefix = generator.encode_prefix(params, PREFIX)
        cached = generator(params, generate.strip_prefix(batch, PREFIX), prefix=prefix)
    kernel = params["llm"]["layers"]["gate_proj"]["kernel"]
    return (np.asarray(out.tokens).tolist(), np.asarray(cached.tokens).tolist(),
            [list(kernel.shape), list(kernel.addressable_shards[0].data.shape)])


def _stage1_steps(mesh_cfg, devices, steps=2):
    """Stage 1 (train.stage='projector', frozen tower): frozen parameters before/after `steps` steps, and how
    the frozen ones are laid out over the mesh."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    from tests import helpers
    from vlm_jax import sharding
    from vlm_jax import state as state_lib
    from vlm_jax.models import vlm

    config = helpers.tiny_config(compressor="avgpool", num_tokens=4, batch_size=8, stage="projector")
    config.model.llm.scan_layers = True   # the stacked layout TPUs and GPUs run (a leading layers axis)
    config.train.train_vision = False
    mesh = sharding.make_mesh(mesh_cfg, devices)
    state, shardings, tx = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = jax.jit(state_lib.make_train_step(vlm.VLM(config.model), tx),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)))

    def host(tree):
        return {k: np.asarray(jax.device_get(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    frozen0, trained0 = host(state.frozen), host(state.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        for i in range(steps):
            state, _ = step(state, sharding.put_batch(helpers.random_batch(config, seed=i), mesh))
    frozen1, trained1 = host(state.frozen), host(state.params)
    split = {k: [list(v.shape), list(v.addressable_shards[0].data.shape)]
             for k, v in traverse_util.flatten_dict(state.frozen, sep="/").items()}
    return dict(frozen_changed=[k for k in frozen0 if not np.array_equal(frozen0[k], frozen1[k])],
                trained=sorted(trained0), trained_changed=[k for k in trained0
                                                           if not np.array_equal(trained0[k], trained1[k])],
                frozen_split=split)


def worker(out_path):
    import jax
    jax.config.update("jax_threefry_partitionable", True)
    assert jax.device_count() == 8, jax.device_count()
    loss1, params1, _ = _one_step(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    loss8, params8, split8 = _one_step(dict(data=2, fsdp=2, tensor=2), jax.devices())
    diff = {k: float(np.max(np.abs(params1[k] - params8[k]))) for k in params1}
    from tests import helpers
    from vlm_jax import train
    config = helpers.tiny_config(batch_size=6)
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    try:
        train.validate_config(config, 0)
        batch_error = ""
    except ValueError as e:
        batch_error = str(e)
    scale = {k: float(np.max(np.abs(params1[k]))) for k in params1}
    from vlm_jax import evaluation, sharding
    try:
        evaluation.Answerer(config, None, None, batch_size=6, mesh=sharding.make_mesh(config.mesh))
        eval_batch_error = ""
    except ValueError as e:
        eval_batch_error = str(e)
    gen1, _, _ = _greedy_tokens(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    gen8, gen8_cached, gen8_split = _greedy_tokens(dict(data=2, fsdp=2, tensor=2), jax.devices())
    with open(out_path, "w") as f:
        json.dump(dict(loss1=loss1, loss8=loss8, diff=diff, scale=scale, split=split8, batch_error=batch_error,
                       gen1=gen1, gen8=gen8, gen8_cached=gen8_cached, gen8_split=gen8_split,
                       eval_batch_error=eval_batch_error,
                       stage1=_stage1_steps(dict(data=2, fsdp=2, tensor=2), jax.devices())), f)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "result.json"
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    code = f"from tests.test_sharding import worker; worker({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_one_step_loss_matches_on_1_and_8_devices(result):
    assert abs(result["loss1"] - result["loss8"]) <= 1e-5 * max(1.0, abs(result["loss1"]))


def test_updated_params_match_on_1_and_8_devices(result):
    worst = max(result["diff"], key=result["diff"].get)
    assert result["diff"][worst] <= 1e-5 * max(1.0, result["scale"][worst]), (worst, result["diff"][worst])


# Matrices the rules split over fsdp (embed axis) and tensor (mlp / heads / vocab axis): 1/4 per device each.
LARGE = ("llm/layers/gate_proj/kernel", "llm/layers/up_proj/kernel", "llm/layers/down_proj/kernel",
         "llm/layers/self_attn/q_proj/kernel", "llm/layers/self_attn/o_proj/kernel", "llm/embed_tokens/embedding",
         "vision/layers_0/fc1/kernel")


def _assert_quartered(split, names):
    missing = [n for n in names if n not in split]
    assert not missing, f"no such parameters {missing}; have {sorted(split)}"
    for name in names:
        full, shard = split[name][:2]
        assert np.prod(shard) * 4 == np.prod(full), (name, full, shard)


def test_large_matrices_are_split_across_devices(result):
    _assert_quartered(result["split"], LARGE)


def test_stage1_keeps_frozen_parameters_bit_identical_and_sharded(result):
    stage1 = result["stage1"]
    assert stage1["trained"] and set(stage1["trained_changed"]) == set(stage1["trained"])   # steps did happen
    assert all(k.startswith(("llm/", "vision/")) for k in stage1["frozen_split"])
    assert stage1["frozen_changed"] == []
    _assert_quartered(stage1["frozen_split"], LARGE)


def test_batch_not_divisible_by_the_data_axes_fails_at_start(result):
    assert "train.batch_size=6" in result["batch_error"] and "4 shards" in result["batch_error"]


def test_generation_with_sharded_parameters_matches_one_device(result):
    full, shard = result["gen8_split"]
    assert np.prod(shard) * 4 == np.prod(full)   # the parameters really are split (fsdp x tensor)
    assert result["gen8"] == result["gen1"]
    assert result["gen8_cached"] == result["gen1"]   # and the cached-prefix path on the mesh
    assert "batch_size=6" in result["eval_batch_error"] and "data x fsdp = 4" in result["eval_batch_error"]
