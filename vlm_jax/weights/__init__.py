"""Hugging Face weights in (sharded, streamed from safetensors) and out (safetensors in the HF layout).

    tables.py    which HF tensor each parameter comes from, and how its axes map (read top to bottom)
    families.py  the checkpoint families by config.json model_type: Qwen1.5 (qwen2), CLIP's vision tower
    load.py      an HF directory -> sharded parameters (`config.init` entries that name such a directory)
    export.py    parameters -> an HF directory transformers loads
"""

from vlm_jax.weights.load import Checkpoint, is_hf_directory, restore_matching

__all__ = ["Checkpoint", "is_hf_directory", "restore_matching"]
