"""The grid launcher: atomic results, a failing cell isolated, resume after a kill (real processes)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests import helpers
from vlm_jax import files
from vlm_jax.grid import backends, results, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grid(tmp_path):
    return helpers.tiny_grid(tmp_path)


def _jobs(g):
    return helpers.grid_jobs(g)


@pytest.mark.slow   # starts processes and kills them
def test_a_killed_writer_never_leaves_a_broken_results_file(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = 200   # ~400 KB per write, so a kill often lands mid-write
    writer = tmp_path / "writer.py"
    writer.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {ROOT!r})
        from vlm_jax import files
        i = 0
        while True:
            i += 1
            lines = (json.dumps({{"cell": f"c{{j}}", "gen": i, "pad": "x" * 2000}}) + "\\n" for j in range({rows}))
            files.write_text_atomic({str(path)!r}, "".join(lines))
    """))
    seen = 0
    for delay in (0.4, 0.55, 0.7, 0.9, 1.1, 1.3):
        proc = subprocess.Popen([sys.executable, str(writer)])
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if path.exists():
            parsed = [json.loads(x) for x in path.read_text().splitlines()]     # every line whole
            assert len(parsed) == rows and len({r["gen"] for r in parsed}) == 1   # one complete generation
            seen += 1
    assert seen >= 3


@pytest.mark.slow   # ~13 s: a grid of cell processes
def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    g = _grid(tmp_path)
    with g.unlocked():
        g.tower.pretrain = False
    _, cells = _jobs(g)
    local = backends.LocalBackend()
    broken = cells[0].name

    class OneCellFails(backends.LocalBackend):
        def commands(self, job):
            if job.name == broken:   # this cell's process dies with a traceback, as a crashing cell would
                return [[sys.executable, "-c", "raise RuntimeError('cell exploded')"]]
            return local.commands(job)

    lines = []
    progress = runner.run_jobs([], cells, OneCellFails(), parallel=1, echo=lines.append)
    assert (progress.done, progress.failed) == (1, 1)
    failed = results.read_result(cells[0].dir)
    assert failed["status"] == "failed" and "cell exploded" in failed["log_tail"]
    assert results.status(cells[1], results.read_result(cells[1].dir)) == "done"
    table = results.write_table(str(tmp_path / "results.jsonl"), cells)
    assert {r["cell"] for r in table} == {cells[1].name} and {r["task"] for r in table} == {"reasoning", "detail"}
    assert any(f"{broken}: FAILED" in x for x in lines) and any("1 failed" in x for x in lines)
    # --retry_failed selects the failed cell only; a plain re-run skips the finished one.
    assert [j.name for j in runner.select(cells, [], retry_failed=True)[0]] == [broken]
    assert [j.name for j in runner.select(cells, [], retry_failed=False)[0]] == [broken]


def _launch(g, *flags):
    """`python -m launch.grid` on the grid `helpers.tiny_grid` builds (same overrides, so the same job names)."""
    overrides = {"dir": g.dir, "cell.train.batch_size": 4, "cell.data.read_threads": 1,
                 "tower.overrides.train.steps": 2, "tower.overrides.train.batch_size": 4,
                 "llm_pretrain.pretrain": False,
                 "stages.stage1.train.steps": 2, "stages.stage2.train.steps": 3, "eval.synthetic_per_family": 8,
                 "eval.batch_size": 8, "parallel": 1, "fit.bootstrap": 20, "seeds": "(0,)"}
    return [sys.executable, "-m", "launch.grid", "--config=configs/grid.py:smoke,llms=tiny-xs,tokens=1+4",
            *[f"--config.{k}={v}" for k, v in overrides.items()], *flags]


