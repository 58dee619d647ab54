"""Run one grid job in this process: its training stages in order, then (for a cell) the evaluation, then write
`result.json` — the rows (one per task) that the results table collects. `python -m launch.cell --job_dir=DIR`.

Each stage is an ordinary `train.run` with its own run directory, so a killed job resumes inside a stage from the
stage's last checkpoint and skips finished stages; the result is written last and atomically, so a job counts as
done only when everything before it finished.
"""

from __future__ import annotations

import logging
import os
import time

import ml_collections
import numpy as np

from vlm_jax import checkpoints, elastic, files, flops, train
from vlm_jax import state as state_lib
from vlm_jax.grid import ownership, results

log = logging.getLogger(__name__)


def read_spec(job_dir: str) -> dict:
    return results.read_json(os.path.join(job_dir, "job.json"))


def stage_finished(cfg: ml_collections.ConfigDict) -> bool:
    """Whether a stage's final checkpoint is committed (its metrics log is appended before the last save commits,
    so it cannot say). A finished stage whose saved config differs from `cfg` is an error naming the keys: its
    checkpoint is not what this job would train, and the stages after it would silently start from it."""
    step = checkpoints.committed_step(checkpoints.directory(cfg.run_dir))
    if step is None or step < cfg.train.steps:
        return False
    changes = train.saved_config_changes(cfg)
    if changes:
        raise ValueError(f"{cfg.run_dir} holds a finished stage trained with another config:\n  "
                         + "\n  ".join(changes) + "\nDelete that directory to retrain it, or restore the config")
    return True


_NOT_FINISHED, _FINISHED, _CONFIG_CHANGED = 0, 1, 2


_from_process_0 = ownership.from_process_0


def stage_finished_everywhere(cfg: ml_collections.ConfigDict) -> bool:
    """`stage_finished` as process 0 sees it, on every process. Each process reading the folder itself can see it
    at another moment (process 0 creates it as it starts the stage), and processes that disagree enter different
    collectives and fail."""
    try:
        state, error = (_FINISHED if stage_finished(cfg) else _NOT_FINISHED), None
    except ValueError as e:
        state, error = _CONFIG_CHANGED, e
    agreed = _from_process_0(state)
    if agreed == _CONFIG_CHANGED:
        raise error or ValueError(f"{cfg.run_dir} holds a finished stage trained with another config (see process 0)")
    return agreed == _FINISHED


def run_stages(spec: dict) -> float:
    """Train every stage not yet finished; returns the seconds spent training in this call. A stage stopped early
    (preemption) raises train.Preempted: the job ends there, resumable, and records nothing."""
    seconds = 0.0
    for stage in spec["stages"]:
        cfg = ml_collections.ConfigDict(stage["config"])
        if stage_finished_everywhere(cfg):
            log.info("stage %s: already finished, skipped", stage["name"])
            continue
        start = time.perf_counter()
        log.info("stage %s: training %d steps -> %s", stage["name"], cfg.train.steps, cfg.run_dir)
        train.run(cfg)
        seconds += time.perf_counter() - start
    return seconds


def evaluate_cell(spec: dict, tokens=(None,), per_item: dict | None = None) -> dict:
    """{V: {task: {accuracy, benchmarks: {name: score}, questions}}} from the last stage's checkpoint, answered at
    each V of `tokens` (an elastic model; predictions then in eval-v{V}/; None: the model's own V, in eval/). The
    checkpoint and the benchmarks are loaded once for every V. per_item: filled with {V: {task: (credits float[Q],
    confidences float[Q])}} over the task's benchmarks (the router's inputs)."""
    from vlm_jax.data import pipeline
    from vlm_jax.evaluation import Answerer, evaluate, llava_benchmark, synthetic_benchmarks

    e = spec["eval"]
    run_dir = spec["stages"][-1]["config"]["run_dir"]
    config, params = state_lib.load_params(run_dir)
    benchmarks = []
    if e["synthetic_per_family"]:
        benchmarks += synthetic_benchmarks(config.data, config.model.vision.image_size, e["synthetic_per_family"])
    root = lambda path: os.path.join(e["data_root"], path) if path else None  # noqa: E731
    for name, (scorer, questions, answers, image_dir) in sorted(e["benchmarks"].items()):
        benchmarks.append(llava_benchmark(name, root(questions), root(answers), root(image_dir) or "", scorer))
    tokenizer = pipeline.make_tokenizer(config.data)
    out = {}
    for v in tokens:
        answerer = Answerer(config, params, tokenizer, batch_size=e["batch_size"], max_new_tokens=e["max_new_tokens"],
                            seq_len=e["seq_len"], num_tokens=v)
        items: dict = {}
        summary = evaluate(answerer, benchmarks, os.path.join(os.path.dirname(run_dir), f"eval-v{v}" if v else "eval"),
                           per_item=items)
        tasks = {}
        for task, names in sorted(e["tasks"].items()):
            names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
            missing = [n for n in names if n not in summary["scores"]]
            if missing:
                raise ValueError(f"eval.tasks.{task} names benchmarks that were not evaluated: {missing}; "
                                 f"evaluated: {sorted(summary['scores'])}")
            tasks[task] = {"accuracy": float(np.mean([summary["scores"][n] for n in names])),
                           "benchmarks": {n: summary["scores"][n] for n in names},
                           "questions": int(sum(summary["num_questions"][n] for n in names))}
            if per_item is not None:
                per_item.setdefault(v, {})[task] = tuple(np.concatenate([items[n][i] for n in names]) for i in (0, 1))
        out[v] = tasks
    return out


