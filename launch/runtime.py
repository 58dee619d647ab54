"""What every training launcher does first in its process."""

import ctypes
import logging as pylogging
import os

from absl import logging

# XLA's compiled programs, kept across processes: a re-run (a resumed run, a grid cell run again) loads its train
# step instead of compiling it. VLM_JAX_COMPILATION_CACHE overrides the folder; '' turns the cache off.
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax", "xla")


# glibc's malloc gives each thread an arena of heaps of at most 64 MiB; a larger block, such as the temporaries XLA's
# CPU backend allocates for every run of a step (163 MiB for the smoke step), is mmap-ed and unmapped again each
# time, and the kernel zero-fills every page anew: 44,000 page faults a step, a third of the smoke run's CPU time.
# One arena that never maps, nor trims below 2 GiB, keeps those pages from step to step (benchmarks/README.md).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8   # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse (above); False where there is no glibc. Must run before
    the threads that allocate exist: before JAX starts its backend."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    except (OSError, AttributeError):
        return False


def compilation_cache_dir() -> str:
    return os.environ.get("VLM_JAX_COMPILATION_CACHE", DEFAULT_COMPILATION_CACHE)


def start(distributed: bool, coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
    """Keep freed memory in malloc (above), join the other hosts (multi-host TPU/GPU: jax.distributed finds them;
    elsewhere, e.g. several CPU processes, pass the coordinator's address and this process's place), turn on the
    persistent compilation cache, and log at INFO, without the checkpoint library's line per file operation."""
    if os.environ.get("VLM_JAX_KEEP_FREED_MEMORY", "1") == "1":   # '0' leaves malloc as it is
        keep_freed_memory()
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
