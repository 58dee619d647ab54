"""Plan a grid for Cloud TPU from any machine: compile every cell's stages for its slice, before spending.

    pip install -r requirements-tpu.txt        # libtpu: JAX then compiles for TPU topologies it does not have
    python -m launch.plan --config=configs/grid.py:paper --topology=v5p-32
    python -m launch.plan --config=configs/grid.py:paper,llms=qwen1.5-7b,tokens=576 --topology=v5p-16 --mfu=0.5

Prints, per cell and stage: the mesh, HBM per device (arguments / temporaries / total against the chip's capacity),
whether it fits, compile time, step FLOPs (vlm_jax.flops), and the step time, hours and chip-hours at --mfu; an
elastic-V stage's memory is that of its heaviest program, named at the row's end (e.g. 'm3 over V=(1, 4, 16)'). A
stage that does not fit is recompiled with full rematerialisation, then on larger slices, and the first change that
fits is shown. Without --topology, each cell gets the slice the grid's tpu backend would provision for it.
"""

import json
import os

# Planning compiles for a described TPU and runs nothing here: keep JAX on the CPU (with libtpu installed and no TPU
# attached, JAX would otherwise probe for one and warn at start-up).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/grid.py:paper", "Grid config.", lock_config=True)
flags.DEFINE_string("topology", "", "Cloud TPU slice for every cell, e.g. v5p-32 ('' = the grid's tpu settings).")
flags.DEFINE_float("mfu", None, "Assumed model FLOPs utilisation for time estimates (default vlm_jax.plan's).")
flags.DEFINE_list("only", [], "Plan only the cells whose names match these fnmatch patterns.")
flags.DEFINE_bool("try_fixes", True, "For a stage that does not fit, try remat and larger slices.")
flags.DEFINE_string("out", "", "Also write the rows as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import fnmatch

    from configs import models
    from vlm_jax import flops, plan
    from vlm_jax.grid import spec, tpu

    grid = FLAGS.config
    mfu = plan.DEFAULT_MFU if FLAGS.mfu is None else FLAGS.mfu
    cells = spec.cell_jobs(grid, models.llm_config, lambda m: flops.param_counts(m)["llm"], [])
    cells = [c for c in cells if not FLAGS.only or any(fnmatch.fnmatchcase(c.name, p) for p in FLAGS.only)]
    if FLAGS.topology:
        slice_for = lambda name: FLAGS.topology  # noqa: E731
    else:
        tpu_cfg = grid.get("tpu") or tpu.default_config()
        slice_for = lambda name: tpu.accelerator_type(tpu_cfg, name)  # noqa: E731
    rows = plan.plan_jobs(cells, slice_for, mfu, FLAGS.try_fixes)
    if FLAGS.out:
        from vlm_jax import files
        files.write_text_atomic(FLAGS.out, json.dumps(rows, indent=2))


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
