"""Results tables for scaling-law fits: read CSV/JSONL, validate, one table of (N, V) cells per task family.

A results file has one row per evaluated run with (at least) the columns ``llm, n_params, visual_tokens, task,
error``; ``seed`` (the training seed) and ``questions`` (how many evaluation questions the error was measured on)
are read when present; other columns are ignored. ``n_params`` is a raw parameter count (the laws use billions),
``error`` a downstream error rate in (0, 1].

A cell is one (task, N, V). Its rows with the same seed -- several benchmarks of one family -- are averaged into
that seed's error, as the paper averages benchmarks within a family; its seeds are kept apart (`seed_errors`), so
that the fit can weigh a cell by how much its seeds disagree and the bootstrap can resample them. Rows without a
``seed`` count as one run of their cell. The cell's `error` is the mean over its seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from vlm_jax import files

REQUIRED_COLUMNS = ("llm", "n_params", "visual_tokens", "task", "error")
_NUMERIC_COLUMNS = ("n_params", "visual_tokens", "error")
PARAMS_PER_UNIT = 1e9  # the laws take N in billions of LLM parameters


@dataclasses.dataclass(frozen=True, eq=False)
class ScalingTable:
    """The cells of one task family.

    n: float[M] LLM parameters in billions; v: float[M] visual tokens; error: float[M] in (0, 1], the mean over
    each cell's seeds; replicates: int[M] how many result rows were averaged into each cell; llm: per-cell LLM name;
    seed_errors: float[M, S] each seed's error (NaN past a cell's own seed count; default: `error` as one seed);
    questions: float[M] evaluation questions behind one seed's error (NaN: unknown); seeds: per-cell seed labels.
    """

    task: str
    n: np.ndarray
    v: np.ndarray
    error: np.ndarray
    replicates: np.ndarray
    llm: tuple[str, ...]
    seed_errors: np.ndarray | None = None
    questions: np.ndarray | None = None
    seeds: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        for name in ("n", "v", "error", "replicates"):
            arr = np.asarray(getattr(self, name), dtype=np.int64 if name == "replicates" else np.float64)
            if arr.ndim != 1:
                raise ValueError(f"task {self.task!r}: {name} must be 1-D, got shape {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        m = len(self.n)
        seed_errors = (self.error[:, None] if self.seed_errors is None
                       else np.asarray(self.seed_errors, dtype=np.float64))
        questions = np.full(m, np.nan) if self.questions is None else np.asarray(self.questions, np.float64)
        seeds = self.seeds if self.seeds is not None else tuple(("",) for _ in range(m))
        for name, arr in (("seed_errors", seed_errors), ("questions", questions)):
            arr = arr.copy()
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "seeds", tuple(tuple(str(s) for s in cell) for cell in seeds))
        sizes = {len(self.n), len(self.v), len(self.error), len(self.replicates), len(self.llm),
                 len(self.seed_errors), len(self.questions), len(self.seeds)}
        if len(sizes) != 1 or self.seed_errors.ndim != 2:
            raise ValueError(f"task {self.task!r}: n, v, error, replicates, llm, seed_errors, questions and seeds "
                             "differ in length")
        where = f"task {self.task!r}"
        validate_cells(self.n, self.v, self.error, where=where)
        counts = np.array([len(s) for s in self.seeds])
        filled = np.arange(self.seed_errors.shape[1])[None, :] < counts[:, None]
        if (counts < 1).any() or (counts > self.seed_errors.shape[1]).any() or np.isnan(
                self.seed_errors[filled]).any() or not np.isnan(self.seed_errors[~filled]).all():
            raise ValueError(f"{where}: seed_errors must hold one error per seed label of each cell (NaN after)")
        validate_cells(np.ones(filled.sum()), np.ones(filled.sum()), self.seed_errors[filled], where=where)
        bad = np.flatnonzero(~np.isnan(self.questions) & ~(self.questions > 0))
        if bad.size:
            raise ValueError(f"{where}: questions must be positive, got {self.questions[bad[0]]} at cell "
                             f"{_cell(bad[0], self.llm)}")

    @classmethod
    def from_arrays(cls, n, v, error, *, task: str = "task", llm: Sequence[str] | None = None, seed=None,
                    questions=None) -> ScalingTable:
        """Builds a table from per-run arrays (N in billions; optional seed labels and question counts).

        Runs of the same (N, V) and seed are averaged (benchmarks of one family), with the questions behind the
        average taken as k^2 / sum(1 / q_j) over its k runs, so that p(1-p)/questions is the binomial variance of
        a mean of k equally accurate benchmarks; seeds stay apart in `seed_errors`.
        """
        n, v, error = (np.asarray(x, dtype=np.float64).ravel() for x in (n, v, error))
        llm = tuple(llm) if llm is not None else tuple(f"{x:g}B" for x in n)
        seed = [""] * len(n) if seed is None else ["" if s is None else str(s) for s in seed]
        questions = (np.full(len(n), np.nan) if questions is None
                     else np.asarray([np.nan if q is None else q for q in questions], dtype=np.float64).ravel())
        if not len(seed) == len(questions) == len(n) == len(v) == len(error) == len(llm):
            raise ValueError(f"task {task!r}: n, v, error, llm, seed and questions differ in length")
        validate_cells(n, v, error, where=f"task {task!r}", llm=llm)
        keys: dict[tuple[float, float], dict[str, list[int]]] = {}
        for i, key in enumerate(zip(n.tolist(), v.tolist())):
            keys.setdefault(key, {}).setdefault(seed[i], []).append(i)
        order = sorted(keys)
        width = max(len(by_seed) for by_seed in keys.values())
        seed_errors = np.full((len(order), width), np.nan)
        cell_questions = np.full(len(order), np.nan)
        labels = []
        for c, k in enumerate(order):
            by_seed = keys[k]
            labels.append(tuple(sorted(by_seed, key=_seed_order)))
            q_eff = []
            for s, label in enumerate(labels[-1]):
                runs = by_seed[label]
                seed_errors[c, s] = error[runs].mean()
                q_eff.append(len(runs) ** 2 / np.sum(1.0 / questions[runs]))  # NaN when any run's count is unknown
            cell_questions[c] = np.mean(q_eff)
        return cls(
            task=task,
            n=np.array([k[0] for k in order]),
            v=np.array([k[1] for k in order]),
            error=np.nanmean(seed_errors, axis=1),
            replicates=np.array([sum(len(r) for r in keys[k].values()) for k in order]),
            llm=tuple(llm[next(iter(keys[k].values()))[0]] for k in order),
            seed_errors=seed_errors, questions=cell_questions, seeds=tuple(labels),
        )

    @property
    def seed_counts(self) -> np.ndarray:
        """int[M] seeds per cell."""
        return np.array([len(s) for s in self.seeds])

    def design(self) -> tuple:
        """The cells and seeds, comparable across tables: equal designs can share bootstrap resamples."""
        return tuple(zip(self.n.tolist(), self.v.tolist(), self.seeds))

    def __len__(self) -> int:
        return len(self.n)

    @property
    def n_values(self) -> np.ndarray:
        """float[K] distinct LLM sizes (billions), ascending."""
        return np.unique(self.n)

    @property
    def v_values(self) -> np.ndarray:
        """float[L] distinct visual-token counts, ascending."""
        return np.unique(self.v)

    def subset(self, keep: np.ndarray) -> ScalingTable:
        """The table restricted to cells where bool[M] `keep` holds."""
        keep = np.asarray(keep, dtype=bool)
        width = max(int(self.seed_counts[keep].max(initial=1)), 1)
        return ScalingTable(self.task, self.n[keep], self.v[keep], self.error[keep], self.replicates[keep],
                            tuple(x for x, k in zip(self.llm, keep) if k), self.seed_errors[keep, :width],
                            self.questions[keep], tuple(x for x, k in zip(self.seeds, keep) if k))


def validate_cells(n, v, error, *, where: str, llm: Sequence[str] | None = None) -> None:
    """Raises ValueError naming the first cell with NaN, non-positive N or V, or error outside (0, 1]."""
    for name, arr in (("n_params", n), ("visual_tokens", v), ("error", error)):
        arr = np.asarray(arr, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{where}: {name} is {arr[bad[0]]} at cell {_cell(bad[0], llm)}")
    for name, arr in (("n_params", n), ("visual_tokens", v)):
        bad = np.flatnonzero(np.asarray(arr) <= 0)
        if bad.size:
            raise ValueError(f"{where}: {name} must be positive, got {arr[bad[0]]} at cell {_cell(bad[0], llm)}")
    error = np.asarray(error, dtype=np.float64)
    bad = np.flatnonzero((error <= 0) | (error > 1))
    if bad.size:
        raise ValueError(f"{where}: error must lie in (0, 1], got {error[bad[0]]} at cell {_cell(bad[0], llm)}")


def _cell(i: int, llm: Sequence[str] | None) -> str:
    return f"{i} ({llm[i]})" if llm is not None else str(i)


def _seed_order(label: str):
    """Seed labels in numeric order when they are numbers ('2' before '10')."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Reads a .csv (header row) or .jsonl/.ndjson (one JSON object per line) results file into row dicts."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl", ".ndjson", ".json"):
        raise ValueError(f"{path}: unknown results format {ext!r}; use .csv or .jsonl")
    # A local file or a gs:// object (a grid's results on a bucket); bytes, so csv sees the file's own newlines.
    text = epath.Path(path).read_bytes().decode("utf-8")
    if ext == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def tables_from_rows(rows: Iterable[Mapping], *, source: str = "results") -> dict[str, ScalingTable]:
    """Groups result rows by `task` into one ScalingTable each (N converted to billions); errors name the row."""
    groups: dict[str, tuple[list, list, list, list, list, list]] = {}
    count = 0
    for i, row in enumerate(rows, start=1):
        count += 1
        missing = [c for c in REQUIRED_COLUMNS if c not in row or row[c] in (None, "")]
        if missing:
            raise ValueError(f"{source}: row {i} lacks column(s) {', '.join(missing)}")
        values = {}
        for col in _NUMERIC_COLUMNS:
            try:
                values[col] = float(row[col])
            except (TypeError, ValueError):
                raise ValueError(f"{source}: row {i}: {col}={row[col]!r} is not a number") from None
        where = f"{source}: row {i} (llm {row['llm']!r}, task {row['task']!r})"
        validate_cells([values["n_params"]], [values["visual_tokens"]], [values["error"]], where=where)
        questions = row.get("questions")
        if questions not in (None, ""):
            try:
                questions = float(questions)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: row {i}: questions={questions!r} is not a number") from None
            if not questions > 0:
                raise ValueError(f"{where}: questions must be positive, got {questions:g}")
        n, v, e, names, seeds, qs = groups.setdefault(str(row["task"]), ([], [], [], [], [], []))
        n.append(values["n_params"] / PARAMS_PER_UNIT)
        v.append(values["visual_tokens"])
        e.append(values["error"])
        names.append(str(row["llm"]))
        seeds.append(row.get("seed"))
        qs.append(None if questions in (None, "") else questions)
    if count == 0:
        raise ValueError(f"{source}: no result rows")
    return {task: ScalingTable.from_arrays(n, v, e, task=task, llm=names, seed=seeds, questions=qs)
            for task, (n, v, e, names, seeds, qs) in groups.items()}


def load_tables(path: str | os.PathLike) -> dict[str, ScalingTable]:
    """Reads a results file into {task: ScalingTable}."""
    return tables_from_rows(read_rows(path), source=os.fspath(path))


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
    """Writes result rows as JSONL (or CSV when the name ends in .csv), locally or to a gs:// bucket; used by the
    demo and tests."""
    path = os.fspath(path)
    if path.lower().endswith(".csv"):
        columns = list(dict.fromkeys(k for row in rows for k in row))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        files.write_text_atomic(path, text.getvalue())
    else:
        files.write_text_atomic(path, "".join(json.dumps(dict(row)) + "\n" for row in rows))
