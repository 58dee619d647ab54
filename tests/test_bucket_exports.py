"""The writers outside training and evaluation reach a gs:// bucket too (a real GCS emulator, tests/gcs_emulator.py):
the HF export (safetensors shards, index, config.json, heads), `python -m launch.fit` (fit_summary.json, the demo
table, the PNGs), the grid report's plots and the LLaVA-format export of synthetic data. Each writes in an empty
working directory that must stay empty (a local-only write to 'gs://...' leaves a folder named 'gs:' there), and
what lands in the bucket equals what the same call writes to a local folder."""

import io
import json
import os
import pathlib
import posixpath
import types

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image
from safetensors.numpy import load as load_safetensors

from tests import hf_fixtures as fx
from tests.gcs_emulator import gcs_bucket  # noqa: F401  (a fixture)
from tests.test_bucket_writes import empty_cwd, stored
from tests.test_plots import run_fit_cli
from vlm_jax import files, optim, scaling, sharding
from vlm_jax import state as state_lib
from vlm_jax.data import synthetic
from vlm_jax.grid import report as grid_report
from vlm_jax.weights import export


def _same_files(bucket, local: str, remote: str, names) -> None:
    """Every file in `names` is in the bucket, byte for byte as in the local folder, and really in the emulator."""
    for name in names:
        url = f"{remote}/{name}"
        assert epath.Path(url).read_bytes() == pathlib.Path(local, name).read_bytes(), name
        assert os.path.isfile(stored(bucket, url)), name


