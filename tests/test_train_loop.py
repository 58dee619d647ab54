"""The training loop end to end on the synthetic data: metrics file, exact resume, config errors, the CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from configs import smoke
from vlm_jax import checkpoints, files, optim, sharding, train
from vlm_jax import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(run_dir, steps=4, **arg):
    spec = ",".join(f"{k}={v}" for k, v in dict(dict(llm="tiny-s", tokens=4, res=32), **arg).items())
    config = smoke.get_config(spec)
    with config.unlocked():
        config.run_dir = str(run_dir)
        config.train.steps = steps
        config.train.batch_size = 4
        config.train.log_every = 2
        config.train.checkpoint_every = 2
        config.train.keep_checkpoints = 5
        config.data.seq_len = 24
    return config


def final_params(run_dir):
    _, params = state_lib.load_params(str(run_dir))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    last = train.run(small_config(run_dir))
    return run_dir, last


def test_metrics_file_has_one_line_per_logged_step(full_run):
    run_dir, last = full_run
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4]
    for key in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm"):
        assert key in lines[-1]
    assert lines[-1]["tokens_per_s"] > 0 and 0 < lines[-1]["mfu"] < 1
    assert lines[-1] == last
    assert os.path.exists(os.path.join(run_dir, "bad_input.json"))


def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_run(full_run, tmp_path):
    run_dir, _ = full_run
    # An interrupted run: step 4 was logged, but its checkpoint never committed (the host was lost first).
    shutil.copytree(run_dir, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    train.run(small_config(tmp_path / "resumed"))
    a, b = final_params(run_dir), final_params(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [2, 4]   # each step logged once: the line of the lost step 4 made way for its re-run


def test_restoring_a_checkpoint_into_a_different_model_fails_clearly(full_run, tmp_path):
    run_dir, _ = full_run
    mngr = checkpoints.manager(os.path.join(run_dir, "checkpoints"))
    for llm, error in (("tiny-s-lean", "checkpoint shape mismatch"),   # same depth, a narrower MLP
                       ("tiny", r"does not match the configured model: missing \['opt_state.*layers_2")):  # deeper
        config = small_config(tmp_path, llm=llm)
        _, abstract, _ = state_lib.state_layout(config.model, config.train, sharding.make_mesh(config.mesh))
        with pytest.raises(ValueError, match=error):
            checkpoints.restore_latest(mngr, abstract)


def test_params_only_restore_equals_the_full_restore_and_checks_shapes(full_run, tmp_path):
    run_dir, _ = full_run
    config = small_config(run_dir)
    mesh = sharding.make_mesh(config.mesh)
    _, abstract, _ = state_lib.state_layout(config.model, config.train, mesh)
    directory = os.path.join(run_dir, "checkpoints")
    mngr = checkpoints.manager(directory)
    step, state, _, _ = checkpoints.restore_latest(mngr, abstract)
    mngr.close()
    part_step, parts = checkpoints.restore_latest_parts(directory, {"params": abstract.params})
    assert part_step == step and set(parts) == {"params"}
    flat = traverse_util.flatten_dict(parts["params"], sep="/")
    assert flat.keys() == traverse_util.flatten_dict(state.params, sep="/").keys()
    for k, v in traverse_util.flatten_dict(state.params, sep="/").items():
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v))
    wider = small_config(tmp_path, llm="tiny-s-lean")   # same depth, another MLP width
    _, wrong, _ = state_lib.state_layout(wider.model, wider.train, sharding.make_mesh(wider.mesh))
    with pytest.raises(ValueError, match="checkpoint shape mismatch"):
        checkpoints.restore_latest_parts(directory, {"params": wrong.params})


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.model.compressor, "num_tokens", 5), "V=5"),
    (lambda c: setattr(c.model.compressor, "name", "nope"), "unknown compressor head 'nope'"),
    (lambda c: setattr(c.mesh, "data", 3), "config.mesh"),
    (lambda c: setattr(c.train, "stage", "everything"), "train.stage='everything'"),
    (lambda c: setattr(c.model.llm, "num_kv_heads", 3), "num_kv_heads=3"),
    (lambda c: setattr(c.model.vision, "image_size", 36), "image_size=36"),
    (lambda c: setattr(c.train, "loss_chunk", -1), "train.loss_chunk=-1"),
    (lambda c: setattr(c.model.llm, "max_position_embeddings", 27),
     "4 visual tokens = 28 positions exceed model.llm.max_position_embeddings=27"),
])
def test_impossible_configs_fail_at_start_naming_the_key(tmp_path, change, message):
    config = small_config(tmp_path)
    with config.unlocked():
        change(config)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        train.validate_config(config, 0, vocab_size=64)


def test_parameters_matching_no_rule_are_an_error(tmp_path):
    config = small_config(tmp_path)
    with config.unlocked():
        config.train.param_rules = ("^llm/:train",)
    mesh = sharding.make_mesh(config.mesh)
    with pytest.raises(ValueError, match="match no rule"):
        state_lib.state_layout(config.model, config.train, mesh)


def test_cli_rejects_unknown_override_keys():
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/smoke.py",
                           "--config.train.stepz=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_metrics_lines_append_locally_and_rewrite_on_an_object_store(tmp_path, monkeypatch):
    local = tmp_path / "metrics.jsonl"
    files.append_line(str(local), '{"step": 1}')
    files.append_line(str(local), '{"step": 2}')
    assert local.read_text() == '{"step": 1}\n{"step": 2}\n'
    # An object store has no append: the whole file is read and written back (an in-memory stand-in for gs://).
    store = {}

    class FakeGcsPath:
        def __init__(self, path):
            self.path = path

        def exists(self):
            return self.path in store

        def read_text(self):
            return store[self.path]

        def write_text(self, text):
            store[self.path] = text

    monkeypatch.setattr(train.epath, "Path", FakeGcsPath)
    files.append_line("gs://bucket/run/metrics.jsonl", "a")
    files.append_line("gs://bucket/run/metrics.jsonl", "b")
    assert store == {"gs://bucket/run/metrics.jsonl": "a\nb\n"}


def test_fresh_state_equals_the_model_init_compiled_with_default_optimisations():
    """create_state compiles the one-off init without backend optimisations on the CPU: same numbers."""
    import jax
    from flax import linen as nn

    from vlm_jax.models import vlm

    config = smoke.get_config()
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    state, _, _ = state_lib.create_state(config.model, config.train, mesh, jax.random.key(3))
    reference = nn.meta.unbox(jax.jit(vlm.init_fn(config.model))(jax.random.key(3)))
    got = traverse_util.flatten_dict(optim.merge(state.params, state.frozen), sep="/")
    want = traverse_util.flatten_dict(reference, sep="/")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_resuming_with_a_different_config_is_refused_naming_the_keys_unless_allowed(full_run, tmp_path):
    run_dir, _ = full_run
    shutil.copytree(run_dir, tmp_path / "run")
    changed = small_config(tmp_path / "run")
    with changed.unlocked():
        changed.train.lr = 5e-4
        changed.train.grad_clip = 0.5
    message = r"(?s)step 4.*train\.grad_clip: 1\.0 -> 0\.5.*train\.lr: 0\.0003 -> 0\.0005"
    with pytest.raises(ValueError, match=message):
        train.run(changed)
    train.run(small_config(tmp_path / "run"))   # the same config (in a moved directory) resumes
    train.run(changed, allow_config_change=True)   # explicitly allowed: resumes, and the new config is saved
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 5e-4


def _nan_at(step_to_poison: int, monkeypatch):
    """Make the pipeline's batch number `step_to_poison` (1-based) carry a NaN image: a non-finite loss there."""
    from vlm_jax.data import pipeline

    real = pipeline.make_train_iterator

    def poisoned(*args, **kwargs):
        it = real(*args, **kwargs)

        class Poisoned:
            def __init__(self):
                self.n, self.bad_input = 0, it.bad_input

            def __next__(self):
                batch = next(it)
                self.n += 1
                if self.n == step_to_poison:
                    batch = dict(batch, pixels=np.full_like(batch["pixels"], np.nan))
                return batch

            def get_state(self):
                return it.get_state()

            def set_state(self, state):
                it.set_state(state)

        return Poisoned()

    monkeypatch.setattr(pipeline, "make_train_iterator", poisoned)


