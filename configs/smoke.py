"""Smoke run: tiny CLIP-style tower + tiny Qwen-style LLM on the built-in synthetic benchmark (CPU, minutes).

    python -m launch.train --config=configs/smoke.py
    python -m launch.train --config=configs/smoke.py:compressor=avgpool,tokens=1 --config.train.steps=300

Argument keys: llm (a preset of configs/models.py), compressor (a head name), tokens (V), steps.
The tiny tower is randomly initialised, so it trains too (train_vision=True); everything else is the full-size path.
"""

import ml_collections

from configs import common, models
from vlm_jax.data import pipeline


def get_config(arg=None):
    arg = common.parse_arg(arg, llm="tiny", compressor="avgpool", tokens=16, steps=200)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.run_dir = f"runs/smoke-{arg.llm}-{arg.compressor}-v{arg.tokens}"
    config.model = models.model_config("tiny", arg.llm, arg.compressor, arg.tokens)
    config.data = pipeline.default_config()
    config.train = common.train_config(
        stage="full", train_vision=True, steps=arg.steps, batch_size=16, lr=1e-3, log_every=10,
        checkpoint_every=100)
    config.mesh = common.mesh_config()
    config.lock()
    return config
