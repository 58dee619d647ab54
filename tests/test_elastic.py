"""Elastic V (vlm_jax/elastic.py): one model trained for a set of V. Trimming a V_max batch against the pipeline's own
batch for V, nested heads against the published heads with the same weights, M3 and MQT steps against fixed-V steps,
the MQT draw, the FLOPs against XLA's count, config errors, and the training loop in both modes."""

import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import smoke
from tests import helpers
from vlm_jax import elastic, flops, optim, sharding, train
from vlm_jax import state as state_lib
from vlm_jax.data import pipeline
from vlm_jax.models import heads, vlm

SET = (1, 4, 16)   # the tiny tower at 32 px: a 4x4 grid


def _elastic_config(mode="m3", compressor="avgpool", tokens=SET, llm="tiny-s", **kw):
    config = helpers.tiny_config(compressor=compressor, num_tokens=max(tokens), llm=llm, **kw)
    config.model.vision.depth = 2   # the smallest tower every kind of layer flows through: compiles fast
    config.train.elastic.mode, config.train.elastic.tokens = mode, tuple(tokens)
    return config


def _fixed(config, v):
    """The published single-V run config at V (same everything else)."""
    fixed = helpers.tiny_config(compressor=config.model.compressor.name, num_tokens=v,
                                seq_len=config.data.seq_len, question_len=config.data.question_len,
                                batch_size=config.train.batch_size, llm=config.model.llm.name)
    fixed.model = elastic.fixed_model(config.model, v)
    return fixed


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


# --- (a) trimming ----------------------------------------------------------------------------------------------

def _pipeline_batch(v, **data):
    cfg = pipeline.default_config()
    cfg.seq_len, cfg.read_threads = 48, 1
    for key, value in data.items():
        if "." in key:
            section, name = key.split(".")
            cfg[section][name] = value
        else:
            cfg[key] = value
    it = pipeline.make_train_iterator(cfg, tokenizer=pipeline.make_tokenizer(cfg), num_visual_tokens=v,
                                      image_size=64, batch_size=8, seed=3)
    return {k: np.asarray(x) for k, x in next(it).items()}


@pytest.mark.parametrize("data", [dict(template="chatml"), dict(template="plain"),
                                  {"synthetic.describe": True, "synthetic.families": "reasoning"}],
                         ids=["chatml", "plain", "text-only"])
def test_trimming_a_vmax_batch_gives_the_batch_the_pipeline_builds_for_v(data):
    """The independent truth is the pipeline itself at V: same records, same tokenizer. 'plain' puts an answer
    token right after the slots (the last kept slot's target changes); text-only rows have no slots at all."""
    v_max = 64
    full = _pipeline_batch(v_max, **data)
    elastic.check_batch(full)
    for v in (1, 4, 16):
        want = _pipeline_batch(v, **data)
        got = elastic.trim(full, v, np)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} at V={v}")
    if data.get("template") == "plain":   # the case the next-column gather exists for
        assert full["loss_mask"][np.arange(8), full["image_positions"][:, -1]].all()


