"""`SyntheticSource`: the synthetic families as one grain RandomAccessDataSource, interleaved item by item."""

from __future__ import annotations

from collections.abc import Sequence

from vlm_jax.data.synthetic.generate import check_split, make_example, parse_families
from vlm_jax.data.synthetic.options import DEFAULT_OPTIONS, SyntheticOptions

DEFAULT_FAMILIES = ("reasoning", "ocr")   # what a source draws unless told (data.synthetic.families)


def parse_weights(weights: str | Sequence[int], n_families: int) -> tuple[int, ...]:
    """'1,3' or a sequence -> one positive integer weight per family ('' = all 1)."""
    parts = [w for w in (weights.split(",") if isinstance(weights, str) else weights) if str(w).strip()]
    if not parts:
        return (1,) * n_families
    try:
        out = tuple(int(w) for w in parts)
    except ValueError:
        out = ()
    if len(out) != n_families or min(out) < 1:
        raise ValueError(f"synthetic family_weights must be {n_families} positive integers (one per family), "
                         f"got {weights!r}")
    return out


class SyntheticSource:
    """grain RandomAccessDataSource: families interleaved item by item in a fixed cycle where family f appears
    weights[f] times (weights 1,3: r d d d r d d d ...); the k-th appearance of f is item k of f.

    Returns {'id': str, 'image': uint8[S, S, 3], 'turns': [(role, text)]}.
    """

    def __init__(self, split: str, num_examples: int, options: SyntheticOptions = DEFAULT_OPTIONS, *,
                 families: str | Sequence[str] = DEFAULT_FAMILIES, family_weights: str | Sequence[int] = ""):
        self.families = parse_families(families)
        self.weights = parse_weights(family_weights, len(self.families))
        # cycle position -> (family, its rank among that family's positions in the cycle)
        self._cycle = [(f, r) for f, w in enumerate(self.weights) for r in range(w)]
        check_split(split)
        if num_examples < 1:
            raise ValueError(f"synthetic num_examples must be >= 1, got {num_examples}")
        self.split, self.num_examples, self.options = split, int(num_examples), options

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"synthetic index {i} out of range [0, {self.num_examples})")
        f, rank = self._cycle[i % len(self._cycle)]
        index = i // len(self._cycle) * self.weights[f] + rank
        ex = make_example(self.split, self.families[f], index, self.options)
        return {"id": ex.id, "image": ex.image, "turns": ex.turns()}

    def __repr__(self) -> str:
        # grain checks this against a restored iterator state: keep its text as it was when the options were
        # keywords, or saved runs no longer resume.
        o = self.options
        return (f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, families={self.families}, "
                f"seed={o.seed}, image_size={o.image_size}, ocr_alphabet={o.ocr_alphabet!r}, "
                f"ocr_length={o.ocr_length}, ocr_scale={o.ocr_scale}, reasoning_kinds={o.reasoning_kinds!r}, "
                f"reasoning_grid={o.reasoning_grid}, detail_kinds={o.detail_kinds!r}, describe={o.describe}, "
                f"max_items={o.max_items}, reasoning_objects={o.reasoning_objects}, questions={o.questions}, "
                f"weights={self.weights})")
