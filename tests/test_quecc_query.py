"""The question path inside the full VLM: only QueCC listens to the question, the question is encoded by the
model's own LLM parameters, and no gradient reaches the LLM through that path."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests import helpers
from tests.test_compressors import random_like
from vlm_jax import state as state_lib
from vlm_jax.models import heads, vlm

HEADS = {"quecc": 4, "tokenpacker": 4, "resampler": 4, "avgpool": 4, "none": 16}   # tiny config: 4x4 grid


def setup(name, v, seed=0):
    config = helpers.tiny_config(compressor=name, num_tokens=v, batch_size=4)
    heads.validate(config.model.compressor, config.model.vision)
    params = random_like(vlm.abstract_params(config.model), seed)
    return config, vlm.VLM(config.model), params, helpers.random_batch(config, seed=seed)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_only_quecc_output_changes_when_only_the_question_changes(name):
    config, model, params, batch = setup(name, HEADS[name])
    other = helpers.random_batch(config, seed=7)          # same images, other questions
    encode = jax.jit(lambda q, m: model.apply({"params": params}, batch["pixels"], q, m,
                                              method=vlm.VLM.encode_images))
    a = np.asarray(encode(batch["question_tokens"], batch["question_mask"]))
    b = np.asarray(encode(other["question_tokens"], other["question_mask"]))
    assert a.shape == (4, HEADS[name], config.model.llm.hidden_size)
    if name == "quecc":
        assert np.all(np.abs(a - b).max(axis=(1, 2)) > 1e-3)   # every row's tokens move
    else:
        np.testing.assert_array_equal(a, b)


def test_quecc_adds_no_llm_copy_its_question_pass_uses_the_models_llm():
    quecc = helpers.tiny_config(compressor="quecc", num_tokens=4).model
    pooled = helpers.tiny_config(compressor="avgpool", num_tokens=4).model
    a, b = vlm.abstract_params(quecc), vlm.abstract_params(pooled)

    def shapes(tree):
        return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    assert shapes(a["llm"]) == shapes(b["llm"])
    assert shapes(a["compressor"]) == shapes(heads.abstract_head_params(quecc))
    assert not any("embed_tokens" in k or "layers" in k for k in shapes(a["compressor"]))


def forward_with_query(module, pixels, tokens, attention_mask, image_positions, query):
    """VLM.__call__ with the head's query given from outside (float[B, D]) instead of computed by the LLM."""
    features = module.vision(pixels, module.head_cls.vision_layers(module.cfg.compressor, module.cfg.vision))
    visual = module.projector(module.compressor(features, query))
    hidden, _ = module.llm(module.embed_inputs(tokens, image_positions, visual), attention_mask)
    return module.llm.logits(hidden)


def live_query(module, pixels, tokens, attention_mask, image_positions, question_tokens, question_mask):
    """The control: the query computed by the LLM *with* gradient (what stop_gradient prevents)."""
    query = module.llm.last_hidden(question_tokens, question_mask)
    return forward_with_query(module, pixels, tokens, attention_mask, image_positions, query)


@pytest.fixture(scope="module")
def stage2_grads():
    """Stage-2 gradients (compressor, projector and LLM all train) of one batch, three ways."""
    _, model, params, batch = setup("quecc", 4, seed=1)
    inputs = state_lib.model_inputs(batch)

    def grads(logits_fn):
        def loss(p):
            return state_lib.masked_cross_entropy(logits_fn(p), batch["targets"], batch["loss_mask"])[0]
        return jax.jit(jax.grad(loss))(params)

    query = jax.jit(lambda p: model.apply({"params": p}, batch["question_tokens"], batch["question_mask"],
                                          method=vlm.VLM.query_embedding))(params)
    held = {k: inputs[k] for k in ("pixels", "tokens", "attention_mask", "image_positions")}
    return dict(
        model=grads(lambda p: model.apply({"params": p}, **inputs)),
        held=grads(lambda p: model.apply({"params": p}, **held, query=query, method=forward_with_query)),
        live=grads(lambda p: model.apply({"params": p}, **inputs, method=live_query)),
    )


def max_rel_diff(a, b):
    """Largest per-parameter max|a - b| / max|b| over two gradient trees."""
    fa = traverse_util.flatten_dict(jax.device_get(a), sep="/")
    fb = traverse_util.flatten_dict(jax.device_get(b), sep="/")
    assert fa.keys() == fb.keys()
    return max(float(np.max(np.abs(fa[k] - fb[k])) / (np.max(np.abs(fb[k])) + 1e-12)) for k in fa)


@pytest.mark.parametrize("part", ("llm", "compressor", "projector"))
def test_no_gradient_reaches_the_llm_through_the_quecc_query(stage2_grads, part):
    # Equal to the last bit on CPU; the tolerance only allows for a different fusion order elsewhere.
    assert max_rel_diff(stage2_grads["model"][part], stage2_grads["held"][part]) < 1e-6


def test_query_path_would_carry_llm_gradient_without_stop_gradient(stage2_grads):
    # The control that shows the comparison above can fail: a live query changes the LLM's gradients.
    assert max_rel_diff(stage2_grads["live"]["llm"], stage2_grads["held"]["llm"]) > 1e-2

