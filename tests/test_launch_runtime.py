"""What every launcher does first (launch/runtime.py): XLA's persistent compilation cache (a second process loads
what the first compiled), huge-page malloc by re-executing itself, JAX kept off a TPU that is not there."""

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from vlm_jax.paths import REPO_ROOT

PROBE = """
import json, jax, jax.numpy as jnp
from launch import runtime
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
runtime.start(distributed=False)
jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _probe(cache: str) -> dict:
    env = dict(os.environ, VLM_JAX_COMPILATION_CACHE=cache, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow   # starts processes
def test_a_second_process_hits_the_cache_the_first_filled(tmp_path):
    cache = str(tmp_path / "xla")
    first = _probe(cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert os.listdir(cache)
    second = _probe(cache)
    assert second["hits"] >= 1 and second["misses"] == 0


@pytest.mark.slow   # starts processes
def test_an_empty_setting_turns_the_cache_off(tmp_path):
    off = _probe("")
    assert off == {"hits": 0, "misses": 0}


FAULTS = """
import resource, sys
import jax, numpy as np, flax.linen as nn
from configs import smoke
from launch import runtime
from vlm_jax import sharding
from vlm_jax import state as state_lib
from vlm_jax.models import vlm
runtime.start(distributed=False)
c = smoke.get_config(None)   # its train step allocates 163 MiB of temporaries on every run
mesh = sharding.make_mesh(c.mesh)
state, _, tx = state_lib.create_state(c.model, c.train, mesh, jax.random.key(0))
b, length, s, v, lq = c.train.batch_size, c.data.seq_len + c.model.compressor.num_tokens, c.model.vision.image_size, \\
    c.model.compressor.num_tokens, c.data.question_len
ints = lambda *shape: np.ones(shape, np.int32)
batch = dict(pixels=np.zeros((b, s, s, 3), np.float32), tokens=ints(b, length), targets=ints(b, length),
             loss_mask=np.ones((b, length), np.float32), attention_mask=ints(b, length), image_positions=ints(b, v),
             question_tokens=ints(b, lq), question_mask=ints(b, lq))
step = jax.jit(state_lib.make_train_step(vlm.VLM(c.model), tx), donate_argnums=(0,))
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state, m = step(state, batch)
    jax.block_until_ready(m)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        state, m = step(state, batch)
        jax.block_until_ready(m)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


REEXEC = """
import os, sys
print("before", os.getpid(), flush=True)
from launch import runtime
runtime.start(distributed=False)
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""))
"""


@pytest.mark.slow   # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
def test_launchers_rerun_themselves_with_huge_page_malloc_in_the_same_process():
    def lines(huge_pages: str) -> list[list[str]]:
        env = dict(os.environ, VLM_JAX_HUGE_PAGES=huge_pages, VLM_JAX_COMPILATION_CACHE="", PYTHONPATH=REPO_ROOT)
        env.pop("GLIBC_TUNABLES", None)
        out = subprocess.run([sys.executable, "-c", REEXEC], env=env, capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT)
        return [line.split() for line in out.stdout.splitlines()]
    on = lines("1")   # the code before start() runs twice (the process is re-executed), in one PID
    assert [x[0] for x in on] == ["before", "before", "after"] and len({x[1] for x in on}) == 1
    assert "glibc.malloc.hugetlb=1" in on[-1][2]
    off = lines("0")
    assert [x[0] for x in off] == ["before", "after"] and len(off[-1]) == 2   # no tunables set


@pytest.mark.slow   # ~40 s: two processes build and run the smoke train step
@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages on request (madvise mode); "
                    "'always' gives them without asking, 'never' not at all")
def test_huge_page_malloc_stops_steps_faulting_their_temporaries_in_4k_pages():
    def faults_per_step(huge_pages: str) -> float:
        env = dict(os.environ, VLM_JAX_HUGE_PAGES=huge_pages, VLM_JAX_COMPILATION_CACHE="", PYTHONPATH=REPO_ROOT)
        env.pop("GLIBC_TUNABLES", None)
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT)
        return float(out.stdout.strip().splitlines()[-1])
    off, on = faults_per_step("0"), faults_per_step("1")
    assert off > 163 * 2**20 / 4096 * 0.8   # each step faults its temporaries in anew, 4 KiB at a time
    assert on < off / 20


def _reexec_env(**extra) -> dict:
    env = dict(os.environ, VLM_JAX_HUGE_PAGES="1", VLM_JAX_COMPILATION_CACHE="", PYTHONPATH=REPO_ROOT, **extra)
    for name in ("GLIBC_TUNABLES", "VLM_JAX_REEXECUTED"):
        env.pop(name, None)
    return env


STDIN_PROGRAM = """
import os
print("before", flush=True)
from launch import runtime
runtime.use_huge_pages()
print("after", os.environ.get("GLIBC_TUNABLES", "-"))
"""


@pytest.mark.slow   # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
@pytest.mark.parametrize("argv", [["-"], []], ids=["python -", "python < file"])
def test_a_program_read_from_stdin_runs_once_to_the_end_and_says_the_setting_is_not_applied(argv):
    # Re-executed, it would read a consumed stdin: an empty program, exit 0, nothing done.
    out = subprocess.run([sys.executable, *argv], input=STDIN_PROGRAM, env=_reexec_env(), capture_output=True,
                         text=True, check=True, cwd=REPO_ROOT, timeout=60)
    assert out.stdout.split() == ["before", "after", "-"]
    assert "not applied" in out.stderr and "standard input" in out.stderr


