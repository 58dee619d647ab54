"""model.head_init='torch': the compressor and projector start with the distributions of the authors' PyTorch
modules, measured against freshly built torch modules of the same shapes (not against our formulas)."""

import jax
import numpy as np
import pytest

from configs import models
from vlm_jax.models import vlm

torch = pytest.importorskip("torch", reason="needs the test-only requirements (requirements-test.txt)")


def _params(head: str, head_init: str = "torch", seed: int = 0) -> dict:
    import flax.linen as nn
    cfg = models.model_config("tiny", "tiny", head, 4)
    cfg.vision.update(dict(width=128, num_heads=4, mlp_dim=256))   # 128-wide: enough entries for the statistics
    cfg.head_init = head_init
    return jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(vlm.init_fn(cfg))(jax.random.key(seed))))


def _close_std(ours, theirs, rtol=0.06):
    ours, theirs = np.asarray(ours, np.float64).ravel(), theirs.detach().double().numpy().ravel()
    assert abs(ours.std() / theirs.std() - 1) < rtol, (ours.std(), theirs.std())
    assert abs(ours.mean()) < 4 * ours.std() / np.sqrt(ours.size)


def _within_bound_of(ours, module_cls, *args, rtol=1e-6, **kw):
    """Every entry inside the range the torch module draws its bias from (a wide instance, so its max is the bound),
    and the entries not all zero."""
    wide = module_cls(*args, **kw)
    bound = float(wide.bias.detach().abs().max())
    assert 0 < np.abs(ours).max() <= bound * (1 + rtol) and np.abs(ours).max() > 0.5 * bound


def test_quecc_and_projector_start_as_pytorch_defaults():
    torch.manual_seed(0)
    p = _params("quecc")
    c, d, d_llm = p["compressor"], 128, 128
    # Linear: kaiming-uniform weight and uniform bias, both +-1/sqrt(fan_in)
    _close_std(c["text_proj"]["kernel"], torch.nn.Linear(d_llm, d).weight)
    _within_bound_of(c["text_proj"]["bias"], torch.nn.Linear, d_llm, 100_000)
    _close_std(c["k_mlp"]["fc1"]["kernel"], torch.nn.Linear(4 * d, d).weight)
    _close_std(p["projector"]["linear_1"]["kernel"], torch.nn.Linear(d, 128).weight)
    _within_bound_of(p["projector"]["linear_2"]["bias"], torch.nn.Linear, 128, 100_000)
    # MultiheadAttention: packed in-projection Xavier-uniform, zero biases; out-projection Linear, zero bias
    mha = torch.nn.MultiheadAttention(d, 8)
    q, k, v = mha.in_proj_weight.chunk(3)
    for name, ref in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        _close_std(c["attn"][name]["kernel"], ref)
        assert not np.any(c["attn"][name]["bias"]) and not torch.any(mha.in_proj_bias)
    _close_std(c["attn"]["o_proj"]["kernel"], mha.out_proj.weight)
    assert not np.any(c["attn"]["o_proj"]["bias"]) and not torch.any(mha.out_proj.bias)
    # depthwise Conv2d: +-1/sqrt(k*k) (fan-in of one group)
    kernel = c["q_downsample"]["kernel"]
    k_side = kernel.shape[0]
    _close_std(kernel, torch.nn.Conv2d(d, d, k_side, stride=k_side, groups=d).weight)
    _within_bound_of(c["q_downsample"]["bias"], torch.nn.Conv2d, 100_000, 100_000, k_side, groups=100_000)
    # LayerNorm: 1 and 0, as torch
    np.testing.assert_array_equal(c["text_norm"]["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(c["q_mlp"]["norm"]["norm"]["bias"], 0.0)


def test_tokenpacker_starts_as_its_init_weights():
    torch.manual_seed(0)
    c = _params("tokenpacker")["compressor"]
    ref = torch.empty(128, 512)
    torch.nn.init.trunc_normal_(ref, std=0.02)
    _close_std(c["k_mlp"]["fc1"]["kernel"], ref)
    _close_std(c["q_proj"]["kernel"], ref)
    assert not np.any(c["k_mlp"]["fc1"]["bias"])
    _close_std(c["attn"]["o_proj"]["kernel"], ref)      # out_proj is an nn.Linear: trunc-normal too
    _close_std(c["attn"]["q_proj"]["kernel"], torch.nn.MultiheadAttention(128, 8).in_proj_weight)


def test_flax_init_is_unchanged_by_default():
    c = _params("quecc", head_init="flax")["compressor"]
    assert not np.any(c["text_proj"]["bias"])          # flax: zero biases
    with pytest.raises(ValueError, match="model.head_init='jax'"):
        _params("quecc", head_init="jax")