def test_trim_by_hand_rows_at_different_columns_and_a_text_only_row():
    # Row 0: slots at 1..4 (V_max 4); row 1: slots at 2..5; row 2: text-only (positions = L = 9).
    S, P = 7, 0   # slot id, pad
    tokens = np.array([[10, S, S, S, S, 11, 12, 13, P],
                       [10, 20, S, S, S, S, 21, 22, 23],
                       [30, 31, 32, 33, 34, 35, 36, 37, 38]], np.int32)
    attention = (tokens != P).astype(np.int32)
    attention[1] = attention[2] = 1
    targets = np.concatenate([tokens[:, 1:], np.zeros((3, 1), np.int32)], 1) * np.roll(attention, -1, 1)
    targets[:, -1] = 0
    loss_mask = (targets >= 11).astype(np.float32) * (targets != S)
    batch = dict(tokens=tokens, attention_mask=attention, targets=targets, loss_mask=loss_mask,
                 image_positions=np.array([[1, 2, 3, 4], [2, 3, 4, 5], [9, 9, 9, 9]], np.int32),
                 pixels=np.zeros((3, 2, 2, 3), np.float32))
    got = elastic.trim(batch, 1, np)
    np.testing.assert_array_equal(got["tokens"], [[10, S, 11, 12, 13, P], [10, 20, S, 21, 22, 23],
                                                  [30, 31, 32, 33, 34, 35]])
    np.testing.assert_array_equal(got["targets"], [[S, 11, 12, 13, 0, 0], [20, S, 21, 22, 23, 0],
                                                   [31, 32, 33, 34, 35, 0]])
    np.testing.assert_array_equal(got["loss_mask"], [[0, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(got["attention_mask"], [[1, 1, 1, 1, 1, 0], [1] * 6, [1] * 6])
    np.testing.assert_array_equal(got["image_positions"], [[1], [2], [6]])
    jitted = jax.jit(lambda b: elastic.trim(b, 1))(batch)   # the same inside jit
    for key in got:
        np.testing.assert_array_equal(jitted[key], got[key])
    broken = dict(batch, image_positions=np.array([[1, 2, 4, 5], [2, 3, 4, 5], [9, 9, 9, 9]], np.int32))
    with pytest.raises(ValueError, match="contiguous"):
        elastic.check_batch(broken)
    with pytest.raises(ValueError, match="packed"):
        elastic.check_batch(dict(batch, pixels=np.zeros((3, 2, 2, 2, 3), np.float32)))


# --- (b, c) nested heads ----------------------------------------------------------------------------------------

def _head_params(model_cfg, seed=0):
    head = heads.get(model_cfg.compressor.name)
    features, query = head.abstract_inputs(model_cfg, batch=2)
    module = head(model_cfg.compressor, model_cfg.vision, model_cfg.llm)
    rng = np.random.default_rng(seed)
    real = lambda s: None if s is None else rng.normal(size=s.shape).astype(np.float32)   # noqa: E731
    features = {k: real(s) for k, s in features.items()}
    query = real(query)
    params = module.init(jax.random.key(seed), features, query).get("params", {})
    return module, nn.meta.unbox(params), features, query


def _as_fixed(params, v):
    """A whole elastic model's (or train state's) parameters as the fixed-V model's."""
    if "compressor" not in params:   # a parameter-free head
        return params
    return dict(params, compressor=_published_params(params["compressor"], v, max(SET)))


def _published_params(nested, v, v_max):
    """The published V head's parameters taken from a nested head's: shared ones as they are, V's own kernel."""
    out = {}
    for key, value in traverse_util.flatten_dict(nested, sep="/").items():
        top = key.split("/")[0]
        if top.startswith("q_downsample"):
            own = "q_downsample" if v == v_max else f"q_downsample_v{v}"
            if top != own:
                continue
            key = key.replace(own, "q_downsample", 1)
        out[key] = value
    return traverse_util.unflatten_dict(out, sep="/")


@pytest.mark.parametrize("compressor", ["quecc", "tokenpacker", "resampler", "avgpool"])
def test_nested_head_at_each_v_equals_the_published_head_with_the_same_weights(compressor):
    nested_cfg = helpers.tiny_config(compressor=compressor, num_tokens=16).model
    nested_cfg.compressor.nested_tokens = SET
    module, params, features, query = _head_params(nested_cfg)
    for v in SET:
        published_cfg = helpers.tiny_config(compressor=compressor, num_tokens=v).model
        pub_module, pub_params, _, _ = _head_params(published_cfg)
        mine = _published_params(params, v, max(SET))
        if compressor == "resampler":   # V = the first V latents
            mine = dict(mine, latents=mine["latents"][:v])
        assert jax.tree.map(np.shape, mine) == jax.tree.map(np.shape, pub_params), v
        want = pub_module.apply({"params": mine}, features, query)
        got = module.apply({"params": params}, features, query, v)
        assert got.shape == (2, v, nested_cfg.vision.width)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"V={v}")


def test_nested_quecc_with_a_set_of_one_v_is_the_published_head_exactly():
    published = helpers.tiny_config(compressor="quecc", num_tokens=4).model
    nested = helpers.tiny_config(compressor="quecc", num_tokens=4).model
    nested.compressor.nested_tokens = (4,)
    pub_module, pub_params, features, query = _head_params(published)
    module, params, _, _ = _head_params(nested)
    assert set(pub_params) == {"text_proj", "text_norm", "q_mlp", "q_downsample", "k_mlp", "v_mlp", "attn"}
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, pub_params)
    np.testing.assert_array_equal(module.apply({"params": pub_params}, features, query),
                                  pub_module.apply({"params": pub_params}, features, query))


def test_nested_quecc_parameter_count_against_separate_heads():
    """One kernel (k*k*Dv + Dv) per extra V against a whole head per V (numbers in elastic.py's docstring)."""
    model = helpers.tiny_config(compressor="quecc", num_tokens=16).model
    model.compressor.nested_tokens = SET
    nested = flops.count_params(heads.abstract_head_params(model))
    separate = {v: flops.count_params(heads.abstract_head_params(helpers.tiny_config(compressor="quecc",
                                                                                      num_tokens=v).model))
                for v in SET}
    d = model.vision.width   # a 4x4 grid: V=16 is the published head's kernel (k=1), V=4 adds k=2, V=1 adds k=4
    assert nested == separate[16] + (2 * 2 * d + d) + (4 * 4 * d + d)
    assert nested < sum(separate.values())


@pytest.mark.parametrize("compressor", ["avgpool", "quecc"])
def test_elastic_model_at_each_v_equals_a_fixed_v_model_with_the_same_weights(compressor):
    config = _elastic_config(compressor=compressor, batch_size=2)
    model_cfg = elastic.model_config(config.model, config.train)
    params = nn.meta.unbox(jax.jit(vlm.init_fn(model_cfg))(jax.random.key(0)))
    batch = helpers.random_batch(config)
    for v in SET:
        trimmed = elastic.trim(batch, v, np)
        fixed = vlm.VLM(_fixed(config, v).model)
        want = jax.jit(lambda p, b: fixed.apply({"params": p}, **b))(_as_fixed(params, v),  # noqa: B023
                                                                       state_lib.model_inputs(trimmed))
        got = jax.jit(lambda p, b: vlm.VLM(model_cfg).apply({"params": p}, **b, num_tokens=v))(  # noqa: B023
            params, state_lib.model_inputs(trimmed))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"V={v}")


