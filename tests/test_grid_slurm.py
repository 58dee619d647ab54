"""The slurm grid backend (vlm_jax/grid/slurm.py): its batch script, dry run, state parsing and config errors (fast),
then a small grid on a real one-node Slurm cluster started by the test (slow: tests/slurm_cluster.py).

The slow tests run configs/grid.py:smoke,llms=tiny-s,tokens=1+16 (a tower and an LLM pretrained, then 2 cells of 2
stages and an evaluation; a few steps each) three times into one grid folder, each job a Slurm job of 2 tasks
(2 JAX processes joined by jax.distributed under srun, on the CPU):

- undisturbed: every job through Slurm;
- disturbed: the cells again (the pretraining is done and skipped), and in each cell's stage 2, once a checkpoint
  is committed: tiny-s_v16's job requeued by the admin (`scontrol requeue <id>`: Slurm stops and requeues it), and
  tiny-s_v1's tasks sent SIGTERM (`scancel --signal=TERM`: what `--signal=TERM@lead` sends before the time limit;
  the cell checkpoints and exits 75, and its script requeues it);
- local: the cells once more on the local backend (one process, 2 CPU devices).

Asserted: the disturbed rows equal the undisturbed ones bitwise; the requeues happened (Restarts=1, the second run
resumed stage 2 from its checkpoint); the rows' non-training columns equal the local backend's, their errors within
3 binomial standard deviations (2 processes read other data shards than one: tests/test_tpu_grid_end_to_end.py);
no Slurm job and no cell process is left.

    python -m pytest -q -m slow tests/test_grid_slurm.py -s
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

import ml_collections
import numpy as np
import pytest

from vlm_jax.grid import backends, runner, slurm
from vlm_jax.grid.spec import GridJob
from vlm_jax.paths import REPO_ROOT

# ------------------------------------------------------------------------------------------------ fast


def job(tmp_path, name="tiny-s_v16") -> backends.Job:
    return runner.job_command(GridJob(name, str(tmp_path / "cells" / name), {"row": {}}))


def config(**overrides) -> ml_collections.ConfigDict:
    cfg = slurm.default_config()
    cfg.update(overrides)
    return cfg


def test_batch_script(tmp_path):
    cfg = config(nodes=2, ntasks_per_node=4, gres="gpu:4", cpus_per_task=8, time="2:00:00", signal_lead_s=240,
                 partition="gpu", max_requeues=5, setup="module load cuda", python="/venv/bin/python",
                 workdir="/shared/vlm-jax", sbatch_args="--exclusive --constraint=h100")
    script = slurm.batch_script(cfg, job(tmp_path))
    folder = tmp_path / "cells" / "tiny-s_v16" / "slurm"
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    options = [line[len("#SBATCH "):] for line in lines if line.startswith("#SBATCH ")]
    name = slurm.job_name("vlmjax", job(tmp_path))
    assert re.fullmatch(r"vlmjax-tiny-s_v16-[0-9a-f]{6}", name)
    assert options == [f"--job-name={name}", f"--output={folder}/%j.out", "--open-mode=append", "--nodes=2",
                       "--ntasks-per-node=4", "--requeue", "--signal=TERM@240", "--partition=gpu", "--gres=gpu:4",
                       "--cpus-per-task=8", "--time=2:00:00", "--exclusive", "--constraint=h100"]
    body = lines[len(options) + 1:]
    assert "cd /shared/vlm-jax || exit 1" in body and "module load cuda" in body
    srun = f"srun /venv/bin/python -m launch.cell --job_dir={tmp_path}/cells/tiny-s_v16 --distributed"
    assert srun in body and body.index("module load cuda") < body.index(srun)
    after = "\n".join(body[body.index(srun):])
    # exit 75 -> the script requeues its own job, unless the launcher is stopping it or it ran max_requeues times
    assert (f'if [ "$rc" = 75 ] && [ ! -e {folder}/stop ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt 5 ]; then'
            in after), after
    assert 'scontrol requeue "$SLURM_JOB_ID"' in after and after.rstrip().endswith('exit "$rc"')
    assert "'" not in script   # the dry run prints it inside single quotes


def test_batch_script_defaults(tmp_path):
    script = slurm.batch_script(config(), job(tmp_path))
    assert "#SBATCH --signal=TERM@300" in script and "#SBATCH --ntasks-per-node=1" in script
    assert not re.search(r"--(gres|gpus-per-task|time|partition|cpus-per-task)=", script)
    assert f"cd {REPO_ROOT} || exit 1" in script   # this checkout, this interpreter: a shared file system
    assert f"srun {sys.executable} -m launch.cell" in script
    assert "--signal" not in slurm.batch_script(config(signal_lead_s=0), job(tmp_path))


def test_dry_run_prints_each_script(tmp_path):
    jobs = [GridJob(n, str(tmp_path / "cells" / n), {"row": {}}) for n in ("tiny-s_v1", "tiny-s_v16")]
    lines = []
    runner.dry_run(jobs, backends.make("slurm", config(ntasks_per_node=2)), lines.append)
    text = "\n".join(lines)
    for j in jobs:
        path = f"{j.dir}/slurm/job.sbatch"
        assert f"cat > {path} <<\\EOF\n#!/bin/bash\n" in text
        assert f"\nsbatch --parsable {path}\n" in text + "\n"
        assert f"srun {sys.executable} -m launch.cell --job_dir={j.dir} --distributed" in text
    assert text.count("#SBATCH --ntasks-per-node=2") == 2


# `scontrol show job -o` as Slurm 22.05 prints it (shortened), in the states the backend meets.
SHOW = ("JobId=7 JobName=vlmjax-tiny-s_v1-abc123 UserId=root(0) Priority=4294901759 Nice=0 Account=(null) "
        "JobState={state} Reason={reason} Dependency=(null) Requeue=1 Restarts={restarts} BatchFlag=1 Reboot=0 "
        "ExitCode={code} RunTime=00:00:08 TimeLimit=UNLIMITED NodeList=vm Command=/x/job.sbatch WorkDir=/x "
        "StdOut=/x/7.out Power=")


@pytest.mark.parametrize("state,code,expected", [
    ("PENDING", "0:0", None), ("RUNNING", "0:0", None), ("COMPLETING", "0:0", None), ("REQUEUED", "0:0", None),
    ("REQUEUE_HOLD", "0:0", None), ("SPECIAL_EXIT", "75:0", None), ("SUSPENDED", "0:0", None),
    ("COMPLETED", "0:0", 0),
    ("FAILED", "75:0", 75),      # stopped with a checkpoint, not requeued (max_requeues, or the launcher stopping)
    ("FAILED", "1:0", 1), ("FAILED", "0:9", 137),
    ("CANCELLED", "0:15", 143), ("CANCELLED", "0:0", 75), ("TIMEOUT", "0:0", 75), ("NODE_FAIL", "0:0", 75),
    ("PREEMPTED", "0:0", 75), ("OUT_OF_MEMORY", "0:0", 1),
    ("BOOT_FAIL", "0:0", 1),
])
def test_verdict_of_scontrol_output(state, code, expected):
    info = slurm.parse_job(SHOW.format(state=state, reason="None", restarts=1, code=code))
    assert info["JobState"] == state and info["ExitCode"] == code and info["Restarts"] == "1"
    assert info["NodeList"] == "vm" and info["JobName"] == "vlmjax-tiny-s_v1-abc123"
    assert slurm.verdict(info) == expected


def test_never_success_unless_completed_with_0():
    for state in slurm.ENDED:
        for code in ("0:0", "75:0", "1:0", "0:15"):
            rc = slurm.verdict({"JobState": state, "ExitCode": code})
            assert (rc == 0) == (state == "COMPLETED" and code == "0:0"), (state, code, rc)


@pytest.mark.parametrize("key,value,message", [
    ("ntasks_per_node", 0, "config.slurm.ntasks_per_node must be a whole number >= 1, not 0"),
    ("nodes", -1, "config.slurm.nodes must be a whole number >= 1"),
    ("max_requeues", -1, "config.slurm.max_requeues must be a whole number >= 0"),
    ("time", "two hours", "not a Slurm time limit"),
    ("sbatch_args", "--comment='open", "config.slurm.sbatch_args: No closing quotation"),
    ("poll_s", 0.0, "config.slurm.poll_s must be > 0"),
])
def test_config_errors(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        backends.make("slurm", config(**{key: value}))


def test_bucket_grid_needs_a_script_dir(tmp_path):
    gs = backends.Job("c", ("python", "-m", "launch.cell", "--job_dir=gs://b/grid/cells/c"))
    with pytest.raises(ValueError, match="set config.slurm.script_dir"):
        slurm.batch_script(config(), gs)
    assert f"--output={tmp_path}/vlmjax-c-" in slurm.batch_script(config(script_dir=str(tmp_path)), gs)
    with pytest.raises(ValueError, match="needs config.slurm"):
        backends.make("slurm", None)


def test_grid_configs_carry_the_slurm_config():
    from configs import grid
    for variant in ("smoke", "paper"):
        assert grid.get_config(variant).slurm.to_dict() == slurm.default_config().to_dict()


# ------------------------------------------------------------------------------------------------ slow: real Slurm

GRID = os.path.join(REPO_ROOT, "configs", "grid.py") + ":smoke,llms=tiny-s,tokens=1+16"
CELLS = ("tiny-s_v1", "tiny-s_v16")
STAGE2_STEPS, EVERY = 30, 5
REQUEUED, SIGTERMED = "tiny-s_v16", "tiny-s_v1"
GRID_TIMEOUT_S = 1200


def small_flags() -> list[str]:
    from tests.emulated_tpu import run_grid
    return [*run_grid.SMALL, f"--config.stages.stage2.train.steps={STAGE2_STEPS}",
            f"--config.cell.train.checkpoint_every={EVERY}", f"--config.cell.train.log_every={EVERY}"]


SLURM_FLAGS = ["--config.backend=slurm", "--config.slurm.ntasks_per_node=2", "--config.slurm.cpus_per_task=1",
               "--config.slurm.setup=export JAX_PLATFORMS=cpu", "--config.slurm.poll_s=1",
               "--config.slurm.stop_grace_s=60"]


@pytest.fixture(scope="module")
def cluster():
    from tests import slurm_cluster
    folder = tempfile.mkdtemp(prefix="vlmjax-slurm-")   # not pytest's tmp: munged's socket needs a 0755 path
    try:
        with slurm_cluster.cluster(folder) as c:
            yield c
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no Slurm cluster can run here: {e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def launch(grid_dir: str, flags: list[str], env: dict, cwd: str):
    """launch.grid on the small grid; a TimeoutError after GRID_TIMEOUT_S (run_grid.launch then kills it)."""
    from tests.emulated_tpu import run_grid

    def expired(*_):
        raise TimeoutError(f"the grid in {grid_dir}: more than {GRID_TIMEOUT_S} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(GRID_TIMEOUT_S)
    try:
        return run_grid.launch(GRID, grid_dir, [*small_flags(), *flags], env=env, cwd=cwd)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def stage2_checkpoints(cell_dir: str) -> list[int]:
    d = os.path.join(cell_dir, "stage2", "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


class Disturber(threading.Thread):
    """Once a cell's stage 2 has a committed checkpoint (and is not at its end): the admin's requeue of one cell's
    job, SIGTERM to the other's tasks, each once; what it did, with the checkpoint steps it saw."""

    def __init__(self, cluster, grid_dir: str):
        super().__init__(daemon=True)
        self.cluster, self.grid_dir = cluster, grid_dir
        self.done, self.actions = threading.Event(), {}

    def job_id(self, cell: str) -> str | None:
        name = slurm.job_name("vlmjax", runner.job_command(GridJob(cell, f"{self.grid_dir}/cells/{cell}", {})))
        out = self.cluster.run("squeue", "--noheader", f"--name={name}", "--format=%i %T", check=False).stdout.split()
        return out[0] if out[1:2] == ["RUNNING"] else None

    def run(self):
        while not self.done.wait(0.2) and len(self.actions) < 2:
            for cell, argv in ((REQUEUED, ["scontrol", "requeue"]), (SIGTERMED, ["scancel", "--signal=TERM"])):
                steps = stage2_checkpoints(f"{self.grid_dir}/cells/{cell}")
                if cell in self.actions or not steps or steps[-1] >= STAGE2_STEPS - EVERY:
                    continue
                job_id = self.job_id(cell)
                if job_id:
                    out = self.cluster.run(*argv, job_id, check=False)
                    self.actions[cell] = {"job": job_id, "argv": [*argv, job_id], "rc": out.returncode,
                                          "checkpoints": steps, "output": out.stdout + out.stderr}
                    print(f"disturbed {cell}: $ {' '.join(argv)} {job_id} (stage-2 checkpoints {steps}) -> "
                          f"{out.returncode}", flush=True)


