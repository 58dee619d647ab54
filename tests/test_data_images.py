"""Image decoding and CLIP preprocessing against hand-computed values."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import errors, images

# Written out here rather than imported, so the test checks the module's constants too.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def test_pad_mode_centres_a_tall_image_on_the_llava_mean_colour_then_normalises():
    tall = np.zeros((4, 2, 3), np.uint8)
    tall[..., 0] = 255  # pure red, 2 wide x 4 high
    out = images.normalize(images.preprocess(png_bytes(tall), 4, "pad"))
    red = (np.array([1.0, 0.0, 0.0]) - MEAN) / STD
    pad = (np.array([122, 116, 104]) / 255 - MEAN) / STD  # int(mean * 255), as LLaVA's expand2square
    want = np.empty((4, 4, 3))
    want[:, [0, 3]] = pad
    want[:, [1, 2]] = red
    np.testing.assert_allclose(out, want, atol=1e-5)
    assert out.dtype == np.float32


def test_crop_mode_keeps_the_central_square():
    wide = np.zeros((4, 6, 3), np.uint8)
    wide[:] = (np.arange(6, dtype=np.uint8) * 40)[None, :, None]  # column c has value 40c
    out = images.preprocess(wide, 4, "crop")
    np.testing.assert_array_equal(out[0, :, 0], [40, 80, 120, 160])  # columns 1..4 of 0..5


def test_resize_follows_image_size_and_preserves_a_flat_colour():
    flat = np.full((10, 7, 3), (10, 200, 30), np.uint8)
    out = images.preprocess(flat, 5, "crop")
    assert out.shape == (5, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to([10, 200, 30], (5, 5, 3)))


def test_grey_and_rgba_inputs_become_rgb():
    grey = np.full((3, 3), 77, np.uint8)
    np.testing.assert_array_equal(images.preprocess(png_bytes(grey), 3), np.full((3, 3, 3), 77))
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 90, 255
    np.testing.assert_array_equal(images.preprocess(png_bytes(rgba), 3)[..., 1], np.full((3, 3), 90))


def test_jpeg_decoding_matches_pillow(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(arr).save(path, quality=90)
    np.testing.assert_array_equal(images.preprocess(str(path), 30), np.asarray(Image.open(path).convert("RGB")))


def test_missing_corrupt_and_truncated_images_raise_bad_record(tmp_path):
    with pytest.raises(errors.BadRecord) as e:
        images.load_image(str(tmp_path / "nope.jpg"))
    assert e.value.reason == errors.MISSING_IMAGE
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:200])
    for name in ("junk.jpg", "cut.jpg"):
        with pytest.raises(errors.BadRecord) as e:
            images.load_image(str(tmp_path / name))
        assert e.value.reason == errors.CORRUPT_IMAGE and name in e.value.detail


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with no pixel data: a few dozen bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_bad_input_not_a_crash(tmp_path):
    # 20000 x 20000 = 4e8 pixels (1.2 GB decoded), over twice Pillow's default MAX_IMAGE_PIXELS (89,478,485): the
    # size at which Pillow refuses to decode.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(20000, 20000))
    assert path.stat().st_size < 100
    for source in (str(path), path.read_bytes()):
        with pytest.raises(errors.BadRecord) as e:
            images.load_image(source)
        assert e.value.reason == errors.IMAGE_TOO_LARGE and "400000000 pixels" in e.value.detail


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        images.preprocess(np.zeros((2, 3, 3), np.uint8), 2, "stretch")
    with pytest.raises(ValueError, match="uint8"):
        images.normalize(np.zeros((2, 2, 3), np.float32))
