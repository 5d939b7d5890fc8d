"""Decoding galaxy images: bytes of any PIL-readable image -> RGB float32 [3, S, S] in [0, 1].

Zoobot's convention (and the original research code's): resize to ``S x S`` with bilinear
interpolation (a non-square image is stretched, as ``Resize((S, S))`` does), scale to [0, 1],
no ImageNet normalisation. Odd but valid images are converted; an image that cannot be decoded
raises :class:`DecodeError` with a reason, and :func:`decode_batch` records it as a failure.
A failed image is never replaced by zeros: its row carries the reason and a NaN placeholder that
the encoder skips and the writer drops.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

__all__ = ["DecodeError", "MAX_PIXELS", "decode_image", "decode_batch"]

# Larger than any survey cutout, small enough that a decompression bomb fails instead of
# swallowing a worker's memory.
MAX_PIXELS = 1 << 28


class DecodeError(ValueError):
    """The bytes are not a decodable image; ``str(exc)`` is the reason recorded in _failures."""


def _to_float_rgb(img, size: int) -> np.ndarray:
    """A loaded PIL image of any mode -> float32 [3, size, size] in [0, 1]."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: scale by the format's range in float, so no precision is thrown away
        # by a detour through 8 bits.
        arr = np.asarray(img.convert("F") if mode != "F" else img, dtype=np.float32)
        if mode.startswith("I;16"):
            scale = 65535.0
        elif mode == "I":
            peak = float(arr.max()) if arr.size else 0.0
            scale = 65535.0 if peak <= 65535.0 else peak
        else:
            peak = float(np.nanmax(arr)) if arr.size else 0.0
            scale = peak if peak > 1.0 else 1.0
        arr = np.nan_to_num(arr / scale, nan=0.0).clip(0.0, 1.0).astype(np.float32)
        resized = Image.fromarray(arr, mode="F").resize((size, size), Image.BILINEAR)
        grey = np.asarray(resized, dtype=np.float32).clip(0.0, 1.0)
        return np.broadcast_to(grey, (3, size, size)).copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels are sky: composite over black rather than keeping hidden colours.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba).convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)  # [S, S, 3]
    return (arr.transpose(2, 0, 1) / np.float32(255.0)).copy()


def decode_image(data: bytes | None, size: int = 224) -> np.ndarray:
    """Image bytes -> float32 [3, size, size] in [0, 1]; raises :class:`DecodeError`."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise DecodeError("no image bytes (null)")
    if len(data) == 0:
        raise DecodeError("zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DecodeError(f"image too large ({w}x{h} pixels, limit {MAX_PIXELS})")
            if img.format == "JPEG" and min(w, h) >= 4 * size:
                # Huge JPEGs: let libjpeg decode at a reduced scale (still >= 2x the target, so
                # the bilinear resize that follows sees enough pixels).
                img.draft(img.mode, (2 * size, 2 * size))
            img.load()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (no decoder recognises the bytes)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise DecodeError(f"undecodable image: {exc}") from None
    try:
        return _to_float_rgb(img, size)
    except (OSError, ValueError) as exc:
        raise DecodeError(f"cannot convert {img.mode} image: {exc}") from None


def _image_bytes(column) -> list:
    """The ``image`` column (HF Image struct<bytes, path> or plain binary) -> list of bytes|None."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def decode_batch(batch, image_size: int = 224, image_column: str = "image") -> dict:
    """Ray Data operator (batch_format="pyarrow"): decode every image of a batch.

    In: a table with ``id_str``, ``image`` and ``path`` (the source shard). Out: ``id_str``,
    ``path``, ``reason`` ("" when decoded) and ``pixels`` float32 [N, 3, S, S]; a failed row's
    pixels are NaN (never zeros) and are never encoded or written.
    """
    images = _image_bytes(batch.column(image_column))
    n = len(images)
    pixels = np.empty((n, 3, image_size, image_size), dtype=np.float32)
    reasons = []
    for i, data in enumerate(images):
        try:
            pixels[i] = decode_image(data, image_size)
            reasons.append("")
        except DecodeError as exc:
            pixels[i] = np.nan
            reasons.append(str(exc))
    return {
        "id_str": np.asarray(batch.column("id_str").to_pylist(), dtype=object),
        "path": np.asarray(batch.column("path").to_pylist(), dtype=object),
        "reason": np.asarray(reasons, dtype=object),
        "pixels": pixels,
    }
