"""Sequence packing: several examples per row of the fixed length L, so short records stop paying for padding.

An example (features.py layout, length L) is cut to its real tokens and placed in the first row of the batch that
still has room for it and fewer than K examples (first fit). In a packed row:

    tokens, targets, loss_mask   the examples one after another, each with its own targets and answer mask
    attention_mask               segment ids: k + 1 on the k-th example's tokens, 0 on padding (models/llm.py
                                 limits attention to a segment and restarts RoPE positions there)
    image_positions  int[K * V]  example k's V slots, shifted by where it starts; L (dropped) for unused slots
    pixels           f32[K, S, S, 3], question_tokens / question_mask int[K, Lq]: example k's, zeros if unused

An example's last target is 0 with no loss, so nothing is learnt across a boundary: the loss of a packed batch is
the loss of the same examples unpacked (tests/test_packing.py), with fewer rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

TOKEN_KEYS = ("tokens", "targets", "loss_mask", "attention_mask")   # [L] per example, concatenated in a row
PER_EXAMPLE_KEYS = ("pixels", "question_tokens", "question_mask")    # one per example, K per row


def example_length(example: Mapping[str, np.ndarray]) -> int:
    """Real tokens of an unpacked example (features.py right-pads them)."""
    return int(np.count_nonzero(example["attention_mask"]))


class PackedBatch:
    """B rows of length L being filled with at most K examples each (first fit)."""

    def __init__(self, rows: int, per_row: int, template: Mapping[str, np.ndarray]):
        if per_row < 1:
            raise ValueError(f"data.pack_examples must be >= 1 to pack, got {per_row}")
        self.rows, self.per_row = rows, per_row
        self.length = template["tokens"].shape[0]
        self.v = template["image_positions"].shape[0]
        self.used = np.zeros(rows, np.int64)    # tokens filled per row
        self.count = np.zeros(rows, np.int64)   # examples per row
        self.arrays = {k: np.zeros((rows,) + template[k].shape, template[k].dtype) for k in TOKEN_KEYS}
        self.arrays["image_positions"] = np.full((rows, per_row * self.v), self.length, np.int32)
        for k in PER_EXAMPLE_KEYS:
            self.arrays[k] = np.zeros((rows, per_row) + template[k].shape, template[k].dtype)

    @property
    def examples(self) -> int:
        return int(self.count.sum())

    def add(self, example: Mapping[str, np.ndarray]) -> bool:
        """Places `example` in the first row with room; False (nothing changed) when none has."""
        n = example_length(example)
        fits = np.flatnonzero((self.used + n <= self.length) & (self.count < self.per_row))
        if not fits.size:
            return False
        row = int(fits[0])
        start, k = int(self.used[row]), int(self.count[row])
        a = self.arrays
        for key in ("tokens", "targets", "loss_mask"):
            a[key][row, start:start + n] = example[key][:n]
        a["attention_mask"][row, start:start + n] = k + 1
        slots = np.asarray(example["image_positions"])
        a["image_positions"][row, k * self.v:(k + 1) * self.v] = np.where(slots < self.length, slots + start,
                                                                          self.length)
        for key in PER_EXAMPLE_KEYS:
            a[key][row, k] = example[key]
        self.used[row] += n
        self.count[row] += 1
        return True

    def batch(self) -> dict[str, np.ndarray]:
        return dict(self.arrays)
