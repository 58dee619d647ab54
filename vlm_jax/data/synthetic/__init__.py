"""The built-in synthetic benchmark: three task families drawn on the fly from seeds, nothing to download.

- `reasoning` (reasoning.py): a few coloured shapes; questions that combine several facts (LLM work).
- `ocr` (ocr.py): short strings of small characters in the quadrants; reading them needs many visual tokens.
- `detail` (detail.py): small two-colour markers; the fine-detail stand-in for the paper's OCR group.

Answers are 1-3 tokens, scored by exact match. Scenes are drawn on a 64 x 64 canvas (scene.py) and resized to the
requested size; `describe` tells a reasoning or detail scene in words instead, for pretraining a tiny LLM on "text".

    options = SyntheticOptions.from_config(config.data.synthetic, image_size=64)   # options.py
    ex = make_example("validation", "ocr", 7, options)        # an Example (example.py); generate.py
    exs = make_examples("validation", "ocr", 32, options)     # items 0..31, as the sources draw them
    source = SyntheticSource("train", 1000, options, families="reasoning,detail", family_weights="1,3")

Prompts for generation are `prompt_text(example.question)`, tokenized by `features.encode_prompt`; `VOCAB_WORDS`
is the word tokenizer's vocabulary (vocab.py); `write_llava` writes examples as a LLaVA dataset (llava_export.py).
"""

from vlm_jax.data.synthetic.detail import DETAIL_KINDS, EMPTY_SLOT, INNER_COLORS, parse_detail_kinds
from vlm_jax.data.synthetic.example import Example, prompt_text
from vlm_jax.data.synthetic.generate import FAMILIES, SPLITS, make_example, make_examples, parse_families
from vlm_jax.data.synthetic.llava_export import write_llava
from vlm_jax.data.synthetic.ocr import DEFAULT_ALPHABET, QUADRANTS
from vlm_jax.data.synthetic.options import DEFAULT_OPTIONS, SyntheticOptions
from vlm_jax.data.synthetic.reasoning import GRID, REASONING_KINDS, SHAPES, parse_kinds
from vlm_jax.data.synthetic.scene import BACKGROUND, CANVAS, COLORS
from vlm_jax.data.synthetic.source import DEFAULT_FAMILIES, SyntheticSource, parse_weights
from vlm_jax.data.synthetic.vocab import VOCAB_WORDS

__all__ = [
    "BACKGROUND", "CANVAS", "COLORS", "DEFAULT_ALPHABET", "DEFAULT_FAMILIES", "DEFAULT_OPTIONS", "DETAIL_KINDS",
    "EMPTY_SLOT", "FAMILIES", "GRID", "INNER_COLORS", "QUADRANTS", "REASONING_KINDS", "SHAPES", "SPLITS",
    "VOCAB_WORDS", "Example", "SyntheticOptions", "SyntheticSource", "make_example", "make_examples",
    "parse_detail_kinds", "parse_families", "parse_kinds", "parse_weights", "prompt_text", "write_llava",
]
