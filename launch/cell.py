"""Run one job of a grid (a cell's stages and evaluation, or the tower pretraining) from its job.json.

    python -m launch.cell --job_dir=runs/grid-smoke/cells/tiny_v16

`launch.grid` writes job.json and runs this command through its backend (here, or on every host of a TPU slice
with --distributed). Re-running it resumes: finished stages are skipped, an interrupted one continues from its
last checkpoint. It owns the directory while it runs (DIR/owner.json, vlm_jax/grid/ownership.py; taken over from the
launcher, which holds it while the job starts): where another live process owns it, it exits at once with code 73
and writes nothing.
"""

import sys

from absl import flags, logging

flags.DEFINE_string("job_dir", None, "Directory holding job.json.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
flags.mark_flags_as_required(["job_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from vlm_jax.grid import backends

    backends.forward_parent_death()   # the launcher died (local backend): checkpoint and exit, once

    from launch import runtime
    from vlm_jax.grid import cell, ownership

    runtime.start(FLAGS.distributed)
    import jax

    try:   # process 0 holds the lock for the whole slice
        with ownership.held(FLAGS.job_dir, holder=jax.process_index() == 0, agree=ownership.agree_across_processes):
            result = cell.run_job(FLAGS.job_dir)
    except ownership.Owned as e:
        logging.warning("%s: not started (another process is running this job)", e)
        sys.exit(ownership.EXIT_OWNED)
    logging.info("job done: %s", {k: v for k, v in result.items() if k not in ("rows", "router")})


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main, reexec=True)   # re-executes this process first, before the config loads
