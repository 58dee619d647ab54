"""Read a local Hugging Face checkpoint directory straight into sharded parameters.

The directory is the hub's layout: config.json and `*.safetensors` (one file, or shards listed by
`model.safetensors.index.json`). Every parameter is created on its mesh sharding by `jax.make_array_from_callback`;
the callback reads, through safetensors' lazy slices, only the rows of the block one device owns. So no host ever
holds a whole model (a 14B LLM loads on hosts with less memory than it), and on a pod every host reads its own part
in parallel. Pickled checkpoints (`*.bin`, `*.pt`) are refused: unpickling can run code, and safetensors exists.
"""

import contextlib
import functools
import json
import logging
import os
import re

import jax
import ml_collections
import numpy as np
from safetensors import safe_open

from vlm_jax import files
from vlm_jax.weights import families

# What a parameter may be read from: any float. Integers, booleans or 8-bit floats are not weights we can use.
CASTABLE = {"F64", "F32", "F16", "BF16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"


def is_hf_directory(path: str) -> bool:
    """A Hugging Face checkpoint (rather than a vlm-jax run or checkpoint): its config.json names a model_type."""
    config = os.path.join(path, "config.json")
    if "://" in path or not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def index_shards(path: str) -> list[str]:
    """The shard files that `path`/model.safetensors.index.json names. An index is data: a shard name that is
    absolute or climbs out of `path` ('..') is refused, so that it never makes us open a file elsewhere. Symlinks
    are followed: the hub's cache links a snapshot's files to its blobs."""
    index = os.path.join(path, INDEX)
    with open(index) as f:
        data = json.load(f)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no weight_map object ({{tensor name: shard file}})")
    for name in weight_map.values():
        norm = files.inner_path(name) if isinstance(name, str) else None
        if norm is None or "\\" in name or not norm.endswith(".safetensors"):
            raise ValueError(f"{index}: shard {name!r} is not a *.safetensors file inside {path!r}")
    return sorted(set(weight_map.values()))


class Checkpoint:
    """The tensors of one HF checkpoint directory: names, shapes and dtypes from the headers; data on demand."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no Hugging Face checkpoint directory at {path!r}")
        with open(os.path.join(path, "config.json")) as f:
            self.config = json.load(f)
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not shards:
            pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
            what = f"only pickled weights {pickled}" if pickled else "no *.safetensors file"
            raise ValueError(f"{path}: {what}; vlm-jax reads safetensors only (pickles can run code): convert "
                             f"them, e.g. with transformers' save_pretrained(safe_serialization=True)")
        if os.path.isfile(os.path.join(path, INDEX)):
            shards = index_shards(path)
        self._stack = contextlib.ExitStack()
        self.file_of, self.info, self.stored = {}, {}, {}
        shard_of = {}
        try:
            for name in shards:
                handle = self._stack.enter_context(safe_open(os.path.join(path, name), framework="flax"))
                for key in handle.keys():
                    if key in shard_of:
                        raise ValueError(f"{path}: tensor {key!r} is in two shards, {shard_of[key]} and {name}: "
                                         f"which copy is meant is unknown; keep it in one")
                    sl = handle.get_slice(key)
                    self.file_of[key], self.stored[key], shard_of[key] = handle, key, name
                    self.info[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except BaseException:
            self._stack.close()
            raise

    def spell(self, canonical) -> None:
        """Key the tensors by `canonical(stored name)` (the family's table spelling)."""
        self.stored = {canonical(k): k for k in self.info}
        self.info = {canonical(k): v for k, v in self.info.items()}

    def close(self):
        self._stack.close()

    def read(self, name: str, index: tuple, layout, ours_shape: tuple, dtype) -> np.ndarray:
        """Block `index` of our view of tensor `name`, as a host numpy array of `dtype`."""
        # safetensors' flax slices are jax arrays: keep them on the host's CPU device, whatever the accelerator.
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            stored = self.stored[name]
            block = layout.read(self.file_of[stored].get_slice(stored), ours_shape, index)
        return np.asarray(block, dtype=dtype)


def depth(part_cfg) -> int:
    """Layers of an LLM (`num_layers`) or a tower (`depth`) config."""
    return part_cfg.get("num_layers", part_cfg.get("depth"))


def expand(family: families.Family, names: set, num_layers: int) -> dict:
    """{our full name: [(HF name, layout), one per stacked layer or a single one]} for the parameters of our model
    that the family's table covers; a scanned stack (`prefix/layers/...`) lists its layers in order."""
    out = {}
    for ours, hf, layout in family.table:
        if "{i}" not in ours:
            out[f"{family.prefix}/{ours}"] = [(hf, layout)]
            continue
        scanned = f"{family.prefix}/{ours.replace('layers_{i}', 'layers')}"
        if scanned in names:
            out[scanned] = [(hf.format(i=i), layout) for i in range(num_layers)]
        else:
            for i in range(num_layers):
                out[f"{family.prefix}/{ours.format(i=i)}"] = [(hf.format(i=i), layout)]
    return out


def is_stacked(name: str, entries: list) -> bool:
    """Whether parameter `name` stacks one HF tensor per layer on a leading axis (a scanned LLM's layers)."""
    return len(entries) > 1 or name.split("/")[1] == "layers"


def restore_matching(source: str, regex: str, abstract_params: dict, model_cfg: ml_collections.ConfigDict) -> dict:
    """{name: sharded jax.Array} for every parameter whose name fully matches `regex`, read from the HF checkpoint
    directory `source` onto the shardings of `abstract_params` ({name: ShapeDtypeStruct with sharding}).

    Errors name what is wrong: a config.json of another architecture or preset, a tensor the table needs that the
    files lack, a tensor the files hold that nothing reads, a shape or dtype that does not fit.
    """
    where = f"config.init source {source!r} (params {regex!r})"
    ckpt = Checkpoint(source)
    try:
        family = families.of(ckpt.config, where)
        ours_cfg = model_cfg[family.prefix]
        family.check(ours_cfg, ckpt.config, where)
        ckpt.spell(family.canonical)
        tied = bool(ours_cfg.get("tie_embeddings", False))
        rows = expand(family, set(abstract_params), depth(ours_cfg))
        rows = {k: v for k, v in rows.items() if k in abstract_params}
        known = {hf for entries in rows.values() for hf, _ in entries}
        unexpected = sorted(k for k in ckpt.info if k not in known and not family.is_ignored(k, tied))
        if unexpected:
            raise ValueError(f"{where}: the checkpoint holds tensors no parameter reads: {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        pattern = re.compile(regex)
        wanted = {k: v for k, v in abstract_params.items() if pattern.fullmatch(k)}
        if not wanted:
            raise ValueError(f"{where} selects no parameter of the model; names look like {sorted(abstract_params)[:3]}")
        outside = sorted(k for k in wanted if k not in rows)
        if outside:
            raise ValueError(f"{where}: a {family.name} checkpoint holds only {family.prefix}/... parameters; the "
                             f"regex also selects {outside[:3]}")
        out = {name: _load_one(ckpt, name, rows[name], wanted[name], where) for name in sorted(wanted)}
        logging.info("%s: %d parameters from a %s checkpoint", where, len(out), family.name)
        return out
    finally:
        ckpt.close()


def _load_one(ckpt: Checkpoint, name: str, entries: list, abstract, where: str) -> jax.Array:
    stacked = is_stacked(name, entries)
    per_layer = tuple(abstract.shape[1:]) if stacked else tuple(abstract.shape)
    for hf, layout in entries:
        if hf not in ckpt.info:
            raise ValueError(f"{where}: the checkpoint lacks tensor {hf!r} (for parameter {name!r})")
        shape, dtype = ckpt.info[hf]
        if shape != layout.hf_shape(per_layer):
            raise ValueError(f"{where}: tensor {hf!r} has shape {list(shape)}; parameter {name!r} "
                             f"{list(per_layer)} needs {list(layout.hf_shape(per_layer))}")
        if dtype not in CASTABLE:
            raise ValueError(f"{where}: tensor {hf!r} is {dtype}, which cannot be cast to the parameter's "
                             f"{abstract.dtype} (floats only: {sorted(CASTABLE)})")

    @functools.lru_cache(maxsize=None)   # replicas of one block (e.g. over the data axis) are read once
    def block(key):
        index = tuple(slice(*k) for k in key)
        if not stacked:
            hf, layout = entries[0]
            return ckpt.read(hf, index, layout, per_layer, abstract.dtype)
        return np.stack([ckpt.read(entries[i][0], index[1:], entries[i][1], per_layer, abstract.dtype)
                         for i in range(*index[0].indices(len(entries)))])

    def callback(index):
        return block(tuple(s.indices(n)[:2] for s, n in zip(index, abstract.shape)))

    return jax.make_array_from_callback(tuple(abstract.shape), abstract.sharding, callback)
