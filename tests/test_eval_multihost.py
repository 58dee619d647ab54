"""Evaluation over two real processes (jax.distributed on localhost, gloo CPU collectives, one device each).

Validation loss: the processes' shards lose different numbers of bad records (one loses all of its share), yet both
run the collective eval step equally often, so evaluation finishes, with one process's metrics over the same good
records. Generation (launch.evaluate's path): both processes get the one-process answers, and an image only one of
them cannot read stops both with an error instead of leaving the other waiting."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = int(os.environ.get("VLM_JAX_TEST_MULTIHOST_TIMEOUT", "300"))   # a deadlock fails here instead of hanging

QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a red shape?",
             "what shape is at the top?"]
ANSWERS = ["red", "3", "yes", "circle", "blue", "no", "2", "square"]


def _good(i: int) -> dict:
    return {"id": f"q{i}", "conversations": [{"from": "human", "value": QUESTIONS[i % len(QUESTIONS)]},
                                             {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]}


def _bad(i: int) -> dict:
    return {"id": f"bad{i}", "conversations": [{"from": "human", "value": QUESTIONS[0]}]}   # one-sided: skipped


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _files(tmp_path) -> tuple[list[str], list[str], dict]:
    """(two-process specs, one-process specs over the same good records, expected skips per process). Each process
    reads a contiguous half (8 records) of a 16-record file at 2 rows per process batch."""
    uneven = [_good(i) for i in range(8)] + [_good(8), _bad(9), _bad(10), _good(11), _bad(12), _bad(13), _good(14),
                                             _bad(15)]
    empty_half = [_good(i) for i in range(8)] + [_bad(i) for i in range(8, 16)]
    two, one = [], []
    for name, records in (("uneven", uneven), ("empty_half", empty_half)):
        two.append(f"{name}={_write(tmp_path / f'{name}.jsonl', records)}")
        good = [r for r in records if len(r["conversations"]) == 2]
        one.append(f"{name}={_write(tmp_path / f'{name}_good.jsonl', good)}")
    return two, one, {"uneven": [0, 5], "empty_half": [0, 8]}   # 4 batches against 2, and against none


def _questions(tmp_path) -> list[str]:
    """Worker flags: 6 questions (batches of 4), whose 5th image process 1's folder lacks."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    names = [f"img{i}.png" for i in range(6)]
    for process, missing in ((0, None), (1, names[4])):
        folder = tmp_path / "images" / f"p{process}"
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            if name != missing:
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / name)
    questions = [{"question_id": i, "image": name, "text": "what color is the circle?"} for i, name in enumerate(names)]
    path = _write(tmp_path / "questions.jsonl", questions)
    return [f"--questions={path}", f"--images={tmp_path / 'images'}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                VLM_JAX_COMPILATION_CACHE="")


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _run_two(specs) -> list[dict]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.eval_multihost_worker", "--num_processes=2",
                               f"--process_id={i}", f"--port={port}", *specs], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[1][-1500:] for p in procs]
        pytest.fail(f"two-process evaluation did not finish in {TIMEOUT} s (a host waiting in a collective the "
                    f"other never joins):\n" + "\n---\n".join(logs))
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [_result(out) for out, _ in outs]


@pytest.mark.slow
def test_two_processes_evaluate_as_one_whatever_their_bad_records(tmp_path):
    two_specs, one_specs, skipped = _files(tmp_path)
    per_process = _run_two([*two_specs, *_questions(tmp_path)])
    ref = subprocess.run([sys.executable, "-m", "tests.eval_multihost_worker", *one_specs], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert ref.returncode == 0, ref.stderr[-3000:]
    one = _result(ref.stdout)
    for name, expected_skips in skipped.items():
        assert [r[name]["skipped_here"] for r in per_process] == expected_skips   # the intended split of bad records
        assert one[name]["skipped_here"] == 0
        good = 16 - sum(expected_skips)
        for r in per_process:   # both processes hold the global result
            assert r[name]["eval/examples"] == one[name]["eval/examples"] == good
            np.testing.assert_allclose(r[name]["eval/loss"], one[name]["eval/loss"], rtol=1e-5, err_msg=name)
            assert r[name]["eval/exact_match"] == pytest.approx(one[name]["eval/exact_match"], abs=1e-9)
    assert len(one["answers"]) == 6 and any(one["answers"])
    for r in per_process:
        assert r["answers"] == one["answers"]
    errors = [r["questions_error"] for r in per_process]
    assert "missing_image" in errors[1] and "img4.png" in errors[1], errors
    assert "process(es) [1] could not build the batch of questions 4..5" in errors[0], errors