def cell_processes(grid_dir: str) -> list[str]:
    """Command lines of live processes running a job of this grid."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "launch.cell" in cmd and grid_dir in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def rows_of(run) -> dict:
    return {(r["cell"], r["task"]): {k: v for k, v in r.items() if k != "train_s"} for r in run.rows}


def launch_slurm(grid_dir: str, env: dict, cwd: str):
    """The grid through the slurm backend. (A job's processes once each decided by themselves whether a stage's
    checkpoint folder existed and entered different collectives; they follow process 0 now: cell.run_stages.)"""
    return launch(grid_dir, SLURM_FLAGS, env, cwd)


def read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def runs(cluster):
    """The three grid runs (module docstring), once; what the tests read."""
    work = tempfile.mkdtemp(prefix="vlmjax-slurm-grid-")
    try:
        grid_dir = os.path.join(work, "grid")
        env = dict(cluster.env, PYTHONPATH=REPO_ROOT, VLM_JAX_COMPILATION_CACHE=os.path.join(work, "xla-cache"))
        cwd = os.path.join(work, "launcher")
        os.makedirs(cwd)
        out: dict = {"grid_dir": grid_dir}
        t0 = time.monotonic()
        out["undisturbed"] = launch_slurm(grid_dir, env, cwd)
        out["t_undisturbed"] = time.monotonic() - t0
        if out["undisturbed"].rc == 0:
            os.rename(f"{grid_dir}/cells", f"{grid_dir}/cells-undisturbed")
            disturber = Disturber(cluster, grid_dir)
            disturber.start()
            t1 = time.monotonic()
            try:
                out["disturbed"] = launch_slurm(grid_dir, env, cwd)
            finally:
                disturber.done.set()
                disturber.join()
            out["t_disturbed"] = time.monotonic() - t1
            out["actions"] = disturber.actions
            out["show"] = {cell: slurm.parse_job(cluster.run("scontrol", "show", "job", "-o", a["job"], check=False).stdout)
                           for cell, a in disturber.actions.items()}
            out["logs"] = {cell: read(f"{grid_dir}/cells/{cell}/log.txt") or "" for cell in CELLS}
            out["queue"] = cluster.run("squeue", "--noheader", check=False).stdout
            out["processes"] = cell_processes(grid_dir)
            os.rename(f"{grid_dir}/cells", f"{grid_dir}/cells-disturbed")
            local_env = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"))
            t2 = time.monotonic()
            out["local"] = launch(grid_dir, ["--config.backend=local"], local_env, cwd)
            out["t_local"] = time.monotonic() - t2
        print(f"\nslurm grid runs: undisturbed {out['t_undisturbed']:.0f} s, disturbed {out.get('t_disturbed', 0):.0f} s, "
              f"local {out.get('t_local', 0):.0f} s")
        yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_undisturbed_grid_on_slurm(runs):
    run = runs["undisturbed"]
    assert run.rc == 0, run.output
    assert sorted(rows_of(run)) == [(c, t) for c in CELLS for t in ("detail", "reasoning")]
    log = read(f"{runs['grid_dir']}/cells-undisturbed/{CELLS[0]}/log.txt") or ""
    print(log[:2500])
    assert "#SBATCH --ntasks-per-node=2" in log and "COMPLETED" in log
    meshes = re.findall(r"mesh \{.*?\} over (\d+) devices", log)
    assert len(meshes) >= 2 and set(meshes) == {"2"}, log   # both stages: 2 processes, a device each


def check_requeued_cells_resume_and_equal_the_undisturbed_rows(runs):
    run = runs.get("disturbed")
    assert run is not None, "the undisturbed run failed"
    assert run.rc == 0, run.output
    assert set(runs["actions"]) == {REQUEUED, SIGTERMED}, runs["actions"]
    assert all(a["rc"] == 0 for a in runs["actions"].values()), runs["actions"]
    for cell in CELLS:
        log, show = runs["logs"][cell], runs["show"][cell]
        print(f"--- {cell}: its log, the Slurm lines")
        print("\n".join(line for line in log.splitlines() if re.search(
            r"\[slurm\]|\[launcher\] job|resumed from step|stopped on request|already finished|requeue", line)))
        print(f"--- {cell}: {runs['actions'][cell]['argv']}, then scontrol: JobState={show.get('JobState')} "
              f"Restarts={show.get('Restarts')} ExitCode={show.get('ExitCode')}")
        assert show.get("JobState") == "COMPLETED" and show.get("Restarts") == "1", show
        resumed = {int(s) for s in re.findall(r"resumed from step (\d+)", log)}   # each process says it
        assert len(resumed) == 1 and EVERY <= min(resumed) < STAGE2_STEPS, (cell, resumed, log[-3000:])
        assert "stage stage1: already finished, skipped" in log, log[-3000:]
        assert re.search(r"\[slurm\] job \d+ on \S+, run 2,", log), log[-3000:]
    assert re.search(r"requeueing job \d+", runs["logs"][SIGTERMED])   # its own script requeued it after exit 75
    assert re.search(r"stopped on request after step \d+", runs["logs"][SIGTERMED])
    assert not re.search(r"requeueing job \d+", runs["logs"][REQUEUED])   # Slurm requeued that one
    for key, row in sorted(rows_of(run).items()):
        print(f"  {key}: disturbed {row}\n  {' ' * len(str(key))}  undisturbed {rows_of(runs['undisturbed'])[key]}")
    assert rows_of(run) == rows_of(runs["undisturbed"])   # bitwise (every computed column)
    assert runs["queue"].strip() == "" and runs["processes"] == [], (runs["queue"], runs["processes"])


def check_slurm_rows_against_the_local_backend(runs):
    run, local = runs.get("disturbed"), runs.get("local")
    assert run is not None and local is not None and local.rc == 0, local.output if local else "no local run"
    a_rows, b_rows = rows_of(local), rows_of(runs["undisturbed"])
    assert sorted(a_rows) == sorted(b_rows)
    for key in sorted(a_rows):
        a, b, q = a_rows[key]["error"], b_rows[key]["error"], a_rows[key]["questions"]
        bound = max(1 / q, 3 * np.sqrt((a * (1 - a) + b * (1 - b)) / q))
        print(f"  {key}: error local {a:.3f}, slurm {b:.3f} (bound {bound:.3f})")
        assert abs(a - b) <= bound + 1e-9, key
        drop = ("error", "accuracy", "benchmarks")
        assert {k: v for k, v in a_rows[key].items() if k not in drop} == {
            k: v for k, v in b_rows[key].items() if k not in drop}, key
    assert cell_processes(runs["grid_dir"]) == []


@pytest.mark.slow
def test_grid_on_a_real_slurm_cluster(runs):
    """One test, so that pytest-xdist (-n auto, as .ci/run runs the slow tests) never starts two clusters: the
    module fixture would start one per test process, and two clusters here would share ports and one munged."""
    check_undisturbed_grid_on_slurm(runs)
    check_requeued_cells_resume_and_equal_the_undisturbed_rows(runs)
    check_slurm_rows_against_the_local_backend(runs)
