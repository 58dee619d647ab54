"""Evaluation: answer a benchmark's questions with a checkpoint, score them, summarise the downstream error.

A benchmark is a list of `EvalItem`s (image, user prompt, ground-truth record) plus the name of its scorer
(vlm_jax/evaluation/scorers.py). Two kinds of source:

- the built-in synthetic validation split, one benchmark per task family (`synthetic/reasoning`, `synthetic/ocr`),
  the same items the training pipeline's validation source draws, scored by exact match;
- question files in the LLaVA evaluation format: JSONL (or a JSON list) of `{question_id, image, text, ...}`, the
  image relative to an image folder, plus an optional answers file of `{question_id, answer | answers | label, ...}`
  records (fields per scorer; see scorers.py). Each question's reference is its question record updated with its
  answer record, so fields such as POPE's `category` may sit in either file. A question text without `<image>`
  gets it prepended (LLaVA puts the image first).

`evaluate` writes `<name>.predictions.jsonl` per benchmark and `summary.json`; the summary's `average_error`,
1 - mean headline score over the chosen benchmarks, is what the scaling-law fit consumes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax import files, sharding
from vlm_jax.evaluation import generate, router, scorers
from vlm_jax.data import batching, errors, images, pipeline, synthetic
from vlm_jax.data.tokenize import IMAGE_PLACEHOLDER, USER, Tokenizer, render_chat
from vlm_jax.models import vlm

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One question. image: uint8[H, W, 3], a file path, or None (text-only); prompt: the user turn with <image>."""

    question_id: Any
    image: Any
    prompt: str
    reference: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    scorer: str
    items: Sequence[EvalItem]


# ----------------------------------------------------------------------------------------------------------------------
# Sources.


def synthetic_benchmarks(data_cfg: ml_collections.ConfigDict, image_size: int, num_per_family: int,
                         families: str | Sequence[str] | None = None) -> list[Benchmark]:
    """One exact-match benchmark per synthetic family: validation items 0..num_per_family-1."""
    if num_per_family < 1:
        raise ValueError(f"num_per_family must be >= 1, got {num_per_family}")
    s = data_cfg.synthetic
    # The options the run's validation source draws with, so evaluation asks what training was asked about.
    options = synthetic.SyntheticOptions.from_config(s, image_size=image_size, split="validation")
    out = []
    for family in synthetic.parse_families(families or s.families):
        examples = synthetic.make_examples("validation", family, num_per_family, options)
        items = [EvalItem(e.id, e.image, e.prompt,
                          {"question_id": e.id, "question": e.question, "answer": e.answer, "kind": e.kind})
                 for e in examples]
        out.append(Benchmark(f"synthetic/{family}", "exact_match", items))
    return out


