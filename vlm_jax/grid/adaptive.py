"""The adaptive-V part of an elastic grid's report (vlm_jax/evaluation/router.py): each model's threshold sweeps
averaged over its seeds, the cheapest threshold that matches the largest V's error, and the figure of the mixed
set (every task's questions together). The per-task sweeps are drawn on the law's error-vs-FLOPs figures too
(`overlays`), next to the fixed-V cells and the frontier."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from vlm_jax.evaluation import router
from vlm_jax.grid import results
from vlm_jax.scaling import units

MIXED = "mixed"


def collect(jobs) -> list[dict]:
    """[{llm, n_params, seed, router}] of the finished elastic cells (result.json's 'router')."""
    out = []
    for job in jobs:
        result = results.read_result(job.dir) if job.is_cell else None
        if result and results.status(job, result) == "done" and result.get("router"):
            row = job.spec["row"]
            out.append(dict(llm=row["llm"], n_params=row["n_params"], seed=row["seed"], router=result["router"]))
    return out


def mean_curves(entries: Sequence[dict]) -> dict:
    """{llm: {'ladder', 'flops', 'text_tokens', 'seeds', 'sweeps': {task: [point]}}}: each threshold's error, FLOPs
    and shares averaged over the LLM's seeds (every seed swept the same thresholds)."""
    by_llm: dict = {}
    for e in entries:
        by_llm.setdefault(e["llm"], []).append(e["router"])
    out = {}
    for llm, routers in by_llm.items():
        first = routers[0]
        sweeps = {}
        for task in first["sweeps"]:
            points = []
            for i, p in enumerate(first["sweeps"][task]):
                same = [r["sweeps"][task][i] for r in routers]
                points.append({"threshold": p["threshold"],
                               "error": float(np.mean([q["error"] for q in same])),
                               "flops": float(np.mean([q["flops"] for q in same])),
                               "share": np.mean([q["share"] for q in same], axis=0).tolist()})
            sweeps[task] = points
        out[llm] = dict(ladder=first["ladder"], flops=first["flops"], text_tokens=first["text_tokens"],
                        seeds=len(routers), sweeps=sweeps)
    return out


def overlays(curves: dict, n_params: dict) -> dict:
    """{task: [plots.Overlay]}: each LLM's sweep on that task's error-vs-FLOPs figures."""
    from vlm_jax.scaling import plots

    out: dict = {}
    for llm, c in curves.items():
        for task, points in c["sweeps"].items():
            if task != MIXED:
                out.setdefault(task, []).append(plots.Overlay(
                    f"adaptive V, N = {units.params(n_params[llm])}", [p["flops"] for p in points],
                    [p["error"] for p in points], float(c["text_tokens"]), n_params[llm] / 1e9))
    return out


def decisions(curves: dict, errors: dict) -> dict:
    """{llm: {task: matching}}: per task, the cheapest threshold whose error is at most the model's own error at
    its largest V (mean over seeds, `errors` {task: {llm: {V: error}}}), with the mixed set's error and FLOPs at
    that threshold and their ratio to answering every question at the largest V."""
    out: dict = {}
    for llm, c in curves.items():
        v_max, always = c["ladder"][-1], c["flops"][-1]
        mixed = {p["threshold"]: p for p in c["sweeps"].get(MIXED, [])}
        for task, points in c["sweeps"].items():
            if task == MIXED or v_max not in errors.get(task, {}).get(llm, {}):
                continue
            target = errors[task][llm][v_max]
            match = router.matching(points, target)
            entry = {"target_error": target, "v_max": v_max}
            if match:
                m = mixed.get(match["threshold"])
                entry.update(threshold=match["threshold"], error=match["error"], flops=match["flops"],
                             flops_fraction=match["flops"] / always, share=match["share"])
                if m:
                    entry.update(mixed_error=m["error"], mixed_flops=m["flops"], mixed_fraction=m["flops"] / always,
                                 mixed_share=m["share"])
            out.setdefault(llm, {})[task] = entry
    return out


def format_section(curves: dict, decided: dict, n_params: dict, label: str) -> list[str]:
    """The report's lines on adaptive V."""
    if not curves:
        return []
    any_c = next(iter(curves.values()))
    lines = [f"ADAPTIVE V ({label} models): answer at V={any_c['ladder'][0]}, ask again at the next V of "
             f"{tuple(any_c['ladder'])} while the answer's confidence (geometric mean token probability) is below "
             f"t; FLOPs per question = 2·N·(Q+V) summed over the tries, Q = {any_c['text_tokens']:g}; "
             f"mean over seeds"]
    for llm, c in curves.items():
        v_max = c["ladder"][-1]
        for task, d in decided.get(llm, {}).items():
            head = (f"  {llm} ({units.params(n_params[llm])}), {task}: to match its V={v_max} error "
                    f"{d['target_error']:.3f}")
            if "threshold" not in d:
                best = min(c["sweeps"][task], key=lambda p: p["error"])
                lines.append(f"{head}: no threshold does (lowest {best['error']:.3f} at t = {best['threshold']:g})")
                continue
            text = (f"{head}: t = {d['threshold']:g} -> error {d['error']:.3f} at "
                    f"{d['flops_fraction']:.2f} of always V={v_max}")
            if "mixed_fraction" in d:
                shares = ", ".join(f"V={v} {s:.0%}" for v, s in zip(c["ladder"], d["mixed_share"]))
                text += (f"; mixed set at this t: error {d['mixed_error']:.3f}, {units.flops(d['mixed_flops'])} "
                         f"per question = {d['mixed_fraction']:.2f} of always V={v_max} (answered at {shares})")
            lines.append(text)
    return lines


def plot_mixed(curves: dict, rows: Sequence[dict], n_params: dict, path: str, label: str) -> str:
    """Error on the mixed set (every task's questions; the fixed-V points are the mean of the tasks' errors, as
    the tasks have equal question counts in the smoke grid) against FLOPs per question: each model at every V of
    its set, and its router's sweep."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from vlm_jax.scaling import plots

    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.subplots()
    llms = sorted(curves, key=lambda llm: n_params[llm])
    palette = colormaps["viridis"](np.linspace(0.0, 0.85, max(len(llms), 1)))
    for llm, colour in zip(llms, palette):
        c = curves[llm]
        by_v: dict = {}
        for r in rows:
            if r["llm"] == llm:
                by_v.setdefault(int(r["visual_tokens"]), []).append(r["error"])
        vs = [v for v in c["ladder"] if v in by_v]
        ax.plot([c["flops"][c["ladder"].index(v)] for v in vs], [np.mean(by_v[v]) for v in vs], "o-",
                color=colour, lw=1.5, label=f"N = {units.params(n_params[llm])}, fixed V = {', '.join(map(str, vs))}")
        sweep = c["sweeps"].get(MIXED, [])
        ax.plot([p["flops"] for p in sweep], [p["error"] for p in sweep], "x:", color=colour, lw=1.3,
                label=f"N = {units.params(n_params[llm])}, adaptive V (threshold sweep)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(units.flops_formatter())
    q = next(iter(curves.values()))["text_tokens"] if curves else 0
    ax.set_xlabel(f"inference FLOPs per question, 2·N·(Q+V) summed over tries, Q = {q:g}")
    ax.set_ylabel("error on the mixed set")
    ax.set_title(f"{label}: fixed V against adaptive V, every task's questions together", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return plots.save(fig, path)


def report(jobs, rows: Sequence[dict], errors: dict, n_params: dict, plot_dir: str, label: str) -> dict:
    """{'curves', 'decisions', 'lines', 'overlays', 'plots'} for the grid report; empty without elastic cells."""
    curves = mean_curves(collect(jobs))
    if not curves:
        return {}
    decided = decisions(curves, errors)
    plot = plot_mixed(curves, rows, n_params, os.path.join(plot_dir, "adaptive_v_mixed.png"), label)
    return {"curves": curves, "decisions": decided, "lines": format_section(curves, decided, n_params, label),
            "overlays": overlays(curves, n_params), "plots": [plot]}
