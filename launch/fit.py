"""Fit scaling laws to a results table; print the laws with intervals and the compute-optimal frontier; write plots.

    python -m launch.fit --results results.jsonl [--out scaling_out] [--text_tokens 0,64,256]
    python -m launch.fit --demo        # a synthetic table from known laws, to see it work without data

The results file (CSV or JSONL) has columns llm, n_params, visual_tokens, task, error (others are ignored); each
task family gets its own fit per law form.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from vlm_jax import plots, scaling, scaling_report, scaling_table


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m launch.fit", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", help="results table (.csv or .jsonl)")
    src.add_argument("--demo", action="store_true", help="fit a synthetic table drawn from known laws")
    p.add_argument("--out", default="scaling_out", help="directory for the PNGs (and the demo table)")
    p.add_argument("--forms", default="multiplicative,additive", help="law forms to fit, comma-separated")
    p.add_argument("--text_tokens", type=_floats, default=[0.0, 64.0, 256.0], help="text lengths Q for frontiers")
    p.add_argument("--budgets", type=_floats, default=None,
                   help="inference FLOPs budgets (default: 4 spanning the table's own costs)")
    p.add_argument("--v_max", type=float, default=576.0, help="largest V the frontier may choose")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log-error residuals")
    p.add_argument("--no_plots", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    forms = [scaling.get_form(f.strip()) for f in args.forms.split(",") if f.strip()]
    if args.demo:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "demo_results.jsonl")
        scaling_table.write_rows(path, scaling_report.demo_rows(seed=args.seed))
        print(f"demo: wrote a synthetic table from known laws to {path}")
    else:
        path = args.results
    tables = scaling_table.load_tables(path)
    v_range = (1.0, args.v_max)
    written = []
    for task, table in tables.items():
        print(f"\n=== task {task!r}: {len(table)} cells; N = {', '.join(f'{n:.3g}' for n in table.n_values)} B; "
              f"V = {', '.join(f'{v:g}' for v in table.v_values)}")
        for form in forms:
            start = time.perf_counter()
            fit = scaling.fit_law(table, form, n_bootstrap=args.bootstrap, seed=args.seed, delta=args.delta,
                                  level=args.level)
            truth = None
            if args.demo and scaling_report.DEMO_LAWS.get(task, ("",))[0] == form.name:
                truth = scaling_report.DEMO_LAWS[task][1]
            print(scaling_report.format_fit(fit, truth) + f"   [{time.perf_counter() - start:.2f} s]")
            for q in args.text_tokens:
                budgets = args.budgets or scaling_report.default_budgets(fit, q)
                print(scaling_report.format_frontier(fit, budgets, q, v_range=v_range))
            middle = float(np.sqrt(np.prod(scaling_report.default_budgets(fit, max(args.text_tokens), 2))))
            print(scaling_report.format_v_by_q(fit, args.budgets[0] if args.budgets else middle,
                                               sorted(set(args.text_tokens) | {0.0, 16.0, 64.0, 256.0, 1024.0}),
                                               v_range=v_range))
            if not args.no_plots:
                written += plots.write_plots(fit, args.out, text_tokens=args.text_tokens, v_range=v_range)
    if written:
        print(f"\nwrote {len(written)} plots to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
