"""Train one model from a config file.

    python -m launch.train --config=configs/smoke.py[:arg] [--config.train.steps=300 ...]

Overrides of keys that do not exist fail at start (the config is locked); on a multi-host TPU pod every host runs
the same command and `jax.distributed.initialize()` finds the others.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/smoke.py:tokens=1.", lock_config=True)
flags.DEFINE_string("run_dir", None, "Overrides config.run_dir.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    from vlm_jax import train

    if FLAGS.distributed:
        jax.distributed.initialize()
    config = FLAGS.config
    if FLAGS.run_dir:
        with config.unlocked():
            config.run_dir = FLAGS.run_dir
    logging.set_verbosity(logging.INFO)
    # Checkpoint I/O logs every file operation at INFO; keep the console to the training log.
    logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname
                                         or record.levelno >= pylogging.WARNING)
    final = train.run(config)
    logging.info("done: %s", final)


if __name__ == "__main__":
    app.run(main)
