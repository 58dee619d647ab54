"""Named model presets: vision towers, LLMs, and the helpers configs use to build `config.model`.

Where the numbers come from:
- `clip-vit-l14-336`: the config.json of `openai/clip-vit-large-patch14-336` (vision part): image 336, patch 14,
  hidden 1024, 24 layers, 16 heads, MLP 4096, quick-GELU, LayerNorm eps 1e-5 -> 24x24 = 576 patch tokens.
- `qwen1.5-*`: the config.json of each `Qwen/Qwen1.5-{0.5B,1.8B,4B,7B,14B}` checkpoint (hidden_size,
  intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, rope_theta,
  rms_norm_eps, tie_word_embeddings; tests/test_presets_published.py pins every field). Published parameter counts (safetensors metadata, lm_head included even where
  tied): 0.62B, 1.84B, 3.95B, 7.72B, 14.17B; tests/test_param_counts.py pins them.
- `tiny*`: small shapes for tests and CPU smoke runs. They go through exactly the same code.
"""

import ml_collections

from configs import heads

VISION_PRESETS = {
    "clip-vit-l14-336": dict(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                             layer_norm_eps=1e-5),
    "clip-vit-l14": dict(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                         layer_norm_eps=1e-5),
    # 64 px / patch 8 -> an 8x8 grid, so V in {1, 4, 16, 64} tiles it.
    "tiny": dict(image_size=64, patch_size=8, width=64, depth=4, num_heads=4, mlp_dim=256, layer_norm_eps=1e-5),
}

_QWEN_COMMON = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
LLM_PRESETS = {
    "qwen1.5-0.5b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                         num_kv_heads=16, tie_embeddings=True, **_QWEN_COMMON),
    "qwen1.5-1.8b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_layers=24, num_heads=16,
                         num_kv_heads=16, tie_embeddings=False, **_QWEN_COMMON),
    "qwen1.5-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=6912, num_layers=40, num_heads=20,
                       num_kv_heads=20, tie_embeddings=False, **dict(_QWEN_COMMON, rope_theta=5e6)),  # 4B alone: 5e6
    "qwen1.5-7b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, tie_embeddings=False, **_QWEN_COMMON),
    "qwen1.5-14b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13696, num_layers=40, num_heads=40,
                        num_kv_heads=40, tie_embeddings=False, **_QWEN_COMMON),
    # Tiny LLMs for CPU runs; a family of widths so a local grid has several N. GQA on (kv heads < heads).
    "tiny": dict(vocab_size=128, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2,
                 tie_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "tiny-xs": dict(vocab_size=128, hidden_size=32, intermediate_size=86, num_layers=2, num_heads=2, num_kv_heads=1,
                    tie_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "tiny-s": dict(vocab_size=128, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=2, num_kv_heads=1,
                   tie_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
    # tiny-s with a lean MLP: the narrowest width (64) that learns the grid's binding lookup, at 58K parameters
    "tiny-s-lean": dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1, tie_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                        max_position_embeddings=2048),
    "tiny-m": dict(vocab_size=128, hidden_size=96, intermediate_size=256, num_layers=3, num_heads=3, num_kv_heads=1,
                   tie_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "tiny-l": dict(vocab_size=128, hidden_size=256, intermediate_size=688, num_layers=6, num_heads=8, num_kv_heads=4,
                   tie_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048),
}


def vision_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The vision-tower config for preset `name`; `select_layer` follows LLaVA (-2: penultimate layer)."""
    if name not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {name!r}; known: {sorted(VISION_PRESETS)}")
    cfg = dict(name=name, select_layer=-2, **VISION_PRESETS[name])
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def llm_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The LLM config for preset `name`. `scan_layers`/`remat` trade compile time and memory, not results."""
    if name not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {name!r}; known: {sorted(LLM_PRESETS)}")
    # scan_layers unset: layers as a loop on the CPU, under nn.scan on TPU/GPU (vlm_jax/models/llm.py:scans_layers).
    cfg = dict(name=name, scan_layers=ml_collections.config_dict.placeholder(bool), remat="none", **LLM_PRESETS[name])
    cfg.update(overrides)
    cfg = ml_collections.ConfigDict(cfg)
    # A reference, so `--config.model.llm.hidden_size=...` keeps head_dim consistent.
    cfg.head_dim = cfg.get_ref("hidden_size") // cfg.get_ref("num_heads")
    return cfg


def compressor_config(name: str = "avgpool", num_tokens: int = 64, **overrides) -> ml_collections.ConfigDict:
    """Compressor head config: `name` selects the registry entry, `num_tokens` is V; every key of the head is
    present (so it is overridable on a locked config). The keys are documented in configs/heads.py."""
    return heads.compressor_config(name, num_tokens, **overrides)


def llm_param_count(name: str) -> int:
    """Parameters of LLM preset `name`, counted from its abstract parameter tree (nothing allocated)."""
    from vlm_jax import flops  # pylint: disable=import-outside-toplevel  (flops builds the model code lazily)
    return flops.param_counts(model_config("tiny", name, "avgpool", 1))["llm"]


def model_config(vision: str, llm: str, compressor: str = "avgpool", num_tokens: int = 64,
                 dtype: str = "float32") -> ml_collections.ConfigDict:
    """The full `config.model`: vision tower -> compressor head -> projector -> LLM."""
    return ml_collections.ConfigDict(dict(
        vision=vision_config(vision),
        llm=llm_config(llm),
        compressor=compressor_config(compressor, num_tokens),
        projector=ml_collections.ConfigDict(dict(name="mlp2x_gelu")),
        head_init="flax",        # 'torch': compressor + projector start as the authors' PyTorch modules do
        dtype=dtype,             # activation/compute dtype ("bfloat16" on accelerators)
        param_dtype="float32",   # storage of the parameters (and their optimizer state); f32 master weights
    ))
