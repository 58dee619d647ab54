"""Two grids side by side: every cell's error with each grid's seed range, the cells where the second grid falls
outside the first's range, the fitted exponents of each, and the cell time each spent.

    python -m launch.compare --a=runs/grid-smoke --b=runs/grid-elastic [--out=compare.json]
"""

import json

from absl import flags

flags.DEFINE_string("a", None, "The reference grid's directory (e.g. the per-V grid).")
flags.DEFINE_string("b", None, "The grid compared with it (e.g. the elastic grid of the same axes).")
flags.DEFINE_string("out", "", "Also write the comparison as JSON here.")
flags.mark_flags_as_required(["a", "b"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from vlm_jax import files
    from vlm_jax.grid import compare

    lines, out = compare.compare(FLAGS.a, FLAGS.b)
    print("\n".join(lines))
    if FLAGS.out:
        files.write_text_atomic(FLAGS.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
