"""Token compressor heads (vision tokens -> V tokens for the LLM) behind one registry.

`registry` (the registry, `none`, `avgpool`, config checks), `base` (shared pieces), `quecc`, `tokenpacker`,
`resampler`. A new head is one module with a `@register("name")` class.
"""

from vlm_jax.models.heads.registry import REGISTRY, abstract_head_params, get, register, validate

__all__ = ["REGISTRY", "abstract_head_params", "get", "register", "validate"]
