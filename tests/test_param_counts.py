"""Parameter counts of the full-size presets, from jax.eval_shape (nothing is allocated), against published counts.

Published counts: the safetensors metadata of each HF checkpoint (total_size / 2 bytes for bf16), i.e. what the
model cards show. Qwen1.5-0.5B ties its LM head to the embedding, but its checkpoint stores the head anyway, so
the published 619,570,176 = our (tied, counted once) tree + one vocab x hidden copy.
"""

import jax
import jax.numpy as jnp
import pytest

from configs import models
from vlm_jax import flops
from vlm_jax.models import vision, vlm

PUBLISHED_LLM = {
    "qwen1.5-0.5b": 619_570_176,
    "qwen1.5-1.8b": 1_836_828_672,
    "qwen1.5-4b": 3_950_369_280,
    "qwen1.5-7b": 7_721_324_544,
    "qwen1.5-14b": 14_167_290_880,
}
# CLIPVisionModel of openai/clip-vit-large-patch14(-336), post-LayerNorm included.
PUBLISHED_VISION = {"clip-vit-l14-336": 303_507_456, "clip-vit-l14": 303_179_776}


count = flops.count_params


@pytest.mark.parametrize("name", sorted(PUBLISHED_LLM))
def test_qwen_preset_parameter_count_matches_published(name):
    cfg = models.model_config("clip-vit-l14-336", name, "avgpool", 1)
    n = count(vlm.abstract_params(cfg)["llm"])
    if cfg.llm.tie_embeddings:
        n += cfg.llm.vocab_size * cfg.llm.hidden_size
    assert n == PUBLISHED_LLM[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_VISION))
def test_clip_preset_parameter_count_matches_published(name):
    cfg = models.model_config(name, "tiny", "avgpool", 1)
    assert count(vlm.abstract_params(cfg)["vision"]) == PUBLISHED_VISION[name]


def test_clip_l14_336_has_a_24x24_patch_grid():
    # The built tower's output (shapes only, nothing computed): class token + 24 x 24 patch tokens.
    v = models.vision_config("clip-vit-l14-336")
    tower = vision.VisionTower(v)
    pixels = jax.ShapeDtypeStruct((1, 336, 336, 3), jnp.float32)
    params = jax.eval_shape(lambda rng, x: tower.init(rng, x, (0,)), jax.random.key(0), pixels)
    hidden = jax.eval_shape(lambda p, x: tower.apply(p, x, (0,)), params, pixels)[0]
    patches = jax.eval_shape(vision.patch_tokens, hidden)
    assert hidden.shape == (1, 1 + 24 * 24, 1024) and patches.shape == (1, 576, 1024)


def test_projector_parameter_count_is_mlp2x_gelu():
    cfg = models.model_config("clip-vit-l14-336", "qwen1.5-7b", "avgpool", 1)
    n = count(vlm.abstract_params(cfg)["projector"])
    assert n == 1024 * 4096 + 4096 + 4096 * 4096 + 4096


@pytest.mark.parametrize("llm", ["qwen1.5-0.5b", "qwen1.5-14b"])
def test_full_size_recipe_config_builds_and_validates_without_allocating(llm):
    from configs import llava
    from vlm_jax import optim, sharding, train
    from vlm_jax import state as state_lib
    config = llava.get_config(f"llm={llm},tokens=576,compressor=none,stage=1")
    assert (config.train.lr, config.train.batch_size, config.data.seq_len) == (1e-3, 256, 2048)
    assert config.train.steps == 558_128 // 256
    train.validate_config(config, 0, vocab_size=151_646)
    mesh = sharding.make_mesh(config.mesh)
    _, abstract, _ = state_lib.state_layout(config.model, config.train, mesh)
    # Stage 1: only compressor + projector train, so the LLM and vision tower carry no optimizer state.
    assert set(abstract.params) == {"projector"}
    assert count(abstract.frozen["llm"]) + (config.model.llm.vocab_size * config.model.llm.hidden_size
                                            if config.model.llm.tie_embeddings else 0) == PUBLISHED_LLM[llm]
    stage2 = llava.get_config(f"llm={llm},stage=2")
    assert (stage2.train.lr, stage2.train.batch_size, stage2.train.stage) == (2e-5, 128, "full")
    assert optim.param_rules(stage2.train)[-1] == ("^vision/", "freeze")
