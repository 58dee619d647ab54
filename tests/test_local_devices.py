"""The local backend's devices per cell (config.local): which devices each cell process is told, through the same
code path a GPU node uses (the environment of real child processes), checked on CPU."""

import concurrent.futures
import json
import os
import sys

import ml_collections
import pytest

from vlm_jax.grid import backends

# A cell stand-in: records the devices it was given and when it ran, then holds them a while.
RECORD = """
import json, os, sys, time
start = time.time()
time.sleep(0.4)
with open(sys.argv[1], "w") as f:
    json.dump({"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}, f)
"""


def local(devices="", per_cell=0):
    cfg = backends.local_config()
    cfg.devices, cfg.devices_per_cell = devices, per_cell
    return backends.LocalBackend(cfg)


def run_jobs(backend, tmp_path, n, parallel):
    def one(i):
        job = backends.Job(f"job{i}", (sys.executable, "-c", RECORD, str(tmp_path / f"job{i}.json")))
        return backend.run(job, str(tmp_path / f"job{i}.log"))

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        assert list(pool.map(one, range(n))) == [0] * n
    return [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(n)]


def test_each_running_cell_gets_a_group_of_its_own(tmp_path):
    backend = local("0,1,2,3,4,5,6,7", per_cell=2)
    assert backend.slots == 4
    records = run_jobs(backend, tmp_path, n=10, parallel=6)   # more jobs, and threads, than groups
    groups = {r["devices"] for r in records}
    assert groups <= {"0,1", "2,3", "4,5", "6,7"} and len(groups) > 1
    for a in records:   # whenever a cell starts, those running hold other groups: at most one cell per group
        running = [b for b in records if b["start"] <= a["start"] < b["end"]]
        assert len(running) == len({b["devices"] for b in running}) <= 4


def test_one_cell_over_every_device(tmp_path):
    records = run_jobs(local("0,1,2,3,4,5,6,7", per_cell=8), tmp_path, n=2, parallel=2)
    assert [r["devices"] for r in records] == ["0,1,2,3,4,5,6,7"] * 2
    a, b = records
    assert a["end"] <= b["start"] or b["end"] <= a["start"]   # one after the other


def test_without_devices_per_cell_the_environment_is_the_launchers(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    backend = local()
    assert backend.slots is None
    assert run_jobs(backend, tmp_path, n=1, parallel=1)[0]["devices"] == "5"


def test_devices_come_from_the_launchers_own_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    backend = local(per_cell=2)
    assert backend.pool.groups == [["3", "5"], ["6", "7"]]


def test_devices_from_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n"
                    "echo 'GPU 2: NVIDIA H100 (UUID: GPU-c)'\n")
    fake.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    backend = local(per_cell=1)
    assert backend.pool.groups == [["0"], ["1"], ["2"]] and backend.slots == 3
    assert local(per_cell=2).pool.unused == ["2"]


@pytest.mark.parametrize("devices, per_cell, message", [
    ("0,1,2", 4, "only 3 device"),
    ("0,1,1", 1, "lists a device twice"),
    ("", 2, "none found"),
])
def test_impossible_assignments_are_refused(devices, per_cell, message, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))   # no nvidia-smi
    with pytest.raises(ValueError, match=message):
        local(devices, per_cell)


def test_a_stopped_backend_starts_no_cell_waiting_for_devices(tmp_path):
    backend = local("0", per_cell=1)
    with backend.pool.lease():   # the only group is taken
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(backend.run, backends.Job("late", (sys.executable, "-c", "pass")),
                                  str(tmp_path / "late.log"))
            backend.stop(grace_s=1)
            assert waiting.result(timeout=10) < 0   # gave up waiting: never started
    assert not (tmp_path / "late.log").exists()


def test_the_grid_config_has_the_local_keys():
    from configs import grid
    cfg = grid.smoke(ml_collections.ConfigDict(dict(llms="", tokens="")))
    assert cfg.local.devices_per_cell == 0 and backends.LocalBackend(cfg.local).slots is None
