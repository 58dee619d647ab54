"""Per-record work shared by every source, run inside grain's reader threads.

A source yields records {'id': str, 'image': uint8[S, S, 3] | None, 'turns': [(role, text)]} (or, for a record that
failed, a bad-input marker); `EncodeExample` turns a record into the numpy arrays of one example (features.py) plus
CLIP-normalised `pixels` float32[S, S, 3]. `ExampleSource` chains a raw source with such steps behind grain's
random-access interface.

Why a source and not grain MapTransforms: grain's DataLoader runs transforms on the main thread when it has no
worker processes, but reads sources from a pool of threads. Pillow and numpy release the GIL while decoding,
resizing and normalising, so doing all of it in the read threads uses every core even with worker_count=0 (and it
still runs in the workers when there are some). The main thread only stacks rows into batches; normalising there
instead cost ~3 ms per 336 px example on one core (benchmarks/bench_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vlm_jax.data import errors, features, images
from vlm_jax.data.tokenize import Tokenizer

Step = Callable[[dict[str, Any]], dict[str, Any]]


class EncodeExample:
    """record -> {pixels f32[S, S, 3], tokens, targets, loss_mask, attention_mask, image_positions, question_tokens,
    question_mask} (shapes in features.py), or the record's bad-input marker. Never raises on bad data."""

    def __init__(self, tokenizer: Tokenizer, layout: features.TextLayout, image_size: int):
        self.tokenizer, self.layout, self.image_size = tokenizer, layout, image_size

    def __repr__(self) -> str:
        return f"EncodeExample({self.tokenizer!r}, {self.layout!r}, image_size={self.image_size})"

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        image = record["image"]
        try:
            if image is not None and image.shape != (self.image_size, self.image_size, 3):
                raise errors.BadRecord(errors.CORRUPT_IMAGE, f"image shape {image.shape} != "
                                       f"({self.image_size}, {self.image_size}, 3)")
            example = features.encode_conversation(self.tokenizer, record["turns"], self.layout,
                                                   has_image=image is not None)
        except errors.BadRecord as e:
            return errors.marker(record["id"], e)
        if errors.NOTE_KEY in example:
            example[errors.NOTE_KEY] = (example[errors.NOTE_KEY][0], str(record["id"]), example[errors.NOTE_KEY][1])
        example["pixels"] = images.normalize(images.blank(self.image_size) if image is None else image)
        return example


class ExampleSource:
    """grain RandomAccessDataSource: item i = steps applied in order to base[i], stopping at a bad-input marker.

    Steps must not raise on bad data (they return markers) and must be thread-safe; their reprs, with the base's,
    make this source's repr, which grain checks when restoring an iterator state.
    """

    def __init__(self, base, steps: Sequence[Step]):
        self.base, self.steps = base, tuple(steps)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.base[i]
        for step in self.steps:
            if errors.is_marker(record):
                break
            record = step(record)
        return record

    def __repr__(self) -> str:
        return f"ExampleSource({self.base!r}, steps={list(self.steps)!r})"
