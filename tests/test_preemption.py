"""A stage stopped early is never taken for a finished one: training raises Preempted once its checkpoint is
committed, launchers exit 75 (resumable), a grid job counts a stage done only by its committed final checkpoint
under the same config, and SIGTERM is not swallowed after training. In process; real signals."""

import json
import os
import shutil
import signal

import ml_collections
import pytest

from launch import runtime
from tests.test_train_loop import small_config
from vlm_jax import checkpoints, train
from vlm_jax.grid import cell


def _stop_at(step_to_stop: int, monkeypatch):
    """Preemption requested when step `step_to_stop` completes (what a SIGTERM during that step does)."""
    monkeypatch.setattr(train.Preemption, "stop_after", lambda self, step: step >= step_to_stop)


def test_a_stopped_run_raises_preempted_after_committing_the_checkpoint_of_its_step(tmp_path, monkeypatch):
    _stop_at(3, monkeypatch)
    config = small_config(tmp_path / "run", steps=6)
    with pytest.raises(train.Preempted) as stopped:
        train.run(config)
    assert (stopped.value.step, stopped.value.steps) == (3, 6)
    assert stopped.value.EXIT_CODE == 75
    assert checkpoints.committed_step(checkpoints.directory(config.run_dir)) == 3
    monkeypatch.undo()
    assert train.run(config)["step"] == 6   # the same call resumes and finishes


def test_training_gives_back_the_sigterm_handler_it_found(tmp_path):
    def mine(*_):
        pass
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train.run(small_config(tmp_path / "run", steps=2))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stage_spec(run_dir, steps) -> dict:
    config = small_config(run_dir, steps=steps)
    return {"stages": [{"name": "stage1", "config": json.loads(config.to_json_best_effort())}]}


def test_a_stage_is_done_by_its_committed_final_checkpoint_not_its_metrics_log(tmp_path):
    run_dir = tmp_path / "stage"
    spec = _stage_spec(run_dir, steps=4)
    cell.run_stages(spec)
    cfg = ml_collections.ConfigDict(spec["stages"][0]["config"])
    assert cell.stage_finished(cfg)
    # A host lost while the final save was being written: the metrics log already says step 4, the checkpoint
    # of step 4 never committed.
    ckpt = checkpoints.directory(str(run_dir))
    shutil.rmtree(os.path.join(ckpt, "4"))
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert not cell.stage_finished(cfg)
    assert cell.run_stages(spec) > 0   # trained again from step 2
    assert checkpoints.committed_step(ckpt) == 4


def test_a_finished_stage_saved_under_another_config_is_an_error_naming_the_key(tmp_path):
    run_dir = tmp_path / "stage"
    cell.run_stages(_stage_spec(run_dir, steps=2))
    changed = _stage_spec(run_dir, steps=2)
    changed["stages"][0]["config"]["train"]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"another config:\n  train.lr: "):
        cell.run_stages(changed)


@pytest.mark.parametrize("process_0_says", ["finished", "not finished", "config changed"])
def test_every_process_follows_process_0_on_whether_a_stage_is_finished(process_0_says, tmp_path, monkeypatch):
    """Multi-host: process 0 creates the checkpoint folder as it starts a stage, so another process looking for
    itself may see another state and enter other collectives (seen on a 2-task Slurm job). Here this process's
    own look says "not finished, nothing there" and the broadcast brings process 0's answer."""
    answer = {"finished": cell._FINISHED, "not finished": cell._NOT_FINISHED,
              "config changed": cell._CONFIG_CHANGED}[process_0_says]
    seen = []
    monkeypatch.setattr(cell, "_from_process_0", lambda mine: seen.append(mine) or answer)
    monkeypatch.setattr(train, "run", lambda cfg: seen.append("trained"))
    spec = _stage_spec(tmp_path / "never-started", steps=2)
    if process_0_says == "config changed":
        with pytest.raises(ValueError, match="another config"):
            cell.run_stages(spec)
    else:
        cell.run_stages(spec)
    assert seen == [cell._NOT_FINISHED] + (["trained"] if process_0_says == "not finished" else [])


def test_a_preempted_stage_ends_the_job_without_a_result(tmp_path, monkeypatch):
    calls = []

    def preempted(cfg):
        calls.append(cfg.run_dir)
        raise train.Preempted(1, cfg.train.steps)
    monkeypatch.setattr(train, "run", preempted)
    spec = _stage_spec(tmp_path / "s1", steps=2)
    spec["stages"].append(_stage_spec(tmp_path / "s2", steps=2)["stages"][0])
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.json").write_text(json.dumps(dict(spec, eval=None, row=None)))
    with pytest.raises(train.Preempted):
        cell.run_job(str(job_dir))
    assert calls == [str(tmp_path / "s1")]        # the next stage never started from the partial checkpoint
    assert not (job_dir / "result.json").exists()


def test_launchers_exit_75_when_stopped_and_keep_other_errors():
    def preempted(argv):
        raise train.Preempted(5, 10)

    def sigterm_outside_training(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()   # the handler's SystemExit ends the wait

    def broken(argv):
        raise KeyError("x")

    previous = signal.getsignal(signal.SIGTERM)
    try:
        for main in (preempted, sigterm_outside_training):
            with pytest.raises(SystemExit) as exit_:
                runtime.with_exit_codes(main)([])
            assert exit_.value.code == 75 == runtime.EXIT_STOPPED
        with pytest.raises(KeyError):
            runtime.with_exit_codes(broken)([])
    finally:
        signal.signal(signal.SIGTERM, previous)
