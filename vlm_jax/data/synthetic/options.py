"""`SyntheticOptions`: how synthetic items are drawn, as one checked value instead of a dozen keywords.

Built once from the run's `data.synthetic` (`SyntheticOptions.from_config`), it goes unchanged from the config to
the data source, the evaluation's benchmarks and `make_example`: adding an option is one field here and one key in
`pipeline.default_config`, and training and evaluation cannot drift apart on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vlm_jax.data.synthetic import detail, ocr, reasoning
from vlm_jax.data.synthetic.scene import CANVAS

# fields that are not data.synthetic keys of the same name: the image size is the model's, and the number of
# questions per image depends on the split (`from_config`)
_NOT_CONFIG_KEYS = ("image_size", "questions")


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    """Everything about a synthetic item but which one it is (split, family, index). Checked on construction; the
    kind lists are kept in their checked form ('' -> every reasoning kind, 'inside')."""

    seed: int = 0                   # content seed; train and validation draw from disjoint streams of it
    image_size: int = CANVAS        # side of the returned image (scenes are drawn at CANVAS px and resized)
    questions: int = 1              # questions per image: the first, then distinct follow-ups about the same scene
    describe: bool = False          # reasoning/detail scenes told in words, no image (pretraining a tiny LLM)
    max_items: int = 0              # at most this many objects / strings / markers per scene (0: the family's range)
    reasoning_kinds: str = ""       # comma-separated reasoning question kinds ('' = all; reasoning.REASONING_KINDS)
    reasoning_grid: int = reasoning.GRID   # reasoning objects sit in a grid x grid layout of the canvas
    reasoning_objects: int = 0      # at most this many reasoning objects (0 = max_items)
    ocr_alphabet: str = ocr.DEFAULT_ALPHABET
    ocr_length: int = 1             # most characters per string (each has 1..ocr_length)
    ocr_scale: int = 2              # each font pixel drawn scale x scale
    detail_kinds: str = ""          # comma-separated detail kinds: inside (''), colors, corner (detail.DETAIL_KINDS)

    def __post_init__(self):
        for name in ("seed", "image_size", "questions", "max_items", "reasoning_grid", "reasoning_objects",
                     "ocr_length", "ocr_scale"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "describe", bool(self.describe))
        object.__setattr__(self, "reasoning_kinds", ",".join(reasoning.parse_kinds(self.reasoning_kinds)))
        object.__setattr__(self, "detail_kinds", ",".join(detail.parse_detail_kinds(self.detail_kinds)))
        reasoning.check_layout(self.reasoning_grid, self.reasoning_objects or self.max_items)
        ocr.check_strings(self.ocr_alphabet, self.ocr_length, self.ocr_scale)
        if self.questions < 1:
            raise ValueError(f"synthetic questions per image must be >= 1, got {self.questions}")

    @classmethod
    def from_config(cls, synthetic_cfg: Mapping, *, image_size: int = CANVAS,
                    split: str = "validation") -> SyntheticOptions:
        """The options of `data.synthetic` for images of `image_size` (the model's). Questions per image:
        `train_questions` on the train split, one elsewhere (evaluation asks one at a time). Keys an older run's
        config lacks keep their defaults; keys that are not options (families, sizes) are the source's."""
        given = {f.name: synthetic_cfg[f.name] for f in dataclasses.fields(cls)
                 if f.name not in _NOT_CONFIG_KEYS and f.name in synthetic_cfg}
        questions = synthetic_cfg.get("train_questions", 1) if split == "train" else 1
        return cls(image_size=image_size, questions=questions, **given)


DEFAULT_OPTIONS = SyntheticOptions()
