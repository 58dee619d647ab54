"""train.text_only: the step over text-only batches (the grid's LLM pretraining on scenes told in words) runs the LLM
alone. Against the full step on the same batch: the same loss, gradients and eval sums, with the image path never
read (NaN pixels change nothing); a batch with image slots refused on the host; FLOPs without the image path, within
XLA's count of the compiled step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from tests import helpers
from vlm_jax import optim, sharding
from vlm_jax import state as state_lib
from vlm_jax.models import vlm

IMAGE_PATH = ("vision", "compressor", "projector")


def _text_only(batch):
    """`batch` with no image slot (every position out of range, as the pipeline writes a text-only row)."""
    out = dict(batch)
    out["image_positions"] = np.full_like(batch["image_positions"], batch["tokens"].shape[1])
    return out


def _gradients_kept():
    """An optimizer whose state after a step is that step's gradients (parameters stay as they were)."""
    def zeros(tree):
        return jax.tree.map(jnp.zeros_like, tree)
    return optax.GradientTransformation(zeros, lambda grads, _, params=None: (zeros(grads), grads))


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.mark.parametrize("compressor,loss_chunk", [("avgpool", 0), ("quecc", 8)])
def test_text_only_step_equals_the_full_step_on_a_text_only_batch(compressor, loss_chunk):
    """QueCC adds the query pass through the LLM; loss_chunk the chunked loss's path. The text-only step reads NaN
    pixels: any use of the image path would put NaN into its gradients (and the zero check below)."""
    config = helpers.tiny_config(compressor=compressor, num_tokens=4, batch_size=4, llm="tiny-s")
    config.model.vision.depth = 2
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, _ = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0))
    tx = _gradients_kept()
    state = state.replace(opt_state=tx.init(state.params))
    batch = _text_only(helpers.random_batch(config))
    batch["pixels"] = np.zeros_like(batch["pixels"])   # the pipeline's blank image
    unread = dict(batch, pixels=np.full_like(batch["pixels"], np.nan))
    model = vlm.VLM(config.model)
    full = jax.jit(state_lib.make_train_step(model, tx, loss_chunk))
    text = jax.jit(state_lib.make_train_step(model, tx, loss_chunk, text_only=True))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        want_state, want = full(state, batch)
        got_state, got = text(state, unread)
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
    assert float(got["loss_tokens"]) == float(want["loss_tokens"])
    assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=1e-5)
    want_grads, got_grads = _flat(want_state.opt_state), _flat(got_state.opt_state)
    assert set(got_grads) == set(want_grads) and any(k.startswith("llm/") for k in got_grads)
    for key, g in got_grads.items():
        if key.split("/")[0] in IMAGE_PATH:   # nothing reaches the image path on a text-only batch
            assert not np.any(want_grads[key]) and not np.any(g), key
        else:
            np.testing.assert_allclose(g, want_grads[key], rtol=1e-5, atol=1e-7, err_msg=key)

    params = optim.merge(state.params, state.frozen)
    sums = [jax.jit(state_lib.make_eval_step(model, loss_chunk, text_only))(params, dict(b, valid=np.ones(4)))
            for text_only, b in ((False, batch), (True, unread))]
    for key, value in sums[0].items():
        assert float(sums[1][key]) == pytest.approx(float(value), rel=1e-6), key


def test_a_batch_with_image_slots_is_refused_naming_the_key():
    config = helpers.tiny_config(num_tokens=4)
    batch = helpers.random_batch(config)
    text = _text_only(batch)
    state_lib.check_batch(config, batch)   # option off: any batch goes
    config.train.text_only = True
    state_lib.check_batch(config, text)
    mixed = dict(text, image_positions=text["image_positions"].copy())
    mixed["image_positions"][3] = batch["image_positions"][3]   # one row with an image
    for refused, row in ((batch, 0), (mixed, 3)):
        with pytest.raises(ValueError, match=rf"train\.text_only=True .* \(row {row}: image_positions"):
            state_lib.check_batch(config, refused)
    with pytest.raises(ValueError, match="train.text_only with train.elastic"):
        state_lib.make_train_step(vlm.VLM(config.model), optax.sgd(1.0), scales=(1, 4), text_only=True)


def test_text_only_flops_leave_out_the_image_path_and_match_xla():
    """As tests/test_flops_xla.py counts the full step (layers unrolled, an untied embedding), with QueCC: the tower,
    the head, the projector and the query pass are all left out. A 96 px image (144 patches) makes them a third of
    the full step, far outside the tolerance if they were counted (or run)."""
    config = helpers.tiny_config(compressor="quecc", num_tokens=4, llm="tiny-m", seq_len=60, question_len=8,
                                 batch_size=4)
    llm = config.model.llm
    llm.vocab_size, llm.tie_embeddings, llm.scan_layers = 4096, False, False
    config.model.vision.image_size = 96
    config.train.train_vision = False
    config.train.text_only = True
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, tx = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = state_lib.make_train_step(vlm.VLM(config.model), tx, text_only=True)
    shaped = helpers.tiny_config(compressor="quecc", num_tokens=4, seq_len=64, question_len=8, batch_size=4)
    shaped.model = config.model
    batch = _text_only(helpers.random_batch(shaped))   # seq_len + V = 64 columns, as the pipeline builds them
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        xla = float(jax.jit(step).lower(state, batch).compile().cost_analysis()["flops"])
    trainable = set(state.params)
    ours = state_lib.step_flops(config, trainable)
    config.train.text_only = False
    full = state_lib.step_flops(config, trainable)
    assert ours < 0.75 * full
    assert ours == pytest.approx(xla, rel=0.06)   # XLA's extra: the masked half of attention, norms, AdamW
