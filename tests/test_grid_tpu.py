"""The 'tpu' grid backend: the exact gcloud commands of a grid, and their execution against a fake gcloud."""

import ast
import graphlib
import json
import os
import re
import subprocess
import sys

import pytest

from configs import grid as grid_config
from configs import models
from vlm_jax.grid import backends, runner, spec, tpu
from vlm_jax.paths import REPO_ROOT

JOB = backends.Job("tiny-l_v16", ("python", "-m", "launch.cell", "--job_dir=gs://bucket/grid/cells/tiny-l_v16"))


def tpu_config(**overrides):
    cfg = tpu.default_config()
    cfg.update(dict(project="my-proj", zone="us-west4-a", repo_url="https://github.com/example/vlm-jax.git"))
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------ dry run

def test_dry_run_prints_every_gcloud_command_of_a_two_cell_grid():
    grid = grid_config.get_config("smoke,llms=tiny-s,tokens=1+4")
    grid.unlock()
    grid.dir = "gs://bucket/grid"
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

    setup = ("'--command=(test -d ~/vlm-jax || git clone -q https://github.com/example/vlm-jax.git ~/vlm-jax)"
             " && cd ~/vlm-jax && git fetch -q origin main && git checkout -q FETCH_HEAD"
             " && python3 -m pip install -q -r requirements.txt '\"'\"'jax[tpu]'\"'\"' gcsfs'")
    where = "--project=my-proj --zone=us-west4-a"
    assert lines == [
        "# tiny-s_v1: write gs://bucket/grid/cells/tiny-s_v1/job.json",
        f"gcloud compute tpus queued-resources create vlmjax-tiny-s-v1-fbb9d5 --node-id=vlmjax-tiny-s-v1-fbb9d5"
        f" {where} --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
        f"gcloud compute tpus queued-resources describe vlmjax-tiny-s-v1-fbb9d5 {where}"
        f" '--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v1-fbb9d5 --worker=all {where} {setup}",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v1-fbb9d5 --worker=all {where}"
        f" '--command=cd ~/vlm-jax && python3 -m launch.cell --job_dir=gs://bucket/grid/cells/tiny-s_v1 --distributed'",
        f"gcloud compute tpus queued-resources delete vlmjax-tiny-s-v1-fbb9d5 {where} --force --quiet",
        "# tiny-s_v4: write gs://bucket/grid/cells/tiny-s_v4/job.json",
        f"gcloud compute tpus queued-resources create vlmjax-tiny-s-v4-7273ff --node-id=vlmjax-tiny-s-v4-7273ff"
        f" {where} --accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite --spot",
        f"gcloud compute tpus queued-resources describe vlmjax-tiny-s-v4-7273ff {where}"
        f" '--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v4-7273ff --worker=all {where} {setup}",
        f"gcloud compute tpus tpu-vm ssh vlmjax-tiny-s-v4-7273ff --worker=all {where}"
        f" '--command=cd ~/vlm-jax && python3 -m launch.cell --job_dir=gs://bucket/grid/cells/tiny-s_v4 --distributed'",
        f"gcloud compute tpus queued-resources delete vlmjax-tiny-s-v4-7273ff {where} --force --quiet",
    ]


def test_keep_leaves_out_the_delete():
    assert [argv[4] for argv in tpu.TpuBackend(tpu_config(keep=True)).commands(JOB)] == [
        "create", "describe", "ssh", "ssh"]


# ------------------------------------------------------------------------------------------------ run, fake gcloud

FAKE_GCLOUD = """#!{python}
import json, sys
args = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    states = {states!r}
    n = sum('"describe"' in line for line in open({calls!r}))
    print(states[min(n, len(states)) - 1])
if "ssh" in args:
    print("worker output")
    sys.exit({job_rc} if args[-1].endswith("--distributed") else 0)
"""


def run_with_fake(tmp_path, states=("PROVISIONING", "ACTIVE"), job_rc=0, **overrides):
    """(exit code, gcloud calls as argv lists, log text) of one job run against a fake gcloud."""
    calls, gcloud = tmp_path / "calls.jsonl", tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, calls=str(calls), states=list(states), job_rc=job_rc))
    gcloud.chmod(0o755)
    backend = tpu.TpuBackend(tpu_config(gcloud=str(gcloud), poll_seconds=0, **overrides))
    rc = backend.run(JOB, str(tmp_path / "job" / "log.txt"))
    return rc, [json.loads(line) for line in calls.read_text().splitlines()], (tmp_path / "job" / "log.txt").read_text()


def verbs(calls):
    """create / describe / delete / ssh: the word after `gcloud compute tpus {queued-resources,tpu-vm}`."""
    return [c[3] for c in calls]


def test_run_creates_waits_sets_up_runs_the_job_on_every_worker_and_deletes(tmp_path):
    rc, calls, log = run_with_fake(tmp_path)
    assert rc == 0
    assert verbs(calls) == ["create", "describe", "describe", "ssh", "ssh", "delete"]
    name = "vlmjax-tiny-l-v16-203cca"
    assert all(name in c for c in calls)
    setup, job = calls[3], calls[4]
    assert "--worker=all" in setup and "git clone" in setup[-1]
    assert "--worker=all" in job
    assert job[-1] == "--command=cd ~/vlm-jax && python3 -m launch.cell --job_dir=gs://bucket/grid/cells/tiny-l_v16" \
                      " --distributed"
    assert log.count("worker output") == 2   # the job's output, appended to its log
    assert "gcloud compute tpus queued-resources delete vlmjax-tiny-l-v16-203cca" in log


def test_failing_job_returns_its_exit_code_and_still_deletes_the_slice(tmp_path):
    rc, calls, _ = run_with_fake(tmp_path, job_rc=3)
    assert rc == 3
    assert verbs(calls) == ["create", "describe", "describe", "ssh", "ssh", "delete"]


def test_failed_provisioning_fails_the_job_and_deletes(tmp_path):
    rc, calls, log = run_with_fake(tmp_path, states=("WAITING_FOR_RESOURCES", "FAILED"))
    assert rc != 0
    assert verbs(calls) == ["create", "describe", "describe", "delete"]
    assert "FAILED" in log


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
    assert out.stdout.split() == ["local", "tpu"]


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
