"""Building blocks shared by the vision tower, the LLM and the compressor heads.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) so that `vlm_jax.sharding`
can place it on the mesh by rules; the names used here are the complete vocabulary those rules cover.
"""

import math
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _cpu_layouts() -> bool:
    """Whether to lay matmuls out for XLA's CPU backend (`contract`, `attention`): its code generation copies
    operands between layouts for forms that other backends run as they are."""
    return jax.default_backend() == "cpu"


def contract(x, kernel, n_in: int, precision=None):
    """x[..., *in] . kernel[*in, *out] -> [..., *out]: a dense layer's matmul.

    On the CPU it runs as one 2-D matmul [M, K] x [K, N] (leading dims and the contracted/output dims flattened;
    row-major reshapes, so free). XLA's CPU backend lowers the backward's weight gradient of the N-D form, which
    contracts over batch and sequence together, through transposing copies of the activations (three per MLP
    block); the 2-D form's gradient is a plain transposed-operand matmul: the mid-size MLP's forward + backward
    runs 1.5x faster (benchmarks/README.md). Other backends get the N-D dot_general unchanged.
    """
    if not _cpu_layouts():
        dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (dims, ((), ())), precision=precision)
    k, out = math.prod(kernel.shape[:n_in]), kernel.shape[n_in:]
    y = jnp.matmul(x.reshape(-1, k), kernel.reshape(k, math.prod(out)), precision=precision)
    return y.reshape(*x.shape[:x.ndim - n_in], *out)


def _dense_dot_general(x, kernel, dimension_numbers, precision=None):
    """nn.Dense's dot_general (last dim of x with the first of kernel), as `contract`."""
    assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return contract(x, kernel, 1, precision)


def dense(features, axes: Sequence[str | None], use_bias: bool, dtype, name: str):
    """Dense layer whose kernel is [in, out] with logical axes `axes` (bias gets the output axis)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, name=name, dot_general=_dense_dot_general,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (stable under bf16 activations), output in the input dtype."""
    epsilon: float
    axes: tuple = ("embed",)

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(
            epsilon=self.epsilon, dtype=jnp.float32, name="norm",
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), self.axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes))(x.astype(jnp.float32))
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """Qwen/LLaMA RMSNorm: x / rms(x) * weight, in float32."""
    epsilon: float
    axes: tuple = ("embed",)

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(), self.axes),
                            (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * weight).astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding, half-split ("rotate_half") convention of Qwen/LLaMA.

    x: float[B, T, H, D]; positions: int[B, T].
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class DenseND(nn.Module):
    """Contract the last `n_in` input dims with a kernel [*in, *features] (e.g. embed -> heads x head_dim).

    Written out (rather than nn.DenseGeneral) so the kernel is created in its final shape with its logical axes;
    `axes` names the kernel's dims, the bias takes the trailing `len(features)` names.
    """
    features: tuple
    n_in: int
    axes: tuple
    use_bias: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.n_in:]
        n_out = len(self.features)
        init = nn.initializers.lecun_normal(in_axis=tuple(range(self.n_in)),
                                            out_axis=tuple(range(self.n_in, self.n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            tuple(in_shape) + tuple(self.features))
        y = contract(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[-n_out:]),
                              tuple(self.features))
            y = y + bias.astype(self.dtype)
        return y


def _attend(qh, kh, vh, rows):
    """Masked softmax attention of stacked heads: qh float[H, R, D], kh/vh float[H, S, D], rows bool[H, R, S]."""
    logits = jnp.matmul(qh, jnp.swapaxes(kh, 1, 2), preferred_element_type=jnp.float32) * (qh.shape[-1] ** -0.5)
    logits = jnp.where(rows, logits, jnp.finfo(logits.dtype).min)
    return jnp.matmul(jax.nn.softmax(logits, axis=-1).astype(vh.dtype), vh)


def grouped_attention(q, k, v, mask=None, *, query_blocks: int = 1):
    """softmax(q k / sqrt(d)) v with masking, as `jax.nn.dot_product_attention` computes it on its XLA path, as
    batched matmuls over heads-major operands: q float[B, T, N, D], k/v float[B, S, K, D] (K divides N), mask
    bool[B, 1, T, S].

    Each key/value head's G = N/K query heads are stacked along the rows ([B*K, G*T, D] x [B*K, D, S]), so every
    matmul is a plain 3-D batched one: on XLA's CPU backend the [T, S] probabilities and their gradients are then
    never copied into another layout (the 5-D einsum form copied them, 1.7x slower forward + backward; the
    library's vmapped form 2x; benchmarks/README.md). Only q, k, v and the output are transposed.

    query_blocks > 1 is for a causal mask over the same positions (T = S, query i sees no key after i): the queries
    are split into that many blocks and block j attends only to the keys up to its own end, skipping the blocks
    above the diagonal that the mask hides (2 blocks do 75% of the work). A query that sees nothing averages
    every value, as without blocks.
    """
    b, t, n, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    if query_blocks > 1 and (s != t or mask is None):
        raise ValueError(f"query_blocks={query_blocks} needs a causal mask over as many keys as queries "
                         f"(got {t} queries, {s} keys, mask {'absent' if mask is None else 'given'})")
    qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, g, t, d)
    kh = k.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, d)
    vh = v.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, d)
    if mask is None:
        mask = jnp.ones((b, 1, t, s), bool)
    rows = jnp.broadcast_to(mask[:, :, None], (b, kv_heads, g, t, s)).reshape(b * kv_heads, g, t, s)
    edges = [round(j * t / query_blocks) for j in range(query_blocks + 1)]
    outs = []
    for lo, hi in zip(edges[:-1], edges[1:]):   # blocks: keys [0, hi) for queries [lo, hi), the rest is masked
        r, keys = hi - lo, hi if query_blocks > 1 else s
        out = _attend(qh[:, :, lo:hi].reshape(-1, g * r, d), kh[:, :keys], vh[:, :keys],
                      rows[:, :, lo:hi, :keys].reshape(-1, g * r, keys))
        outs.append(out.reshape(-1, g, r, d))
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]            # [B*K, G, T, D]
    if query_blocks > 1:   # a query that sees nothing averages every value (its block saw only the first ones)
        blind = ~rows.any(axis=-1, keepdims=True)
        out = jnp.where(blind, jnp.mean(vh, axis=1)[:, None, None], out)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


