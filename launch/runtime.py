"""What every training launcher does first in its process."""

import logging as pylogging
import os

from absl import logging

# XLA's compiled programs, kept across processes: a re-run (a resumed run, a grid cell run again) loads its train
# step instead of compiling it. VLM_JAX_COMPILATION_CACHE overrides the folder; '' turns the cache off.
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax", "xla")


def compilation_cache_dir() -> str:
    return os.environ.get("VLM_JAX_COMPILATION_CACHE", DEFAULT_COMPILATION_CACHE)


def start(distributed: bool, coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
    """Join the other hosts (multi-host TPU/GPU: jax.distributed finds them; elsewhere, e.g. several CPU processes,
    pass the coordinator's address and this process's place), turn on the persistent compilation cache, and log at
    INFO, without the checkpoint library's line per file operation."""
    import jax

    if distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes: real cross-process collectives
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    cache = compilation_cache_dir()
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        # Every program, however quick to compile: a tiny model's steps compile in seconds, and add up over a grid.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname
                                         or record.levelno >= pylogging.WARNING)
