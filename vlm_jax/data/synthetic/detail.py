"""The `detail` family: small two-colour markers whose answers need fine detail, the stand-in for the paper's OCR group.

4-5 markers, each an 8-px square of one colour with a 4-px centre of a colour from a palette of its own (white,
black, orange, pink), in distinct cells of an 8 x 8 lattice (one marker = one patch of the tiny tower); outer colours
are distinct. "what color is inside the red one?" needs the two colours of one marker bound together, which a
visual token that pools several markers loses (it keeps the bag of outer colours and the bag of centres): 64 tokens
keep every marker apart, 16 tokens (16 x 16 px) rarely mix two, 4 tokens often, 1 token always.

Kinds (`detail_kinds`): `inside` (the default), `colors` (one marker's two colours asked apart: what a tower is
pretrained on), `corner` (the colour inside the marker in the top-left corner, drawn 8, 16 or 32 px wide among
other 8-px markers: small, medium and large print; a read at one fixed place, whose error is set by the size of
print the visual tokens resolve, not by a lookup). Told in words, a marker is one word, e.g. "redwhite".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from vlm_jax.data.synthetic.scene import CANVAS, COLORS, Scene, blank_canvas, item_count

if TYPE_CHECKING:
    from vlm_jax.data.synthetic.options import SyntheticOptions

# The centres of detail markers have colours of their own, so that a marker's two colours never need telling apart by
# place: a token that keeps one marker apart holds "red" and "white" and answers; one that pools several holds only
# the bags of outer and centre colours, whichever feature the tower makes of each.
INNER_COLORS = {
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "orange": (255, 140, 0),
    "pink": (255, 130, 200),
}
DETAIL_CELL = 8   # detail markers fill one cell of an 8-px lattice (one patch of the tiny tower)
CELLS = (CANVAS // DETAIL_CELL) ** 2
EMPTY_SLOT = "empty"   # a described scene's empty cell; a marker is one word, e.g. "redgreen" (outer, then centre)
MIN_MARKERS = 4   # at least four: the bag of colours one pooled token keeps rarely tells the answer
# `corner` scenes: the corner marker's sizes, and the chance that a free cell holds another (8-px) marker
CORNER_SIZES = (8, 16, 32)
CORNER_DENSITY = 0.15

Marker = tuple[str, str]   # (outer colour, centre colour)


def draw_markers(markers: list[Marker], cells, first_size: int = DETAIL_CELL) -> Image.Image:
    """Each (outer, inner) marker as an 8-px square (the first one `first_size` px) with a 2-px ring around its
    centre, from the top-left corner of its cell of the 8 x 8 lattice."""
    img = blank_canvas()
    draw = ImageDraw.Draw(img)
    per_row = CANVAS // DETAIL_CELL
    for j, (cell, (outer, inner)) in enumerate(zip(cells, markers)):
        x, y = int(cell) % per_row * DETAIL_CELL, int(cell) // per_row * DETAIL_CELL
        size = first_size if j == 0 else DETAIL_CELL
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=COLORS[outer])
        draw.rectangle((x + 2, y + 2, x + size - 3, y + size - 3), fill=INNER_COLORS[inner])
    return img


def describe_markers(rng: np.random.Generator, markers: list[Marker]) -> str:
    """The scene in words, for pretraining a tiny LLM as language models are pretrained on text before they see an
    image: one word per cell of a row of 4..64 cells, a marker's word where it sits ("redgreen": red around green),
    "empty" elsewhere. The same questions then need the same lookup that 64 visual tokens, one marker each, need."""
    cells = int(rng.integers(len(markers), CELLS + 1))
    words = [EMPTY_SLOT] * cells
    for slot, (outer, inner) in zip(rng.choice(cells, len(markers), replace=False), markers):
        words[int(slot)] = outer + inner
    return " ".join(words)


def random_markers(rng: np.random.Generator, max_items: int) -> list[Marker]:
    """4-5 markers (fewer under max_items) with distinct outer colours, each centre one of INNER_COLORS."""
    n = item_count(rng, MIN_MARKERS, len(COLORS), max_items)
    names, inners = list(COLORS), list(INNER_COLORS)
    outers = [names[int(k)] for k in rng.choice(len(names), n, replace=False)]
    return [(o, inners[int(rng.integers(len(inners)))]) for o in outers]


def corner_scene(rng: np.random.Generator, max_items: int) -> tuple[list[Marker], list[int], int]:
    """The `corner` scene: a marker in the top-left corner, 8, 16 or 32 px wide (CORNER_SIZES: small, medium and
    large print), and an 8-px one in each cell it leaves free with probability CORNER_DENSITY (colours drawn with
    repeats; under max_items, at most that many markers). Returns the markers and their cells, the corner one
    first, and the corner marker's size. Its 2-px ring and centre always meet in the top-left 8-px patch."""
    size = CORNER_SIZES[int(rng.integers(len(CORNER_SIZES)))]
    per_row, span = CANVAS // DETAIL_CELL, size // DETAIL_CELL
    free = [c for c in range(1, per_row ** 2) if c // per_row >= span or c % per_row >= span]
    cells = [0] + [c for c in free if rng.random() < CORNER_DENSITY]
    cells = cells[:max_items] if max_items else cells
    names, inners = list(COLORS), list(INNER_COLORS)
    return ([(names[int(rng.integers(len(names)))], inners[int(rng.integers(len(inners)))]) for _ in cells], cells,
            size)


# ----------------------------------------------------------------------------------------------------------------------
# Questions: each takes (rng, markers, i) and returns question i as (kind, question, answer), or None past the last.


def _ask_corner(rng, markers, i):
    """'what color is inside the top left marker?': a read at one fixed place, no lookup by content. A visual token
    at least as wide as the corner marker holds it alone; a wider one pools it with background and with other
    markers' centres, so the size of print a token count can read sets the error (V = 64: all three sizes;
    16: 16 and 32 px; 4: 32 px; 1: none)."""
    del rng
    return ("corner", "what color is inside the top left marker?", markers[0][1]) if i == 0 else None


def _ask_inside(rng, markers, i):
    """Question i is about marker i: 'what color is inside the red one?' (a lookup by the question's colour)."""
    del rng
    if i >= len(markers):
        return None
    outer, inner = markers[i]
    return "inside", f"what color is inside the {outer} one?", inner


def _ask_colors(rng, markers, i):
    """A single marker's two colours, asked apart (0: outside, 1: inside): what a tower pretrained on it keeps."""
    del rng
    if len(markers) != 1:
        raise ValueError("detail kind 'colors' describes one marker: set data.synthetic.max_items=1")
    outer, inner = markers[0]
    return {0: ("colors", "what color is the marker?", outer),
            1: ("colors", "what color is inside the marker?", inner)}.get(i)


# detail kind -> ask question i about the markers
DETAIL_KINDS: dict[str, Callable] = {"inside": _ask_inside, "colors": _ask_colors, "corner": _ask_corner}
# detail kind -> its scene (markers, their cells, the first marker's size), where it is not `random_markers` in
# random cells
DETAIL_SCENES: dict[str, Callable] = {"corner": corner_scene}


def parse_detail_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """'inside,colors' or a sequence -> checked detail kinds; '' = 'inside'."""
    names = tuple(k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip())
    unknown = sorted(set(names) - set(DETAIL_KINDS))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"detail_kinds must be distinct names from {sorted(DETAIL_KINDS)}, got {kinds!r}")
    return names or ("inside",)


def draw_scene(rng: np.random.Generator, options: SyntheticOptions, key: Sequence[int]) -> Scene:
    """The item's kind (one of detail_kinds), its markers drawn or told in words, and that kind's questions."""
    del key
    kinds = parse_detail_kinds(options.detail_kinds)
    kind = kinds[int(rng.integers(len(kinds)))] if len(kinds) > 1 else kinds[0]
    ask = DETAIL_KINDS[kind]
    img, description = None, ""
    if kind in DETAIL_SCENES:   # markers in fixed cells: told in words cell by cell, in reading order
        markers, cells, first_size = DETAIL_SCENES[kind](rng, options.max_items)
        if options.describe:
            words = dict(zip(cells, (outer + inner for outer, inner in markers)))
            description = " ".join(words.get(c, EMPTY_SLOT) for c in range(CELLS))
        else:
            img = draw_markers(markers, cells, first_size)
    else:
        markers = random_markers(rng, options.max_items)
        if options.describe:
            description = describe_markers(rng, markers)
        else:
            img = draw_markers(markers, rng.choice(CELLS, len(markers), replace=False))
    return Scene(img, description, lambda i: ask(rng, markers, i))
