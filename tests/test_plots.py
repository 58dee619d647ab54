"""Scaling plots are written as real PNGs with content, and `python -m launch.fit` runs end to end."""

import json

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib import colors as mcolors
from PIL import Image

from absl import flags

from launch import fit as fit_cli
from vlm_jax import scaling
from vlm_jax.scaling import plots

N = (0.464, 1.84, 3.95, 7.72)
V = (1, 4, 16, 36, 64, 144, 576)


@pytest.fixture(scope="module")
def fit():
    table = scaling.synthetic_table("multiplicative", [0.35, 0.45, 0.06, 0.12], N, V, noise=0.02, seed=0,
                                    task="reasoning")
    return scaling.fit_law(table, n_bootstrap=100, seed=0)


def _image(path):
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert img.shape[0] > 300 and img.shape[1] > 300
    return img


def test_all_figures_are_written_as_non_blank_pngs(fit, tmp_path):
    paths = plots.write_plots(fit, str(tmp_path / "out"), text_tokens=(0.0, 64.0))
    assert sorted(p.split("/")[-1] for p in paths) == sorted([
        "reasoning_multiplicative_pred_vs_obs.png",
        "reasoning_multiplicative_error_vs_flops_q0.png", "reasoning_multiplicative_surface_q0.png",
        "reasoning_multiplicative_error_vs_flops_q64.png", "reasoning_multiplicative_surface_q64.png"])
    # Axes, labels, grid and legends are grey/black or small: the data must put its own colours on the canvas.
    stem = str(tmp_path / "out" / "reasoning_multiplicative_")
    assert _pixels_of(_image(stem + "pred_vs_obs.png"), "C0") > 500           # the 28 in-sample points
    series = colormaps["viridis"](np.linspace(0.0, 0.85, len(N)))             # one curve + cells per LLM size
    for q in ("q0", "q64"):
        img = _image(stem + f"error_vs_flops_{q}.png")
        assert min(_pixels_of(img, c[:3]) for c in series) > 300, q
        surface = _image(stem + f"surface_{q}.png")
        saturation = surface.max(axis=-1) - surface.min(axis=-1)
        assert np.mean(saturation > 60) > 0.3, q                               # the heat map, not just a colorbar


def _pixels_of(img, color, tol=12):
    """Pixels within `tol` (0..255, each channel) of a matplotlib colour."""
    rgb = np.array(mcolors.to_rgb(color)) * 255
    return int(np.sum(np.all(np.abs(img - rgb) <= tol, axis=-1)))


def test_frontier_curve_lies_below_every_fitted_llm_curve(fit):
    budgets = np.geomspace(1e11, 1e13, 7)
    _, _, err, lo, hi = plots.frontier_curve(fit, budgets, 64.0)
    for n in fit.table.n_values:
        v = budgets / (2e9 * n) - 64.0
        ok = (v >= 1) & (v <= 576)
        assert np.all(err[ok] <= fit.predict(n, v[ok]) + 1e-12)
    assert np.all(lo <= err) and np.all(err <= hi)


def test_the_frontier_is_dotted_where_its_n_leaves_the_table_and_the_optimal_path_stays_off_the_frame(fit):
    """At Q = 0 the optimum is one token and the largest affordable N, so over the table's own costs the frontier
    runs from N below the smallest LLM to N above the largest: those budgets are the law's extrapolation."""
    fig = plots.draw_error_vs_flops(fit, text_tokens=0.0)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    dashed = np.asarray(lines["compute-optimal frontier"].get_ydata(), dtype=float)
    dotted = np.asarray(lines["frontier at an N outside the table (extrapolated)"].get_ydata(), dtype=float)
    budgets = np.asarray(lines["compute-optimal frontier"].get_xdata(), dtype=float)
    n_opt = plots.frontier_curve(fit, budgets, 0.0)[0]
    inside = (n_opt >= N[0]) & (n_opt <= N[-1])
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(np.isfinite(dashed), inside)
    assert np.all(np.isfinite(dotted[~inside]))
    surface = plots.draw_error_surface(fit, text_tokens=0.0)
    ax = surface.axes[0]
    assert ax.get_xlim()[0] < N[0] and ax.get_xlim()[1] > N[-1]
    assert ax.get_ylim()[0] < V[0] and ax.get_ylim()[1] > V[-1]


