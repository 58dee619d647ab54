"""The `reasoning` family: questions that combine several facts about a few coloured shapes, which is LLM work.

2-5 coloured shapes (5 colours x 3 shapes, each colour/shape pair at most once) in the cells of a 4x4 grid of
16-px cells. One-fact questions (how many shapes, the colour of the only circle, the shape of the only red one) come
first in learning; the others count by colour or shape, test a colour+shape conjunction, compare two counts, test a
spatial relation between two objects, or ask the colour of the object in a relation to another. Each shape fills its
cell at a fixed size and place, so on the tiny tower (8-px patches) it is always the same 2x2 patches and a 16-token
grid holds one object per token: perception is cheap. (Random sizes, offsets and background shades in 3x3 cells left
a from-scratch tower at the answer prior of the shape questions for thousands of steps.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import ImageDraw

from vlm_jax.data.synthetic.scene import CANVAS, COLORS, Scene, blank_canvas, item_count

if TYPE_CHECKING:
    from vlm_jax.data.synthetic.options import SyntheticOptions

SHAPES = ("circle", "square", "triangle")
# What each colour is worth in the `value_*` questions: a fact of this world, learnt from its questions alone.
COLOR_VALUES = {"red": 1, "green": 2, "blue": 3, "yellow": 4, "purple": 5}
MIN_OBJECTS, MAX_OBJECTS = 2, 5
GRID = 4  # objects fill cells of a GRID x GRID layout (CANVAS // GRID = 16 px), so relations are never ambiguous
# relation name -> (test on (row, col) of X against (row, col) of Y): "X is <rel> Y"
RELATIONS: dict[str, Callable[[tuple[int, int], tuple[int, int]], bool]] = {
    "left of": lambda x, y: x[1] < y[1],
    "right of": lambda x, y: x[1] > y[1],
    "above": lambda x, y: x[0] < y[0],
    "below": lambda x, y: x[0] > y[0],
}


@dataclasses.dataclass(frozen=True)
class ColoredShape:
    color: str
    shape: str
    cell: tuple[int, int]  # (row, col)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


# ----------------------------------------------------------------------------------------------------------------------
# Questions: each takes (rng, objects) and returns (question, answer), or None where the scene does not allow it.


def _count_all(rng, objs):
    return "how many shapes are there?", str(len(objs))


def _only_one(rng, objs, attr: str) -> ColoredShape | None:
    """A random object whose `attr` ('color' or 'shape') no other object shares, or None."""
    unique = [o for o in objs if sum(getattr(p, attr) == getattr(o, attr) for p in objs) == 1]
    return unique[rng.integers(len(unique))] if unique else None


def _color_of(rng, objs):
    """'what color is the <shape>?', asked of a shape that occurs once."""
    o = _only_one(rng, objs, "shape")
    return None if o is None else (f"what color is the {o.shape}?", o.color)


def _shape_of(rng, objs):
    """'what shape is the <color> one?', asked of a colour that occurs once."""
    o = _only_one(rng, objs, "color")
    return None if o is None else (f"what shape is the {o.color} one?", o.shape)


def _value_arithmetic(rng, objs, op: str, numbers: tuple[int, int] | None = None):
    """'what is the value of the circle plus 37?' (0-89) or 'times 12' (0-19), asked of a shape that occurs once:
    its colour's value (COLOR_VALUES, known only from training) plus / times the number, one or two digits.
    Perception gives the colour; the rest is knowledge and multi-digit arithmetic, the LLM's work. `numbers`
    (low, high): the range the number is drawn from instead (`value_times_big`: 20-99, three-digit answers with
    carries: arithmetic that sets an error graded by LLM size where the one-digit products are learnt by all)."""
    o = _only_one(rng, objs, "shape")
    if o is None:
        return None
    low, high = numbers or (0, 90 if op == "plus" else 20)
    k, value = int(rng.integers(low, high)), COLOR_VALUES[o.color]
    return f"what is the value of the {o.shape} {op} {k}?", str(value + k if op == "plus" else value * k)


def _count_color(rng, objs):
    color = rng.choice(list(COLORS))
    return f"how many {color} shapes are there?", str(sum(o.color == color for o in objs))


def _count_shape(rng, objs):
    shape = rng.choice(SHAPES)
    return f"how many {shape}s are there?", str(sum(o.shape == shape for o in objs))


def _has(rng, objs, attr: str):
    """'is there a red shape?' (attr 'color') or 'is there a circle?' ('shape'), yes and no equally likely (where
    the scene allows both)."""
    names, phrase = (COLORS, "is there a {} shape?") if attr == "color" else (SHAPES, "is there a {}?")
    present = sorted({getattr(o, attr) for o in objs})
    want = bool(rng.integers(2)) or len(present) == len(names)
    pool = present if want else sorted(set(names) - set(present))
    return phrase.format(pool[rng.integers(len(pool))]), "yes" if want else "no"


def _exists(rng, objs):
    present = {(o.color, o.shape) for o in objs}
    want = bool(rng.integers(2))
    pool = sorted(present) if want else sorted({(c, s) for c in COLORS for s in SHAPES} - present)
    color, shape = pool[rng.integers(len(pool))]
    return f"is there a {color} {shape}?", "yes" if want else "no"


def _compare(rng, objs, attrs=("color", "shape")):
    """'are there more A than B?' with yes and no equally likely (where the scene allows both)."""
    options: dict[bool, list[str]] = {True: [], False: []}
    for names, attr, phrase in ((list(COLORS), "color", "{} shapes"), (SHAPES, "shape", "{}s")):
        if attr not in attrs:
            continue
        counts = {n: sum(getattr(o, attr) == n for o in objs) for n in names}
        for a in names:
            for b in names:
                if a != b:
                    question = f"are there more {phrase.format(a)} than {phrase.format(b)}?"
                    options[counts[a] > counts[b]].append(question)
    answer = bool(rng.integers(2))
    if not options[answer]:
        answer = not answer
    return options[answer][rng.integers(len(options[answer]))], "yes" if answer else "no"


def _holds(rel: str, x: ColoredShape, y: ColoredShape) -> bool:
    """Whether "x is <rel> y" holds."""
    return RELATIONS[rel](x.cell, y.cell)


def _relation(rng, objs):
    if len(objs) < 2:
        return None
    facts: dict[bool, list[tuple[ColoredShape, str, ColoredShape]]] = {True: [], False: []}
    for x in objs:
        for y in objs:
            if x is not y:
                for rel in RELATIONS:
                    facts[_holds(rel, x, y)].append((x, rel, y))
    answer = bool(rng.integers(2))
    if not facts[answer]:
        answer = not answer
    x, rel, y = facts[answer][rng.integers(len(facts[answer]))]
    return f"is the {x.name} {rel} the {y.name}?", "yes" if answer else "no"


def _query_color(rng, objs):
    """'what color is the <shape> <rel> the <obj>?' asked only where exactly one object fits."""
    options = []
    for y in objs:
        for rel in RELATIONS:
            for shape in SHAPES:
                fits = [x for x in objs if x is not y and x.shape == shape and _holds(rel, x, y)]
                if len(fits) == 1:
                    options.append((shape, rel, y, fits[0].color))
    if not options:
        return None
    shape, rel, y, color = options[rng.integers(len(options))]
    return f"what color is the {shape} {rel} the {y.name}?", color


# One-fact questions (count_all, color_of, shape_of) are learnt first; the rest combine several facts.
REASONING_KINDS = {
    "count_all": _count_all,
    "color_of": _color_of,
    "shape_of": _shape_of,
    "count_color": _count_color,
    "value_plus": functools.partial(_value_arithmetic, op="plus"),
    "value_times": functools.partial(_value_arithmetic, op="times"),
    "value_times_big": functools.partial(_value_arithmetic, op="times", numbers=(20, 100)),
    "count_shape": _count_shape,
    "exists": _exists,
    "has_color": functools.partial(_has, attr="color"),
    "has_shape": functools.partial(_has, attr="shape"),
    "compare": _compare,
    "compare_color": functools.partial(_compare, attrs=("color",)),
    "relation": _relation,
    "query_color": _query_color,
}
# Opt-in kinds, left out of '' (every other kind), so configs that select '' keep drawing the items they drew.
OPT_IN_KINDS = ("value_times_big",)
DEFAULT_KINDS = tuple(k for k in REASONING_KINDS if k not in OPT_IN_KINDS)
# Kinds that fit every scene: a selection needs one of them, or some scene would have no question.
ALWAYS_APPLY = ("count_all", "count_color", "count_shape", "exists", "has_color", "has_shape", "compare",
                "compare_color")


def parse_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """'count_all,compare' or a sequence -> checked reasoning kinds; '' = all of them but the OPT_IN_KINDS."""
    names = tuple(k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip())
    if not names:
        return DEFAULT_KINDS
    unknown = sorted(set(names) - set(REASONING_KINDS))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"reasoning_kinds must be distinct names from {sorted(REASONING_KINDS)}, got {kinds!r}")
    if not set(names) & set(ALWAYS_APPLY):
        raise ValueError(f"reasoning_kinds {kinds!r} may fit no scene: include one of {ALWAYS_APPLY}")
    return names


def check_layout(grid: int, objects: int) -> None:
    """A grid x grid layout must divide the canvas and hold the scene's objects (`objects`: their cap, 0 = none)."""
    if grid not in (1, 2, 4, 8) or grid * grid < (1 if objects == 1 else MIN_OBJECTS):
        raise ValueError(f"reasoning_grid must be 2, 4 or 8 (cells per side of the 64-px canvas; 1 with "
                         f"reasoning_objects=1: one object filling it), got {grid}")


