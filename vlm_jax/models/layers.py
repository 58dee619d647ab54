"""Building blocks shared by the vision tower, the LLM and the compressor heads.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) so that `vlm_jax.sharding`
can place it on the mesh by rules; the names used here are the complete vocabulary those rules cover.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense(features, axes: Sequence[str | None], use_bias: bool, dtype, name: str):
    """Dense layer whose kernel is [in, out] with logical axes `axes` (bias gets the output axis)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, name=name,
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
        dims = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (dims, ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[-n_out:]),
                              tuple(self.features))
            y = y + bias.astype(self.dtype)
        return y


def grouped_attention(q, k, v, mask=None):
    """softmax(q k / sqrt(d)) v with masking, as `jax.nn.dot_product_attention` computes it on its XLA path, in two
    grouped einsums: q float[B, T, N, D], k/v float[B, S, K, D] (K divides N), mask bool[B, 1, T, S]. XLA's CPU
    backend runs the library's vmapped form about 2x slower forward + backward (benchmarks/bench_torch_step)."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    if mask is not None:   # a row with nothing to see averages every value, as the library does
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, d)


def attention(q, k, v, mask=None):
    """The attention kernel of every layer: the grouped einsums on the CPU, `jax.nn.dot_product_attention`
    elsewhere (where XLA, or cuDNN on GPUs, picks the kernel)."""
    if jax.default_backend() == "cpu":
        return grouped_attention(q, k, v, mask)
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
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
        out = DenseND((x_q.shape[-1],), 2, (self.heads_axis, "head_dim", self.embed_axis), self.out_bias,
                      self.dtype, name="o_proj")(out)
        return out, new_cache
