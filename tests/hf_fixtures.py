"""Small random Hugging Face models (built with transformers in the test) and the matching vlm-jax configs."""

import ml_collections
import numpy as np

from configs import common, models

LLM_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                 rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512)
VISION_SHAPE = dict(image_size=32, patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64, layer_norm_eps=1e-5)


def model_config(tied: bool = False, scan_layers: bool = True) -> ml_collections.ConfigDict:
    """A whole VLM config whose LLM and tower have the shapes of the random HF models below."""
    cfg = models.model_config("tiny", "tiny", "avgpool", 4)
    cfg.llm.update(dict(LLM_SHAPE, tie_embeddings=tied, scan_layers=scan_layers))
    cfg.vision.update(VISION_SHAPE)
    return cfg


def train_config():
    return common.train_config(stage="full", steps=1, batch_size=8, lr=1e-3, warmup_ratio=0.0)


def hf_qwen2(torch, transformers, tied: bool, seed: int = 0):
    """A random Qwen2ForCausalLM with grouped queries; every tensor (biases and norms too) perturbed from its init,
    so a mapping that mixes up two tensors cannot pass."""
    torch.manual_seed(seed)
    s = LLM_SHAPE
    cfg = transformers.Qwen2Config(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        rope_theta=s["rope_theta"], rms_norm_eps=s["rms_norm_eps"], max_position_embeddings=s["max_position_embeddings"],
        tie_word_embeddings=tied, use_sliding_window=False, hidden_act="silu")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    _perturb(torch, model)
    return model


def hf_clip_vision(torch, transformers, seed: int = 0):
    torch.manual_seed(seed)
    s = VISION_SHAPE
    cfg = transformers.CLIPVisionConfig(
        hidden_size=s["width"], intermediate_size=s["mlp_dim"], num_hidden_layers=s["depth"],
        num_attention_heads=s["num_heads"], image_size=s["image_size"], patch_size=s["patch_size"],
        layer_norm_eps=s["layer_norm_eps"], hidden_act="quick_gelu")
    model = transformers.CLIPVisionModel(cfg).eval()
    _perturb(torch, model)
    return model


def _perturb(torch, model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def padded_tokens(batch=3, length=12, vocab=128, seed=0):
    """int[B, T] tokens and an attention mask with a right-padded row, a left-padded row and a full row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, 8:] = 0      # right padding
    mask[1, :5] = 0      # left padding
    return tokens * mask, mask
