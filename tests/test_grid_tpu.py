"""The 'tpu' grid backend: the exact gcloud commands of a grid, runtime versions and slice sizes, retries, the
workers' set-up (the launcher's commit, a Python >= 3.11, the venv) and its provisioning against a fake gcloud. Whole
jobs on the emulated service (tests/emulated_tpu): tests/test_emulated_tpu.py."""

import ast
import graphlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

from configs import grid as grid_config
from configs import models
from vlm_jax.grid import backends, runner, spec, tpu
from vlm_jax.paths import REPO_ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"
JOB = backends.Job("tiny-l_v16", ("python", "-m", "launch.cell", "--job_dir=gs://bucket/grid/cells/tiny-l_v16"))


def tpu_config(**overrides):
    cfg = tpu.default_config()
    cfg.update(dict(project="my-proj", zone="us-west4-a", repo_url="https://github.com/example/vlm-jax.git",
                    commit=COMMIT))
    cfg.update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def _deadline():
    """Every test here fails within 60 s rather than hanging (a subprocess that never returns, a poll loop)."""
    def expired(*_):
        raise TimeoutError("test took more than 60 s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ dry run

def test_dry_run_prints_every_gcloud_command_of_a_two_cell_grid():
    grid = grid_config.get_config("smoke,llms=tiny-s,tokens=1+4")
    grid.unlock()
    grid.dir = "gs://bucket/grid"
    grid.seeds = (0,)
    grid.backend = "tpu"
    grid.tower.pretrain = False   # its name is a hash of the whole run config: not this test's concern
    grid.llm_pretrain.pretrain = False   # (the same)
    grid.tpu = tpu_config(spot=True, accelerator_types="tiny-s_v4=v5litepod-32,qwen*=v5litepod-64")
    grid.lock()

    # What `launch.grid --dry_run` does.
    backend = backends.make(grid.backend, grid.get(grid.backend))
    first = spec.pretraining_jobs(grid, models.llm_config)
    cells = spec.cell_jobs(grid, models.llm_config, lambda model_cfg: 0, first)
    lines = []
    runner.dry_run(first + cells, backend, lines.append)

    setup = shlex.quote("--command=" + tpu.setup_script(grid.tpu, COMMIT))

    def start(cell):
        return shlex.quote(
            f"--command=cd ~/vlm-jax && mkdir -p logs && setsid nohup .venv/bin/python -m launch.worker"
            f" --status_dir=gs://bucket/grid/cells/{cell}/attempts/001 --heartbeat_s=30 --log_every_s=300 --"
            f" python -m launch.cell --job_dir=gs://bucket/grid/cells/{cell} --distributed >> logs/worker.out 2>&1"
            f' < /dev/null & echo "$(hostname): started launch.worker (pid $!)"')
    where = "--project=my-proj --zone=us-west4-a"
    assert lines == [
        "# tiny-s_v1: write gs://bucket/grid/cells/tiny-s_v1/job.json",
        f"gcloud compute tpus queued-resources create vlmjax-tiny-s-v1-fbb9d5 --node-id=vlmjax-tiny-s-v1-fbb9d5"
        f" {where} --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
        f"gcloud compute tpus queued-resources describe vlmjax-tiny-s-v1-fbb9d5 {where}"
        f" '--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v1-fbb9d5 --worker=all {where} {setup}",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v1-fbb9d5 --worker=all {where} {start('tiny-s_v1')}",
        f"gcloud compute tpus queued-resources delete vlmjax-tiny-s-v1-fbb9d5 {where} --force --quiet",
        "# tiny-s_v4: write gs://bucket/grid/cells/tiny-s_v4/job.json",
        f"gcloud compute tpus queued-resources create vlmjax-tiny-s-v4-7273ff --node-id=vlmjax-tiny-s-v4-7273ff"
        f" {where} --accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite --spot",
        f"gcloud compute tpus queued-resources describe vlmjax-tiny-s-v4-7273ff {where}"
        f" '--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v4-7273ff --worker=all {where} {setup}",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v4-7273ff --worker=all {where} {start('tiny-s_v4')}",
        f"gcloud compute tpus queued-resources delete vlmjax-tiny-s-v4-7273ff {where} --force --quiet",
    ]


def test_keep_leaves_out_the_delete():
    assert [argv[4] for argv in tpu.TpuBackend(tpu_config(keep=True)).commands(JOB)] == [
        "create", "describe", "ssh", "ssh"]


# ------------------------------------------------------------------------------------------------ run, fake gcloud

# Provisioning only: the job itself runs on the emulated service (test_emulated_tpu.py).
FAKE_GCLOUD = """#!{python}
import json, sys
args = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    n = sum('"describe"' in line for line in open({calls!r})) - {describe_failures}
    if n <= 0:
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) UNAVAILABLE: try again")
    states = {states!r}
    print(states[min(n, len(states)) - 1])
"""


def run_with_fake(tmp_path, states=("PROVISIONING", "FAILED"), describe_failures=0, **overrides):
    """(exit code, gcloud calls as argv lists, log text) of one job run against a fake gcloud."""
    calls, gcloud = tmp_path / "calls.jsonl", tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, calls=str(calls), states=list(states),
                                         describe_failures=describe_failures))
    gcloud.chmod(0o755)
    backend = tpu.TpuBackend(tpu_config(gcloud=str(gcloud), poll_seconds=0.0, retry_base_s=0.01, **overrides))
    rc = backend.run(JOB, str(tmp_path / "job" / "log.txt"))
    return rc, [json.loads(line) for line in calls.read_text().splitlines()], (tmp_path / "job" / "log.txt").read_text()


