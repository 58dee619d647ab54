"""The train-step FLOPs that MFU divides by, against XLA's own count of the compiled step (layers unrolled: XLA
counts a loop body once). An untied embedding is a large share here, so counting its lookup as a matmul, or QueCC's
query pass over the whole sequence instead of the question, is far outside the tolerance; what XLA counts beyond
our model (norms, softmax, AdamW, the masked half of causal attention) stays within it."""

import flax.linen as nn
import jax
import pytest

from tests import helpers
from vlm_jax import flops, sharding, train
from vlm_jax.models import vlm


@pytest.mark.parametrize("compressor,tie", [("avgpool", False), ("quecc", False), ("quecc", True)])
def test_train_step_flops_match_xla_cost_analysis_of_the_jitted_step(compressor, tie):
    config = helpers.tiny_config(compressor=compressor, num_tokens=4, seq_len=64, question_len=8, batch_size=4)
    llm = config.model.llm
    llm.vocab_size, llm.tie_embeddings, llm.scan_layers = 4096, tie, False   # embedding a large share; loops unrolled
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, _, tx = train.create_state(config.model, config.train, mesh, jax.random.key(0))
    step = jax.jit(train.make_train_step(vlm.VLM(config.model), tx))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        cost = step.lower(state, helpers.random_batch(config)).compile().cost_analysis()
    xla = float(cost["flops"])
    ours = flops.train_step_flops(config.model, batch_size=4, seq_len=64, train_llm=True, train_vision=True,
                                  query_tokens=8)
    assert ours == pytest.approx(xla, rel=0.05)
