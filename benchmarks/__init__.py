"""Speed and memory benchmarks (`python -m benchmarks.<name>`; README.md in this folder keeps the measured tables)."""

from launch import runtime

# Before any benchmark imports JAX: with libtpu installed and no TPU here, JAX would otherwise probe for one and print
# libtpu's errors (the launchers do the same through runtime.run).
runtime.skip_absent_tpu()
