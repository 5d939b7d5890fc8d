"""Decoding galaxy images: bytes of any PIL-readable image -> RGB float32 [3, S, S] in [0, 1].

Zoobot's convention (and the original research code's): resize to ``S x S`` with bilinear
interpolation (a non-square image is stretched, as ``Resize((S, S))`` does), scale to [0, 1],
no ImageNet normalisation. Odd but valid images are converted; an image that cannot be decoded
raises :class:`DecodeError` with a reason, and :func:`decode_batch` records it as a failure.
A failed image is never replaced by zeros: its row carries the reason and a NaN placeholder that
the encoder skips and the writer drops.

JPEGs (and MPO, a JPEG with more frames) are decoded by libjpeg-turbo in strict mode
(``simplejpeg``): where PIL decodes through corrupt compressed data with a warning on stderr and
fills what it lost with grey, a strict decode makes the image a failure. Its pixels are identical
to PIL's with the pinned versions (tested). PIL decodes huge JPEGs (at reduced scale), CMYK ones
and those the strict decode declines for a reason other than damage, after a strict check of their
compressed data where TurboJPEG reads their layout. ``strict_jpeg=False`` (or no simplejpeg
installed, as on a bare GPU box running bench/gpu.sh) is PIL alone.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np

try:
    import simplejpeg
except ImportError:  # requirements.txt pins it; only a bare benchmark box goes without
    simplejpeg = None

__all__ = ["DecodeError", "JPEG_FORMATS", "MAX_PIXELS", "check_jpeg", "decode_image",
           "decode_pixels", "decode_batch", "to_float"]

# Larger than any survey cutout, small enough that a decompression bomb fails instead of
# swallowing a worker's memory.
MAX_PIXELS = 1 << 28


class DecodeError(ValueError):
    """The bytes are not a decodable image; ``str(exc)`` is the reason recorded in _failures."""


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3, S, S] (0-255) or float32 in [0, 1] -> float32 in [0, 1]."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255.0)
    return pixels


def _to_rgb(img, size: int) -> np.ndarray:
    """A loaded PIL image of any mode -> uint8 [3, size, size] (8-bit sources: exact, since
    PIL resizes them in 8 bits) or float32 [3, size, size] in [0, 1] (high bit depth)."""
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
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # [3, S, S]


# libjpeg's warnings that the compressed data is damaged (jerror.h, JWRN_*); stray bytes between
# header segments count too (they are how damaged tables show). Its other warnings concern
# metadata (an unknown JFIF revision or Adobe transform, a bad ICC profile) or fields that a
# sequential decode ignores ("Invalid SOS parameters"): no verdict, the check below decides.
_CORRUPT = re.compile(r"Corrupt JPEG data|Premature end of JPEG file|Inconsistent progression")
_METADATA_ONLY = "bad ICC marker"
_BEFORE_EOI = re.compile(r"(\d+) extraneous bytes before marker 0xd9")
_SOF_SEQUENTIAL, _SOS, _EOI = (0xC0, 0xC1), 0xDA, b"\xff\xd9"
# Bytes libjpeg-turbo's Huffman decoder reads past the last block: fill before the end marker
# leaves 0-8 of them read (measured over 400 generated JPEGs), with a margin for a stuffed byte.
_READ_AHEAD = 12
JPEG_FORMATS = ("JPEG", "MPO")  # PIL's names; an MPO's first frame is a whole JPEG


def _header_segments(data: bytes):
    """(marker, offset, end) of each segment after SOI, up to and including the first SOS; stops
    early at bytes that are not a marker."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        yield marker, i, end
        if marker == _SOS:
            return
        i = end


def _data_only(data: bytes) -> bytes:
    """The JPEG as a check of its compressed data needs it: without the APPn and COM segments
    before the first scan (JFIF, EXIF, ICC, Adobe) and, in a sequential JPEG, with that scan's
    spectral fields at the values a sequential decode assumes. Else a warning about those would
    end the strict check before it reached the data. Unchanged when the header does not parse."""
    out, sequential = [data[:2]], False
    for marker, at, end in _header_segments(data):
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            continue
        sequential = sequential or marker in _SOF_SEQUENTIAL
        segment = bytearray(data[at:end])
        if marker == _SOS:
            if sequential and len(segment) >= 8:
                segment[-3:] = b"\x00\x3f\x00"  # Ss = 0, Se = 63, Ah = Al = 0
            return b"".join(out) + bytes(segment) + data[end:]
        out.append(bytes(segment))
    return data


def _padding_before_eoi(data: bytes, msg: str) -> bool:
    """Whether libjpeg's "N extraneous bytes before marker 0xd9" are zero fill that an encoder
    wrote after the last block, rather than data the decoder lost track of.

    The decoder reads a few bytes ahead (``_READ_AHEAD``), so an encoder's fill run starts at
    most that far before the N; a run that starts further back was decoded as blocks (a zeroed
    tail: damage). 0xFF fill before a marker draws no warning, and is skipped here too.
    """
    found = _BEFORE_EOI.search(msg)
    sos = next((at for marker, at, _ in _header_segments(data) if marker == _SOS), -1)
    if not found or sos < 0:
        return False
    n, end = int(found.group(1)), data.find(_EOI, sos)
    while end > sos and data[end - 1] == 0xFF:
        end -= 1
    if n < 1 or end - n <= sos or data[end - n:end] != bytes(n):
        return False
    start = end - n
    while start > sos and data[start - 1] == 0:
        start -= 1
    return end - n - start <= _READ_AHEAD


