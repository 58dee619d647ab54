"""The tpu grid backend end to end on the emulated Cloud TPU service (tests/emulated_tpu): a slice of 2 local worker
"hosts", set up as a real VM is (a clone of this working tree's snapshot at its commit, Python found on PATH, a venv),
running a job that joins both workers with jax.distributed, followed through the "bucket" (a local folder; one
test on the GCS emulator), with the faults a real grid meets: dropped ssh connections, transient gcloud failures,
preemption, SIGTERM, workers that die, and a launcher that stops."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.emulated_tpu import fake_gcloud, harness
from vlm_jax.grid import backends, tpu
from vlm_jax.paths import REPO_ROOT

try:
    from tests.gcs_emulator import gcs_bucket  # noqa: F401 (a fixture)
except ImportError:   # not there yet: the gs:// test is skipped
    gcs_bucket = None

TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def _deadline():
    """A test here fails after TIMEOUT_S rather than hanging (the backend's finally still deletes the slice)."""
    def expired(*_):
        raise TimeoutError(f"test took more than {TIMEOUT_S} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """(bare repository, commit): this working tree as the workers will clone it."""
    return harness.snapshot(str(tmp_path_factory.mktemp("repo")))


class Service:
    """The emulated service of one test: faults, the gcloud calls made, and one job run through the backend."""

    def __init__(self, root, bucket: str, repo, tmp_path):
        self.root, self.bucket, self.repo, self.tmp = str(root), bucket.rstrip("/"), repo, tmp_path

    def faults(self, *faults: dict) -> None:
        fake_gcloud.write_faults(self.root, list(faults))

    def job_dir(self, name: str) -> str:
        return f"{self.bucket}/cells/{name}"

    def backend(self, **overrides) -> tpu.TpuBackend:
        return tpu.TpuBackend(harness.tpu_config(*self.repo, **overrides))

    def run(self, name="cell", spec=None, backend=None, **overrides) -> tuple[int, str]:
        """(exit code, the launcher's log) of the fake job `name` run through the backend; `spec`: fake_job.json."""
        from vlm_jax import files
        job_dir = self.job_dir(name)
        files.write_json_atomic(f"{job_dir}/fake_job.json", spec or {})
        job = backends.Job(name, ("python", "-m", "tests.emulated_tpu.fake_job", f"--job_dir={job_dir}"))
        log = self.tmp / f"{name}.log"
        start = time.monotonic()
        rc = (backend or self.backend(**overrides)).run(job, str(log))
        print(f"{name}: exit code {rc} in {time.monotonic() - start:.1f}s; gcloud calls:")
        for argv in fake_gcloud.calls(self.root):
            print("   ", " ".join(argv[2:5]))
        return rc, log.read_text()

    def verbs(self) -> list[str]:
        return [argv[3] for argv in fake_gcloud.calls(self.root)]

    def read(self, path: str):
        from etils import epath
        p = epath.Path(path)
        return json.loads(p.read_text()) if p.exists() else None

    def statuses(self, name: str, attempt: int) -> list[dict | None]:
        return [self.read(f"{self.job_dir(name)}/attempts/{attempt:03d}/worker-{i}.json") for i in range(2)]

    def on_workers(self, relpath: str) -> list[str]:
        """The file at ~/vlm-jax/<relpath> of every worker of every slice so far (the emulated VMs' disks)."""
        found = sorted(glob.glob(os.path.join(self.root, "vms", "*", "w*", "vlm-jax", relpath)))
        return [open(path).read() for path in found]

    def left_running(self) -> list[int]:
        return fake_gcloud.marked_pids(os.path.realpath(self.root) + "|")


def _service(tmp_path, monkeypatch, repo, bucket: str) -> Service:
    root = tmp_path / "service"
    monkeypatch.setenv("PATH", harness.worker_bin(str(tmp_path / "bin")))
    monkeypatch.setenv(fake_gcloud.ROOT_ENV, str(root))
    monkeypatch.delenv(fake_gcloud.HOSTS_ENV, raising=False)   # v5p-16: 2 hosts, by the service's own rule
    return Service(root, bucket, repo, tmp_path)


@pytest.fixture
def service(tmp_path, monkeypatch, repo):
    svc = _service(tmp_path, monkeypatch, repo, str(tmp_path / "bucket"))
    yield svc
    fake_gcloud.kill_all(svc.root)


def _follow_verbs(verbs: list[str]) -> None:
    """One attempt's gcloud calls: create, describe until ACTIVE, set-up, start, describes while following, delete."""
    assert verbs[:6] == ["create", "describe", "describe", "describe", "ssh", "ssh"], verbs
    assert verbs[-1] == "delete" and set(verbs[6:-1]) == {"describe"}, verbs


# ------------------------------------------------------------------------------------------------ the path

def test_a_job_runs_detached_on_every_worker_and_reports_through_the_bucket(service, repo):
    rc, log = service.run(install=harness.install_command(check=True))   # pip confirms requirements.txt is met
    assert rc == 0, log[-3000:]
    _follow_verbs(service.verbs())
    result = service.read(f"{service.job_dir('cell')}/fake_result.json")
    assert result["processes"] == [0, 1]                        # both workers joined through jax.distributed
    assert result["commit"] == repo[1]                          # the launcher's commit, not a branch
    assert result["prefix"].endswith("/vlm-jax/.venv") and result["python"] >= [3, 11]   # the venv's Python
    assert [(s["state"], s["exit_code"]) for s in service.statuses("cell", 1)] == [("exited", 0)] * 2
    assert "[worker 1] fake job: process 1 of 2, joined [0, 1]" in log   # the workers' logs, in the launcher's
    assert "Python: python3.11 (3.11)" in log
    assert not service.left_running()                           # delete took every process with it


def test_dropped_ssh_connections_cost_nothing(service):
    service.faults({"action": "drop_ssh", "match": "-m venv", "after_s": 0.3},   # the set-up, cut mid-way
                   {"action": "drop_ssh", "match": "launch.worker", "after_s": 30})   # the start: its status lost
    rc, log = service.run(spec={"steps": 10, "step_s": 0.2})
    assert rc == 0, log[-3000:]
    verbs = service.verbs()
    assert verbs[:7] == ["create", "describe", "describe", "describe", "ssh", "ssh", "ssh"], verbs
    assert verbs.count("ssh") == 4 and verbs.count("create") == 1   # each ssh once more, no new slice
    assert log.count("closed by remote host") == 2
    outs = service.on_workers("logs/worker.out")
    assert len(outs) == 2 and all("already started on this worker" in out for out in outs), outs   # ran once
    assert log.count("from step 0") == 2 and not service.read(f"{service.job_dir('cell')}/attempts/002/worker-0.json")


def test_transient_gcloud_failures_are_retried(service):
    service.faults({"action": "fail", "verb": "create", "count": 1},
                   {"action": "fail", "verb": "describe", "count": 2},
                   {"action": "fail", "verb": "delete", "count": 1})
    rc, log = service.run()
    assert rc == 0, log[-3000:]
    verbs = service.verbs()
    assert verbs[:2] == ["create", "create"] and verbs[-2:] == ["delete", "delete"], verbs
    assert log.count("retrying in") == 4 and log.count("UNAVAILABLE") == 4


# ------------------------------------------------------------------------------------------------ resume

def test_a_preempted_slice_is_provisioned_again_and_the_job_resumes(service):
    checkpoint = f"{service.job_dir('cell')}/checkpoint.json"
    service.faults({"action": "preempt", "when_exists": checkpoint, "grace_s": 2})
    rc, log = service.run(spec={"steps": 6, "step_s": 0.5})
    assert rc == 0, log[-3000:]
    verbs = service.verbs()
    assert verbs.count("create") == 2 and verbs.count("delete") == 2, verbs
    assert "the slice is PREEMPTED" in log
    assert [s["exit_code"] for s in service.statuses("cell", 1)] == [75, 75]   # their last word, then deleted
    assert service.read(f"{service.job_dir('cell')}/fake_result.json")["resumed_from"] >= 1   # from its checkpoint
    assert [(s["state"], s["exit_code"]) for s in service.statuses("cell", 2)] == [("exited", 0)] * 2


def test_exit_75_on_an_active_slice_resumes_on_a_new_one(service):
    checkpoint = f"{service.job_dir('cell')}/checkpoint.json"
    service.faults({"action": "sigterm", "worker": 1, "when_exists": checkpoint})   # one host's SIGTERM
    rc, log = service.run(spec={"steps": 6, "step_s": 0.5})
    assert rc == 0, log[-3000:]
    assert [s["exit_code"] for s in service.statuses("cell", 1)] == [75, 75]   # both stopped, checkpoint saved
    assert service.verbs().count("create") == 2 and "exit code 75" in log
    assert service.read(f"{service.job_dir('cell')}/fake_result.json")["resumed_from"] >= 1


def test_a_job_that_always_exits_75_is_never_a_success(service):
    rc, log = service.run(spec={"stop": True}, max_attempts=2)
    assert rc == tpu.EX_TEMPFAIL, log[-3000:]
    verbs = service.verbs()
    assert verbs.count("create") == 2 and verbs.count("delete") == 2 and verbs[-1] == "delete", verbs
    assert "no attempt left" in log and not service.read(f"{service.job_dir('cell')}/fake_result.json")


def test_a_failing_job_fails_once_and_its_slice_is_deleted(service):
    rc, log = service.run(spec={"exit_code": 3})
    assert rc == 3, log[-3000:]
    _follow_verbs(service.verbs())
    assert not service.left_running()


@pytest.mark.slow
def test_workers_that_die_without_a_word_are_resumed_elsewhere(service):
    checkpoint = f"{service.job_dir('cell')}/checkpoint.json"
    service.faults({"action": "sigkill", "worker": 0, "when_exists": checkpoint})   # wrapper and job: no status
    rc, log = service.run(spec={"steps": 6, "step_s": 0.5}, heartbeat_timeout_s=4.0, settle_s=4.0)
    assert rc == 0, log[-3000:]
    assert service.statuses("cell", 1)[0]["state"] == "running"   # its last word
    assert service.verbs().count("create") == 2
    assert service.read(f"{service.job_dir('cell')}/fake_result.json")["resumed_from"] >= 1


def test_a_stopping_launcher_stops_the_job_on_a_checkpoint_and_deletes_the_slice(service):
    backend = service.backend()
    running = f"{service.job_dir('cell')}/running"

    def stop_once_running():
        while not os.path.exists(running):
            time.sleep(0.1)
        backend.stop()
    stopper = threading.Thread(target=stop_once_running, daemon=True)
    stopper.start()
    rc, log = service.run(spec={"steps": 100, "step_s": 0.2}, backend=backend)
    stopper.join(30)
    assert rc == tpu.EX_TEMPFAIL and not stopper.is_alive(), log[-3000:]
    assert [s["exit_code"] for s in service.statuses("cell", 1)] == [75, 75]
    assert service.verbs()[-1] == "delete" and service.verbs().count("create") == 1
    assert not service.left_running()


LAUNCHER = """
import sys
from tests.emulated_tpu import harness
from vlm_jax.grid import backends, tpu
from vlm_jax.paths import REPO_ROOT
backend = tpu.TpuBackend(harness.tpu_config(sys.argv[1], sys.argv[2]))
job = backends.Job("cell", ("python", "-m", "tests.emulated_tpu.fake_job", "--job_dir=" + sys.argv[3]))
sys.exit(backend.run(job, sys.argv[4]))
"""


def test_a_launcher_that_dies_leaves_the_job_running_and_the_next_one_takes_the_slice_over(service, repo):
    from vlm_jax import files
    job_dir = service.job_dir("cell")
    files.write_json_atomic(f"{job_dir}/fake_job.json", {"steps": 8, "step_s": 0.5})
    first = subprocess.Popen([sys.executable, "-c", LAUNCHER, *repo, job_dir, str(service.tmp / "first.log")],
                             cwd=REPO_ROOT)
    while not service.read(f"{job_dir}/checkpoint.json"):   # the job has taken a step on the slice
        assert first.poll() is None, (service.tmp / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    first.kill()   # SIGKILL: no finally, no delete: the slice and its job run on
    first.wait()
    time.sleep(1)
    assert service.statuses("cell", 1)[0]["state"] == "running"

    rc, log = service.run(spec={"steps": 8, "step_s": 0.5})   # the grid run again
    assert rc == 0, log[-3000:]
    assert "ALREADY_EXISTS" in log and service.verbs().count("create") == 2 and service.verbs().count("delete") == 1
    assert [s["exit_code"] for s in service.statuses("cell", 1)] == [75, 75]   # stopped on a checkpoint ...
    assert service.read(f"{job_dir}/fake_result.json")["resumed_from"] >= 1    # ... and resumed from it
    assert not service.left_running()


# ------------------------------------------------------------------------------------------------ a real bucket

@pytest.mark.slow
@pytest.mark.skipif(gcs_bucket is None, reason="tests/gcs_emulator.py is not there")
def test_a_job_reports_through_a_gcs_bucket(tmp_path, monkeypatch, repo, request):
    bucket = request.getfixturevalue("gcs_bucket")
    pytest.importorskip("gcsfs")
    svc = _service(tmp_path, monkeypatch, repo, f"{bucket}/{tmp_path.name}")
    try:
        svc.faults({"action": "preempt", "when_exists": f"{svc.job_dir('cell')}/checkpoint.json", "grace_s": 2})
        rc, log = svc.run(spec={"steps": 4, "step_s": 0.5})
        assert rc == 0, log[-3000:]
        assert svc.verbs().count("create") == 2
        assert [s["exit_code"] for s in svc.statuses("cell", 2)] == [0, 0]
        assert svc.read(f"{svc.job_dir('cell')}/fake_result.json")["processes"] == [0, 1]
    finally:
        fake_gcloud.kill_all(svc.root)
