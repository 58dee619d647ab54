"""CPU time of a smoke-grid cell's training data (the synthetic pipeline), per reader-thread count.

    python -m benchmarks.bench_grid_data [--cell=tiny-s_v16_s1] [--batches=550] [--threads=2,1,0]

Builds the cell's stage-2 iterator as `launch.grid` would (configs/grid.py, default smoke grid) and draws
`--batches` batches (a cell's two stages: 200 + 350) after one warm-up batch, for each `data.read_threads`: CPU
seconds of the whole process (the reader threads included) and wall seconds, as ratios to the first count given.
The first line is the reference: the same records made one by one in a plain loop (the per-record work alone).
It also checks that every count yields the same batches, in the same order.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import ml_collections

from configs import grid as grid_config
from configs import models
from vlm_jax import flops
from vlm_jax.data import pipeline
from vlm_jax.grid import spec


def stage_config(cell_name: str) -> ml_collections.ConfigDict:
    grid = grid_config.get_config("smoke")
    first = spec.pretraining_jobs(grid, models.llm_config)
    cells = spec.cell_jobs(grid, models.llm_config, lambda m: flops.param_counts(m)["llm"], first)
    job = next((c for c in cells if c.name == cell_name), None)
    if job is None:
        raise SystemExit(f"no cell {cell_name!r} in the smoke grid; cells: {', '.join(c.name for c in cells)}")
    return ml_collections.ConfigDict(job.spec["stages"][-1]["config"])


def iterator(cfg, threads: int):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.data.read_threads = threads
    m = cfg.model
    return pipeline.make_train_iterator(cfg.data, tokenizer=pipeline.make_tokenizer(cfg.data),
                                        num_visual_tokens=m.compressor.num_tokens, image_size=m.vision.image_size,
                                        batch_size=cfg.train.batch_size, seed=cfg.seed)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cell", default="tiny-s_v16_s1")
    parser.add_argument("--batches", type=int, default=550)
    parser.add_argument("--threads", default="2,1,0")
    args = parser.parse_args()
    cfg = stage_config(args.cell)
    m = cfg.model
    n_records = args.batches * cfg.train.batch_size

    base, steps = pipeline.make_source(cfg.data, "train", m.vision.image_size)
    encode = pipeline.EncodeExample(pipeline.make_tokenizer(cfg.data),
                                    pipeline.make_layout(cfg.data, m.compressor.num_tokens), m.vision.image_size)
    source = pipeline.ExampleSource(base, [*steps, encode])
    _, wall, cpu = timed(lambda: [source[i] for i in range(n_records)])
    print(f"{args.cell}: {args.batches} batches of {cfg.train.batch_size} ({n_records} records)")
    print(f"  reference, records alone in a loop: {cpu:6.2f} CPU-s {wall:6.2f} s wall "
          f"({1e3 * cpu / n_records:.3f} ms a record)")

    first = None
    for threads in map(int, args.threads.split(",")):
        it = iterator(cfg, threads)
        next(it)   # warm-up
        batches, wall, cpu = timed(lambda it=it: [next(it) for _ in range(args.batches)])
        it.close()
        digest = [hashlib.sha1(b"".join(b[k].tobytes() for k in sorted(b))).hexdigest() for b in batches]
        if first is None:
            first = (cpu, wall, digest)
        same = digest == first[2]
        print(f"  read_threads={threads}: {cpu:6.2f} CPU-s ({cpu / first[0]:.2f}x) {wall:6.2f} s wall "
              f"({wall / first[1]:.2f}x); batches {'the same' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
