"""Peak FLOP/s of the local devices, the denominator of MFU."""

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip/GPU (vendor figures), matched in order as substrings of `device_kind` (lower case).
# JAX names a v5e chip 'TPU v5 lite' and a v5p chip 'TPU v5', so the lite entries come first.
PEAK_BF16 = (
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5", 459e12), ("v4", 275e12),
    ("v3", 123e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12),
)


def measured_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul on device 0: the honest 'peak' where no vendor figure applies."""
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
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_BF16 if key in kind), None)


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the config value if > 0, else a vendor table, else measured."""
    if configured > 0:
        return configured, "config"
    kind = jax.devices()[0].device_kind
    peak = vendor_peak(kind)
    if peak is not None:
        return peak, f"vendor bf16 peak for {kind.lower()!r}"
    return measured_matmul_peak(), f"measured f32 matmul peak on {kind.lower()!r}"
