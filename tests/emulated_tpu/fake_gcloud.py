"""A stand-in for the `gcloud` commands the tpu grid backend runs (vlm_jax/grid/tpu.py), over local processes.

    export EMULATED_TPU_ROOT=/tmp/tpu EMULATED_TPU_HOSTS=2
    tests/emulated_tpu/gcloud compute tpus queued-resources create q1 --node-id=q1 --project=p --zone=z \
        --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite
    tests/emulated_tpu/gcloud compute tpus queued-resources describe q1 --project=p --zone=z \
        '--format=value(state.state)'
    tests/emulated_tpu/gcloud compute tpus tpu-vm ssh q1 --worker=all --project=p --zone=z --command='hostname'
    tests/emulated_tpu/gcloud compute tpus queued-resources delete q1 --project=p --zone=z --force --quiet

Only that subset, as the real service answers it: `create` refuses a runtime version that does not suit the
accelerator type's generation; `describe` says WAITING_FOR_RESOURCES, then PROVISIONING, then ACTIVE (one poll each,
EMULATED_TPU_PROVISION_POLLS to change); a slice is N worker "hosts" (N from the accelerator type, or
EMULATED_TPU_HOSTS), each a fresh folder used as HOME; `ssh --worker=all` runs the command with `bash -c` on every
worker at once and exits with the first non-zero status. Every worker's environment lets `--distributed` processes
join over localhost on CPU (JAX_COORDINATOR_ADDRESS with a port of the slice's own, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, JAX_PLATFORMS=cpu). What a command detaches (setsid, nohup) outlives the ssh client, as on a VM;
`delete` kills every process of the slice (found by the EMULATED_TPU_MARK its environment carries).

State lives in $EMULATED_TPU_ROOT: resources/<name>.json (one per queued resource), vms/<uid>/w<i>/ (the workers'
homes, kept after delete for post-mortems), calls.jsonl (every invocation's argv, in order) and faults.json, read
at every use, so a test may change it while a grid runs: a list of

    {"action": "fail", "verb": "describe", "count": 2}   the next 2 describes exit 1 with an error (any verb: create,
                                                          describe, delete exit 1; ssh exits 255, running nothing)
    {"action": "drop_ssh", "after_s": 1.0, "match": "launch.worker"}
                                                          that ssh's connection drops after 1 s, or at its end if it
                                                          ends first: the client exits 255, the workers' shells get
                                                          SIGHUP (as sshd sends), what they detached runs on
    {"action": "sigterm" | "sigkill", "worker": 1, "after_s": 3}     worker 1's processes get the signal
    {"action": "preempt", "when_exists": "/x/stage2/metrics.jsonl", "state": "PREEMPTED", "grace_s": 2}
                                                          the slice's state becomes PREEMPTED (or "state"); its
                                                          processes get SIGTERM, then SIGKILL after grace_s

Common keys: "slice" (fnmatch pattern of resource names, default every one), "count" (how many times it acts,
default 1; spent counts are kept in fired.json), "group" (faults of one group share one count: whichever of them is
due first acts, the others then never do), "after_s" (seconds since the slice became ACTIVE; for drop_ssh, since
the ssh began), "when_exists" (a local path or gs:// object; a gs:// "folder" exists once an object below it does)
and "unless_exists" (the fault is due only while that path does not exist; e.g. a checkpoint step's folder without
its commit file: a save in progress). Signals and preemption are timed by a monitor process per slice, started by
`create` and ended by `delete`. Every fault that acts is logged to fired.jsonl (time, slice, the fault, what it
did: for a signal, the processes it reached and whether its paths existed right after).

Each slice's JAX_COORDINATOR_ADDRESS port is reserved, from `create` to `delete`, in a folder shared by every
emulated service on this machine (PORTS_DIR): two slices alive at once, of one test or of tests running side by side
(pytest-xdist), never get the same port. (The coordinator binds it with SO_REUSEPORT, as gRPC does: a second
coordinator on a port in use would not fail, it would silently share the port's connections.)
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

ROOT_ENV, HOSTS_ENV, POLLS_ENV, MARK_ENV = ("EMULATED_TPU_ROOT", "EMULATED_TPU_HOSTS", "EMULATED_TPU_PROVISION_POLLS",
                                            "EMULATED_TPU_MARK")

# Accelerator type prefix -> (runtime versions the service accepts, what the type's number counts). Cloud TPU docs,
# "TPU software versions": v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older
# tpu-ubuntu2204-base (and the older tpu-vm-base).
GENERATIONS = {
    "v6e": (("v2-alpha-tpuv6e",), "chips"),
    "v5litepod": (("v2-alpha-tpuv5-lite",), "chips"),
    "v5p": (("v2-alpha-tpuv5",), "cores"),
    "v4": (("tpu-ubuntu2204-base", "tpu-vm-base", "tpu-vm-v4-base"), "cores"),
    "v3": (("tpu-ubuntu2204-base", "tpu-vm-base"), "cores"),
    "v2": (("tpu-ubuntu2204-base", "tpu-vm-base"), "cores"),
}


class Exit(Exception):
    """Ends the command with `code`, `message` on stderr (gcloud's 'ERROR: (gcloud.…) …' lines)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def hosts(accelerator_type: str) -> int:
    """Worker VMs of a slice: v5e/v6e count chips (up to 8 on one host, else 4 a host); v5p/v4 and older count
    TensorCores (8 a host: 4 chips of 2)."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
    if not match or match.group(1) not in GENERATIONS:
        raise Exit(1, f"INVALID_ARGUMENT: unknown accelerator type '{accelerator_type}'")
    kind, n = match.group(1), int(match.group(2))
    if GENERATIONS[kind][1] == "chips":
        return 1 if n <= 8 else n // 4
    return max(1, n // 8)


# ---------------------------------------------------------------------------------------------------- state

def root() -> str:
    path = os.environ.get(ROOT_ENV)
    if not path:
        raise Exit(2, f"{ROOT_ENV} is not set: the emulated service keeps its state in that folder")
    path = os.path.realpath(path)
    os.makedirs(os.path.join(path, "resources"), exist_ok=True)
    return path


@contextlib.contextmanager
def locked(folder: str):
    """One writer of the state at a time (several gcloud processes and monitors run at once)."""
    with open(os.path.join(folder, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def resource_path(folder: str, name: str) -> str:
    return os.path.join(folder, "resources", f"{name}.json")


def read_resource(folder: str, name: str) -> dict | None:
    return _read_json(resource_path(folder, name))


def log_call(folder: str, argv: list[str]) -> None:
    line = json.dumps({"argv": argv, "time": time.time(), "pid": os.getpid()}) + "\n"
    fd = os.open(os.path.join(folder, "calls.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())   # one write of a short line: whole, among concurrent writers
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- faults

def _fault_key(fault: dict) -> str:
    if fault.get("group"):
        return f"group:{fault['group']}"
    return hashlib.sha256(json.dumps(fault, sort_keys=True).encode()).hexdigest()[:16]


def log_fired(folder: str, name: str, fault: dict, **what) -> None:
    """One line in fired.jsonl: a fault acted (on slice `name`), and what it did."""
    line = json.dumps({"time": time.time(), "slice": name, "action": fault.get("action"), "fault": fault, **what})
    fd = os.open(os.path.join(folder, "fired.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def fired_log(folder: str) -> list[dict]:
    """Every fault that acted, in order (fired.jsonl)."""
    path = os.path.join(folder, "fired.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _exists(path: str) -> bool:
    if "://" in path:   # gs:// triggers (gcsfs, the GCS emulator's environment), uncached: the monitor lives long
        from vlm_jax.grid.tpu import fresh_path
        return fresh_path(path).exists()
    return os.path.exists(path)


def claim(folder: str, action: str, name: str, *, verb: str | None = None, command: str | None = None,
          active_at: float | None = None) -> dict | None:
    """The first fault of `action` that matches and is due, its count spent by one (under the lock), or None."""
    faults = _read_json(os.path.join(folder, "faults.json"), [])
    with locked(folder):
        fired_path = os.path.join(folder, "fired.json")
        fired = _read_json(fired_path, {})
        for fault in faults:
            if fault.get("action") != action or not fnmatch.fnmatchcase(name, fault.get("slice", "*")):
                continue
            if verb is not None and fault.get("verb") != verb:
                continue
            if command is not None and fault.get("match", "") not in command:
                continue
            key = _fault_key(fault)
            if fired.get(key, 0) >= fault.get("count", 1):
                continue
            if active_at is not None:   # timed faults: due once the slice has been ACTIVE for after_s
                if time.time() - active_at < fault.get("after_s", 0):
                    continue
                if fault.get("when_exists") and not _exists(fault["when_exists"]):
                    continue
                if fault.get("unless_exists") and _exists(fault["unless_exists"]):
                    continue
            fired[key] = fired.get(key, 0) + 1
            _write_json(fired_path, fired)
            return fault
    return None


# ---------------------------------------------------------------------------------------------------- processes

def marked_pids(prefix: str) -> list[int]:
    """Live processes whose environment holds EMULATED_TPU_MARK=<prefix>… (what a slice, or worker, started)."""
    needle = f"{MARK_ENV}={prefix}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if any(var.startswith(needle) for var in environ.split(b"\0")):
            pids.append(int(entry))
    return pids


def signal_marked(prefix: str, sig: int) -> int:
    pids = marked_pids(prefix)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return len(pids)


def kill_all(folder: str, timeout: float = 5.0) -> None:
    """SIGKILL every process any slice under `folder` started, monitors included (a test's clean-up)."""
    prefix = os.path.realpath(folder) + "|"
    deadline = time.monotonic() + timeout
    while signal_marked(prefix, signal.SIGKILL) and time.monotonic() < deadline:
        time.sleep(0.05)


def _slice_mark(folder: str, resource: dict) -> str:
    return f"{folder}|{resource['uid']}|"


def _mark(folder: str, resource: dict, who) -> str:
    """The EMULATED_TPU_MARK of worker `who` (or 'monitor') of this incarnation of the slice."""
    return f"{_slice_mark(folder, resource)}{who}|"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The slices' coordinator ports, reserved from create to delete, for every emulated service on this machine: a file
# per port naming its slice (the module docstring says why). A reservation whose slice is gone (deleted, its state
# folder removed, or made again with another uid) is stale and may be taken.
PORTS_DIR = os.path.join(tempfile.gettempdir(), "vlm-jax-emulated-tpu-ports")


def _reserved(path: str) -> bool:
    held = _read_json(path)
    if not held:
        return False
    resource = _read_json(resource_path(held["root"], held["name"]))
    return bool(resource) and resource.get("uid") == held["uid"]


def reserve_port(folder: str, name: str, uid: str, write_resource) -> int:
    """A free port no live slice holds, reserved for slice `name` (uid) of the service in `folder`; calls
    write_resource(port) while the reservations are locked, so that the reservation is live as it is made."""
    os.makedirs(PORTS_DIR, exist_ok=True)
    with locked(PORTS_DIR):
        for _ in range(1000):
            port = _free_port()   # free now: no coordinator, nor anything else, listens on it
            path = os.path.join(PORTS_DIR, str(port))
            if _reserved(path):   # ... but a slice set up a moment ago may be about to
                continue
            write_resource(port)
            _write_json(path, {"root": folder, "name": name, "uid": uid, "pid": os.getpid()})
            return port
    raise Exit(1, f"ERROR: the emulated service found no free port outside the reservations in {PORTS_DIR}")


def release_port(resource: dict) -> None:
    if resource.get("port") is None:
        return
    path = os.path.join(PORTS_DIR, str(resource["port"]))
    with locked(PORTS_DIR):
        held = _read_json(path)
        if held and held.get("uid") == resource["uid"]:
            os.remove(path)


def _worker_env(folder: str, resource: dict, i: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HOME=resource["homes"][i], JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{resource['port']}",
               JAX_NUM_PROCESSES=str(resource["hosts"]), JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
               **{MARK_ENV: _mark(folder, resource, i)})
    return env


# ---------------------------------------------------------------------------------------------------- commands

def _flags(args: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    positional, flags = [], {}
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            flags[key] = value if eq else True
        else:
            positional.append(arg)
    return positional, flags


def _require(flags: dict, *keys: str) -> None:
    for key in keys:
        if not isinstance(flags.get(key), str) or not flags[key]:
            raise Exit(2, f"argument --{key}: expected one argument")


def _fail_if_injected(folder: str, verb: str, name: str) -> None:
    fault = claim(folder, "fail", name, verb=verb)
    if fault:
        log_fired(folder, name, fault, verb=verb)
        if verb == "ssh":
            raise Exit(255, "ssh: connect to host 127.0.0.1 port 22: Connection refused (emulated)")
        raise Exit(1, f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) UNAVAILABLE: "
                      f"The service is currently unavailable (emulated transient failure).")


def create(folder: str, name: str, flags: dict) -> int:
    _require(flags, "node-id", "project", "zone", "accelerator-type", "runtime-version")
    _fail_if_injected(folder, "create", name)
    kind, runtime = flags["accelerator-type"], flags["runtime-version"]
    n = int(os.environ.get(HOSTS_ENV) or hosts(kind))
    generation = kind.split("-")[0]
    if runtime not in GENERATIONS[generation][0]:
        raise Exit(1, f"ERROR: (gcloud.compute.tpus.queued-resources.create) INVALID_ARGUMENT: runtime version "
                      f"'{runtime}' is not supported for accelerator type '{kind}' (use one of "
                      f"{', '.join(GENERATIONS[generation][0])})")
    if flags.get("spot") and flags.get("reserved"):
        raise Exit(2, "argument --spot: not allowed with argument --reserved")
    with locked(folder):
        if read_resource(folder, name):
            raise Exit(1, f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: "
                          f"queued resource '{name}' already exists")
        uid = uuid.uuid4().hex[:12]
        homes = [os.path.join(folder, "vms", f"{name}-{uid}", f"w{i}") for i in range(n)]
        for home in homes:
            os.makedirs(home)
        resource = dict(name=name, uid=uid, node_id=flags["node-id"], accelerator_type=kind, runtime_version=runtime,
                        spot=bool(flags.get("spot")), hosts=n, homes=homes, port=None,
                        state="WAITING_FOR_RESOURCES", polls=0, created=time.time(), active_at=None)

        def write_resource(port: int) -> None:
            resource["port"] = port
            _write_json(resource_path(folder, name), resource)
        reserve_port(folder, name, uid, write_resource)
    env = dict(os.environ, **{MARK_ENV: _mark(folder, resource, "monitor")})
    gcloud = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcloud")
    subprocess.Popen([sys.executable, gcloud, "monitor", name, uid], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    print(f"Create request issued for: [{name}]")
    return 0


def describe(folder: str, name: str, flags: dict) -> int:
    _fail_if_injected(folder, "describe", name)
    with locked(folder):
        resource = read_resource(folder, name)
        if resource is None:
            raise Exit(1, f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: "
                          f"Resource 'queuedResources/{name}' was not found")
        resource["polls"] += 1
        if resource["state"] in ("WAITING_FOR_RESOURCES", "PROVISIONING"):
            polls = int(os.environ.get(POLLS_ENV, "2"))
            resource["state"] = ("WAITING_FOR_RESOURCES" if resource["polls"] <= polls // 2 else
                                 "PROVISIONING" if resource["polls"] <= polls else "ACTIVE")
            if resource["state"] == "ACTIVE":
                resource["active_at"] = time.time()
        _write_json(resource_path(folder, name), resource)
    if flags.get("format") == "value(state.state)":
        print(resource["state"])
    else:
        print(json.dumps({"name": name, "state": {"state": resource["state"]}, "tpu": {"nodeSpec": [
            {"nodeId": resource["node_id"], "node": {"acceleratorType": resource["accelerator_type"],
                                                     "runtimeVersion": resource["runtime_version"]}}]}}, indent=1))
    return 0


def delete(folder: str, name: str, flags: dict) -> int:
    _fail_if_injected(folder, "delete", name)
    resource = read_resource(folder, name)
    if resource is None:
        raise Exit(1, f"ERROR: (gcloud.compute.tpus.queued-resources.delete) NOT_FOUND: "
                      f"Resource 'queuedResources/{name}' was not found")
    if resource["state"] == "ACTIVE" and not flags.get("force"):
        raise Exit(1, "ERROR: (gcloud.compute.tpus.queued-resources.delete) FAILED_PRECONDITION: the queued "
                      "resource has a node; delete it first or pass --force")
    prefix = _slice_mark(folder, resource)   # every worker's and the monitor's processes
    deadline = time.monotonic() + 10
    while signal_marked(prefix, signal.SIGKILL) and time.monotonic() < deadline:   # the VMs are gone
        time.sleep(0.05)
    with locked(folder):
        current = read_resource(folder, name)
        if current and current["uid"] == resource["uid"]:
            os.remove(resource_path(folder, name))
    release_port(resource)
    print(f"Deleted queued resource [{name}].")
    return 0


def ssh(folder: str, name: str, flags: dict) -> int:
    _require(flags, "command", "zone")
    command = flags["command"]
    resource = read_resource(folder, name)
    if resource is None:
        raise Exit(1, f"ERROR: (gcloud.compute.tpus.tpu-vm.ssh) NOT_FOUND: Resource 'nodes/{name}' was not found")
    if resource["state"] != "ACTIVE":
        raise Exit(1, f"ERROR: (gcloud.compute.tpus.tpu-vm.ssh) the TPU {name} is {resource['state']}, not READY")
    _fail_if_injected(folder, "ssh", name)
    worker = flags.get("worker", "0")
    targets = range(resource["hosts"]) if worker == "all" else [int(worker)]
    drop = claim(folder, "drop_ssh", name, command=command)
    started = time.monotonic()
    sys.stdout.flush()
    procs = [subprocess.Popen(["bash", "-c", command], cwd=resource["homes"][i],
                              env=_worker_env(folder, resource, i), stdin=subprocess.DEVNULL,
                              start_new_session=True) for i in targets]

    def hang_up(*_):   # the connection is gone: sshd hangs up on each session (what they detached lives on)
        if drop:
            log_fired(folder, name, drop, after_s=round(time.monotonic() - started, 3),
                      sessions_running=sum(p.poll() is None for p in procs))
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGHUP)
        raise Exit(255, f"Connection to {name} closed by remote host.")

    signal.signal(signal.SIGTERM, hang_up)
    signal.signal(signal.SIGINT, hang_up)
    while any(p.poll() is None for p in procs):
        if drop and time.monotonic() - started >= drop.get("after_s", 0):
            hang_up()
        time.sleep(0.02)
    if drop:   # it ended before the drop was due, but its exit status never came back
        hang_up()
    return next((p.returncode for p in procs if p.returncode), 0)


def monitor(folder: str, name: str, uid: str) -> int:
    """Times the slice's signal and preemption faults; ends when the slice is deleted (or re-created)."""
    while True:
        resource = read_resource(folder, name)
        if not resource or resource["uid"] != uid:
            return 0
        if resource["state"] == "ACTIVE":
            for action in ("sigterm", "sigkill", "preempt"):
                fault = claim(folder, action, name, active_at=resource["active_at"])
                if fault is None:
                    continue
                if action == "preempt":
                    log_fired(folder, name, fault)
                    preempt(folder, name, uid, fault.get("state", "PREEMPTED"), fault.get("grace_s", 2.0))
                    return 0
                sig = signal.SIGTERM if action == "sigterm" else signal.SIGKILL
                who = fault.get("worker", "all")
                reached = {i: signal_marked(_mark(folder, resource, i), sig)
                           for i in (range(resource["hosts"]) if who == "all" else [int(who)])}
                log_fired(folder, name, fault, processes=reached, after_signal={
                    path: _exists(path) for key in ("when_exists", "unless_exists") if (path := fault.get(key))})
        time.sleep(0.1)


def preempt(folder: str, name: str, uid: str, state: str, grace_s: float) -> None:
    with locked(folder):
        resource = read_resource(folder, name)
        if not resource or resource["uid"] != uid:
            return
        resource["state"] = state
        _write_json(resource_path(folder, name), resource)
    workers = [_mark(folder, resource, i) for i in range(resource["hosts"])]
    for prefix in workers:
        signal_marked(prefix, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(marked_pids(p) for p in workers):
        time.sleep(0.05)
    for prefix in workers:
        signal_marked(prefix, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- helpers

def write_faults(folder: str, faults: list[dict]) -> None:
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "faults.json"), faults)


def calls(folder: str) -> list[list[str]]:
    """Every gcloud invocation's argv, in order."""
    path = os.path.join(folder, "calls.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["argv"] for line in f if line.strip()]


COMMANDS = {("queued-resources", "create"): create, ("queued-resources", "describe"): describe,
            ("queued-resources", "delete"): delete, ("tpu-vm", "ssh"): ssh}


def main(argv: list[str]) -> int:
    try:
        folder = root()
        if argv[:1] == ["monitor"]:
            try:
                return monitor(folder, argv[1], argv[2])
            except Exception:   # its stderr goes nowhere: say why the faults stopped
                with open(os.path.join(folder, "monitor-errors.txt"), "a") as f:
                    f.write(f"monitor of {argv[1]}:\n{traceback.format_exc()}\n")
                raise
        log_call(folder, argv)
        positional, flags = _flags(argv)
        if positional[:2] != ["compute", "tpus"] or tuple(positional[2:4]) not in COMMANDS or len(positional) != 5:
            raise Exit(2, f"ERROR: the emulated gcloud does not know: gcloud {' '.join(argv)}")
        return COMMANDS[tuple(positional[2:4])](folder, positional[4], flags)
    except Exit as e:
        print(e.message, file=sys.stderr, flush=True)
        return e.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
