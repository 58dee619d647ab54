"""What every launcher does first in its process: `run(main)` is how each starts (its __main__ block)."""

import glob
import importlib.util
import logging as pylogging
import os
import platform
import signal
import sys
from collections.abc import Callable, Mapping

from absl import app, logging

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

# Set in the environment by the re-execution, to this process's PID (execve keeps it): a process that finds its own
# PID there was re-executed already and never is again, whatever became of GLIBC_TUNABLES (a loop is impossible).
# Child processes have other PIDs, so they are free to decide for themselves.
REEXEC_SENTINEL = "VLM_JAX_REEXECUTED"


def _program_from_stdin() -> bool:
    """Whether the program was read from standard input (`python -`, `python < f`, a here-document) or typed: running
    the command line again would read a consumed stdin and do nothing. `-c CODE` carries its code in argv: safe."""
    return getattr(sys, "argv", [""])[:1] in (["-"], [""])


def use_huge_pages() -> None:
    """Re-executes this process, same command line and PID, with glibc's malloc backing its memory with transparent
    huge pages (above). Does nothing where it is set already, where VLM_JAX_HUGE_PAGES=0, off Linux/glibc, or in a
    process re-executed once already (REEXEC_SENTINEL). A program read from stdin is not re-executed (it would
    find stdin consumed): a warning says the setting is not applied. Call it first: whatever the process did
    before is done again."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("VLM_JAX_HUGE_PAGES", "1") != "1" or "glibc.malloc.hugetlb" in tunables
            or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
            or not sys.orig_argv):   # an embedded interpreter: no command line to run again
        return
    if os.environ.get(REEXEC_SENTINEL) == str(os.getpid()):
        logging.warning("huge-page malloc not applied: this process was re-executed with GLIBC_TUNABLES=%s, "
                        "but the setting is gone from its environment", HUGE_PAGES_TUNABLE)
        return
    if _program_from_stdin():
        logging.warning("huge-page malloc (%s) not applied: this program was read from standard input, which a "
                        "re-executed process would find empty; run it from a file, or set GLIBC_TUNABLES=%s "
                        "before starting Python", HUGE_PAGES_TUNABLE, HUGE_PAGES_TUNABLE)
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE))),
               **{REEXEC_SENTINEL: str(os.getpid())})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


# libtpu, where installed (requirements-tpu.txt: planning compiles for TPU slices on any machine), is loaded by every
# JAX start that leaves the platform to JAX, which probes for a TPU and, on a machine without one, prints libtpu's
# errors ("could not determine TPU worker hostnames", TPU_WORKER_HOSTNAMES, ...). A TPU shows in device files:
# /dev/accel<N> (v2-v4) or a VFIO group /dev/vfio/<N> (v5e, v5p, v6e). Where there is none, and no GPU either (its
# backend would have to be named too), the launchers default JAX_PLATFORMS to 'cpu'. Planning loads libtpu itself
# (vlm_jax/plan.py: a described slice, not a backend), so it works as before.
TPU_DEVICE_GLOBS = ("accel*", "vfio/*")
GPU_DEVICE_FILES = ("nvidia0", "nvidiactl", "dxg", "kfd")


def tpu_attached(dev: str = "/dev") -> bool:
    """Whether `dev` holds a TPU's device files (the VFIO container /dev/vfio/vfio alone is not one)."""
    found = (path for pattern in TPU_DEVICE_GLOBS for path in glob.glob(os.path.join(dev, pattern)))
    return any(os.path.basename(path) != "vfio" for path in found)


def default_jax_platforms(environ: Mapping[str, str], dev: str = "/dev",
                          libtpu_installed: bool | None = None) -> str | None:
    """'cpu' where JAX, left to choose, would load libtpu to probe for a TPU that is not there (above); None where
    its choice stands: JAX_PLATFORMS (or JAX_FORCE_TPU_INIT) set, no libtpu, or a TPU or GPU device present."""
    if "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ:
        return None
    if libtpu_installed is None:
        libtpu_installed = "TPU_LIBRARY_PATH" in environ or importlib.util.find_spec("libtpu") is not None
    gpu = any(os.path.exists(os.path.join(dev, name)) for name in GPU_DEVICE_FILES)
    if not libtpu_installed or gpu or tpu_attached(dev):
        return None
    return "cpu"


def skip_absent_tpu() -> None:
    """Set JAX_PLATFORMS as default_jax_platforms says, before JAX starts a backend (children inherit it)."""
    platforms = default_jax_platforms(os.environ)
    if platforms is None:
        return
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:   # imported already, so it has read the environment; its backends start later
        sys.modules["jax"].config.update("jax_platforms", platforms)


# run()'s choice for this process; None where start() is called outside run() (tests, benchmarks): it re-executes.
_reexec: bool | None = None


def run(main: Callable, reexec: bool = False) -> None:
    """The one way a launcher starts (its __main__ block): JAX kept off an absent TPU (above); with reexec, the
    huge-page re-execution (use_huge_pages), first, before the flags and the config load; then absl's app.run(main).
    reexec pays in processes that run train steps or convert weights (large temporaries every step): launch.train,
    launch.cell and launch.convert. The others (evaluate, fit, grid, head_params, plan) start once: grid's cells
    are processes of their own, which re-execute themselves."""
    global _reexec
    _reexec = reexec
    skip_absent_tpu()
    if reexec:
        use_huge_pages()
    app.run(with_exit_codes(main))


EXIT_STOPPED = 75   # EX_TEMPFAIL (sysexits.h): stopped on request, resumable; vlm_jax.train.Preempted.EXIT_CODE


def with_exit_codes(main: Callable) -> Callable:
    """`main` with two exits that say "stopped, not finished, run me again" (EXIT_STOPPED), so that neither a grid
    nor a restart policy mistakes them for success or failure: an exception carrying an EXIT_CODE (training's
    Preempted, raised once its checkpoint is committed), and a SIGTERM outside training (evaluation, set-up), which
    ends the process at once. Training replaces that handler while it runs (it stops at a step boundary instead);
    in a multi-host process jax.distributed's own SIGTERM handler replaces it for the whole run."""
    def main_with_exit_codes(argv):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_STOPPED))
        try:
            return main(argv)
        except Exception as e:
            if getattr(e, "EXIT_CODE", None) is None:
                raise
            logging.warning("%s", e)
            sys.exit(e.EXIT_CODE)
    return main_with_exit_codes


def compilation_cache_dir() -> str:
    return os.environ.get("VLM_JAX_COMPILATION_CACHE", DEFAULT_COMPILATION_CACHE)


def start(distributed: bool, coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
    """Re-run with huge-page malloc (above; unless run() said not to), keep JAX off an absent TPU, join the other
    hosts (multi-host TPU/GPU: jax.distributed finds them; elsewhere, e.g. several CPU processes, pass the
    coordinator's address and this process's place), turn on the persistent compilation cache, and log at INFO,
    without the checkpoint library's line per file operation."""
    if _reexec is not False:
        use_huge_pages()
    skip_absent_tpu()
    import jax

    if distributed:
        # jax reads JAX_COORDINATOR_ADDRESS itself; the count and index too where a launcher (the emulated TPU
        # slice, a scheduler) sets them for processes it cannot give flags, so one command serves every host.
        if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
            num_processes = int(os.environ["JAX_NUM_PROCESSES"])
        if process_id is None and os.environ.get("JAX_PROCESS_ID"):
            process_id = int(os.environ["JAX_PROCESS_ID"])
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
