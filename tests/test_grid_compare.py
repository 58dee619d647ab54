"""launch.compare: two grids' errors side by side, cells outside the reference's seed range, cell time."""

import json
import os
import subprocess
import sys

from etils import epath

from tests.gcs_emulator import gcs_bucket  # noqa: F401  (a fixture)
from vlm_jax.grid import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grid(path, errors, training=None, wall=(), train=()):
    """A grid directory (a local folder or a gs:// one) with results.jsonl rows {(llm, V): [error per seed]} and
    cells' result.json times."""
    base = epath.Path(path)

    def write(name, text):
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    rows = []
    for (llm, v), per_seed in errors.items():
        for seed, e in enumerate(per_seed):
            row = {"cell": f"{llm}_v{v}_s{seed}", "llm": llm, "n_params": 1000, "visual_tokens": v, "seed": seed,
                   "task": "detail", "error": e}
            if training:
                row["training"] = training
            rows.append(row)
    write("results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for i, (w, t) in enumerate(zip(wall, train)):
        write(f"cells/job{i}/result.json", json.dumps({"status": "ok", "wall_s": w, "train_s": t, "rows": rows}))
    # Another grid's cell in the same directory (its rows are not this table's): not counted.
    write("cells/other/result.json", json.dumps({"status": "ok", "wall_s": 1000, "train_s": 1000,
                                                 "rows": [dict(rows[0], training="other")]}))
    return str(path)


def test_compare_flags_cells_outside_the_reference_seed_range_and_sums_cell_time(tmp_path):
    a = _grid(tmp_path / "a", {("m", 1): [0.50, 0.54], ("m", 16): [0.30, 0.34], ("m", 64): [0.04, 0.06]},
              wall=(30, 30, 30, 30),
              train=(20, 20, 20, 20))
    b = _grid(tmp_path / "b", {("m", 1): [0.51, 0.53], ("m", 16): [0.20, 0.22], ("m", 64): [0.18, 0.20]},
              training="elastic-mqt",
              wall=(24, 24), train=(16, 16))
    lines, out = compare.compare(a, b)
    assert out["cells"]["detail/m/V=1"]["outside"] == 0.0        # 0.52 inside [0.50, 0.54]
    assert abs(out["cells"]["detail/m/V=64"]["outside"] - (0.19 - 0.06)) < 1e-12
    assert abs(out["cells"]["detail/m/V=16"]["outside"] - (0.21 - 0.30)) < 1e-12   # below the range
    assert out["time"]["wall_ratio"] == 48 / 120 and out["time"]["train_ratio"] == 32 / 80
    text = "\n".join(lines)
    assert "(per-V)" in text and "(elastic-mqt)" in text and "!+0.130" in text
    cli = subprocess.run([sys.executable, "-m", "launch.compare", f"--a={a}", f"--b={b}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "B / A = 0.40" in cli.stdout, cli.stderr[-2000:]


def test_compare_reads_grids_in_a_bucket_with_their_cell_time(gcs_bucket):   # noqa: F811
    """A grid run on Cloud TPU lives in gs://: its cells' result.json files are found there as in a folder."""
    a = _grid(f"{gcs_bucket}/compare/a", {("m", 1): [0.50, 0.54], ("m", 64): [0.04, 0.06]}, wall=(30, 30),
              train=(20, 20))
    b = _grid(f"{gcs_bucket}/compare/b", {("m", 1): [0.51, 0.53], ("m", 64): [0.18, 0.20]}, training="elastic-mqt",
              wall=(15,), train=(10,))
    lines, out = compare.compare(a, b)
    assert out["time"]["a"] == {"wall_s": 60, "train_s": 40, "jobs": 2}   # "other" (another grid's) not counted
    assert out["time"]["wall_ratio"] == 15 / 60 and "B / A = 0.25" in "\n".join(lines)
    assert abs(out["cells"]["detail/m/V=64"]["outside"] - (0.19 - 0.06)) < 1e-12


def test_a_grid_without_cell_results_compares_without_a_time_ratio(tmp_path):
    """Cells' result.json files removed (a table copied alone): the errors still compare; the time says '-'."""
    a = _grid(tmp_path / "a", {("m", 1): [0.50, 0.54]})
    b = _grid(tmp_path / "b", {("m", 1): [0.51, 0.53]}, wall=(15,), train=(10,))
    lines, out = compare.compare(a, b)
    assert out["time"]["wall_ratio"] is None and "B / A = - (training -)" in "\n".join(lines)
