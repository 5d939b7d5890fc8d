"""The decode operator: odd but valid images are converted, undecodable ones are failures."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from bench.jpeg_damage import fill_before_eoi, jfif_2, sos_fields_ignored
from galaxysae import decode
from galaxysae.decode import DecodeError, decode_batch, decode_image, decode_pixels

S = 32


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def galaxy(w=64, h=64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    r2 = ((x - w / 2) / (w / 4)) ** 2 + ((y - h / 2) / (h / 4)) ** 2
    return np.exp(-r2)  # [h, w] in [0, 1]


def rgb(w=64, h=64) -> Image.Image:
    g = galaxy(w, h)
    return Image.fromarray((np.stack([g, 0.8 * g, 0.6 * g], -1) * 255).astype(np.uint8), "RGB")


def check(arr: np.ndarray) -> None:
    assert arr.shape == (3, S, S) and arr.dtype == np.float32
    assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0
    assert arr.max() > 0.5, "a bright galaxy must stay bright after conversion"


def test_rgb_jpeg_matches_pil_resize_over_255():
    data = encode(rgb(), "JPEG", quality=95)
    arr = decode_image(data, S)
    check(arr)
    # Zoobot's convention: bilinear resize, /255, no ImageNet normalisation
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((S, S), Image.BILINEAR),
                     dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(arr, ref)


def pil_reference(data: bytes, size: int = S) -> np.ndarray:
    """What PIL alone makes of the bytes (the decode before the strict one): uint8 [3, S, S]."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


JPEGS = {
    "rgb_420": lambda: encode(rgb(), "JPEG", quality=90),
    "rgb_444": lambda: encode(rgb(), "JPEG", quality=90, subsampling=0),
    "rgb_422": lambda: encode(rgb(), "JPEG", quality=90, subsampling=1),
    "restart_markers": lambda: encode(rgb(), "JPEG", restart_marker_rows=1),
    "grey": lambda: encode(rgb().convert("L"), "JPEG"),
    "progressive": lambda: encode(rgb(), "JPEG", progressive=True),
    "non_square": lambda: encode(rgb(96, 40), "JPEG", quality=75),
    "noisy": lambda: encode(Image.fromarray(np.random.default_rng(0).integers(
        0, 256, (80, 72, 3), dtype=np.uint8)), "JPEG", quality=95),
}


@pytest.mark.parametrize("kind", sorted(JPEGS))
def test_strict_jpeg_decode_gives_pils_pixels(kind, monkeypatch):
    data = JPEGS[kind]()
    calls = []
    strict = decode.simplejpeg.decode_jpeg
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg",
                        lambda *a, **kw: calls.append(kw) or strict(*a, **kw))
    np.testing.assert_array_equal(decode_pixels(data, S), pil_reference(data))
    assert calls == [{"colorspace": "RGB", "strict": True}]  # one strict decode, full scale


def mpo() -> bytes:
    buf = io.BytesIO()
    rgb(256, 256).save(buf, "MPO", save_all=True, append_images=[rgb(64, 64)])
    return buf.getvalue()


def garble(data: bytes, start: int, n: int) -> bytes:
    """Zero ``n`` bytes from ``start`` bytes after the start of the scan (SOS marker)."""
    out = bytearray(data)
    sos = out.index(b"\xff\xda")
    out[sos + start: sos + start + n] = b"\x00" * n
    return bytes(out)


# JPEGs whose compressed data is damaged, and that PIL decodes without an error. Decoded at
# GARBLED_SIZE px the 256 px ones take the strict decode, the 1200 px one PIL's reduced-scale one.
GARBLED_SIZE = 96
GARBLED = {
    "colour": lambda: garble(encode(rgb(256, 256), "JPEG"), 400, 300),
    "grey": lambda: garble(encode(rgb(256, 256).convert("L"), "JPEG"), 300, 200),
    # the two that PIL decodes itself, after a strict check of the compressed data
    "cmyk": lambda: garble(encode(rgb(256, 256).convert("CMYK"), "JPEG"), 400, 300),
    "huge": lambda: garble(encode(rgb(1200, 1000), "JPEG"), 3000, 2000),
    "mpo": lambda: garble(mpo(), 400, 300),  # PIL names the format MPO: a JPEG all the same
    # an unknown JFIF revision ends a strict decode at the header: the check skips the metadata
    "jfif_2": lambda: jfif_2(garble(encode(rgb(256, 256), "JPEG"), 400, 300)),
    # a zeroed tail (an interrupted write): the blocks decode from zeros, and the zeros left over
    # before the end marker look like an encoder's fill, but the run began inside the blocks
    "zeroed_tail": lambda: zeroed_tail(synth_galaxy(256), 300),
    # warnings that end a strict decode before the data: the check reads a copy without them
    "sos_fields": lambda: sos_fields_ignored(garble(encode(rgb(256, 256), "JPEG"), 400, 300)),
    "jfif_2_after_tables_and_fill": lambda: jfif_2_late(garble(encode(rgb(256, 256), "JPEG"),
                                                               400, 300)),
}


