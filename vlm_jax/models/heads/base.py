"""What every compressor head shares: the constructor interface, V/grid checks, region partitioning, and the
small blocks (projection MLP, cross-attention) the attention-based heads are built from.

The registry itself lives in `vlm_jax/models/heads/registry.py`; this module holds no head of its own so that the
head modules (quecc, tokenpacker, resampler) and the registry can both import it without a cycle.
"""

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import xla_cost
from vlm_jax.models import layers, vision

# The multi-level taps QueCC and TokenPacker read from CLIP ViT-L (24 blocks), in HF hidden-state indexing.
CLIP_L_TAPS = (12, 16, 22, 23)
CLIP_L_DEPTH = 24


def grid_side(head: str, num_tokens: int, grid: int) -> int:
    """Side s of the s x s output grid for grid-tiling heads; errors name head, V and grid."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or grid % side:
        allowed = [d * d for d in range(1, grid + 1) if grid % d == 0]
        raise ValueError(f"compressor head {head!r} cannot produce V={num_tokens} tokens from a {grid}x{grid} "
                         f"patch grid: V must be a square whose side divides {grid}, i.e. one of {allowed}")
    return side


def option(cfg, head_cls, key):
    """A head option: the config value if set (and not None), else the head's default."""
    value = cfg.get(key, None)
    return head_cls.DEFAULTS[key] if value is None else value


def vision_taps(cfg, vision_cfg) -> tuple:
    """The multi-level vision taps of a head (`kv_layers`), HF indexing.

    Unset, they are CLIP-L's (12, 16, 22, 23) for a 24-block tower and the same relative depths,
    round(i * depth / 24), for other depths (a 4-block test tower gets (2, 3, 4, 4)), so every tower works
    without configuration and the concatenated width is always 4 x d_vision.
    """
    taps = cfg.get("kv_layers", None)
    if taps is None:
        depth = vision_cfg.depth
        taps = tuple(max(1, round(i * depth / CLIP_L_DEPTH)) for i in CLIP_L_TAPS)
    taps = tuple(int(i) for i in taps)
    if not taps:
        raise ValueError(f"compressor head {cfg.name!r}: model.compressor.kv_layers is empty")
    for i in taps:
        vision.resolve_layer(i, vision_cfg.depth)   # raises, naming the index, when out of range
    return taps


class Head(nn.Module):
    """Base class: the constructor fields and defaults every head shares.

    Built as `Head(cfg=compressor_cfg, vision_cfg=..., llm_cfg=..., dtype=...)`; subclasses set `DEFAULTS`,
    `needs_query`, and override `vision_layers`/`check` when they read more layers or tile the grid differently,
    and `flops_per_image` when XLA's count of their computation is not their cost.

    Elastic V (vlm_jax/elastic.py): a head with `NESTS` produces every V of `cfg.nested_tokens` (a set whose
    largest is `cfg.num_tokens`) from one set of weights; `__call__(features, query, num_tokens=V)` picks one.
    """
    cfg: ml_collections.ConfigDict
    vision_cfg: ml_collections.ConfigDict
    llm_cfg: ml_collections.ConfigDict
    dtype: jnp.dtype = jnp.float32

    DEFAULTS: ClassVar[dict] = {}
    needs_query: ClassVar[bool] = False
    TORCH_INIT: ClassVar[str] = "torch"   # the authors' initialisation (vlm_jax/models/torch_init.py)
    NESTS: ClassVar[bool] = False         # can serve every V of model.compressor.nested_tokens (elastic V)

    @classmethod
    def vision_layers(cls, cfg, vision_cfg):
        return (vision_cfg.select_layer,)

    @classmethod
    def check(cls, cfg, grid):
        grid_side(cfg.name, cfg.num_tokens, grid)

    @classmethod
    def abstract_params(cls, model_cfg):
        """The head's parameter tree for `model_cfg` (`config.model`) as ShapeDtypeStructs, nothing allocated;
        {} for parameter-free heads. Built from the head alone: no LLM or tower is traced."""
        head = cls(model_cfg.compressor, model_cfg.vision, model_cfg.llm, jnp.dtype(model_cfg.dtype))
        features, query = cls.abstract_inputs(model_cfg)

        def init(rng, features, query):
            return head.init(rng, features, query).get("params", {})
        return nn.meta.unbox(jax.eval_shape(init, jax.random.key(0), features, query))

    @classmethod
    def abstract_inputs(cls, model_cfg, batch: int = 1):
        """(features {layer: float[B, 1 + g*g, Dv]}, query float[B, D_llm] or None) as ShapeDtypeStructs."""
        dtype = jnp.dtype(model_cfg.dtype)
        g = model_cfg.vision.image_size // model_cfg.vision.patch_size
        feature = jax.ShapeDtypeStruct((batch, 1 + g * g, model_cfg.vision.width), dtype)
        features = {i: feature for i in cls.vision_layers(model_cfg.compressor, model_cfg.vision)}
        query = jax.ShapeDtypeStruct((batch, model_cfg.llm.hidden_size), dtype) if cls.needs_query else None
        return features, query

    @classmethod
    def cost_fn(cls, model_cfg, batch: int = 1):
        """(fn, abstract_args) such that fn(*abstract_args) runs just this head, for FLOPs analysis:
        fn(head_params, features, query)."""
        head = cls(model_cfg.compressor, model_cfg.vision, model_cfg.llm, jnp.dtype(model_cfg.dtype))

        def fn(head_params, features, query):
            return head.apply({"params": head_params}, features, query)
        return fn, (cls.abstract_params(model_cfg), *cls.abstract_inputs(model_cfg, batch))

    @classmethod
    def flops_per_image(cls, model_cfg) -> float:
        """Forward FLOPs of the head for one image: XLA's cost analysis of the head alone, so a new head is
        charged for what it computes without a formula of its own. The query pass of a `needs_query` head is
        an LLM forward and counted by vlm_jax.flops, not here."""
        fn, abstract_args = cls.cost_fn(model_cfg)
        return xla_cost.xla_flops(fn, *abstract_args)

    def nested_tokens(self) -> tuple:
        """The V this head serves: model.compressor.nested_tokens (elastic V), else just num_tokens."""
        return tuple(self.cfg.get("nested_tokens", None) or (self.cfg.num_tokens,))

    def tokens(self, num_tokens=None) -> int:
        """V of this call: `num_tokens` (one of `nested_tokens`), default model.compressor.num_tokens."""
        if num_tokens is None:
            return self.cfg.num_tokens
        if num_tokens not in self.nested_tokens():
            raise ValueError(f"compressor head {self.cfg.name!r} was built for V in {self.nested_tokens()}, "
                             f"asked for V={num_tokens} (set model.compressor.nested_tokens / train.elastic.tokens)")
        return num_tokens

    def selected(self, features):
        """Patch tokens of the selected layer reshaped to the grid: float[B, g, g, Dv]."""
        return to_grid(vision.patch_tokens(features[self.vision_cfg.select_layer]))

    def multi_level(self, features):
        """Patch tokens of the `kv_layers` taps concatenated on channels: float[B, g, g, n_taps * Dv]."""
        taps = vision_taps(self.cfg, self.vision_cfg)
        return to_grid(jnp.concatenate([vision.patch_tokens(features[i]) for i in taps], axis=-1))