def _strict_jpeg(data: bytes, colorspace: str, check_only: bool = False) -> np.ndarray | None:
    """Decode JPEG bytes with libjpeg-turbo, stopping at its first warning: uint8 [H, W, C].

    ``check_only``: the smallest scale libjpeg offers (1/8), pixels dropped; it still reads every
    byte of the compressed data. Raises :class:`DecodeError` when libjpeg finds the data corrupt
    or truncated; None when it declines for another reason (PIL then decodes) or simplejpeg is not
    installed.
    """
    if simplejpeg is None:
        return None
    try:
        if check_only:
            simplejpeg.decode_jpeg(data, colorspace=colorspace, min_height=1, min_width=1,
                                   strict=True)
            return None
        return simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
    except ValueError as exc:
        msg = str(exc)
        if not _CORRUPT.search(msg) or _METADATA_ONLY in msg or _padding_before_eoi(data, msg):
            return None
        what = "truncated JPEG" if msg.startswith("Premature end") else "corrupt JPEG data"
        raise DecodeError(f"undecodable image: {what} (libjpeg: {msg})") from None


def check_jpeg(data: bytes, mode: str) -> None:
    """Raise :class:`DecodeError` when libjpeg finds the compressed data of these JPEG bytes
    (``mode``: PIL's, from the headers) corrupt or truncated; for callers that decode with PIL."""
    _strict_jpeg(_data_only(data), "CMYK" if mode == "CMYK" else "GRAY", check_only=True)


def _jpeg(img, data: bytes, reduced: bool):
    """A JPEG that PIL has opened (headers read) -> the image to convert, decoded strictly.
    ``reduced``: PIL is set to decode it at a reduced scale (``draft``)."""
    from PIL import Image

    if not reduced and img.mode in ("RGB", "L"):
        pixels = _strict_jpeg(data, "RGB")  # a grey JPEG's channels come out equal, as PIL's do
        if pixels is not None:
            return Image.fromarray(pixels)
    # PIL decodes huge and CMYK JPEGs, and those the strict decode declined (a warning about
    # metadata or SOS fields, fill before the end marker, a layout TurboJPEG does not read): their
    # data is checked first, where TurboJPEG reads the layout
    check_jpeg(data, img.mode)
    return img


def warn_if_lenient(log, strict_jpeg: bool) -> None:
    """Log, for a job about to decode, that JPEG damage will not be caught (no simplejpeg)."""
    if strict_jpeg and simplejpeg is None:
        log.warning("simplejpeg is not installed: JPEGs are decoded by PIL alone, which decodes "
                    "damaged compressed data (grey blocks) instead of refusing it "
                    "(requirements.txt pins simplejpeg)")


def decode_image(data: bytes | None, size: int = 224, strict_jpeg: bool = True) -> np.ndarray:
    """Image bytes -> float32 [3, size, size] in [0, 1]; raises :class:`DecodeError`."""
    return to_float(decode_pixels(data, size, strict_jpeg))


def decode_pixels(data: bytes | None, size: int = 224, strict_jpeg: bool = True) -> np.ndarray:
    """Image bytes -> uint8 [3, size, size] (8-bit images) or float32 in [0, 1] (deeper ones).

    ``strict_jpeg=False``: JPEGs as PIL alone decodes them, damaged compressed data included."""
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
            jpeg = img.format in JPEG_FORMATS
            huge = jpeg and min(w, h) >= 4 * size
            if huge:
                # Huge JPEGs: let libjpeg decode at a reduced scale (still >= 2x the target, so
                # the bilinear resize that follows sees enough pixels).
                img.draft(img.mode, (2 * size, 2 * size))
            if jpeg and strict_jpeg:
                img = _jpeg(img, data, reduced=huge)
            img.load()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (no decoder recognises the bytes)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise DecodeError(f"undecodable image: {exc}") from None
    try:
        return _to_rgb(img, size)
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


def decode_batch(batch, image_size: int = 224, image_column: str = "image",
                 strict_jpeg: bool = True) -> dict:
    """Ray Data operator (batch_format="pyarrow"): decode every image of a batch.

    In: a table with ``id_str``, ``image`` and ``path`` (the source shard). Out: ``id_str``,
    ``path``, ``reason`` ("" when decoded) and ``pixels`` [N, 3, S, S]: uint8 (0-255) when every
    image of the batch is 8-bit and decoded, which is 4x less object-store (and host-to-GPU)
    traffic and exactly what the float path would give once divided by 255 in the encoder;
    otherwise float32 in [0, 1] with a failed row's pixels NaN (never zeros). Failed rows are
    never encoded or written.
    """
    from galaxysae import cli

    cli.setup_worker()
    images = _image_bytes(batch.column(image_column))
    decoded, reasons = [], []
    for data in images:
        try:
            decoded.append(decode_pixels(data, image_size, strict_jpeg))
            reasons.append("")
        except DecodeError as exc:
            decoded.append(None)
            reasons.append(str(exc))
    n = len(images)
    compact = all(d is not None and d.dtype == np.uint8 for d in decoded)
    pixels = np.empty((n, 3, image_size, image_size), dtype=np.uint8 if compact else np.float32)
    for i, d in enumerate(decoded):
        pixels[i] = d if compact else (np.nan if d is None else to_float(d))
    return {
        "id_str": np.asarray(batch.column("id_str").to_pylist(), dtype=object),
        "path": np.asarray(batch.column("path").to_pylist(), dtype=object),
        "reason": np.asarray(reasons, dtype=object),
        "pixels": pixels,
    }
