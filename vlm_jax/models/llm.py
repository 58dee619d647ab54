"""Decoder-only LLM with the Qwen1.5 architecture (HF `Qwen2ForCausalLM`).

Token embedding -> N x [RMSNorm -> attention (q/k/v bias, no o bias, RoPE, grouped-query) -> residual ->
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head (or the tied embedding).

The LLM takes input *embeddings* (so the VLM can write visual embeddings into image slots) and returns final
hidden states; `logits` maps them to the vocabulary. Layers run under `nn.scan` (one compiled layer, fast compiles
for 40-layer models) or as a Python loop (`scan_layers`; unset: a loop on the CPU, a scan elsewhere, see
`scans_layers`); `remat` trades recomputation for activation memory. Both switches change the parameter layout only
by the leading 'layers' axis, never the numbers.

Masking is explicit and cache-friendly: sequence *slots* (where a token sits in the buffer) decide causality, RoPE
*positions* (how many real tokens precede it) decide rotation, so left padding and KV caches need no special case.
A packed row holds several examples: its attention mask holds segment ids (1, 2, ...; 0 = padding), a token sees
only its own segment and its RoPE positions restart there (data/packing.py). A plain 0/1 mask is one segment.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def causal_mask(q_slots, kv_valid, q_segments=None):
    """bool[B, 1, T, S]: query at slot q may see key slot s iff s <= q and s holds a real token (and, given the
    queries' segment ids, the key's segment id is the query's: packed examples never see each other).

    q_slots: int[T] or int[B, T]; kv_valid: int/bool[B, S] (0/1, or segment ids); q_segments: int[B, T].
    """
    q_slots = jnp.broadcast_to(q_slots, (kv_valid.shape[0],) + q_slots.shape[-1:])
    k_slots = jnp.arange(kv_valid.shape[1])
    mask = (k_slots[None, None, :] <= q_slots[:, :, None]) & (kv_valid != 0)[:, None, :]
    if q_segments is not None:
        mask &= kv_valid[:, None, :] == q_segments[:, :, None]
    return mask[:, None]


def positions_from_mask(attention_mask):
    """RoPE positions int[B, T]: index among the real tokens of the token's own segment (left or right padding
    alike; a 0/1 mask is one segment, segment ids restart the count at each packed example)."""
    real = (attention_mask != 0).astype(jnp.int32)
    seen = jnp.cumsum(real, axis=-1)   # real tokens up to and including t
    previous = jnp.pad(attention_mask[:, :-1], ((0, 0), (1, 0)))
    starts = (attention_mask != previous) & (attention_mask != 0)
    before = jax.lax.cummax(jnp.where(starts, seen - real, 0), axis=attention_mask.ndim - 1)
    return jnp.maximum(seen - before - 1, 0).astype(jnp.int32)


class DecoderLayer(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, mask, positions, cache_index):
        cfg = self.cfg
        h = layers.RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
        h, new_cache = layers.MultiHeadAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, use_bias=True,
            out_bias=False, rope_theta=cfg.rope_theta, causal=True, dtype=self.dtype, name="self_attn",
        )(h, h, mask=mask, positions=positions, cache=layer_cache, cache_index=cache_index)
        x = x + h
        h = layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        gate = layers.dense(cfg.intermediate_size, ("embed", "mlp"), False, self.dtype, "gate_proj")(h)
        up = layers.dense(cfg.intermediate_size, ("embed", "mlp"), False, self.dtype, "up_proj")(h)
        h = layers.dense(cfg.hidden_size, ("mlp", "embed"), False, self.dtype, "down_proj")(nn.silu(gate) * up)
        x = nn.with_logical_constraint(x + h, ("batch", None, None))
        return x, new_cache


def scans_layers(cfg: ml_collections.ConfigDict, platform: str | None = None) -> bool:
    """Whether the layers run under `nn.scan`: `cfg.scan_layers` when set; unset (None), a loop on the CPU and a
    scan on every other platform (default: JAX's default backend). On XLA's CPU backend a scan costs more than it
    saves: slicing each layer's weights out of the stacks and zero-filling stacked gradients took ~1 s of a 5-6 s
    mid-size step (benchmarks/README.md); on TPU/GPU it keeps compiles of deep models short."""
    if cfg.get("scan_layers") is not None:
        return bool(cfg.scan_layers)
    return (platform or jax.default_backend()) != "cpu"


class LLM(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"llm.remat={cfg.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embed_tokens",
                              embedding_init=nn.with_logical_partitioning(
                                  nn.initializers.normal(0.02), ("vocab", "embed")))
        block = DecoderLayer
        scan = scans_layers(cfg)
        if cfg.remat != "none":
            block = nn.remat(block, prevent_cse=not scan, policy=REMAT_POLICIES[cfg.remat])
        if scan:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, name="layers")
        else:
            self.layers = [block(cfg, self.dtype, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.norm = layers.RMSNorm(cfg.rms_norm_eps, name="norm")
        if not cfg.tie_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), False, self.dtype, "lm_head")

    def embed_tokens(self, tokens):
        """int[B, T] -> float[B, T, D]."""
        return self.embed(tokens)

    def __call__(self, x, attention_mask, positions=None, cache=None, cache_index=None):
        """Final-norm hidden states float[B, T, D] for input embeddings x float[B, T, D].

        Without cache: attention_mask int[B, T] marks real tokens (or holds packed segment ids). With cache=(k, v) (each
        float[layers, B, S_max, K, Dh]): x holds T new tokens written at slots cache_index..cache_index+T-1,
        attention_mask is int[B, S_max] over the whole cache (new tokens included) and `positions` is required.
        Returns (hidden, new_cache).
        """
        t = x.shape[1]
        if cache is None:
            mask = causal_mask(jnp.arange(t), attention_mask, q_segments=attention_mask)
            positions = positions_from_mask(attention_mask) if positions is None else positions
        else:
            if positions is None:
                raise ValueError("decoding with a KV cache needs explicit positions")
            mask = causal_mask(cache_index + jnp.arange(t), attention_mask)
        x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", None, None))
        if scans_layers(self.cfg):
            x, new_cache = self.layers(x, cache, mask, positions, cache_index)
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache[0][i], cache[1][i])
                x, c = layer(x, layer_cache, mask, positions, cache_index)
                new_layers.append(c)
            new_cache = None if cache is None else tuple(jnp.stack(kv) for kv in zip(*new_layers))
        return self.norm(x), new_cache

    def logits(self, hidden):
        """float[B, T, D] -> float32[B, T, vocab]."""
        if self.cfg.tie_embeddings:
            embedding = jnp.asarray(self.embed.embedding, self.dtype)   # [vocab, D]: hidden . embedding^T
            out = layers.contract(hidden.astype(self.dtype), embedding.T, 1)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def last_hidden(self, tokens, mask):
        """Final-norm hidden state at each row's last real token: int[B, T], int[B, T] -> float[B, D].

        Rows are right-padded; an all-padding row returns the hidden state at slot 0 (callers mask it).
        """
        hidden, _ = self(self.embed_tokens(tokens), mask)
        last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def output_weights(llm_params, cfg: ml_collections.ConfigDict):
    """The float[D, vocab] matrix `LLM.logits` multiplies by: the tied input embedding or lm_head's kernel."""
    if cfg.tie_embeddings:
        return llm_params["embed_tokens"]["embedding"].T
    return llm_params["lm_head"]["kernel"]


def init_cache(cfg: ml_collections.ConfigDict, batch: int, max_len: int, dtype=jnp.float32):
    """Empty KV cache (k, v), each float[layers, B, max_len, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
