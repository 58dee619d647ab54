"""Behaviour of the model parts: causality, padding, GQA, RoPE, scan/remat equivalence, image slots, vision taps."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from tests import helpers
from vlm_jax.models import layers, llm, vision, vlm


def _llm(**overrides):
    cfg = models.llm_config("tiny", **overrides)
    model = llm.LLM(cfg)
    params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
                                          method=_full)["params"])(jax.random.key(0))
    return cfg, model, params


def _full(m, tokens, mask):
    """Embedding -> layers -> logits, so init creates every parameter (tied or not)."""
    return m.logits(m(m.embed_tokens(tokens), mask)[0])


def _hidden(model, params, tokens, mask):
    fn = jax.jit(lambda p, t, msk: model.apply({"params": p}, model.apply({"params": p}, t,
                                                method=model.embed_tokens), msk)[0])
    return fn(params, tokens, mask)


def test_llm_is_causal_future_tokens_do_not_change_past_outputs():
    cfg, model, params = _llm()
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    mask = jnp.ones((2, 10), jnp.int32)
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % cfg.vocab_size)
    a, b = _hidden(model, params, tokens, mask), _hidden(model, params, changed, mask)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert np.max(np.abs(a[:, 6:] - b[:, 6:])) > 1e-3


def test_llm_right_padding_does_not_change_real_token_outputs():
    cfg, model, params = _llm()
    tokens = jax.random.randint(jax.random.key(2), (1, 7), 0, cfg.vocab_size)
    padded = jnp.concatenate([tokens, jnp.full((1, 5), 3)], axis=1)
    mask = jnp.concatenate([jnp.ones((1, 7), jnp.int32), jnp.zeros((1, 5), jnp.int32)], axis=1)
    np.testing.assert_allclose(_hidden(model, params, tokens, jnp.ones((1, 7), jnp.int32)),
                               _hidden(model, params, padded, mask)[:, :7], atol=1e-5)


def test_llm_left_padding_matches_unpadded_via_positions_from_mask():
    cfg, model, params = _llm()
    tokens = jax.random.randint(jax.random.key(3), (1, 6), 0, cfg.vocab_size)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 6), jnp.int32)], axis=1)
    np.testing.assert_allclose(_hidden(model, params, tokens, jnp.ones((1, 6), jnp.int32)),
                               _hidden(model, params, padded, mask)[:, 3:], atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_loop_layers_give_identical_outputs(remat):
    cfg, scanned, params = _llm(scan_layers=True, remat=remat)
    _, looped, _ = _llm(scan_layers=False, remat=remat)
    # The scanned tree stacks layers on a leading axis; unstack it into layers_i for the loop version.
    layer_params = params["layers"]
    loop_params = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.num_layers):
        loop_params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layer_params)
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, cfg.vocab_size)
    mask = jnp.ones((2, 9), jnp.int32)
    np.testing.assert_allclose(_hidden(scanned, params, tokens, mask), _hidden(looped, loop_params, tokens, mask),
                               atol=1e-5)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    d, h, kv, hd = 32, 4, 2, 8
    gqa = layers.MultiHeadAttention(num_heads=h, num_kv_heads=kv, head_dim=hd)
    mha = layers.MultiHeadAttention(num_heads=h, num_kv_heads=h, head_dim=hd)
    x = jax.random.normal(jax.random.key(5), (2, 5, d))
    p = gqa.init(jax.random.key(6), x, x)["params"]
    p = jax.tree.map(lambda a: getattr(a, "value", a), p, is_leaf=lambda a: hasattr(a, "value"))
    rep = lambda a: jnp.repeat(a, h // kv, axis=-2)  # each kv head serves h/kv consecutive query heads
    p_mha = dict(p, k_proj={k: rep(v) for k, v in p["k_proj"].items()},
                 v_proj={k: rep(v) for k, v in p["v_proj"].items()})
    np.testing.assert_allclose(gqa.apply({"params": p}, x, x)[0], mha.apply({"params": p_mha}, x, x)[0], atol=1e-5)


def test_rope_preserves_norm_and_relative_positions():
    q = jax.random.normal(jax.random.key(7), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(8), (1, 1, 1, 16))
    rot = lambda x, p: layers.rope(x, jnp.array([[p]]), 10000.0)
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 37)), jnp.linalg.norm(q), rtol=1e-5)
    # <R(m) q, R(n) k> depends only on m - n.
    dot = lambda m, n: float(jnp.sum(rot(q, m) * rot(k, n)))
    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)
    assert dot(5, 2) != pytest.approx(dot(5, 3), rel=1e-3)


def test_vision_tower_returns_requested_hf_hidden_state_indices():
    cfg = models.vision_config("tiny", image_size=32)
    tower = vision.VisionTower(cfg)
    pixels = jax.random.normal(jax.random.key(9), (2, 32, 32, 3))
    params = tower.init(jax.random.key(0), pixels, (-2,))["params"]
    out = tower.apply({"params": params}, pixels, (0, 2, -2, -1))
    assert set(out) == {0, 2, -2, -1}
    assert out[-1].shape == (2, 1 + 16, cfg.width)
    np.testing.assert_allclose(out[-2], tower.apply({"params": params}, pixels, (cfg.depth - 1,))[cfg.depth - 1])
    assert np.max(np.abs(out[-1] - out[-2])) > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        tower.apply({"params": params}, pixels, (cfg.depth + 1,))


def test_vlm_writes_visual_embeddings_into_image_slots_only():
    config = helpers.tiny_config(num_tokens=4, batch_size=2)
    model = vlm.VLM(config.model)
    batch = helpers.random_batch(config, batch_size=2)
    params = model.init(jax.random.key(0), **{k: batch[k] for k in vlm.dummy_inputs(config.model)})["params"]
    visual = jnp.full((2, 4, config.model.llm.hidden_size), 7.0)
    positions = jnp.array([[2, 3, 4, 5], [24, 24, 24, 24]])  # row 1: text-only (all slots out of range)
    x = model.apply({"params": params}, batch["tokens"], positions, visual, method=model.embed_inputs)
    plain = model.apply({"params": params}, batch["tokens"], method=lambda m, t: m.llm.embed_tokens(t))
    np.testing.assert_array_equal(x[0, 2:6], 7.0)
    np.testing.assert_allclose(x[0, :2], plain[0, :2])
    np.testing.assert_allclose(x[0, 6:], plain[0, 6:])
    np.testing.assert_allclose(x[1], plain[1])


def test_vlm_logits_depend_on_the_image():
    config = helpers.tiny_config(num_tokens=4, batch_size=2)
    model = vlm.VLM(config.model)
    batch = helpers.random_batch(config, batch_size=2)
    inputs = {k: batch[k] for k in vlm.dummy_inputs(config.model)}
    params = model.init(jax.random.key(0), **inputs)["params"]
    a = model.apply({"params": params}, **inputs)
    b = model.apply({"params": params}, **dict(inputs, pixels=inputs["pixels"] + 1.0))
    assert a.shape == (2, config.data.seq_len, config.model.llm.vocab_size)
    assert np.max(np.abs(a - b)) > 1e-4


def test_param_dtype_is_the_storage_of_every_parameter_and_compute_stays_in_dtype():
    config = helpers.tiny_config(compressor="quecc", num_tokens=4, batch_size=2)
    config.model.param_dtype = "bfloat16"
    leaves = jax.tree.leaves(vlm.abstract_params(config.model))
    assert leaves and {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    params = jax.tree.map(jnp.asarray, jax.jit(vlm.init_fn(config.model))(jax.random.key(0)))
    batch = helpers.random_batch(config, batch_size=2)
    logits = vlm.VLM(config.model).apply({"params": params}, **{k: batch[k] for k in vlm.MODEL_INPUTS})
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    config.model.param_dtype = "float32"
    assert {x.dtype for x in jax.tree.leaves(vlm.abstract_params(config.model))} == {jnp.dtype(jnp.float32)}


def test_grouped_attention_equals_the_library_kernel_with_groups_masks_and_gradients():
    """The CPU kernel against jax.nn.dot_product_attention: 6 query heads on 2 kv heads, a causal mask with packed
    segments and rows that see nothing (padding queries); outputs and gradients, whole and in causal query blocks."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 7, 6, 8))
    k, v = jax.random.normal(kk, (2, 7, 2, 8)), jax.random.normal(kv, (2, 7, 2, 8))
    segments = jnp.array([[1, 0, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    mask = llm.causal_mask(jnp.arange(7), segments, q_segments=segments)
    assert not mask[0, 0, 1].any() and not mask[0, 0, 6].any()   # padding queries see nothing

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask=mask)))
    ref = jax.grad(lambda *a: loss(jax.nn.dot_product_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for blocks in (1, 3):   # 3: uneven causal query blocks (2, 3, 2 rows), a padding query in the first
        ours_fn = functools.partial(layers.grouped_attention, query_blocks=blocks)
        np.testing.assert_allclose(ours_fn(q, k, v, mask), jax.nn.dot_product_attention(q, k, v, mask=mask),
                                   atol=1e-5)
        ours = jax.grad(lambda *a: loss(ours_fn, *a), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # queries over more keys than themselves (decoding with a cache): every key is attended
    np.testing.assert_allclose(layers.grouped_attention(q[:, 2:], k, v, mask[:, :, 2:]),
                               jax.nn.dot_product_attention(q[:, 2:], k, v, mask=mask[:, :, 2:]), atol=1e-5)
    with pytest.raises(ValueError, match="causal mask over as many keys"):
        layers.grouped_attention(q, k[:, :5], v[:, :5], mask[..., :5], query_blocks=2)


def test_contract_equals_dot_general_in_values_and_gradients():
    """The dense layers' 2-D matmul against the N-D dot_general: one and two contracted dims, one and two output
    dims (the attention projections' shapes), values and gradients of both operands."""
    key = jax.random.key(1)
    cases = [((2, 5, 6), (6, 4), 1), ((2, 5, 6), (6, 3, 2), 1), ((2, 5, 3, 2), (3, 2, 6), 2), ((7, 6), (6, 4), 1)]
    for x_shape, k_shape, n_in in cases:
        x, kernel = jax.random.normal(key, x_shape), jax.random.normal(jax.random.fold_in(key, 1), k_shape)
        dims = (tuple(range(len(x_shape) - n_in, len(x_shape))), tuple(range(n_in)))
        ref_fn = lambda x, w: jax.lax.dot_general(x, w, (dims, ((), ())))  # noqa: E731
        ours_fn = lambda x, w: layers.contract(x, w, n_in)  # noqa: E731
        np.testing.assert_allclose(ours_fn(x, kernel), ref_fn(x, kernel), rtol=1e-5, atol=1e-5)
        grads = [jax.grad(lambda x, w: jnp.sum(jnp.cos(f(x, w))), argnums=(0, 1))(x, kernel) for f in (ours_fn, ref_fn)]
        for a, b in zip(*grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mlp_backward_copies_no_activation_into_another_layout():
    """The weight gradients of a batch x sequence MLP compile to transposed-operand matmuls, with no transposing copy
    of an activation (the N-D dot_general form made three per block on XLA's CPU backend)."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jax.nn.silu(layers.dense(24, ("embed", "mlp"), False, jnp.float32, "up")(x))
            return layers.dense(16, ("mlp", "embed"), False, jnp.float32, "down")(h)

    x = jnp.ones((3, 40, 16))
    params = Block().init(jax.random.key(0), x)
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(Block().apply(p, x) ** 2))).lower(params).compile().as_text()
    moved = []
    for line in hlo.splitlines():
        op = re.search(r"= f32\[([\d,]*)\]\S* (copy|transpose)\(", line)
        if op and math.prod(int(d) for d in op.group(1).split(",") if d) >= x.size:   # activation-sized
            moved.append(line.strip())
    assert not moved, moved
