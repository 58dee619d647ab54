"""Sequence packing: rows hold several examples that never see each other, and the loss is the unpacked loss."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.test_data_pipeline import assert_same_batches, make, small_config
from vlm_jax import state as state_lib
from vlm_jax.data import packing
from vlm_jax.models import llm as llm_lib
from vlm_jax.models import vlm

L = 48


def example(config, length: int, seed: int, image: bool = True) -> dict:
    """One unpacked example of `length` real tokens (image slots after a 2-token prefix, loss on the last 4)."""
    rng = np.random.default_rng(seed)
    v, lq = config.model.compressor.num_tokens, config.data.question_len
    s, vocab = config.model.vision.image_size, config.model.llm.vocab_size
    real = np.arange(L) < length
    tokens = rng.integers(3, vocab, L).astype(np.int32) * real
    q = int(rng.integers(1, lq + 1))
    return dict(
        pixels=rng.normal(size=(s, s, 3)).astype(np.float32),
        tokens=tokens,
        targets=np.append(tokens[1:], 0).astype(np.int32),
        loss_mask=((np.arange(L) >= length - 5) & (np.arange(L) < length - 1)).astype(np.float32),
        attention_mask=real.astype(np.int32),
        image_positions=(2 + np.arange(v) if image else np.full(v, L)).astype(np.int32),
        question_tokens=(rng.integers(3, vocab, lq) * (np.arange(lq) < q)).astype(np.int32),
        question_mask=(np.arange(lq) < q).astype(np.int32),
    )


def test_first_fit_places_examples_with_their_own_segments_and_image_slots():
    config = helpers.tiny_config(num_tokens=4, seq_len=L)
    exs = [example(config, n, i) for i, n in enumerate((30, 20, 10, 18))]
    packed = packing.PackedBatch(rows=2, per_row=3, template=exs[0])
    assert [packed.add(e) for e in exs] == [True, True, True, True]
    # first fit: 30 -> row 0; 20 does not fit beside it -> row 1; 10 -> row 0 (40); 18 -> row 1 (38)
    assert packed.add(example(config, 11, 9)) is False   # 40 + 11 > 48 and 38 + 11 > 48: opens the next batch
    b = packed.batch()
    seg = b["attention_mask"]
    assert np.array_equal(seg[0], np.r_[np.full(30, 1), np.full(10, 2), np.zeros(8)])
    assert np.array_equal(seg[1], np.r_[np.full(20, 1), np.full(18, 2), np.zeros(10)])
    assert np.array_equal(b["tokens"][0, 30:40], exs[2]["tokens"][:10])
    assert np.array_equal(b["image_positions"][0], np.r_[2 + np.arange(4), 32 + np.arange(4), np.full(4, L)])
    assert np.array_equal(b["pixels"][1, 1], exs[3]["pixels"]) and not b["pixels"][0, 2].any()
    assert b["loss_mask"].sum() == sum(e["loss_mask"].sum() for e in exs)
    assert b["pixels"].shape == (2, 3) + exs[0]["pixels"].shape


def test_positions_restart_in_each_segment():
    mask = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])   # packed row; a left-padded prompt
    pos = np.asarray(llm_lib.positions_from_mask(mask))
    assert pos[0, :6].tolist() == [0, 1, 2, 0, 1, 0]
    assert pos[1, 2:].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("compressor", ["avgpool", "quecc"])
def test_a_packed_batch_gives_each_example_its_unpacked_logits_and_the_same_loss(compressor):
    config = helpers.tiny_config(compressor=compressor, num_tokens=4, seq_len=L, question_len=6)
    lengths = (12, 14, 10, 20, 9, 16, 30)
    exs = [example(config, n, i, image=i != 4) for i, n in enumerate(lengths)]   # one text-only example
    unpacked = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    packed = packing.PackedBatch(rows=3, per_row=3, template=exs[0])
    assert all(packed.add(e) for e in exs)
    packed = packed.batch()
    model = vlm.VLM(config.model)
    params = jax.jit(vlm.init_fn(config.model))(jax.random.key(0))

    @jax.jit
    def logits_and_loss(batch):
        logits = model.apply({"params": params}, **state_lib.model_inputs(batch))
        return (logits, *state_lib.masked_cross_entropy(logits, batch["targets"], batch["loss_mask"]))

    def forward(batch):
        logits, loss, n = logits_and_loss(batch)
        return np.asarray(logits), float(loss), float(n)

    logits_u, loss_u, n_u = forward(unpacked)
    logits_p, loss_p, n_p = forward(packed)
    assert n_p == n_u and loss_p == pytest.approx(loss_u, rel=1e-5)
    seg = packed["attention_mask"]
    for row in range(seg.shape[0]):   # every example's tokens: its own logits, wherever it sits
        for k in range(1, seg[row].max() + 1):
            first, last = np.flatnonzero(seg[row] == k)[[0, -1]]
            start, n = int(first), int(last - first + 1)
            i = next(j for j, e in enumerate(exs)
                     if lengths[j] == n and np.array_equal(e["tokens"][:n], packed["tokens"][row, start:start + n]))
            np.testing.assert_allclose(logits_p[row, start:start + n], logits_u[i, :n], atol=2e-5, rtol=1e-4)


def fingerprints(batch):
    """One fingerprint per example of a batch, packed or not: its pixels and real tokens."""
    out = []
    if batch["pixels"].ndim == 4:   # unpacked: one example per row
        return [hashlib.sha1(batch["pixels"][i].tobytes() + batch["tokens"][i][batch["attention_mask"][i] > 0]
                             .tobytes()).hexdigest() for i in range(len(batch["tokens"]))]
    for row, seg in enumerate(batch["attention_mask"]):
        for k in range(1, seg.max() + 1):
            out.append(hashlib.sha1(batch["pixels"][row, k - 1].tobytes() + batch["tokens"][row][seg == k]
                                    .tobytes()).hexdigest())
    return out


def test_the_planned_batch_of_a_packed_run_has_the_shapes_the_pipeline_produces():
    """What plan and the FLOPs benchmark lower the step over (state.abstract_batch) against a real packed batch."""
    from configs import smoke
    from vlm_jax import sharding
    from vlm_jax.data import pipeline

    config = smoke.get_config("llm=tiny-s,tokens=4,res=32")
    with config.unlocked():
        config.data.pack_examples, config.train.batch_size = 3, 4
    it = pipeline.make_train_iterator(config.data, tokenizer=pipeline.make_tokenizer(config.data),
                                      num_visual_tokens=4, image_size=32, batch_size=4, seed=0)
    real = next(it)
    planned = state_lib.abstract_batch(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in planned.items()} == \
        {k: (real[k].shape, real[k].dtype) for k in planned}
    assert real["pixels"].shape[1] == 3   # K images per row


def test_packed_stream_holds_every_example_once_in_fewer_rows_and_resumes_exactly():
    cfg = small_config(n=200, seq_len=96)
    plain = make(cfg, seed=1, batch_size=4)
    cfg.pack_examples = 4
    packed = make(cfg, seed=1, batch_size=4)
    batches = [next(packed) for _ in range(3)]
    seen = [f for b in batches for f in fingerprints(b)]
    assert len(seen) > 3 * 4   # more examples than rows
    expected = []
    while len(expected) < len(seen):
        expected += fingerprints(next(plain))
    assert sorted(seen) == sorted(expected[:len(seen)])   # the same examples, none lost or repeated
    useful = np.mean([np.count_nonzero(b["attention_mask"]) / b["attention_mask"].size for b in batches])
    assert useful > 0.6

    state = json.loads(json.dumps(packed.get_state()))
    uninterrupted = [next(packed) for _ in range(3)]
    resumed = make(cfg, seed=1, batch_size=4)
    resumed.set_state(state)
    assert_same_batches(uninterrupted, [next(resumed) for _ in range(3)])


def test_packing_is_refused_for_an_evaluation_pass():
    from vlm_jax.data import batching
    with pytest.raises(ValueError, match="evaluation"):
        batching.BatchIterator(iter([]), 4, pad_final=True, pack_examples=2)