def verbs(calls):
    """create / describe / delete / ssh: the word after `gcloud compute tpus {queued-resources,tpu-vm}`."""
    return [c[3] for c in calls]


def test_failed_provisioning_fails_the_job_and_deletes(tmp_path):
    rc, calls, log = run_with_fake(tmp_path, states=("WAITING_FOR_RESOURCES", "FAILED"))
    assert rc != 0
    assert verbs(calls) == ["create", "describe", "describe", "delete"]
    assert "FAILED" in log


def test_describe_failing_twice_does_not_abandon_the_queued_resource(tmp_path):
    rc, calls, log = run_with_fake(tmp_path, states=("WAITING_FOR_RESOURCES", "FAILED"), describe_failures=2)
    assert verbs(calls) == ["create", "describe", "describe", "describe", "describe", "delete"]
    assert log.count("retrying in") == 2 and "queued resource vlmjax-tiny-l-v16-203cca: FAILED" in log
    assert rc == 1   # FAILED is the service's answer: no attempt would fix it


def test_describe_failing_through_every_retry_gives_up_and_deletes(tmp_path):
    rc, calls, log = run_with_fake(tmp_path, describe_failures=100, retries=2)
    assert rc == 1
    assert verbs(calls) == ["create", "describe", "describe", "describe", "delete"]
    assert "describe keeps failing: giving up" in log


def test_provision_timeout_fails_the_job_and_deletes(tmp_path):
    rc, calls, log = run_with_fake(tmp_path, states=("PROVISIONING",), provision_timeout_s=0)
    assert rc != 0
    assert verbs(calls) == ["create", "describe", "delete"]
    assert "still PROVISIONING" in log