def synth_galaxy(size: int) -> bytes:
    """A generated galaxy as synth writes it (4:4:4, quality 90: zero bits decode as blocks)."""
    from galaxysae import synth

    return synth.make_galaxy(0, "train", 0, size, 90)[0]["image"]["bytes"]


def zeroed_tail(data: bytes, n: int) -> bytes:
    return data[:-2 - n] + b"\x00" * n + data[-2:]


@pytest.mark.parametrize("kind", sorted(GARBLED))
def test_jpeg_with_corrupt_compressed_data_is_a_failure_not_a_grey_smear(kind):
    data = GARBLED[kind]()
    pil_reference(data)  # PIL alone decodes it (libjpeg only warns): the case this guards
    with pytest.raises(DecodeError) as err:
        decode_pixels(data, GARBLED_SIZE)
    assert "corrupt JPEG data" in str(err.value)


def test_without_strict_jpeg_or_simplejpeg_damaged_jpegs_decode_as_pil_does(monkeypatch):
    data, size = GARBLED["colour"](), GARBLED_SIZE
    reference = pil_reference(data, size)
    np.testing.assert_array_equal(decode_pixels(data, size, strict_jpeg=False), reference)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"id_str": ["a"], "image": pa.array([{"bytes": data, "path": None}], image_type),
                      "path": ["shard.parquet"]})
    assert list(decode_batch(table, image_size=size)["reason"])[0].startswith("undecodable")
    lenient = decode_batch(table, image_size=size, strict_jpeg=False)
    assert list(lenient["reason"]) == [""]
    np.testing.assert_array_equal(lenient["pixels"][0], reference)
    monkeypatch.setattr(decode, "simplejpeg", None)
    np.testing.assert_array_equal(decode_pixels(data, size), reference)


def jfif_2_late(data: bytes) -> bytes:
    """The JFIF segment, at revision 2.01, moved after the quantisation tables, with two 0xFF
    fill bytes before the next marker."""
    app0 = 2 + int.from_bytes(data[4:6], "big") + 2  # SOI, then APP0 (marker + length)
    dqt = 2 + int.from_bytes(data[app0 + 2:app0 + 4], "big") + app0
    return jfif_2(data[:2] + data[app0:dqt] + data[2:app0] + b"\xff\xff" + data[dqt:])


def bad_icc(data: bytes) -> bytes:
    """An ICC profile chunk numbered 0: libjpeg warns "Corrupt JPEG data: bad ICC marker"."""
    out = bytearray(data)
    out[out.index(b"ICC_PROFILE\x00") + 12] = 0
    return bytes(out)


SOUND = {  # libjpeg warns about these, but their pixels are sound: they decode, as PIL does
    "jfif_2": lambda: jfif_2(encode(rgb(), "JPEG")),
    "fill_before_eoi": lambda: fill_before_eoi(encode(rgb(), "JPEG")),
    "zero_then_ff_fill_before_eoi": lambda: fill_before_eoi(encode(rgb(), "JPEG"), ff=40),
    "bad_icc": lambda: bad_icc(encode(rgb(), "JPEG", icc_profile=b"profile" * 20)),
    "sos_fields": lambda: sos_fields_ignored(encode(rgb(), "JPEG")),
}


@pytest.mark.parametrize("kind", sorted(SOUND))
def test_a_jpeg_that_draws_a_warning_about_sound_data_still_decodes(kind):
    data = SOUND[kind]()
    with pytest.raises(ValueError):  # the strict decoder alone refuses it
        decode.simplejpeg.decode_jpeg(data, strict=True)
    np.testing.assert_array_equal(decode_pixels(data, S), pil_reference(data))


