"""Results tables for scaling-law fits: read CSV/JSONL, validate, one table of (N, V) cells per task family.

A results file has one row per evaluated run with (at least) the columns ``llm, n_params, visual_tokens, task,
error``; other columns are ignored. ``n_params`` is a raw parameter count (the laws use billions), ``error`` a
downstream error rate in (0, 1]. Several rows for the same (task, n_params, visual_tokens) -- several benchmarks of
one family, or several seeds -- are averaged into one cell, as the paper averages benchmarks within a family.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

REQUIRED_COLUMNS = ("llm", "n_params", "visual_tokens", "task", "error")
_NUMERIC_COLUMNS = ("n_params", "visual_tokens", "error")
PARAMS_PER_UNIT = 1e9  # the laws take N in billions of LLM parameters


@dataclasses.dataclass(frozen=True, eq=False)
class ScalingTable:
    """The cells of one task family.

    n: float[M] LLM parameters in billions; v: float[M] visual tokens; error: float[M] in (0, 1];
    replicates: int[M] how many result rows were averaged into each cell; llm: per-cell LLM name.
    """

    task: str
    n: np.ndarray
    v: np.ndarray
    error: np.ndarray
    replicates: np.ndarray
    llm: tuple[str, ...]

    def __post_init__(self):
        for name in ("n", "v", "error", "replicates"):
            arr = np.asarray(getattr(self, name), dtype=np.int64 if name == "replicates" else np.float64)
            if arr.ndim != 1:
                raise ValueError(f"task {self.task!r}: {name} must be 1-D, got shape {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        sizes = {len(self.n), len(self.v), len(self.error), len(self.replicates), len(self.llm)}
        if len(sizes) != 1:
            raise ValueError(f"task {self.task!r}: n, v, error, replicates and llm differ in length")
        validate_cells(self.n, self.v, self.error, where=f"task {self.task!r}")

    @classmethod
    def from_arrays(cls, n, v, error, *, task: str = "task", llm: Sequence[str] | None = None) -> ScalingTable:
        """Builds a table from per-run arrays (N in billions), averaging repeated (N, V) cells."""
        n, v, error = (np.asarray(x, dtype=np.float64).ravel() for x in (n, v, error))
        llm = tuple(llm) if llm is not None else tuple(f"{x:g}B" for x in n)
        validate_cells(n, v, error, where=f"task {task!r}", llm=llm)
        keys: dict[tuple[float, float], list[int]] = {}
        for i, key in enumerate(zip(n.tolist(), v.tolist())):
            keys.setdefault(key, []).append(i)
        order = sorted(keys)
        return cls(
            task=task,
            n=np.array([k[0] for k in order]),
            v=np.array([k[1] for k in order]),
            error=np.array([error[keys[k]].mean() for k in order]),
            replicates=np.array([len(keys[k]) for k in order]),
            llm=tuple(llm[keys[k][0]] for k in order),
        )

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
        return ScalingTable(self.task, self.n[keep], self.v[keep], self.error[keep], self.replicates[keep],
                            tuple(x for x, k in zip(self.llm, keep) if k))


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


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Reads a .csv (header row) or .jsonl/.ndjson (one JSON object per line) results file into row dicts."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if ext in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
        return rows
    raise ValueError(f"{path}: unknown results format {ext!r}; use .csv or .jsonl")


def tables_from_rows(rows: Iterable[Mapping], *, source: str = "results") -> dict[str, ScalingTable]:
    """Groups result rows by `task` into one ScalingTable each (N converted to billions); errors name the row."""
    groups: dict[str, tuple[list, list, list, list]] = {}
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
        n, v, e, names = groups.setdefault(str(row["task"]), ([], [], [], []))
        n.append(values["n_params"] / PARAMS_PER_UNIT)
        v.append(values["visual_tokens"])
        e.append(values["error"])
        names.append(str(row["llm"]))
    if count == 0:
        raise ValueError(f"{source}: no result rows")
    return {task: ScalingTable.from_arrays(n, v, e, task=task, llm=names) for task, (n, v, e, names) in groups.items()}


def load_tables(path: str | os.PathLike) -> dict[str, ScalingTable]:
    """Reads a results file into {task: ScalingTable}."""
    return tables_from_rows(read_rows(path), source=os.fspath(path))


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
    """Writes result rows as JSONL (or CSV when the name ends in .csv); used by the demo and tests."""
    path = os.fspath(path)
    if path.lower().endswith(".csv"):
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps(dict(row)) + "\n" for row in rows)
