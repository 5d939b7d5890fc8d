"""How much JPEG damage the strict decode catches, against PIL alone, on generated galaxies.

JPEG carries no checksum: damage that still decodes to valid codes cannot be seen by any decoder.
This measures, on galaxies from ``galaxysae.synth`` (4:4:4 JPEGs, quality 90), which
share of damaged copies each decode refuses (``galaxysae.decode.decode_pixels`` with
``strict_jpeg`` on, as embed runs it, and off: PIL alone), for three kinds of damage after the
scan header: a run of 100 zeroed bytes, the last 300 bytes before the end marker zeroed, 3 random
bytes, one flipped bit. It also decodes sound
JPEGs that libjpeg warns about (fill before the end marker, an unknown JFIF revision, SOS fields
a sequential decode ignores), none of which may be refused, and times the two decodes side by
side (224 px out, rounds alternating) on the galaxies as written and as PIL's defaults save them. Ends with
``target sound_jpegs_refused: <n> (goal 0) PASS|FAIL``.

    .venv/bin/python bench/jpeg_damage.py [--images 20] [--copies 10] [--size 424]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galaxysae import synth  # noqa: E402
from galaxysae.decode import DecodeError, decode_pixels  # noqa: E402


def damage(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    lo, hi = out.index(b"\xff\xda") + 20, len(out) - 2  # the compressed data, not the end marker
    if kind == "300 zeroed tail bytes":  # an interrupted write: the end marker kept
        out[max(lo, hi - 300):hi] = bytes(hi - max(lo, hi - 300))
    elif kind == "100 zeroed bytes":
        at = int(rng.integers(lo, hi - 100))
        out[at:at + 100] = bytes(100)
    elif kind == "3 random bytes":
        for at in rng.integers(lo, hi, 3):
            out[at] = int(rng.integers(0, 256))
    else:
        out[int(rng.integers(lo, hi))] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def jfif_2(data: bytes) -> bytes:
    """JFIF revision 2.01: libjpeg warns "unknown JFIF revision number" (metadata only)."""
    out = bytearray(data)
    out[out.index(b"JFIF\x00") + 5] = 2
    return bytes(out)


def fill_before_eoi(data: bytes, ff: int = 0) -> bytes:
    """300 zero bytes between the last block and the end marker, as some encoders write (then
    ``ff`` 0xFF fill bytes, which libjpeg skips before a marker)."""
    return data[:-2] + b"\x00" * 300 + b"\xff" * ff + data[-2:]


def sos_fields_ignored(data: bytes) -> bytes:
    """Spectral selection end 0 in a sequential JPEG's SOS: libjpeg warns, then ignores it."""
    out = bytearray(data)
    sos = out.index(b"\xff\xda")
    out[sos + 4 + 2 * out[sos + 4] + 2] = 0  # Se, after Ns and the component table
    return bytes(out)


def sound_variants(data: bytes) -> dict[str, bytes]:
    """Sound JPEGs libjpeg warns about (also used by tests/test_decode.py)."""
    return {"fill before the end marker": fill_before_eoi(data),
            "unknown JFIF revision": jfif_2(data), "SOS fields ignored": sos_fields_ignored(data)}


def refused(data: bytes, strict: bool) -> bool:
    try:
        decode_pixels(data, 224, strict_jpeg=strict)
    except DecodeError:
        return True
    return False


def pil_default(images: list[bytes]) -> list[bytes]:
    """The same galaxies saved with PIL's JPEG defaults (quality 75, 4:2:0), as most writers do."""
    from PIL import Image

    out = []
    for data in images:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def ms_per_image(images: list[bytes], strict: bool) -> float:
    t0 = time.perf_counter()
    for data in images:
        decode_pixels(data, 224, strict_jpeg=strict)
    return (time.perf_counter() - t0) / len(images) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--copies", type=int, default=10, help="damaged copies per image and kind")
    p.add_argument("--size", type=int, default=424, help="galaxy image side, px")
    args = p.parse_args(argv)
    images = [synth.make_galaxy(0, "train", i, args.size, 90)[0]["image"]["bytes"]
              for i in range(args.images)]
    rng = np.random.default_rng(0)
    print(f"{args.images} generated galaxies, {args.size} px JPEG quality 90; "
          f"{args.copies} damaged copies of each per kind")
    print(f"{'damage':<22} {'copies':>6} {'strict refused':>15} {'PIL alone refused':>18}")
    for kind in ("100 zeroed bytes", "300 zeroed tail bytes", "3 random bytes", "1 flipped bit"):
        copies = [damage(d, kind, rng) for d in images for _ in range(args.copies)]
        strict = sum(refused(c, True) for c in copies)
        pil = sum(refused(c, False) for c in copies)
        print(f"{kind:<22} {len(copies):>6} {strict / len(copies):>14.1%} {pil / len(copies):>17.1%}")
    sound = [(k, v) for d in images for k, v in sound_variants(d).items()]
    bad = [k for k, v in sound if refused(v, True)]
    print(f"sound JPEGs with a libjpeg warning: {len(sound)} decoded, {len(bad)} refused"
          + (f" ({', '.join(sorted(set(bad)))})" if bad else ""))
    for label, batch in (("4:4:4 q90 (synth)", images), ("4:2:0 q75 (PIL's default)", pil_default(images))):
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(7):
            for strict in ((True, False) if r % 2 else (False, True)):
                times[strict].append(ms_per_image(batch, strict))
        strict_ms, pil_ms = (float(np.median(times[k])) for k in (True, False))
        print(f"decode {label} to 224 px: strict {strict_ms:.2f} ms/image, PIL alone "
              f"{pil_ms:.2f} ms/image, ratio PIL/strict {pil_ms / strict_ms:.2f}")
    print(f"target sound_jpegs_refused: {len(bad)} (goal 0) {'PASS' if not bad else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