LOOP = """
import os, sys
runs = int(os.environ.get("TEST_RUNS", "0")) + 1
os.environ["TEST_RUNS"] = str(runs)   # carried into a re-executed process
print("run", runs, flush=True)
if runs > 4:
    sys.exit("re-executed in a loop")
os.environ.pop("GLIBC_TUNABLES", None)   # as if something dropped the setting on the way
from launch import runtime
runtime.use_huge_pages()
print("after", os.getpid())
"""


@pytest.mark.slow   # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
def test_a_process_is_re_executed_at_most_once_even_if_the_setting_is_lost():
    out = subprocess.run([sys.executable, "-c", LOOP], env=_reexec_env(), capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[:2] == ["run 1", "run 2"] and out.stdout.split()[-2] == "after"
    assert "is gone" in out.stderr


RUN = """
import os, sys
print("before", os.getpid(), flush=True)
from launch import runtime
def main(argv):
    print("main", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), " ".join(argv[1:]))
runtime.run(main, reexec=sys.argv[1] == "reexec")
"""


@pytest.mark.slow   # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
@pytest.mark.parametrize("reexec", [True, False])
def test_run_re_executes_before_main_only_when_asked(reexec):
    arg = "reexec" if reexec else "once"
    out = subprocess.run([sys.executable, "-c", RUN, arg], env=_reexec_env(), capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT, timeout=60)
    lines = [line.split() for line in out.stdout.splitlines()]
    assert [x[0] for x in lines] == ["before"] * (1 + reexec) + ["main"] and len({x[1] for x in lines}) == 1
    assert lines[-1][2:] == ["glibc.malloc.hugetlb=1" if reexec else "-", arg]   # main gets the command line


def _main_block_run_call(path: str):
    """The runtime.run(...) call of a launcher's `if __name__ == "__main__":` block, or None."""
    tree = ast.parse(open(path).read())
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "runtime.run":
                    return call
    return None


def test_every_launcher_starts_through_runtime_run_and_only_training_and_conversion_re_execute():
    launch_dir = os.path.join(REPO_ROOT, "launch")
    launchers = sorted(f[:-3] for f in os.listdir(launch_dir)
                       if f.endswith(".py") and f not in ("__init__.py", "runtime.py"))
    assert {"train", "cell", "convert", "evaluate", "fit", "grid", "head_params", "plan"} <= set(launchers)
    reexec = set()
    for name in launchers:
        call = _main_block_run_call(os.path.join(launch_dir, f"{name}.py"))
        assert call is not None, f"launch/{name}.py does not start through runtime.run"
        flags = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        if flags.get("reexec", False):
            reexec.add(name)
    assert reexec == {"train", "cell", "convert"}


# ---------------------------------------------------------------------------------------- libtpu without a TPU


@pytest.mark.parametrize("files, environ, libtpu, want", [
    ([], {}, True, "cpu"),                                  # libtpu, no accelerator: JAX would probe in vain
    (["vfio/vfio"], {}, True, "cpu"),                       # the VFIO container alone is no device
    (["accel0"], {}, True, None),                           # TPU v4: /dev/accel<N>
    (["vfio/vfio", "vfio/0"], {}, True, None),              # TPU v5e/v5p/v6e: a VFIO group
    (["nvidia0"], {}, True, None),                          # a GPU: JAX's own choice stands
    ([], {"JAX_PLATFORMS": ""}, True, None),                # set, even to '' (JAX chooses): never overridden
    ([], {"JAX_PLATFORMS": "tpu"}, True, None),
    ([], {"JAX_FORCE_TPU_INIT": "1"}, True, None),
    ([], {}, False, None),                                  # no libtpu: nothing probes for a TPU
])
def test_jax_is_kept_off_the_tpu_only_where_there_is_none(tmp_path, files, environ, libtpu, want):
    from launch import runtime

    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    assert runtime.default_jax_platforms(environ, str(tmp_path), libtpu_installed=libtpu) == want


def _accelerator_here() -> bool:
    from launch import runtime
    return runtime.tpu_attached() or any(os.path.exists(f"/dev/{name}") for name in runtime.GPU_DEVICE_FILES)


@pytest.mark.slow   # starts two JAX processes (~4 s)
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -r requirements-tpu.txt")
@pytest.mark.skipif(_accelerator_here(), reason="a TPU or GPU is attached: JAX must find it")
def test_with_libtpu_and_no_tpu_a_launcher_starts_jax_without_libtpu_errors():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, VLM_JAX_HUGE_PAGES="0")
    env.pop("JAX_PLATFORMS", None)

    def stderr_of(code: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT, timeout=120)
        assert out.stdout.split() == ["cpu"]
        return out.stderr
    # JAX alone probes for a TPU through libtpu, which complains (the noise every command used to print).
    assert "TPU_WORKER_HOSTNAMES" in stderr_of("import jax; print(jax.devices()[0].platform)")
    launched = stderr_of("from launch import runtime\n"
                         "def main(argv):\n    import jax\n    print(jax.devices()[0].platform)\n"
                         "runtime.run(main)")
    assert "TPU_WORKER_HOSTNAMES" not in launched and "TPU accelerator type" not in launched, launched
