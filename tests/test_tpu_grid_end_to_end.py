"""The Cloud TPU grid end to end on the emulated service (tests/emulated_tpu): `launch.grid` with backend tpu, the
GCS emulator as the bucket, every job on a slice of 2 local worker "hosts" joined by jax.distributed, a small
2-cell grid (configs/grid.py:smoke,llms=tiny-s,tokens=1+16: a tower and an LLM pretrained, then 2 cells of 2 stages
and an evaluation), with and without faults, against the same grid on the local backend.

Three grid runs, each once per pytest session (also under pytest-xdist: the first test process that needs one runs
it, under a file lock, and leaves what the tests read in a folder every process of the session shares):

- the reference: the local backend into a local folder;
- fault-free: backend tpu, config.dir on the bucket;
- faults: the same on a fresh grid folder, one fault per job: two transient `describe` failures (the tower's
  slice), the ssh connection dropped while the job runs (the LLM's), SIGTERM to host 1 in stage 2 (cell tiny-s_v16),
  SIGKILL of host 0 while a stage-2 checkpoint is being written (cell tiny-s_v1).

Equalities asserted: the fault run and the fault-free run are the same 2-host computation, resumed or not, so
their rows, every loss both stages of each cell log and the cells' final parameters must be bitwise equal. The
local backend runs each cell as one process, which reads other training batches than 2 hosts do: see
test_fault_free_grid_on_the_tpu_backend for what that leaves comparable.

    python -m pytest -q -n auto -m slow tests/test_tpu_grid_end_to_end.py
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shlex
import signal
import threading
import time
import uuid

import filelock
import numpy as np
import pytest

from tests.emulated_tpu import fake_gcloud, harness, run_grid
from vlm_jax.paths import REPO_ROOT

try:
    from tests.gcs_emulator import gcs_bucket  # noqa: F401 (a fixture)
except ImportError:
    gcs_bucket = None

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(gcs_bucket is None, reason="tests/gcs_emulator.py is not there")]

GRID = os.path.join(REPO_ROOT, "configs", "grid.py") + ":smoke,llms=tiny-s,tokens=1+16"
CELLS = ("tiny-s_v1", "tiny-s_v16")
STAGE1_STEPS, STAGE2_STEPS, EVERY = 4, 30, 5   # (stage 1: as run_grid.SMALL has it)
# run_grid.SMALL (a few steps a stage, batch 4, 8 questions per family, one job at a time), with a stage 2 long
# enough for a fault to land in its middle: 30 steps, a metrics line and a committed checkpoint every 5.
FLAGS = [*run_grid.SMALL, f"--config.stages.stage2.train.steps={STAGE2_STEPS}",
         f"--config.cell.train.checkpoint_every={EVERY}", f"--config.cell.train.log_every={EVERY}"]
# Fast polls and retries; a worker silent for 30 s has lost its job; 20 s for the others to end after one failed.
TPU = dict(poll_seconds=0.5, retry_base_s=0.5, retry_max_s=2.0, heartbeat_s=1.0, heartbeat_timeout_s=30.0,
           settle_s=20.0, log_every_s=2.0)
# One grid run: measured 1.2 (local), 1.8 (tpu) and 4 (tpu with faults) minutes alone on 2 cores, up to 6 minutes
# beside the other test process and another test suite.
GRID_TIMEOUT_S = 1500
WAIT_TIMEOUT_S = 2 * GRID_TIMEOUT_S   # a test waiting for a grid another test process runs


# ------------------------------------------------------------------------------------------------ plumbing

@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """A TimeoutError after `seconds` (SIGALRM: the main thread) rather than a hang; the grid's launcher is then
    killed by run_grid.launch and every slice process by the caller's kill_all."""
    def expired(*_):
        raise TimeoutError(f"{what}: more than {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def shared_folder(tmp_path_factory):
    """A folder every test process of this pytest run shares (pytest-xdist's workers: their common parent), and
    only they: a new run gets a new one."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tpu-grid-e2e"
    folder.mkdir(exist_ok=True)
    return folder


_DONE: dict[str, dict] = {}


def once(tmp_path_factory, name: str, compute) -> dict:
    """compute(folder) -> a JSON-able dict, run once per pytest run whichever test process asks first (the others
    wait for it and read its answer); a failure is kept too, so that no one runs it again."""
    if name not in _DONE:
        shared = shared_folder(tmp_path_factory)
        answer = shared / f"{name}.json"
        with filelock.FileLock(str(shared / f"{name}.lock"), timeout=WAIT_TIMEOUT_S):
            if not answer.exists():
                folder = shared / name
                folder.mkdir()
                try:
                    value = compute(folder)   # (under its own deadline)
                except BaseException as e:
                    answer.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
                    raise
                answer.write_text(json.dumps(value))
        _DONE[name] = json.loads(answer.read_text())
    if "error" in _DONE[name]:
        pytest.fail(f"the grid run {name!r} failed (in this or another test process): {_DONE[name]['error']}")
    return _DONE[name]


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """(bare repository, commit): this working tree as the workers clone it."""
    return harness.snapshot(str(tmp_path_factory.mktemp("repo")))


def read(path: str, default=None):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return default


def read_json(path: str, default=None):
    text = read(path)
    try:
        return json.loads(text) if text is not None else default
    except ValueError:   # being written
        return default


def losses(run_dir: str, steps: int) -> dict[str, float]:
    """{step (a str: JSON's keys): loss} of a stage's metrics.jsonl at the steps every run logs, multiples of EVERY
    and the last (a run stopped in between logs that step too: not kept)."""
    lines = [json.loads(line) for line in (read(os.path.join(run_dir, "metrics.jsonl")) or "").splitlines() if line]
    return {str(m["step"]): m["loss"] for m in lines if "loss" in m and (m["step"] % EVERY == 0 or m["step"] == steps)}


def final_params(run_dir: str) -> dict[str, np.ndarray]:
    """The parameters of the stage's latest checkpoint (as the evaluation reads them), flattened by path."""
    from flax import traverse_util

    from vlm_jax import state as state_lib
    _, params = state_lib.load_params(run_dir)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(params):
        h.update(key.encode() + params[key].tobytes())
    return h.hexdigest()


def shown(argv: list[str]) -> str:
    """A gcloud call on one line: the command of an ssh cut to its first line."""
    out = []
    for arg in argv:
        if arg.startswith("--command="):
            first = arg.split("\n", 1)[0]
            arg = first[:70] + (" ..." if first != arg or len(first) > 70 else "")
        out.append(arg)
    return "gcloud " + shlex.join(out)


def print_calls(title: str, calls: list[list[str]], wall_s: float) -> None:
    print(f"\n{title}: {len(calls)} gcloud calls, in order (consecutive repeats counted); wall time {wall_s:.1f} s")
    lines = []
    for argv in calls:
        line = shown(argv)
        if lines and lines[-1][0] == line:
            lines[-1][1] += 1
        else:
            lines.append([line, 1])
    for line, n in lines:
        print(f"  {line}" + (f"  (x{n})" if n > 1 else ""))


def row_key(row: dict) -> tuple[str, str]:
    return row["cell"], row["task"]


def computed(row: dict) -> dict:
    """A row without its timing (train_s): what the cell computed."""
    return {k: v for k, v in row.items() if k != "train_s"}


# ------------------------------------------------------------------------------------------------ the grid runs

def grid_facts(grid_dir: str, jobs_dir: str) -> dict:
    """What the tests compare, read where the grid wrote it (jobs_dir: the same folder as seen from this
    machine's disk): each job's result status, each cell's stage losses and final parameters (their digest; the
    arrays go to an .npz beside the answer)."""
    facts = {"jobs": {}, "losses": {}, "params": {}}
    for result in sorted(glob.glob(os.path.join(jobs_dir, "*", "result.json"))
                         + glob.glob(os.path.join(jobs_dir, "cells", "*", "result.json"))):
        facts["jobs"][os.path.basename(os.path.dirname(result))] = read_json(result, {}).get("status")
    for cell in CELLS:
        for stage, steps in (("stage1", STAGE1_STEPS), ("stage2", STAGE2_STEPS)):
            facts["losses"][f"{cell}/{stage}"] = losses(os.path.join(jobs_dir, "cells", cell, stage), steps)
    return facts


def add_params(facts: dict, grid_dir: str, npz: str) -> None:
    """facts["params"][cell]: the digest of the cell's final parameters (or why they could not be read: a grid
    that failed is reported by the tests' first assertions, on its exit code and output); the arrays into `npz`."""
    arrays = {}
    for cell in CELLS:
        try:
            params = final_params(f"{grid_dir}/cells/{cell}/stage2")
        except Exception as e:  # pylint: disable=broad-except
            facts["params"][cell] = f"unreadable: {type(e).__name__}: {e}"
            continue
        facts["params"][cell] = digest(params)
        arrays.update({f"{cell}/{k}": v for k, v in params.items()})
    np.savez(npz, **arrays)
    facts["npz"] = npz


def local_reference(folder) -> dict:
    """The grid on the local backend, each cell one process with 2 CPU devices (the slices' 2-device mesh and
    global batch; see test_fault_free_grid_on_the_tpu_backend)."""
    grid_dir = str(folder / "grid")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, VLM_JAX_COMPILATION_CACHE=str(folder / "xla-cache"))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    cwd = folder / "launcher"
    cwd.mkdir()
    with deadline(GRID_TIMEOUT_S, "the local grid"):
        run = run_grid.launch(GRID, grid_dir, FLAGS, env=env, cwd=str(cwd))
    print(f"local grid: exit code {run.rc}, wall time {run.wall_s:.1f} s")
    facts = grid_facts(grid_dir, grid_dir)
    add_params(facts, grid_dir, str(folder / "params.npz"))
    meshes = {cell: re.findall(r"mesh (\{.*?\}) over (\d+) devices", read(f"{grid_dir}/cells/{cell}/log.txt", ""))
              for cell in CELLS}
    return dict(facts, rc=run.rc, wall_s=run.wall_s, rows=run.rows, output=run.output[-5000:], grid_dir=grid_dir,
                meshes=meshes, files=sorted(os.listdir(grid_dir)))


class Service:
    """One grid run on the emulated Cloud TPU service: its state folder, the launcher's environment and working
    folder (runs/grid-logs/ go there), a grid folder of its own on the bucket."""

    def __init__(self, folder, bucket, repo):
        self.folder, self.repo = folder, repo
        self.root = str(folder / "service")
        self.rel = f"{folder.name}-{uuid.uuid4().hex[:8]}/grid"   # unique on this bucket, whichever test made it
        self.grid_dir = f"{bucket}/{self.rel}"
        self.disk = os.path.join(bucket.root, self.rel)   # the same objects, as the emulator keeps them
        self.cwd = folder / "launcher"
        self.cwd.mkdir()
        self.env = dict(os.environ, PATH=harness.worker_bin(str(folder / "bin")), PYTHONPATH=REPO_ROOT,
                        **{fake_gcloud.ROOT_ENV: self.root, fake_gcloud.HOSTS_ENV: "2"})
        # The workers' XLA cache is in their homes, new with every slice, as on a fresh TPU VM.
        self.env.pop("VLM_JAX_COMPILATION_CACHE", None)

    def faults(self, *faults: dict) -> None:
        fake_gcloud.write_faults(self.root, list(faults))

    def launch(self) -> run_grid.GridRun:
        """The grid through backend tpu; then what it left (slices in the service's state, their processes), and
        every process of its slices ended, whatever happened."""
        try:
            with deadline(GRID_TIMEOUT_S, f"the tpu grid in {self.folder}"):
                return run_grid.launch(GRID, self.grid_dir, [*run_grid.tpu_flags(*self.repo, **TPU), *FLAGS],
                                       env=self.env, cwd=str(self.cwd), service=self.root)
        finally:
            self.left = {"resources": sorted(os.listdir(os.path.join(self.root, "resources")))
                         if os.path.isdir(os.path.join(self.root, "resources")) else [],
                         "processes": fake_gcloud.marked_pids(os.path.realpath(self.root) + "|")}
            fake_gcloud.kill_all(self.root)

    def logs(self) -> dict[str, str]:
        """The launcher's log of every job (runs/grid-logs/<grid>-<digest>/<job>.txt under its working folder)."""
        logs = glob.glob(str(self.cwd / "runs" / "grid-logs" / "*" / "*.txt"))
        return {os.path.basename(p)[:-len(".txt")]: read(p) for p in logs}

    def facts(self, run: run_grid.GridRun, npz: str) -> dict:
        facts = grid_facts(self.grid_dir, self.disk)
        add_params(facts, self.grid_dir, npz)
        return dict(facts, rc=run.rc, wall_s=run.wall_s, rows=run.rows, calls=run.calls, output=run.output[-5000:],
                    left=self.left, logs=self.logs(), fired=fake_gcloud.fired_log(self.root), disk=self.disk,
                    root=self.root, grid_dir=self.grid_dir,
                    files=sorted(os.path.relpath(p, self.disk) for p in glob.glob(f"{self.disk}/**", recursive=True)
                                 if os.path.isfile(p)))


class Watcher(threading.Thread):
    """Polls each cell's result.json, stage-2 final commit and attempt folders (on the emulator's disk) while a grid
    runs: every change, with the time it was seen."""

    def __init__(self, disk: str, period_s: float = 0.2):
        super().__init__(daemon=True)
        self.disk, self.period_s = disk, period_s
        self.seen: list[dict] = []
        self.done = threading.Event()

    def look(self, cell: str) -> dict:
        d = os.path.join(self.disk, "cells", cell)
        return {"cell": cell, "result": (read_json(os.path.join(d, "result.json")) or {}).get("status"),
                "final_committed": os.path.exists(
                    os.path.join(d, "stage2", "checkpoints", str(STAGE2_STEPS), "commit_success.txt")),
                "attempts": sorted(os.listdir(os.path.join(d, "attempts")))
                if os.path.isdir(os.path.join(d, "attempts")) else []}

    def run(self):
        last = {}
        while not self.done.wait(self.period_s):
            for cell in CELLS:
                now = self.look(cell)
                if now != last.get(cell):
                    self.seen.append(dict(now, time=time.time()))
                    last[cell] = now


def fault_free(folder, bucket, repo) -> dict:
    service = Service(folder, bucket, repo)
    run = service.launch()
    print_calls("fault-free tpu grid", run.calls, run.wall_s)
    return service.facts(run, str(folder / "params.npz"))


def with_faults(folder, bucket, repo) -> dict:
    service = Service(folder, bucket, repo)
    cells = f"{service.grid_dir}/cells"
    # Stage-2 checkpoint saves of the cell that trains second: SIGKILL to host 0 once a step's folder has an object
    # and while its commit file is still absent (orbax on gs:// writes a step in place, then commit_success.txt);
    # one group: the first save the stand-in catches in the middle, of steps 10 to 25.
    saves = [{"action": "sigkill", "worker": 0, "slice": "*-tiny-s-v1-*", "group": "kill-mid-save",
              "when_exists": f"{cells}/tiny-s_v1/stage2/checkpoints/{step}",
              "unless_exists": f"{cells}/tiny-s_v1/stage2/checkpoints/{step}/commit_success.txt"}
             for step in range(2 * EVERY, STAGE2_STEPS, EVERY)]
    service.faults(
        # the tower's slice: its first two describes fail (UNAVAILABLE)
        {"action": "fail", "verb": "describe", "slice": "*-tower-*", "count": 2},
        # the LLM's: the connection that starts the job drops (after 0.5 s, or at its end if that comes first)
        {"action": "drop_ssh", "slice": "*-llm-tiny-s-*", "match": "launch.worker", "after_s": 0.5},
        # the cell that trains first: SIGTERM to host 1 once stage 2 has logged its first metrics (step 5)
        {"action": "sigterm", "worker": 1, "slice": "*-tiny-s-v16-*",
         "when_exists": f"{cells}/tiny-s_v16/stage2/metrics.jsonl"},
        *saves)
    watcher = Watcher(service.disk)
    watcher.start()
    try:
        run = service.launch()
    finally:
        watcher.done.set()
        watcher.join()
    print_calls("tpu grid with faults", run.calls, run.wall_s)
    facts = service.facts(run, str(folder / "params.npz"))
    facts["watched"] = watcher.seen
    facts["attempts"] = {}
    for job_dir in glob.glob(f"{service.disk}/*/attempts") + glob.glob(f"{service.disk}/cells/*/attempts"):
        job = os.path.basename(os.path.dirname(job_dir))
        facts["attempts"][job] = {   # {"001": {"worker-0": {status, log}, ...}, ...}
            n: {f"worker-{i}": {"status": read_json(f"{job_dir}/{n}/worker-{i}.json"),
                                "log": read(f"{job_dir}/{n}/worker-{i}.log", "")} for i in range(2)}
            for n in sorted(os.listdir(job_dir))}
    facts["worker_out"] = {os.path.relpath(p, service.root): read(p)
                           for p in glob.glob(f"{service.root}/vms/*/w*/vlm-jax/logs/worker.out")}
    return facts


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    return once(tmp_path_factory, "local", local_reference)


@pytest.fixture(scope="session")
def tpu_run(tmp_path_factory, request, repo):
    return once(tmp_path_factory, "fault-free",
                lambda folder: fault_free(folder, request.getfixturevalue("gcs_bucket"), repo))


@pytest.fixture(scope="session")
def faulty_run(tmp_path_factory, request, repo):
    return once(tmp_path_factory, "faults",
                lambda folder: with_faults(folder, request.getfixturevalue("gcs_bucket"), repo))


# ------------------------------------------------------------------------------------------------ the tests

def test_reference_grid_on_the_local_backend(reference):
    print(f"local grid: wall time {reference['wall_s']:.1f} s")
    assert reference["rc"] == 0, reference["output"]
    assert set(reference["jobs"].values()) == {"ok"} and len(reference["jobs"]) == 4, reference["jobs"]
    assert set(CELLS) <= set(reference["jobs"]), reference["jobs"]
    assert sorted(map(row_key, reference["rows"])) == [(c, t) for c in CELLS for t in ("detail", "reasoning")]
    assert {"results.jsonl", "summary.json", "report.txt", "plots"} <= set(reference["files"])
    for cell, meshes in reference["meshes"].items():   # both stages on the slices' 2-device mesh
        assert meshes == [["{'data': 2, 'fsdp': 1, 'tensor': 1}", "2"]] * 2, (cell, meshes)
    for cell in CELLS:   # what the other runs' losses are compared on
        assert list(reference["losses"][f"{cell}/stage1"]) == [str(STAGE1_STEPS)]
        assert sorted(map(int, reference["losses"][f"{cell}/stage2"])) == list(range(EVERY, STAGE2_STEPS + 1, EVERY))


def first_global_batch(stage: dict, processes: int) -> np.ndarray:
    """The tokens of a stage's first global batch as `processes` processes read it (each its own shard, in process
    order: how the global array is assembled)."""
    import ml_collections

    from vlm_jax.data import pipeline
    cfg = ml_collections.ConfigDict(stage["config"])
    tokenizer = pipeline.make_tokenizer(cfg.data)
    shards = [next(pipeline.make_train_iterator(
        cfg.data, tokenizer=tokenizer, num_visual_tokens=cfg.model.compressor.num_tokens,
        image_size=cfg.model.vision.image_size, batch_size=cfg.train.batch_size, seed=cfg.seed, process_index=i,
        process_count=processes))["tokens"] for i in range(processes)]
    return np.concatenate(shards)


def test_fault_free_grid_on_the_tpu_backend(tpu_run, reference):
    run = tpu_run
    print_calls("fault-free tpu grid", run["calls"], run["wall_s"])
    assert run["rc"] == 0, run["output"]
    assert set(run["jobs"].values()) == {"ok"} and len(run["jobs"]) == 4, run["jobs"]   # every job ended ok
    files = set(run["files"])
    assert {"results.jsonl", "summary.json", "report.txt"} <= files, sorted(files)
    plots = {f for f in files if f.startswith("plots/")}
    assert plots == {f"plots/{p}" for p in ("observed_error.png", *(f"{task}_{form}_failed.png" for task in (
        "detail", "reasoning") for form in ("additive", "multiplicative", "saturating")))}, plots   # as the local run's
    assert run["left"] == {"resources": [], "processes": []}   # every slice deleted, no worker process left

    # One slice per job, created, polled until ACTIVE, set up, started, followed, deleted; one job at a time.
    slices = [argv[4] for argv in run["calls"] if argv[3] == "create"]
    assert len(slices) == 4 == len(set(slices)), slices
    for name in slices:
        verbs = [argv[3] for argv in run["calls"] if argv[4] == name]
        assert verbs[:6] == ["create", "describe", "describe", "describe", "ssh", "ssh"], (name, verbs)
        assert verbs[-1] == "delete" and set(verbs[6:-1]) == {"describe"}, (name, verbs)
    spans = [[i for i, argv in enumerate(run["calls"]) if argv[4] == name] for name in slices]
    assert all(a[-1] < b[0] for a, b in zip(spans, spans[1:]))

    # The local reference runs each cell as ONE process with 2 CPU devices (XLA_FLAGS=
    # --xla_force_host_platform_device_count=2): the slices' 2-device mesh ('data': 2) and global batch of 4, 2 rows a
    # device. Its numbers still cannot be the slices' bit for bit: the input pipeline shards every epoch by process
    # (grain's ShardOptions, then a shuffle within the shard), so 2 hosts train on other examples than 1 process does,
    # from the first step on (checked below on the stage's first global batch): two training runs, not one run on two
    # meshes. Both are deterministic, so this comparison gives the same answer every time. Asserted equal: the rows'
    # keys and every column the grid computes without training (N, V, FLOPs, questions, ...); the error of each row
    # within 3 standard deviations of the difference of two binomial measurements on q questions (at least 1/q),
    # printed with the largest differences of stage losses and final parameters. Were the batches the same, the rows
    # would have to be equal.
    spec = json.loads(read(os.path.join(reference["grid_dir"], "cells", CELLS[0], "job.json")))
    one, two = first_global_batch(spec["stages"][1], 1), first_global_batch(spec["stages"][1], 2)
    same_data = one.shape == two.shape and np.array_equal(one, two)
    local, tpu = ({row_key(r): computed(r) for r in rows} for rows in (reference["rows"], run["rows"]))
    assert sorted(local) == sorted(tpu) == [(c, t) for c in CELLS for t in ("detail", "reasoning")]
    differences, bounds = {}, {}
    for key in sorted(local):
        a, b, q = local[key]["error"], tpu[key]["error"], local[key]["questions"]
        differences[key] = abs(a - b)
        bounds[key] = max(1 / q, 3 * np.sqrt((a * (1 - a) + b * (1 - b)) / q))
        print(f"  {key}: error local {a:.3f}, tpu {b:.3f} (bound {bounds[key]:.3f})")
        drop = ("error", "accuracy", "benchmarks")
        assert {k: v for k, v in local[key].items() if k not in drop} == {
            k: v for k, v in tpu[key].items() if k not in drop}, key
    ref, got = np.load(reference["npz"]), np.load(run["npz"])
    param_diff = max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref.files)
    loss_diff = max(abs(reference["losses"][k][s] - run["losses"][k][s]) for k in run["losses"]
                    for s in run["losses"][k])
    print(f"local vs tpu: same first global batch: {same_data}; max |error difference| "
          f"{max(differences.values()):.3f}; max |stage loss difference| {loss_diff:.4g}; max |final parameter "
          f"difference| {param_diff:.4g}")
    if same_data:   # the same batches on the same 2-device mesh: a sum of two terms is exact in either order
        assert local == tpu
    else:
        assert all(differences[key] <= bounds[key] + 1e-9 for key in differences), (differences, bounds)


# ------------------------------------------------------------------------------------------------ faults

def slice_of(run: dict, job: str) -> str:
    """The slice (queued resource) name of a job: vlmjax-<job>-<hash>."""
    prefix = "vlmjax-" + re.sub(r"[^a-z0-9]+", "-", job.lower()).strip("-") + "-"
    names = {argv[4] for argv in run["calls"] if argv[3] == "create" and argv[4].startswith(prefix)
             and re.fullmatch(r"[0-9a-f]{6}", argv[4][len(prefix):])}
    assert len(names) == 1, (job, names)
    return names.pop()


def job_named(run: dict, start: str) -> str:
    found = [job for job in run["jobs"] if job.startswith(start)]
    assert len(found) == 1, (start, run["jobs"])
    return found[0]


def verbs(run: dict, name: str) -> list[str]:
    return [argv[3] for argv in run["calls"] if argv[4] == name]


def fired(run: dict, action: str, name: str) -> list[dict]:
    return [f for f in run["fired"] if f["action"] == action and f["slice"] == name]


def attempt(run: dict, job: str, n: int, worker: int) -> dict:
    return run["attempts"][job][f"{n:03d}"][f"worker-{worker}"]


def exits(run: dict, job: str, n: int) -> list:
    return [(s or {}).get("exit_code") if (s or {}).get("state") == "exited" else (s or {}).get("state")
            for s in (attempt(run, job, n, i)["status"] for i in range(2))]


def never_ok_while_partial(run: dict, cell: str) -> None:
    """The cell's result.json, watched while the grid ran: never "ok" before its last attempt began and its stage 2
    had committed its final checkpoint."""
    seen = [s for s in run["watched"] if s["cell"] == cell]
    last = max(run["attempts"][cell])
    ok = [s for s in seen if s["result"] == "ok"]
    assert ok, seen   # it ends ok ...
    assert all(s["final_committed"] and last in s["attempts"] for s in ok), seen   # ... only then
    assert not any(s["result"] for s in seen if last not in s["attempts"]), seen   # nor "failed" before


def test_fault_two_transient_describe_failures_are_retried(faulty_run):
    run, job = faulty_run, job_named(faulty_run, "tower-")
    name, log = slice_of(run, job), faulty_run["logs"][job]
    assert [f["verb"] for f in fired(run, "fail", name)] == ["describe", "describe"]   # it happened, twice
    assert log.count("UNAVAILABLE") == 2 and log.count("queued-resources describe: exit code 1: retrying in") == 2, log
    assert verbs(run, name).count("create") == 1 and run["jobs"][job] == "ok"   # retried, not re-provisioned
    assert sorted(run["attempts"][job]) == ["001"] and exits(run, job, 1) == [0, 0]


def test_fault_ssh_dropped_while_the_job_runs(faulty_run):
    run, job = faulty_run, job_named(faulty_run, "llm-")
    name, log = slice_of(run, job), faulty_run["logs"][job]
    drops = fired(run, "drop_ssh", name)
    assert len(drops) == 1 and "launch.worker" in drops[0]["fault"]["match"]   # the start's connection dropped
    assert log.count("closed by remote host") == 1, log
    # ... after it had started the job on both workers (the start detaches it, and returns: its connection is the
    # one open while the job runs); the stand-in drops it at its end, so its exit status never comes back.
    started = [m.start() for m in re.finditer(r": started launch\.worker \(pid \d+\)", log)]
    assert len(started) == 4 and started[1] < log.index("closed by remote host") < started[2], log
    assert verbs(run, name).count("ssh") == 3 and verbs(run, name).count("create") == 1   # start again, same slice
    outs = [out for path, out in run["worker_out"].items() if path.startswith(f"vms/{name}-")]
    assert len(outs) == 2 and all("already started on this worker" in out for out in outs), outs   # ran once
    # Training went on in the job the dropped connection started: one attempt, trained through, exit 0.
    assert sorted(run["attempts"][job]) == ["001"] and exits(run, job, 1) == [0, 0]
    assert "job done" in attempt(run, job, 1, 0)["log"] and run["jobs"][job] == "ok"


def test_fault_sigterm_to_host_1_in_stage_2(faulty_run):
    run, cell = faulty_run, "tiny-s_v16"
    name, log = slice_of(run, cell), faulty_run["logs"][cell]
    (term,) = fired(run, "sigterm", name)
    assert term["processes"] == {"1": term["processes"]["1"]} and term["processes"]["1"] > 0   # host 1 only
    assert term["after_signal"][term["fault"]["when_exists"]]   # in stage 2: its metrics had begun
    assert exits(run, cell, 1) == [75, 75] and exits(run, cell, 2) == [0, 0]   # both hosts stopped; resumed
    assert verbs(run, name).count("create") == 2 and "attempt 1/3 interrupted" in log
    first, second = attempt(run, cell, 1, 0)["log"], attempt(run, cell, 2, 0)["log"]
    (stopped,) = map(int, re.findall(r"stopped on request after step (\d+) of 30", first))
    assert EVERY <= stopped < STAGE2_STEPS and "job done" not in first
    assert "stage stage1: already finished, skipped" in second
    assert re.findall(r"resumed from step (\d+)", second) == [str(stopped)], second   # stage 2 from its checkpoint
    never_ok_while_partial(run, cell)


def test_fault_sigkill_of_host_0_while_a_checkpoint_is_written(faulty_run):
    run, cell = faulty_run, "tiny-s_v1"
    name, log = slice_of(run, cell), faulty_run["logs"][cell]
    (kill,) = fired(run, "sigkill", name)
    assert kill["processes"] == {"0": kill["processes"]["0"]} and kill["processes"]["0"] > 0   # host 0 only
    step_dir, commit = kill["fault"]["when_exists"], kill["fault"]["unless_exists"]
    step = int(step_dir.rsplit("/", 1)[1])
    # Killed while step `step` was being written: its folder had objects, and its commit file was still missing
    # right after the kill (host 0 writes it: it never came).
    assert kill["after_signal"] == {step_dir: True, commit: False}, kill
    assert attempt(run, cell, 1, 0)["status"]["state"] == "running"   # host 0's last word: no exit status
    assert verbs(run, name).count("create") == 2 and "attempt 1/3 interrupted" in log
    second = attempt(run, cell, 2, 0)["log"]
    assert re.findall(r"resumed from step (\d+)", second) == [str(step - EVERY)], second   # the last committed
    never_ok_while_partial(run, cell)


def test_faults_leave_the_fault_free_rows_losses_and_parameters(faulty_run, tpu_run):
    run = faulty_run
    assert run["rc"] == 0, run["output"]
    assert set(run["jobs"].values()) == {"ok"} and len(run["jobs"]) == 4, run["jobs"]
    assert run["left"] == {"resources": [], "processes": []}
    assert {argv[3] for argv in run["calls"]} == {"create", "describe", "ssh", "delete"}
    for name in {argv[4] for argv in run["calls"]}:   # every slice made was deleted, the last call on it
        assert verbs(run, name)[-1] == "delete" and verbs(run, name).count("create") == verbs(run, name).count("delete")
    assert sorted(map(computed, run["rows"]), key=row_key) == sorted(map(computed, tpu_run["rows"]), key=row_key)
    assert run["losses"] == tpu_run["losses"]   # every logged loss of both stages of both cells, bitwise
    assert all(len(tpu_run["losses"][f"{cell}/{stage}"]) == n for cell in CELLS
               for stage, n in (("stage1", 1), ("stage2", STAGE2_STEPS // EVERY)))
    assert run["params"] == tpu_run["params"]   # the final parameters, bitwise
    print(f"faults: wall time {run['wall_s']:.1f} s (fault-free {tpu_run['wall_s']:.1f} s)")


# ------------------------------------------------------------------------------------------------ ports

def test_live_slices_of_two_services_never_share_a_coordinator_port(tmp_path, monkeypatch):
    """Tests running side by side (pytest-xdist) each have a service of their own; a port the OS offers twice (it
    is free until the slice's coordinator binds it, seconds later) goes to one live slice only, and comes back
    when that slice is deleted."""
    p, q = fake_gcloud._free_port(), fake_gcloud._free_port()
    offered = iter([p, p, q, p])   # what bind(0) returns, in turn
    monkeypatch.setattr(fake_gcloud, "_free_port", lambda: next(offered))
    flags = {"node-id": "s", "project": "p", "zone": "z", "accelerator-type": "v5p-16",
             "runtime-version": "v2-alpha-tpuv5"}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for folder in (a, b):
        os.makedirs(os.path.join(folder, "resources"))
    try:
        assert fake_gcloud.create(a, "s", flags) == 0 and fake_gcloud.create(b, "s", flags) == 0
        assert [fake_gcloud.read_resource(f, "s")["port"] for f in (a, b)] == [p, q]   # p was a's: b got q
        assert fake_gcloud.delete(a, "s", {"force": True}) == 0
        assert fake_gcloud.create(a, "t", flags) == 0 and fake_gcloud.read_resource(a, "t")["port"] == p
    finally:
        for folder in (a, b):
            for name in ("s", "t"):
                if fake_gcloud.read_resource(folder, name):
                    fake_gcloud.delete(folder, name, {"force": True})
            fake_gcloud.kill_all(folder)
    assert not {str(p), str(q)} & set(os.listdir(fake_gcloud.PORTS_DIR))   # every reservation released
