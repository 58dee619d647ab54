"""The grid specification: which cells exist, and the exact run configs of each cell's stages.

A grid config (configs/grid.py) holds the axes (`llms`, `tokens`, `seeds`), one run-config template (`cell`: model,
data, train, mesh, as for `launch.train`), per-stage overrides of it (`stages`), the evaluation (`eval`), an optional
vision-tower pretraining job (`tower`), optional LLM pretraining jobs (`llm_pretrain`) and the backend. The
functions below turn it into `GridJob`s whose `spec` is written to `<dir>/job.json` and run by
`python -m launch.cell --job_dir=<dir>` (vlm_jax/grid/cell.py), on any backend.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import ml_collections

TOWER_PARAMS = "vision/.*"   # what the cells take from the pretrained tower
LLM_PARAMS = "llm/.*"        # ... and from a pretrained LLM


@dataclasses.dataclass(frozen=True)
class GridJob:
    """One job of the grid: its name, directory, and the spec (JSON-ready) that `cell.run_job` executes."""

    name: str
    dir: str
    spec: dict

    @property
    def is_cell(self) -> bool:
        return self.spec["row"] is not None


def merge(base: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """A copy of `base` with the nested `overrides` (dict or ConfigDict) applied; unknown keys are an error."""
    out = ml_collections.ConfigDict(copy.deepcopy(base.to_dict()))

    def apply(node, upd, prefix):
        for key, value in upd.items():
            if key not in node:
                raise ValueError(f"grid override {prefix}{key} names no key of the run config")
            nested = isinstance(node[key], ml_collections.ConfigDict)
            if nested and isinstance(value, (dict, ml_collections.ConfigDict)):
                apply(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = value
    apply(out, overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else overrides, "")
    return out


def digest(obj) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cell_name(llm: str, tokens: int, seed: int, n_seeds: int) -> str:
    return f"{llm}_v{tokens}" + (f"_s{seed}" if n_seeds > 1 else "")


# How an LLM runs (not what it is): kept from the grid's run-config template when a cell swaps in its LLM preset.
LLM_RUN_KEYS = ("remat", "scan_layers")


def cell_llm(template_llm: ml_collections.ConfigDict, llm_config: Callable, name: str) -> ml_collections.ConfigDict:
    """LLM preset `name`, run as the template's LLM runs (e.g. rematerialised in the full-size configs)."""
    llm = llm_config(name)
    for key in LLM_RUN_KEYS:
        if key in template_llm:
            llm[key] = template_llm[key]
    return llm


def _pretraining_job(grid: ml_collections.ConfigDict, llm_config: Callable, kind: str, llm: str, tokens: int,
                     overrides, params: str, for_llm: str = "") -> GridJob:
    """A job that trains once what the cells start from (`params` of its run; only `for_llm`'s cells if given),
    cached under a directory keyed by its config; it is evaluated on its own objective (its synthetic families), as
    a check that it learnt."""
    cfg = merge(grid.cell, overrides)
    cfg.model.llm = cell_llm(cfg.model.llm, llm_config, llm)
    cfg.model.compressor.num_tokens = tokens
    cfg.init = ()
    key = digest({"model": cfg.model.to_dict(), "data": cfg.data.to_dict(), "train": cfg.train.to_dict(),
                  "seed": cfg.seed})
    job_dir = os.path.join(grid.dir, f"{kind}-{key}")
    cfg.run_dir = os.path.join(job_dir, "run")
    families = [f.strip() for f in cfg.data.synthetic.families.split(",") if f.strip()]
    evaluation = dict(grid.eval.to_dict(), tasks={f: f"synthetic/{f}" for f in families}, benchmarks={})
    return GridJob(f"{kind}-{key}", job_dir, {"stages": [{"name": kind, "config": cfg.to_dict()}],
                                             "eval": evaluation, "row": None,
                                             "provides": {"params": params, "llm": for_llm}})


def tower_job(grid: ml_collections.ConfigDict, llm_config: Callable) -> GridJob | None:
    """The vision-tower pretraining job, or None."""
    t = grid.tower
    if not t.pretrain:
        return None
    return _pretraining_job(grid, llm_config, "tower", t.llm, t.tokens, t.overrides, TOWER_PARAMS)


def llm_jobs(grid: ml_collections.ConfigDict, llm_config: Callable) -> list[GridJob]:
    """One pretraining job per LLM of the grid (`config.llm_pretrain`: the tiny LLMs learn on scenes described in
    words, as language models learn on text before they see an image), or none."""
    p = grid.llm_pretrain
    if not p.pretrain:
        return []
    return [_pretraining_job(grid, llm_config, f"llm-{llm}", llm, p.tokens, p.overrides, LLM_PARAMS, for_llm=llm)
            for llm in grid.llms]