def measured_error(accuracy: float, questions: int) -> float:
    """1 - accuracy, or half a question when no answer was wrong: the law is fitted in log error, and a zero error
    measured on n questions says only that the rate is below about 1/n (0.5 / n is the usual correction for a zero
    count). A floor far below 1/n would claim a precision the evaluation does not have and let those cells
    dominate the fit; at or above one wrong answer, the measured error is kept as it is."""
    return max(1.0 - accuracy, 0.5 / max(questions, 1))


def table_rows(row: dict, tasks: dict, model_cfg, text_tokens: int) -> list[dict]:
    """The results-table rows of one evaluated model at one V (one per task)."""
    infer = flops.inference_flops(model_cfg, text_tokens=text_tokens)
    # (no times in the rows: the table is the same bitwise whenever the training is; result.json keeps them)
    return [dict(row, task=task, error=measured_error(t["accuracy"], t["questions"]), accuracy=t["accuracy"],
                 benchmarks=t["benchmarks"], questions=t["questions"], inference_flops=infer,
                 text_tokens=text_tokens) for task, t in tasks.items()]


def router_sweeps(per_v: dict, model_cfg, text_tokens: int) -> dict:
    """Adaptive V over the elastic model's answers at every V (evaluation.router): {'tokens', 'flops' (one answer's
    2 N (Q + V) at each V, as the law counts FLOPs), 'text_tokens', 'sweeps': {ladder '1+4+64': {task, and 'mixed'
    (every task's questions together): the threshold sweep}}} for every ladder from the smallest V to the largest."""
    from vlm_jax.evaluation import router

    tokens = sorted(per_v)
    cost = {v: flops.inference_flops(elastic.fixed_model(model_cfg, v), text_tokens=text_tokens, llm_only=True)
            for v in tokens}
    tasks = sorted(per_v[tokens[0]])
    sweeps = {}
    for ladder in router.ladders(tokens):
        stacked = {task: [np.stack([per_v[v][task][i] for v in ladder]) for i in (0, 1)] for task in tasks}
        stacked["mixed"] = [np.concatenate([stacked[t][i] for t in tasks], axis=1) for i in (0, 1)]
        sweeps["+".join(map(str, ladder))] = {
            task: router.sweep(credits, conf, [cost[v] for v in ladder]) for task, (credits, conf) in stacked.items()}
    return {"tokens": tokens, "flops": [cost[v] for v in tokens], "text_tokens": text_tokens, "sweeps": sweeps}


def run_job(job_dir: str) -> dict:
    """Run the job in `job_dir` to completion and write its result.json; returns the result. An elastic cell
    (spec['rows'], one per V) is evaluated at every V, and the router's sweeps over those answers are kept."""
    spec = read_spec(job_dir)
    start = time.perf_counter()
    train_s = run_stages(spec)
    result = {"status": "ok", "spec_digest": results.spec_digest(spec), "train_s": round(train_s, 1)}
    model_cfg = ml_collections.ConfigDict(spec["stages"][-1]["config"]["model"])
    q = int(spec["eval"]["text_tokens"]) if spec["eval"] else 0
    if spec.get("rows"):   # elastic: one model, every V of its set
        per_v: dict = {}
        by_v = evaluate_cell(spec, tokens=[int(row["visual_tokens"]) for row in spec["rows"]], per_item=per_v)
        result["rows"] = [r for row in spec["rows"] for r in table_rows(
            row, by_v[int(row["visual_tokens"])], elastic.fixed_model(model_cfg, int(row["visual_tokens"])), q)]
        result["accuracy"] = {f"{r['task']}@V={r['visual_tokens']}": r["accuracy"] for r in result["rows"]}
        result["router"] = router_sweeps(per_v, model_cfg, q)
    elif spec["eval"]:
        tasks = evaluate_cell(spec)[None]
        result["accuracy"] = {task: t["accuracy"] for task, t in tasks.items()}
        if spec["row"] is not None:
            result["rows"] = table_rows(spec["row"], tasks, model_cfg, q)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    files.write_json_atomic(os.path.join(job_dir, "result.json"), result)
    return result
