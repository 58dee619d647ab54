"""The built-in synthetic benchmark: two task families drawn on the fly from seeds, nothing to download.

- `reasoning`: 2-5 coloured shapes (5 colours x 3 shapes, each colour/shape pair at most once) in the cells of a
  4x4 grid of 16-px cells. One-fact questions (how many shapes, the colour of the only circle, the shape of the only
  red one) come first in learning; the others count by colour or shape, test a colour+shape conjunction, compare two
  counts, test a spatial relation between two objects, or ask the colour of the object in a relation to another.
  Each shape fills its cell at a fixed size and place, so on the tiny tower (8-px patches) it is always the same
  2x2 patches and a 16-token grid holds one object per token: perception is cheap, and the answers need several
  facts combined, which is LLM work. (Random sizes, offsets and background shades in 3x3 cells left a
  from-scratch tower at the answer prior of the shape questions for thousands of steps.)
- `ocr`: one to four short strings of 1..ocr_length small characters (Pillow's 6x11 bitmap font, each font pixel
  drawn ocr_scale x ocr_scale), in distinct quadrants of the image, on an 8-px lattice. Questions ask what is
  written in a quadrant, its first/last character, or where a given string is written. The reasoning is trivial; at
  the default scale 2 a digit is ~10 x 14 px of ink, about one 8-px patch of the tiny tower, so reading it needs
  many visual tokens. Defaults (single digits) come from learning probes: 2-character strings stayed at chance for
  a tiny from-scratch tower within ~800 steps, single characters did not.

- `detail`: 4-5 markers, each an 8-px square of one colour with a 4-px centre of a colour from a palette of its own
  (white, black, orange, pink), in distinct cells of an 8 x 8 lattice (one marker = one patch of the tiny tower);
  outer colours are distinct. "what color is inside the red one?" needs the two colours of one marker bound
  together, which a visual token that pools several markers loses (it keeps the bag of outer colours and the bag of
  centres): 64 tokens keep every marker apart, 16 tokens (16 x 16 px) rarely mix two, 4 tokens often, 1 token
  always. The fine-detail stand-in for the paper's OCR group. Kinds (`detail_kinds`): `inside` (the default),
  `colors` (one marker's two colours asked apart: what a tower is pretrained on), `corner` (the colour inside the
  marker in the top-left corner, drawn 8, 16 or 32 px wide among other 8-px markers: small, medium and large print;
  a read at one fixed place, whose error is set by the size of print the visual tokens resolve, not by a lookup).
  `describe=True` tells the scene in words instead of drawing it (one word per marker, e.g. "redwhite"; for
  reasoning scenes two per object, "red circle"), for pretraining a tiny LLM on "text".

Answers are 1-3 tokens, scored by exact match. Item j of family f in a split is drawn from
`np.random.default_rng([seed, split, f, j])`, so train and validation come from disjoint seed streams and any item
can be redrawn alone (a grain RandomAccessDataSource). Images are drawn on a 64 x 64 canvas and resized to the
requested size.

For evaluation: `make_examples(split, family, n)` returns `Example`s (uint8 image, question, answer); their
prompts are `prompt_text(example.question)`, tokenized by `features.encode_prompt`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data.tokenize import ASSISTANT, IMAGE_PLACEHOLDER, USER

CANVAS = 64
FAMILIES = ("reasoning", "ocr", "detail")
DEFAULT_FAMILIES = ("reasoning", "ocr")   # what a source draws unless told (data.synthetic.families)
SPLITS = ("train", "validation")

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
}
# The centres of detail markers have colours of their own, so that a marker's two colours never need telling apart by
# place: a token that keeps one marker apart holds "red" and "white" and answers; one that pools several holds only
# the bags of outer and centre colours, whichever feature the tower makes of each (see the detail family).
INNER_COLORS = {
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "orange": (255, 140, 0),
    "pink": (255, 130, 200),
}
SHAPES = ("circle", "square", "triangle")
# What each colour is worth in the `value_plus` / `value_times` questions: a fact of this world, learnt from its
# questions alone.
COLOR_VALUES = {"red": 1, "green": 2, "blue": 3, "yellow": 4, "purple": 5}
# One light background. Not mid-grey: that is near the CLIP mean, so it normalises to ~0, a patch becomes
# fill x colour, and the tower's pre-LayerNorm divides the fill (the shape's cue) away. A random shade was worse still.
BACKGROUND = (235, 235, 235)
MIN_OBJECTS, MAX_OBJECTS = 2, 5
GRID = 4  # objects fill cells of a GRID x GRID layout (CANVAS // GRID = 16 px), so relations are never ambiguous
# relation name -> (test on (row, col) of X against (row, col) of Y): "X is <rel> Y"
RELATIONS: dict[str, Callable[[tuple[int, int], tuple[int, int]], bool]] = {
    "left of": lambda x, y: x[1] < y[1],
    "right of": lambda x, y: x[1] > y[1],
    "above": lambda x, y: x[0] < y[0],
    "below": lambda x, y: x[0] > y[0],
}
DEFAULT_ALPHABET = "0123456789"
CHAR_W, CHAR_H = 6, 11  # cell of Pillow's built-in bitmap font
PAPER, INK = (235, 235, 235), (20, 20, 20)  # fixed, like BACKGROUND: nuisance colours only slow a small tower
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
OCR_STEP = 8  # lattice of string positions, in canvas pixels (= the tiny tower's patch size at 64 px)
DETAIL_CELL = 8   # detail markers fill one cell of an 8-px lattice (one patch of the tiny tower)
EMPTY_SLOT = "empty"   # a described scene's empty cell; a marker is one word, e.g. "redgreen" (outer, then centre)
MIN_MARKERS = 4   # at least four: the bag of colours one pooled token keeps rarely tells the answer
# `corner` scenes: the corner marker's sizes, and the chance that a free cell holds another (8-px) marker
CORNER_SIZES = (8, 16, 32)
CORNER_DENSITY = 0.15

# Every word a synthetic question or answer uses (digits and the OCR alphabet are spelled as characters).
VOCAB_WORDS = tuple(sorted(set(
    ["how", "many", "shapes", "are", "there", "is", "a", "the", "what", "color", "shape", "one", "more", "than",
     "of", "written", "in", "character", "first", "last", "where", "yes", "no", "inside", "marker", "value", "plus",
     "times"]
    + " ".join(RELATIONS).split() + " ".join(QUADRANTS).split() + list(COLORS)
    + [s for shape in SHAPES for s in (shape, shape + "s")]
    + list(INNER_COLORS) + [EMPTY_SLOT] + [outer + inner for outer in COLORS for inner in INNER_COLORS])))


@dataclasses.dataclass(frozen=True)
class Example:
    """One synthetic example. image: uint8[S, S, 3]."""

    id: str
    family: str
    kind: str  # question type, e.g. 'count_color' or 'read'
    image: np.ndarray | None   # None: the scene is described in words (`description`) instead
    question: str
    answer: str
    more: tuple[tuple[str, str], ...] = ()   # further (question, answer) turns about the same image
    description: str = ""

    @property
    def prompt(self) -> str:
        """The first user turn: the image placeholder (or the scene in words), a newline, the question."""
        return prompt_text(self.question) if self.image is not None else f"{self.description}\n{self.question}"

    def turns(self) -> list[tuple[str, str]]:
        """The example as a chat: the user shows the image (or describes the scene) and asks, the assistant
        answers (then any follow-ups)."""
        turns = [(USER, self.prompt), (ASSISTANT, self.answer)]
        for question, answer in self.more:
            turns += [(USER, question), (ASSISTANT, answer)]
        return turns


def prompt_text(question: str) -> str:
    """The user turn of a synthetic example: the image placeholder, a newline, the question."""
    return f"{IMAGE_PLACEHOLDER}\n{question}"


# ----------------------------------------------------------------------------------------------------------------------
# reasoning family


@dataclasses.dataclass(frozen=True)
class _Obj:
    color: str
    shape: str
    cell: tuple[int, int]  # (row, col)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def _count_all(rng, objs):
    return "how many shapes are there?", str(len(objs))


def _only_one(rng, objs, attr: str) -> _Obj | None:
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


def _value_arithmetic(rng, objs, op: str):
    """'what is the value of the circle plus 37?' (0-89) or 'times 12' (0-19), asked of a shape that occurs once:
    its colour's value (COLOR_VALUES, known only from training) plus / times the number, one or two digits.
    Perception gives the colour; the rest is knowledge and multi-digit arithmetic, the LLM's work."""
    o = _only_one(rng, objs, "shape")
    if o is None:
        return None
    k, value = int(rng.integers(90 if op == "plus" else 20)), COLOR_VALUES[o.color]
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


