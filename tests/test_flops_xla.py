"""The train-step FLOPs that MFU divides by, against XLA's own count of the compiled step (layers unrolled: XLA
counts a loop body once). An untied embedding is a large share here, so counting its lookup as a matmul, or QueCC's
query pass over the whole sequence instead of the question, is far outside the tolerance; what XLA counts beyond
our model (norms, softmax, AdamW, the masked half of causal attention) stays within it."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests import helpers
from vlm_jax import flops, sharding, train
from vlm_jax.models import vlm


@pytest.mark.parametrize("compressor,tie,packed", [("avgpool", False, 1), ("quecc", False, 1), ("quecc", True, 1),
                                                   ("quecc", False, 3)])
def test_train_step_flops_match_xla_cost_analysis_of_the_jitted_step(compressor, tie, packed):
    """packed=K: rows of K examples (data/packing.py): K images, K questions, K x V slots per row."""
    config = helpers.tiny_config(compressor=compressor, num_tokens=4, seq_len=64, question_len=8, batch_size=4)
    llm = config.model.llm
    llm.vocab_size, llm.tie_embeddings, llm.scan_layers = 4096, tie, False   # embedding a large share; loops unrolled
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, tx = train.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = jax.jit(train.make_train_step(vlm.VLM(config.model), tx))
    batch = helpers.random_batch(config)
    if packed > 1:   # only shapes matter to the count
        for key in ("pixels", "question_tokens", "question_mask"):
            batch[key] = np.repeat(batch[key][:, None], packed, axis=1)
        batch["image_positions"] = np.tile(batch["image_positions"], (1, packed))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        cost = step.lower(state, batch).compile().cost_analysis()
    xla = float(cost["flops"])
    ours = flops.train_step_flops(config.model, batch_size=4, seq_len=64, train_llm=True, train_vision=True,
                                  query_tokens=8, images_per_sequence=packed)
    assert ours == pytest.approx(xla, rel=0.05)
