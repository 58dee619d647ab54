"""Which attention kernel runs where (`layers.attention_implementation`): cuDNN's fused kernel on NVIDIA GPUs where
JAX's cuDNN path takes the call, XLA's path otherwise, the heads-major form on the CPU. Each rule has a case that
flips the choice; `layers.attention` calls what was chosen (a stand-in GPU, no GPU needed)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import layers
from vlm_jax.models import llm as llm_lib

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
HOPPER, AMPERE, TURING = (9, 0), (8, 0), (7, 5)


def choose(platform="cuda", dtype=BF16, head_dim=64, q_len=2064, kv_len=2064, mask="causal", capability=HOPPER):
    return layers.attention_implementation(platform, dtype, head_dim, q_len, kv_len, mask, capability)


def test_the_paper_shapes_on_a_hopper_gpu_take_cudnn():
    assert choose() == "cudnn"                                          # Qwen1.5-0.5B's layers, V = 16
    assert choose(head_dim=128) == "cudnn"                              # 1.8B-14B
    assert choose(head_dim=64, q_len=512, kv_len=512) == "cudnn"        # QueCC's question pass
    assert choose(head_dim=64, q_len=577, kv_len=577, mask="none") == "xla"   # CLIP-L/14-336, 576 + CLS: odd


@pytest.mark.parametrize("platform,expected", [("cpu", "cpu"), ("tpu", "xla"), ("rocm", "xla"), ("gpu", "xla"),
                                               ("cuda", "cudnn")])
def test_only_cuda_gpus_take_cudnn_and_the_cpu_keeps_its_own_form(platform, expected):
    assert choose(platform=platform) == expected


def test_the_cpu_form_whatever_the_dtype_or_shape():
    assert choose(platform="cpu", dtype=F32, head_dim=60, q_len=33, kv_len=33, capability=None) == "cpu"


@pytest.mark.parametrize("capability,expected", [(TURING, "xla"), (AMPERE, "cudnn"), (HOPPER, "cudnn"),
                                                 ((10, 0), "cudnn"), (None, "xla")])
def test_cudnn_needs_ampere_or_newer(capability, expected):
    assert choose(capability=capability) == expected


@pytest.mark.parametrize("dtype,expected", [(F32, "xla"), (BF16, "cudnn"), (F16, "cudnn")])
def test_cudnn_takes_half_precision_only(dtype, expected):
    assert choose(dtype=dtype) == expected


@pytest.mark.parametrize("head_dim,capability,expected", [
    (64, HOPPER, "cudnn"), (60, HOPPER, "xla"),         # a multiple of 8
    (256, HOPPER, "cudnn"), (264, HOPPER, "xla"),       # at most 256 on Hopper or newer
    (128, AMPERE, "cudnn"), (136, AMPERE, "xla"),       # at most 128 before
    (256, AMPERE, "xla"),
])
def test_cudnn_head_dim_limits(head_dim, capability, expected):
    assert choose(head_dim=head_dim, capability=capability) == expected


@pytest.mark.parametrize("mask,q_len,kv_len,expected", [
    ("causal", 2064, 2064, "cudnn"), ("causal", 2049, 2049, "xla"),   # V = 1: an odd length
    ("mask", 48, 48, "cudnn"), ("mask", 1, 48, "xla"), ("mask", 48, 33, "xla"),   # a decoding step: one query
    ("none", 578, 578, "cudnn"), ("none", 577, 577, "xla"), ("none", 2, 33, "xla"),   # a mask or not
])
def test_cudnn_needs_even_lengths_with_a_mask_or_without(mask, q_len, kv_len, expected):
    assert choose(mask=mask, q_len=q_len, kv_len=kv_len) == expected


def test_an_unknown_mask_kind_fails():
    with pytest.raises(ValueError, match="mask kind"):
        choose(mask="sliding")


def _inputs(dtype, t=8, heads=4, kv_heads=2, head_dim=16):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (2, t, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (2, t, kv_heads, head_dim), dtype)
    valid = jnp.ones((2, t), jnp.int32).at[1, -2:].set(0)
    return q, k, v, llm_lib.causal_mask(jnp.arange(t), valid, q_segments=valid)


def test_on_the_cpu_attention_is_the_heads_major_form_as_before():
    q, k, v, mask = _inputs(F32, t=300)   # from 256 queries on, two causal query blocks
    assert layers.attention_platform() == ("cpu", None)
    np.testing.assert_array_equal(layers.attention(q, k, v, mask, causal=True),
                                  layers.grouped_attention(q, k, v, mask, query_blocks=2))
    np.testing.assert_array_equal(layers.attention(q, k, v, None), layers.grouped_attention(q, k, v, None))


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """A CUDA device of compute capability 9.0 as `attention_platform` sees one, and a recording
    jax.nn.dot_product_attention (its XLA path computes the answer)."""
    calls = []
    device = types.SimpleNamespace(client=types.SimpleNamespace(platform_version="PJRT C API\ncuda 12080"),
                                   compute_capability="9.0")
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(layers.jax, "devices", lambda *a: [device])
    library = jax.nn.dot_product_attention

    def recording(q, k, v, mask=None, *, is_causal=False, implementation=None):
        calls.append(dict(dtype=q.dtype, is_causal=is_causal, implementation=implementation))
        return library(q, k, v, mask=mask)   # the mask holds the causality either way
    monkeypatch.setattr(layers.jax.nn, "dot_product_attention", recording)
    return calls


def test_a_cuda_gpu_calls_cudnn_with_the_causal_flag_where_it_applies(stand_in_gpu):
    q, k, v, mask = _inputs(BF16)
    out = layers.attention(q, k, v, mask, causal=True)
    layers.attention(q[:, -1:], k, v, mask[:, :, -1:])   # one decoding query: odd, XLA
    layers.attention(q, k, v, None)
    assert stand_in_gpu == [dict(dtype=BF16, is_causal=True, implementation="cudnn"),
                            dict(dtype=BF16, is_causal=False, implementation=None),
                            dict(dtype=BF16, is_causal=False, implementation="cudnn")]
    reference = layers.grouped_attention(*(x.astype(F32) for x in (q, k, v)), mask)   # the mask reached the kernel
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=3e-2)


def test_a_cuda_gpu_in_float32_or_with_cudnn_turned_off_takes_xla(stand_in_gpu, monkeypatch):
    q, k, v, mask = _inputs(F32)
    layers.attention(q, k, v, mask, causal=True)
    monkeypatch.setenv("VLM_JAX_CUDNN_ATTENTION", "0")
    layers.attention(*(x.astype(BF16) for x in (q, k, v)), mask, causal=True)
    assert [c["implementation"] for c in stand_in_gpu] == [None, None]
