"""The grain train iterator: the batch contract, per-process sharding, epochs, exact resume."""

import hashlib
import json

import numpy as np
import pytest

from vlm_jax.data import features, pipeline, synthetic
from vlm_jax.data.transforms import EncodeExample

V, S = 16, 64


def small_config(n=40, **overrides):
    cfg = pipeline.default_config()
    cfg.synthetic.train_size = n
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make(cfg, **kw):
    args = {"tokenizer": pipeline.make_tokenizer(cfg), "num_visual_tokens": V, "image_size": S, "batch_size": 8,
            "seed": 0}
    return pipeline.make_train_iterator(cfg, **{**args, **kw})


def row_keys(batch):
    """One fingerprint per example: its pixels and tokens."""
    return [hashlib.sha1(batch["pixels"][i].tobytes() + batch["tokens"][i].tobytes()).hexdigest()
            for i in range(len(batch["tokens"]))]


def test_batches_follow_the_contract():
    cfg = small_config()
    batch = next(make(cfg))
    length, lq = cfg.seq_len + V, cfg.question_len
    shapes = {"pixels": ((8, S, S, 3), np.float32), "tokens": ((8, length), np.int32),
              "targets": ((8, length), np.int32), "loss_mask": ((8, length), np.float32),
              "attention_mask": ((8, length), np.int32), "image_positions": ((8, V), np.int32),
              "question_tokens": ((8, lq), np.int32), "question_mask": ((8, lq), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
    tok = pipeline.make_tokenizer(cfg)
    n = batch["attention_mask"].sum(1)
    for i in range(8):
        np.testing.assert_array_equal(batch["targets"][i, :n[i] - 1], batch["tokens"][i, 1:n[i]])
        assert (batch["targets"][i, n[i] - 1:] == 0).all()
        pos = batch["image_positions"][i]
        assert (np.diff(pos) == 1).all() and (batch["tokens"][i, pos] == tok.image_slot_id).all()
        assert (batch["tokens"][i] == tok.image_slot_id).sum() == V
        loss = np.flatnonzero(batch["loss_mask"][i])
        assert len(loss) >= 2 and loss.max() < n[i] - 1  # answer + <|im_end|>, never on padding
        assert batch["targets"][i, loss[-1]] == tok.eos_id
        assert batch["question_mask"][i].sum() > 0
    # CLIP-normalised: the values span well below and above 0, within the [0, 1] -> normalised range
    assert batch["pixels"].min() >= (0 - 0.49) / 0.26 and batch["pixels"].max() <= (1 - 0.40) / 0.26


def test_two_processes_see_disjoint_examples_that_cover_the_epoch():
    cfg = small_config(n=40)
    tok = pipeline.make_tokenizer(cfg)
    source = synthetic.SyntheticSource("train", 40)
    encode = EncodeExample(tok, pipeline.make_layout(cfg, V), S)
    everything = set()
    for i in range(40):
        everything.update(row_keys({k: v[None] for k, v in encode(source[i]).items()}))
    assert len(everything) == 40
    seen = []
    for p in range(2):
        it = make(cfg, batch_size=8, process_index=p, process_count=2)  # 4 per process, 20 per shard
        seen.append([k for _ in range(5) for k in row_keys(next(it))])
        assert len(set(seen[p])) == 20  # one epoch of the shard, no repeats
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == everything


def test_epochs_repeat_every_example_in_a_new_order():
    it = make(small_config(n=16), batch_size=8)
    epochs = [[k for _ in range(2) for k in row_keys(next(it))] for _ in range(2)]
    assert set(epochs[0]) == set(epochs[1]) and len(set(epochs[0])) == 16
    assert epochs[0] != epochs[1]


def test_seed_changes_the_order():
    a = row_keys(next(make(small_config(), seed=0)))
    b = row_keys(next(make(small_config(), seed=1)))
    assert a != b


def assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_restored_state_yields_exactly_the_uninterrupted_batches():
    cfg = small_config(n=30)  # 30 records, batch 8: the resume point is mid-epoch
    it = make(cfg, seed=3)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    uninterrupted = [next(it) for _ in range(4)]
    resumed = make(cfg, seed=3)
    resumed.set_state(state)
    assert_same_batches(uninterrupted, [next(resumed) for _ in range(4)])


@pytest.mark.slow  # ~15 s: two spawned worker pools, each importing grain (and jax) afresh
def test_worker_processes_give_the_main_process_stream_and_resume_exactly():
    main = make(small_config(n=30), seed=3)
    expected = [next(main) for _ in range(7)]
    cfg = small_config(n=30, worker_count=2)
    with make(cfg, seed=3) as it:
        assert_same_batches(expected[:3], [next(it) for _ in range(3)])
        state = json.loads(json.dumps(it.get_state()))
    with make(cfg, seed=3) as resumed:  # a fresh pipeline, as after a restart
        resumed.set_state(state)
        assert_same_batches(expected[3:], [next(resumed) for _ in range(4)])


def test_state_of_another_pipeline_is_refused():
    it = make(small_config(n=40), seed=0)
    next(it)
    other = make(small_config(n=41), seed=0)
    with pytest.raises(ValueError):
        other.set_state(it.get_state())
    with pytest.raises(ValueError, match="not a data iterator state"):
        other.set_state({"step": 3})


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 9, "process_count": 2}, "not divisible"),
    ({"process_index": 2, "process_count": 2}, "process_index"),
])
def test_bad_sharding_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(small_config(), **kwargs)


