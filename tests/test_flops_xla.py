"""The train-step FLOPs that MFU divides by, against XLA's own count of the compiled step (layers unrolled: XLA
counts a loop body once). An untied embedding is a large share here, so counting its lookup as a matmul, or QueCC's
query pass over the whole sequence instead of the question, is far outside the tolerance; what XLA counts beyond
our model (norms, softmax, AdamW, the masked half of causal attention) stays within it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from vlm_jax import flops, sharding
from vlm_jax import state as state_lib
from vlm_jax.models import heads, vlm


@pytest.mark.parametrize("compressor,tie,packed", [("avgpool", False, 1), ("quecc", False, 1), ("quecc", True, 1),
                                                   ("quecc", False, 3)])
def test_train_step_flops_match_xla_cost_analysis_of_the_jitted_step(compressor, tie, packed):
    """packed=K: rows of K examples (data/packing.py): K images, K questions, K x V slots per row."""
    config = helpers.tiny_config(compressor=compressor, num_tokens=4, seq_len=64, question_len=8, batch_size=4)
    llm = config.model.llm
    llm.vocab_size, llm.tie_embeddings, llm.scan_layers = 4096, tie, False   # embedding a large share; loops unrolled
    config.train.train_vision = False   # frozen, as in the paper: a forward pass up to the layer the head reads
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, tx = state_lib.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = jax.jit(state_lib.make_train_step(vlm.VLM(config.model), tx))
    batch = helpers.random_batch(config)
    if packed > 1:   # only shapes matter to the count
        for key in ("pixels", "question_tokens", "question_mask"):
            batch[key] = np.repeat(batch[key][:, None], packed, axis=1)
        batch["image_positions"] = np.tile(batch["image_positions"], (1, packed))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        cost = step.lower(state, batch).compile().cost_analysis()
    xla = float(cost["flops"])
    ours = flops.train_step_flops(config.model, batch_size=4, seq_len=64, train_llm=True, train_vision=False,
                                  question_len=8, images_per_sequence=packed)
    # Beyond our model XLA counts the masked half of causal attention, norms, softmaxes and AdamW: ~5% here.
    assert ours == pytest.approx(xla, rel=0.06)


def _xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_inference_breakdown_matches_xla_for_the_tower_projector_and_llm():
    """Each part of one query's forward FLOPs against XLA's count of that part alone (layers unrolled). The LLM is
    tied, as the paper's 2 N (Q + V) assumes: its table multiplies once, as the output layer."""
    config = helpers.tiny_config(compressor="avgpool", num_tokens=4, seq_len=64)
    cfg = config.model
    cfg.llm.scan_layers = False
    cfg.llm.hidden_size = cfg.vision.width = 256   # wide enough that norms and GELU stay within the tolerance
    cfg.vision.mlp_dim = 1024
    q = 60
    b = flops.inference_breakdown(cfg, text_tokens=q)
    model = vlm.VLM(cfg)
    params = jax.jit(vlm.init_fn(cfg))(jax.random.key(0))
    s = cfg.vision.image_size
    layer = heads.get(cfg.compressor.name).vision_layers(cfg.compressor, cfg.vision)
    vision = _xla_flops(lambda p, x: model.apply({"params": p}, x, layer, method=lambda m, x, i: m.vision(x, i)),
                        params, jnp.zeros((1, s, s, 3)))
    assert b.vision == pytest.approx(vision, rel=0.05)
    projector = _xla_flops(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.projector(x)),
                           params, jnp.zeros((1, 4, cfg.vision.width)))
    assert b.projector == pytest.approx(projector, rel=0.08)   # + the exact GELU, ~60 FLOPs an element to XLA
    t = q + 4
    llm = _xla_flops(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.llm.logits(
        m.llm(m.llm.embed_tokens(x), jnp.ones_like(x))[0])), params, jnp.zeros((1, t), jnp.int32))
    assert b.llm + b.llm_attention == pytest.approx(llm, rel=0.05)
