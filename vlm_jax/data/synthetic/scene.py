"""What every task family shares: the canvas and palette it draws with, how many items a scene holds, and the
`Scene` a family hands back to `generate.make_example`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

CANVAS = 64   # every scene is drawn on a CANVAS x CANVAS image, then resized to the requested size

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
}
# One light background. Not mid-grey: that is near the CLIP mean, so it normalises to ~0, a patch becomes
# fill x colour, and the tower's pre-LayerNorm divides the fill (the shape's cue) away. A random shade was worse still.
BACKGROUND = (235, 235, 235)

# question i about a scene -> (kind, question, answer), or None when the scene has nothing more to ask
Ask = Callable[[int], "tuple[str, str, str] | None"]


@dataclasses.dataclass(frozen=True)
class Scene:
    """One drawn item: the picture (None when the scene is told in words instead), those words, and how to ask
    about it. Each family's `draw_scene(rng, options, key)` returns one; `ask` draws from the item's generator
    `rng`, so the questions are a pure function of the item too (`key` seeds any further stream a family needs)."""

    image: Image.Image | None
    description: str
    ask: Ask


def blank_canvas(color: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    return Image.new("RGB", (CANVAS, CANVAS), color)


def item_count(rng: np.random.Generator, low: int, high: int, max_items: int) -> int:
    """How many objects/characters: uniform in [low, high], both capped at max_items (0 = no cap)."""
    if max_items:
        low, high = min(low, max_items), min(high, max_items)
    return int(rng.integers(low, high + 1))
