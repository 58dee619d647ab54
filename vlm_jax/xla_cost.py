"""What XLA's cost analysis says a function computes, without running it."""

import jax


def xla_flops(fn, *abstract_args) -> float:
    """FLOPs XLA's cost analysis assigns to jit(fn) over abstract inputs (jax.ShapeDtypeStruct; nothing runs).

    Lowered for the CPU: the count is the program's, not the chip's, and on a GPU (jax 0.11 with the CUDA plugin)
    the analysis of a program lowered for the GPU comes back empty."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:   # JAX_PLATFORMS names no cpu: the default device's analysis
        cpu = None
    with jax.default_device(cpu):
        cost = jax.jit(fn).lower(*abstract_args).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        raise ValueError(f"XLA cost analysis of {getattr(fn, '__name__', fn)!r} reported no 'flops': {cost}")
    return float(cost["flops"])
