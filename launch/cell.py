"""Run one job of a grid (a cell's stages and evaluation, or the tower pretraining) from its job.json.

    python -m launch.cell --job_dir=runs/grid-smoke/cells/tiny_v16

`launch.grid` writes job.json and runs this command through its backend (here, or on every host of a TPU slice
with --distributed). Re-running it resumes: finished stages are skipped, an interrupted one continues from its
last checkpoint.
"""

from absl import flags, logging

flags.DEFINE_string("job_dir", None, "Directory holding job.json.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
flags.mark_flags_as_required(["job_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from launch import runtime
    from vlm_jax.grid import cell

    runtime.start(FLAGS.distributed)
    result = cell.run_job(FLAGS.job_dir)
    logging.info("job done: %s", {k: v for k, v in result.items() if k != "rows"})


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main, reexec=True)   # re-executes this process first, before the config loads
