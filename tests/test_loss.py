"""The chunked output layer + loss equals the whole-sequence one, in value and gradients, and in a train step."""

import functools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from tests.helpers import random_batch, tiny_config
from vlm_jax import state as state_lib
from vlm_jax.models import llm, vlm


@functools.cache
def _setup(tie: bool):
    """The tiny VLM, a batch, and the model's own final hidden states for it (computed once per `tie`)."""
    config = tiny_config(seq_len=23, batch_size=3)   # L = 23 + V(4) = 27: not a multiple of the chunk
    config.model.llm.tie_embeddings = tie
    model = vlm.VLM(config.model)
    params = nn.meta.unbox(jax.jit(vlm.init_fn(config.model, 1, 27, config.data.question_len))(jax.random.key(1)))
    batch = random_batch(config, seed=3)
    hidden = jax.jit(lambda p, b: model.apply({"params": p}, **state_lib.model_inputs(b),
                                              method=vlm.VLM.hidden_states))(params, batch)
    return config, model, params, batch, hidden


def _losses(model, params, hidden, batch, chunk):
    """(value, grads) of the whole-sequence loss on the model's own logits and of the chunked loss, both as
    functions of the final hidden states and the LLM's parameters: every gradient the backbone receives flows
    through the hidden states, so equal gradients here are equal gradients everywhere."""

    def whole(h, p):
        logits = model.apply({"params": {"llm": p}}, h, method=lambda m, h: m.llm.logits(h))
        return state_lib.masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    def chunked(h, p):
        return state_lib.chunked_cross_entropy(h, llm.output_weights(p, model.cfg.llm), batch["targets"],
                                               batch["loss_mask"], chunk)[0]
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
    return grad(whole)(hidden, params["llm"]), grad(chunked)(hidden, params["llm"])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [5, 27, 64])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(tie, chunk):
    _, model, params, batch, hidden = _setup(tie)
    (loss, grads), (c_loss, c_grads) = _losses(model, params, hidden, batch, chunk)
    assert float(c_loss) == pytest.approx(float(loss), rel=1e-6)
    flat, c_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(c_grads)
    assert len(flat) == len(c_flat)
    # float32 summation order differs (chunks, recomputation): compare against the gradients' overall scale, since
    # some are exactly zero in exact arithmetic (attention key biases) and carry only rounding noise.
    scale = max(float(np.abs(np.asarray(g)).max()) for _, g in flat)
    for (path, g), c in zip(flat, c_flat):
        np.testing.assert_allclose(np.asarray(c), np.asarray(g), rtol=0, atol=1e-5 * scale, err_msg=str(path))
    head = grads[1]["embed_tokens" if tie else "lm_head"]
    assert np.abs(next(iter(head.values()))).max() > 0   # the output layer does get a gradient
    assert np.abs(np.asarray(grads[0])).max() > 0        # and so do the hidden states, hence the backbone


def test_a_train_step_with_loss_chunk_matches_one_without():
    _, model, params, batch, _ = _setup(tie=False)
    tx = optax.sgd(0.5)   # plain SGD: Adam would turn rounding noise of near-zero gradients into O(lr) steps
    state = state_lib.TrainState(step=np.int32(0), params=params, frozen={}, opt_state=tx.init(params))
    whole, m_whole = jax.jit(state_lib.make_train_step(model, tx))(state, batch)
    chunked, m_chunked = jax.jit(state_lib.make_train_step(model, tx, loss_chunk=8))(state, batch)
    assert float(m_chunked["loss"]) == pytest.approx(float(m_whole["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(chunked.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    moved = np.abs(np.asarray(chunked.params["llm"]["lm_head"]["kernel"] - params["llm"]["lm_head"]["kernel"]))
    assert moved.max() > 1e-4


def test_chunks_without_answer_tokens_equal_the_whole_sequence_and_are_skipped():
    _, model, params, batch, hidden = _setup(tie=False)
    mask = np.zeros_like(batch["loss_mask"])
    mask[:, 11:14] = batch["loss_mask"][:, 11:14]   # with chunks of 5, only positions 10-14 hold answer tokens
    mask[0, 12] = 1.0
    batch = dict(batch, loss_mask=mask)
    (loss, grads), (c_loss, c_grads) = _losses(model, params, hidden, batch, 5)
    assert float(c_loss) == pytest.approx(float(loss), rel=1e-6)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads))
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(c_grads)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(g), rtol=0, atol=1e-5 * scale)

    # A chunk without answer tokens never runs its output layer: non-finite hidden states there cannot reach the
    # loss or the gradients (computed and then masked, inf logits would make them NaN).
    hidden = np.random.default_rng(0).normal(size=(3, 23, 16)).astype(np.float32)
    hidden[:, 20:] = np.inf
    w = np.random.default_rng(1).normal(size=(16, 128)).astype(np.float32)
    value, (g_h, g_w) = jax.value_and_grad(
        lambda h, w: state_lib.chunked_cross_entropy(h, w, batch["targets"], mask, 5)[0], argnums=(0, 1))(hidden, w)
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.isfinite(np.asarray(g_w)).all() and np.abs(np.asarray(g_w)).max() > 0
    assert np.isfinite(np.asarray(g_h)).all() and not np.asarray(g_h)[:, 15:].any()


def test_no_answer_tokens_at_all_gives_zero_loss_and_gradients():
    _, model, params, batch, hidden = _setup(tie=False)
    batch = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
    (loss, grads), (c_loss, c_grads) = _losses(model, params, hidden, batch, 5)
    assert float(c_loss) == float(loss) == 0.0
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(c_grads))
