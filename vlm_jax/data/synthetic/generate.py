"""`make_example`: item `index` of a family in a split, a pure function of (split, family, index, options).

Item j of family f in a split is drawn from `np.random.default_rng([seed, split, f, j])`, so train and validation
come from disjoint seed streams and any item can be redrawn alone (what a grain RandomAccessDataSource needs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlm_jax.data.synthetic import detail, ocr, reasoning
from vlm_jax.data.synthetic.example import Example
from vlm_jax.data.synthetic.options import DEFAULT_OPTIONS, SyntheticOptions
from vlm_jax.data.synthetic.scene import CANVAS, Scene

# family name -> its scene. The order is part of every item's seed: append, never reorder.
SCENES = {"reasoning": reasoning.draw_scene, "ocr": ocr.draw_scene, "detail": detail.draw_scene}
FAMILIES = tuple(SCENES)
SPLITS = ("train", "validation")   # also part of the seed


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")


def parse_families(families: str | Sequence[str]) -> tuple[str, ...]:
    """'reasoning,ocr' or a sequence -> a checked tuple of family names."""
    names = tuple(f.strip() for f in (families.split(",") if isinstance(families, str) else families) if f.strip())
    if not names or any(f not in FAMILIES for f in names) or len(set(names)) != len(names):
        raise ValueError(f"synthetic families must be distinct names from {FAMILIES}, got {families!r}")
    return names


def _follow_ups(scene: Scene, first: str, questions: int) -> tuple[tuple[str, str], ...]:
    """Up to questions - 1 further (question, answer) turns, each distinct from those before (a few redraws)."""
    more: list[tuple[str, str]] = []
    for i in range(1, 4 * questions):
        if len(more) == questions - 1:
            break
        asked = scene.ask(i)
        if asked is None:
            break
        _, q, a = asked
        if q != first and all(q != m for m, _ in more):
            more.append((q, a))
    return tuple(more)


def make_example(split: str, family: str, index: int, options: SyntheticOptions = DEFAULT_OPTIONS) -> Example:
    """Item `index` of `family` in `split`. With options.questions > 1 it adds follow-up questions about the same
    image (distinct where the scene allows; for ocr and detail one per string or marker; the first is the same as
    with 1). With options.describe the scene is told in words instead of drawn (not ocr)."""
    check_split(split)
    if family not in FAMILIES:
        raise ValueError(f"synthetic family must be one of {FAMILIES}, got {family!r}")
    if options.describe and family == "ocr":
        raise ValueError("only the reasoning and detail families' scenes can be described in words, not 'ocr'")
    key = [options.seed, SPLITS.index(split), FAMILIES.index(family), index]
    scene = SCENES[family](np.random.default_rng(key), options, key)
    kind, question, answer = scene.ask(0)
    more = _follow_ups(scene, question, options.questions)
    example_id = f"{split}-{family}-{index}"
    if scene.image is None:
        return Example(example_id, family, kind, None, question, answer, more, scene.description)
    img = scene.image
    if options.image_size != CANVAS:
        img = img.resize((options.image_size, options.image_size), Image.Resampling.BICUBIC)
    return Example(example_id, family, kind, np.asarray(img, np.uint8), question, answer, more)


def make_examples(split: str, family: str, n: int, options: SyntheticOptions = DEFAULT_OPTIONS) -> list[Example]:
    """Items 0..n-1 of `family` in `split`: the same examples the training/eval sources draw."""
    return [make_example(split, family, j, options) for j in range(n)]
