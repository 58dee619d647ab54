"""A parameter dimension the mesh does not divide is replicated loudly, with its cost, or refused (strict)."""

import logging

import jax
import pytest
from jax.sharding import AbstractMesh

from configs import models
from vlm_jax import sharding
from vlm_jax.models import vlm


def _report(llm: str, tensor: int, fsdp: int = 1) -> list:
    cfg = models.model_config("clip-vit-l14-336", llm, "avgpool", 1)
    cfg.llm.scan_layers = True   # as the full-size configs run: one stacked weight per kind, reported once
    boxed = jax.eval_shape(vlm.init_fn(cfg), jax.random.key(0))
    report = []
    sharding.logical_to_sharding(boxed, AbstractMesh((1, fsdp, tensor), sharding.MESH_AXES), report=report)
    return report


def test_qwen15_4b_heads_on_tensor_8_replicate_the_attention_weights_and_say_how_much():
    report = _report("qwen1.5-4b", tensor=8)
    names = sorted(r.path.split("['self_attn']")[1] for r in report)
    assert names == sorted([f"['{p}_proj']['{w}']" for p in "qkv" for w in ("kernel", "bias")]
                           + ["['o_proj']['kernel']"])
    assert all(n == 20 and axes == ("tensor",) for r in report for _, n, axes in r.dims)
    # Published Qwen1.5-4B: 40 layers, hidden 2560, 20 heads x 128 (no GQA), q/k/v biases; float32. Replicated
    # over tensor=8, each device holds 7/8 of these weights more than an 8-way split would.
    attention = 40 * (4 * 2560 * 2560 + 3 * 2560) * 4
    assert sum(r.extra_bytes for r in report) == attention * 7 // 8
    assert _report("qwen1.5-4b", tensor=4) == []   # 20 heads split 4 ways: nothing replicated
    # With fsdp=2 as well, the kernels keep their 2-way split of the hidden size (2560): 1/2 held instead of 1/16;
    # the biases have no hidden dimension: 1 instead of 1/8.
    kernels, biases = 40 * 4 * 2560 * 2560 * 4, 40 * 3 * 2560 * 4
    both = _report("qwen1.5-4b", tensor=8, fsdp=2)
    assert sum(r.extra_bytes for r in both) == kernels // 2 - kernels // 16 + biases - biases // 8


def test_replication_is_a_warning_naming_the_parameter_or_an_error_when_strict(caplog):
    report = _report("qwen1.5-4b", tensor=8)
    with caplog.at_level(logging.WARNING):
        sharding.check_replication(report, strict=False)
    assert "7 parameter(s) stay replicated" in caplog.text and "q_proj" in caplog.text and "GiB" in caplog.text
    with pytest.raises(ValueError, match=r"(?s)q_proj.*config.mesh.strict"):
        sharding.check_replication(report, strict=True)
    sharding.check_replication([], strict=True)   # nothing replicated: nothing to say
