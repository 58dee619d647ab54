"""The chunked output layer + loss equals the whole-sequence one, in value and gradients, and in a train step."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from tests.helpers import random_batch, tiny_config
from vlm_jax import train
from vlm_jax.models import llm, vlm


def _setup(tie: bool):
    config = tiny_config(seq_len=23, batch_size=3)   # L = 23 + V(4) = 27: not a multiple of the chunk
    config.model.llm.tie_embeddings = tie
    model = vlm.VLM(config.model)
    params = nn.meta.unbox(jax.jit(vlm.init_fn(config.model, 1, 27, config.data.question_len))(jax.random.key(1)))
    batch = random_batch(config, seed=3)
    return config, model, params, batch


def _losses(model, params, batch, chunk):
    inputs = train.model_inputs(batch)

    def whole(p):
        return train.masked_cross_entropy(model.apply({"params": p}, **inputs), batch["targets"],
                                          batch["loss_mask"])[0]

    def chunked(p):
        hidden = model.apply({"params": p}, **inputs, method=vlm.VLM.hidden_states)
        return train.chunked_cross_entropy(hidden, llm.output_weights(p["llm"], model.cfg.llm), batch["targets"],
                                           batch["loss_mask"], chunk)[0]
    return jax.value_and_grad(whole)(params), jax.value_and_grad(chunked)(params)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [5, 27, 64])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(tie, chunk):
    _, model, params, batch = _setup(tie)
    (loss, grads), (c_loss, c_grads) = _losses(model, params, batch, chunk)
    assert float(c_loss) == pytest.approx(float(loss), rel=1e-6)
    flat, c_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(c_grads)
    assert len(flat) == len(c_flat)
    # float32 summation order differs (chunks, recomputation): compare against the gradients' overall scale, since
    # some are exactly zero in exact arithmetic (attention key biases) and carry only rounding noise.
    scale = max(float(np.abs(np.asarray(g)).max()) for _, g in flat)
    for (path, g), c in zip(flat, c_flat):
        np.testing.assert_allclose(np.asarray(c), np.asarray(g), rtol=0, atol=1e-5 * scale, err_msg=str(path))
    head = grads["llm"]["embed_tokens" if tie else "lm_head"]
    assert np.abs(next(iter(head.values()))).max() > 0   # the output layer does get a gradient


def test_a_train_step_with_loss_chunk_matches_one_without():
    _, model, params, batch = _setup(tie=False)
    tx = optax.sgd(0.5)   # plain SGD: Adam would turn rounding noise of near-zero gradients into O(lr) steps
    state = train.TrainState(step=np.int32(0), params=params, frozen={}, opt_state=tx.init(params))
    whole, m_whole = jax.jit(train.make_train_step(model, tx))(state, batch)
    chunked, m_chunked = jax.jit(train.make_train_step(model, tx, loss_chunk=8))(state, batch)
    assert float(m_chunked["loss"]) == pytest.approx(float(m_whole["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(chunked.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    moved = np.abs(np.asarray(chunked.params["llm"]["lm_head"]["kernel"] - params["llm"]["lm_head"]["kernel"]))
    assert moved.max() > 1e-4