def read_records(path: str) -> list[dict]:
    """Records of a JSONL file or a JSON list; a bad line raises ValueError naming file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
    for n, r in enumerate(records):
        if not isinstance(r, dict) or "question_id" not in r:
            raise ValueError(f"{path}: record {n} has no 'question_id': {str(r)[:120]}")
    return records


def llava_benchmark(name: str, question_file: str, answers_file: str | None = None, image_dir: str = "",
                    scorer: str | None = None) -> Benchmark:
    """A benchmark from LLaVA-format question (and answers) files; `scorer` defaults to `name`."""
    scorer = scorer or name
    scorers.get(scorer)  # fail now on an unknown scorer
    questions = read_records(question_file)
    seen = collections.Counter(str(q["question_id"]) for q in questions)
    dups = [k for k, c in seen.items() if c > 1]
    if dups:
        raise ValueError(f"{question_file}: duplicate question_id(s) {dups[:5]}")
    answers = {str(a["question_id"]): a for a in read_records(answers_file)} if answers_file else {}
    missing = [q["question_id"] for q in questions if answers_file and str(q["question_id"]) not in answers]
    if missing:
        raise ValueError(f"{answers_file}: no answer for {len(missing)} question(s), e.g. {missing[:5]}")
    items = []
    for q in questions:
        if "text" not in q:
            raise ValueError(f"{question_file}: question {q['question_id']!r} has no 'text'")
        text = q["text"]
        image = None
        if q.get("image"):
            try:
                image = images.path_inside(image_dir, str(q["image"]))
            except errors.BadRecord as e:
                raise ValueError(f"{question_file}: question {q['question_id']!r}: {e}") from None
            if IMAGE_PLACEHOLDER not in text:
                text = f"{IMAGE_PLACEHOLDER}\n{text}"
        reference = dict(q, **answers.get(str(q["question_id"]), {}))
        items.append(EvalItem(q["question_id"], image, text, reference))
    return Benchmark(name, scorer, items)


# ----------------------------------------------------------------------------------------------------------------------
# Answering.


def chat_prefix_tokens(tokenizer: Tokenizer, system_prompt: str = "") -> np.ndarray:
    """int32[P]: the tokens every prompt starts with (system turn and user header), cacheable once."""
    ids, _, slots = render_chat(tokenizer, [(USER, IMAGE_PLACEHOLDER)], num_visual_tokens=1,
                                system_prompt=system_prompt)
    return np.asarray(ids[:slots[0]], np.int32)


def _load_image(item: EvalItem, image_size: int, aspect_ratio: str):
    if item.image is None:
        return None
    try:
        return images.preprocess(item.image, image_size, aspect_ratio)
    except errors.BadRecord as e:
        raise ValueError(f"question {item.question_id!r}: {e}") from None


def _fetch(tree):
    """Host copies of jitted outputs, those spread over several processes' devices (a multi-host mesh) too."""
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True) if isinstance(x, jax.Array)
                        and not x.is_fully_addressable else jax.device_get(x), tree)


