"""TokenPacker (Li et al. 2024, "TokenPacker: Efficient Visual Projector for Multimodal LLM"): point-to-region
cross-attention, the compressor of the paper's scaling grid. Query-agnostic.

    point queries: the selected layer bilinearly downsampled (half-pixel centres, no antialiasing, as
                   torch's F.interpolate) from g x g to sqrt(V) x sqrt(V) -> Linear (no bias) -> LN
    region keys/values: the multi-level taps (CLIP-L: 12, 16, 22, 23) concatenated -> separate
                   Linear -> GELU -> Linear -> LN
    each point query attends (8 heads) to the k x k tokens of its own region (k = g / sqrt(V)) -> float[B, V, Dv];
    the model's projector MLP follows.

As in the authors' release, the attention output goes straight into the projector; `residual=True` adds the point
feature to it (a variant; with the same weights the outputs differ completely).
As with QueCC, at V = g*g each region is one token and the query projection gets no gradient.
No parameter depends on V (points are sampled, regions cut, without weights), so the head nests for free (elastic V).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers
from vlm_jax.models.heads.base import CrossAttention, Head, ProjectionMLP, grid_side, option, to_regions, vision_taps

EPS = 1e-6


def downsample_points(x, side: int):
    """Bilinear point sampling float[B, g, g, D] -> float[B, side, side, D] at half-pixel centres, no antialias.

    For an integer factor k the sample of output cell i sits at i*k + (k - 1)/2: the centre pixel of an odd
    region, the mean of the central 2 x 2 of an even one.
    """
    b, _, _, d = x.shape
    return jax.image.resize(x, (b, side, side, d), method="linear", antialias=False)


class TokenPacker(Head):
    """features {layer: float[B, 1 + g*g, Dv]} -> float[B, V, Dv] (query ignored)."""

    DEFAULTS = dict(
        kv_layers=None,   # HF indices of the region-feature taps; None: CLIP-L's (12, 16, 22, 23), scaled
        num_heads=8,      # cross-attention heads (TokenPacker: Dv / 128 = 8 for CLIP-L)
        residual=False,   # False: the authors' release (attention output alone); True adds the point feature
    )

    TORCH_INIT = "torch_trunc_normal"   # TokenPacker's _init_weights
    NESTS = True

    @classmethod
    def vision_layers(cls, cfg, vision_cfg):
        return (vision_cfg.select_layer,) + vision_taps(cfg, vision_cfg)

    @nn.compact
    def __call__(self, features, query=None, num_tokens=None):
        x = self.selected(features).astype(self.dtype)                           # [B, g, g, Dv]
        b, g, _, d = x.shape
        side = grid_side(self.cfg.name, self.tokens(num_tokens), g)

        points = downsample_points(x.astype(jnp.float32), side).astype(self.dtype).reshape(b * side * side, 1, d)
        q = layers.dense(d, ("compressor_embed", "compressor_hidden"), False, self.dtype, "q_proj")(points)
        q = layers.LayerNorm(EPS, ("compressor_embed",), name="q_norm")(q)

        multi = self.multi_level(features).astype(self.dtype)                      # [B, g, g, taps * Dv]
        keys = to_regions(ProjectionMLP(d, EPS, self.dtype, name="k_mlp")(multi), side)   # [B*V, k*k, Dv]
        values = to_regions(ProjectionMLP(d, EPS, self.dtype, name="v_mlp")(multi), side)
        out = CrossAttention(option(self.cfg, TokenPacker, "num_heads"), self.dtype, name="attn")(q, keys, values)
        if option(self.cfg, TokenPacker, "residual"):
            out = out + points
        return out.reshape(b, side * side, d)
