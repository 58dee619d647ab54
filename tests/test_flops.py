"""FLOPs model: parameter counts from the abstract tree, per-part inference FLOPs, training FLOPs, MFU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from vlm_jax import flops
from vlm_jax.models import heads, vlm

SDS = jax.ShapeDtypeStruct


def tiny_cfg(compressor="avgpool", num_tokens=4):
    return models.model_config("tiny", "tiny", compressor, num_tokens)


def test_xla_flops_of_a_matmul_is_2mnk():
    m, k, n = 48, 96, 20
    got = flops.xla_flops(lambda a, b: a @ b, SDS((m, k), jnp.float32), SDS((k, n), jnp.float32))
    assert got == 2 * m * n * k


@pytest.mark.parametrize("llm,expected", [("qwen1.5-7b", 7_721_324_544), ("qwen1.5-0.5b", 463_987_712)])
def test_llm_size_is_counted_from_the_abstract_parameter_tree(llm, expected):
    cfg = models.model_config("clip-vit-l14-336", llm, "avgpool", 1)
    counts = flops.param_counts(cfg)
    assert counts["llm"] == expected
    assert counts["vision"] == 303_507_456
    assert flops.inference_flops(cfg, text_tokens=63, llm_only=True) == 2 * expected * (63 + 1)


def test_llm_flops_follow_the_tree_not_a_preset(monkeypatch):
    # Whatever tree the model reports is what gets charged: doubling a layer's size changes the count.
    real = vlm.abstract_params(tiny_cfg())
    bigger = dict(real, llm=dict(real["llm"], extra=SDS((1000, 7), jnp.float32)))
    monkeypatch.setattr(vlm, "abstract_params", lambda cfg: bigger)
    assert flops.param_counts(tiny_cfg())["llm"] == flops.count_params(real["llm"]) + 7000


def test_param_counts_reject_a_tree_without_the_four_parts():
    with pytest.raises(ValueError, match=r"lacks top-level part\(s\) \['projector'\]"):
        flops.param_counts(tiny_cfg(), params={"vision": {}, "compressor": {}, "llm": {}})


def test_attention_term_is_quadratic_and_causal_is_half():
    full = flops.attention_flops(2, 4, 16, 100, causal=False)
    assert full == 4 * 2 * 4 * 16 * 100 * 100  # QK^T and AV, 2 FLOPs per multiply-add
    assert flops.attention_flops(2, 4, 16, 100, causal=True) == full / 2
    assert flops.attention_flops(2, 4, 16, 200, causal=True) == 4 * full / 2


def test_quecc_is_charged_for_its_query_pass_over_the_question():
    cfg = tiny_cfg("quecc", 4)
    llm = cfg.llm
    n_body = flops.param_counts(cfg)["llm"] - llm.vocab_size * llm.hidden_size   # stops at the last hidden state
    b = flops.inference_breakdown(cfg, text_tokens=30, question_len=12)
    assert b.query_pass == 2 * n_body * 12 + 2 * llm.num_layers * llm.num_heads * llm.head_dim * 12 ** 2
    # By default the whole text is the question.
    assert flops.inference_breakdown(cfg, text_tokens=30).query_pass > b.query_pass


def test_a_new_query_conditioned_head_is_charged_its_query_pass_and_its_own_cost(monkeypatch):
    # A head flops has never heard of: the head class alone says what it costs.
    class QueryPool(heads.get("avgpool")):
        needs_query = True

        @classmethod
        def flops_per_image(cls, model_cfg):
            return 123.0

    monkeypatch.setitem(heads.REGISTRY, "query_pool", QueryPool)
    cfg = tiny_cfg("avgpool", 4)
    cfg.compressor.name = "query_pool"
    llm = cfg.llm
    n_body = flops.param_counts(cfg)["llm"] - llm.vocab_size * llm.hidden_size   # tied table, not multiplied
    b = flops.inference_breakdown(cfg, text_tokens=30, question_len=12)
    assert b.query_pass == 2 * n_body * 12 + 2 * llm.num_layers * llm.num_heads * llm.head_dim * 12 ** 2
    assert b.compressor == 123.0
    kw = {"batch_size": 1, "seq_len": 40, "train_llm": True, "train_vision": False}
    assert flops.train_step_flops(cfg, question_len=8, **kw) > flops.train_step_flops(tiny_cfg("avgpool", 4), **kw)


def test_compressor_flops_come_from_xla_and_grow_with_head_work():
    assert flops.compressor_flops(tiny_cfg("none", 64)) == 0.0
    pool = flops.compressor_flops(tiny_cfg("avgpool", 4))
    quecc = flops.compressor_flops(tiny_cfg("quecc", 4))
    assert 0 < pool < quecc
    fn, args = heads.get("quecc").cost_fn(tiny_cfg("quecc", 4))
    assert quecc == flops.xla_flops(fn, *args)


def test_mfu_is_achieved_over_peak_and_rejects_nonsense():
    assert flops.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    for args in ((0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, -1.0), (1.0, float("nan"), 1.0)):
        with pytest.raises(ValueError, match="must be positive"):
            flops.mfu(*args)


def test_bad_token_counts_are_refused():
    with pytest.raises(ValueError, match="text_tokens must be >= 0"):
        flops.inference_breakdown(tiny_cfg(), text_tokens=-1)
    with pytest.raises(ValueError, match="batch_size and seq_len must be positive"):
        flops.train_step_flops(tiny_cfg(), batch_size=0, seq_len=8, train_llm=True, train_vision=False)


def test_llm_linear_flops_broadcast_over_arrays():
    np.testing.assert_array_equal(flops.llm_linear_flops(np.array([1.0, 2.0]), np.array([3.0, 4.0])), [6.0, 16.0])