class Answerer:
    """Greedy answers for EvalItems in fixed-shape batches (the last batch is padded by repeating its last item,
    so one compiled program serves a whole benchmark)."""

    def __init__(self, config: ml_collections.ConfigDict, params, tokenizer: Tokenizer, *, batch_size: int = 32,
                 max_new_tokens: int = 16, use_prefix_cache: bool = True, seq_len: int = 0, mesh=None,
                 num_tokens: int | None = None):
        """mesh: the device mesh `params` are sharded over (vlm_jax.state.load_params(run_dir, mesh)); generation then runs
        partitioned over it, so a model too big for one device is evaluated as it was trained. None: one device.
        num_tokens: the V an elastic model answers with (a V of model.compressor.nested_tokens); default
        model.compressor.num_tokens."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config, self.params, self.tokenizer, self.batch_size = config, params, tokenizer, batch_size
        self.mesh = mesh
        if mesh is not None and batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
            raise ValueError(f"batch_size={batch_size} must be divisible by the mesh's data x fsdp = "
                             f"{mesh.shape['data'] * mesh.shape['fsdp']} (the batch is split over them)")
        self.data_cfg = ml_collections.ConfigDict(config.data.to_dict())
        if seq_len:
            self.data_cfg.seq_len = seq_len
        nested = tuple(config.model.compressor.get("nested_tokens", None) or (config.model.compressor.num_tokens,))
        if num_tokens is not None and num_tokens not in nested:
            raise ValueError(f"num_tokens={num_tokens}: this model answers with V in {nested}")
        self.num_tokens = num_tokens or config.model.compressor.num_tokens
        self.generator = generate.Generator(vlm.VLM(config.model), generate.GenerationConfig(
            max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
            vocab_limit=tokenizer.vocab_size), num_tokens=num_tokens)
        self.prefix_tokens = chat_prefix_tokens(tokenizer, self.data_cfg.system_prompt) if use_prefix_cache else None
        with self._on_mesh():
            self.prefix = (self.generator.encode_prefix(params, self.prefix_tokens)
                           if use_prefix_cache and len(self.prefix_tokens) else None)

    def _on_mesh(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def __call__(self, items: Sequence[EvalItem]) -> list[str]:
        """Answers to `items`. Over a mesh of several processes every process passes the same items and answers
        all of them, batch by batch, in one collective program: so the item counts must agree, and a batch that
        one process cannot build (its copy of an image missing, say) stops every process, not that one alone."""
        return self.answer(items)[0]

    def answer(self, items: Sequence[EvalItem]) -> tuple[list[str], np.ndarray]:
        """(answers, confidences float[len(items)]): `__call__`'s answers and each one's confidence
        (router.confidence: the geometric mean probability of its tokens)."""
        m = self.config.model
        shared = self.mesh is not None and self.mesh.is_multi_process
        if shared:
            counts = batching.process_values(len(items))
            if (counts != len(items)).any():
                raise ValueError(f"the processes hold {counts.tolist()} questions: each must pass the same "
                                 f"benchmark (every process answers all of it)")
        answers: list[str] = []
        confidences: list[np.ndarray] = []
        for start in range(0, len(items), self.batch_size):
            chunk = list(items[start:start + self.batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - real)
            error = None
            try:
                batch = pipeline.make_prompt_batch(
                    [_load_image(it, m.vision.image_size, self.data_cfg.image_aspect_ratio) for it in chunk],
                    [it.prompt for it in chunk], tokenizer=self.tokenizer, data_cfg=self.data_cfg,
                    num_visual_tokens=self.num_tokens, image_size=m.vision.image_size)
            except ValueError as e:
                error = e
            if shared:   # every process learns whether another could not build this batch
                failed = np.flatnonzero(batching.process_values(error is not None)).tolist()
                if failed and error is None:
                    raise ValueError(f"process(es) {failed} could not build the batch of questions "
                                     f"{start}..{start + real - 1} (see their logs); every process stops")
            if error is not None:
                raise error
            if self.prefix is not None:
                batch = generate.strip_prefix(batch, self.prefix_tokens)
            with self._on_mesh():
                out = _fetch(self.generator(self.params, batch, prefix=self.prefix))
            for row in range(real):
                answers.append(self.tokenizer.decode(out.tokens[row, :out.lengths[row]]).strip())
            confidences.append(router.confidence(out.logprobs, out.lengths)[:real])
        return answers, (np.concatenate(confidences) if confidences else np.zeros(0))


# ----------------------------------------------------------------------------------------------------------------------
# Scoring and the summary.


def score_benchmark(benchmark: Benchmark, predictions: Sequence[str]) -> scorers.Score:
    """The benchmark's scorer, plus accuracy per question `kind` when the references carry one."""
    refs = [it.reference for it in benchmark.items]
    result = scorers.get(benchmark.scorer)(predictions, refs)
    kinds: dict[str, list[float]] = collections.defaultdict(list)
    for credit, r in zip(result.per_item, refs):
        if "kind" in r:
            kinds[str(r["kind"])].append(credit)
    for kind, credits in sorted(kinds.items()):
        result.metrics[f"kind/{kind}"] = float(np.mean(credits))
    return result


def answer_baselines(benchmark: Benchmark) -> dict[str, dict[str, float]] | None:
    """What a model that ignores the image reaches, overall ('all') and per question `kind`:
    {'chance': a uniform guess among the kind's distinct reference answers, 'majority': always the kind's most
    common answer}. In-sample, so slightly optimistic. None for scorers other than exact match."""
    if scorers.get(benchmark.scorer) is not scorers.exact_match:
        return None
    by_kind: dict[str, list[str]] = collections.defaultdict(list)
    for it in benchmark.items:
        by_kind[str(it.reference.get("kind", ""))].append(scorers.normalize_exact(str(it.reference["answer"])))
    counts = {k: collections.Counter(answers) for k, answers in by_kind.items()}
    n = len(benchmark.items)
    chance = {k: 1 / len(c) for k, c in counts.items()}
    majority = {k: c.most_common(1)[0][1] / c.total() for k, c in counts.items()}
    return {
        "chance": {"all": sum(chance[k] * c.total() for k, c in counts.items()) / n, **chance},
        "majority": {"all": sum(majority[k] * c.total() for k, c in counts.items()) / n, **majority},
    }