def _holds(rel: str, x: _Obj, y: _Obj) -> bool:
    """Whether "x is <rel> y" holds."""
    return RELATIONS[rel](x.cell, y.cell)


def _relation(rng, objs):
    if len(objs) < 2:
        return None
    facts: dict[bool, list[tuple[_Obj, str, _Obj]]] = {True: [], False: []}
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
    "count_shape": _count_shape,
    "exists": _exists,
    "has_color": functools.partial(_has, attr="color"),
    "has_shape": functools.partial(_has, attr="shape"),
    "compare": _compare,
    "compare_color": functools.partial(_compare, attrs=("color",)),
    "relation": _relation,
    "query_color": _query_color,
}


def _count(rng: np.random.Generator, low: int, high: int, max_items: int) -> int:
    """How many objects/characters: uniform in [low, high], or in [1, max_items] under a cap (0 = none)."""
    if max_items:
        low, high = min(low, max_items), min(high, max_items)
    return int(rng.integers(low, high + 1))


def _draw_reasoning(rng: np.random.Generator, max_items: int = 0, grid: int = GRID
                    ) -> tuple[Image.Image, list[_Obj]]:
    n = _count(rng, MIN_OBJECTS, min(MAX_OBJECTS, grid * grid), max_items)
    cells = rng.choice(grid * grid, n, replace=False)
    pairs = rng.choice(len(COLORS) * len(SHAPES), n, replace=False)
    colors = list(COLORS)
    objs = [_Obj(colors[p // len(SHAPES)], SHAPES[p % len(SHAPES)], (int(c) // grid, int(c) % grid))
            for c, p in zip(cells, pairs)]
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
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


ALWAYS_APPLY = ("count_all", "count_color", "count_shape", "exists", "has_color", "has_shape", "compare",
                "compare_color")


def parse_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """'count_all,compare' or a sequence -> checked reasoning kinds; '' = all of them."""
    names = tuple(k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip())
    if not names:
        return tuple(REASONING_KINDS)
    unknown = sorted(set(names) - set(REASONING_KINDS))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"reasoning_kinds must be distinct names from {sorted(REASONING_KINDS)}, got {kinds!r}")
    if not set(names) & set(ALWAYS_APPLY):
        raise ValueError(f"reasoning_kinds {kinds!r} may fit no scene: include one of {ALWAYS_APPLY}")
    return names


def describe_objects(rng: np.random.Generator, objs: list[_Obj]) -> str:
    """A reasoning scene in words, for pretraining a tiny LLM on "text": its objects in random order, two words each
    ("red circle blue square"), the bag of facts a pooled visual token keeps."""
    return " ".join(objs[int(k)].name for k in rng.permutation(len(objs)))


def _reasoning_question(rng: np.random.Generator, objs: list[_Obj], kinds: tuple[str, ...]
                        ) -> tuple[str, str, str]:
    for k in rng.permutation(len(kinds)):
        qa = REASONING_KINDS[kinds[k]](rng, objs)
        if qa is not None:
            return kinds[k], qa[0], qa[1]
    raise AssertionError("unreachable: count questions always apply")


# ----------------------------------------------------------------------------------------------------------------------
# ocr family


@functools.cache
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()  # fixed bitmap font: identical pixels everywhere


def _glyphs(text: str, scale: int) -> Image.Image:
    """An 'L' mask of `text` in the bitmap font, each pixel blown up to scale x scale (crisp, no smoothing)."""
    mask = Image.new("L", (CHAR_W * len(text), CHAR_H), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=_font())
    return mask if scale == 1 else mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)


