"""Image files to RGB: the decoding every loader shares (ImageFolder training data, ``predict``'s inputs) and the
check that finds undecodable files when a dataset is scanned."""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16/32-bit grey is scaled (not clipped), alpha composited on white."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        # "I;16*" and "I" (how Pillow opens 16-bit PNG/TIFF/PGM) are read as 0..65535 and "F" as 0..1, so one
        # image's brightness is not renormalised; values outside that range are stretched to fit instead.
        top = 1.0 if im.mode == "F" else 65535.0
        lo, top = (0.0, top) if lo >= 0 and hi <= top else (lo, max(hi, lo + 1e-6))
        a = (a - lo) / (top - lo) * 255.0
        return Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8)).convert("RGB")
    # White, not black, behind transparency: icons/cut-outs are drawn for light backgrounds, and black would
    # invent hard edges around every object.
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Fully decode ``path`` into an upright RGB image; raises whatever Pillow raises for a bad file."""
    with Image.open(path) as im:
        im.load()  # Pillow's default LOAD_TRUNCATED_IMAGES=False makes a truncated file raise here
        # Cameras store portrait photos sideways plus an EXIF Orientation tag, which every viewer applies: the
        # model must see (and be trained on) the photo as the user who labelled it saw it.
        return to_rgb(ImageOps.exif_transpose(im))


def check_image_file(path: str, mode: str) -> Optional[str]:
    """None if ``path`` passes verification ``mode`` (full: decodes, header: opens, none: no check), else the reason."""
    if mode == "none":
        return None
    try:
        st = os.stat(path)
    except OSError as e:  # e.g. a dangling symlink
        return f"cannot stat: {e}"
    return _verify(path, st.st_size, st.st_mtime_ns, mode)


@lru_cache(maxsize=None)  # size and mtime in the key: train/holdout rebuilds reuse it, edited files are redone
def _verify(path: str, size: int, mtime_ns: int, mode: str) -> Optional[str]:
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():  # Pillow's per-file chatter would drown the summary warning
            warnings.simplefilter("ignore")
            load_rgb(path) if mode == "full" else Image.open(path).close()  # open() parses the header
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(e).__name__}: {e}"
    return None
