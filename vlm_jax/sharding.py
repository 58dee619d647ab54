"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

Mesh axes are ('data', 'fsdp', 'tensor'): the batch is split over data x fsdp, weights are split over fsdp (their
'embed' dimension) and tensor (heads / MLP / vocab). The rules below are the one place that decides this; layers
only name their axes. A dimension that its mesh axes do not divide is left replicated (a tiny model on a big
mesh still runs); `check_replication` says so loudly, with the bytes it costs, or refuses (`config.mesh.strict`).
"""

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Replicated:
    """A parameter with dimensions that their mesh axes do not divide, left replicated over those axes."""
    path: str
    dims: tuple[tuple[int, int, tuple[str, ...]], ...]   # (dimension, its size, the mesh axes that do not divide it)
    extra_bytes: int   # bytes per device above what the intended sharding would hold


def _fit_spec(spec: P, x, mesh: Mesh, where: str, report: list) -> P:
    """Drop mesh axes from dimensions they do not divide (those dimensions stay replicated); such a parameter is
    appended to `report`."""
    fitted, dropped, intended, kept = [], [], 1, 1
    for i, (dim, axes) in enumerate(zip(x.shape, tuple(spec) + (None,) * (len(x.shape) - len(spec)))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[n] for n in names)
        intended *= ways
        if dim % ways:
            dropped.append((i, dim, names))
            axes, ways = None, 1
        kept *= ways
        fitted.append(axes)
    if dropped:
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        report.append(Replicated(where, tuple(dropped), nbytes // kept - nbytes // intended))
    return P(*fitted)


def logical_to_sharding(abstract_boxed_tree, mesh: Mesh, rules=RULES, report: list | None = None):
    """NamedShardings for a tree whose leaves carry logical axis names (flax `Partitioned` boxes). Dimensions the
    mesh does not divide stay replicated; each is appended to `report` (a list) as a `Replicated`."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.meta.unbox(abstract_boxed_tree)
    paths = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), shapes)
    found = report if report is not None else []
    return jax.tree.map(
        lambda spec, x, path: NamedSharding(mesh, _fit_spec(spec, x, mesh, path, found)),
        mesh_specs, shapes, paths, is_leaf=lambda s: isinstance(s, P))


def check_replication(report: list, strict: bool) -> None:
    """Say loudly which parameters stay replicated because the mesh does not divide them, and how many bytes per
    device that costs (e.g. Qwen1.5-4B's 20 heads on tensor=8); `strict` makes it an error."""
    if not report:
        return
    gib = sum(r.extra_bytes for r in report) / 2**30
    lines = [f"  {r.path}: " + ", ".join(f"dim {i} (size {n}) not divisible by {'x'.join(a)}" for i, n, a in r.dims)
             + f": {r.extra_bytes / 2**20:.1f} MiB more per device" for r in report[:8]]
    more = f"\n  ... and {len(report) - 8} more" if len(report) > 8 else ""
    message = (f"{len(report)} parameter(s) stay replicated over mesh axes that do not divide them: "
               f"{gib:.3f} GiB more per device than the intended sharding\n" + "\n".join(lines) + more)
    if strict:
        raise ValueError(message + "\n(config.mesh.strict=True; choose mesh sizes that divide these dimensions, "
                         "or set it to False to replicate them)")
    logging.warning(message)


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