@pytest.mark.slow
def test_kill_midway_then_rerun_runs_only_the_missing_cells(tmp_path):
    g = _grid(tmp_path)
    (tower,), cells = _jobs(g)
    done_first, done_second = runner.start_order(cells)   # the order the runner starts them
    first = os.path.join(done_first.dir, "result.json")
    proc = subprocess.Popen(_launch(g), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert os.path.exists(first), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)    # the launcher and the running cell, as a lost machine would
    proc.wait()
    assert not os.path.exists(os.path.join(done_second.dir, "result.json"))
    before = open(first).read()

    out = subprocess.run(_launch(g), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{tower.name}: done, skipped" in out.stdout and f"{done_first.name}: done, skipped" in out.stdout
    assert "1 to run" in out.stdout
    assert open(first).read() == before
    table = open(os.path.join(g.dir, "results.jsonl")).read()
    assert [json.loads(x)["cell"] for x in table.splitlines()] == [cells[0].name] * 2 + [cells[1].name] * 2

    # A third run has nothing to do and writes the same table.
    again = subprocess.run(_launch(g), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "0 to run" in again.stdout
    assert open(os.path.join(g.dir, "results.jsonl")).read() == table
    summary = json.load(open(os.path.join(g.dir, "summary.json")))
    assert summary["cells"] == 2 and set(summary["errors"]) == {"reasoning", "detail"}


@pytest.mark.parametrize("variant", ["smoke", "detail", "paper"])
def test_every_variant_builds_jobs_whose_synthetic_data_is_valid(variant):
    """Each grid variant's jobs are well-formed: every stage's synthetic source can be built from its config (a
    weight per family, known families), stage 2 starts from stage 1, and the tower is evaluated on what it learnt."""
    import ml_collections

    from configs import grid as grid_config
    from vlm_jax.data import pipeline

    first, cells = helpers.grid_jobs(grid_config.get_config(variant))
    assert cells
    for job in first + cells:
        for stage in job.spec["stages"]:
            data = ml_collections.ConfigDict(stage["config"]["data"])
            if data.source == "synthetic":
                pipeline.make_source(data, "train", 64)
        if job.is_cell:
            (_, s2) = job.spec["stages"]
            assert [src for src, _ in s2["config"]["init"]] == [job.spec["stages"][0]["config"]["run_dir"]]
    for job in first:   # the tower and the LLMs are each evaluated on what they learnt
        families = ml_collections.ConfigDict(job.spec["stages"][0]["config"]["data"]).synthetic.families
        assert set(job.spec["eval"]["tasks"]) == set(families.split(","))


def test_cells_start_costliest_first(tmp_path):
    """Largest LLM and most visual tokens first, so the last slot does not idle behind one long cell."""
    g = helpers.tiny_grid(tmp_path, tokens="1+16+4")
    with g.unlocked():
        g.llms = ("tiny-xs", "tiny-m")
        g.tower.pretrain = False
    _, cells = _jobs(g)
    started = []

    class Recording(backends.LocalBackend):
        def commands(self, job):
            started.append(job.name)
            return [[sys.executable, "-c", "pass"]]

    runner.run_jobs([], cells, Recording(), parallel=1, echo=lambda line: None)
    assert started == ["tiny-m_v16", "tiny-m_v4", "tiny-m_v1", "tiny-xs_v16", "tiny-xs_v4", "tiny-xs_v1"]


def test_seeds_start_apart_and_pretraining_starts_with_what_every_cell_needs(tmp_path):
    """A cell's second seed starts after every first seed (it then finds the first seed's compiled programs in the
    persistent cache); the pretraining jobs start with the tower (every cell needs it), then the largest LLM, so
    the last one does not hold the cells back alone."""
    g = helpers.tiny_grid(tmp_path, tokens="1+16")
    with g.unlocked():
        g.llms = ("tiny-xs", "tiny-m")
        g.seeds = (3, 7)
        g.llm_pretrain.pretrain = True
    first, cells = _jobs(g)
    assert [job.name.rsplit("-", 1)[0] for job in first] == ["tower", "llm-tiny-xs", "llm-tiny-m"]
    assert [job.name.rsplit("-", 1)[0] for job in runner.start_order(first)] == ["llm-tiny-m", "llm-tiny-xs", "tower"]
    assert [job.name.rsplit("-", 1)[0] for job in runner.pretraining_order(first, cells)] == [
        "tower", "llm-tiny-m", "llm-tiny-xs"]
    assert {cell.name: [job.name.rsplit("-", 1)[0] for job in runner.needs(cell, first)] for cell in cells} == {
        f"{llm}_v{v}_s{s}": ["tower", f"llm-{llm}"] for llm in ("tiny-xs", "tiny-m") for v in (1, 16) for s in (3, 7)}
    assert [job.name for job in runner.start_order(cells)] == [
        "tiny-m_v16_s3", "tiny-m_v1_s3", "tiny-xs_v16_s3", "tiny-xs_v1_s3",
        "tiny-m_v16_s7", "tiny-m_v1_s7", "tiny-xs_v16_s7", "tiny-xs_v1_s7"]


class _Timed:
    """A backend that runs nothing: each job takes `seconds[kind]` (its name without the digest), then succeeds
    (writes its result) or, if its kind is in `fail`, exits 1; (name, start, end) of each is recorded."""

    def __init__(self, seconds, fail=()):
        self.seconds, self.fail, self.record, self.lock = seconds, fail, [], threading.Lock()

    def run(self, job, log_path):   # job: backends.Job, argv `python -m launch.cell --job_dir=DIR`
        kind = job.name.rsplit("-", 1)[0] if job.name.startswith(("tower-", "llm-")) else "cell"
        job_dir = job.argv[-1].split("=", 1)[1]
        start = time.perf_counter()
        time.sleep(self.seconds.get(kind, 0.02))
        with self.lock:
            self.record.append((job.name, start, time.perf_counter()))
        if kind in self.fail:
            return 1
        spec = results.read_json(os.path.join(job_dir, "job.json"))   # (the launcher wrote it)
        files.write_json_atomic(os.path.join(job_dir, "result.json"), {
            "status": "ok", "spec_digest": results.spec_digest(spec), "rows": []})
        return 0


def _pretrained_grid(tmp_path):
    g = helpers.tiny_grid(tmp_path, tokens="1+4")
    with g.unlocked():
        g.llms = ("tiny-xs", "tiny-m")
        g.llm_pretrain.pretrain = True
    return _jobs(g)


def test_a_cell_starts_once_its_own_pretraining_is_done_not_everyone_s(tmp_path):
    """Two slots: the tower and the tiny-m LLM first, then the slow tiny-xs LLM on one slot while the other runs
    tiny-m's cells; no cell starts before the jobs it starts from have ended."""
    first, cells = _pretrained_grid(tmp_path)
    backend = _Timed({"tower": 0.2, "llm-tiny-m": 0.2, "llm-tiny-xs": 1.5})
    progress = runner.run_jobs(first, cells, backend, parallel=2, echo=lambda line: None)
    assert (progress.done, progress.failed, progress.skipped) == (len(first) + len(cells), 0, 0)
    start = {name: t0 for name, t0, _ in backend.record}
    end = {name: t1 for name, _, t1 in backend.record}
    slow = next(job.name for job in first if job.name.startswith("llm-tiny-xs"))
    for cell in cells:
        assert all(start[cell.name] >= end[job.name] for job in runner.needs(cell, first))
    assert all(start[c.name] < end[slow] for c in cells if c.spec["row"]["llm"] == "tiny-m")


def test_a_failed_pretraining_job_keeps_only_its_own_cells_from_running(tmp_path):
    first, cells = _pretrained_grid(tmp_path)
    backend = _Timed({}, fail=("llm-tiny-xs",))
    lines = []
    progress = runner.run_jobs(first, cells, backend, parallel=2, echo=lines.append)
    ran = {name for name, _, _ in backend.record}
    assert {c.name for c in cells if c.name in ran} == {c.name for c in cells if c.spec["row"]["llm"] == "tiny-m"}
    assert (progress.done, progress.failed, progress.skipped) == (len(first) - 1 + 2, 1, 2)
    assert sum("not run: its pretraining (llm-tiny-xs-" in line for line in lines) == 2
    assert results.read_result(first[1].dir)["status"] == "failed"   # (first: tower, llm-tiny-xs, llm-tiny-m)


def test_cells_run_their_llm_as_the_template_says():
    """A cell swaps in its LLM preset but keeps how the template runs it: the paper grid's stages stay fully
    rematerialised (launch.plan found that losing it took a 0.5B stage from 9 to 195 GiB per v5e chip)."""
    from configs import grid as grid_config
    from configs import llava

    _, cells = helpers.grid_jobs(grid_config.get_config("paper,llms=qwen1.5-0.5b+qwen1.5-7b,tokens=1"))
    assert llava.get_config().model.llm.remat == "full"
    for job in cells:
        for stage in job.spec["stages"]:
            llm = stage["config"]["model"]["llm"]
            assert llm["remat"] == "full" and llm["scan_layers"] is True
            assert llm["name"] == job.spec["row"]["llm"]          # and the preset's own shape
    assert {j.spec["stages"][0]["config"]["model"]["llm"]["hidden_size"] for j in cells} == {1024, 4096}


def test_each_cell_starts_from_its_own_pretrained_llm_and_the_shared_tower():
    """The smoke grid pretrains one LLM per size on scenes told in words (text only) and the cells' first stage
    takes that LLM's weights and the tower's; later stages take the previous stage's."""
    import ml_collections

    from configs import grid as grid_config
    from vlm_jax.data import pipeline

    first, cells = helpers.grid_jobs(grid_config.get_config("smoke"))
    tower, *llms = first
    llm_run = {j.spec["provides"]["llm"]: j.spec["stages"][0]["config"]["run_dir"] for j in llms}
    assert sorted(llm_run) == sorted({c.spec["row"]["llm"] for c in cells})
    for cell in cells:
        init = [tuple(x) for x in cell.spec["stages"][0]["config"]["init"]]
        assert init == [(tower.spec["stages"][0]["config"]["run_dir"], "vision/.*"),
                        (llm_run[cell.spec["row"]["llm"]], "llm/.*")]
    data = ml_collections.ConfigDict(llms[0].spec["stages"][0]["config"]["data"])
    source, _ = pipeline.make_source(data, "train", 64)
    item = source[0]
    assert item["image"] is None and "<image>" not in item["turns"][0][1]


def test_a_cell_error_is_one_minus_accuracy_or_half_a_question_when_none_was_wrong():
    from vlm_jax.grid import cell
    assert cell.measured_error(1.0, 500) == pytest.approx(0.001)
    assert cell.measured_error(1.0, 40) == pytest.approx(0.0125)
    for wrong in (1, 2, 37, 500):   # any error the evaluation can measure is kept as measured
        assert cell.measured_error(1.0 - wrong / 500, 500) == pytest.approx(wrong / 500)


def _write_result(job, status, digest):
    files.write_json_atomic(os.path.join(job.dir, "result.json"),
                              {"status": status, "rows": [], "error": None, "spec_digest": digest})


def test_a_cell_that_failed_under_another_spec_is_redone_and_blocks_no_other(tmp_path):
    g = helpers.tiny_grid(tmp_path, tokens="1+4+16")
    with g.unlocked():
        g.tower.pretrain = False
    _, (old_failure, done, fresh) = _jobs(g)
    _write_result(old_failure, "failed", "the digest of an earlier grid config")
    _write_result(done, "ok", results.spec_digest(done.spec))
    todo, notes = runner.select([old_failure, done, fresh], [], retry_failed=False)
    assert [j.name for j in todo] == [old_failure.name, fresh.name]
    assert f"{done.name}: done, skipped" in notes and any(old_failure.name in n and "redone" in n for n in notes)
    assert [j.name for j in runner.select([old_failure, done, fresh], [], retry_failed=True)[0]] == [old_failure.name]
    # A cell *finished* under another spec still stops the grid: its rows would mix two configs in one table.
    _write_result(done, "ok", "the digest of an earlier grid config")
    with pytest.raises(ValueError, match="finished job with a different spec"):
        runner.select([old_failure, done, fresh], [], retry_failed=False)


def test_two_grids_on_buckets_never_share_a_log_file(tmp_path):
    def logs(grid_dir):
        g = _grid(tmp_path)
        with g.unlocked():
            g.dir = grid_dir
        first, cells = _jobs(g)
        assert first and cells
        return {job.name: runner.log_file(job) for job in first + cells}

    one, two = logs("gs://bucket-a/grid-smoke"), logs("gs://bucket-b/grid-smoke")   # one name, two buckets
    assert one.keys() == two.keys()
    assert not set(one.values()) & set(two.values())
    assert len(set(one.values())) == len(one)                          # a file per job
    assert len({os.path.dirname(p) for p in one.values()}) == 1        # one grid's logs side by side
    assert all(p.startswith(os.path.join("runs", "grid-logs", "grid-smoke-")) for p in one.values())
    local = _jobs(_grid(tmp_path))[1][0]
    assert runner.log_file(local) == os.path.join(local.dir, "log.txt")   # a local job's log lies beside it


@pytest.mark.slow
def test_the_same_grid_run_twice_on_one_machine_writes_the_same_results_file_bitwise(tmp_path):
    """The README's determinism claim: same command, same machine -> the same results.jsonl, byte for byte (the
    compilation cache is off in both runs, so the second cannot differ by reusing the first's programs)."""
    env = dict(os.environ, VLM_JAX_COMPILATION_CACHE="")
    tables = []
    for name in ("first", "second"):
        g = _grid(tmp_path / name)
        out = subprocess.run(_launch(g), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        with open(os.path.join(g.dir, "results.jsonl"), "rb") as f:
            tables.append(f.read())
    assert len(tables[0].splitlines()) == 4   # 2 cells x 2 families
    assert tables[0] == tables[1]


def _finished(job, spec: dict) -> None:
    """`job` finished (status ok, one row) under `spec`: its own spec, or another one (stale)."""
    os.makedirs(job.dir, exist_ok=True)
    with open(os.path.join(job.dir, "result.json"), "w") as f:
        json.dump({"status": "ok", "spec_digest": results.spec_digest(spec),
                   "rows": [{"cell": job.name, "llm": "m", "n_params": 1000, "visual_tokens": 1, "seed": 0,
                             "task": "detail", "error": 0.5}]}, f)


def test_a_report_whose_cells_all_ran_under_another_spec_keeps_the_table_and_says_why(tmp_path):
    """A grid folder moved (its cells' paths are part of each job), or a config changed: the finished cells are
    stale, nothing is fit, and the table they made is not emptied."""
    from vlm_jax.grid import report
    from vlm_jax.grid.spec import GridJob
    jobs = [GridJob(f"c{v}", str(tmp_path / "cells" / f"c{v}"),
                    {"row": {"cell": f"c{v}", "n_params": 1000, "visual_tokens": v}, "stages": [], "eval": None})
            for v in (1, 4)]
    for job in jobs:
        _finished(job, dict(job.spec, stages=[{"name": "elsewhere"}]))
    table = tmp_path / "results.jsonl"
    table.write_text('{"cell": "c1", "error": 0.5}\n{"cell": "c4", "error": 0.3}\n')
    lines = []
    assert report.write_report(str(tmp_path), jobs, None, echo=lines.append) == {}
    assert table.read_text() == '{"cell": "c1", "error": 0.5}\n{"cell": "c4", "error": 0.3}\n'
    assert "2 cell(s) finished under another spec" in lines[0] and "launch.fit --results=" in lines[0], lines
    # One of them run again under this spec: the table is rebuilt from it alone.
    _finished(jobs[0], jobs[0].spec)
    assert results.table_rows(jobs) == ([{"cell": "c1", "llm": "m", "n_params": 1000, "visual_tokens": 1,
                                          "seed": 0, "task": "detail", "error": 0.5}], 1)
    # No cell finished at all: the table says so (empty), as before.
    for job in jobs:
        os.remove(os.path.join(job.dir, "result.json"))
    lines.clear()
    assert report.write_report(str(tmp_path), jobs, None, echo=lines.append) == {}
    assert table.read_text() == "" and lines == ["no finished cell yet: nothing to fit"]
