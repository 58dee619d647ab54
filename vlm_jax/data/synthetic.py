"""The built-in synthetic benchmark: two task families drawn on the fly from seeds, nothing to download.

- `reasoning`: 2-5 coloured shapes (5 colours x 3 shapes, each colour/shape pair at most once) in the cells of a
  4x4 grid of 16-px cells. One-fact questions (how many shapes, the colour of the only circle, the shape of the only
  red one) come first in learning; the others count by colour or shape, test a colour+shape conjunction, compare two
  counts, test a spatial relation between two objects, or ask the colour of the object in a relation to another.
  Each shape fills its cell at a fixed size and place, so on the tiny tower (8-px patches) it is always the same
  2x2 patches and a 16-token grid holds one object per token: perception is cheap, and the answers need several
  facts combined, which is LLM work. (Random sizes, offsets and background shades in 3x3 cells left a
  from-scratch tower at the answer prior of the shape questions for thousands of steps.)
- `ocr`: fine print. 2-5 characters of the 6x11 bitmap font (digits by default), each in its own ink colour, in
  distinct slots of an 8 x 4 lattice of 8 x 16-px slots (one character covers one column of two patches of the tiny
  tower). Questions: what is written in a colour, or in which colour a character is written. Reading is trivial for
  the LLM; the detail is not: a visual token that pools a region holding two characters loses which colour goes
  with which character. 64 tokens keep every character apart, 16 tokens (16 x 16 px) mix a slot with its neighbour,
  4 tokens a quadrant, 1 token everything: accuracy must fall as V falls, as OCR does in the paper. (Position-named
  questions, "what is written in row 2 column 3", were not learnt in a CPU-sized budget; colour is found by
  content, which attention does first. One string per image quadrant was read as well from 4 tokens as from 64.)

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
FAMILIES = ("reasoning", "ocr")
SPLITS = ("train", "validation")

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
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
INKS = {"red": (200, 30, 30), "green": (20, 140, 40), "blue": (30, 60, 220), "purple": (130, 40, 180),
        "black": (20, 20, 20)}   # OCR ink colours: dark enough on PAPER
SLOT_W, SLOT_H = 8, 16   # OCR lattice: CANVAS // SLOT_W columns x CANVAS // SLOT_H rows of slots, one character each
MIN_CHARS, MAX_CHARS = 2, len(INKS)

# Every word a synthetic question or answer uses (digits and the OCR alphabet are spelled as characters).
VOCAB_WORDS = tuple(sorted(set(
    ["how", "many", "shapes", "are", "there", "is", "a", "the", "what", "color", "shape", "one", "more", "than",
     "of", "written", "in", "character", "first", "last", "yes", "no"]
    + " ".join(RELATIONS).split() + list(COLORS) + list(INKS)
    + [s for shape in SHAPES for s in (shape, shape + "s")])))


@dataclasses.dataclass(frozen=True)
class Example:
    """One synthetic example. image: uint8[S, S, 3]."""

    id: str
    family: str
    kind: str  # question type, e.g. 'count_color' or 'read'
    image: np.ndarray
    question: str
    answer: str
    more: tuple[tuple[str, str], ...] = ()   # further (question, answer) turns about the same image

    def turns(self) -> list[tuple[str, str]]:
        """The example as a chat: the user shows the image and asks, the assistant answers (then any follow-ups)."""
        turns = [(USER, prompt_text(self.question)), (ASSISTANT, self.answer)]
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


def _count_color(rng, objs):
    color = rng.choice(list(COLORS))
    return f"how many {color} shapes are there?", str(sum(o.color == color for o in objs))


def _count_shape(rng, objs):
    shape = rng.choice(SHAPES)
    return f"how many {shape}s are there?", str(sum(o.shape == shape for o in objs))


def _exists(rng, objs):
    present = {(o.color, o.shape) for o in objs}
    want = bool(rng.integers(2))
    pool = sorted(present) if want else sorted({(c, s) for c in COLORS for s in SHAPES} - present)
    color, shape = pool[rng.integers(len(pool))]
    return f"is there a {color} {shape}?", "yes" if want else "no"


def _compare(rng, objs):
    """'are there more A than B?' with yes and no equally likely (where the scene allows both)."""
    options: dict[bool, list[str]] = {True: [], False: []}
    for names, attr, phrase in ((list(COLORS), "color", "{} shapes"), (SHAPES, "shape", "{}s")):
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
    "count_shape": _count_shape,
    "exists": _exists,
    "compare": _compare,
    "relation": _relation,
    "query_color": _query_color,
}


def _count(rng: np.random.Generator, low: int, high: int, max_items: int) -> int:
    """How many objects/characters: uniform in [low, high], or in [1, max_items] under a cap (0 = none)."""
    if max_items:
        low, high = min(low, max_items), min(high, max_items)
    return int(rng.integers(low, high + 1))


def _draw_reasoning(rng: np.random.Generator, max_items: int = 0) -> tuple[Image.Image, list[_Obj]]:
    n = _count(rng, MIN_OBJECTS, MAX_OBJECTS, max_items)
    cells = rng.choice(GRID * GRID, n, replace=False)
    pairs = rng.choice(len(COLORS) * len(SHAPES), n, replace=False)
    colors = list(COLORS)
    objs = [_Obj(colors[p // len(SHAPES)], SHAPES[p % len(SHAPES)], (int(c) // GRID, int(c) % GRID))
            for c, p in zip(cells, pairs)]
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = CANVAS // GRID
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


ALWAYS_APPLY = ("count_all", "count_color", "count_shape", "exists", "compare", "relation")


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


def _glyph(char: str) -> Image.Image:
    """An 'L' mask (CHAR_W x CHAR_H) of one character in the bitmap font (crisp, no smoothing)."""
    mask = Image.new("L", (CHAR_W, CHAR_H), 0)
    ImageDraw.Draw(mask).text((0, 0), char, fill=255, font=_font())
    return mask


def _draw_ocr(rng: np.random.Generator, alphabet: str, max_items: int = 0
              ) -> tuple[Image.Image, list[tuple[str, str]]]:
    """2-5 distinct characters in distinct inks and slots; returns the image and [(ink, character)] in random
    order."""
    n = _count(rng, MIN_CHARS, MAX_CHARS, max_items)
    chars = [str(c) for c in rng.choice(list(alphabet), n, replace=False)]
    inks = [list(INKS)[int(k)] for k in rng.choice(len(INKS), n, replace=False)]
    cols = CANVAS // SLOT_W
    slots = rng.choice(cols * (CANVAS // SLOT_H), n, replace=False)
    img = Image.new("RGB", (CANVAS, CANVAS), PAPER)
    for slot, ch, ink in zip(slots, chars, inks):
        x = int(slot) % cols * SLOT_W + (SLOT_W - CHAR_W) // 2
        y = int(slot) // cols * SLOT_H + (SLOT_H - CHAR_H) // 2
        img.paste(INKS[ink], (x, y, x + CHAR_W, y + CHAR_H), _glyph(ch))
    return img, list(zip(inks, chars))


def _ocr_question(rng: np.random.Generator, written: list[tuple[str, str]], i: int) -> tuple[str, str, str] | None:
    """Question i is about character i (they are in random order), so a follow-up never gives away an earlier
    answer; None once every character was asked about."""
    if i >= len(written):
        return None
    ink, char = written[i]
    if rng.integers(2):
        return "read", f"what is written in {ink}?", char
    return "ink", f"what color is {char} written in?", ink


# ----------------------------------------------------------------------------------------------------------------------
# public API


def _check(split: str, family: str, alphabet: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    if family not in FAMILIES:
        raise ValueError(f"synthetic family must be one of {FAMILIES}, got {family!r}")
    bad = sorted(set(alphabet) - set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    if bad or len(set(alphabet)) < MAX_CHARS:
        raise ValueError(f"ocr_alphabet must hold >= {MAX_CHARS} distinct digits/capitals (one per ink), "
                         f"got {alphabet!r}")


def make_example(split: str, family: str, index: int, *, seed: int = 0, image_size: int = CANVAS,
                 ocr_alphabet: str = DEFAULT_ALPHABET, reasoning_kinds: str = "", max_items: int = 0,
                 questions: int = 1) -> Example:
    """Item `index` of `family` in `split`: a pure function of its arguments. `questions` > 1 adds follow-up
    questions about the same image (distinct where the scene allows, one per character for ocr; the first is the
    same as with 1)."""
    _check(split, family, ocr_alphabet)
    if questions < 1:
        raise ValueError(f"synthetic questions per image must be >= 1, got {questions}")
    rng = np.random.default_rng([seed, SPLITS.index(split), FAMILIES.index(family), index])
    if family == "reasoning":
        img, scene = _draw_reasoning(rng, max_items)
        kinds = parse_kinds(reasoning_kinds)
        ask = lambda rng, objs, i: _reasoning_question(rng, objs, kinds)  # noqa: E731  (any question, any order)
    else:
        img, scene = _draw_ocr(rng, "".join(sorted(set(ocr_alphabet))), max_items)
        ask = _ocr_question
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
    if image_size != CANVAS:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return Example(f"{split}-{family}-{index}", family, kind, np.asarray(img, np.uint8), question, answer,
                   tuple(more))


def make_examples(split: str, family: str, n: int, *, seed: int = 0, image_size: int = CANVAS,
                  ocr_alphabet: str = DEFAULT_ALPHABET, reasoning_kinds: str = "", max_items: int = 0
                  ) -> list[Example]:
    """Items 0..n-1 of `family` in `split`: the same examples the training/eval sources draw."""
    return [make_example(split, family, j, seed=seed, image_size=image_size, ocr_alphabet=ocr_alphabet,
                         reasoning_kinds=reasoning_kinds, max_items=max_items) for j in range(n)]


def parse_families(families: str | Sequence[str]) -> tuple[str, ...]:
    """'reasoning,ocr' or a sequence -> a checked tuple of family names."""
    names = tuple(f.strip() for f in (families.split(",") if isinstance(families, str) else families) if f.strip())
    if not names or any(f not in FAMILIES for f in names) or len(set(names)) != len(names):
        raise ValueError(f"synthetic families must be distinct names from {FAMILIES}, got {families!r}")
    return names


class SyntheticSource:
    """grain RandomAccessDataSource: item i is item i // F of family families[i % F] (F families interleaved).

    Returns {'id': str, 'image': uint8[S, S, 3], 'turns': [(role, text)]}.
    """

    def __init__(self, split: str, num_examples: int, *, families: str | Sequence[str] = FAMILIES, seed: int = 0,
                 image_size: int = CANVAS, ocr_alphabet: str = DEFAULT_ALPHABET, reasoning_kinds: str = "",
                 max_items: int = 0, questions: int = 1):
        self.families = parse_families(families)
        _check(split, self.families[0], ocr_alphabet)
        if num_examples < 1:
            raise ValueError(f"synthetic num_examples must be >= 1, got {num_examples}")
        self.split, self.num_examples, self.seed, self.image_size = split, int(num_examples), seed, image_size
        self.ocr_alphabet, self.reasoning_kinds = ocr_alphabet, ",".join(parse_kinds(reasoning_kinds))
        self.questions, self.max_items = int(questions), int(max_items)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"synthetic index {i} out of range [0, {self.num_examples})")
        f = len(self.families)
        ex = make_example(self.split, self.families[i % f], i // f, seed=self.seed, image_size=self.image_size,
                          ocr_alphabet=self.ocr_alphabet, reasoning_kinds=self.reasoning_kinds,
                          max_items=self.max_items, questions=self.questions)
        return {"id": ex.id, "image": ex.image, "turns": ex.turns()}

    def __repr__(self) -> str:  # grain checks this against a restored iterator state
        return (f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, families={self.families}, "
                f"seed={self.seed}, image_size={self.image_size}, ocr_alphabet={self.ocr_alphabet!r}, "
                f"reasoning_kinds={self.reasoning_kinds!r}, max_items={self.max_items}, questions={self.questions})")


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
