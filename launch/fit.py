"""Fit scaling laws to a results table; print the laws with intervals and the compute-optimal frontier; write plots.

    python -m launch.fit --results=grid/results.jsonl [--out=DIR] [--text_tokens=0,64,256]
    python -m launch.fit --demo --out=demo_fit     # a table drawn from known laws, to see it work without data

The results file (CSV or JSONL) has columns llm, n_params, visual_tokens, task, error, and optionally seed and
questions (others are ignored); each task family gets its own fit per law form. The report opens with the decision
(V*, N* per budget, P(beta_a > beta_b)); fit_summary.json ({"decision", "fits"}) and the plots go beside the
results file unless --out says; any of these may be a gs:// path.
"""

import json
import os
import posixpath

from absl import app, flags

flags.DEFINE_string("results", None, "Results table (.csv or .jsonl).")
flags.DEFINE_bool("demo", False, "Fit a synthetic table drawn from known laws instead of --results.")
flags.DEFINE_string("out", "", "Directory for the PNGs and fit_summary.json ('' = beside --results; "
                    "required with --demo).")
flags.DEFINE_list("forms", ["saturating", "multiplicative", "additive"],
                  "Law forms to fit; the first is the decision's (vlm_jax/scaling/laws.py).")
flags.DEFINE_list("text_tokens", ["0", "64", "256"], "Text lengths Q for the frontiers.")
flags.DEFINE_list("budgets", [], "Inference FLOPs budgets (default: 4 spanning the table's own costs).")
flags.DEFINE_float("v_max", 576.0, "Largest V the frontier may choose.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples: cells, then seeds within cells (0: none).")
flags.DEFINE_integer("seed", 0, "Bootstrap seed (families measured on the same cells and seeds share the "
                     "resample indices: their comparison is paired).")
flags.DEFINE_float("level", 0.95, "Confidence level of the intervals.")
flags.DEFINE_float("delta", 1e-3, "Huber delta on log-error residuals.")
flags.DEFINE_bool("plots", True, "Write PNG figures.")
FLAGS = flags.FLAGS


def _floats(name: str, values) -> list[float]:
    try:
        return [float(x) for x in values]
    except ValueError:
        raise app.UsageError(f"--{name} takes comma-separated numbers, got {','.join(values)!r}") from None


def main(argv) -> int:
    del argv
    from configs import models
    from vlm_jax import files, scaling

    if FLAGS.demo == bool(FLAGS.results):
        raise app.UsageError("pass exactly one of --results and --demo")
    if FLAGS.demo and not FLAGS.out:
        raise app.UsageError("--demo needs --out (where the demo table and plots go)")
    # Beside the results; a gs:// folder as it is (abspath would make it a local folder named 'gs:').
    out = FLAGS.out or (posixpath.dirname(FLAGS.results) if files.is_remote(FLAGS.results)
                        else os.path.dirname(os.path.abspath(FLAGS.results)))
    path = FLAGS.results
    if FLAGS.demo:
        path = os.path.join(out, "demo_results.jsonl")
        scaling.tables.write_rows(path, scaling.report.demo_rows(
            {llm: models.llm_param_count(llm) for llm in scaling.report.DEMO_LLMS}, seed=FLAGS.seed))
        print(f"demo: wrote a synthetic table from known laws to {path}")
    summary = scaling.report.fit_tables(
        scaling.load_tables(path), FLAGS.forms, text_tokens=_floats("text_tokens", FLAGS.text_tokens),
        budgets=_floats("budgets", FLAGS.budgets) or None, v_range=(1.0, FLAGS.v_max),
        n_bootstrap=FLAGS.bootstrap, seed=FLAGS.seed, level=FLAGS.level, delta=FLAGS.delta,
        plot_dir=out if FLAGS.plots else None, truths=scaling.report.DEMO_LAWS if FLAGS.demo else None)
    # Not files.write_json_atomic, which sorts keys: the decision stays first.
    files.write_text_atomic(os.path.join(out, "fit_summary.json"),
                            json.dumps(summary, indent=1, allow_nan=False) + "\n")
    n_plots = sum(len(s.get("plots", [])) for forms in summary["fits"].values() for s in forms.values())
    print(f"\nfit_summary.json and {n_plots} plots in {out}/")
    return 0


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
