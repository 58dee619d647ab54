"""Compressor heads on their own: output shapes for every V, gradients, V/grid checks, config keys, sharding
axes, and QueCC / TokenPacker / resampler outputs against plain-numpy references written from the papers'
descriptions (explicit loops over regions, no shared code with the heads)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy.special import erf

from configs import heads as heads_cfg
from configs import models
from vlm_jax import sharding
from vlm_jax.models import heads
from vlm_jax.models.heads import tokenpacker

GRID, WIDTH, D_LLM, BATCH = 24, 32, 16, 2
ALLOWED_24 = (1, 4, 16, 36, 64, 144, 576)       # the paper's V values for CLIP-L/14-336's 24x24 grid
LEARNED = ("quecc", "tokenpacker", "resampler")
# At V = g*g each region holds one token: attention weights are all 1, so neither the query nor the key side
# has any influence (QueCC's question path included).
SINGLE_KEY_SILENT = {"quecc": ("text_proj", "text_norm", "q_mlp", "q_downsample", "attn/q_proj", "attn/k_proj",
                               "k_mlp"),
                     "tokenpacker": ("q_proj", "q_norm", "attn/q_proj", "attn/k_proj", "k_mlp")}


def model_cfg(name, v, grid=GRID, width=WIDTH, **options):
    """A full `config.model` whose vision config has a grid x grid patch grid and the given width (the heads
    never run the tower here: features are random)."""
    cfg = models.model_config("tiny", "tiny", name, v)
    cfg.vision.image_size = grid * cfg.vision.patch_size
    cfg.vision.width = width
    cfg.llm.hidden_size = D_LLM
    cfg.compressor = heads_cfg.compressor_config(name, v, **options)
    return cfg


def make_inputs(cfg, seed=0):
    head_cls = heads.get(cfg.compressor.name)
    g = cfg.vision.image_size // cfg.vision.patch_size
    rng = np.random.default_rng(seed)
    features = {i: jnp.asarray(rng.normal(size=(BATCH, 1 + g * g, cfg.vision.width)), jnp.float32)
                for i in head_cls.vision_layers(cfg.compressor, cfg.vision)}
    query = jnp.asarray(rng.normal(size=(BATCH, cfg.llm.hidden_size)), jnp.float32)
    return head_cls, features, query if head_cls.needs_query else None


def fan_in(name, shape):
    """Inputs feeding one output of a kernel: q/k/v kernels are [D, heads, head_dim], others [*inputs, out];
    scanned LLM layers add a leading layer axis."""
    if "layers" in name and "llm" in name:
        shape = shape[1:]
    if len(shape) >= 3 and any(p in name for p in ("q_proj", "k_proj", "v_proj")):
        return shape[-3]
    return int(np.prod(shape[:-1])) or 1


def random_like(abstract, seed=0):
    """Arrays of the shapes in `abstract` (a parameter tree) filled from numpy: kernels and embeddings
    ~ N(0, 1/fan_in), biases/offsets/latents ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1). Non-zero biases make the
    numpy references check them too, and this skips compiling the initialisers (the slowest part of a small
    model's compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "weight" in name:
            value = 1 + 0.1 * rng.normal(size=x.shape)
        elif "bias" in name or "latents" in name:
            value = 0.1 * rng.normal(size=x.shape)
        else:
            value = rng.normal(size=x.shape) / np.sqrt(fan_in(name, x.shape))
        return jnp.asarray(value, x.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract)


def random_params(head, features, query, seed=0):
    """Random parameters for a head (see `random_like`)."""
    abstract = nn.meta.unbox(jax.eval_shape(head.init, jax.random.key(0), features, query).get("params", {}))
    return random_like(abstract, seed)


def build(cfg, seed=0):
    head_cls, features, query = make_inputs(cfg, seed)
    head = head_cls(cfg.compressor, cfg.vision, cfg.llm)
    return head, random_params(head, features, query, seed), features, query


@functools.cache
def output_and_grads(name, v):
    """(output, params, grads of a random linear readout) for head `name` at V=v on the 24x24 grid."""
    head, params, features, query = build(model_cfg(name, v), seed=v)
    weights = jnp.asarray(np.random.default_rng(v).normal(size=(BATCH, v, WIDTH)), jnp.float32)

    def loss(p):
        out = head.apply({"params": p}, features, query)
        return jnp.sum(out * weights), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(out), params, grads


def flat_norms(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): float(jnp.linalg.norm(x))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


# --- shapes and gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("v", ALLOWED_24)
@pytest.mark.parametrize("name", LEARNED + ("avgpool",))
def test_head_output_shape_for_every_paper_v(name, v):
    if name == "avgpool":
        head, params, features, query = build(model_cfg(name, v))
        out = head.apply({"params": params}, features, query)
    else:
        out = output_and_grads(name, v)[0]
    assert out.shape == (BATCH, v, WIDTH)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("v", ALLOWED_24)
@pytest.mark.parametrize("name", LEARNED)
def test_gradients_reach_every_head_parameter(name, v):
    _, params, grads = output_and_grads(name, v)
    norms = flat_norms(grads)
    assert norms.keys() == flat_norms(params).keys()
    silent = {k for k, n in norms.items() if n == 0.0}
    if v == GRID * GRID and name in SINGLE_KEY_SILENT:
        # One token per region: the softmax over a single key is 1, so exactly the q/k sides are cut off.
        assert silent == {k for k in norms if k.startswith(SINGLE_KEY_SILENT[name])}
    else:
        assert not silent, silent


def test_none_head_passes_every_patch_token_unchanged():
    head, params, features, query = build(model_cfg("none", GRID * GRID))
    out = head.apply({"params": params}, features, query)
    np.testing.assert_array_equal(out, features[-2][:, 1:])


# --- V / grid checks and config keys -------------------------------------------------------------------------

@pytest.mark.parametrize("v", (2, 25, 100, 577))
@pytest.mark.parametrize("name", ("quecc", "tokenpacker", "avgpool"))
def test_grid_heads_reject_v_that_does_not_tile_the_grid(name, v):
    cfg = model_cfg(name, v)
    with pytest.raises(ValueError, match=rf"'{name}'.*V={v}.*24x24"):
        heads.validate(cfg.compressor, cfg.vision)


@pytest.mark.parametrize("v", (2, 25, 100, 577))
def test_resampler_accepts_any_v(v):
    cfg = model_cfg("resampler", v)
    heads.validate(cfg.compressor, cfg.vision)
    head_cls, features, query = make_inputs(cfg)
    head = head_cls(cfg.compressor, cfg.vision, cfg.llm)
    out = jax.eval_shape(lambda: head.init_with_output(jax.random.key(0), features, query)[0])
    assert out.shape == (BATCH, v, WIDTH)


def test_none_head_rejects_fewer_tokens_than_the_grid():
    cfg = model_cfg("none", 144)
    with pytest.raises(ValueError, match=r"'none'.*V=144"):
        heads.validate(cfg.compressor, cfg.vision)


def test_unknown_head_key_is_a_config_error():
    cfg = model_cfg("quecc", 4)
    cfg.compressor.depth = 3
    with pytest.raises(ValueError, match=r"unknown key.*depth.*'quecc'"):
        heads.validate(cfg.compressor, cfg.vision)


def test_vision_tap_outside_the_tower_is_a_config_error():
    cfg = model_cfg("tokenpacker", 4, kv_layers=(2, 30))
    with pytest.raises(ValueError, match="vision layer index 30"):
        heads.validate(cfg.compressor, cfg.vision)


def test_head_count_must_divide_the_vision_width():
    cfg = model_cfg("resampler", 4, num_heads=5)
    with pytest.raises(ValueError, match=r"num_heads=5.*32"):
        heads.validate(cfg.compressor, cfg.vision)


def test_default_taps_are_clip_l_layers_and_scale_with_depth():
    clip = models.vision_config("clip-vit-l14-336")
    cfg = heads_cfg.compressor_config("quecc", 1)
    assert heads.get("quecc").vision_layers(cfg, clip) == (-2, 12, 16, 22, 23)
    tiny = models.vision_config("tiny")     # 4 blocks
    assert heads.get("tokenpacker").vision_layers(cfg, tiny) == (-2, 2, 3, 4, 4)


def test_every_head_key_is_documented_in_the_config_table():
    table = heads_cfg.__doc__
    for name, head_cls in heads.REGISTRY.items():
        assert f"\n| {name} " in table, name
        for key in head_cls.DEFAULTS:
            assert f"| {key} " in table, (name, key)


def test_compressor_config_holds_every_key_the_head_takes_and_validates():
    for name, head_cls in heads.REGISTRY.items():
        cfg = heads_cfg.compressor_config(name, 64)
        assert set(cfg) == {"name", "num_tokens", *head_cls.DEFAULTS}, name
        heads.validate(cfg, models.vision_config("tiny"))
    with pytest.raises(ValueError, match="unknown compressor head 'nope'"):
        heads_cfg.compressor_config("nope", 4)


@pytest.mark.parametrize("name", LEARNED)
def test_head_parameters_have_logical_axes_with_rules_and_no_repeated_mesh_axis(name):
    cfg = model_cfg(name, 4)
    head_cls, features, query = make_inputs(cfg)
    head = head_cls(cfg.compressor, cfg.vision, cfg.llm)
    boxed = jax.eval_shape(head.init, jax.random.key(0), features, query)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    sharding.check_rules_cover(boxed)
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), sharding.RULES)
    for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)):
        used = [a for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes)]
        assert len(used) == len(set(used)), spec


