"""Convert once, train many times: Hugging Face directories -> one orbax checkpoint; a trained run -> HF directories.

The orbax checkpoint holds exactly the parameters its sources give (e.g. the CLIP tower and the Qwen LLM), under
`params`, sharded as the model is; a run's `config.init` then takes them like any run's checkpoint
(`('/ckpt/clip-qwen7b', 'vision/.*|llm/.*')`), without reading safetensors again.
"""

import json
import logging
import os

import jax
import flax.linen as nn
from flax import traverse_util

from vlm_jax import checkpoints, files, sharding
from vlm_jax import state as state_lib
from vlm_jax.models import vlm
from vlm_jax.weights import export, load


def abstract_params(model_cfg, mesh) -> dict:
    """{name: ShapeDtypeStruct with its mesh sharding} of the whole model (nothing allocated)."""
    boxed = jax.eval_shape(vlm.init_fn(model_cfg), jax.random.key(0))
    shardings = sharding.logical_to_sharding(boxed, mesh)
    tree = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                        shardings)
    return traverse_util.flatten_dict(tree, sep="/")


def hf_to_orbax(sources, model_cfg, out_dir: str, mesh) -> int:
    """Read every (HF directory, regex) source onto the mesh and save the parameters as step 0 of an orbax
    checkpoint in out_dir/checkpoints (with the model config beside it); returns how many were written."""
    wanted = abstract_params(model_cfg, mesh)
    taken = {}
    for source, regex in sources:
        if not load.is_hf_directory(source):
            raise ValueError(f"{source!r} is not a Hugging Face checkpoint directory (no config.json)")
        taken.update(load.restore_matching(source, regex, wanted, model_cfg))
    mngr = checkpoints.manager(checkpoints.directory(out_dir))
    try:
        checkpoints.save(mngr, 0, {"params": traverse_util.unflatten_dict(taken, sep="/")},
                         meta={"sources": [list(s) for s in sources]}, force=True)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    if jax.process_index() == 0:
        files.write_text_atomic(os.path.join(out_dir, "model_config.json"), json.dumps(model_cfg.to_dict(), indent=2))
    logging.info("converted %d parameters into %s", len(taken), out_dir)
    return len(taken)


# What `run_to_hf` can write, each into its own subdirectory of the output.
PARTS = {
    "llm": lambda params, cfg, out, dtype: export.export_llm(params["llm"], cfg.llm, os.path.join(out, "llm"), dtype),
    "heads": lambda params, cfg, out, dtype: export.export_heads(params, cfg, os.path.join(out, "heads"), dtype),
    "vision": lambda params, cfg, out, dtype: export.export_vision(params["vision"], cfg.vision,
                                                                   os.path.join(out, "vision"), dtype),
}


def run_to_hf(run_dir: str, out_dir: str, parts=("llm", "heads"), dtype: str = "bfloat16", mesh=None) -> dict:
    """The latest checkpoint of a run -> out_dir/{llm, heads, vision}: {part: files written}."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown export parts {unknown}; choose from {sorted(PARTS)}")
    config, params = state_lib.load_params(run_dir, mesh)
    return {part: PARTS[part](params, config.model, out_dir, dtype) for part in parts}