def to_grid(tokens):
    """float[B, g*g, D] -> float[B, g, g, D] (row-major patches, as the patch conv lays them out)."""
    g = math.isqrt(tokens.shape[1])
    if g * g != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
    return tokens.reshape(tokens.shape[0], g, g, tokens.shape[-1])


def to_regions(x, side: int):
    """Cut the grid into side x side regions of k x k tokens (k = g / side), regions folded into the batch.

    float[B, g, g, D] -> float[B * side * side, k * k, D]; region (i, j) of image b is row b*side*side + i*side + j,
    the same order as a [B, side, side, D] map flattened, so per-region results reshape straight back.
    """
    b, g, _, d = x.shape
    k = g // side
    x = x.reshape(b, side, k, side, k, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * side * side, k * k, d)


class ProjectionMLP(nn.Module):
    """Linear -> GELU -> Linear -> LayerNorm: float[..., D_in] -> float[..., out_dim] (QueCC/TokenPacker k/v paths).

    GELU is exact (erf), as torch's nn.GELU() default that the published heads use.
    """
    out_dim: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.dense(self.out_dim, ("compressor_embed", "compressor_hidden"), True, self.dtype, "fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = layers.dense(self.out_dim, ("compressor_hidden", "compressor_embed"), True, self.dtype, "fc2")(x)
        return layers.LayerNorm(self.eps, ("compressor_embed",), name="norm")(x)


class CrossAttention(nn.Module):
    """Multi-head attention with separate query, key and value inputs (torch `nn.MultiheadAttention` layout:
    biased q/k/v/out projections, head_dim = D / num_heads).

    q float[N, Tq, D], k float[N, Tk, Dk], v float[N, Tk, Dv] -> float[N, Tq, D]. Region-local attention calls it
    with regions folded into N, so each query sees only its own region's keys.
    """
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v):
        d = q.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"compressor attention: width {d} is not divisible by num_heads={self.num_heads}")
        shape = (self.num_heads, d // self.num_heads)

        def proj(name):
            return layers.DenseND(shape, 1, ("compressor_embed", "compressor_heads", "head_dim"), True,
                                  self.dtype, name=name)
        out = jax.nn.dot_product_attention(proj("q_proj")(q), proj("k_proj")(k), proj("v_proj")(v))
        return layers.DenseND((d,), 2, ("compressor_heads", "head_dim", "compressor_embed"), True, self.dtype,
                              name="o_proj")(out)
