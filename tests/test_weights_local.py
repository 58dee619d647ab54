"""Hugging Face checkpoints without transformers: refusals that name what is wrong, and conversion both ways.

The checkpoints here are written by our own exporter from a random model (no transformers needed), then broken
one way each.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests import hf_fixtures as fx
from vlm_jax import optim, sharding, train
from vlm_jax import state as state_lib
from vlm_jax.weights import export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny LLM exported as one model.safetensors + config.json."""
    cfg = fx.model_config()
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    state, _, _ = state_lib.create_state(cfg, fx.train_config(), mesh, jax.random.key(1))
    path = str(tmp_path_factory.mktemp("qwen"))
    export.export_llm(optim.merge(state.params, state.frozen)["llm"], cfg.llm, path)
    return path


def _copy(src, dst, edit_tensors=None, edit_config=None) -> str:
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    config = json.load(open(os.path.join(src, "config.json")))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def _load(path, regex="llm/.*"):
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    return state_lib.create_state(fx.model_config(), fx.train_config(), mesh, jax.random.key(0), [(path, regex)])


def test_the_unbroken_export_loads(exported):
    state, _, _ = _load(exported)
    assert state.step == 0


def test_missing_tensor_is_named(exported, tmp_path):
    path = _copy(exported, tmp_path / "c", edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        _load(path)


def test_unexpected_tensor_is_named(exported, tmp_path):
    path = _copy(exported, tmp_path / "c",
                 edit_tensors=lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"no parameter reads: \['model\.layers\.0\.mlp\.extra\.weight'\]"):
        _load(path)


def test_shape_mismatch_names_tensor_and_shapes(exported, tmp_path):
    path = _copy(exported, tmp_path / "c",
                 edit_tensors=lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \[63\].*needs \[64\]"):
        _load(path)


def test_integer_tensor_cannot_be_cast(exported, tmp_path):
    path = _copy(exported, tmp_path / "c",
                 edit_tensors=lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' is I32, which cannot be cast"):
        _load(path)


def test_config_of_another_architecture_is_refused(exported, tmp_path):
    def llama(c):
        c.update(model_type="llama", architectures=["LlamaForCausalLM"])
    path = _copy(exported, tmp_path / "c", edit_config=llama)
    with pytest.raises(ValueError, match=r"model_type 'llama' \(architectures \['LlamaForCausalLM'\]\)"):
        _load(path)


def test_config_that_differs_from_the_preset_names_field_and_values(exported, tmp_path):
    path = _copy(exported, tmp_path / "c", edit_config=lambda c: c.update(rope_theta=5e6))
    with pytest.raises(ValueError, match=r"rope_theta=5000000\.0 but the model preset .* has rope_theta=10000\.0"):
        _load(path)


def test_rope_scaling_is_refused(exported, tmp_path):
    path = _copy(exported, tmp_path / "c", edit_config=lambda c: c.update(
        rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="'yarn' RoPE scaling"):
        _load(path)


def test_pickle_only_checkpoint_is_refused(exported, tmp_path):
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(open(os.path.join(exported, "config.json")).read())
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match=r"only pickled weights \['pytorch_model\.bin'\].*safetensors only"):
        _load(str(tmp_path / "c"))


def test_regex_beyond_the_checkpoint_family_is_refused(exported):
    with pytest.raises(ValueError, match=r"holds only llm/\.\.\. parameters; the regex also selects \['projector/"):
        _load(exported, regex="(llm|projector)/.*")


def _flat_params(state) -> dict:
    from flax import traverse_util
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(optim.merge(state.params, state.frozen),
                                                                       sep="/").items()}


@pytest.mark.slow   # starts the convert CLI
def test_convert_cli_writes_an_orbax_checkpoint_that_config_init_reads(exported, tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(__file__))
    out = tmp_path / "converted"
    # The CLI builds the model from a config file: the tiny one, shaped like the exported LLM by overrides.
    overrides = [f"--config.model.llm.{k}={v}" for k, v in fx.LLM_SHAPE.items()] + [
        "--config.model.llm.tie_embeddings=False"]
    proc = subprocess.run([sys.executable, "-m", "launch.convert", "--config=configs/smoke.py", *overrides,
                           f"--source={exported}=llm/.*", f"--out={out}"], cwd=root, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", VLM_JAX_COMPILATION_CACHE=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_hf, _, _ = _load(exported)
    from_orbax, _, _ = _load(str(out))
    a, b = _flat_params(from_hf), _flat_params(from_orbax)
    llm = [k for k in a if k.startswith("llm/")]
    assert llm and all(np.array_equal(a[k], b[k]) for k in llm)
    # only what the sources gave was converted
    with pytest.raises(ValueError, match=r"the checkpoint has no parameter 'projector/"):
        _load(str(out), regex="projector/.*")


def test_run_exports_to_hf_directories_that_load_back(tmp_path):
    from flax import traverse_util

    from configs import smoke
    from vlm_jax.weights import convert, load

    config = smoke.get_config("llm=tiny-s,tokens=4,res=32")
    with config.unlocked():
        config.run_dir = str(tmp_path / "run")
        config.train.update(steps=2, batch_size=4, log_every=1, checkpoint_every=2)
        config.data.seq_len = 24
    train.run(config)
    written = convert.run_to_hf(config.run_dir, str(tmp_path / "hf"), ("llm", "heads", "vision"), "float32")
    assert set(written) == {"llm", "heads", "vision"}
    _, params = state_lib.load_params(config.run_dir)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    wanted = convert.abstract_params(config.model, mesh)
    for part in ("llm", "vision"):
        back = load.restore_matching(str(tmp_path / "hf" / part), f"{part}/.*", wanted, config.model)
        mine = traverse_util.flatten_dict(params[part], sep="/")
        assert len(back) == len(mine)
        for k, v in mine.items():
            np.testing.assert_array_equal(np.asarray(back[f"{part}/{k}"]), np.asarray(v))
    heads = load_file(str(tmp_path / "hf" / "heads" / "heads.safetensors"))
    # LLaVA's projector names, torch's [out, in] layout
    np.testing.assert_array_equal(heads["model.mm_projector.0.weight"],
                                  np.asarray(params["projector"]["linear_1"]["kernel"]).T)


def _sharded(tmp_path, shards: dict, weight_map: dict) -> str:
    """A checkpoint directory of safetensors `shards` ({file: {tensor: array}}) and an index with `weight_map`."""
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    for name, tensors in shards.items():
        save_file(tensors, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(path)


def test_an_index_reads_each_tensor_from_its_shard(tmp_path):
    from vlm_jax.weights import load

    a, b = np.zeros((2, 3), np.float32), np.ones(4, np.float32)
    path = _sharded(tmp_path, {"model-1.safetensors": {"a": a}, "model-2.safetensors": {"b": b}},
                    {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    ckpt = load.Checkpoint(path)
    assert ckpt.info == {"a": ((2, 3), "F32"), "b": ((4,), "F32")}
    ckpt.close()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path, shard):
    from vlm_jax.weights import load

    outside = tmp_path / "outside.safetensors"   # a real shard: only the containment check can refuse it
    save_file({"b": np.ones(4, np.float32)}, str(outside))
    shard = str(outside) if shard == "ABSOLUTE" else shard
    path = _sharded(tmp_path, {"model-1.safetensors": {"a": np.zeros(2, np.float32)}},
                    {"a": "model-1.safetensors", "b": shard})
    os.mkdir(os.path.join(path, "sub"))   # so that every name above does lead to the outside shard
    with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json: shard '{re.escape(shard)}' is not a "
                                         r"\*\.safetensors file inside"):
        load.Checkpoint(path)


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path):
    from vlm_jax.weights import load

    path = _sharded(tmp_path, {"model-1.safetensors": {"a": np.zeros(2, np.float32)},
                               "model-2.safetensors": {"a": np.ones(2, np.float32), "b": np.ones(1, np.float32)}},
                    {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    with pytest.raises(ValueError, match=r"tensor 'a' is in two shards, model-1\.safetensors and "
                                         r"model-2\.safetensors"):
        load.Checkpoint(path)