def test_an_exception_while_waiting_still_deletes_the_slice(tmp_path, monkeypatch):
    def interrupted(seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(tpu.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_with_fake(tmp_path, states=("PROVISIONING",))
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert verbs(calls) == ["create", "describe", "delete"]


# ------------------------------------------------------------------------------------------------ names, types, errors

def test_resource_names_are_valid_gcp_names_and_distinct_for_distinct_jobs():
    odd = ["tiny-l_v16", "Tiny-L_V16", "tiny.l v16", "7b_v1", "_x_", "qwen1.5-14b_v576_s3" * 5,
           "qwen1.5-14b_v576_s3" * 6]   # the last two differ only beyond the 63-character cut
    jobs = [backends.Job(name, ("python", "-m", "launch.cell", f"--job_dir=/g/{i}")) for i, name in enumerate(odd)]
    jobs.append(backends.Job("tiny-l_v16", ("python", "-m", "launch.cell", "--job_dir=/other-grid/tiny-l_v16")))
    names = [tpu.resource_name("vlmjax", job) for job in jobs]
    for name in names:
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert "--" not in name, name
    assert len(set(names)) == len(names)
    assert names[0] == "vlmjax-tiny-l-v16-" + names[0][-6:]
    assert names[1] == "vlmjax-tiny-l-v16-" + names[1][-6:]   # lowercased, not dropped
    assert tpu.resource_name("", jobs[3]).startswith("j-7b-v1-")


def test_accelerator_types_map_job_names_first_match_wins():
    backend = tpu.TpuBackend(tpu_config(
        accelerator_types=" qwen1.5-7b_* = v5litepod-64, qwen1.5-*_v576=v5litepod-32 ,qwen1.5-*=v5litepod-16,"))
    assert backend.accelerator_type("qwen1.5-7b_v576") == "v5litepod-64"
    assert backend.accelerator_type("qwen1.5-4b_v576") == "v5litepod-32"
    assert backend.accelerator_type("qwen1.5-4b_v1") == "v5litepod-16"
    assert backend.accelerator_type("tower-abc") == "v5litepod-16"
    assert tpu.TpuBackend(tpu_config(accelerator_type="v5litepod-4")).accelerator_type("qwen1.5-7b_v1") == \
        "v5litepod-4"


@pytest.mark.parametrize("overrides, key", [
    (dict(project=""), "config.tpu.project"),
    (dict(zone=""), "config.tpu.zone"),
    (dict(repo_url=""), "config.tpu.repo_url"),
    (dict(accelerator_types="qwen*=v5litepod-64,v5litepod-8"), "config.tpu.accelerator_types"),
    (dict(accelerator_types="=v5litepod-8"), "config.tpu.accelerator_types"),
    (dict(accelerator_types="a=b=c"), "config.tpu.accelerator_types"),
    (dict(spot=True, reserved=True), "config.tpu.spot"),
])
def test_incomplete_config_fails_at_construction_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        backends.make("tpu", tpu_config(**overrides))


# ------------------------------------------------------------------------------------------------ registry

@pytest.mark.parametrize("first", ["vlm_jax.grid.backends", "vlm_jax.grid.spec", "vlm_jax.grid.tpu"])
def test_every_backend_is_registered_whichever_grid_module_is_imported_first(first):
    # a fresh interpreter: this one has imported the whole grid already
    code = f"import {first}; from vlm_jax.grid.backends import BACKENDS; print(*sorted(BACKENDS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.split() == ["local", "slurm", "tpu"]


def test_the_grid_modules_import_one_another_without_a_cycle():
    """Every import of one vlm_jax.grid module by another, at module level or inside a function."""
    grid_dir = os.path.dirname(backends.__file__)
    names = {f[:-3] for f in os.listdir(grid_dir) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in sorted(names):
        with open(os.path.join(grid_dir, name + ".py")) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "vlm_jax.grid":
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlm_jax.grid."):
                imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[2] for a in node.names if a.name.startswith("vlm_jax.grid.")}
        graph[name] = imported & names
    assert graph["tpu"] == {"backends"} and "tpu" not in graph["backends"]
    list(graphlib.TopologicalSorter(graph).static_order())   # raises CycleError naming a cycle


# ------------------------------------------------------------------------------------------------ runtime, hosts

@pytest.mark.parametrize("kind, runtime, workers", [
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5litepod-64", "v2-alpha-tpuv5-lite", 16),
    ("v5p-8", "v2-alpha-tpuv5", 1),
    ("v5p-32", "v2-alpha-tpuv5", 4),
    ("v6e-8", "v2-alpha-tpuv6e", 1),
    ("v6e-32", "v2-alpha-tpuv6e", 8),
    ("v4-32", "tpu-ubuntu2204-base", 4),
])
def test_runtime_version_and_workers_follow_the_accelerator_type(kind, runtime, workers):
    from tests.emulated_tpu import fake_gcloud
    cfg = tpu_config()
    assert tpu.runtime_version(cfg, kind) == runtime
    assert tpu.hosts(cfg, kind) == workers == fake_gcloud.hosts(kind)   # the service's own rule agrees
    assert runtime in fake_gcloud.GENERATIONS[kind.split("-")[0]][0]
    assert tpu.runtime_version(tpu_config(runtime_version="tpu-vm-custom"), kind) == "tpu-vm-custom"   # explicit wins
    assert tpu.hosts(tpu_config(hosts=2), kind) == 2


def test_each_cell_asks_for_the_runtime_of_its_own_slice():
    backend = tpu.TpuBackend(tpu_config(accelerator_types="qwen1.5-7b_*=v5p-32,qwen1.5-4b_*=v6e-16"))
    runtimes = {name: next(a for a in backend.commands(backends.Job(name, JOB.argv))[0]
                           if a.startswith("--runtime-version="))
                for name in ("qwen1.5-7b_v1", "qwen1.5-4b_v1", "qwen1.5-0.5b_v1")}
    assert runtimes == {"qwen1.5-7b_v1": "--runtime-version=v2-alpha-tpuv5",
                        "qwen1.5-4b_v1": "--runtime-version=v2-alpha-tpuv6e",
                        "qwen1.5-0.5b_v1": "--runtime-version=v2-alpha-tpuv5-lite"}


@pytest.mark.parametrize("kind", ["v5p-16", "v6e-16", "v5litepod-16", "v4-16"])
def test_the_emulated_service_accepts_our_runtime_and_refuses_another_generations(tmp_path, kind):
    from tests.emulated_tpu import harness
    env = dict(os.environ, EMULATED_TPU_ROOT=str(tmp_path))
    backend = tpu.TpuBackend(tpu_config(accelerator_type=kind, gcloud=harness.GCLOUD))
    create = backend.create_argv("q1", kind)
    assert subprocess.run(create, env=env, capture_output=True).returncode == 0
    other = "v2-alpha-tpuv6e" if not kind.startswith("v6e") else "v2-alpha-tpuv5-lite"
    wrong = [a if not a.startswith("--runtime-version=") else f"--runtime-version={other}" for a in create]
    wrong[5] = "q2"
    out = subprocess.run(wrong, env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "is not supported for accelerator type" in out.stderr
    subprocess.run(backend.delete_argv("q1"), env=env, check=True, capture_output=True)


def test_an_unknown_accelerator_type_fails_at_construction_unless_runtime_and_hosts_are_given():
    with pytest.raises(ValueError, match="config.tpu.accelerator_type"):
        tpu.TpuBackend(tpu_config(accelerator_types="qwen*=v9x-16"))
    tpu.TpuBackend(tpu_config(accelerator_types="qwen*=v9x-16", runtime_version="custom", hosts=4))


def test_a_job_without_job_dir_is_refused():
    with pytest.raises(ValueError, match="--job_dir"):
        tpu.job_dir(backends.Job("x", ("python", "-m", "launch.cell")))


# ------------------------------------------------------------------------------------------------ retries

def test_retry_backs_off_exponentially_and_returns_the_first_success():
    outcomes, sleeps, notes = [1, 1, 0], [], []

    def call():
        return subprocess.CompletedProcess([], outcomes.pop(0), "", "UNAVAILABLE")
    out = tpu.retry(call, lambda o: True, retries=5, base_s=2.0, max_s=300.0, note=notes.append, sleep=sleeps.append)
    assert out.returncode == 0 and sleeps == [2.0, 4.0] and len(notes) == 2 and not outcomes


def test_retry_stops_at_a_permanent_error_and_after_its_last_retry():
    sleeps = []
    permanent = tpu.retry(lambda: subprocess.CompletedProcess([], 1, "", "INVALID_ARGUMENT: no"), tpu._transient,
                          retries=5, base_s=1.0, max_s=3.0, sleep=sleeps.append)
    assert permanent.returncode == 1 and sleeps == []
    tpu.retry(lambda: subprocess.CompletedProcess([], 1, "", "UNAVAILABLE"), tpu._transient, retries=4, base_s=1.0,
              max_s=3.0, sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 3.0, 3.0]   # capped at max_s; 4 retries, then its answer


# ------------------------------------------------------------------------------------------------ worker set-up

def _fake_command(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _find(tmp_path, interpreters: dict, apt: str | None = None):
    """(exit code, PY, stderr, apt-get calls) of the Python search with fake interpreters (name -> version printed;
    None: a failing shim) and, if given, a fake apt-get whose `install` runs `apt` (shell) — alone on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, version in interpreters.items():
        _fake_command(bin_dir, name, f"echo {version}" if version else "echo 'pyenv: not installed' >&2; exit 127")
    if apt is not None:
        _fake_command(bin_dir, "apt-get", f'echo "$@" >> {tmp_path}/apt.log\ncase "$*" in *install*) {apt} ;; esac')
        _fake_command(bin_dir, "sudo", 'shift; exec "$@"')   # `sudo VAR=value cmd ...` (when not root)
    script = tpu.find_python(tpu.default_config().python) + '\necho "PY=$PY"'
    out = subprocess.run(["/bin/bash", "-c", script], env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    found = re.findall(r"^PY=(.*)$", out.stdout, re.M)
    apt_log = (tmp_path / "apt.log").read_text().splitlines() if (tmp_path / "apt.log").exists() else []
    return out.returncode, found[0] if found else None, out.stderr, apt_log


def test_the_first_python_of_at_least_3_11_is_chosen(tmp_path):
    assert _find(tmp_path, {"python3.13": None, "python3.12": "junk", "python3.11": "3.11", "python3": "3.10"})[:2] \
        == (0, "python3.11")
    assert _find(tmp_path / "b", {"python3": "3.12"})[:2] == (0, "python3")
    assert _find(tmp_path / "c", {"python3.13": "3.13", "python3": "3.10"})[:2] == (0, "python3.13")


def test_only_python_3_10_and_no_apt_fails_naming_what_it_found(tmp_path):
    rc, py, err, _ = _find(tmp_path, {"python3": "3.10"})
    assert rc == 1 and py is None
    assert "needs Python >= 3.11" in err and "python3 (3.10)" in err


def test_only_python_3_10_installs_python_3_11_with_apt(tmp_path):
    rc, py, _, apt = _find(tmp_path, {"python3": "3.10"},
                           apt=f"printf '#!/bin/sh\\necho 3.11\\n' > {tmp_path}/bin/python3.11;"
                               f" /bin/chmod +x {tmp_path}/bin/python3.11")
    assert (rc, py) == (0, "python3.11")
    assert any(line.endswith("install python3.11 python3.11-venv") for line in apt), apt


def test_apt_that_cannot_install_fails_naming_the_old_python(tmp_path):
    rc, py, err, apt = _find(tmp_path, {"python3": "3.10"}, apt="exit 100")
    assert rc == 1 and py is None and "python3 (3.10)" in err and apt


def test_the_set_up_checks_out_the_launchers_commit_and_installs_into_a_venv():
    cfg = tpu_config(setup="sudo mount /data")
    script = tpu.setup_script(cfg, COMMIT)
    assert "git clone -q https://github.com/example/vlm-jax.git vlm-jax" in script
    assert f"git checkout -q --detach {COMMIT}" in script and "main" not in script
    assert '"$PY" -m venv .venv' in script and ". .venv/bin/activate" in script
    assert script.endswith("python -m pip install -q -r requirements.txt 'jax[tpu]' gcsfs\nsudo mount /data")
    assert script.index("vlmjax_version") < script.index("-m venv") < script.index("pip install")


def _git_repo(path):
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True).stdout
    path.mkdir()
    git("init", "-q")
    (path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return git


def test_the_launcher_commit_is_head_and_uncommitted_changes_to_tracked_files_are_refused(tmp_path, monkeypatch):
    git = _git_repo(tmp_path / "repo")
    head = git("rev-parse", "HEAD").strip()
    (tmp_path / "repo" / "new.py").write_text("untracked: not run remotely, not a reason to refuse\n")
    assert tpu.launcher_commit(str(tmp_path / "repo")) == (head, [])
    (tmp_path / "repo" / "a.py").write_text("x = 2\n")
    assert tpu.launcher_commit(str(tmp_path / "repo")) == (head, ["a.py"])

    with pytest.raises(RuntimeError, match="not a git checkout"):
        tpu.launcher_commit(str(tmp_path))

    monkeypatch.setattr(tpu, "launcher_commit", lambda: (head, ["a.py"]))
    with pytest.raises(RuntimeError, match=r"a\.py.*allow_dirty"):
        tpu.TpuBackend(tpu_config(commit="")).commit()
    assert tpu.TpuBackend(tpu_config(commit="", allow_dirty=True)).commit() == head
    assert tpu.TpuBackend(tpu_config(commit="")).commit(strict=False) == head   # --dry_run prints it anyway


@pytest.mark.parametrize("environ, hostname, want", [
    ({"TPU_WORKER_ID": "3"}, "x", 3),
    ({"JAX_PROCESS_ID": "1"}, "x", 1),
    ({}, "t1v-n-1a2b3c4d-w-7", 7),
])
def test_a_worker_knows_its_index(environ, hostname, want):
    from launch import worker
    assert worker.worker_index(-1, environ, hostname) == want
    assert worker.worker_index(5, environ, hostname) == 5