def test_a_non_finite_step_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_at(3, monkeypatch)
    config = small_config(tmp_path, steps=6)
    with config.unlocked():
        config.train.log_every = 3
        config.train.checkpoint_every = 2   # step 4 is a checkpoint step between two log steps
    with pytest.raises(FloatingPointError, match=r"step 3 .*last checkpoint \(step 2\) is intact"):
        train.run(config)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]   # nothing saved after the bad step
    params = final_params(tmp_path)
    assert all(np.isfinite(v).all() for v in params.values())


def test_skip_nonfinite_leaves_the_update_out_and_counts_it(tmp_path, monkeypatch):
    _nan_at(3, monkeypatch)
    config = small_config(tmp_path, steps=4)
    with config.unlocked():
        config.train.skip_nonfinite = True
    last = train.run(config)
    assert last["skipped/nonfinite_updates"] == 1 and np.isfinite(last["loss_avg"])
    assert all(np.isfinite(v).all() for v in final_params(tmp_path).values())


def test_each_process_saves_its_own_data_iterator_state(full_run):
    """grain's checkpoint handler: one file per process (a host restores its own shard's position)."""
    run_dir, _ = full_run
    data = run_dir / "checkpoints" / "4" / "data"
    assert [f for f in os.listdir(data) if f.endswith(".json")] == ["process_0-of-1.json"]
    state = json.loads((data / "process_0-of-1.json").read_text())
    assert set(state) == {"grain", "bad_input"}


def test_the_train_step_compiles_exactly_once_per_run(tmp_path):
    """Logging, checkpointing and periodic evaluation must not make the step recompile (a new shape, a weak type,
    a changed sharding would)."""
    import jax

    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    cache = jax.config.jax_enable_compilation_cache   # the suite's cache would answer a compile seen before
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        config = small_config(tmp_path, steps=6)
        with config.unlocked():
            config.train.eval_every = 3
            config.train.eval_batches = 1
        train.run(config)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        jax.config.update("jax_enable_compilation_cache", cache)
    assert compiled.count("jit(train_step)") == 1, compiled


def test_unset_scan_layers_loops_on_the_cpu_scans_elsewhere_and_the_run_records_its_choice(full_run):
    from vlm_jax.models import llm as llm_lib

    unset = small_config("unused").model.llm
    assert unset.scan_layers is None
    assert [llm_lib.scans_layers(unset, p) for p in ("cpu", "tpu", "gpu")] == [False, True, True]
    with unset.unlocked():
        unset.scan_layers = True
    assert llm_lib.scans_layers(unset, "cpu")   # an explicit setting wins everywhere
    run_dir, _ = full_run
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["model"]["llm"]["scan_layers"] is False   # the layout its checkpoints have, named
    assert any(k.startswith("llm/layers_0/") for k in final_params(run_dir))