# Causal attention on the CPU runs in two query blocks from this many queries on: the mid-size layer's forward +
# backward at T = 576 took 439-478 ms in 2 blocks, 483-506 whole, 555 in 4 and 589 in 8 (smaller matmuls and
# more slicing cost more than the hidden work they skip).
TWO_QUERY_BLOCKS_FROM = 256


# The kinds of mask `attention_implementation` tells apart: none, a mask that holds causality over the same T queries
# and keys (the LLM's layers without a cache; cuDNN may then skip the blocks above the diagonal), any other mask.
MASK_KINDS = ("none", "causal", "mask")


def attention_implementation(platform: str, dtype, head_dim: int, q_len: int, kv_len: int, mask: str,
                             compute_capability: tuple[int, int] | None = None) -> str:
    """Which attention kernel runs: 'cpu' (`grouped_attention`, the form XLA's CPU backend runs fastest), 'cudnn'
    (cuDNN's fused flash-attention kernel through `jax.nn.dot_product_attention(implementation='cudnn')`) or 'xla'
    (`jax.nn.dot_product_attention`'s XLA path, which XLA itself may still fuse).

    platform: 'cpu', 'cuda' (an NVIDIA GPU), 'rocm', 'tpu', ...; compute_capability: the CUDA device's (major,
    minor). cuDNN is chosen only where JAX's cuDNN path accepts the call (jax/_src/cudnn/fused_attention_stablehlo.py:
    `check_layout`, `check_is_flash_attention`) and cuDNN documents the kernel (SM80 or newer):
    - fp16 or bf16 q/k/v (float32 is not accepted);
    - head_dim a multiple of 8, at most 256 on Hopper or newer (compute capability 9.0), 128 before;
    - even query and key lengths: a differentiated call with a bias needs them, and JAX's check counts every call
      as having one (a mask becomes a bias; without one an empty placeholder stands in: on an H200 under jax
      0.11.2 CLIP-L/14-336's 577 tokens without a mask failed with "Unsupported sequence length Q 577, KV 577");
      whether a call is differentiated is not known here, so every call needs them (a decoding step's single
      query, a frozen tower's odd length: XLA);
    - a CUDA GPU of compute capability 8.0 or newer (cuDNN's SDPA support matrix: Ampere and later).
    Anything else falls back to 'xla'; TPU and other backends always take 'xla', as before cuDNN was used.
    `mask` ('none' | 'causal' | 'mask') is checked but decides nothing yet: the kernel takes each kind.
    """
    if mask not in MASK_KINDS:
        raise ValueError(f"mask kind {mask!r}; choose one of {MASK_KINDS}")
    if platform == "cpu":
        return "cpu"
    if platform != "cuda" or compute_capability is None or tuple(compute_capability) < (8, 0):
        return "xla"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return "xla"
    max_head_dim = 256 if tuple(compute_capability) >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return "xla"
    if q_len % 2 or kv_len % 2:
        return "xla"
    return "cudnn"


