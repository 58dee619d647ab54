"""Evaluate the latest checkpoint of a run: synthetic validation families and/or LLaVA-format question files.

    python -m launch.evaluate --run_dir=runs/smoke-tiny-avgpool-v16
    python -m launch.evaluate --run_dir=DIR --nosynthetic --seq_len=256 \\
        --bench=pope:eval/pope/questions.jsonl:eval/pope/answers.jsonl:eval/pope/val2014 \\
        --bench=gqa_testdev@gqa:eval/gqa/questions.jsonl:eval/gqa/answers.jsonl:eval/gqa/images

`--bench` is NAME[@SCORER]:QUESTIONS[:ANSWERS[:IMAGE_DIR]] (the scorer defaults to NAME; see vlm_jax/evaluation/scorers.py).
Predictions and summary.json go to --out_dir (default RUN_DIR/eval); the summary's average_error is
1 - mean score over --error_benchmarks (default: every benchmark evaluated).
"""

from absl import app, flags, logging

flags.DEFINE_string("run_dir", None, "Run directory holding config.json and checkpoints/.")
flags.DEFINE_bool("synthetic", True, "Evaluate the synthetic validation split, one benchmark per family.")
flags.DEFINE_string("families", "", "Synthetic families (comma-separated); '' = the run's data.synthetic.families.")
flags.DEFINE_integer("num_per_family", 500, "Synthetic validation questions per family.")
flags.DEFINE_multi_string("bench", [], "NAME[@SCORER]:QUESTIONS[:ANSWERS[:IMAGE_DIR]] (repeatable).")
flags.DEFINE_integer("batch_size", 32, "Questions per generation batch.")
flags.DEFINE_integer("max_new_tokens", 16, "Generated tokens per answer at most.")
flags.DEFINE_integer("seq_len", 0, "Text budget of a prompt (0 = the run's data.seq_len); raise it for long questions.")
flags.DEFINE_bool("prefix_cache", True, "Compute the chat header's KV cache once and reuse it for every question.")
flags.DEFINE_list("error_benchmarks", [], "Benchmarks averaged into average_error ('' = all).")
flags.DEFINE_string("out_dir", "", "Where predictions and summary.json go ('' = RUN_DIR/eval).")
flags.DEFINE_list("mesh", ["-1", "1", "1"], "Device mesh sizes data,fsdp,tensor for the parameters (one may be -1), "
                  "e.g. 1,-1,1 to shard a large model over every device as in training.")
flags.mark_flags_as_required(["run_dir"])
FLAGS = flags.FLAGS


def parse_bench(spec: str):
    """'NAME[@SCORER]:QUESTIONS[:ANSWERS[:IMAGE_DIR]]' -> (name, scorer, questions, answers, image_dir)."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 4 or not all(parts[:2]):
        raise ValueError(f"--bench={spec!r}: expected NAME[@SCORER]:QUESTIONS[:ANSWERS[:IMAGE_DIR]]")
    name, _, scorer = parts[0].partition("@")
    parts += [""] * (4 - len(parts))
    return name, scorer or name, parts[1], parts[2] or None, parts[3]


def _baseline_columns(base, kind: str) -> str:
    """'chance  majority' of one benchmark (or question kind), '' where the scorer has no baselines."""
    return "" if base is None else f"{base['chance'][kind]:.4f}  {base['majority'][kind]:.4f}"


def main(argv):
    del argv
    import os

    from vlm_jax import evaluation, sharding
    from vlm_jax import state as state_lib
    from vlm_jax.data import pipeline

    logging.set_verbosity(logging.INFO)
    if len(FLAGS.mesh) != 3:
        raise app.UsageError(f"--mesh takes three sizes data,fsdp,tensor; got {','.join(FLAGS.mesh)}")
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, (int(x) for x in FLAGS.mesh))))
    config, params = state_lib.load_params(FLAGS.run_dir, mesh)
    tokenizer = pipeline.make_tokenizer(config.data)
    benchmarks = []
    if FLAGS.synthetic:
        benchmarks += evaluation.synthetic_benchmarks(config.data, config.model.vision.image_size,
                                                      FLAGS.num_per_family, FLAGS.families or None)
    for spec in FLAGS.bench:
        name, scorer, questions, answers, image_dir = parse_bench(spec)
        benchmarks.append(evaluation.llava_benchmark(name, questions, answers, image_dir, scorer))
    if not benchmarks:
        raise app.UsageError("nothing to evaluate: pass --bench or keep --synthetic")
    answerer = evaluation.Answerer(config, params, tokenizer, batch_size=FLAGS.batch_size,
                                   max_new_tokens=FLAGS.max_new_tokens, use_prefix_cache=FLAGS.prefix_cache,
                                   seq_len=FLAGS.seq_len, mesh=mesh)
    out_dir = FLAGS.out_dir or os.path.join(FLAGS.run_dir, "eval")
    summary = evaluation.evaluate(answerer, benchmarks, out_dir, FLAGS.error_benchmarks or None)

    width = max(len(n) for n in summary["scores"])
    print(f"{'benchmark':<{width}}  score   questions  chance  majority  (baselines: answers without the image)")
    for name, score in summary["scores"].items():
        base = summary["baselines"][name]
        print(f"{name:<{width}}  {score:.4f}  {summary['num_questions'][name]:>9}  {_baseline_columns(base, 'all')}")
        kinds = {k[5:]: v for k, v in summary["metrics"][name].items() if k.startswith("kind/")}
        for kind, acc in kinds.items():
            print(f"  {kind:<{width - 2}}  {acc:.4f}  {'':>9}  {_baseline_columns(base, kind)}")
    print(f"average error over {summary['error_benchmarks']}: {summary['average_error']:.4f}")
    print(f"predictions and summary.json in {out_dir}")


if __name__ == "__main__":
    from launch import runtime
    runtime.run(main)
