"""`VOCAB_WORDS`: every word a synthetic question or answer uses, the closed vocabulary of the word tokenizer."""

from __future__ import annotations

from vlm_jax.data.synthetic.detail import EMPTY_SLOT, INNER_COLORS
from vlm_jax.data.synthetic.ocr import QUADRANTS
from vlm_jax.data.synthetic.reasoning import RELATIONS, SHAPES
from vlm_jax.data.synthetic.scene import COLORS

# Sorted, so a word's id does not depend on where it is listed. Digits and the OCR alphabet are spelled as
# characters and need no words.
VOCAB_WORDS = tuple(sorted(set(
    ["how", "many", "shapes", "are", "there", "is", "a", "the", "what", "color", "shape", "one", "more", "than",
     "of", "written", "in", "character", "first", "last", "where", "yes", "no", "inside", "marker", "value", "plus",
     "times"]
    + " ".join(RELATIONS).split() + " ".join(QUADRANTS).split() + list(COLORS)
    + [s for shape in SHAPES for s in (shape, shape + "s")]
    + list(INNER_COLORS) + [EMPTY_SLOT] + [outer + inner for outer in COLORS for inner in INNER_COLORS])))