# ----------------------------------------------------------------------------------------------------------------------
# The scene.


def draw_objects(rng: np.random.Generator, max_items: int = 0, grid: int = GRID):
    """2-5 objects (at most max_items, 0 = no cap) in distinct cells of a grid x grid layout, each a distinct
    colour/shape pair filling its cell. Returns the image and the objects."""
    n = item_count(rng, MIN_OBJECTS, min(MAX_OBJECTS, grid * grid), max_items)
    cells = rng.choice(grid * grid, n, replace=False)
    pairs = rng.choice(len(COLORS) * len(SHAPES), n, replace=False)
    colors = list(COLORS)
    objs = [ColoredShape(colors[p // len(SHAPES)], SHAPES[p % len(SHAPES)], (int(c) // grid, int(c) % grid))
            for c, p in zip(cells, pairs)]
    img = blank_canvas()
    draw = ImageDraw.Draw(img)
    cell = CANVAS // grid
    for o in objs:
        r = cell / 2 - 1.5
        cx = (o.cell[1] + 0.5) * cell - 0.5
        cy = (o.cell[0] + 0.5) * cell - 0.5
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img, objs


def describe_objects(rng: np.random.Generator, objs: list[ColoredShape]) -> str:
    """A reasoning scene in words, for pretraining a tiny LLM on "text": its objects in random order, two words each
    ("red circle blue square"), the bag of facts a pooled visual token keeps."""
    return " ".join(objs[int(k)].name for k in rng.permutation(len(objs)))


def ask_question(rng: np.random.Generator, objs: list[ColoredShape], kinds: tuple[str, ...]) -> tuple[str, str, str]:
    """A question of a random kind among `kinds` that fits the scene: (kind, question, answer)."""
    for k in rng.permutation(len(kinds)):
        qa = REASONING_KINDS[kinds[k]](rng, objs)
        if qa is not None:
            return kinds[k], qa[0], qa[1]
    raise AssertionError("unreachable: count questions always apply")


def draw_scene(rng: np.random.Generator, options: SyntheticOptions, key: Sequence[int]) -> Scene:
    """The item's objects, drawn or told in words, and questions of any selected kind in any order. The words come
    from a generator of their own (`key` + [1]), so a told scene is asked the questions of the drawn one."""
    img, objs = draw_objects(rng, options.reasoning_objects or options.max_items, options.reasoning_grid)
    kinds = parse_kinds(options.reasoning_kinds)

    def ask(i: int) -> tuple[str, str, str]:
        del i   # any question may follow any other
        return ask_question(rng, objs, kinds)
    if options.describe:
        return Scene(None, describe_objects(np.random.default_rng([*key, 1]), objs), ask)
    return Scene(img, "", ask)