ODD = {
    "greyscale": lambda: encode(rgb().convert("L"), "PNG"),
    "rgba": lambda: encode(rgb().convert("RGBA"), "PNG"),
    "palette": lambda: encode(rgb().convert("P"), "PNG"),
    "palette_transparent": lambda: encode(rgb().convert("P"), "PNG", transparency=0),
    "cmyk_jpeg": lambda: encode(rgb().convert("CMYK"), "JPEG"),
    "one_bit": lambda: encode(rgb().convert("1"), "PNG"),
    "sixteen_bit": lambda: encode(Image.fromarray((galaxy() * 65535).astype(np.uint16)), "PNG"),
    "float_tiff": lambda: encode(Image.fromarray(galaxy().astype(np.float32)), "TIFF"),
    "non_square": lambda: encode(rgb(96, 40), "JPEG"),
    "huge": lambda: encode(rgb(4000, 3000), "JPEG", quality=70),
    "gif": lambda: encode(rgb(), "GIF"),
    "webp": lambda: encode(rgb(), "WEBP"),
}


@pytest.mark.parametrize("kind", sorted(ODD))
def test_odd_but_valid_images_are_converted(kind):
    check(decode_image(ODD[kind](), S))


def test_grey_and_sixteen_bit_become_equal_channels_with_full_range():
    grey = decode_image(ODD["greyscale"](), S)
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    deep = decode_image(ODD["sixteen_bit"](), S)
    assert np.array_equal(deep[0], deep[2])
    # 16-bit scaled by 65535 (not clipped at 255): the same picture as its 8-bit version
    eight = decode_image(encode(Image.fromarray((galaxy() * 255).astype(np.uint8)), "PNG"), S)
    assert np.abs(deep - eight).max() < 0.01


def test_transparent_pixels_become_black_sky():
    img = rgb().convert("RGBA")
    img.putalpha(0)
    arr = decode_image(encode(img, "PNG"), S)
    assert arr.max() == 0.0  # fully transparent -> sky (a real image, legitimately dark)


def truncated() -> bytes:
    data = encode(rgb(256, 256), "JPEG")
    return data[: len(data) // 3]


BAD = {
    "truncated": (truncated, "truncated"),
    "zero_bytes": (lambda: b"", "zero bytes"),
    "not_an_image": (lambda: b"id,ra,dec\n1,150.1,2.2\n", "not an image"),
    "null": (lambda: None, "null"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_undecodable_images_raise_with_a_reason(kind):
    make, word = BAD[kind]
    with pytest.raises(DecodeError) as err:
        decode_image(make(), S)
    assert word in str(err.value)


def test_decode_batch_records_failures_and_never_zero_fills():
    good = encode(rgb(), "JPEG")
    images = [good, b"", truncated(), encode(rgb().convert("L"), "PNG")]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "id_str": ["a", "b", "c", "d"],
        "image": pa.array([{"bytes": b, "path": None} for b in images], image_type),
        "path": ["shard.parquet"] * 4,
    })
    out = decode_batch(table, image_size=S)
    assert list(out["id_str"]) == ["a", "b", "c", "d"]
    assert out["pixels"].shape == (4, 3, S, S)
    reasons = list(out["reason"])
    assert reasons[0] == "" and reasons[3] == ""
    assert reasons[1] == "zero bytes" and "truncated" in reasons[2]
    assert np.isnan(out["pixels"][1]).all() and np.isnan(out["pixels"][2]).all()
    assert np.isfinite(out["pixels"][[0, 3]]).all()


def test_the_damage_bench_runs_and_strict_refuses_more_than_pil(capsys):
    from bench import jpeg_damage

    assert jpeg_damage.main(["--images", "2", "--copies", "3", "--size", "128"]) == 0
    out = capsys.readouterr().out
    kinds = "100 zeroed bytes|300 zeroed tail bytes|3 random bytes|1 flipped bit"
    rows = dict(re.findall(rf"^({kinds})\s+6\s+(.*)$", out, re.M))
    assert len(rows) == 4, out
    strict, pil = (float(v) for v in re.findall(r"([0-9.]+)%", rows["100 zeroed bytes"]))
    assert strict > pil, out
    assert "target sound_jpegs_refused: 0 (goal 0) PASS" in out, out
