"""The kernel's share of a CPU training run, with glibc's malloc defaults and with huge pages (the launchers').

    python -m benchmarks.bench_host_overhead [--steps=300]

Runs `python -m launch.train --config=configs/smoke.py` for `--steps` steps twice, each in a fresh process and run
folder, once with `VLM_JAX_HUGE_PAGES=0` (glibc's defaults: XLA's step temporaries are mapped and zero-filled in
4 KiB pages anew on every step) and once as the launchers run (`launch/runtime.py`: malloc with transparent huge
pages). Prints each run's kernel (system) and user CPU time, wall time, minor page faults and peak resident memory
(the child's rusage), the kernel's share of the CPU time, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

from benchmarks.fresh_process import run_python
from vlm_jax.paths import REPO_ROOT


def run(steps: int, huge_pages: str, run_dir: str) -> dict:
    """One smoke run in a child process; its own rusage (the difference of RUSAGE_CHILDREN around it)."""
    env = dict(os.environ, VLM_JAX_HUGE_PAGES=huge_pages, VLM_JAX_COMPILATION_CACHE="", PYTHONPATH=REPO_ROOT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run_python(["-m", "launch.train", "--config=configs/smoke.py", f"--config.train.steps={steps}",
                f"--config.run_dir={run_dir}"], env, "the smoke run")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dict(system=after.ru_stime - before.ru_stime, user=after.ru_utime - before.ru_utime, wall=wall,
                faults=after.ru_minflt - before.ru_minflt, peak_mib=after.ru_maxrss / 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, huge_pages in (("glibc defaults", "0"), ("huge pages", "1")):
            r = runs[label] = run(args.steps, huge_pages, os.path.join(tmp, huge_pages))
            print(f"{label:18} kernel {r['system']:6.1f} s  user {r['user']:6.1f} s  wall {r['wall']:6.1f} s  "
                  f"kernel share {r['system'] / (r['system'] + r['user']):.2f}  minor faults {r['faults'] / 1e6:6.2f} M"
                  f"  peak RSS {r['peak_mib']:,.0f} MiB (largest child so far)", flush=True)
    off, on = runs["glibc defaults"], runs["huge pages"]
    print(f"smoke run, {args.steps} steps: kernel time huge pages / defaults {on['system'] / off['system']:.2f}, "
          f"page faults {on['faults'] / off['faults']:.3f}, wall time {on['wall'] / off['wall']:.2f}")


if __name__ == "__main__":
    main()
