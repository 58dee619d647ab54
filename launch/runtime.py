"""What every training launcher does first in its process."""

import logging as pylogging
import os
import platform
import sys

from absl import logging

# XLA's compiled programs, kept across processes: a re-run (a resumed run, a grid cell run again) loads its train
# step instead of compiling it. VLM_JAX_COMPILATION_CACHE overrides the folder; '' turns the cache off.
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax", "xla")


# XLA's CPU backend allocates a step's temporaries (163 MiB for the smoke step) on every run of it; glibc's malloc maps
# a block that large afresh and unmaps it on free, so the kernel faults every 4 KiB page in and zero-fills it again:
# 44,000 page faults a step, a third of the smoke run's CPU time. Asked to back its memory with transparent huge pages
# (a glibc tunable, read only when a process starts), malloc gets 2 MiB pages: 512 times fewer faults, and the smoke
# run is 1.35x faster (benchmarks/README.md). Keeping freed blocks in one arena instead (mallopt) removed the faults
# too, but its lock cost as much user time as the kernel saved.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def use_huge_pages() -> None:
    """Re-executes this process, same command line and PID, with glibc's malloc backing its memory with transparent
    huge pages (above). Does nothing where it is set already, where VLM_JAX_HUGE_PAGES=0, or off Linux/glibc. Call it
    first: whatever the process did before is done again."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("VLM_JAX_HUGE_PAGES", "1") != "1" or "glibc.malloc.hugetlb" in tunables
            or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
            or len(sys.orig_argv) < 2):   # an embedded interpreter: no command line to run again
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE))))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def compilation_cache_dir() -> str:
    return os.environ.get("VLM_JAX_COMPILATION_CACHE", DEFAULT_COMPILATION_CACHE)


def start(distributed: bool, coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
    """Re-run with huge-page malloc (above), join the other hosts (multi-host TPU/GPU: jax.distributed finds them;
    elsewhere, e.g. several CPU processes, pass the coordinator's address and this process's place), turn on the
    persistent compilation cache, and log at INFO, without the checkpoint library's line per file operation."""
    use_huge_pages()
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
