"""benchmarks/bench_accelerator.py: the numbers it reports agree with each other, with the FLOPs model and with the
clock, and its batch search finds the largest batch under a memory limit."""

import json
import math
import statistics
import time

import pytest

from benchmarks import bench_accelerator as bench
from configs import smoke
from vlm_jax import flops

SMALL = ["--size=small", "--steps=2", "--batch=2"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "result.json"
    start = time.perf_counter()
    result = bench.main(SMALL + [f"--json={path}"])
    return result, json.loads(path.read_text()), time.perf_counter() - start


def test_small_run_reports_tokens_per_second_and_mfu_from_its_own_step_times(small_run):
    result, written, wall = small_run
    assert written == json.loads(json.dumps(result))
    seq = 48 + 16   # the small size's text slots + V
    assert (result["per_device_batch"], result["global_batch"], result["seq_len"]) == (2, 2, seq)
    assert len(result["step_times_s"]) == 2
    assert result["step_time_s"] == statistics.median(result["step_times_s"])
    # the timed steps happened inside the call, and the warm-up and compilation on top of them
    assert sum(result["step_times_s"]) < wall
    assert result["tokens_per_s"] == pytest.approx(2 * seq / result["step_time_s"], rel=1e-12)
    assert result["mfu"] == pytest.approx(
        result["step_flops"] / result["step_time_s"] / result["peak_flops_per_device"], rel=1e-12)
    assert result["peak_source"].startswith("measured")   # a CPU has no row in the chip table


def test_small_run_charges_the_stage_2_step_flops_and_learns_from_every_answer_slot(small_run):
    result, _, _ = small_run
    model = smoke.get_config("llm=tiny,compressor=quecc,tokens=16").model
    model.dtype = "bfloat16"   # the full-size configs' compute dtype (XLA's count of the head sees the casts)
    # stage 2: the LLM trains, the tower does not (the smoke config would train it)
    expected = flops.train_step_flops(model, batch_size=2, seq_len=bench.SMALL_SEQ_LEN + 16, train_llm=True,
                                      train_vision=False, question_len=bench.SMALL_QUESTION_LEN)
    assert result["step_flops"] == pytest.approx(expected, rel=1e-12)
    # random weights over a 128-token vocabulary and random targets: the loss is about ln(128)
    assert result["loss"] == pytest.approx(math.log(model.llm.vocab_size), abs=0.1)
    assert (result["dtype"], result["remat"], result["scan_layers"]) == ("bfloat16", "full", True)


def test_small_run_on_a_cpu_says_peak_memory_is_not_available(small_run, capsys):
    result, _, _ = small_run
    assert result["peak_memory_bytes"] is None
    assert "peak device memory: n/a" in bench.summary(result)
    assert result["attention"] == {"llm": "cpu", "llm_question": "cpu", "vision": "cpu"}


def linear(fixed, per):
    return lambda b: fixed + per * b


def brute_force(need, limit, max_batch):
    fitting = [2 ** i for i in range(12) if 2 ** i <= max_batch and need(2 ** i) <= limit]
    return max(fitting, default=0)


@pytest.mark.parametrize("probes", [(1, 2), (4, 16)])
@pytest.mark.parametrize("need,limit,max_batch", [
    (linear(100, 10), 100 + 10 * 37, 1024),          # 37 fit: 32
    (linear(100, 10), 100 + 10 * 32, 1024),          # exactly 32
    (linear(100, 10), 100 + 10 * 32 - 1, 1024),      # one byte short of 32: 16
    (linear(100, 10), 10 ** 9, 64),                  # the cap
    (lambda b: 50 + 3 * b * b, 50 + 3 * 100, 1024),  # super-linear (an estimate that overshoots): 8
    (lambda b: 1000 + (b > 4) * 10 ** 6, 2000, 1024),  # a cliff past 4 the estimate cannot see: 4
    (linear(100, 10), 109, 1024),                    # not even one example
    (linear(100, 10), 100 + 10 * 3, 1024),           # under the first probe: 2
    (linear(100, 10), 100 + 10 * 10, 8),             # a cap below the probes
])
def test_search_batch_returns_the_largest_power_of_two_under_the_limit(need, limit, max_batch, probes):
    asked = []
    found = bench.search_batch(lambda b: asked.append(b) or need(b), limit, max_batch, probes=probes)
    assert found == brute_force(need, limit, max_batch)
    assert len(asked) == len(set(asked)) <= 6   # every size compiled once, and few of them


def test_search_batch_announces_what_it_asks_for_in_the_linear_case():
    need, limit, asked, announced = linear(100, 10), 100 + 10 * 37, [], []
    found = bench.search_batch(lambda b: asked.append(b) or need(b), limit, 1024, prefetch=announced.extend)
    assert found == 32
    assert announced[:2] == [1, 2] and set(asked) <= set(announced)   # so each compilation could start early
    assert asked == [1, 2, 32, 64]


@pytest.mark.slow   # several compilations of the small step (~25 s)
def test_run_searches_the_real_step_up_to_an_injected_memory_limit(monkeypatch):
    config = bench.bench_config("tiny", 16, "small")
    step = bench.Step(config, bench.sharding.make_mesh(config.mesh))
    need = {b: bench.bytes_needed(step.compile(b)) for b in (2, 4, 8)}
    assert need[2] < need[4] < need[8]
    margin = 0.9
    limit = (need[2] + need[4]) // 2   # 2 fits, 4 does not
    monkeypatch.setattr(bench, "memory_limit", lambda: (int(limit / margin) + 1, "injected"))
    result = bench.main(["--size=small", "--steps=1", "--warmup=0", "--batch=0", "--max_batch=8", "--probes=4,8",
                         f"--memory_margin={margin}"])
    assert result["per_device_batch"] == 2
    searched = {int(b): n for b, n in result["batch_search_bytes"].items()}
    assert searched == {4: need[4], 2: need[2]}   # the first probe does not fit: halving from it
