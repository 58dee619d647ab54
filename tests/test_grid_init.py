"""`config.init`: a run starts from parameters of other checkpoints (the grid's tower -> stage 1 -> stage 2 chain)."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import common, models
from tests import helpers
from vlm_jax import checkpoints, optim, sharding
from vlm_jax import state as state_lib
from vlm_jax.grid import cell


def _flat(params) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _tiny_grid(tmp_path, **stage2_train):
    """One cell (tiny-xs, V=4) of the shrunk smoke grid, and its tower job."""
    (tower,), (job,) = helpers.grid_jobs(helpers.tiny_grid(tmp_path, tokens="4", **stage2_train))
    return tower, job


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tower pretraining, then the cell's stage 1 (from the tower) and stage 2 (from stage 1, at learning rate 0)."""
    tower, job = _tiny_grid(tmp_path_factory.mktemp("chain"), lr=0.0)
    cell.run_stages(tower.spec)
    cell.run_stages(job.spec)
    dirs = {"tower": tower.spec["stages"][0]["config"]["run_dir"]}
    dirs.update({s["name"]: s["config"]["run_dir"] for s in job.spec["stages"]})
    return {name: _flat(state_lib.load_params(d)[1]) for name, d in dirs.items()}, dirs, job


def test_stage1_takes_the_pretrained_tower_and_trains_only_compressor_and_projector(chain):
    params, _, job = chain
    tower, stage1 = params["tower"], params["stage1"]
    fresh = _flat(optim.merge(*_fresh_state(job.spec["stages"][0]["config"])[0:2]))
    vision = [k for k in stage1 if k.startswith("vision/")]
    assert vision and all(np.array_equal(stage1[k], tower[k]) for k in vision)
    # The tower was trained, so taking it is visible: its weights are not the fresh ones.
    assert any(not np.array_equal(tower[k], fresh[k]) for k in vision)
    llm = [k for k in stage1 if k.startswith("llm/")]
    assert all(np.array_equal(stage1[k], fresh[k]) for k in llm)       # frozen in stage 1, not from the tower
    projector = [k for k in stage1 if k.startswith("projector/")]
    assert projector and all(not np.array_equal(stage1[k], fresh[k]) for k in projector)


def test_stage2_starts_from_stage1_across_a_different_trainable_split(chain):
    params, _, _ = chain
    stage1, stage2 = params["stage1"], params["stage2"]
    assert sorted(stage1) == sorted(stage2)
    # Stage 2 trained at learning rate 0, so its weights are exactly where it started: stage 1's.
    for k in stage1:
        np.testing.assert_array_equal(stage2[k], stage1[k], err_msg=k)


def _fresh_state(run_cfg: dict):
    """(trainable, frozen, state, abstract state) of a run config's fresh initialisation."""
    cfg = ml_collections.ConfigDict(run_cfg)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    state, shardings, _ = state_lib.create_state(cfg.model, cfg.train, mesh, jax.random.key(cfg.seed))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return state.params, state.frozen, state, abstract


def test_init_takes_matching_params_and_leaves_the_rest_fresh(chain):
    params, dirs, job = chain
    cfg = ml_collections.ConfigDict(job.spec["stages"][0]["config"])
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    rng = jax.random.key(7)   # another seed than the source's: fresh values differ from the source's
    fresh, _, _ = state_lib.create_state(cfg.model, cfg.train, mesh, rng)
    out, _, _ = state_lib.create_state(cfg.model, cfg.train, mesh, rng, sources=[(dirs["stage1"], "projector/.*")])
    fresh, got = _flat(optim.merge(fresh.params, fresh.frozen)), _flat(optim.merge(out.params, out.frozen))
    for k, v in got.items():
        want = params["stage1"][k] if k.startswith("projector/") else fresh[k]
        np.testing.assert_array_equal(v, want, err_msg=k)
    assert sum(not np.array_equal(got[k], params["stage1"][k]) for k in got) > len(got) // 2   # the rest not taken
    moments = [x for x in jax.tree.leaves(out.opt_state) if np.ndim(x) > 0]
    assert moments and not any(np.asarray(x).any() for x in moments)   # the optimizer starts fresh: zero moments


def test_all_params_from_sources_needs_no_fresh_init(chain):
    params, dirs, job = chain
    cfg = ml_collections.ConfigDict(job.spec["stages"][1]["config"])   # stage 2: everything from stage 1
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    state, shardings, _ = state_lib.create_state(cfg.model, cfg.train, mesh, jax.random.key(0),
                                             sources=[(dirs["stage1"], ".*")])
    got = _flat(optim.merge(state.params, state.frozen))
    assert sorted(got) == sorted(params["stage1"]) and int(state.step) == 0
    for k, v in got.items():
        np.testing.assert_array_equal(v, params["stage1"][k], err_msg=k)
    assert jax.tree.map(lambda x: x.sharding, state) == shardings


def _abstract_params(llm: str, head: str) -> dict:
    """{name: ShapeDtypeStruct with sharding} of a model, as `train` builds it (nothing allocated)."""
    model = models.model_config("tiny", llm, head, 4)
    _, abstract, _ = state_lib.state_layout(model, common.train_config(stage="full"),
                                        sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
    return traverse_util.flatten_dict(optim.merge(abstract.params, abstract.frozen), sep="/")


def test_init_errors_name_the_parameter(chain):
    _, dirs, _ = chain
    source = dirs["stage1"]   # tiny vision tower, avgpool head (no compressor params), tiny-xs LLM
    with pytest.raises(ValueError, match="selects no parameter"):
        checkpoints.restore_matching(source, "nothing/.*", _abstract_params("tiny-xs", "avgpool"))
    # A head with parameters that the source model never had.
    with pytest.raises(ValueError, match=r"has no parameter 'compressor/"):
        checkpoints.restore_matching(source, "compressor/.*", _abstract_params("tiny-xs", "quecc"))
    # A wider LLM: same names, other shapes.
    with pytest.raises(ValueError, match=r"'llm/.*' has shape .* the model wants"):
        checkpoints.restore_matching(source, "llm/.*", _abstract_params("tiny-s", "avgpool"))
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoints.restore_matching(source + "-missing", ".*", _abstract_params("tiny-xs", "avgpool"))
    with pytest.raises(ValueError, match="must be"):
        checkpoints.init_sources([("only-a-directory",)])
