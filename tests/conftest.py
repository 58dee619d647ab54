"""Test-session set-up. Runs before JAX is imported by any test module."""

import os

# The test suite compiles many small XLA programs and runs each a few times: compile time dominates, and LLVM's
# backend optimisation passes cost more than they save here (about 3x faster compiles). Training and benchmarks
# keep the default.
_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
