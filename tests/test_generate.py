"""KV-cache generation: incremental == full-sequence, cached prefix == uncached, batched == one-by-one."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from vlm_jax.evaluation import generate as gen
from vlm_jax.models import vlm

V = 4
L = 20
PREFIX = np.array([5, 9, 7], np.int32)


@functools.cache
def _model(compressor="avgpool"):
    config = helpers.tiny_config(compressor=compressor, num_tokens=V, seq_len=L)
    params = nn.meta.unbox(jax.jit(vlm.init_fn(config.model))(jax.random.key(1)))
    return config, vlm.VLM(config.model), params


def _prompts(config, lengths, seed=0, prefix=None, image_at=2):
    """Right-padded prompt batch: random text, V image slots at `image_at`, rows of the given lengths."""
    rng = np.random.default_rng(seed)
    b, vocab, s = len(lengths), config.model.llm.vocab_size, config.model.vision.image_size
    lengths = np.asarray(lengths)
    tokens = rng.integers(3, vocab, (b, L)).astype(np.int32)
    if prefix is not None:
        tokens[:, :len(prefix)] = prefix
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    lq = config.data.question_len
    q_len = rng.integers(1, lq + 1, b)
    q_mask = (np.arange(lq)[None] < q_len[:, None]).astype(np.int32)
    return {
        "pixels": rng.normal(size=(b, s, s, 3)).astype(np.float32),
        "tokens": tokens * mask,
        "attention_mask": mask,
        "image_positions": np.broadcast_to(image_at + np.arange(V, dtype=np.int32), (b, V)).copy(),
        "question_tokens": (rng.integers(3, vocab, (b, lq)) * q_mask).astype(np.int32),
        "question_mask": q_mask,
    }


def _row(batch, i, trim=True):
    """Row i alone; with trim, cut to its real length (no padding at all)."""
    n = int(batch["attention_mask"][i].sum()) if trim else batch["tokens"].shape[1]
    out = {k: v[i:i + 1] for k, v in batch.items()}
    out["tokens"], out["attention_mask"] = out["tokens"][:, :n], out["attention_mask"][:, :n]
    return out


def test_incremental_decoding_matches_full_sequence_logits():
    config, model, params = _model()
    lengths = [9, 14, 20]
    batch = _prompts(config, lengths)
    forced = np.array([[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]], np.int32)
    prefill = jax.jit(lambda p, b: gen.prefill(model, p, b, max_new_tokens=forced.shape[1]))
    step = jax.jit(lambda p, s, t: gen.decode_step(model, p, s, t))
    full_logits = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    state = prefill(params, batch)
    stepped = [state.logits]
    for j in range(forced.shape[1] - 1):
        state = step(params, state, jnp.asarray(forced[:, j]))
        stepped.append(state.logits)
    stepped = np.stack(stepped, axis=1)                        # [B, 4, vocab]
    for i, n in enumerate(lengths):
        row = _row(batch, i)
        tokens = np.concatenate([row["tokens"], forced[i:i + 1]], axis=1)
        full = full_logits(params, dict(row, tokens=tokens, attention_mask=np.ones_like(tokens)))
        want = np.asarray(full[0, n - 1:n - 1 + forced.shape[1]])
        np.testing.assert_allclose(stepped[i], want, atol=1e-5, rtol=1e-5)


def test_left_pad_moves_tokens_and_image_slots_to_the_end():
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], np.int32)
    mask = (tokens > 0).astype(np.int32)
    positions = np.array([[1, 2], [5, 5]], np.int32)           # row 1 is text-only (out-of-range slots)
    t, m, p = gen.left_pad(tokens, mask, positions, pad_id=0)
    np.testing.assert_array_equal(t, [[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(m, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(p, [[3, 4], [5, 5]])


def test_batched_generation_matches_one_by_one():
    config, model, params = _model()
    batch = _prompts(config, [8, 20, 13], seed=1)
    cfg = gen.GenerationConfig(max_new_tokens=6, return_logits=True)
    generator = gen.Generator(model, cfg)
    together = generator(params, batch)
    for i in range(3):
        alone = generator(params, _row(batch, i))
        np.testing.assert_array_equal(together.tokens[i], alone.tokens[0])
        np.testing.assert_allclose(together.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_cached_prefix_generation_matches_uncached_token_for_token():
    config, model, params = _model()
    batch = _prompts(config, [9, 16, 20], seed=2, prefix=PREFIX, image_at=len(PREFIX))
    generator = gen.Generator(model, gen.GenerationConfig(max_new_tokens=6, return_logits=True))
    uncached = generator(params, batch)
    prefix = generator.encode_prefix(params, PREFIX)
    assert prefix.cache[0].shape[2] == len(PREFIX)
    cached = generator(params, gen.strip_prefix(batch, PREFIX), prefix=prefix)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_allclose(cached.logits, uncached.logits, atol=1e-5, rtol=1e-5)


def test_query_conditioned_compressor_generates_the_same_batched_and_alone():
    config, model, params = _model("quecc")
    batch = _prompts(config, [10, 17], seed=3)
    generator = gen.Generator(model, gen.GenerationConfig(max_new_tokens=4, return_logits=True))
    together = generator(params, batch)
    for i in range(2):
        alone = generator(params, _row(batch, i, trim=False))   # one compile serves both rows
        np.testing.assert_allclose(together.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_stop_token_ends_the_row_and_pads_after_it():
    config, model, params = _model()
    batch = _prompts(config, [12, 15], seed=4)
    free = gen.Generator(model, gen.GenerationConfig(max_new_tokens=8))(params, batch)
    stop = int(free.tokens[0, 2])
    first_stop = [int(np.argmax(np.asarray(r) == stop)) if stop in np.asarray(r) else 8 for r in free.tokens]
    stopped = gen.Generator(model, gen.GenerationConfig(max_new_tokens=8, stop_ids=(stop,), pad_id=0))(
        params, batch)
    for i, k in enumerate(first_stop):
        assert int(stopped.lengths[i]) == k
        np.testing.assert_array_equal(stopped.tokens[i, :k + 1], free.tokens[i, :k + 1])
        assert np.all(np.asarray(stopped.tokens[i, k + 1:]) == 0)
    assert first_stop[0] <= 2


def test_greedy_is_argmax_and_tiny_top_p_is_greedy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 50)), jnp.float32)
    want = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(gen.sample_tokens(logits, jax.random.key(0), 0.0, 1.0), want)
    np.testing.assert_array_equal(gen.sample_tokens(logits, jax.random.key(1), 1.0, 1e-6), want)


def test_top_p_sampling_draws_from_the_truncated_renormalised_distribution():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.asarray(np.log(probs)[None].repeat(20000, 0), jnp.float32)
    draws = np.asarray(gen.sample_tokens(logits, jax.random.key(3), 1.0, 0.7))
    # Mass before token k: 0, .4, .65, .8 -> tokens 0, 1, 2 kept (0.65 < 0.7), renormalised over 0.8.
    want = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, want, atol=0.015)
    # Temperature 2 flattens the full distribution to softmax(log p / 2).
    draws = np.asarray(gen.sample_tokens(logits, jax.random.key(4), 2.0, 1.0))
    flat = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=6) / len(draws), flat, atol=0.015)


def test_bad_prompt_batches_raise_clear_errors():
    config, _, _ = _model()
    batch = _prompts(config, [9, 12], prefix=PREFIX, image_at=len(PREFIX))
    left = dict(batch, attention_mask=batch["attention_mask"][:, ::-1].copy())
    with pytest.raises(ValueError, match="not right-padded"):
        gen.check_prompt_batch(left)
    with pytest.raises(ValueError, match="lacks"):
        gen.check_prompt_batch({k: v for k, v in batch.items() if k != "pixels"})
    with pytest.raises(ValueError, match="do not start with the cached prefix"):
        gen.strip_prefix(batch, PREFIX[::-1].copy())
    with pytest.raises(ValueError, match="image slots inside"):
        gen.strip_prefix(dict(batch, image_positions=batch["image_positions"] - 2), PREFIX)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        gen.GenerationConfig(top_p=0.0)


def test_vocab_limit_keeps_sampled_ids_inside_the_tokenizer_vocabulary():
    config, model, params = _model()
    batch = _prompts(config, [9, 12], seed=5)
    out = gen.Generator(model, gen.GenerationConfig(max_new_tokens=5, vocab_limit=10))(params, batch)
    free = gen.Generator(model, gen.GenerationConfig(max_new_tokens=5))(params, batch)
    assert np.all(np.asarray(out.tokens) < 10)
    assert np.any(np.asarray(free.tokens) >= 10)        # the limit is what kept them there
