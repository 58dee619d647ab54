"""Everything a run writes reaches a gs:// bucket (a real GCS emulator, tests/gcs_emulator.py): training's config,
metrics, bad-input counts and orbax checkpoints (and the resume from them), evaluation's predictions and summary, the
HF -> orbax conversion. Each runs in an empty working directory that must stay empty: a local-only write to a gs://
path would create a folder named 'gs:' there."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from tests import helpers
from tests import hf_fixtures as fx
from tests.gcs_emulator import gcs_bucket  # noqa: F401  (a fixture)
from tests.test_train_loop import small_config
from vlm_jax import checkpoints, evaluation, optim, sharding, train
from vlm_jax import state as state_lib
from vlm_jax.data import errors, pipeline
from vlm_jax.weights import convert, export

# Some synthetic training records do not fit 18 text tokens: they are skipped and counted (too_long).
SEQ_LEN = 18


@contextlib.contextmanager
def empty_cwd(folder):
    """Run in `folder` (created empty); afterwards it must still be empty."""
    os.makedirs(folder)
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)
    assert os.listdir(folder) == [], f"local files written instead of the bucket: {os.listdir(folder)}"


def run_config(run_dir):
    config = small_config(run_dir, steps=4)
    with config.unlocked():
        config.data.seq_len = SEQ_LEN
    return config


def stored(bucket, url: str) -> str:
    """The emulator's own copy of object `url` (its filesystem backend keeps one file per object)."""
    return os.path.join(bucket.root, url[len(bucket) + 1:])


@pytest.fixture(scope="module")
def bucket_run(gcs_bucket, tmp_path_factory):   # noqa: F811
    run_dir = f"{gcs_bucket}/run"
    with empty_cwd(tmp_path_factory.mktemp("cwd") / "train"):
        last = train.run(run_config(run_dir))
    return run_dir, last


def test_bad_input_counts_are_written_to_a_bucket(gcs_bucket, tmp_path):   # noqa: F811
    counter = errors.BadInputCounter()
    counter.add(errors.TOO_LONG, "rec-1", "too long")
    url = f"{gcs_bucket}/unit/bad_input.json"
    with empty_cwd(tmp_path / "cwd"):
        counter.write(url)
    written = json.loads(epath.Path(url).read_text())
    assert written == {"total": 1, "counts": {"too_long": 1}, "examples": {"too_long": ["rec-1: too long"]}}
    assert json.loads(open(stored(gcs_bucket, url)).read()) == written


def test_a_child_process_given_the_fixture_env_reaches_the_same_bucket(gcs_bucket, tmp_path):   # noqa: F811
    """What a script emulating a TPU slice does: its worker processes get `gcs_bucket.env` and nothing else."""
    url = f"{gcs_bucket}/child/hello.txt"
    code = f"from etils import epath; epath.Path({url!r}).write_text('from the child')"
    env = {k: v for k, v in os.environ.items() if k not in gcs_bucket.env}   # not inherited from this process
    subprocess.run([sys.executable, "-c", code], env={**env, **gcs_bucket.env}, check=True, timeout=60)
    assert epath.Path(url).read_text() == "from the child"
    assert open(stored(gcs_bucket, url)).read() == "from the child"