def test_hf_export_writes_shards_index_config_and_heads_to_the_bucket(gcs_bucket, tmp_path):   # noqa: F811
    cfg = fx.model_config()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    state, _, _ = state_lib.create_state(cfg, fx.train_config(), mesh, jax.random.key(1))
    params = optim.merge(state.params, state.frozen)
    remote = f"{gcs_bucket}/export"
    written = {}
    for where in (str(tmp_path / "local"), remote):
        with empty_cwd(tmp_path / f"cwd-{len(written)}"):
            written[where] = (
                export.export_llm(params["llm"], cfg.llm, f"{where}/llm", "float16", max_shard_bytes=40_000),
                export.export_vision(params["vision"], cfg.vision, f"{where}/vision"),
                export.export_heads(params, cfg, f"{where}/heads"))
    local = str(tmp_path / "local")
    llm_files, vision_files, head_files = written[remote]
    assert written[local] == written[remote]
    assert len([f for f in llm_files if f.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in llm_files
    for part, names in (("llm", llm_files), ("vision", vision_files), ("heads", head_files)):
        _same_files(gcs_bucket, f"{local}/{part}", f"{remote}/{part}", names)
    # The shards load back from the bucket and hold every tensor the index names.
    index = json.loads(epath.Path(remote, "llm", "model.safetensors.index.json").read_text())
    for name in sorted(set(index["weight_map"].values())):
        tensors = load_safetensors(epath.Path(remote, "llm", name).read_bytes())
        assert sorted(tensors) == sorted(t for t, n in index["weight_map"].items() if n == name)
    heads = load_safetensors(epath.Path(remote, "heads", "heads.safetensors").read_bytes())
    np.testing.assert_array_equal(heads["model.mm_projector.0.weight"],
                                  np.asarray(params["projector"]["linear_1"]["kernel"]).T)
    assert json.loads(epath.Path(remote, "llm", "config.json").read_text())["model_type"] == "qwen2"


def test_a_large_shard_is_streamed_to_the_bucket_in_chunks_and_arrives_whole(gcs_bucket, tmp_path,   # noqa: F811
                                                                              monkeypatch):
    """A shard bigger than gcsfs's upload block goes up as a resumable upload of several chunks (from a local file,
    never a second whole copy in memory) and arrives complete."""
    import gcsfs.core

    chunks = []
    upload_chunk = gcsfs.core.GCSFile._upload_chunk

    def counted(self, *args, **kwargs):
        chunks.append(self.buffer.tell())
        return upload_chunk(self, *args, **kwargs)

    monkeypatch.setattr(gcsfs.core.GCSFile, "_upload_chunk", counted)
    monkeypatch.setattr(files, "_CHUNK", 2**20)   # read 1 MB at a time: gcsfs sends a chunk per 5 MB block
    rng = np.random.default_rng(0)
    tensors = {"big": rng.standard_normal((2**20 + 7, 4), dtype=np.float32)}   # 16 MB
    url = f"{gcs_bucket}/large"
    with empty_cwd(tmp_path / "cwd"):
        assert export.write_directory(url, tensors, None) == ["model.safetensors"]
    assert len(chunks) > 2 and max(chunks) < tensors["big"].nbytes // 2, chunks
    back = load_safetensors(pathlib.Path(stored(gcs_bucket, f"{url}/model.safetensors")).read_bytes())
    np.testing.assert_array_equal(back["big"], tensors["big"])


def test_a_shard_upload_that_fails_midway_leaves_no_object(gcs_bucket, tmp_path, monkeypatch):   # noqa: F811
    """A reader must never find a truncated shard: chunks already sent are discarded, not committed."""
    def fail_after_two_blocks(src, dst, length):
        dst.write(src.read(2 * dst.blocksize + 1))   # gcsfs has sent chunks of a resumable upload by now
        raise OSError("connection lost")

    monkeypatch.setattr(files.shutil, "copyfileobj", fail_after_two_blocks)
    tensors = {"big": np.ones((2**20 + 7, 4), np.float32)}   # 16 MB
    url = f"{gcs_bucket}/failed/model.safetensors"
    with pytest.raises(OSError, match="connection lost"):
        export.write_directory(posixpath.dirname(url), tensors, None)
    assert not epath.Path(url).exists() and not os.path.exists(stored(gcs_bucket, url))


def test_fit_cli_writes_its_summary_demo_table_and_plots_to_the_bucket(gcs_bucket, tmp_path, capsys):   # noqa: F811
    out = f"{gcs_bucket}/fit-demo"
    with empty_cwd(tmp_path / "cwd"):
        assert run_fit_cli(["--demo", f"--out={out}", "--bootstrap=0", "--text_tokens=64",
                            "--forms=multiplicative"]) == 0
    assert f"in {out}/" in capsys.readouterr().out
    summary = json.loads(epath.Path(out, "fit_summary.json").read_text())
    assert list(summary) == ["decision", "fits"]
    plots = [p for forms in summary["fits"].values() for s in forms.values() for p in s["plots"]]
    assert len(plots) == 2 * 3 and all(p.startswith(f"{out}/") for p in plots)
    for p in plots:
        assert Image.open(io.BytesIO(epath.Path(p).read_bytes())).format == "PNG"
        assert os.path.isfile(stored(gcs_bucket, p))
    rows = scaling.tables.read_rows(f"{out}/demo_results.jsonl")   # the demo table, read back from the bucket
    assert len(rows) == 2 * len(scaling.report.DEMO_LLMS) * len(scaling.report.DEMO_V) * 2


def test_fit_cli_reads_a_bucket_table_and_writes_its_summary_beside_it(gcs_bucket, tmp_path):   # noqa: F811
    url = f"{gcs_bucket}/fit-table/results.jsonl"
    rows = [r for r in scaling.report.demo_rows({"a": 5e8, "b": 2e9, "c": 4e9, "d": 7e9}, seed=1)
            if r["task"] == "reasoning"]
    scaling.tables.write_rows(url, rows)
    with empty_cwd(tmp_path / "cwd"):
        assert run_fit_cli([f"--results={url}", "--bootstrap=0", "--noplots", "--forms=multiplicative"]) == 0
    summary = json.loads(epath.Path(url).parent.joinpath("fit_summary.json").read_text())
    assert set(summary["fits"]["reasoning"]) == {"multiplicative"}


def test_grid_report_writes_summary_report_and_plots_to_the_bucket(gcs_bucket, tmp_path):   # noqa: F811
    rows = [dict(r, cell=f"{r['llm']}_v{r['visual_tokens']}_s{r['seed']}")
            for r in scaling.report.demo_rows({"a": 5e8, "b": 2e9, "c": 4e9, "d": 7e9}, seed=1)]
    cfg = types.SimpleNamespace(forms=("multiplicative",), text_tokens=(16.0,), bootstrap=0, seed=0, level=0.95)
    grid = f"{gcs_bucket}/grid"
    with empty_cwd(tmp_path / "cwd"):
        summary = grid_report.report_rows(grid, rows, cfg, echo=lambda line: None)
    assert json.loads(epath.Path(grid, "summary.json").read_text())["plots"] == summary["plots"]
    assert epath.Path(grid, "report.txt").read_text().startswith("DECISION")
    assert f"{grid}/plots/observed_error.png" in summary["plots"] and len(summary["plots"]) == 1 + 2 * 3
    for p in summary["plots"]:
        assert p.startswith(f"{grid}/plots/")
        assert Image.open(io.BytesIO(epath.Path(p).read_bytes())).format == "PNG"
        assert os.path.isfile(stored(gcs_bucket, p))


def test_llava_export_writes_its_json_and_images_to_the_bucket(gcs_bucket, tmp_path):   # noqa: F811
    source = synthetic.SyntheticSource("train", 6)
    examples = [synthetic.make_example("train", source.families[i % 2], i // 2) for i in range(6)]
    local = str(tmp_path / "local")
    remote = f"{gcs_bucket}/llava"
    with empty_cwd(tmp_path / "cwd"):
        json_url = synthetic.write_llava(remote, examples)
    assert json_url == f"{remote}/data.json"
    local_json = synthetic.write_llava(local, examples)
    records = json.loads(pathlib.Path(local_json).read_text())
    _same_files(gcs_bucket, local, remote, ["data.json"] + [r["image"] for r in records])
    first = np.asarray(Image.open(io.BytesIO(epath.Path(remote, records[0]["image"]).read_bytes())))
    np.testing.assert_array_equal(first, examples[0].image)