def run_fit_cli(args):
    """`python -m launch.fit ARGS` in this process (absl flags parsed afresh)."""
    flags.FLAGS.unparse_flags()
    # Other test modules import launchers whose required flags (launch.evaluate's --run_dir) share the global
    # FlagValues; give them a value so that parsing launch.fit's flags validates.
    others = [f"--{name}=unused" for name in ("run_dir", "job_dir") if name in flags.FLAGS]
    flags.FLAGS(["launch.fit", *args, *others])
    return fit_cli.main([])


def test_fit_cli_demo_prints_laws_frontier_and_writes_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_fit_cli(["--demo", f"--out={out}", "--bootstrap=100", "--text_tokens=0,64",
                        "--forms=multiplicative"]) == 0
    text = capsys.readouterr().out
    assert "task 'reasoning'" in text and "task 'fine_detail'" in text
    assert "alpha  = " in text and "(true 0.45)" in text
    assert "frontier at Q = 64" in text and "optimal V vs Q" in text
    assert len(list(out.glob("*.png"))) == 2 * 5
    assert (out / "demo_results.jsonl").exists()


def test_fit_cli_reads_a_results_table(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    with open(path, "w") as f:
        for row in scaling.report.demo_rows({"a": 5e8, "b": 2e9, "c": 4e9, "d": 7e9}, seed=1):
            if row["task"] == "reasoning":
                f.write(json.dumps(row) + "\n")
    assert run_fit_cli([f"--results={path}", "--bootstrap=0", "--noplots", "--text_tokens=32",
                        "--budgets=1e12"]) == 0
    text = capsys.readouterr().out
    assert "saturating law" in text and "multiplicative law" in text and "additive law" in text
    assert text.startswith("DECISION (saturating law")
    assert "C = 1 TFLOPs" in text
    assert not list(tmp_path.glob("*.png"))
    summary = json.loads((tmp_path / "fit_summary.json").read_text())   # written beside the results file
    assert list(summary) == ["decision", "fits"]
    assert set(summary["fits"]["reasoning"]) == {"saturating", "multiplicative", "additive"}


def test_fit_cli_reports_bad_tables_clearly(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("llm,n_params,visual_tokens,task,error\na,1e9,4,t,0.3\nb,2e9,4,t,-0.1\n")
    with pytest.raises(ValueError, match=r"row 2 .*error must lie in \(0, 1\]"):
        run_fit_cli([f"--results={path}", "--noplots"])


def test_every_axis_and_legend_reads_in_human_units(tmp_path, monkeypatch):
    """Parameter counts as 27K / 0.46B and FLOPs with SI prefixes: never 2.7e-05B or 1e7 on an axis or legend."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    texts = []
    original = Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        out = original(fig, path, *args, **kwargs)
        texts.append(" | ".join(t.get_text() for t in fig.findobj(Text)))
        return out

    monkeypatch.setattr(Figure, "savefig", savefig)
    table = scaling.synthetic_table("multiplicative", [0.3, 0.4, 0.2, 0.02], (27_040e-9, 99_392e-9, 308_352e-9),
                                    (1, 4, 16, 64), noise=0.02, task="detail")
    plots.write_plots(scaling.fit_law(table, n_bootstrap=30, seed=0), str(tmp_path), text_tokens=(16.0,))
    assert len(texts) == 3
    everything = " || ".join(texts)
    for label in ("27K", "99K", "308K"):
        assert label in everything
    assert "MFLOPs" in everything
    assert "e-05" not in everything and "billions" not in everything and "1e7" not in everything, everything
