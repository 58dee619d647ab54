"""Batched generation with a KV cache: prefill the prompts, then decode one token per step.

Shapes are fixed so one compiled program serves every batch: prompts arrive right-padded to L (the pipeline's
`make_prompt_batch` layout) and are left-padded inside the jitted function, so every row's last prompt token sits in
the same slot and all rows decode in lock-step. The cache has room for `P + L + max_new_tokens` slots:

    slots  [0, P)            a cached text prefix (optional; P = 0 without one)
           [P, P + L)        the left-padded prompt (image slots hold the visual embeddings)
           [P + L, ...)      generated tokens

Causality is by slot and RoPE positions count real tokens only (see vlm_jax/models/llm.py), so padding in the middle
(between a cached prefix and a short prompt) changes nothing: cached, uncached, batched and one-by-one generation
compute the same numbers up to float summation order.

**Cached text prefix** (the paper's Q = 0 regime): a text prefix shared by every prompt (system turn and chat header)
is run once into a batch-1 cache (`Generator.encode_prefix`) and broadcast into the first P slots of every batch;
`strip_prefix` removes those tokens from the prompts.

Decoding is greedy (temperature 0) or temperature + nucleus (top-p) sampling, stops per row at any `stop_ids`
token, and exits early once every row has stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import llm as llm_lib
from vlm_jax.models import vlm as vlm_lib

PROMPT_KEYS = vlm_lib.MODEL_INPUTS   # a prompt batch is a model-input batch without answers


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Frozen (hashable): every field is baked into the compiled program."""

    max_new_tokens: int = 16
    temperature: float = 0.0     # 0: greedy (argmax)
    top_p: float = 1.0           # nucleus sampling mass; 1.0 keeps the whole distribution
    stop_ids: tuple[int, ...] = ()   # a row stops after emitting any of these (the stop token is kept)
    pad_id: int = 0              # written after a row has stopped
    vocab_limit: int = 0         # > 0: never sample ids >= this (the model's vocabulary may pad the tokenizer's)
    return_logits: bool = False  # also return float32[B, T, vocab] next-token logits (tests, scoring)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"GenerationConfig.temperature must be >= 0, got {self.temperature}")
        if self.vocab_limit < 0:
            raise ValueError(f"GenerationConfig.vocab_limit must be >= 0, got {self.vocab_limit}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


@flax.struct.dataclass
class TextPrefix:
    """KV cache of a fixed text prefix, computed once: cache (k, v) float[layers, 1, P, K, Dh], tokens int32[P]."""

    cache: tuple[jax.Array, jax.Array]
    tokens: jax.Array

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@flax.struct.dataclass
class DecodeState:
    """Everything the next decode step needs.

    cache: (k, v) float[layers, B, S, K, Dh]; mask: int32[B, S], 1 where a real token sits; index: int32[], the
    next free slot (shared by all rows: left padding aligns them); position: int32[B], the next token's RoPE
    position; logits: float32[B, vocab], the next-token logits.
    """

    cache: tuple[jax.Array, jax.Array]
    mask: jax.Array
    index: jax.Array
    position: jax.Array
    logits: jax.Array


class GenerationOutput(NamedTuple):
    """tokens int32[B, T] (pad_id after a row's stop token); lengths int32[B]: tokens before the first stop token
    (T when none came); logits float32[B, T, vocab] or None; logprobs float32[B, T]: each emitted token's log
    probability under the (vocabulary-limited, untempered) next-token distribution, 0 after the stop token (an
    answer's confidence: vlm_jax.evaluation.router)."""

    tokens: Any
    lengths: Any
    logits: Any = None
    logprobs: Any = None


# ----------------------------------------------------------------------------------------------------------------------
# Functions of the bound VLM module (passed to `model.apply(..., method=...)`).


def _encode_prompt(m: vlm_lib.VLM, batch, num_tokens=None):
    """Prompt embeddings float[B, L, D]: text embeddings with the visual embeddings in the image slots (V =
    num_tokens of an elastic model's set; default model.compressor.num_tokens)."""
    visual = m.encode_images(batch["pixels"], batch["question_tokens"], batch["question_mask"], num_tokens)
    return m.embed_inputs(batch["tokens"], batch["image_positions"], visual)


def _run_llm(m: vlm_lib.VLM, x, mask, positions, cache, index):
    """The LLM over new embeddings x float[B, T, D] written at slots index..index+T-1; last-token logits."""
    hidden, cache = m.llm(x, mask, positions, cache, index)
    return m.llm.logits(hidden[:, -1:])[:, 0], cache


def _embed_tokens(m: vlm_lib.VLM, tokens):
    return m.llm.embed_tokens(tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Padding and prefix helpers.


def check_prompt_batch(batch: Mapping[str, Any]) -> None:
    """Raises ValueError unless `batch` holds the prompt keys with right-padded, non-empty attention masks."""
    missing = [k for k in PROMPT_KEYS if k not in batch]
    if missing:
        raise ValueError(f"prompt batch lacks {missing}; it needs {list(PROMPT_KEYS)}")
    mask = np.asarray(batch["attention_mask"])
    tokens = np.asarray(batch["tokens"])
    if mask.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"prompt tokens {tokens.shape} and attention_mask {mask.shape} must both be [B, L]")
    lengths = mask.sum(-1)
    if np.any(lengths < 1):
        raise ValueError(f"prompt rows {np.flatnonzero(lengths < 1).tolist()} have no real token")
    right_padded = np.arange(mask.shape[1])[None] < lengths[:, None]
    if not np.array_equal(mask.astype(bool), right_padded):
        bad = np.flatnonzero(np.any(mask.astype(bool) != right_padded, axis=-1)).tolist()
        raise ValueError(f"prompt rows {bad} are not right-padded (attention_mask must be 1...1 0...0)")


def left_pad(tokens, attention_mask, image_positions, pad_id: int):
    """Right-padded prompts -> left-padded ones (jit-friendly).

    tokens, attention_mask int[B, L]; image_positions int[B, V] (entries >= L mark "no image" and stay out of range).
    Returns the three arrays with every row's last real token at slot L - 1.
    """
    length = tokens.shape[1]
    shift = length - jnp.sum(attention_mask, axis=-1)                     # [B]
    source = jnp.arange(length)[None, :] - shift[:, None]                   # slot t takes token t - shift
    valid = source >= 0
    tokens = jnp.where(valid, jnp.take_along_axis(tokens, jnp.maximum(source, 0), axis=1), pad_id)
    image_positions = jnp.where(image_positions < length, image_positions + shift[:, None], length)
    return tokens.astype(jnp.int32), valid.astype(jnp.int32), image_positions.astype(jnp.int32)


def strip_prefix(batch: Mapping[str, Any], prefix_tokens) -> dict[str, np.ndarray]:
    """Remove a shared text prefix from a right-padded prompt batch (host side, numpy).

    Every row must start with `prefix_tokens` int[P] and have at least one token after it, and no image slot may
    fall inside the prefix. Returns the batch with tokens/attention_mask int[B, L - P] and image positions shifted
    by -P (out-of-range entries stay out of range).
    """
    check_prompt_batch(batch)
    prefix = np.asarray(prefix_tokens)
    p = prefix.shape[0]
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"])
    if p < 1 or p >= tokens.shape[1]:
        raise ValueError(f"prefix of {p} tokens does not fit prompts of length {tokens.shape[1]}")
    lengths = mask.sum(-1)
    bad = np.flatnonzero(np.any(tokens[:, :p] != prefix[None], axis=-1) | (lengths <= p)).tolist()
    if bad:
        raise ValueError(f"prompt rows {bad} do not start with the cached prefix (or have nothing after it)")
    positions = np.asarray(batch["image_positions"])
    in_prefix = (positions < p)
    if np.any(in_prefix):
        raise ValueError(f"prompt rows {np.flatnonzero(in_prefix.any(-1)).tolist()} have image slots inside the "
                         f"{p}-token prefix")
    out = {k: np.asarray(v) for k, v in batch.items()}
    out["tokens"], out["attention_mask"] = tokens[:, p:], mask[:, p:]
    out["image_positions"] = (positions - p).astype(np.int32)
    if "prompt_length" in out:
        out["prompt_length"] = out["prompt_length"] - p
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Prefill, one decode step, sampling (pure functions; `Generator` jits them together).


def prefill(model: vlm_lib.VLM, params, batch: Mapping[str, Any], max_new_tokens: int, pad_id: int = 0,
            prefix: TextPrefix | None = None, num_tokens: int | None = None) -> DecodeState:
    """Run right-padded prompts (after a cached prefix, if given) into a fresh cache with room for
    `max_new_tokens` more tokens. batch: the PROMPT_KEYS of `make_prompt_batch` (its image slots: num_tokens V of
    an elastic model, else model.compressor.num_tokens)."""
    variables = {"params": params}
    tokens, mask, image_positions = left_pad(batch["tokens"], batch["attention_mask"], batch["image_positions"],
                                             pad_id)
    b, length = tokens.shape
    p = 0 if prefix is None else prefix.length
    total = p + length + max_new_tokens
    cfg = model.cfg
    k, v = llm_lib.init_cache(cfg.llm, b, total, jnp.dtype(cfg.dtype))
    if prefix is not None:
        # The prefix was computed once for batch 1; every row shares it.
        k = k.at[:, :, :p].set(jnp.broadcast_to(prefix.cache[0], k[:, :, :p].shape).astype(k.dtype))
        v = v.at[:, :, :p].set(jnp.broadcast_to(prefix.cache[1], v[:, :, :p].shape).astype(v.dtype))
    cache_mask = jnp.concatenate([jnp.ones((b, p), jnp.int32), mask, jnp.zeros((b, max_new_tokens), jnp.int32)], 1)
    x = model.apply(variables, dict(batch, tokens=tokens, image_positions=image_positions), num_tokens,
                    method=_encode_prompt)
    positions = p + llm_lib.positions_from_mask(mask)
    logits, cache = model.apply(variables, x, cache_mask, positions, (k, v), p, method=_run_llm)
    return DecodeState(cache=cache, mask=cache_mask, index=jnp.asarray(p + length, jnp.int32),
                       position=(p + jnp.sum(mask, axis=-1)).astype(jnp.int32), logits=logits)


def decode_step(model: vlm_lib.VLM, params, state: DecodeState, tokens) -> DecodeState:
    """Append one token per row (tokens int[B]) at slot `state.index`; returns the state with its logits."""
    variables = {"params": params}
    mask = jax.lax.dynamic_update_slice(state.mask, jnp.ones((state.mask.shape[0], 1), jnp.int32),
                                        (0, state.index))
    x = model.apply(variables, tokens[:, None].astype(jnp.int32), method=_embed_tokens)
    logits, cache = model.apply(variables, x, mask, state.position[:, None], state.cache, state.index,
                                method=_run_llm)
    return DecodeState(cache=cache, mask=mask, index=state.index + 1, position=state.position + 1, logits=logits)


def sample_tokens(logits, rng, temperature: float, top_p: float):
    """Next tokens int32[B] from logits float[B, vocab]: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of most likely tokens whose mass reaches top_p
    (tokens tied with the last one kept are kept too)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep token k when the mass strictly before it is below top_p: the first token is always kept.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: vlm_lib.VLM, params, batch: Mapping[str, Any], config: GenerationConfig, rng=None,
             prefix: TextPrefix | None = None, num_tokens: int | None = None) -> GenerationOutput:
    """Prefill + decode loop (traceable; `Generator` is the jitted entry point)."""
    t = config.max_new_tokens
    rng = jax.random.key(0) if rng is None else rng
    state = prefill(model, params, batch, t, config.pad_id, prefix, num_tokens)
    b = state.logits.shape[0]
    stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)

    def emit(i, state, out, lengths, done, logits_out, logprobs):
        """Sample token i from state.logits and record it (with its log probability)."""
        logits = state.logits
        if config.vocab_limit:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < config.vocab_limit, logits, -jnp.inf)
        token = sample_tokens(logits, jax.random.fold_in(rng, i), config.temperature, config.top_p)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token[:, None],
                                      axis=-1)[:, 0]
        logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, logprob))
        token = jnp.where(done, config.pad_id, token)
        stopped = jnp.isin(token, stop_ids) & ~done
        lengths = jnp.where(stopped, i, lengths)
        out = out.at[:, i].set(token)
        if logits_out is not None:
            logits_out = logits_out.at[:, i].set(state.logits)
        return token, out, lengths, done | stopped, logits_out, logprobs

    out = jnp.full((b, t), config.pad_id, jnp.int32)
    lengths = jnp.full((b,), t, jnp.int32)
    done = jnp.zeros((b,), bool)
    logits_out = jnp.zeros((b, t, state.logits.shape[-1]), jnp.float32) if config.return_logits else None
    logprobs = jnp.zeros((b, t), jnp.float32)
    token, out, lengths, done, logits_out, logprobs = emit(0, state, out, lengths, done, logits_out, logprobs)

    def cond(carry):
        i, _, _, _, _, done, _, _ = carry
        return (i < t) & ~jnp.all(done)

    def body(carry):
        i, state, token, out, lengths, done, logits_out, logprobs = carry
        state = decode_step(model, params, state, token)
        token, out, lengths, done, logits_out, logprobs = emit(i, state, out, lengths, done, logits_out, logprobs)
        return i + 1, state, token, out, lengths, done, logits_out, logprobs

    carry = (jnp.asarray(1, jnp.int32), state, token, out, lengths, done, logits_out, logprobs)
    _, _, _, out, lengths, _, logits_out, logprobs = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(out, lengths, logits_out, logprobs)


def encode_prefix(model: vlm_lib.VLM, params, prefix_tokens) -> TextPrefix:
    """Run a text prefix int[P] once into a batch-1 cache (traceable; see Generator.encode_prefix)."""
    tokens = jnp.asarray(prefix_tokens, jnp.int32)[None]
    p = tokens.shape[1]
    variables = {"params": params}
    cache = llm_lib.init_cache(model.cfg.llm, 1, p, jnp.dtype(model.cfg.dtype))
    x = model.apply(variables, tokens, method=_embed_tokens)
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    _, cache = model.apply(variables, x, jnp.ones((1, p), jnp.int32), positions, cache, 0, method=_run_llm)
    return TextPrefix(cache=cache, tokens=tokens[0])


class Generator:
    """Jitted generation for one model and one GenerationConfig (recompiles only for new batch shapes).

        gen = Generator(vlm.VLM(config.model), GenerationConfig(max_new_tokens=8, stop_ids=(tok.eos_id,)))
        out = gen(params, batch)                              # batch from pipeline.make_prompt_batch
        prefix = gen.encode_prefix(params, prefix_ids)        # once
        out = gen(params, strip_prefix(batch, prefix_ids), prefix=prefix)   # same tokens, less work
    """

    def __init__(self, model: vlm_lib.VLM, config: GenerationConfig, num_tokens: int | None = None):
        """num_tokens: the V an elastic model answers with (one of model.compressor.nested_tokens)."""
        self.model, self.config, self.num_tokens = model, config, num_tokens
        self._generate = jax.jit(lambda params, batch, rng, prefix: generate(model, params, batch, config, rng,
                                                                             prefix, num_tokens))
        self._prefix = jax.jit(lambda params, tokens: encode_prefix(model, params, tokens))

    def __call__(self, params, batch: Mapping[str, Any], rng=None, prefix: TextPrefix | None = None
                 ) -> GenerationOutput:
        check_prompt_batch(batch)
        inputs = {k: jnp.asarray(batch[k]) for k in PROMPT_KEYS}
        rng = jax.random.key(0) if rng is None else rng
        return self._generate(params, inputs, rng, prefix)

    def encode_prefix(self, params, prefix_tokens) -> TextPrefix:
        tokens = np.asarray(prefix_tokens, np.int32)
        if tokens.ndim != 1 or tokens.size < 1:
            raise ValueError(f"prefix tokens must be a non-empty int[P], got shape {tokens.shape}")
        return self._prefix(params, tokens)
