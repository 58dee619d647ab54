"""The `ocr` family: reading small printed strings, which needs many visual tokens while the reasoning is trivial.

One to four short strings of 1..ocr_length small characters (Pillow's 6x11 bitmap font, each font pixel drawn
ocr_scale x ocr_scale), in distinct quadrants of the image, on an 8-px lattice. Questions ask what is written in a
quadrant, its first/last character, or where a given string is written. At the default scale 2 a digit is ~10 x 14
px of ink, about one 8-px patch of the tiny tower. Defaults (single digits) come from learning probes: 2-character
strings stayed at chance for a tiny from-scratch tower within ~800 steps, single characters did not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data.synthetic.scene import CANVAS, Scene, blank_canvas, item_count

if TYPE_CHECKING:
    from vlm_jax.data.synthetic.options import SyntheticOptions

DEFAULT_ALPHABET = "0123456789"
ALLOWED_CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAR_W, CHAR_H = 6, 11  # cell of Pillow's built-in bitmap font
PAPER, INK = (235, 235, 235), (20, 20, 20)  # fixed, like BACKGROUND: nuisance colours only slow a small tower
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
OCR_STEP = 8  # lattice of string positions, in canvas pixels (= the tiny tower's patch size at 64 px)


def check_strings(alphabet: str, length: int, scale: int) -> None:
    """Each quadrant needs a string of its own, and the longest string must fit its quadrant."""
    bad = sorted(set(alphabet) - set(ALLOWED_CHARACTERS))
    if bad or len(set(alphabet)) < 2:
        raise ValueError(f"ocr_alphabet must hold >= 2 distinct digits/capitals, got {alphabet!r}")
    if sum(len(set(alphabet)) ** k for k in range(1, length + 1)) < len(QUADRANTS):
        raise ValueError(f"ocr_alphabet {alphabet!r} with ocr_length={length} cannot make {len(QUADRANTS)} distinct "
                         f"strings (one per quadrant)")
    if length < 1 or scale < 1 or CHAR_W * length * scale > CANVAS // 2 - 2 or CHAR_H * scale > CANVAS // 2 - 2:
        raise ValueError(f"ocr_length={length} characters at ocr_scale={scale} ({CHAR_W * length * scale} x "
                         f"{CHAR_H * scale} px) must fit a {CANVAS // 2} px quadrant with a margin")


@functools.cache
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()  # fixed bitmap font: identical pixels everywhere


def _glyphs(text: str, scale: int) -> Image.Image:
    """An 'L' mask of `text` in the bitmap font, each pixel blown up to scale x scale (crisp, no smoothing)."""
    mask = Image.new("L", (CHAR_W * len(text), CHAR_H), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=_font())
    return mask if scale == 1 else mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)


def draw_strings(rng: np.random.Generator, alphabet: str, length: int, scale: int, max_items: int = 0
                 ) -> tuple[Image.Image, list[tuple[str, str]]]:
    """1-4 strings in distinct quadrants: images with one string give an early learning signal, fuller ones need
    the question's quadrant to be found. Returns the image and [(quadrant, string)] in random order."""
    n = item_count(rng, 1, len(QUADRANTS), max_items)
    quadrants = sorted(int(q) for q in rng.choice(len(QUADRANTS), n, replace=False))
    strings: list[str] = []
    while len(strings) < n:  # lengths 1..length: single characters are the easy start
        s = "".join(rng.choice(list(alphabet), int(rng.integers(1, length + 1))))
        if s not in strings:
            strings.append(s)
    img = blank_canvas(PAPER)
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


def ask_question(rng: np.random.Generator, written: list[tuple[str, str]], i: int) -> tuple[str, str, str] | None:
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


def draw_scene(rng: np.random.Generator, options: SyntheticOptions, key: Sequence[int]) -> Scene:
    """The item's strings, always drawn: a scene of characters told in words would leave nothing to read."""
    del key
    img, written = draw_strings(rng, options.ocr_alphabet, options.ocr_length, options.ocr_scale, options.max_items)
    return Scene(img, "", lambda i: ask_question(rng, written, i))
