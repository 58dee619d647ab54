"""The (LLM size N x visual tokens V) grid: specification, the per-cell runner, backends, results table.

`backends` holds the registry of backends (and `local`); every other backend is a module registering itself there,
imported here so that it is registered whichever part of the grid is imported first.
"""

from vlm_jax.grid import backends, slurm, tpu

__all__ = ["backends", "slurm", "tpu"]