@pytest.mark.slow
def test_a_training_run_writes_config_metrics_bad_input_and_checkpoints_to_the_bucket(gcs_bucket,   # noqa: F811
                                                                                     bucket_run):
    run_dir, last = bucket_run
    run = epath.Path(run_dir)
    assert json.loads(run.joinpath("config.json").read_text())["run_dir"] == run_dir
    lines = [json.loads(x) for x in run.joinpath("metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and lines[-1] == last
    bad = json.loads(run.joinpath("bad_input.json").read_text())
    assert bad["counts"].get(errors.TOO_LONG, 0) > 0 and bad["total"] == last[f"skipped/{errors.TOO_LONG}"]
    assert helpers.saved_steps(run_dir) == [2, 4]
    for name in ("config.json", "metrics.jsonl", "bad_input.json"):   # really through the emulator
        assert os.path.isfile(stored(gcs_bucket, f"{run_dir}/{name}"))
    assert os.path.isdir(stored(gcs_bucket, checkpoints.directory(run_dir) + "/4"))


@pytest.mark.slow
def test_a_run_resumes_from_its_bucket_checkpoint_as_if_uninterrupted(bucket_run, tmp_path):
    run_dir, _ = bucket_run
    uninterrupted = helpers.trained_params(run_dir)
    # The host was lost after step 4 was logged and before its checkpoint committed: in a bucket (no atomic
    # rename), its folder is there with everything but the commit marker.
    step4 = epath.Path(checkpoints.directory(run_dir)) / "4"
    (step4 / "commit_success.txt").unlink()
    assert step4.exists() and helpers.saved_steps(run_dir) == [2]
    with empty_cwd(tmp_path / "cwd"):
        train.run(run_config(run_dir))
    resumed = helpers.trained_params(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        np.testing.assert_allclose(resumed[k], uninterrupted[k], atol=1e-6, err_msg=k)
    lines = epath.Path(run_dir).joinpath("metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4]   # step 4 logged once, by the resumed run


@pytest.mark.slow
def test_evaluation_writes_predictions_and_summary_to_the_bucket(gcs_bucket, bucket_run, tmp_path):   # noqa: F811
    run_dir, _ = bucket_run
    config, params = state_lib.load_params(run_dir)   # read back from the bucket
    answerer = evaluation.Answerer(config, params, pipeline.make_tokenizer(config.data), batch_size=4,
                                   max_new_tokens=4, seq_len=32)   # the run trained on short ones
    benchmarks = evaluation.synthetic_benchmarks(config.data, config.model.vision.image_size, 3)
    out_dir = f"{run_dir}/eval"
    with empty_cwd(tmp_path / "cwd"):
        summary = evaluation.evaluate(answerer, benchmarks, out_dir)
    assert json.loads(epath.Path(out_dir, "summary.json").read_text()) == json.loads(json.dumps(summary))
    for b in benchmarks:
        url = f"{out_dir}/{b.name.replace('/', '_')}.predictions.jsonl"
        rows = [json.loads(x) for x in epath.Path(url).read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [it.question_id for it in b.items]
        assert np.mean([r["credit"] for r in rows]) == pytest.approx(summary["scores"][b.name])
        assert os.path.isfile(stored(gcs_bucket, url))


@pytest.mark.slow
def test_hf_conversion_writes_its_checkpoint_and_model_config_to_the_bucket(gcs_bucket, tmp_path):   # noqa: F811
    cfg = fx.model_config()
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    state, _, _ = state_lib.create_state(cfg, fx.train_config(), mesh, jax.random.key(1))
    hf_dir = str(tmp_path / "qwen")
    export.export_llm(optim.merge(state.params, state.frozen)["llm"], cfg.llm, hf_dir)
    out = f"{gcs_bucket}/converted"
    with empty_cwd(tmp_path / "cwd"):
        n = convert.hf_to_orbax([(hf_dir, "llm/.*")], cfg, out, mesh)
    assert n > 0
    assert json.loads(epath.Path(out, "model_config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    assert checkpoints.complete_steps(checkpoints.directory(out)) == [0]
    # A run's config.init takes the parameters from the bucket: the same as from the HF directory.
    from_hf, _, _ = state_lib.create_state(cfg, fx.train_config(), mesh, jax.random.key(0), [(hf_dir, "llm/.*")])
    from_bucket, _, _ = state_lib.create_state(cfg, fx.train_config(), mesh, jax.random.key(0), [(out, "llm/.*")])
    a, b = (optim.merge(s.params, s.frozen)["llm"] for s in (from_hf, from_bucket))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow   # starts the convert CLI
def test_convert_cli_exports_a_bucket_run_to_hf_directories_in_the_bucket(gcs_bucket, bucket_run,   # noqa: F811
                                                                         tmp_path):
    """`python -m launch.convert --export_run=gs://... --out=gs://...` (a child process given only the bucket's
    environment) writes what run_to_hf writes to a local folder, byte for byte."""
    run_dir, _ = bucket_run
    local = str(tmp_path / "local")
    written = convert.run_to_hf(run_dir, local, ("llm", "heads", "vision"), "bfloat16")
    out = f"{gcs_bucket}/hf-export"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in gcs_bucket.env}
    env.update(gcs_bucket.env, PYTHONPATH=root, JAX_PLATFORMS="cpu", VLM_JAX_COMPILATION_CACHE="")
    with empty_cwd(tmp_path / "cwd"):
        proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--export_run={run_dir}", f"--out={out}",
                               "--parts=llm,heads,vision"], check=False, capture_output=True, text=True, timeout=300,
                              env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(written) == ["heads", "llm", "vision"]
    for part, names in written.items():
        for name in names:
            url = f"{out}/{part}/{name}"
            with open(os.path.join(local, part, name), "rb") as f:
                assert epath.Path(url).read_bytes() == f.read(), url
            assert os.path.isfile(stored(gcs_bucket, url))
