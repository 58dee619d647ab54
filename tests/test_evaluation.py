"""The evaluation loop: sources, answering in fixed-shape batches, scoring, the summary and the CLI."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest
from PIL import Image

from configs import smoke
from launch import evaluate as cli
from vlm_jax import evaluation
from vlm_jax.evaluation import scorers
from vlm_jax.data import pipeline
from vlm_jax.models import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@functools.cache
def _tiny_run():
    config = smoke.get_config("llm=tiny-s,tokens=4,res=32")
    params = nn.meta.unbox(jax.jit(vlm.init_fn(config.model))(jax.random.key(0)))
    return config, params, pipeline.make_tokenizer(config.data)


class Oracle:
    """Answers with the reference answer for the first `right` questions, 'wrong' after."""

    def __init__(self, right):
        self.right = right

    def __call__(self, items):
        return [it.reference["answer"] if i < self.right else "wrong" for i, it in enumerate(items)]


def test_synthetic_benchmarks_are_the_validation_items_per_family():
    config, _, _ = _tiny_run()
    benches = evaluation.synthetic_benchmarks(config.data, 32, 3)
    assert [b.name for b in benches] == ["synthetic/reasoning", "synthetic/ocr"]
    for b in benches:
        assert b.scorer == "exact_match" and len(b.items) == 3
        assert b.items[0].image.shape == (32, 32, 3)
        assert b.items[0].prompt.startswith("<image>\n")
    assert benches[1].items[2].question_id == "validation-ocr-2"
    with pytest.raises(ValueError, match="synthetic families"):
        evaluation.synthetic_benchmarks(config.data, 32, 3, "reasoning,maths")


def test_synthetic_benchmarks_ask_what_the_validation_source_draws_with_every_option_of_the_config():
    data = pipeline.default_config()
    s = data.synthetic
    s.seed, s.reasoning_kinds, s.reasoning_grid, s.ocr_length, s.train_questions = 4, "count_all,compare", 2, 2, 3
    s.validation_size = 8
    reasoning, ocr = evaluation.synthetic_benchmarks(data, 32, 4)
    source, _ = pipeline.make_source(data, "validation", 32)
    for i in range(8):   # the source interleaves the families item by item
        item, want = (reasoning, ocr)[i % 2].items[i // 2], source[i]
        assert item.question_id == want["id"] and want["turns"][0] == ("user", item.prompt)
        assert want["turns"][1] == ("assistant", item.reference["answer"]) and len(want["turns"]) == 2
        assert (item.image == want["image"]).all()
    assert {it.reference["kind"] for it in reasoning.items} <= {"count_all", "compare"}


def test_llava_question_files_merge_answers_and_prepend_the_image(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    q = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "a.png", "text": "Is there a dog?", "category": "random"},
        {"question_id": 2, "text": "Is the sky blue?"},
    ])
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 2, "label": "yes"}, {"question_id": 1, "label": "no"}])
    bench = evaluation.llava_benchmark("pope", q, a, str(tmp_path))
    first, second = bench.items
    assert first.prompt == "<image>\nIs there a dog?" and first.image == str(tmp_path / "a.png")
    assert first.reference["category"] == "random" and first.reference["label"] == "no"
    assert second.image is None and second.prompt == "Is the sky blue?"
    score = scorers.get(bench.scorer)(["No, there is not.", "Yes"], [it.reference for it in bench.items])
    assert score.metrics["random/accuracy"] == 1.0


def test_llava_question_files_fail_on_missing_answers_duplicates_and_bad_json(tmp_path):
    q = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 2, "text": "b"}])
    a = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "answer": "x"}])
    with pytest.raises(ValueError, match=r"no answer for 1 question\(s\), e.g. \[2\]"):
        evaluation.llava_benchmark("gqa", q, a)
    dup = _write_jsonl(tmp_path / "d.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 1, "text": "b"}])
    with pytest.raises(ValueError, match="duplicate question_id"):
        evaluation.llava_benchmark("gqa", dup)
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        evaluation.read_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="unknown benchmark scorer"):
        evaluation.llava_benchmark("nope", q)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")   # a real image, one level above the image folder
    out = _write_jsonl(tmp_path / "out.jsonl", [{"question_id": 7, "image": "../secret.png", "text": "what?"}])
    with pytest.raises(ValueError, match=r"question 7: bad_path"):
        evaluation.llava_benchmark("gqa", out, None, str(images))


def test_missing_image_names_the_question(tmp_path):
    config, params, tok = _tiny_run()
    q = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": "q9", "image": "gone.png", "text": "what?"}])
    bench = evaluation.llava_benchmark("gqa", q, None, str(tmp_path))
    answerer = evaluation.Answerer(config, params, tok, batch_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="question 'q9'"):
        answerer(bench.items)


def test_answerer_pads_the_last_batch_and_the_prefix_cache_changes_no_answer():
    config, params, tok = _tiny_run()
    items = [it for b in evaluation.synthetic_benchmarks(config.data, 32, 3) for it in b.items][:5]
    cached = evaluation.Answerer(config, params, tok, batch_size=4, max_new_tokens=5, use_prefix_cache=True)
    assert cached.prefix is not None and len(cached.prefix_tokens) >= 2
    plain = evaluation.Answerer(config, params, tok, batch_size=4, max_new_tokens=5, use_prefix_cache=False)
    answers = cached(items)
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    assert answers == plain(items)
    # Order within a batch does not matter: answering one item alone gives its batched answer.
    assert cached(items[4:5]) == answers[4:5]


def test_chat_prefix_is_the_start_of_every_prompt():
    _, _, tok = _tiny_run()
    prefix = evaluation.chat_prefix_tokens(tok)
    assert tok.decode(prefix, skip_special=False) == "<|im_start|>user\n"
    with_system = evaluation.chat_prefix_tokens(tok, "you are a shape counter")
    assert len(with_system) > len(prefix)


def test_summary_average_error_is_one_minus_mean_score(tmp_path):
    config, _, _ = _tiny_run()
    reasoning, ocr = evaluation.synthetic_benchmarks(config.data, 32, 4)
    summary = evaluation.evaluate(Oracle(right=3), [reasoning, ocr], str(tmp_path))
    assert summary["scores"] == {"synthetic/reasoning": 0.75, "synthetic/ocr": 0.75}
    assert summary["average_error"] == pytest.approx(0.25)
    only = evaluation.evaluate(Oracle(right=4), [reasoning], None, ["synthetic/reasoning"])
    assert only["average_error"] == 0.0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["average_error"] == pytest.approx(0.25)
    rows = [json.loads(x) for x in (tmp_path / "synthetic_ocr.predictions.jsonl").read_text().splitlines()]
    assert [r["credit"] for r in rows] == [1.0, 1.0, 1.0, 0.0]
    assert rows[0]["reference"]["answer"] == rows[0]["text"]
    kinds = {k for k in summary["metrics"]["synthetic/ocr"] if k.startswith("kind/")}
    assert kinds and kinds <= {"kind/read", "kind/char", "kind/where"}
    with pytest.raises(ValueError, match="were not evaluated"):
        evaluation.summarize({}, ["gqa"])


def test_baselines_are_a_uniform_guess_and_the_best_constant_answer_per_kind():
    def item(i, kind, answer):
        return evaluation.EvalItem(i, None, "q", {"question_id": i, "kind": kind, "answer": answer})
    bench = evaluation.Benchmark("b", "exact_match", [
        item(0, "count", "1"), item(1, "count", "1"), item(2, "count", "2"),
        item(3, "yesno", "yes"), item(4, "yesno", "No."), item(5, "yesno", "no")])
    base = evaluation.answer_baselines(bench)
    assert base["majority"] == pytest.approx({"all": (2 + 2) / 6, "count": 2 / 3, "yesno": 2 / 3})
    assert base["chance"] == pytest.approx({"all": 0.5, "count": 0.5, "yesno": 0.5})  # "No." == "no"
    bench.items.append(item(6, "color", "red"))
    assert evaluation.answer_baselines(bench)["chance"]["all"] == pytest.approx((6 * 0.5 + 1) / 7)
    assert evaluation.answer_baselines(evaluation.Benchmark("p", "pope", bench.items)) is None


def test_bench_flag_parsing():
    assert cli.parse_bench("pope:q.jsonl:a.jsonl:imgs") == ("pope", "pope", "q.jsonl", "a.jsonl", "imgs")
    assert cli.parse_bench("gqa_dev@gqa:q.jsonl") == ("gqa_dev", "gqa", "q.jsonl", None, "")
    with pytest.raises(ValueError, match="expected NAME"):
        cli.parse_bench("pope")


@pytest.mark.slow
def test_cli_evaluates_a_trained_checkpoint(tmp_path):
    from vlm_jax import train
    config = smoke.get_config("llm=tiny-s,tokens=4,res=32")
    with config.unlocked():
        config.run_dir = str(tmp_path / "run")
        config.train.steps = 2
        config.train.batch_size = 4
        config.train.checkpoint_every = 2
    train.run(config)
    out = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--run_dir={tmp_path / 'run'}",
                          "--num_per_family=6", "--batch_size=4", "--max_new_tokens=4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "synthetic/reasoning" in out.stdout and "average error" in out.stdout
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert set(summary["scores"]) == {"synthetic/reasoning", "synthetic/ocr"}
    # Recompute every reported number from the written predictions, by hand, against the validation items.
    expected = {b.name: [it.reference["answer"] for it in b.items]
                for b in evaluation.synthetic_benchmarks(config.data, 32, 6)}
    accuracies = []
    for name, answers in expected.items():
        path = tmp_path / "run" / "eval" / f"{name.replace('/', '_')}.predictions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["reference"]["answer"] for r in rows] == answers
        right = [r["text"].strip().rstrip(".").strip().lower() == a.lower() for r, a in zip(rows, answers)]
        accuracy = sum(right) / len(right)
        assert summary["scores"][name] == pytest.approx(accuracy)
        printed = next(line for line in out.stdout.splitlines() if line.startswith(name + " "))
        assert float(printed.split()[1]) == pytest.approx(accuracy, abs=5e-5)
        accuracies.append(accuracy)
    assert summary["average_error"] == pytest.approx(1 - sum(accuracies) / len(accuracies))


def test_the_summary_names_what_differs_from_an_official_protocol_next_to_the_number():
    mc = [{"answer": "A", "options": ["cat", "dog"], "question_id": 1},
          {"answer": "B", "options": ["cat", "dog"], "question_id": 2}]
    results = {"mmb": scorers.get("mmbench")(["A", "I think so"], mc),
               "seed": scorers.get("seed_bench")(["A", "B"], [{"answer": "A"}, {"answer": "B"}]),
               "gqa": scorers.get("gqa")(["dog."], [{"answer": "dog"}])}
    summary = evaluation.summarize(results)
    assert summary["scores"]["mmb"] == 0.5 and summary["scores"]["gqa"] == 1.0
    assert set(summary["protocol"]) == {"mmb", "seed"}     # GQA's exact match is the whole official rule
    assert "GPT matcher" in summary["protocol"]["mmb"] and "likelihood" in summary["protocol"]["seed"]
