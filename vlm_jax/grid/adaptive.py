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
    """{llm: {'tokens', 'flops', 'text_tokens', 'n_params', 'seeds', 'points': {task: [point]}}}: every (ladder,
    threshold) point of every task, its error, FLOPs, shares and tries averaged over the LLM's seeds (every seed
    swept the same ladders and thresholds); a point names its 'ladder'."""
    by_llm: dict = {}
    for e in entries:
        by_llm.setdefault(e["llm"], []).append(e)
    out = {}
    for llm, seeds in by_llm.items():
        first = seeds[0]["router"]
        points: dict = {}
        for ladder, by_task in first["sweeps"].items():
            for task, sweep in by_task.items():
                for i, p in enumerate(sweep):
                    same = [e["router"]["sweeps"][ladder][task][i] for e in seeds]
                    points.setdefault(task, []).append(dict(
                        ladder=ladder, threshold=p["threshold"],
                        **{k: float(np.mean([q[k] for q in same])) for k in ("error", "flops")},
                        **{k: np.mean([q[k] for q in same], axis=0).tolist() for k in ("share", "tried")}))
        out[llm] = dict(tokens=first["tokens"], flops=first["flops"], text_tokens=first["text_tokens"],
                        n_params=seeds[0]["n_params"], seeds=len(seeds), points=points)
    return out


def flops_at(point: dict, n_params: float, text_tokens: float) -> float:
    """A point's mean FLOPs per question at another Q: its tries of each rung times 2 N (Q + V)."""
    ladder = [int(v) for v in point["ladder"].split("+")]
    return float(sum(t * 2.0 * n_params * (text_tokens + v) for t, v in zip(point["tried"], ladder)))


def overlays(curves: dict, n_params: dict) -> dict:
    """{task: [plots.Overlay]}: each LLM's best policy points (Pareto over ladders and thresholds) on that task's
    error-vs-FLOPs figures."""
    from vlm_jax.scaling import plots

    out: dict = {}
    for llm, c in curves.items():
        for task, points in c["points"].items():
            if task != MIXED:
                front = router.pareto(points)
                out.setdefault(task, []).append(plots.Overlay(
                    f"adaptive V, N = {units.params(n_params[llm])}", [p["flops"] for p in front],
                    [p["error"] for p in front], float(c["text_tokens"]), n_params[llm] / 1e9))
    return out


def decisions(curves: dict, errors: dict) -> dict:
    """{llm: {task: entry}}: per task, of the (ladder, threshold) points whose error on the task is at most the
    model's own error at its largest V (mean over seeds, `errors` {task: {llm: {V: error}}}), the one whose mixed-set
    FLOPs are lowest; with the mixed set's error there and its FLOPs as a fraction of answering every question at
    the largest V, at the table's Q and at Q = 0 (a cached text prefix: the paper's regime)."""
    out: dict = {}
    for llm, c in curves.items():
        v_max, n = c["tokens"][-1], c["n_params"]
        mixed = {(p["ladder"], p["threshold"]): p for p in c["points"].get(MIXED, [])}
        for task, points in c["points"].items():
            if task == MIXED or v_max not in errors.get(task, {}).get(llm, {}):
                continue
            target = errors[task][llm][v_max]
            entry: dict = {"target_error": target, "v_max": v_max}
            match = router.matching([p for p in points if (p["ladder"], p["threshold"]) in mixed], target,
                                    cost=lambda p: (mixed[(p["ladder"], p["threshold"])]["flops"],  # noqa: B023
                                                    len(p["ladder"])))   # of equal cost, the shortest ladder
            if match:
                m = mixed[(match["ladder"], match["threshold"])]
                q = c["text_tokens"]
                entry.update(ladder=match["ladder"], threshold=match["threshold"], error=match["error"],
                             mixed_error=m["error"], mixed_share=m["share"],
                             mixed_fraction=m["flops"] / c["flops"][-1],
                             mixed_fraction_q0=flops_at(m, n, 0.0) / (2.0 * n * v_max), text_tokens=q)
            else:
                entry["best_error"] = min(p["error"] for p in points)
            out.setdefault(llm, {})[task] = entry
    return out


def format_section(curves: dict, decided: dict, n_params: dict, label: str) -> list[str]:
    """The report's lines on adaptive V."""
    if not curves:
        return []
    any_c = next(iter(curves.values()))
    lines = [f"ADAPTIVE V ({label} models, mean over seeds): answer at the smallest V, ask again at the next V of a "
             f"ladder while the answer's confidence (geometric mean token probability) is below t; every ladder "
             f"from V={any_c['tokens'][0]} to V={any_c['tokens'][-1]} and t in [0, 1.01] swept on the evaluation "
             f"questions (in-sample); FLOPs per question = 2·N·(Q+V) summed over the tries"]
    for llm, c in curves.items():
        v_max = c["tokens"][-1]
        for task, d in decided.get(llm, {}).items():
            head = (f"  {llm} ({units.params(n_params[llm])}), {task}: to match its V={v_max} error "
                    f"{d['target_error']:.3f}")
            if "threshold" not in d:
                lines.append(f"{head}: no ladder and threshold does (lowest {d['best_error']:.3f})")
                continue
            ladder = [int(v) for v in d["ladder"].split("+")]
            shares = ", ".join(f"V={v} {s:.0%}" for v, s in zip(ladder, d["mixed_share"]))
            lines.append(f"{head}: ladder {d['ladder'].replace('+', '->')}, t = {d['threshold']:g}: {task} error "
                         f"{d['error']:.3f}; mixed set error {d['mixed_error']:.3f} at {d['mixed_fraction']:.2f} of "
                         f"always V={v_max}'s FLOPs (Q = {d['text_tokens']:g}), {d['mixed_fraction_q0']:.2f} at "
                         f"Q = 0; answered at {shares}")
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
        vs = [v for v in c["tokens"] if v in by_v]
        ax.plot([c["flops"][c["tokens"].index(v)] for v in vs], [np.mean(by_v[v]) for v in vs], "o-",
                color=colour, lw=1.5, label=f"N = {units.params(n_params[llm])}, fixed V = {', '.join(map(str, vs))}")
        front = router.pareto(c["points"].get(MIXED, []))
        ax.plot([p["flops"] for p in front], [p["error"] for p in front], "x:", color=colour, lw=1.3,
                label=f"N = {units.params(n_params[llm])}, adaptive V (best ladder and threshold at each cost)")
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
    """{'json' (the decisions and each model's Pareto points), 'lines', 'overlays', 'plots'} for the grid report;
    empty without elastic cells."""
    curves = mean_curves(collect(jobs))
    if not curves:
        return {}
    decided = decisions(curves, errors)
    plot = plot_mixed(curves, rows, n_params, os.path.join(plot_dir, "adaptive_v_mixed.png"), label)
    fronts = {llm: {task: router.pareto(points) for task, points in c["points"].items()} for llm, c in curves.items()}
    return {"json": {"decisions": decided, "pareto": fronts}, "lines": format_section(curves, decided, n_params, label),
            "overlays": overlays(curves, n_params), "plots": [plot]}
