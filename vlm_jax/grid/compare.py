"""Two grids side by side (e.g. the per-V grid and the elastic grid of the same LLMs, V and seeds): the error of
every (task, LLM, V) with each grid's seed range, where the second falls outside the first's range and by how much,
each family's fitted exponents with intervals, and the cell time each grid spent (`launch.compare`)."""

from __future__ import annotations

import json

from etils import epath

from vlm_jax.grid import report


def _read(grid_dir: str) -> tuple[list[dict], dict, dict]:
    """(rows of results.jsonl, summary.json, {cell job: its result.json})."""
    base = epath.Path(grid_dir)
    rows = [json.loads(line) for line in (base / "results.jsonl").read_text().splitlines() if line.strip()]
    training = rows[0].get("training") if rows else None
    summary = json.loads((base / "summary.json").read_text()) if (base / "summary.json").exists() else {}
    # The cells whose rows make the table (a directory may also hold another grid's cells: an elastic grid run
    # beside the per-V grid shares its pretraining jobs).
    names = {r["cell"] for r in rows}
    cells = {}
    for path in sorted(base.glob("cells/*/result.json")):   # (epath: a gs:// grid's cells too)
        result = json.loads(path.read_text())
        if result.get("status") == "ok" and any(r["cell"] in names and r.get("training") == training
                                                 for r in result.get("rows", [])):
            cells[path.parent.name] = result
    return rows, summary, cells


def cell_seconds(cells: dict) -> dict:
    """{'wall_s', 'train_s', 'jobs'}: what the grid's cells spent (pretraining jobs not counted: grids sharing a
    directory share them)."""
    return {"wall_s": sum(r.get("wall_s", 0.0) for r in cells.values()),
            "train_s": sum(r.get("train_s", 0.0) for r in cells.values()), "jobs": len(cells)}


def outside(a: dict, b: dict) -> float:
    """How far b's mean lies outside a's seed range [min, max] (0 inside; signed: + above, - below)."""
    if b["mean"] > a["max"]:
        return b["mean"] - a["max"]
    if b["mean"] < a["min"]:
        return b["mean"] - a["min"]
    return 0.0


def _exponent(summary: dict, task: str, name: str, form: str = "multiplicative") -> str:
    p = summary.get("fits", {}).get(task, {}).get(form, {}).get("params", {}).get(name)
    if not p:
        return "no fit"
    text = f"{p['point']:.3g} [{p['lo']:.3g}, {p['hi']:.3g}]" if p.get("lo") is not None else f"{p['point']:.3g}"
    return text if p.get("identified", True) else f"not identified, {text}"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"   # (None: grid A recorded no cell time)


def compare(dir_a: str, dir_b: str) -> tuple[list[str], dict]:
    """(lines to print, JSON) comparing grid b against grid a."""
    (rows_a, sum_a, cells_a), (rows_b, sum_b, cells_b) = _read(dir_a), _read(dir_b)
    label_a, label_b = report.training_of(rows_a), report.training_of(rows_b)
    spread_a, spread_b = report.seed_spread(rows_a), report.seed_spread(rows_b)
    lines = [f"A = {dir_a} ({label_a}), B = {dir_b} ({label_b}); error mean [seed min-max]; '!' = B's mean "
             f"outside A's seed range, by how much"]
    out: dict = {"a": dir_a, "b": dir_b, "cells": {}, "exponents": {}, "time": {}}
    for task in spread_a:
        lines.append(f"\n{task}:")
        for llm, by_v in spread_a[task].items():
            parts = []
            for v, a in sorted(by_v.items()):
                b = spread_b.get(task, {}).get(llm, {}).get(v)
                if b is None:
                    parts.append(f"V={v} A {a['mean']:.3f} B -")
                    continue
                off = outside(a, b)
                out["cells"][f"{task}/{llm}/V={v}"] = {"a": a, "b": b, "outside": off}
                parts.append(f"V={v} A {a['mean']:.3f} [{a['min']:.3f}-{a['max']:.3f}] B {b['mean']:.3f} "
                             f"[{b['min']:.3f}-{b['max']:.3f}]" + (f" !{off:+.3f}" if off else ""))
            lines.append(f"  {llm}: " + " | ".join(parts))
        for name in ("beta", "alpha"):
            ea, eb = _exponent(sum_a, task, name), _exponent(sum_b, task, name)
            out["exponents"][f"{task}/{name}"] = {"a": ea, "b": eb}
            lines.append(f"  {name} (multiplicative law): A {ea}  |  B {eb}")
    ta, tb = cell_seconds(cells_a), cell_seconds(cells_b)
    out["time"] = {"a": ta, "b": tb, "wall_ratio": tb["wall_s"] / ta["wall_s"] if ta["wall_s"] else None,
                   "train_ratio": tb["train_s"] / ta["train_s"] if ta["train_s"] else None}
    lines.append(f"\ncell time: A {ta['wall_s']:.0f} s over {ta['jobs']} jobs (training {ta['train_s']:.0f} s); "
                 f"B {tb['wall_s']:.0f} s over {tb['jobs']} jobs (training {tb['train_s']:.0f} s); "
                 f"B / A = {_ratio(out['time']['wall_ratio'])} (training {_ratio(out['time']['train_ratio'])})")
    return lines, out
