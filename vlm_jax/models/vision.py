"""CLIP-architecture ViT vision tower (the vision half of CLIP, as LLaVA uses it).

Layout follows CLIP exactly so HF checkpoints map one-to-one: patch conv without bias, a class token, learned
position embeddings, LayerNorm *before* the encoder ("pre_layrnorm"), pre-LN blocks with quick-GELU MLPs, and a
final LayerNorm that only the pooled output uses (kept for parameter parity, unused by LLaVA-style feature taps).

Hidden-state indexing follows HF's `hidden_states`: index 0 is the embedding after the pre-encoder LayerNorm,
index i (1..depth) the output of block i; negative indices count from the end (-2 = penultimate block, LLaVA's
default). The tower runs only as many blocks as the deepest requested index needs.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def resolve_layer(index: int, depth: int) -> int:
    """HF hidden-state index in [0, depth] for a possibly negative `index`; clear error when out of range."""
    resolved = index + depth + 1 if index < 0 else index
    if not 0 <= resolved <= depth:
        raise ValueError(f"vision layer index {index} is out of range for a tower of depth {depth} "
                         f"(valid: {-depth - 1}..{depth})")
    return resolved


class VisionBlock(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # float[B, T, D]
        cfg = self.cfg
        eps = cfg.layer_norm_eps
        h = layers.LayerNorm(eps, ("vision_embed",), name="layer_norm1")(x)
        h = layers.MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads,
            use_bias=True, out_bias=True, embed_axis="vision_embed", heads_axis="vision_heads",
            kv_heads_axis="vision_heads", dtype=self.dtype, name="self_attn")(h, h)[0]
        x = x + h
        h = layers.LayerNorm(eps, ("vision_embed",), name="layer_norm2")(x)
        h = layers.dense(cfg.mlp_dim, ("vision_embed", "vision_mlp"), True, self.dtype, "fc1")(h)
        h = quick_gelu(h)
        h = layers.dense(cfg.width, ("vision_mlp", "vision_embed"), True, self.dtype, "fc2")(h)
        return x + h


class VisionTower(nn.Module):
    """pixels float[B, S, S, 3] (CLIP-normalised) -> dict of hidden states {index: float[B, 1 + P, D]}.

    `__call__(pixels, layers)` returns the requested hidden states (class token included; see `patch_tokens`).
    """
    cfg: ml_collections.ConfigDict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels, layer_indices: Sequence[int]):
        cfg = self.cfg
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"vision tower expects pixels [B, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {pixels.shape}")
        wanted = sorted({resolve_layer(i, cfg.depth) for i in layer_indices})
        patch = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding="VALID",
                        use_bias=False, dtype=self.dtype,
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), (None, None, None, "vision_embed")),
                        name="patch_embedding")(pixels.astype(self.dtype))
        b = patch.shape[0]
        tokens = patch.reshape(b, -1, cfg.width)
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vision_embed",)), (cfg.width,))
        pos = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "vision_embed")), (tokens.shape[1] + 1, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.width)), tokens], axis=1)
        x = x + pos.astype(self.dtype)
        x = layers.LayerNorm(cfg.layer_norm_eps, ("vision_embed",), name="pre_layrnorm")(x)
        x = nn.with_logical_constraint(x, ("batch", None, None))
        hidden = {0: x} if 0 in wanted else {}
        # Blocks past the deepest tap are skipped (frozen towers pay only for what is used); init builds them all.
        last = cfg.depth if self.is_initializing() else max(wanted, default=0)
        for i in range(1, last + 1):
            x = VisionBlock(cfg, self.dtype, name=f"layers_{i - 1}")(x)
            if i in wanted:
                hidden[i] = x
        # Created for parameter parity with CLIP checkpoints; LLaVA-style taps never use it.
        post = layers.LayerNorm(cfg.layer_norm_eps, ("vision_embed",), name="post_layernorm")
        if self.is_initializing():
            post(x[:, :1])
        return {i: hidden[resolve_layer(i, cfg.depth)] for i in layer_indices}


def patch_tokens(hidden):
    """Drop the class token: float[B, 1 + P, D] -> float[B, P, D]."""
    return hidden[:, 1:]
