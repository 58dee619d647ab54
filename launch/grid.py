"""Train and evaluate every (LLM size N x visual tokens V) cell of a grid, fit the scaling law, draw the surface.

    python -m launch.grid --config=configs/grid.py                       # the smoke grid, on this machine
    python -m launch.grid --config=configs/grid.py:paper --dry_run       # every command of the paper grid, in order
    python -m launch.grid --config=configs/grid.py --only='tiny-l_*'     # a subset of cells (fnmatch patterns)
    python -m launch.grid --config=configs/grid.py --retry_failed        # only the cells that failed before

Re-running resumes: finished cells are skipped, interrupted ones continue; a cell another launcher is running is
waited for (--if_owned=skip: skipped), never started twice. Writes CONFIG.dir/results.jsonl,
summary.json, report.txt and plots/ (see vlm_jax/grid/).
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/grid.py", "Grid config, e.g. configs/grid.py:paper.",
                                lock_config=True)
flags.DEFINE_list("only", [], "Run only the cells whose names match these fnmatch patterns (e.g. 'tiny_v*').")
flags.DEFINE_bool("retry_failed", False, "Run only the cells that failed before.")
flags.DEFINE_bool("dry_run", False, "Print every command, in order, and run nothing.")
flags.DEFINE_bool("fit_only", False, "Run no job; rebuild the table, fit and plot from the finished cells.")
flags.DEFINE_enum("if_owned", "wait", ["wait", "skip"],
                  "A cell another live process owns (another launcher's, on the same grid): wait for it and take its "
                  "result, or skip it. Either way it is left to the end, and never run twice at once.")
FLAGS = flags.FLAGS


def fitting_cells(grid, cells):
    """The cells whose every stage compiles and fits its TPU slice (checked here, ahead of time, before any gcloud
    command); the others are recorded failed with the reason and not provisioned. Each verdict is kept in the cell's
    plan.json (keyed by its spec and slice), so a re-run does not compile again."""
    import os

    from vlm_jax import files, plan
    from vlm_jax.grid import results, runner, tpu

    if not plan.is_ready():
        raise app.UsageError("the tpu backend first compiles every cell for its slice, which needs libtpu: "
                             "pip install -r requirements-tpu.txt (or --config.tpu.plan=False to skip the check)")
    print(f"checking that {len(cells)} cells fit their TPU slices before provisioning any ...", flush=True)
    kept = []
    for job in cells:
        key = {"spec": results.spec_digest(job.spec), "slice": tpu.accelerator_type(grid.tpu, job.name)}
        path = os.path.join(job.dir, "plan.json")
        cached = results.read_json(path) if results.exists(path) else {}
        if cached.get("key") == key:
            reason = cached["unfit"]
        else:
            reason = plan.why_unfit(job.spec["stages"], key["slice"])
            files.write_json_atomic(path, {"key": key, "unfit": reason})
        if reason:
            print(f"not provisioning {job.name}: {reason} (python -m launch.plan suggests a fix)")
            runner.refuse(job, f"does not fit its TPU slice: {reason}")
        else:
            kept.append(job)
    return kept


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)   # the launcher prints its own progress; cells log to their log.txt
    from configs import models
    from vlm_jax import flops
    from vlm_jax.grid import backends, report, runner, spec

    grid = FLAGS.config
    backend = backends.make(grid.backend, grid.get(grid.backend))
    n_params = lambda model_cfg: flops.param_counts(model_cfg)["llm"]  # noqa: E731
    pretraining = spec.pretraining_jobs(grid, models.llm_config)
    cells = spec.cell_jobs(grid, models.llm_config, n_params, pretraining)
    if FLAGS.dry_run:
        runner.dry_run(pretraining + cells, backend, print)
        return
    if not FLAGS.fit_only:
        todo, notes = runner.select(pretraining + cells, FLAGS.only, FLAGS.retry_failed)
        for note in notes:
            print(note)
        todo_first = [j for j in todo if not j.is_cell]
        todo_cells = [j for j in todo if j.is_cell]
        if grid.backend == "tpu" and grid.tpu.plan and todo_cells:
            todo_cells = fitting_cells(grid, todo_cells)
        parallel = grid.parallel
        if getattr(backend, "slots", None) and parallel > backend.slots:
            print(f"config.parallel={parallel}, but the devices make {backend.slots} group(s) of "
                  f"config.local.devices_per_cell: {backend.slots} at a time")
            parallel = backend.slots
        shape = (f"{len(cells)} cells ({len(grid.llms)} LLMs x {len(grid.tokens)} V x {len(grid.seeds)} seeds)"
                 if not spec.elastic_mode(grid) else
                 f"{len(cells)} {spec.training_label(grid)} models ({len(grid.llms)} LLMs x {len(grid.seeds)} seeds, "
                 f"each evaluated at V = {', '.join(map(str, sorted(grid.tokens)))})")
        print(f"grid {grid.dir}: {shape}, {len(todo_cells)} to run, {parallel} at a time on '{grid.backend}'"
              + (f", after {len(todo_first)} pretraining job(s)" if todo_first else ""), flush=True)
        progress = runner.run_jobs(todo_first, todo_cells, backend, parallel,
                                   echo=lambda line: print(line, flush=True), if_owned=FLAGS.if_owned)
        if progress.failed:
            print(f"{progress.failed} job(s) failed: see their result.json and log.txt; "
                  f"re-run with --retry_failed after fixing the cause")
    report.write_report(grid.dir, cells, grid.fit)
    print(f"\nresults.jsonl, summary.json, report.txt and plots/ in {grid.dir}")


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
