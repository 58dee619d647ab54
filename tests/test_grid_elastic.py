"""The elastic grid: one model per (LLM, seed), evaluated at every V into the rows the per-V grid's cells write;
the router's sweep and the report (real processes end to end, slow)."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from tests import helpers
from vlm_jax import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("cell", "llm", "n_params", "visual_tokens", "seed")


def _grids(tmp_path, mode="mqt"):
    per_v = helpers.tiny_grid(tmp_path / "per_v", tokens="1+4+16")
    el = helpers.tiny_grid(tmp_path / "elastic", tokens="1+4+16")
    for g in (per_v, el):
        with g.unlocked():
            g.llms, g.seeds = ("tiny-xs", "tiny-s"), (0, 1)
    with el.unlocked():
        el.elastic.mode = mode
    return per_v, el


@pytest.mark.parametrize("mode", ["mqt", "m3"])
def test_an_elastic_grid_trains_one_model_per_llm_and_seed_whose_rows_are_the_per_v_cells(tmp_path, mode):
    per_v, el = _grids(tmp_path, mode)
    _, cells = helpers.grid_jobs(per_v)
    _, models = helpers.grid_jobs(el)
    assert len(cells) == 2 * 3 * 2 and len(models) == 2 * 2
    assert len({m.name for m in models}) == 4 and all(f"elastic-{mode}" in m.name for m in models)
    want = sorted(tuple(c.spec["row"][k] for k in KEYS) for c in cells)
    got = sorted(tuple(r[k] for k in KEYS) for m in models for r in m.spec["rows"])
    assert got == want   # the same table rows, by name, N, V and seed
    assert {r["training"] for m in models for r in m.spec["rows"]} == {f"elastic-{mode}"}
    for m in models:
        for stage in m.spec["stages"]:
            cfg = stage["config"]
            assert cfg["train"]["elastic"] == {"mode": mode, "tokens": (1, 4, 16)}
            assert cfg["model"]["compressor"]["num_tokens"] == 16
            assert cfg["seed"] == m.spec["row"]["seed"]
        assert m.spec["stages"][1]["config"]["init"] == ((m.spec["stages"][0]["config"]["run_dir"], ".*"),)


def test_an_unknown_elastic_mode_is_refused_naming_the_key(tmp_path):
    _, el = _grids(tmp_path, "random")
    with pytest.raises(ValueError, match="config.elastic.mode='random'"):
        helpers.grid_jobs(el)


@pytest.mark.slow   # trains a tiny elastic model through both stages in a child process
def test_an_elastic_grid_end_to_end_writes_every_v_row_the_router_sweep_and_its_report(tmp_path):
    g = helpers.tiny_grid(tmp_path, tokens="1+4+16")
    overrides = {"dir": g.dir, "cell.train.batch_size": 4, "cell.data.read_threads": 1,
                 "tower.overrides.train.steps": 2, "tower.overrides.train.batch_size": 4,
                 "llm_pretrain.pretrain": False, "stages.stage1.train.steps": 2, "stages.stage2.train.steps": 3,
                 "eval.synthetic_per_family": 8, "eval.batch_size": 8, "parallel": 1, "fit.bootstrap": 20,
                 "seeds": "(0,)", "elastic.mode": "mqt"}
    cmd = [sys.executable, "-m", "launch.grid", "--config=configs/grid.py:smoke,llms=tiny-xs,tokens=1+4+16",
           *[f"--config.{k}={v}" for k, v in overrides.items()]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 elastic-mqt models" in out.stdout
    with open(os.path.join(g.dir, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # The per-V grid's cells of the same axes, for their names and inference FLOPs.
    with g.unlocked():
        g.elastic.mode = ""
    _, cells = helpers.grid_jobs(g)
    assert sorted((r["cell"], r["task"]) for r in rows) == sorted(
        (c.name, t) for c in cells for t in ("detail", "reasoning"))
    for c in cells:
        model = ml_collections.ConfigDict(c.spec["stages"][-1]["config"]["model"])
        want = flops.inference_flops(model, text_tokens=g.eval.text_tokens)
        assert {r["inference_flops"] for r in rows if r["cell"] == c.name} == {want}, c.name
    job_dir = os.path.join(g.dir, "cells", "tiny-xs_elastic-mqt")
    with open(os.path.join(job_dir, "result.json")) as f:
        result = json.load(f)
    assert result["router"]["tokens"] == [1, 4, 16]
    assert sorted(result["router"]["sweeps"]) == ["1+16", "1+4+16"]
    for task in ("detail", "reasoning", "mixed"):
        sweep = result["router"]["sweeps"]["1+4+16"][task]
        assert sweep[0]["share"] == [1.0, 0.0, 0.0] and sweep[-1]["share"] == [0.0, 0.0, 1.0]
        # never escalating answers every question at V=1: the V=1 row's error
        want = next(r["error"] for r in rows if r["cell"] == "tiny-xs_v1" and r["task"] == task) \
            if task != "mixed" else None
        if want is not None and want != 0.5 / 8:
            assert sweep[0]["error"] == want
    for v in (1, 4, 16):
        with open(os.path.join(job_dir, f"eval-v{v}", "synthetic_detail.predictions.jsonl")) as f:
            preds = [json.loads(line) for line in f]
        assert len(preds) == 8 and all(0 < p["confidence"] <= 1 for p in preds)
    report = open(os.path.join(g.dir, "report.txt")).read()
    assert report.startswith("DECISION") and "elastic-mqt models" in report and "ADAPTIVE V" in report
    summary = json.load(open(os.path.join(g.dir, "summary.json")))
    assert summary["training"] == "elastic-mqt"
    assert any(p.endswith("adaptive_v_mixed.png") for p in summary["plots"])
