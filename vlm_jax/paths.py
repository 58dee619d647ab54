"""Where things are on disk."""

import os

# The repository root: where `launch/` and `configs/` live, and the working directory of every `python -m launch.…`
# a grid job runs (vlm_jax itself never imports launch).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
