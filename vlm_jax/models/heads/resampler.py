"""Resampler: V learned latent queries cross-attending to all patch tokens (Perceiver / Q-Former style).

    latents float[V, Dv] (shared by all images)
    depth x [ latents += CrossAttn(LN(latents), LN(patch tokens));  latents += MLP(LN(latents)) ]
    -> LN -> float[B, V, Dv]; the model's projector follows.

Query-agnostic, and with no grid structure any V >= 1 works (no tiling constraint). Keys/values are the selected
layer's patch tokens, which already carry CLIP's position embeddings.
Nested (elastic V): V tokens are the first V latents (MQT-LLaVA's prefix of queries). Latents attend to the image
only, never to each other, so the V outputs are the first V of the V_max outputs.
"""

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import layers, vision
from vlm_jax.models.heads.base import CrossAttention, Head, option

EPS = 1e-6


class ResamplerBlock(nn.Module):
    """One pre-LN cross-attention + MLP block: latents float[B, V, D], media float[B, P, D] -> float[B, V, D]."""
    num_heads: int
    mlp_ratio: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latents, media):
        d = latents.shape[-1]
        q = layers.LayerNorm(EPS, ("compressor_embed",), name="latent_norm")(latents)
        kv = layers.LayerNorm(EPS, ("compressor_embed",), name="media_norm")(media)
        latents = latents + CrossAttention(self.num_heads, self.dtype, name="attn")(q, kv, kv)
        h = layers.LayerNorm(EPS, ("compressor_embed",), name="mlp_norm")(latents)
        h = layers.dense(self.mlp_ratio * d, ("compressor_embed", "compressor_hidden"), True, self.dtype, "fc1")(h)
        h = nn.gelu(h, approximate=False)
        h = layers.dense(d, ("compressor_hidden", "compressor_embed"), True, self.dtype, "fc2")(h)
        return latents + h


class Resampler(Head):
    """features {layer: float[B, 1 + g*g, Dv]} -> float[B, V, Dv] (query ignored)."""

    DEFAULTS = dict(
        depth=2,        # cross-attention + MLP blocks
        num_heads=8,    # attention heads (head_dim = Dv / num_heads)
        mlp_ratio=4,    # MLP hidden width = mlp_ratio * Dv
    )

    NESTS = True

    @classmethod
    def check(cls, cfg, grid):
        depth = option(cfg, cls, "depth")
        if depth < 1:
            raise ValueError(f"compressor head 'resampler': depth must be >= 1, got {depth}")

    @nn.compact
    def __call__(self, features, query=None, num_tokens=None):
        media = vision.patch_tokens(features[self.vision_cfg.select_layer]).astype(self.dtype)   # [B, P, Dv]
        b, _, d = media.shape
        latents = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     (None, "compressor_embed")),
                             (self.cfg.num_tokens, d))
        latents = latents[:self.tokens(num_tokens)]
        x = jnp.broadcast_to(latents.astype(self.dtype), (b,) + latents.shape)
        for i in range(option(self.cfg, Resampler, "depth")):
            x = ResamplerBlock(option(self.cfg, Resampler, "num_heads"), option(self.cfg, Resampler, "mlp_ratio"),
                               self.dtype, name=f"block_{i}")(x, media)
        return layers.LayerNorm(EPS, ("compressor_embed",), name="out_norm")(x)