# --- numerical references ------------------------------------------------------------------------------------

def np_tree(params):
    return jax.tree.map(np.asarray, params)


def ln(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["norm"]["scale"] + p["norm"]["bias"]


def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def linear(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def mlp_ln(x, p):
    return ln(linear(gelu(linear(x, p["fc1"])), p["fc2"]), p["norm"])


def attention(q, k, v, p):
    """Multi-head attention of q [Tq, D] over k, v [Tk, D] with kernels [D, H, Dh] / [H, Dh, D]."""
    qh = np.einsum("td,dhe->hte", q, p["q_proj"]["kernel"]) + p["q_proj"]["bias"][:, None]
    kh = np.einsum("td,dhe->hte", k, p["k_proj"]["kernel"]) + p["k_proj"]["bias"][:, None]
    vh = np.einsum("td,dhe->hte", v, p["v_proj"]["kernel"]) + p["v_proj"]["bias"][:, None]
    scores = np.einsum("hqe,hke->hqk", qh, kh) / np.sqrt(qh.shape[-1])
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("hqk,hke->qhe", w, vh)
    return np.einsum("qhe,hed->qd", out, p["o_proj"]["kernel"]) + p["o_proj"]["bias"]


def patch_grid(features, layer, g):
    x = np.asarray(features[layer])[:, 1:]
    return x.reshape(x.shape[0], g, g, -1)


def region_attention_reference(queries, keys, values, side, p):
    """queries [B, s, s, D]; keys/values [B, g, g, D]; loops over images and regions -> [B, s*s, D]."""
    b, g = keys.shape[0], keys.shape[1]
    k = g // side
    out = np.zeros((b, side * side, queries.shape[-1]))
    for n in range(b):
        for i in range(side):
            for j in range(side):
                kk = keys[n, i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(k * k, -1)
                vv = values[n, i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(k * k, -1)
                out[n, i * side + j] = attention(queries[n, i, j][None], kk, vv, p)[0]
    return out


def multi_level(features, cfg, g):
    taps = heads.get(cfg.compressor.name).vision_layers(cfg.compressor, cfg.vision)[1:]
    return np.concatenate([patch_grid(features, t, g) for t in taps], axis=-1)


@pytest.mark.parametrize("v", (1, 4, 9))
def test_quecc_matches_numpy_reference(v):
    g = 6
    cfg = model_cfg("quecc", v, grid=g)
    head, params, features, query = build(cfg, seed=3)
    got = np.asarray(jax.jit(head.apply)({"params": params}, features, query))
    p = np_tree(params)
    side, k = int(np.sqrt(v)), g // int(np.sqrt(v))
    text = ln(linear(np.asarray(query), p["text_proj"]), p["text_norm"])                  # [B, Dv]
    x = mlp_ln(patch_grid(features, -2, g) + text[:, None, None], p["q_mlp"])           # [B, g, g, Dv]
    kernel = p["q_downsample"]["kernel"][:, :, 0]                                        # [k, k, Dv]
    pooled = np.zeros((BATCH, side, side, WIDTH))
    for i in range(side):
        for j in range(side):
            block = x[:, i * k:(i + 1) * k, j * k:(j + 1) * k]
            pooled[:, i, j] = (block * kernel).sum((1, 2)) + p["q_downsample"]["bias"]
    multi = multi_level(features, cfg, g)
    want = region_attention_reference(pooled, mlp_ln(multi, p["k_mlp"]), mlp_ln(multi, p["v_mlp"]), side,
                                      p["attn"])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("v", (1, 4, 9))
def test_tokenpacker_matches_numpy_reference(v):
    g = 6
    cfg = model_cfg("tokenpacker", v, grid=g)
    head, params, features, _ = build(cfg, seed=4)
    got = np.asarray(jax.jit(head.apply)({"params": params}, features, None))
    p = np_tree(params)
    side, k = int(np.sqrt(v)), g // int(np.sqrt(v))
    x = patch_grid(features, -2, g)
    # Bilinear sample at the region centre i*k + (k-1)/2: one pixel (odd k) or the mean of the central 2x2.
    lo, hi = (k - 1) // 2, k // 2
    points = np.zeros((BATCH, side, side, WIDTH))
    for i in range(side):
        for j in range(side):
            rows, cols = [i * k + lo, i * k + hi], [j * k + lo, j * k + hi]
            points[:, i, j] = x[:, rows][:, :, cols].mean((1, 2))
    queries = ln(points @ p["q_proj"]["kernel"], p["q_norm"])
    multi = multi_level(features, cfg, g)
    attn = region_attention_reference(queries, mlp_ln(multi, p["k_mlp"]), mlp_ln(multi, p["v_mlp"]), side,
                                      p["attn"])
    # the default is the authors' release: the attention output alone
    np.testing.assert_allclose(got, attn, rtol=2e-4, atol=2e-4)

    cfg.compressor.residual = True
    with_residual = np.asarray(type(head)(cfg.compressor, cfg.vision, cfg.llm).apply({"params": params}, features,
                                                                                     None))
    np.testing.assert_allclose(with_residual, attn + points.reshape(BATCH, side * side, WIDTH), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("k", (1, 2, 3, 4, 24))
def test_point_queries_sample_region_centres(k):
    x = np.random.default_rng(0).normal(size=(1, 24, 24, 3)).astype(np.float32)
    side = 24 // k
    got = np.asarray(tokenpacker.downsample_points(jnp.asarray(x), side))
    lo, hi = (k - 1) // 2, k // 2

    def centre(i):
        return [i * k + lo, i * k + hi]
    want = np.array([[x[0, centre(i)][:, centre(j)].mean((0, 1)) for j in range(side)] for i in range(side)])
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("v", (1, 5))
def test_resampler_matches_numpy_reference(v):
    g = 4
    cfg = model_cfg("resampler", v, grid=g)
    head, params, features, _ = build(cfg, seed=5)
    got = np.asarray(jax.jit(head.apply)({"params": params}, features, None))
    p = np_tree(params)
    media = np.asarray(features[-2])[:, 1:]
    want = []
    for n in range(BATCH):
        lat = p["latents"].astype(np.float64)
        for i in range(2):
            blk = p[f"block_{i}"]
            kv = ln(media[n], blk["media_norm"])
            lat = lat + attention(ln(lat, blk["latent_norm"]), kv, kv, blk["attn"])
            lat = lat + linear(gelu(linear(ln(lat, blk["mlp_norm"]), blk["fc1"])), blk["fc2"])
        want.append(ln(lat, p["out_norm"]))
    np.testing.assert_allclose(got, np.stack(want), rtol=2e-4, atol=2e-4)