def summarize(results: Mapping[str, scorers.Score], chosen: Sequence[str] | None = None) -> dict:
    """Per-benchmark headline scores and metrics, and average_error = 1 - mean score over `chosen` (all by default)."""
    chosen = list(results) if not chosen else list(chosen)
    unknown = [c for c in chosen if c not in results]
    if unknown:
        raise ValueError(f"error benchmarks {unknown} were not evaluated; evaluated: {sorted(results)}")
    if not chosen:
        raise ValueError("no benchmark results to summarise")
    mean = float(np.mean([results[c].score for c in chosen]))
    return {
        "scores": {k: r.score for k, r in results.items()},
        "metrics": {k: r.metrics for k, r in results.items()},
        "protocol": {k: r.protocol for k, r in results.items() if r.protocol},   # what differs from the official
        "error_benchmarks": chosen,
        "average_accuracy": mean,
        "average_error": 1.0 - mean,
    }


def write_predictions(path: str, benchmark: Benchmark, predictions: Sequence[str], result: scorers.Score,
                      confidences: Sequence[float] | None = None) -> None:
    """One JSON line per question, to a local path or a bucket (one object upload)."""
    lines = []
    confidences = [None] * len(predictions) if confidences is None else confidences
    for item, text, credit, conf in zip(benchmark.items, predictions, result.per_item, confidences):
        row = {"question_id": item.question_id, "prompt": item.prompt, "text": text, "credit": credit,
               "reference": {k: v for k, v in item.reference.items() if k not in ("question_id", "text")}}
        if conf is not None:
            row["confidence"] = float(conf)
        lines.append(json.dumps(row, default=str) + "\n")
    files.write_text_atomic(path, "".join(lines))


def evaluate(answerer: Answerer, benchmarks: Sequence[Benchmark], out_dir: str | None = None,
             error_benchmarks: Sequence[str] | None = None, per_item: dict | None = None) -> dict:
    """Answer, score and summarise every benchmark; with out_dir (a folder or a gs:// prefix), write predictions
    and summary.json there. Every process answers (generation is collective over the mesh); process 0 writes.
    answerer: an Answerer, or any callable items -> answers (then without confidences). per_item: filled with
    {benchmark: (credits float[Q], confidences float[Q] or None)} (the router's inputs)."""
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate")
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be distinct, got {names}")
    out_dir = out_dir if jax.process_index() == 0 else None   # one writer (GCS takes ~1 write/s per object)
    results = {}
    for b in benchmarks:
        start = time.perf_counter()
        if hasattr(answerer, "answer"):
            predictions, confidences = answerer.answer(b.items)
        else:   # any callable items -> answers: no confidences
            predictions, confidences = answerer(b.items), None
        results[b.name] = score_benchmark(b, predictions)
        if per_item is not None:
            per_item[b.name] = (np.asarray(results[b.name].per_item, np.float64), confidences)
        log.info("%s: %.4f (%d questions, %.1f s)", b.name, results[b.name].score, len(b.items),
                     time.perf_counter() - start)
        if out_dir:
            write_predictions(os.path.join(out_dir, f"{b.name.replace('/', '_')}.predictions.jsonl"), b,
                              predictions, results[b.name], confidences)
    summary = summarize(results, error_benchmarks)
    summary["num_questions"] = {b.name: len(b.items) for b in benchmarks}
    summary["baselines"] = {b.name: answer_baselines(b) for b in benchmarks}
    if out_dir:
        files.write_text_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2, sort_keys=True))
    return summary
