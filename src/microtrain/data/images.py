"""Image decoding and the models' input encoding (RGB 0..255 -> int8 pixel - 128)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from microtrain.errors import MicrotrainError


class ImageDecodeError(MicrotrainError):
    pass


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """The central square of the image, resized to size x size (bilinear)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit integer images (16-bit PNGs open as I;16 or I) are scaled to 0..255 by their
    depth, not clipped at 255 as Image.convert does; float images are scaled from 0..1."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0
        elif im.mode == "I" and a.max(initial=0) > 65535:
            a = a / 16843009.0  # 32-bit: 2^32 - 1 maps to 255
        else:
            a = a / 257.0  # 16-bit: 65535 maps to 255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode an image file to uint8 [3, size, size] (RGB, centre crop). Raises ImageDecodeError (also for an image
    larger than PIL's decompression-bomb limit)."""
    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            return np.asarray(center_crop_resize(im, size), dtype=np.uint8).transpose(2, 0, 1).copy()
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{path}: refused: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"{path}: cannot decode image ({e})") from None


def to_int8(pixels: np.ndarray) -> np.ndarray:
    """Model input encoding: clamp(round(pixel - 128), -128, 127) as int8."""
    return np.clip(np.asarray(pixels, dtype=np.int16) - 128, -128, 127).astype(np.int8)
