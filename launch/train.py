"""Train one model from a config file.

    python -m launch.train --config=configs/smoke.py[:arg] [--config.train.steps=300 ...]

Overrides of keys that do not exist fail at start (the config is locked); on a multi-host TPU pod every host runs
the same command and `jax.distributed.initialize()` finds the others. Exit status 0: trained to the last step;
75: stopped early on request (SIGTERM, preemption) with its checkpoint committed, run it again to resume.
"""

from absl import flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/smoke.py:tokens=1.", lock_config=True)
flags.DEFINE_string("run_dir", None, "Overrides config.run_dir.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, where jax.distributed cannot find it itself (e.g. CPU processes).")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: how many processes take part.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a run directory even though its saved config.json differs from this config.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from launch import runtime
    from vlm_jax import train

    runtime.start(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    if FLAGS.run_dir:
        with config.unlocked():
            config.run_dir = FLAGS.run_dir
    final = train.run(config, allow_config_change=FLAGS.allow_config_change)
    logging.info("done: %s", final)


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main, reexec=True)   # re-executes this process first, before the config loads
