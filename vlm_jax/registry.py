"""One registry type for every kind of named choice: compressor heads, data sources, scorers, grid backends.

A config names an entry (`model.compressor.name`, `data.source`, a benchmark's scorer, `config.backend`); the
registry is the only place the names live, so adding an entry is one decorator and an unknown name fails listing
the known ones.
"""

from __future__ import annotations


class Registry(dict):
    """name -> entry, filled by the `register` decorator."""

    def __init__(self, kind: str, key: str = ""):
        super().__init__()
        self.kind, self.key = kind, key   # e.g. "compressor head", "model.compressor.name"

    def register(self, *names: str):
        """Decorator adding the decorated function or class under each of `names`."""
        def add(entry):
            for name in names:
                if name in self:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self[name] = entry
            return entry
        return add

    def lookup(self, name: str):
        if name not in self:
            where = f" ({self.key})" if self.key else ""
            raise ValueError(f"unknown {self.kind} {name!r}{where}; known: {sorted(self)}")
        return self[name]
