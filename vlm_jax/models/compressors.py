"""Token compressor heads: vision features of a g x g patch grid -> V tokens for the LLM.

One registry is the only place a head is added: decorate the class with `@register("name")`. Every head is a
linen Module built as `Head(cfg=compressor_cfg, vision_cfg=..., llm_cfg=..., dtype=...)` and declares, as class
attributes/methods:

- `DEFAULTS`: its config keys beyond `name`/`num_tokens`, with defaults (unknown keys are a config error);
- `needs_query`: whether it consumes the query embedding (the LLM's hidden state of the user's question);
- `vision_layers(cfg, vision_cfg)`: the vision hidden-state indices it reads;
- `check(cfg, grid)`: raises ValueError naming head, V and grid when it cannot produce V tokens;
- `__call__(features, query)`: features {layer index: float[B, 1 + g*g, Dv]} (class token first), query
  float[B, D_llm] or None -> float[B, V, Dv].
"""

import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import vision

REGISTRY: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        if name in REGISTRY:
            raise ValueError(f"compressor head {name!r} registered twice")
        REGISTRY[name] = cls
        return cls
    return wrap


def get(name: str) -> type:
    if name not in REGISTRY:
        raise ValueError(f"unknown compressor head {name!r} (model.compressor.name); known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def validate(cfg: ml_collections.ConfigDict, vision_cfg: ml_collections.ConfigDict) -> None:
    """Start-up check of `config.model.compressor`: known head, known keys, a V the head can produce."""
    head = get(cfg.name)
    unknown = set(cfg.keys()) - {"name", "num_tokens"} - set(head.DEFAULTS)
    if unknown:
        raise ValueError(f"model.compressor: unknown key(s) {sorted(unknown)} for head {cfg.name!r}; "
                         f"it takes {sorted(head.DEFAULTS)}")
    if cfg.num_tokens < 1:
        raise ValueError(f"model.compressor.num_tokens must be >= 1, got {cfg.num_tokens}")
    head.check(cfg, vision_cfg.image_size // vision_cfg.patch_size)


def grid_side(head: str, num_tokens: int, grid: int) -> int:
    """Side s of the s x s output grid for grid-tiling heads; errors name head, V and grid."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or grid % side:
        allowed = [d * d for d in range(1, grid + 1) if grid % d == 0]
        raise ValueError(f"compressor head {head!r} cannot produce V={num_tokens} tokens from a {grid}x{grid} "
                         f"patch grid: V must be a square whose side divides {grid}, i.e. one of {allowed}")
    return side


def option(cfg, head_cls, key):
    """A head option: the config value if set, else the head's default."""
    return cfg.get(key, head_cls.DEFAULTS[key])


class Head(nn.Module):
    """Base class: the constructor fields and defaults every head shares."""
    cfg: ml_collections.ConfigDict
    vision_cfg: ml_collections.ConfigDict
    llm_cfg: ml_collections.ConfigDict
    dtype: jnp.dtype = jnp.float32

    DEFAULTS: ClassVar[dict] = {}
    needs_query: ClassVar[bool] = False

    @classmethod
    def vision_layers(cls, cfg, vision_cfg):
        return (vision_cfg.select_layer,)

    @classmethod
    def check(cls, cfg, grid):
        grid_side(cfg.name, cfg.num_tokens, grid)

    def selected(self, features):
        """Patch tokens of the selected layer reshaped to the grid: float[B, g, g, Dv]."""
        x = vision.patch_tokens(features[self.vision_cfg.select_layer])
        g = math.isqrt(x.shape[1])
        return x.reshape(x.shape[0], g, g, x.shape[-1])


@register("none")
class AllTokens(Head):
    """No compression: every patch token (V = g*g), LLaVA-1.5's default."""

    @classmethod
    def check(cls, cfg, grid):
        if cfg.num_tokens != grid * grid:
            raise ValueError(f"compressor head 'none' passes all {grid * grid} tokens of the {grid}x{grid} grid; "
                             f"V={cfg.num_tokens} is impossible (use V={grid * grid} or another head)")

    def __call__(self, features, query=None):
        return vision.patch_tokens(features[self.vision_cfg.select_layer]).astype(self.dtype)


@register("avgpool")
class AvgPool(Head):
    """2-D average pooling of the patch grid to sqrt(V) x sqrt(V) tokens (no parameters)."""

    def __call__(self, features, query=None):
        x = self.selected(features)
        side = grid_side(self.cfg.name, self.cfg.num_tokens, x.shape[1])
        window = x.shape[1] // side
        pooled = nn.avg_pool(x, (window, window), strides=(window, window), padding="VALID")
        return pooled.reshape(x.shape[0], side * side, x.shape[-1]).astype(self.dtype)