def attention_platform() -> tuple[str, tuple[int, int] | None]:
    """(platform as `attention_implementation` names it, CUDA compute capability or None) of the default backend.
    VLM_JAX_CUDNN_ATTENTION=0 keeps a CUDA GPU on the XLA path (a comparison, or a cuDNN that fails)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend, None
    device = jax.devices()[0]
    cuda = "cuda" in getattr(device.client, "platform_version", "").lower()
    if not cuda or os.environ.get("VLM_JAX_CUDNN_ATTENTION", "1") == "0":
        return "gpu", None
    major, minor = (int(x) for x in str(device.compute_capability).split(".")[:2])
    return "cuda", (major, minor)


def attention(q, k, v, mask=None, causal: bool = False):
    """The attention kernel of every layer, as `attention_implementation` chooses: the heads-major batched matmuls
    on the CPU (skipping the blocks a causal mask hides), cuDNN's fused kernel on NVIDIA GPUs where it takes the
    call, `jax.nn.dot_product_attention`'s XLA path elsewhere. q float[B, T, N, D], k/v float[B, S, K, D], mask
    bool[B, 1, T, S] or None. `causal`: the mask is causal over the same T queries and keys (it holds the causality
    either way)."""
    platform, capability = attention_platform()
    kind = "none" if mask is None else "causal" if causal else "mask"
    impl = attention_implementation(platform, q.dtype, q.shape[-1], q.shape[1], k.shape[1], kind, capability)
    if impl == "cpu":
        blocks = 2 if causal and q.shape[1] >= TWO_QUERY_BLOCKS_FROM else 1
        return grouped_attention(q, k, v, mask, query_blocks=blocks)
    if impl == "cudnn":   # is_causal lets the kernel skip the blocks the (causal) mask hides anyway
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query support, optional RoPE and an optional KV cache.

    Query heads = `num_heads`, key/value heads = `num_kv_heads` (must divide num_heads). Attention itself is
    `attention` (above).

    Cache: `cache=(k, v)` with k, v float[B, S_max, K, D]; the new keys/values are written at `cache_index` and the
    attention runs over the whole cache (masked by `mask`). Returns (out, new_cache); new_cache is None without cache.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = True          # q/k/v bias (Qwen1.5 and CLIP both have it)
    out_bias: bool = False         # CLIP has an out-projection bias, Qwen does not
    embed_axis: str = "embed"
    heads_axis: str = "heads"
    kv_heads_axis: str = "kv_heads"
    rope_theta: float | None = None
    causal: bool = False           # the mask is causal (the LLM): without a cache, attention skips what it hides
    dtype: jnp.dtype = jnp.float32

    def _proj(self, heads, axis_name, name):
        return DenseND((heads, self.head_dim), 1, (self.embed_axis, axis_name, "head_dim"), self.use_bias,
                       self.dtype, name=name)

    @nn.compact
    def __call__(self, x_q, x_kv, mask=None, positions=None, cache=None, cache_index=None):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        q = self._proj(self.num_heads, self.heads_axis, "q_proj")(x_q)
        k = self._proj(self.num_kv_heads, self.kv_heads_axis, "k_proj")(x_kv)
        v = self._proj(self.num_kv_heads, self.kv_heads_axis, "v_proj")(x_kv)
        if self.rope_theta is not None:
            q = rope(q, positions, self.rope_theta)
            k = rope(k, positions, self.rope_theta)
        new_cache = None
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, causal=self.causal and cache is None)
        out = DenseND((x_q.shape[-1],), 2, (self.heads_axis, "head_dim", self.embed_axis), self.out_bias,
                      self.dtype, name="o_proj")(out)
        return out, new_cache