@pytest.mark.parametrize("field, value, match", [
    ("source", "webdataset", r"data source 'webdataset' \(data.source\); known: \['llava', 'synthetic', 'tfds'\]"),
    ("bad_input", "ignore", "data.bad_input"),
])
def test_bad_config_values_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        make(small_config(**{field: value}))


def test_a_registered_source_is_what_data_source_selects(monkeypatch):
    calls = []

    def few(data_cfg, split, image_size):
        calls.append(split)
        return synthetic.SyntheticSource(split, 6, synthetic.SyntheticOptions(image_size=image_size)), []

    monkeypatch.setitem(pipeline.SOURCES, "few", few)
    batch = next(make(small_config(source="few")))
    assert calls == ["train"] and batch["tokens"].shape[0] == 8
    with pytest.raises(ValueError, match="registered twice"):
        pipeline.register_source("few")(few)


def test_prompt_batch_for_generation_matches_the_training_prefix():
    cfg = small_config()
    tok = pipeline.make_tokenizer(cfg)
    exs = synthetic.make_examples("validation", "ocr", 3)
    batch = pipeline.make_prompt_batch([e.image for e in exs], [synthetic.prompt_text(e.question) for e in exs],
                                       tokenizer=tok, data_cfg=cfg, num_visual_tokens=V, image_size=S)
    layout = pipeline.make_layout(cfg, V)
    for i, ex in enumerate(exs):
        train = features.encode_conversation(tok, ex.turns(), layout, has_image=True)
        n = int(batch["prompt_length"][i])
        np.testing.assert_array_equal(batch["tokens"][i, :n], train["tokens"][:n])
        assert tok.decode(train["tokens"][n:n + 3]).startswith(ex.answer)  # the answer follows the prompt
        np.testing.assert_array_equal(batch["question_tokens"][i], train["question_tokens"])
    np.testing.assert_allclose(batch["pixels"][0], pipeline.images.normalize(exs[0].image))


def test_eval_iterator_is_one_ordered_pass_with_a_filled_last_batch():
    cfg = small_config()
    cfg.synthetic.validation_size = 10
    tok = pipeline.make_tokenizer(cfg)
    it = pipeline.make_eval_iterator(cfg, tokenizer=tok, num_visual_tokens=V, image_size=S, batch_size=4)
    batches = list(it)
    assert len(batches) == 3
    assert [b["valid"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    assert (batches[-1]["loss_mask"][2:] == 0).all() and (batches[-1]["loss_mask"][:2].sum(1) > 0).all()
    source = synthetic.SyntheticSource("validation", 10)
    encode = EncodeExample(tok, pipeline.make_layout(cfg, V), S)
    for i in range(10):
        want = encode(source[i])
        got = batches[i // 4]
        np.testing.assert_array_equal(got["tokens"][i % 4], want["tokens"])
        np.testing.assert_array_equal(got["pixels"][i % 4], want["pixels"])
