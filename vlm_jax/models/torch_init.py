"""The authors' initialisation of the parts the paper trains from scratch (compressor head, projector).

Our layers start lecun-normal with zero biases (flax's habit); the authors' PyTorch modules start from PyTorch's
defaults, and a from-scratch part should start where theirs did (`model.head_init = 'torch'`, the full-size
configs' default). Each scheme is a list of (regex over the parameter's name, initialiser), read top to bottom,
first match wins; a parameter that matches nothing keeps its flax init (LayerNorm 1/0 are the same in both).

- `torch`: nn.Linear / nn.Conv2d: weight and bias uniform(±1/√fan_in) (kaiming_uniform(a=√5) and its bias rule);
  nn.MultiheadAttention: the packed q/k/v in-projection Xavier-uniform over its [3D, D] matrix, zero biases, the
  out-projection a Linear with a zero bias. (QueCC, the resampler, LLaVA's mlp2x_gelu projector.)
- `torch_trunc_normal`: TokenPacker's `_init_weights`: every nn.Linear (the attention's out-projection included)
  truncated-normal std 0.02 (cut at ±2, i.e. never in practice), zero bias; the packed in-projection as above.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util


def _uniform(bound):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _fan_in(kernel_shape) -> int:
    """Inputs per output of a Linear [in, out], a DenseND [*in, heads, head_dim] or a conv [kh, kw, in/groups, out]."""
    if len(kernel_shape) == 2:
        return kernel_shape[0]
    if len(kernel_shape) == 4:
        return math.prod(kernel_shape[:3])
    raise ValueError(f"no fan-in rule for a kernel of shape {kernel_shape}")


def linear_uniform(key, shape, dtype, sibling):
    """uniform(±1/√fan_in) for a Linear/Conv weight or bias (the bias's fan-in is its weight's)."""
    return _uniform(1 / math.sqrt(_fan_in(sibling)))(key, shape, dtype)


def packed_xavier(key, shape, dtype, sibling):
    """q/k/v kernel [D_in, H, Dh] as one third of torch's packed in_proj_weight [3·H·Dh, D_in], Xavier-uniform."""
    d_in, d_out = shape[0], math.prod(shape[1:])
    return _uniform(math.sqrt(6 / (d_in + 3 * d_out)))(key, shape, dtype)


def out_proj_uniform(key, shape, dtype, sibling):
    """out-projection kernel [H, Dh, D]: a Linear with fan-in H·Dh."""
    return _uniform(1 / math.sqrt(shape[0] * shape[1]))(key, shape, dtype)


def trunc_normal_002(key, shape, dtype, sibling):
    return 0.02 * jax.random.truncated_normal(key, -2 / 0.02, 2 / 0.02, shape, dtype)


def zeros(key, shape, dtype, sibling):
    return jnp.zeros(shape, dtype)


KEEP = None   # LayerNorm scale/bias: 1/0 in both frameworks

SCHEMES = {
    "torch": (
        (r".*/norm/(scale|bias)", KEEP),
        (r".*attn/[qkv]_proj/kernel", packed_xavier),
        (r".*attn/[qkv]_proj/bias", zeros),
        (r".*attn/o_proj/kernel", out_proj_uniform),
        (r".*attn/o_proj/bias", zeros),
        (r".*/(kernel|bias)", linear_uniform),
    ),
    "torch_trunc_normal": (
        (r".*/norm/(scale|bias)", KEEP),
        (r".*attn/[qkv]_proj/kernel", packed_xavier),
        (r".*attn/[qkv]_proj/bias", zeros),
        (r".*/kernel", trunc_normal_002),
        (r".*/bias", zeros),
    ),
}


def reinit(params: dict, rng, scheme: str) -> dict:
    """`params` (a subtree, boxed or not) with every parameter the scheme's rules match drawn again."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown torch init scheme {scheme!r}; known: {sorted(SCHEMES)}")
    flat = traverse_util.flatten_dict(params, sep="/")
    shape = {k: nn.meta.unbox(v).shape for k, v in flat.items()}
    out = {}
    for i, (name, value) in enumerate(sorted(flat.items())):
        rule = next((fn for pattern, fn in SCHEMES[scheme] if re.fullmatch(pattern, name)), KEEP)
        if rule is KEEP:
            out[name] = value
            continue
        sibling = shape.get(name.rsplit("/", 1)[0] + "/kernel", shape[name])
        raw = nn.meta.unbox(value)
        new = rule(jax.random.fold_in(rng, i), raw.shape, raw.dtype, sibling)
        out[name] = value.replace_boxed(new) if isinstance(value, nn.meta.AxisMetadata) else new
    return traverse_util.unflatten_dict(out, sep="/")
