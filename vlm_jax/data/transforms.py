"""grain transforms shared by every source: a record -> one example of the batch contract, or a bad-input marker.

Sources yield records {'id': str, 'image': uint8[S, S, 3] | None, 'turns': [(role, text)]} (or a marker already);
`EncodeExample` turns them into numpy arrays of fixed shape (see features.py) plus `pixels` uint8[S, S, 3].
Pixels stay uint8 here and are normalised once per batch in the main process.
"""

from __future__ import annotations

from typing import Any

import grain.python as grain

from vlm_jax.data import errors, features, images
from vlm_jax.data.tokenize import Tokenizer


class EncodeExample(grain.MapTransform):
    """record -> {pixels, tokens, targets, loss_mask, attention_mask, image_positions, question_tokens,
    question_mask} (shapes in features.py), or the record's bad-input marker. Never raises on bad data."""

    def __init__(self, tokenizer: Tokenizer, layout: features.TextLayout, image_size: int):
        self.tokenizer, self.layout, self.image_size = tokenizer, layout, image_size

    def __repr__(self) -> str:
        return f"EncodeExample({self.tokenizer!r}, {self.layout!r}, image_size={self.image_size})"

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        if errors.is_marker(record):
            return record
        image = record["image"]
        try:
            if image is not None and image.shape != (self.image_size, self.image_size, 3):
                raise errors.BadRecord(errors.CORRUPT_IMAGE, f"image shape {image.shape} != "
                                       f"({self.image_size}, {self.image_size}, 3)")
            example = features.encode_conversation(self.tokenizer, record["turns"], self.layout,
                                                   has_image=image is not None)
        except errors.BadRecord as e:
            return errors.marker(record["id"], e)
        example["pixels"] = images.blank(self.image_size) if image is None else image
        return example
