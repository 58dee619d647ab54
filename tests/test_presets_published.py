"""Every field of the full-size presets equals the published config.json of its checkpoint.

The dicts below are the architecture fields of each checkpoint's config.json on the Hugging Face hub (Qwen/Qwen1.5-*
base models; openai/clip-vit-large-patch14-336's vision_config), copied from the files. They are checked by the same
code that checks a checkpoint directory before loading it, so a preset that drifts (Qwen1.5-4B's rope_theta is 5e6,
not the family's 1e6) can neither pass here nor load real weights.
"""

import pytest

from configs import models
from vlm_jax.weights import families

_QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-06,
             max_position_embeddings=32768, sliding_window=32768, use_sliding_window=False, torch_dtype="bfloat16")
PUBLISHED_QWEN = {
    "qwen1.5-0.5b": dict(_QWEN, vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, rope_theta=1000000.0,
                         tie_word_embeddings=True, max_window_layers=21),
    "qwen1.5-1.8b": dict(_QWEN, vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, rope_theta=1000000.0,
                         tie_word_embeddings=False, max_window_layers=21),
    "qwen1.5-4b": dict(_QWEN, vocab_size=151936, hidden_size=2560, intermediate_size=6912, num_hidden_layers=40,
                       num_attention_heads=20, num_key_value_heads=20, rope_theta=5000000.0,
                       tie_word_embeddings=False, max_window_layers=21),
    "qwen1.5-7b": dict(_QWEN, vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rope_theta=1000000.0,
                       tie_word_embeddings=False, max_window_layers=28),
    "qwen1.5-14b": dict(_QWEN, vocab_size=152064, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, rope_theta=1000000.0,
                        tie_word_embeddings=False, max_window_layers=35),
}
PUBLISHED_CLIP_336 = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=768, vision_config=dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, layer_norm_eps=1e-05, hidden_act="quick_gelu", projection_dim=768))


@pytest.mark.parametrize("name", sorted(PUBLISHED_QWEN))
def test_qwen_preset_equals_published_config(name):
    families.of(PUBLISHED_QWEN[name], name).check(models.llm_config(name), PUBLISHED_QWEN[name], name)


def test_clip_preset_equals_published_config():
    families.of(PUBLISHED_CLIP_336, "clip").check(models.vision_config("clip-vit-l14-336"), PUBLISHED_CLIP_336, "clip")


def test_a_drifted_preset_fails_naming_the_field():
    drifted = models.llm_config("qwen1.5-4b", rope_theta=1e6)
    with pytest.raises(ValueError, match=r"rope_theta=5000000\.0 but the model preset 'qwen1\.5-4b' has rope_theta="
                                         r"1000000\.0"):
        families.QWEN2.check(drifted, PUBLISHED_QWEN["qwen1.5-4b"], "qwen1.5-4b")
