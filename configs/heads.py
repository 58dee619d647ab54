"""Compressor head config keys (`config.model.compressor`), one table for every registered head.

    --config.model.compressor.name=quecc --config.model.compressor.num_tokens=1

Every head takes `name` (the registry entry) and `num_tokens` (V). Head-specific keys, with their defaults, are
each head class's `DEFAULTS` (vlm_jax/models/heads/), read from the registry; this table documents them (a test
checks every key is in it):

| head        | key        | default | meaning                                                                    |
|-------------|------------|---------|----------------------------------------------------------------------------|
| none        | -          |         | every patch token; V must equal g*g                                        |
| avgpool     | -          |         | sqrt(V) x sqrt(V) average pooling; V a square whose side divides g         |
| quecc       | kv_layers  | None    | vision taps (HF indices) concatenated for keys/values; None = CLIP-L's     |
|             |            |         | (12, 16, 22, 23), or the same relative depths for another tower            |
|             | num_heads  | 8       | cross-attention heads; must divide the vision width                        |
| tokenpacker | kv_layers  | None    | as quecc                                                                   |
|             | num_heads  | 8       | as quecc                                                                   |
|             | residual   | False   | add the point query to the attention output (False: the authors' release) |
| resampler   | depth      | 2       | cross-attention + MLP blocks                                               |
|             | num_heads  | 8       | attention heads; must divide the vision width                              |
|             | mlp_ratio  | 4       | MLP hidden width / vision width                                            |

quecc, tokenpacker and avgpool tile the g x g grid: V in {1, 4, 16, 36, 64, 144, 576} for CLIP-L/14-336's 24 x 24.
resampler takes any V >= 1. A V a head cannot produce fails at start-up with the head, V and grid in the message.
"""

import ml_collections
from ml_collections import config_dict

from vlm_jax.models import heads


def compressor_config(name: str, num_tokens: int, **overrides) -> ml_collections.ConfigDict:
    """`config.model.compressor` with every key of head `name` present (so each is overridable from the
    command line on a locked config); unknown heads and overrides fail here, naming them."""
    defaults = heads.get(name).DEFAULTS
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"compressor head {name!r} has no key(s) {sorted(unknown)}; it takes {sorted(defaults)}")
    cfg = dict(name=name, num_tokens=num_tokens, **defaults)
    if cfg.get("kv_layers", ()) is None:
        cfg["kv_layers"] = config_dict.placeholder(tuple)   # None, but typed: overridable as '(12, 16, 22, 23)'
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)