# --- (d) steps --------------------------------------------------------------------------------------------------

def _state(config):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, tx = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0))
    return mesh, state, tx


def test_m3_loss_is_the_mean_of_the_fixed_v_losses_and_its_gradient_the_mean_gradient():
    config = _elastic_config("m3", batch_size=4)
    mesh, state, tx = _state(config)
    batch = helpers.random_batch(config)
    model = vlm.VLM(elastic.model_config(config.model, config.train))
    step = jax.jit(state_lib.make_train_step(model, tx, scales=SET))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        new, metrics = step(state, batch)
        losses, grads = {}, {}
        for v in SET:   # fixed-V models, the same weights (avgpool has none of its own)
            fixed = vlm.VLM(_fixed(config, v).model)
            trimmed = elastic.trim(batch, v, np)

            def loss(trainable, fixed=fixed, trimmed=trimmed):
                logits = fixed.apply({"params": optim.merge(trainable, state.frozen)},
                                     **state_lib.model_inputs(trimmed))
                return state_lib.masked_cross_entropy(logits, trimmed["targets"], trimmed["loss_mask"])[0]
            losses[v], grads[v] = jax.jit(jax.value_and_grad(loss))(state.params)
    assert float(metrics["loss"]) == pytest.approx(np.mean([float(x) for x in losses.values()]), rel=1e-6)
    for v in SET:
        assert float(metrics[f"loss/v{v}"]) == pytest.approx(float(losses[v]), rel=1e-6)
    mean_grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads.values())
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax_norm(mean_grad)), rel=1e-5)
    assert int(new.step) == 1


def optax_norm(tree):
    return np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("compressor", ["avgpool", "quecc"])
