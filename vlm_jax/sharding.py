"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

Mesh axes are ('data', 'fsdp', 'tensor'): the batch is split over data x fsdp, weights are split over fsdp (their
'embed' dimension) and tensor (heads / MLP / vocab). The rules below are the one place that decides this; layers
only name their axes. A dimension that its mesh axes do not divide is left replicated (a tiny model on a big
mesh still runs), and that choice is reported once.
"""

import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or None: replicated). Every logical name a layer uses must appear here.
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("vision_mlp", "tensor"),
    ("projector_hidden", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("compressor_embed", "fsdp"),
    ("compressor_hidden", "tensor"),
    ("compressor_heads", "tensor"),
)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh from `config.mesh` {data, fsdp, tensor}; one entry may be -1 (takes the remaining devices)."""
    devices = jax.devices() if devices is None else devices
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"config.mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, "
                         f"but {len(devices)} are available")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _fit_spec(spec: P, shape, mesh: Mesh, where: str) -> P:
    """Drop mesh axes from dimensions they do not divide (those dimensions stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        if names and dim % math.prod(mesh.shape[n] for n in names):
            logging.info("sharding: %s dim %d (size %d) not divisible by %s; replicated", where, len(fitted),
                         dim, names)
            axes = None
        fitted.append(axes)
    return P(*fitted)


def logical_to_sharding(abstract_boxed_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree whose leaves carry logical axis names (flax `Partitioned` boxes)."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.meta.unbox(abstract_boxed_tree)
    paths = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), shapes)
    return jax.tree.map(
        lambda spec, x, path: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh, path)),
        mesh_specs, shapes, paths, is_leaf=lambda s: isinstance(s, P))


def check_rules_cover(abstract_boxed_tree, rules=RULES) -> None:
    """Every logical axis name used by a parameter must have a rule (a typo would silently replicate)."""
    known = {name for name, _ in rules}
    used = set()
    for spec in jax.tree.leaves(nn.get_partition_spec(abstract_boxed_tree), is_leaf=lambda s: isinstance(s, P)):
        used.update(a for a in spec if a is not None)
    missing = used - known
    if missing:
        raise ValueError(f"logical axes {sorted(missing)} have no rule in vlm_jax.sharding.RULES")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays are split on their leading dimension over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (this process's rows) -> global sharded arrays (works single- and multi-process)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
