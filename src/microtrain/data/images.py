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


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode an image file to uint8 [3, size, size] (RGB, centre crop). Raises ImageDecodeError."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(center_crop_resize(im, size), dtype=np.uint8).transpose(2, 0, 1).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"{path}: cannot decode image ({e})") from None


def to_int8(pixels: np.ndarray) -> np.ndarray:
    """Model input encoding: clamp(round(pixel - 128), -128, 127) as int8."""
    return np.clip(np.asarray(pixels, dtype=np.int16) - 128, -128, 127).astype(np.int8)