def pretraining_jobs(grid: ml_collections.ConfigDict, llm_config: Callable) -> list[GridJob]:
    """Everything the cells start from that the grid trains itself: the tower, then the LLMs."""
    tower = tower_job(grid, llm_config)
    return ([tower] if tower else []) + llm_jobs(grid, llm_config)


def pretrained(grid: ml_collections.ConfigDict, llm: str, pretraining: Sequence[GridJob]) -> list[tuple[str, str]]:
    """config.init sources of a cell's first stage: what the grid pretrained (the tower, this LLM), else converted
    weights under `weights_dir` (`<vision preset>`, `<LLM preset>`) when `weights_dir` is set."""
    sources, given = [], set()
    for job in pretraining:
        provides = job.spec["provides"]
        if provides["llm"] in ("", llm):
            sources.append((job.spec["stages"][0]["config"]["run_dir"], provides["params"]))
            given.add(provides["params"])
    if grid.weights_dir:
        if TOWER_PARAMS not in given:
            sources.append((os.path.join(grid.weights_dir, grid.cell.model.vision.name), TOWER_PARAMS))
        if LLM_PARAMS not in given:
            sources.append((os.path.join(grid.weights_dir, llm), LLM_PARAMS))
    return sources


def elastic_mode(grid: ml_collections.ConfigDict) -> str:
    """The grid's elastic-V mode ('' = one model per V; 'mqt' / 'm3': one model per LLM and seed for every V)."""
    e = grid.get("elastic", None)
    return e.mode if e is not None else ""


def training_label(grid: ml_collections.ConfigDict) -> str:
    """What the results rows say about how their models were trained: 'per-V', 'elastic-mqt' or 'elastic-m3'."""
    mode = elastic_mode(grid)
    return f"elastic-{mode}" if mode else "per-V"


def cell_jobs(grid: ml_collections.ConfigDict, llm_config: Callable, n_params: Callable,
              pretraining: Sequence[GridJob]) -> list[GridJob]:
    """Every (LLM, V, seed) cell: stage 1 (from the pretrained parts / config init sources), stage 2 (from stage 1),
    evaluation. `n_params(model_cfg)` is the LLM's parameter count (the scaling law's N).

    An elastic grid (`config.elastic.mode` 'mqt' or 'm3', vlm_jax/elastic.py) trains one job per (LLM, seed) for
    every V of `config.tokens` at once (model.compressor.num_tokens = the largest) and evaluates it at each V: its
    `spec['rows']` are the rows the per-V grid's cells would write (same cell names and columns, plus `training`),
    so the table, the fits and the plots read it unchanged."""
    mode = elastic_mode(grid)
    if mode and mode not in ("mqt", "m3"):
        raise ValueError(f"config.elastic.mode={mode!r}; choose '' (one model per V), 'mqt' or 'm3'")
    trained_tokens = (max(grid.tokens),) if mode else tuple(grid.tokens)
    jobs, llm_params = [], {}
    for llm in grid.llms:
        for tokens in trained_tokens:
            for seed in grid.seeds:
                name = (f"{llm}_elastic-{mode}" + (f"_s{seed}" if len(grid.seeds) > 1 else "") if mode
                        else cell_name(llm, tokens, seed, len(grid.seeds)))
                job_dir = os.path.join(grid.dir, "cells", name)
                stages, previous = [], None
                for stage_name, overrides in grid.stages.items():
                    cfg = merge(grid.cell, overrides)
                    cfg.model.llm = cell_llm(cfg.model.llm, llm_config, llm)
                    cfg.model.compressor.num_tokens = tokens
                    cfg.seed = seed
                    if mode:
                        cfg.train.elastic = ml_collections.ConfigDict(dict(mode=mode,
                                                                           tokens=tuple(sorted(grid.tokens))))
                    cfg.run_dir = os.path.join(job_dir, stage_name)
                    if previous is None:   # the first stage starts from the pretrained parts
                        init = list(cfg.init) + pretrained(grid, llm, pretraining)
                    else:                  # later stages start from the previous stage's weights
                        init = [(previous, ".*")]
                    cfg.init = tuple(tuple(x) if not isinstance(x, str) else x for x in init)
                    stages.append({"name": stage_name, "config": cfg.to_dict()})
                    previous = cfg.run_dir
                if llm not in llm_params:   # N does not depend on V: count once per LLM (a 7B model takes seconds)
                    llm_params[llm] = int(n_params(cfg.model))
                row = {"cell": name, "llm": llm, "n_params": llm_params[llm], "visual_tokens": tokens, "seed": seed}
                spec = {"stages": stages, "eval": grid.eval.to_dict(), "row": row}
                if mode:   # one row per V, as the per-V grid's cells would write them
                    spec["rows"] = [dict(row, cell=cell_name(llm, v, seed, len(grid.seeds)), visual_tokens=v,
                                         training=training_label(grid)) for v in sorted(grid.tokens)]
                jobs.append(GridJob(name, job_dir, spec))
    return jobs