def _draw_ocr(rng: np.random.Generator, alphabet: str, length: int, scale: int, max_items: int = 0
              ) -> tuple[Image.Image, list[tuple[str, str]]]:
    """1-4 strings in distinct quadrants: images with one string give an early learning signal, fuller ones need
    the question's quadrant to be found. Returns the image and [(quadrant, string)] in random order."""
    n = _count(rng, 1, len(QUADRANTS), max_items)
    quadrants = sorted(int(q) for q in rng.choice(len(QUADRANTS), n, replace=False))
    strings: list[str] = []
    while len(strings) < n:  # lengths 1..length: single characters are the easy start
        s = "".join(rng.choice(list(alphabet), int(rng.integers(1, length + 1))))
        if s not in strings:
            strings.append(s)
    img = Image.new("RGB", (CANVAS, CANVAS), PAPER)
    half = CANVAS // 2
    for q, s in zip(quadrants, strings):
        mask = _glyphs(s, scale)
        # Strings sit on an OCR_STEP-px lattice inside their quadrant, so a character meets the tower's patch grid
        # in only a few alignments, which a from-scratch tower has fewer patterns to learn from.
        x = (q % 2) * half + 1 + OCR_STEP * int(rng.integers((half - 2 - mask.width) // OCR_STEP + 1))
        y = (q // 2) * half + 1 + OCR_STEP * int(rng.integers((half - 2 - mask.height) // OCR_STEP + 1))
        img.paste(INK, (x, y, x + mask.width, y + mask.height), mask)
    written = [(QUADRANTS[q], s) for q, s in zip(quadrants, strings)]
    return img, [written[int(k)] for k in rng.permutation(n)]


def _ocr_question(rng: np.random.Generator, written: list[tuple[str, str]], i: int) -> tuple[str, str, str] | None:
    """Question i is about string i (they are in random order), so a follow-up never gives away an earlier answer;
    None once every string was asked about."""
    if i >= len(written):
        return None
    where, text = written[i]
    kinds = ("read", "where", "char") if len(text) > 1 else ("read", "where")  # 'char' of one character = 'read'
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "read":
        return kind, f"what is written in the {where}?", text
    if kind == "char":
        first = bool(rng.integers(2))
        return kind, f"what is the {'first' if first else 'last'} character in the {where}?", text[0 if first else -1]
    return kind, f"where is {text} written?", where


# ----------------------------------------------------------------------------------------------------------------------
# detail family


def _draw_markers(markers: list[tuple[str, str]], cells, first_size: int = DETAIL_CELL) -> Image.Image:
    """Each (outer, inner) marker as an 8-px square (the first one `first_size` px) with a 2-px ring around its
    centre, from the top-left corner of its cell of the 8 x 8 lattice."""
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(img)
    per_row = CANVAS // DETAIL_CELL
    for j, (cell, (outer, inner)) in enumerate(zip(cells, markers)):
        x, y = int(cell) % per_row * DETAIL_CELL, int(cell) // per_row * DETAIL_CELL
        size = first_size if j == 0 else DETAIL_CELL
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=COLORS[outer])
        draw.rectangle((x + 2, y + 2, x + size - 3, y + size - 3), fill=INNER_COLORS[inner])
    return img


def describe_markers(rng: np.random.Generator, markers: list[tuple[str, str]]) -> str:
    """The scene in words, for pretraining a tiny LLM as language models are pretrained on text before they see an
    image: one word per cell of a row of 4..64 cells, a marker's word where it sits ("redgreen": red around green),
    "empty" elsewhere. The same questions then need the same lookup that 64 visual tokens, one marker each, need."""
    cells = int(rng.integers(len(markers), (CANVAS // DETAIL_CELL) ** 2 + 1))
    words = [EMPTY_SLOT] * cells
    for slot, (outer, inner) in zip(rng.choice(cells, len(markers), replace=False), markers):
        words[int(slot)] = outer + inner
    return " ".join(words)


def _random_markers(rng: np.random.Generator, max_items: int) -> list[tuple[str, str]]:
    """4-5 markers (fewer under max_items) with distinct outer colours, each centre one of INNER_COLORS."""
    n = _count(rng, MIN_MARKERS, len(COLORS), max_items)
    names, inners = list(COLORS), list(INNER_COLORS)
    outers = [names[int(k)] for k in rng.choice(len(names), n, replace=False)]
    return [(o, inners[int(rng.integers(len(inners)))]) for o in outers]


def _corner_scene(rng: np.random.Generator, max_items: int) -> tuple[list[tuple[str, str]], list[int], int]:
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
# detail kind -> its scene (markers, their cells, the first marker's size), where it is not `_random_markers` in
# random cells
DETAIL_SCENES: dict[str, Callable] = {"corner": _corner_scene}


def parse_detail_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """'inside,colors' or a sequence -> checked detail kinds; '' = 'inside'."""
    names = tuple(k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip())
    unknown = sorted(set(names) - set(DETAIL_KINDS))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"detail_kinds must be distinct names from {sorted(DETAIL_KINDS)}, got {kinds!r}")
    return names or ("inside",)


# ----------------------------------------------------------------------------------------------------------------------
# public API


def _check(split: str, family: str, alphabet: str, length: int, scale: int, grid: int = GRID,
           objects: int = 0) -> None:
    if grid not in (1, 2, 4, 8) or grid * grid < (1 if objects == 1 else MIN_OBJECTS):
        raise ValueError(f"reasoning_grid must be 2, 4 or 8 (cells per side of the 64-px canvas; 1 with "
                         f"reasoning_objects=1: one object filling it), got {grid}")
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    if family not in FAMILIES:
        raise ValueError(f"synthetic family must be one of {FAMILIES}, got {family!r}")
    bad = sorted(set(alphabet) - set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    if bad or len(set(alphabet)) < 2:
        raise ValueError(f"ocr_alphabet must hold >= 2 distinct digits/capitals, got {alphabet!r}")
    if sum(len(set(alphabet)) ** k for k in range(1, length + 1)) < len(QUADRANTS):
        raise ValueError(f"ocr_alphabet {alphabet!r} with ocr_length={length} cannot make {len(QUADRANTS)} distinct "
                         f"strings (one per quadrant)")
    if length < 1 or scale < 1 or CHAR_W * length * scale > CANVAS // 2 - 2 or CHAR_H * scale > CANVAS // 2 - 2:
        raise ValueError(f"ocr_length={length} characters at ocr_scale={scale} ({CHAR_W * length * scale} x "
                         f"{CHAR_H * scale} px) must fit a {CANVAS // 2} px quadrant with a margin")


def make_example(split: str, family: str, index: int, *, seed: int = 0, image_size: int = CANVAS,
                 ocr_alphabet: str = DEFAULT_ALPHABET, ocr_length: int = 1, ocr_scale: int = 2,
                 reasoning_kinds: str = "", reasoning_grid: int = GRID, max_items: int = 0,
                 questions: int = 1, detail_kinds: str = "", describe: bool = False,
                 reasoning_objects: int = 0) -> Example:
    """Item `index` of `family` in `split`: a pure function of its arguments. `questions` > 1 adds follow-up
    questions about the same image (distinct where the scene allows; for ocr and detail one per string or
    marker; the first is the same as with 1). `describe`: the scene in words instead of an image (not ocr).
    `reasoning_objects` caps the reasoning family's objects alone (0: max_items)."""
    _check(split, family, ocr_alphabet, ocr_length, ocr_scale, reasoning_grid, reasoning_objects or max_items)
    if describe and family == "ocr":
        raise ValueError("only the reasoning and detail families' scenes can be described in words, not 'ocr'")
    if questions < 1:
        raise ValueError(f"synthetic questions per image must be >= 1, got {questions}")
    rng = np.random.default_rng([seed, SPLITS.index(split), FAMILIES.index(family), index])
    if family == "reasoning":
        img, scene = _draw_reasoning(rng, reasoning_objects or max_items, reasoning_grid)
        if describe:   # its own generator: the questions stay those of the drawn scene
            told = np.random.default_rng([seed, SPLITS.index(split), FAMILIES.index(family), index, 1])
            description = describe_objects(told, scene)
            img = None
        kinds = parse_kinds(reasoning_kinds)
        ask = lambda rng, objs, i: _reasoning_question(rng, objs, kinds)  # noqa: E731  (any question, any order)
    elif family == "ocr":
        img, scene = _draw_ocr(rng, ocr_alphabet, ocr_length, ocr_scale, max_items)
        ask = _ocr_question
    else:
        kinds = parse_detail_kinds(detail_kinds)
        kind = kinds[int(rng.integers(len(kinds)))] if len(kinds) > 1 else kinds[0]
        ask = DETAIL_KINDS[kind]
        if kind in DETAIL_SCENES:   # markers in fixed cells: told in words cell by cell, in reading order
            scene, cells, first_size = DETAIL_SCENES[kind](rng, max_items)
            if describe:
                words = dict(zip(cells, (outer + inner for outer, inner in scene)))
                description = " ".join(words.get(c, EMPTY_SLOT) for c in range((CANVAS // DETAIL_CELL) ** 2))
                img = None
            else:
                img = _draw_markers(scene, cells, first_size)
        else:
            scene = _random_markers(rng, max_items)
            if describe:
                description, img = describe_markers(rng, scene), None
            else:
                img = _draw_markers(scene, rng.choice((CANVAS // DETAIL_CELL) ** 2, len(scene), replace=False))
    kind, question, answer = ask(rng, scene, 0)
    more: list[tuple[str, str]] = []
    for i in range(1, 4 * questions):   # a few redraws to avoid asking the same question twice
        if len(more) == questions - 1:
            break
        asked = ask(rng, scene, i)
        if asked is None:
            break
        _, q, a = asked
        if q != question and all(q != m for m, _ in more):
            more.append((q, a))
    if img is None:
        return Example(f"{split}-{family}-{index}", family, kind, None, question, answer, tuple(more), description)
    if image_size != CANVAS:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return Example(f"{split}-{family}-{index}", family, kind, np.asarray(img, np.uint8), question, answer,
                   tuple(more))


def make_examples(split: str, family: str, n: int, *, seed: int = 0, image_size: int = CANVAS,
                  ocr_alphabet: str = DEFAULT_ALPHABET, ocr_length: int = 1, ocr_scale: int = 2,
                  reasoning_kinds: str = "", reasoning_grid: int = GRID, max_items: int = 0,
                  detail_kinds: str = "", describe: bool = False, reasoning_objects: int = 0) -> list[Example]:
    """Items 0..n-1 of `family` in `split`: the same examples the training/eval sources draw."""
    return [make_example(split, family, j, seed=seed, image_size=image_size, ocr_alphabet=ocr_alphabet,
                         ocr_length=ocr_length, ocr_scale=ocr_scale, reasoning_kinds=reasoning_kinds,
                         reasoning_grid=reasoning_grid, max_items=max_items, detail_kinds=detail_kinds,
                         describe=describe, reasoning_objects=reasoning_objects) for j in range(n)]


def parse_families(families: str | Sequence[str]) -> tuple[str, ...]:
    """'reasoning,ocr' or a sequence -> a checked tuple of family names."""
    names = tuple(f.strip() for f in (families.split(",") if isinstance(families, str) else families) if f.strip())
    if not names or any(f not in FAMILIES for f in names) or len(set(names)) != len(names):
        raise ValueError(f"synthetic families must be distinct names from {FAMILIES}, got {families!r}")
    return names


def parse_weights(weights: str | Sequence[int], n_families: int) -> tuple[int, ...]:
    """'1,3' or a sequence -> one positive integer weight per family ('' = all 1)."""
    parts = [w for w in (weights.split(",") if isinstance(weights, str) else weights) if str(w).strip()]
    if not parts:
        return (1,) * n_families
    try:
        out = tuple(int(w) for w in parts)
    except ValueError:
        out = ()
    if len(out) != n_families or min(out) < 1:
        raise ValueError(f"synthetic family_weights must be {n_families} positive integers (one per family), "
                         f"got {weights!r}")
    return out


class SyntheticSource:
    """grain RandomAccessDataSource: families interleaved item by item in a fixed cycle where family f appears
    weights[f] times (weights 1,3: r d d d r d d d ...); the k-th appearance of f is item k of f.

    Returns {'id': str, 'image': uint8[S, S, 3], 'turns': [(role, text)]}.
    """

    def __init__(self, split: str, num_examples: int, *, families: str | Sequence[str] = DEFAULT_FAMILIES,
                 seed: int = 0,
                 image_size: int = CANVAS, ocr_alphabet: str = DEFAULT_ALPHABET, ocr_length: int = 1,
                 ocr_scale: int = 2, reasoning_kinds: str = "", reasoning_grid: int = GRID, max_items: int = 0,
                 questions: int = 1, family_weights: str | Sequence[int] = "", detail_kinds: str = "",
                 describe: bool = False, reasoning_objects: int = 0):
        self.families = parse_families(families)
        self.weights = parse_weights(family_weights, len(self.families))
        # cycle position -> (family, its rank among that family's positions in the cycle)
        self._cycle = [(f, r) for f, w in enumerate(self.weights) for r in range(w)]
        _check(split, self.families[0], ocr_alphabet, ocr_length, ocr_scale)
        if num_examples < 1:
            raise ValueError(f"synthetic num_examples must be >= 1, got {num_examples}")
        self.split, self.num_examples, self.seed, self.image_size = split, int(num_examples), seed, image_size
        self.ocr_alphabet, self.ocr_length, self.ocr_scale = ocr_alphabet, ocr_length, ocr_scale
        self.reasoning_kinds, self.reasoning_grid = ",".join(parse_kinds(reasoning_kinds)), int(reasoning_grid)
        self.questions, self.max_items, self.reasoning_objects = int(questions), int(max_items), int(reasoning_objects)
        self.detail_kinds, self.describe = ",".join(parse_detail_kinds(detail_kinds)), bool(describe)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"synthetic index {i} out of range [0, {self.num_examples})")
        f, rank = self._cycle[i % len(self._cycle)]
        index = i // len(self._cycle) * self.weights[f] + rank
        ex = make_example(self.split, self.families[f], index, seed=self.seed, image_size=self.image_size,
                          ocr_alphabet=self.ocr_alphabet, ocr_length=self.ocr_length, ocr_scale=self.ocr_scale,
                          reasoning_kinds=self.reasoning_kinds, reasoning_grid=self.reasoning_grid,
                          max_items=self.max_items, questions=self.questions, detail_kinds=self.detail_kinds,
                          reasoning_objects=self.reasoning_objects,
                          describe=self.describe)
        return {"id": ex.id, "image": ex.image, "turns": ex.turns()}

    def __repr__(self) -> str:  # grain checks this against a restored iterator state
        return (f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, families={self.families}, "
                f"seed={self.seed}, image_size={self.image_size}, ocr_alphabet={self.ocr_alphabet!r}, "
                f"ocr_length={self.ocr_length}, ocr_scale={self.ocr_scale}, reasoning_kinds={self.reasoning_kinds!r}, "
                f"reasoning_grid={self.reasoning_grid}, detail_kinds={self.detail_kinds!r}, describe={self.describe}, "
                f"max_items={self.max_items}, reasoning_objects={self.reasoning_objects}, questions={self.questions}, "
                f"weights={self.weights})")


def write_llava(out_dir: str | os.PathLike, examples: Sequence[Example], *, json_name: str = "data.json") -> str:
    """Writes examples in the LLaVA format (PNG images + a JSON list) and returns the JSON path.

    Records: {"id", "image": "images/<id>.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": answer}]}; image paths are relative to `out_dir` (the LLaVA image folder).
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for ex in examples:
        rel = os.path.join("images", f"{ex.id}.png")
        Image.fromarray(ex.image).save(os.path.join(out_dir, rel))
        records.append({"id": ex.id, "image": rel, "conversations": [
            {"from": "human", "value": prompt_text(ex.question)}, {"from": "gpt", "value": ex.answer}]})
    path = os.path.join(out_dir, json_name)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path
