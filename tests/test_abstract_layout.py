"""The state layout's shapes come from one traced init per model (vlm.abstract_init, cached by the config's
content): they must be exactly those of the real `init_state`, for every kind of model and stage, and the cache must
never hand one model's shapes to another."""

import json

import flax.linen as nn
import jax
import ml_collections
import pytest

from tests import helpers
from vlm_jax import sharding
from vlm_jax import state as state_lib
from vlm_jax.models import vlm


def _shapes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def _config(compressor, stage, **model):
    config = helpers.tiny_config(compressor=compressor, num_tokens=4, llm="tiny-s", stage=stage)
    config.model.vision.depth = 2
    config.model.update(model)
    return config


CASES = {
    "avgpool, full": _config("avgpool", "full"),
    "quecc, projector stage, torch init": _config("quecc", "projector", head_init="torch"),
    "resampler, bfloat16 storage": _config("resampler", "full", param_dtype="bfloat16"),
}
_elastic = _config("quecc", "full")
_elastic.train.elastic.mode, _elastic.train.elastic.tokens = "m3", (1, 4, 16)
_elastic.model.compressor.num_tokens = 16
CASES["quecc, elastic m3"] = _elastic


@pytest.mark.parametrize("name", CASES)
def test_the_layout_has_the_shapes_of_the_real_init(name):
    config = CASES[name]
    mesh = sharding.make_mesh(config.mesh)
    init_state, abstract, _ = state_lib.state_layout(config.model, config.train, mesh)
    truth = jax.eval_shape(init_state, jax.random.key(3))   # the init that create_state runs
    assert jax.tree.structure(abstract) == jax.tree.structure(truth)
    assert _shapes(abstract) == _shapes(truth)
    assert all(x.sharding is not None for x in jax.tree.leaves(abstract))


def test_a_config_read_back_from_json_is_the_same_model_and_traced_once():
    config = _config("quecc", "full")
    first = vlm.abstract_params(config.model)
    before = vlm._abstract_init.cache_info()
    again = ml_collections.ConfigDict(json.loads(config.model.to_json()))   # as an evaluation reads config.json
    assert _shapes(vlm.abstract_params(again)) == _shapes(first)
    after = vlm._abstract_init.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


@pytest.mark.parametrize("change", ["llm.num_layers", "compressor.num_tokens", "param_dtype"])
def test_a_changed_model_is_traced_anew(change):
    config = _config("quecc", "full")
    base = vlm.abstract_params(config.model)
    changed = ml_collections.ConfigDict(config.model.to_dict())
    key, _, leaf = change.rpartition(".")
    node = changed[key] if key else changed
    node[leaf] = {"num_layers": 3, "num_tokens": 16, "param_dtype": "bfloat16"}[leaf]
    new = vlm.abstract_params(changed)
    assert _shapes(new) != _shapes(base)
    truth = nn.meta.unbox(jax.eval_shape(vlm.init_fn(changed), jax.random.key(0)))
    assert _shapes(new) == _shapes(truth)
