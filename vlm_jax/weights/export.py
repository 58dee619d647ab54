"""Write parameters back out as a Hugging Face checkpoint directory, so a trained model leaves vlm-jax.

The LLM becomes a Qwen2 directory (config.json + sharded safetensors + index) that transformers'
`Qwen2ForCausalLM.from_pretrained` loads; the tower a CLIP vision directory. Both run their family's key table
backwards. The compressor and projector have no transformers class: they are written with their own table
(`PROJECTOR_TABLE`, then `head_tensors`): the projector under LLaVA's names (`model.mm_projector.0/2`), the compressor under
`model.mm_compressor.` + our parameter path, with torch's layouts for 2-D kernels.
Every file goes through `vlm_jax.files`, so the output may be a gs:// folder.
"""

import json
import os

import jax
import ml_collections
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from vlm_jax import files
from vlm_jax.weights import families, load, tables

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _host(x) -> np.ndarray:
    """The whole array on this host (gathered across processes on a pod)."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(family: families.Family, params: dict, part_cfg: ml_collections.ConfigDict) -> dict:
    """{HF name: numpy array} for the family's subtree `params` (nested, as in our tree under family.prefix)."""
    flat = {f"{family.prefix}/{k}": v for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    rows = load.expand(family, set(flat), load.depth(part_cfg))
    missing = sorted(k for k in flat if k not in rows)
    if missing:
        raise ValueError(f"no {family.name} tensor for parameters {missing[:3]}")
    out = {}
    for name, entries in rows.items():
        if name not in flat:
            continue          # e.g. lm_head of a tied model
        value = _host(flat[name])
        for i, (hf, layout) in enumerate(entries):
            out[hf] = layout.to_hf(value[i] if load.is_stacked(name, entries) else value)
    return out


def qwen2_config(llm_cfg: ml_collections.ConfigDict, dtype: str) -> dict:
    """config.json of a Qwen2ForCausalLM with our preset's shape."""
    cfg = {hf_key: llm_cfg[ours] for ours, hf_key in families.QWEN2.fields}
    cfg.update(families.QWEN2.required)
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", torch_dtype=dtype,
               attention_dropout=0.0, use_cache=True, sliding_window=cfg["max_position_embeddings"],
               max_window_layers=cfg["num_hidden_layers"])
    return cfg


def clip_vision_config(vision_cfg: ml_collections.ConfigDict, dtype: str) -> dict:
    cfg = {hf_key: vision_cfg[ours] for ours, hf_key in families.CLIP.fields}
    cfg.update(families.CLIP.required)
    cfg.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model", torch_dtype=dtype)
    return cfg


def write_directory(out_dir: str, tensors: dict, config: dict | None, dtype: str = "float32",
                    max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `tensors` as safetensors shards (+ index when there are several) and config.json; returns the files.
    Only process 0 writes."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name].astype(DTYPES[dtype]))
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    if jax.process_index() != 0:
        return []
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        _write_safetensors(os.path.join(out_dir, name), shard)
    written = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
                 "weight_map": {t: n for n, s in zip(names, shards) for t in s}}
        files.write_text_atomic(os.path.join(out_dir, load.INDEX), json.dumps(index, indent=2))
        written.append(load.INDEX)
    if config is not None:
        files.write_text_atomic(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
        written.append("config.json")
    return written


def _write_safetensors(path: str, tensors: dict) -> None:
    """save_file into a local file, then renamed into place or streamed to a bucket (files.write_file_atomic): a
    shard of a 14B model is GBs, which safetensors.numpy.save would hold a second time in memory as bytes."""
    files.write_file_atomic(path, lambda local: save_file(tensors, local, metadata={"format": "pt"}))


def export_llm(llm_params: dict, llm_cfg, out_dir: str, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30):
    """Our LLM subtree -> a Qwen2ForCausalLM directory."""
    return write_directory(out_dir, hf_tensors(families.QWEN2, llm_params, llm_cfg), qwen2_config(llm_cfg, dtype),
                           dtype, max_shard_bytes)


def export_vision(vision_params: dict, vision_cfg, out_dir: str, dtype: str = "float32"):
    """Our tower subtree -> a CLIPVisionModel directory."""
    return write_directory(out_dir, hf_tensors(families.CLIP, vision_params, vision_cfg),
                           clip_vision_config(vision_cfg, dtype), dtype)


# ------------------------------------------------------------------------------------------- compressor + projector

PROJECTOR_TABLE = (   # LLaVA's mlp2x_gelu is nn.Sequential(Linear, GELU, Linear): indices 0 and 2
    ("projector/linear_1/kernel", "model.mm_projector.0.weight", tables.LINEAR),
    ("projector/linear_1/bias", "model.mm_projector.0.bias", tables.SAME_1D),
    ("projector/linear_2/kernel", "model.mm_projector.2.weight", tables.LINEAR),
    ("projector/linear_2/bias", "model.mm_projector.2.bias", tables.SAME_1D),
)


def head_tensors(params: dict) -> dict:
    """{name: array} for the compressor and projector: the projector under LLaVA's names, the compressor under
    'model.mm_compressor.' + our path (2-D kernels transposed to torch's [out, in]; other arrays as they are)."""
    out = {hf: layout.to_hf(_host(_get(params, ours))) for ours, hf, layout in PROJECTOR_TABLE}
    for path, value in traverse_util.flatten_dict(params.get("compressor", {}), sep=".").items():
        value = _host(value)
        if path.endswith("kernel") and value.ndim == 2:
            value, path = tables.LINEAR.to_hf(value), path[: -len("kernel")] + "weight"
        out[f"model.mm_compressor.{path}"] = value
    return out


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def export_heads(params: dict, model_cfg, out_dir: str, dtype: str = "float32") -> list[str]:
    """compressor + projector -> out_dir/heads.safetensors, with heads.json recording the head config (beside an
    exported LLM, which keeps its own files)."""
    tensors = {k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in head_tensors(params).items()}
    if jax.process_index() == 0:
        _write_safetensors(os.path.join(out_dir, "heads.safetensors"), tensors)
        files.write_text_atomic(os.path.join(out_dir, "heads.json"), json.dumps(
            {"compressor": model_cfg.compressor.to_dict(), "projector": model_cfg.projector.to_dict()}, indent=2))
    return ["heads.safetensors", "heads.json"]
