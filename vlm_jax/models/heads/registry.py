"""Token compressor heads: vision features of a g x g patch grid -> V tokens for the LLM.

One registry is the only place a head is added: `@register("name")` on a class here, or a `register(...)` line at
the bottom for heads that live in their own module. Registered heads:

- `none`: every patch token (V = g*g); `avgpool`: parameter-free average pooling (V tiles the grid);
- `quecc` (heads/quecc.py): the paper's query-conditioned convolutional cross-attention;
- `tokenpacker` (heads/tokenpacker.py): point-to-region cross-attention, query-agnostic;
- `resampler` (heads/resampler.py): V learned latents cross-attending to all tokens (any V).

Every head is a linen Module built as `Head(cfg=compressor_cfg, vision_cfg=..., llm_cfg=..., dtype=...)`
(base class in heads/base.py) and declares, as class attributes/methods:

- `DEFAULTS`: its config keys beyond `name`/`num_tokens`, with defaults (unknown keys are a config error);
  configs/heads.py documents them all;
- `needs_query`: whether it consumes the query embedding (the LLM's hidden state of the user's question);
- `vision_layers(cfg, vision_cfg)`: the vision hidden-state indices it reads;
- `check(cfg, grid)`: raises ValueError naming head, V and grid when it cannot produce V tokens;
- `flops_per_image(model_cfg)`: its forward FLOPs per image (default: XLA's count of the head alone);
- `__call__(features, query, num_tokens=None)`: features {layer index: float[B, 1 + g*g, Dv]} (class token first),
  query float[B, D_llm] or None -> float[B, V, Dv]; `num_tokens` picks a V of `nested_tokens` (elastic V);
- `NESTS`: whether one set of weights serves every V of `model.compressor.nested_tokens` (elastic V).
"""

import flax.linen as nn
import ml_collections

from vlm_jax.models import vision
from vlm_jax.models.heads import quecc, resampler, tokenpacker
from vlm_jax.models.heads.base import Head, grid_side, option
from vlm_jax.registry import Registry

REGISTRY = Registry("compressor head", "model.compressor.name")
register = REGISTRY.register


def get(name: str) -> type:
    return REGISTRY.lookup(name)


def validate(cfg: ml_collections.ConfigDict, vision_cfg: ml_collections.ConfigDict) -> None:
    """Start-up check of `config.model.compressor`: known head, known keys, a V the head can produce, vision
    taps inside the tower, a head count that divides the vision width."""
    head = get(cfg.name)
    unknown = set(cfg.keys()) - {"name", "num_tokens", "nested_tokens"} - set(head.DEFAULTS)
    if unknown:
        raise ValueError(f"model.compressor: unknown key(s) {sorted(unknown)} for head {cfg.name!r}; "
                         f"it takes {sorted(head.DEFAULTS)}")
    if cfg.num_tokens < 1:
        raise ValueError(f"model.compressor.num_tokens must be >= 1, got {cfg.num_tokens}")
    head.check(cfg, vision_cfg.image_size // vision_cfg.patch_size)
    nested = tuple(cfg.get("nested_tokens", None) or ())
    if nested:
        if not head.NESTS:
            raise ValueError(f"compressor head {cfg.name!r} does not nest: it cannot serve several V from one set of "
                             f"weights (elastic V); nesting heads: {sorted(n for n in REGISTRY if get(n).NESTS)}")
        if max(nested) != cfg.num_tokens or len(set(nested)) != len(nested):
            raise ValueError(f"model.compressor.nested_tokens={nested} must be distinct V whose largest is "
                             f"model.compressor.num_tokens={cfg.num_tokens}")
        for v in nested:   # every V of the set must be one the head can produce
            head.check(ml_collections.ConfigDict(dict(cfg.to_dict(), num_tokens=v)),
                       vision_cfg.image_size // vision_cfg.patch_size)
    head.vision_layers(cfg, vision_cfg)   # raises, naming the index, for a tap outside the tower
    if "num_heads" in head.DEFAULTS:
        heads = option(cfg, head, "num_heads")
        if heads < 1 or vision_cfg.width % heads:
            raise ValueError(f"compressor head {cfg.name!r}: num_heads={heads} must divide the vision width "
                             f"{vision_cfg.width}")


@register("none")
class AllTokens(Head):
    """No compression: every patch token (V = g*g), LLaVA-1.5's default."""

    @classmethod
    def check(cls, cfg, grid):
        if cfg.num_tokens != grid * grid:
            raise ValueError(f"compressor head 'none' passes all {grid * grid} tokens of the {grid}x{grid} grid; "
                             f"V={cfg.num_tokens} is impossible (use V={grid * grid} or another head)")

    @classmethod
    def flops_per_image(cls, model_cfg) -> float:
        return 0.0   # passes tokens through: nothing to compute

    def __call__(self, features, query=None, num_tokens=None):
        self.tokens(num_tokens)
        return vision.patch_tokens(features[self.vision_cfg.select_layer]).astype(self.dtype)


@register("avgpool")
class AvgPool(Head):
    """2-D average pooling of the patch grid to sqrt(V) x sqrt(V) tokens (no parameters: nests for free)."""

    NESTS = True

    def __call__(self, features, query=None, num_tokens=None):
        x = self.selected(features)
        side = grid_side(self.cfg.name, self.tokens(num_tokens), x.shape[1])
        window = x.shape[1] // side
        pooled = nn.avg_pool(x, (window, window), strides=(window, window), padding="VALID")
        return pooled.reshape(x.shape[0], side * side, x.shape[-1]).astype(self.dtype)


register("quecc")(quecc.QueCC)
register("tokenpacker")(tokenpacker.TokenPacker)
register("resampler")(resampler.Resampler)


def abstract_head_params(model_cfg: ml_collections.ConfigDict):
    """Parameter tree (ShapeDtypeStructs, nothing allocated) of the compressor head alone, for `model_cfg`
    (`config.model`); {} for parameter-free heads. Used to report head sizes without building the LLM."""
    validate(model_cfg.compressor, model_cfg.vision)
    return get(model_cfg.compressor.name).abstract_params(model_cfg)
