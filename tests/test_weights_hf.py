"""Hugging Face weights in and out, against transformers itself (levanter-style parity tests).

Random Qwen2 (grouped queries, tied and untied) and CLIP vision models are built with transformers, saved as sharded
safetensors with an index, loaded through `config.init`, and compared: LLM logits and the tower's tapped hidden
states within 1e-4 in float32, padded rows included; then exported and loaded back by transformers.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the test-only requirements (requirements-test.txt)")
transformers = pytest.importorskip("transformers",
                                   reason="parity tests need the test-only requirements (requirements-test.txt)")

from tests import hf_fixtures as fx  # noqa: E402
from vlm_jax import optim, sharding  # noqa: E402
from vlm_jax import state as state_lib
from vlm_jax.models.llm import LLM, positions_from_mask  # noqa: E402
from vlm_jax.models.vision import VisionTower, resolve_layer  # noqa: E402
from vlm_jax.weights import export  # noqa: E402

TOL = 1e-4


def save_hf(model, path) -> str:
    """save_pretrained in small shards, so the index and several files are exercised."""
    model.save_pretrained(path, max_shard_size="40KB")
    files = os.listdir(path)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    return str(path)


def load(model_cfg, sources, mesh_axes=(-1, 1, 1)) -> dict:
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_axes)))
    state, _, _ = state_lib.create_state(model_cfg, fx.train_config(), mesh, jax.random.key(0), sources)
    return optim.merge(state.params, state.frozen)


def our_logits(llm_cfg, llm_params, tokens, mask) -> np.ndarray:
    def run(p):
        m = LLM(llm_cfg).bind({"params": p})
        hidden, _ = m(m.embed_tokens(tokens), mask)
        return m.logits(hidden)
    return np.asarray(jax.jit(run)(llm_params))


def hf_logits(model, tokens, mask) -> np.ndarray:
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def max_diff_on_real_tokens(a, b, mask) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def qwen(request, tmp_path_factory):
    model = fx.hf_qwen2(torch, transformers, tied=request.param)
    path = save_hf(model, tmp_path_factory.mktemp("qwen"))
    return model, path, request.param


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "layer-by-layer"])
def test_qwen2_logits_match_transformers(qwen, scan_layers):
    model, path, tied = qwen
    cfg = fx.model_config(tied=tied, scan_layers=scan_layers)
    params = load(cfg, [(path, "llm/.*")])
    tokens, mask = fx.padded_tokens()
    ours, theirs = our_logits(cfg.llm, params["llm"], tokens, mask), hf_logits(model, tokens, mask)
    assert np.abs(theirs).max() > 1.0           # not a degenerate model whose logits agree trivially
    assert max_diff_on_real_tokens(ours, theirs, mask) < TOL


def test_clip_tapped_hidden_states_match_transformers(tmp_path):
    model = fx.hf_clip_vision(torch, transformers)
    path = save_hf(model, tmp_path / "clip")
    cfg = fx.model_config()
    params = load(cfg, [(path, "vision/.*")])
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    taps = (0, 1, -2)
    ours = jax.jit(lambda p, x: VisionTower(cfg.vision).apply({"params": p}, x, taps))(params["vision"], pixels)
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    for tap in taps:
        theirs = out.hidden_states[resolve_layer(tap, cfg.vision.depth)].numpy()
        assert np.abs(np.asarray(ours[tap]) - theirs).max() < TOL, tap


def test_export_loads_in_transformers_with_the_same_logits(qwen, tmp_path):
    model, path, tied = qwen
    cfg = fx.model_config(tied=tied)
    params = load(cfg, [(path, "llm/.*")])
    out = tmp_path / "exported"
    files = export.export_llm(params["llm"], cfg.llm, str(out), max_shard_bytes=64_000)
    assert "model.safetensors.index.json" in files
    back = transformers.Qwen2ForCausalLM.from_pretrained(str(out)).eval()
    tokens, mask = fx.padded_tokens(seed=1)
    assert max_diff_on_real_tokens(hf_logits(back, tokens, mask), hf_logits(model, tokens, mask), mask) < TOL
    # and the export is what the loader reads: the same parameters come back
    again = load(cfg, [(str(out), "llm/.*")])
    for a, b in zip(jax.tree.leaves(again["llm"]), jax.tree.leaves(params["llm"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_clip_tower_loads_in_transformers(tmp_path):
    model = fx.hf_clip_vision(torch, transformers, seed=3)
    cfg = fx.model_config()
    params = load(cfg, [(save_hf(model, tmp_path / "clip"), "vision/.*")])
    export.export_vision(params["vision"], cfg.vision, str(tmp_path / "out"))
    back = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "out")).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = back(pixel_values=pixels).last_hidden_state, model(pixel_values=pixels).last_hidden_state
    assert float((a - b).abs().max()) < TOL


_SHARDED_SCRIPT = """
import os, sys, json
import jax, numpy as np
from tests import hf_fixtures as fx
from tests.test_weights_hf import load, our_logits
path, tied, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
cfg = fx.model_config(tied=tied)
params = load(cfg, [(path, "llm/.*")], mesh_axes=(2, 2, 2))
kernel = params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
tokens, mask = fx.padded_tokens()
np.save(out, our_logits(cfg.llm, params["llm"], tokens, mask))
print(json.dumps({"devices": len(kernel.sharding.device_set),
                  "shard": list(kernel.addressable_shards[0].data.shape), "full": list(kernel.shape)}))
"""


@pytest.mark.slow   # a process with 8 devices per case
def test_loading_onto_eight_devices_gives_the_same_logits(qwen, tmp_path):
    """data=2, fsdp=2, tensor=2 over 8 fake CPU devices (a process of its own: the device count is fixed at start)."""
    model, path, tied = qwen
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "logits.npy"
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, path, "1" if tied else "0", str(out)],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["devices"] == 8 and info["shard"] != info["full"]     # really split, not replicated
    tokens, mask = fx.padded_tokens()
    assert max_diff_on_real_tokens(np.load(out), hf_logits(model, tokens, mask), mask) < TOL
