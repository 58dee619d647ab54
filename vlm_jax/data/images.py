"""Image decoding and CLIP preprocessing.

Per record: decode with Pillow, convert to RGB, make square (pad with the CLIP mean colour, as LLaVA's
`image_aspect_ratio='pad'`, or centre-crop), resize to the tower's S x S with bicubic filtering (uint8), then
`normalize` to float32 with the CLIP mean/std.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_jax import files
from vlm_jax.data import errors

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# LLaVA pads with the mean colour truncated to uint8: (122, 116, 104).
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)
ASPECT_RATIOS = ("pad", "crop")

ImageSource = str | os.PathLike | bytes | np.ndarray | Image.Image


def path_inside(image_dir: str, name: str) -> str:
    """`image_dir/name`, or BadRecord(bad_path) when `name` is absolute, a URL, or climbs out of `image_dir` (by
    '..' or, for a local folder, through a symlink): a record must never make us open files elsewhere."""
    norm = files.inner_path(name)
    if norm is None:
        raise errors.BadRecord(errors.BAD_PATH, f"{name!r} is not a path inside the image folder {image_dir!r}")
    path = os.path.join(image_dir, norm)
    if "://" not in image_dir:
        root = os.path.realpath(image_dir or ".")
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise errors.BadRecord(errors.BAD_PATH, f"{name!r} leads out of the image folder {image_dir!r}")
    return path


def _name(source) -> str:
    return "<bytes>" if isinstance(source, bytes) else os.fspath(source)


def load_image(source: ImageSource) -> Image.Image:
    """A fully decoded RGB image from a path, encoded bytes, a uint8[H, W, 3|4|1] array or a PIL image.

    Raises BadRecord(missing_image) for a path that does not exist, BadRecord(corrupt_image) for anything Pillow
    cannot decode completely (truncated files included), BadRecord(image_too_large) for more pixels than Pillow
    agrees to decode (a decompression bomb: a small file that would fill memory).
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or min(source.shape[:2]) == 0:
            raise errors.BadRecord(errors.CORRUPT_IMAGE, f"image array must be non-empty uint8[H, W(, C)], "
                                   f"got {source.dtype}{list(source.shape)}")
        img = Image.fromarray(source.squeeze(-1) if source.ndim == 3 and source.shape[-1] == 1 else source)
    else:
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise errors.BadRecord(errors.MISSING_IMAGE, f"no file {os.fspath(source)!r}")
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()  # decode now: a truncated file fails here, not later
        except Image.DecompressionBombError as e:
            raise errors.BadRecord(errors.IMAGE_TOO_LARGE, f"{_name(source)}: {e}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise errors.BadRecord(errors.CORRUPT_IMAGE, f"{_name(source)}: {e}") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def to_square(img: Image.Image, aspect_ratio: str) -> Image.Image:
    """'pad': centre the image on a square of PAD_COLOR (LLaVA's expand2square); 'crop': keep the central square."""
    w, h = img.size
    if w == h:
        return img
    if aspect_ratio == "pad":
        side = max(w, h)
        square = Image.new("RGB", (side, side), PAD_COLOR)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        return square
    if aspect_ratio == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return img.crop((left, top, left + side, top + side))
    raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")


def preprocess(source: ImageSource, image_size: int, aspect_ratio: str = "pad") -> np.ndarray:
    """uint8[S, S, 3]: decoded, squared, bicubic-resized to S = image_size. Raises BadRecord for bad images."""
    img = to_square(load_image(source), aspect_ratio)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(img, np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """float32[..., 3] = (uint8 / 255 - CLIP_MEAN) / CLIP_STD."""
    if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
        raise ValueError(f"normalize expects uint8[..., 3], got {pixels.dtype}{list(pixels.shape)}")
    return (pixels.astype(np.float32) * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD


def blank(image_size: int) -> np.ndarray:
    """uint8[S, S, 3] of PAD_COLOR: the pixels of a text-only example (never read: its slots are out of range)."""
    return np.broadcast_to(np.asarray(PAD_COLOR, np.uint8), (image_size, image_size, 3)).copy()
