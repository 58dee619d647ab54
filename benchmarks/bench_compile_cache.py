"""XLA's persistent compilation cache on a re-run of a grid cell.

    python -m benchmarks.bench_compile_cache [--llm=tiny-s] [--tokens=16] [--steps=20] [--questions=40]

One cell of the smoke grid (configs/grid.py: its two stages and its evaluation, exactly as the grid writes them)
runs as `launch.cell` runs it, each time in a fresh process and a fresh folder: with the cache off, into an empty
cache, and again with the cache that run filled (what a re-run grid cell, a resumed run or the same cell in
another grid finds). Steps and questions are cut (the programs compiled do not depend on them), and the first
stage starts from fresh weights instead of the grid's pretrained tower and LLM (the same programs). Prints each
run's wall time, the time XLA spent compiling or loading compiled programs, the cache hits and misses, and the
ratios to the cold run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks.fresh_process import run_python
from vlm_jax.paths import REPO_ROOT

RUN_CELL = """
import json, sys, jax
from launch import runtime
counts, seconds = {}, {}
jax.monitoring.register_event_listener(lambda name, **kw: counts.__setitem__(name, counts.get(name, 0) + 1))
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: seconds.__setitem__(name, seconds.get(name, 0.0) + secs))
runtime.start(distributed=False)
from vlm_jax.grid import cell
cell.run_job(sys.argv[1])
print(json.dumps({"hits": counts.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": counts.get("/jax/compilation_cache/cache_misses", 0),
                  "compile_s": seconds.get("/jax/core/compile/backend_compile_duration", 0.0)}))
"""


def cell_job(llm: str, tokens: int, steps: int, questions: int, grid_dir: str):
    """The smoke grid's spec of cell (llm, tokens), cut to `steps` per stage and `questions` per family."""
    from configs import grid as grid_config
    from configs import models
    from vlm_jax.grid import spec

    grid = grid_config.get_config()
    grid.dir = grid_dir
    grid.llms, grid.tokens, grid.seeds = (llm,), (tokens,), (0,)
    for stage in grid.stages.values():
        stage.train.steps = steps
    grid.eval.synthetic_per_family = questions
    (job,) = spec.cell_jobs(grid, models.llm_config, lambda model_cfg: 0, pretraining=())
    return job


def run_cell(job, cache: str) -> dict:
    """Runs the job in a fresh process, as `launch.cell` does, with the cache folder `cache` ('' = off)."""
    os.makedirs(job.dir)
    with open(os.path.join(job.dir, "job.json"), "w") as f:
        json.dump(job.spec, f)
    env = dict(os.environ, VLM_JAX_COMPILATION_CACHE=cache, PYTHONPATH=REPO_ROOT)
    start = time.perf_counter()
    counts = json.loads(run_python(["-c", RUN_CELL, job.dir], env, "the cell"))
    return dict(counts, wall_s=time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="tiny-s")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="steps per stage (compilation does not depend on it)")
    ap.add_argument("--questions", type=int, default=40, help="evaluation questions per family")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "xla")
        runs = {}
        for i, (label, cache_dir) in enumerate((("cache off", ""), ("cold cache", cache),
                                                ("warm cache (re-run)", cache))):
            job = cell_job(args.llm, args.tokens, args.steps, args.questions, os.path.join(tmp, f"grid{i}"))
            runs[label] = run_cell(job, cache_dir)
            print(f"{label:20} wall {runs[label]['wall_s']:6.1f} s, compiling or loading programs "
                  f"{runs[label]['compile_s']:6.1f} s, cache hits {runs[label]['hits']}, misses "
                  f"{runs[label]['misses']}", flush=True)
        cold, warm = runs["cold cache"], runs["warm cache (re-run)"]
        print(f"cell {args.llm} V={args.tokens}, {args.steps} steps per stage, {args.questions} questions per family: "
              f"re-run / cold wall time {warm['wall_s'] / cold['wall_s']:.2f}, compile time "
              f"{warm['compile_s'] / max(cold['compile_s'], 1e-9):.2f}; cold / off wall time "
              f"{cold['wall_s'] / runs['cache off']['wall_s']:.2f} (writing the cache, less the programs a cell "
              f"compiles twice, loaded the second time)")


if __name__ == "__main__":
    main()
