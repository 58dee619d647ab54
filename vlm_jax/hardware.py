"""The accelerator chips this code knows (one table: bf16 peak, HBM, how JAX and Cloud TPU name them), and the
peak FLOP/s of the local devices, the denominator of MFU. `vlm_jax.plan` sizes TPU slices from the same table."""

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip: a TPU chip (2 TensorCores on v4/v5p) or one GPU."""

    name: str                       # TPU generation as Cloud TPU topologies name it ('v5e'), or the GPU ('h100')
    peak_bf16: float                # dense bf16 FLOP/s per chip (vendor figure; no sparsity)
    hbm_bytes: int                  # HBM per chip
    device_kinds: tuple[str, ...]   # how JAX's `device_kind` names it: lower-case words, matched whole
    # Cloud TPU slices (vlm_jax.plan), for chips it plans for (dims > 0):
    slice_aliases: tuple[str, ...] = ()   # accelerator-type prefixes besides `name` ('v5litepod' in 'v5litepod-16')
    cores_in_name: bool = False     # accelerator-type sizes count TensorCores (2 per chip), not chips ('v5p-32': 16)
    dims: int = 0                   # torus dimensions of the topology ('v5p:2x2x4': 3); 0: not planned for


# Matched in order against `device_kind`, first match wins: JAX names a v5e chip 'TPU v5 lite' and a v5p chip
# 'TPU v5', so each lite entry comes before its generation's. GPUs are named as CUDA does ('NVIDIA H100 80GB HBM3').
CHIPS = (
    # Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v6e, /v5e, /v5p, /v4, /v3): per chip.
    Chip("v6e", 918e12, 32 * GiB, ("v6 lite", "v6e", "v6"), dims=2),
    Chip("v5e", 197e12, 16 * GiB, ("v5 lite", "v5e"), slice_aliases=("v5litepod", "v5lite"), dims=2),
    Chip("v5p", 459e12, 95 * GiB, ("v5p", "v5"), cores_in_name=True, dims=3),
    Chip("v4", 275e12, 32 * GiB, ("v4",), cores_in_name=True, dims=3),
    Chip("v3", 123e12, 32 * GiB, ("v3",)),
    # NVIDIA datasheets (Tensor Core bf16, dense: half the "with sparsity" figure; HBM as stated, in GiB):
    Chip("h200", 989e12, 141 * GiB, ("h200",)),   # H200 SXM: 1,979 TFLOP/s sparse, 141 GB HBM3e
    Chip("h100", 989e12, 80 * GiB, ("h100",)),    # H100 SXM: 1,979 TFLOP/s sparse, 80 GB HBM3
    Chip("a100", 312e12, 80 * GiB, ("a100",)),    # A100: 624 TFLOP/s sparse; 80 GB (the 40 GB part: same peak)
    Chip("l4", 121e12, 24 * GiB, ("l4",)),        # L4: 242 TFLOP/s sparse, 24 GB GDDR6
)


def chip_of(device_kind: str) -> Chip | None:
    """The table's chip for a JAX `device_kind` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'); None if it names none
    (whole words only: 'NVIDIA L40S' is not an L4)."""
    kind = device_kind.lower()
    return next((chip for chip in CHIPS for name in chip.device_kinds
                 if re.search(rf"(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])", kind)), None)


@functools.cache
def measured_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul on device 0: the honest 'peak' where no vendor figure applies.
    Measured once per process (a grid cell's second stage reuses its first's: ~0.4 s each on a 2-core CPU)."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def vendor_peak(device_kind: str) -> float | None:
    """Dense bf16 FLOP/s of the chip `device_kind` names (the table's), or None."""
    chip = chip_of(device_kind)
    return chip.peak_bf16 if chip else None


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the config value if > 0, else a vendor table, else measured."""
    if configured > 0:
        return configured, "config"
    kind = jax.devices()[0].device_kind
    peak = vendor_peak(kind)
    if peak is not None:
        return peak, f"vendor bf16 peak for {kind.lower()!r}"
    return measured_matmul_peak(), f"measured f32 matmul peak on {kind.lower()!r}"
