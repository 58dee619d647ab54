"""What every training launcher does first in its process."""

import logging as pylogging

from absl import logging


def start(distributed: bool) -> None:
    """Join the other hosts (multi-host TPU/GPU: jax.distributed finds them) and log at INFO, without the
    checkpoint library's line per file operation."""
    import jax

    if distributed:
        jax.distributed.initialize()
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname
                                         or record.levelno >= pylogging.WARNING)