def test_mqt_step_at_the_drawn_v_equals_the_fixed_v_step(compressor):
    config = _elastic_config("mqt", compressor=compressor, batch_size=4)
    mesh, state, tx = _state(config)
    batch = helpers.random_batch(config)
    v = elastic.draw(config.seed, 0, SET)
    model = vlm.VLM(elastic.model_config(config.model, config.train))
    fixed_cfg = _fixed(config, v)
    # The fixed-V run's state: the same weights (the drawn V's kernel as its only one), a fresh optimizer.
    fixed_params = jax.device_get(_as_fixed(state.params, v))
    fixed_state = jax.device_put(state.replace(params=fixed_params, opt_state=tx.init(fixed_params)),
                                 jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        new, metrics = jax.jit(state_lib.make_train_step(model, tx, scales=(v,)))(state, batch)
        want_state, want = jax.jit(state_lib.make_train_step(vlm.VLM(fixed_cfg.model), tx))(
            fixed_state, elastic.trim(batch, v, np))
    assert int(metrics["visual_tokens"]) == v
    assert float(metrics["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
    got, expected = _flat(new.params), _flat(want_state.params)
    if compressor == "quecc":   # the drawn V's kernel moved, the other V's kernels did not
        untouched = [k for k in got if k.startswith("compressor/q_downsample") and
                     k.split("/")[1] != ("q_downsample" if v == max(SET) else f"q_downsample_v{v}")]
        for k in untouched:
            np.testing.assert_array_equal(got[k], _flat(state.params)[k])
        got = _flat(_as_fixed(new.params, v))
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_mqt_draw_is_a_function_of_seed_and_step_and_covers_the_set():
    draws = [elastic.draw(0, s, SET) for s in range(300)]
    assert draws == [elastic.draw(0, s, SET) for s in range(300)]        # deterministic: a resume draws the same
    assert draws == [elastic.draw(0, s, (16, 1, 4)) for s in range(300)]  # the set's order does not matter
    counts = {v: draws.count(v) for v in SET}
    assert all(80 <= c <= 120 for c in counts.values()), counts            # uniform: 100 each, sd ~8
    assert draws != [elastic.draw(1, s, SET) for s in range(300)]


# --- (e) FLOPs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["m3", "mqt"])
def test_elastic_step_flops_match_xla_cost_analysis(mode):
    config = _elastic_config(mode, compressor="quecc", seq_len=64, question_len=8, batch_size=4)
    llm = config.model.llm
    llm.vocab_size, llm.scan_layers = 4096, False   # as tests/test_flops_xla.py: loops unrolled
    config.train.train_vision = False
    mesh, state, tx = _state(config)
    model = vlm.VLM(elastic.model_config(config.model, config.train))
    batch = helpers.random_batch(_with(config, seq_len=config.data.seq_len + max(SET)))   # L_max = seq_len + V_max
    for key, scales in elastic.MODES[mode].programs(SET).items():
        if mode == "mqt" and key != 4:
            continue
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            cost = jax.jit(state_lib.make_train_step(model, tx, scales=scales)).lower(state, batch).compile()
        xla = float(cost.cost_analysis()["flops"])
        ours = state_lib.step_flops(config, set(state.params), key if mode == "mqt" else None)
        assert ours == pytest.approx(xla, rel=0.05), (mode, key)
    if mode == "m3":   # the tower and the query pass once: less than three fixed-V steps
        three = sum(state_lib.step_flops(_fixed(config, v), set(state.params)) for v in SET)
        assert ours < three


def _with(config, **data):
    out = config.copy_and_resolve_references()
    out.data.update(data)
    return out


# --- config errors and the training loop ------------------------------------------------------------------------

def _run_config(tmp_path, mode, compressor="quecc", steps=4, **train_kw):
    config = smoke.get_config(f"llm=tiny-s,tokens=16,res=32,compressor={compressor}")
    with config.unlocked():
        config.run_dir = str(tmp_path / mode)
        config.data.seq_len = 24
        config.train.update(dict(steps=steps, batch_size=4, log_every=1, checkpoint_every=steps, **train_kw))
        config.train.elastic.mode, config.train.elastic.tokens = mode, SET
    return config


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.train.elastic, "mode", "random"), "train.elastic.mode"),
    (lambda c: setattr(c.train.elastic, "tokens", (1, 4)), "must be the largest"),
    (lambda c: setattr(c.train.elastic, "tokens", (1, 2, 16)), "cannot produce V=2"),
    (lambda c: setattr(c.data, "pack_examples", 2), "pack_examples"),
    (lambda c: setattr(c.model, "compressor", ml_collections.ConfigDict(dict(name="none", num_tokens=16))),
     "does not nest"),
])
def test_impossible_elastic_configs_fail_at_start_naming_the_key(tmp_path, change, message):
    config = _run_config(tmp_path, "mqt")
    with config.unlocked():
        change(config)
    with pytest.raises(ValueError, match=message):
        train.validate_config(train.resolved(config), 1)


@pytest.mark.parametrize("mode", ["mqt", "m3"])
def test_an_elastic_run_logs_its_v_and_restores_its_nested_head(tmp_path, mode):
    config = _run_config(tmp_path, mode)
    last = train.run(config)
    lines = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    if mode == "mqt":
        assert [x["visual_tokens"] for x in lines] == [elastic.draw(config.seed, s, SET) for s in range(4)]
    else:
        assert set(SET) == {int(k[len("loss/v"):]) for k in last if k.startswith("loss/v")}
        assert last["loss"] == pytest.approx(np.mean([last[f"loss/v{v}"] for v in SET]), rel=1e-5)
    saved, params = state_lib.load_params(config.run_dir)   # the saved config builds the nested tree
    assert tuple(saved.model.compressor.nested_tokens) == SET
    assert {f"q_downsample_v{v}" for v in SET[:-1]} | {"q_downsample"} <= set(params["compressor"])
