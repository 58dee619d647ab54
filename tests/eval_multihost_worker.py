"""One process of tests/test_eval_multihost.py, a freshly initialised tiny model: validation metrics
(train.evaluate over the run's eval iterator, as train.run computes them) on LLaVA-format validation files, and
generated answers (evaluation.Answerer, as launch.evaluate runs it), as JSON on stdout.

    python -m tests.eval_multihost_worker --num_processes=2 --process_id=0 --port=PORT NAME=FILE.jsonl ... \
        [--questions=FILE --images=DIR]

With --num_processes=2 the processes join by jax.distributed over localhost (gloo CPU collectives, one device
each) and each reads its own half of every validation file; with 1 it reads all of it. Answers: 6 synthetic
questions in batches of 4, then (--questions) a LLaVA-format question file whose images this process reads from
DIR/p<process id>: the error it raised, if any.
"""

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--questions", default="", help="a LLaVA-format question file")
    parser.add_argument("--images", default="", help="images of --questions are read from IMAGES/p<process id>")
    parser.add_argument("files", nargs="*", help="NAME=PATH of a LLaVA-format validation file")
    args = parser.parse_args()

    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id)
    jax.config.update("jax_threefry_partitionable", True)   # the same initial parameters on any mesh

    import flax.linen as nn  # pylint: disable=import-outside-toplevel

    from tests.test_train_loop import small_config  # pylint: disable=import-outside-toplevel
    from vlm_jax import evaluation, optim, sharding, train  # pylint: disable=import-outside-toplevel
    from vlm_jax import state as state_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    config = small_config("", llm="tiny-xs")
    m, t = config.model, config.train
    mesh = sharding.make_mesh(config.mesh)
    layout = state_lib.state_layout(m, t, mesh)
    state, _, _ = state_lib.create_state(m, t, mesh, jax.random.key(0), (), layout)
    params = optim.merge(state.params, state.frozen)
    eval_step = state_lib.jit_eval_step(config, mesh, layout)
    tokenizer = pipeline.make_tokenizer(config.data)
    results = {}
    for spec in args.files:
        name, path = spec.split("=", 1)
        data_cfg = config.data.copy_and_resolve_references()
        with data_cfg.unlocked():
            data_cfg.source, data_cfg.llava.validation_json_path, data_cfg.read_threads = "llava", path, 1
        it = pipeline.make_eval_iterator(data_cfg, tokenizer=tokenizer, num_visual_tokens=m.compressor.num_tokens,
                                         image_size=m.vision.image_size, batch_size=t.batch_size,
                                         process_index=jax.process_index(), process_count=jax.process_count())
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            results[name] = train.evaluate(eval_step, params, it, mesh)
        results[name]["skipped_here"] = it.bad_input.total
        it.close()

    answerer = evaluation.Answerer(config, params, tokenizer, batch_size=4, max_new_tokens=4, mesh=mesh)
    benchmark, = evaluation.synthetic_benchmarks(config.data, m.vision.image_size, 6, "reasoning")
    results["answers"] = answerer(benchmark.items)
    if args.questions:
        images = os.path.join(args.images, f"p{jax.process_index()}")
        try:
            answerer(evaluation.llava_benchmark("q", args.questions, None, images, "exact_match").items)
            results["questions_error"] = None
        except ValueError as e:
            results["questions_error"] = str(e)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
