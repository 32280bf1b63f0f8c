"""What the worker reads from an upload it accepts (gpu_consumer.codec): the pixels a viewer
shows, for a photo and for a mask alike."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from gpu_consumer.codec import (
    MAX_PREVIEW_PROFILE_BYTES,
    MAX_PROFILE_BYTES,
    PNG_SIGNATURE,
    BadInput,
    decode,
    decode_mask,
    decode_upright,
    encode_png,
    encode_preview,
)


def _saved(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _grey16_png(values: np.ndarray, clear: int | None = None) -> bytes:
    """A 16-bit grey PNG of ``values`` (uint16, [H, W]), written by hand: exactly these samples,
    and the grey ``clear`` transparent (a tRNS chunk), if given."""
    h, w = values.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    trns = _chunk(b"tRNS", struct.pack(">H", clear)) if clear is not None else b""
    return (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)) + trns
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), low=st.booleans())
def test_a_16_bit_grey_mask_is_scaled_to_8_bits_as_a_photo_is_not_clipped(seed: int, low: bool):
    """A 16-bit grey mask was read with PIL's conversion, which clips: every sample above 255 of
    65,535 (0.4 %) read as white, so a near-black background was all concept and the edit took
    the whole photo. Its greys are now what the same file decoded as a photo shows."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 1024 if low else 65536, (12, 16)).astype(np.uint16)
    data = _grey16_png(values)
    mask = decode_mask(data, (12, 16))[0, 0].numpy()
    assert np.array_equal(mask, (values // 257).astype(np.float32) / 255.0)
    assert np.array_equal(mask * 255.0, decode(data)[..., 0].numpy().astype(np.float32))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_16_bit_grey_photos_transparent_grey_is_read_on_white(seed: int):
    """A 16-bit grey PNG's tRNS names one 16-bit grey as transparent: a viewer shows white there
    (it was read as its stored grey). Only that exact grey: one a step away is shown as it is,
    though both are the same grey at 8 bits."""
    rng = np.random.default_rng(seed)
    clear = int(rng.integers(1, 65535))
    values = rng.choice(np.array([clear, clear - 1, clear + 1, 0, 65535], dtype=np.uint16), (10, 14))
    seen = decode(_grey16_png(values, clear))[..., 0].numpy()
    want = np.where(values == clear, 255, values // 257)
    assert np.array_equal(seen, want)
    assert np.array_equal(decode(_grey16_png(values))[..., 0].numpy(), values // 257)  # without tRNS, as stored


def _low_grey_png(values: np.ndarray, depth: int, clear: int) -> bytes:
    """A ``depth``-bit grey PNG (1, 2 or 4) of ``values`` ([H, W], each below 2**depth), packed by
    hand, the grey ``clear`` transparent (tRNS, in the file's own bit depth)."""
    per = 8 // depth
    padded = np.zeros((values.shape[0], -(-values.shape[1] // per) * per), dtype=np.uint8)
    padded[:, :values.shape[1]] = values
    shifts = np.array([8 - depth * (i + 1) for i in range(per)], dtype=np.uint8)
    packed = (padded.reshape(values.shape[0], -1, per) << shifts).sum(axis=2, dtype=np.uint8)
    rows = b"".join(b"\0" + row.tobytes() for row in packed)
    h, w = values.shape
    return (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0))
            + _chunk(b"tRNS", struct.pack(">H", clear)) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_low_bit_grey_photos_transparent_grey_is_read_on_white(depth: int):
    """A 2- or 4-bit grey PNG (what PNG optimisers make of a cut-out of few greys) names its
    transparent grey in its own bit depth, and PIL gives its pixels at 8 bits: the two were
    compared as they are, so only a transparent black was found, and a transparent mid grey came
    out as that grey, not as the white page a viewer shows. Every grey of the depth is tried."""
    top = (1 << depth) - 1
    values = np.random.default_rng(depth).integers(0, top + 1, (10, 19)).astype(np.uint8)
    values[0, :top + 1] = np.arange(top + 1)  # every grey present
    for clear in range(top + 1):
        seen = decode(_low_grey_png(values, depth, clear))[..., 0].numpy()
        want = np.where(values == clear, 255, values.astype(np.int64) * 255 // top)
        assert np.array_equal(seen, want), clear


@pytest.mark.parametrize("clear", [(0, 0, 255), (0, 0, 0), (0x12FF, 0, 0)])
def test_a_16_bit_rgb_photos_transparent_colour_is_not_read_against_its_8_bit_pixels(clear):
    """PIL gives a 16-bit RGB PNG's pixels at 8 bits and compares its tRNS colour, 16-bit values,
    with them, each cut to its low byte: a tRNS of (0, 0, 255), a near black, turned every pure
    blue pixel (0, 0, 65535) white, one of (0x12FF, 0, 0), a dark red, every pure red, and one of
    black every near black. As the README says, the colour is not read."""
    values = np.zeros((8, 12, 3), dtype=np.uint16)
    values[:, :4, 2] = 65535  # pure blue
    values[:, 4:8] = 200  # a near black: 0 at 8 bits
    values[:, 8:, 0] = 65535  # pure red
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    trns = _chunk(b"tRNS", struct.pack(">HHH", *clear))
    data = (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", 12, 8, 16, 2, 0, 0, 0)) + trns
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))
    assert np.array_equal(decode(data).numpy(), (values >> 8).astype(np.uint8))


def test_a_near_black_16_bit_mask_is_no_concept_and_a_white_one_all_of_it():
    background = np.full((16, 16), 300, dtype=np.uint16)  # 0.5 % grey: black to any eye
    background[4:8, 4:8] = 65535
    mask = decode_mask(_grey16_png(background), (16, 16))[0, 0].numpy()
    assert mask[4:8, 4:8].min() == 1.0
    assert int((mask > 0.5).sum()) == 16  # before: 256, the whole photo


def _stray_bytes_before_the_scan(mode: str, progressive: bool) -> tuple[bytes, bytes]:
    """A JPEG, and the same file with two bytes between its tables and its first scan: libjpeg
    warns ("extraneous bytes before marker") and reads on; so do PIL and every viewer."""
    y, x = np.mgrid[0:24, 0:40]
    pixels = np.stack([x * 6, y * 10, (x + y) * 3], axis=2).astype(np.uint8)
    clean = _saved(Image.fromarray(pixels).convert(mode), "JPEG", quality=95, progressive=progressive)
    first_scan = clean.index(b"\xff\xda")
    return clean, clean[:first_scan] + b"\x00\x17" + clean[first_scan:]


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_with_stray_bytes_between_its_markers_is_read_as_its_clean_self(mode: str, progressive: bool):
    """kornia-rs refuses what libjpeg only warns about: an RGB or grey JPEG with a stray byte
    between its segments failed as "corrupt image data", though the scan count walks past such
    bytes on purpose, the README accepts up to 64 KB of them, and a CMYK one (read through PIL)
    decoded."""
    clean, stray = _stray_bytes_before_the_scan(mode, progressive)
    assert np.array_equal(decode(stray).numpy(), decode(clean).numpy())
    assert np.array_equal(decode_mask(stray, (24, 40)).numpy(), decode_mask(clean, (24, 40)).numpy())


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_jpeg_is_still_refused_by_every_decoder(cut: float):
    clean, _ = _stray_bytes_before_the_scan("RGB", False)
    with pytest.raises(BadInput, match=r"not a readable image|corrupt image data"):
        decode(clean[:int(len(clean) * cut)])


def _with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    """A PNG of ``pixels`` as stored, its EXIF saying ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _saved(Image.fromarray(pixels), "PNG", exif=exif)


def _as_seen(data: bytes) -> np.ndarray:
    """What a viewer shows of ``data``: PIL's exif_transpose."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img))


@pytest.mark.parametrize("orientation", range(2, 9))
def test_a_mask_with_an_exif_orientation_of_its_own_is_read_as_a_viewer_shows_it(orientation: int):
    """A mask was read as stored, its own EXIF orientation ignored: one painted over a copy of the
    photo in an editor that keeps the photo's metadata (and so its orientation) missed the photo
    the user sees. With orientations 2, 3 and 4 (an upside-down phone) it lined up with the mirror
    image of the photo, and a protect mask protected the wrong pixels."""
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    drawn = np.where(rng.random((12, 20)) > 0.5, 255, 0).astype(np.uint8)  # on the stored pixels
    photo_data, mask_data = _with_orientation(stored, orientation), _with_orientation(drawn, orientation)
    photo, found, _ = decode_upright(photo_data)
    assert np.array_equal(photo.numpy(), _as_seen(photo_data))  # the photo as seen
    mask = decode_mask(mask_data, (photo.shape[0], photo.shape[1]), found)[0, 0].numpy()
    assert np.array_equal(mask * 255, _as_seen(mask_data))  # and the mask as seen, over it
    seen = _as_seen(mask_data)  # and over a photo without EXIF, drawn as the user sees it
    assert np.array_equal(decode_mask(mask_data, (seen.shape[0], seen.shape[1]))[0, 0].numpy() * 255, seen)


def _srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _swapped_icc() -> bytes:
    """sRGB's profile with its red and blue colorants swapped: a wide-gamut profile (Display P3,
    Adobe RGB) in miniature, whose effect no rounding hides (a stored red is shown blue)."""
    icc = bytearray(_srgb_icc())
    count = int.from_bytes(icc[128:132], "big")
    entries = {bytes(icc[132 + 12 * i:136 + 12 * i]): 136 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    icc[red:red + 8], icc[blue:blue + 8] = icc[blue:blue + 8], icc[red:red + 8]
    return bytes(icc)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_photos_colour_profile_is_carried_and_not_applied(fmt: str):
    """Its stored values are edited as they are: building a colour transform from a crafted
    profile took minutes (an 82 KB PNG, 114 s), and a wide-gamut one made a decode 11 times
    slower, so no profile is applied. The profile comes along, as its bytes, for the output."""
    stored = np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    options: dict[str, Any] = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    options |= {"lossless": True} if fmt == "WEBP" else {}
    plain = decode_upright(_saved(Image.fromarray(stored), fmt, **options))
    tagged = decode_upright(_saved(Image.fromarray(stored), fmt, icc_profile=_swapped_icc(), **options))
    assert np.array_equal(tagged.pixels.numpy(), plain.pixels.numpy())
    assert (plain.profile, tagged.profile) == (None, _swapped_icc())


def _edited_header(icc: bytes, at: int, value: bytes) -> bytes:
    return icc[:at] + value + icc[at + len(value):]


def _padded(icc: bytes, size: int) -> bytes:
    """``icc`` made ``size`` bytes long by zeros after its tags, its header saying so."""
    return size.to_bytes(4, "big") + icc[4:] + b"\0" * (size - len(icc))


def _first_tag_at(icc: bytes, offset: int) -> bytes:
    return icc[:136] + offset.to_bytes(4, "big") + icc[140:]


REFUSED_PROFILES: dict[str, Callable[[bytes], bytes]] = {
    "grey": lambda icc: _edited_header(icc, 16, b"GRAY"),
    "cmyk": lambda icc: _edited_header(icc, 16, b"CMYK"),
    "abstract": lambda icc: _edited_header(icc, 12, b"abst"),
    "truncated": lambda icc: icc[:-4],
    "not a profile": lambda icc: _edited_header(icc, 36, b"xxxx"),
    "too large": lambda icc: _padded(icc, MAX_PROFILE_BYTES + 4),
    # what libpng refuses (and so every reader of the output that uses it): png_icc_check_*
    "length not a multiple of 4": lambda icc: _padded(icc, len(icc) + 2),
    "header only": lambda icc: _padded(icc[:128], 128),
    "tag table past the end": lambda icc: _edited_header(icc, 128, (0x7FFFFFFF).to_bytes(4, "big")),
    "a tag past the end": lambda icc: _first_tag_at(icc, len(icc)),
    "unknown connection space": lambda icc: _edited_header(icc, 20, b"ZZZZ"),
    "unknown rendering intent": lambda icc: _edited_header(icc, 64, (0xFFFF).to_bytes(4, "big")),
    "version 5": lambda icc: _edited_header(icc, 8, b"\x05"),
    # found by mutation testing: each bound's first value past it
    "longer than its header says": lambda icc: icc + b"\0\0\0\0",
    "rendering intent 4": lambda icc: _edited_header(icc, 64, (4).to_bytes(4, "big")),
    "a tag a byte past the end": lambda icc: _first_tag_at(icc, len(icc) - int.from_bytes(icc[140:144], "big") + 1),
    "tag table cut in its last entry": lambda icc: (140).to_bytes(4, "big") + icc[4:128] + (1).to_bytes(4, "big")
    + b"\0" * 8,
}


@pytest.mark.parametrize("why", sorted(REFUSED_PROFILES))
def test_a_profile_that_does_not_describe_an_rgb_output_is_not_carried(why: str):
    """The output is RGB: a grey or CMYK profile (a grey or CMYK JPEG's), an abstract one, a cut
    one, one over MAX_PROFILE_BYTES (copied into every output) or one libpng would drop is not
    carried, and the output shows as sRGB, as a photo without one does."""
    icc = _srgb_icc()
    stored = np.random.default_rng(6).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    photo = decode_upright(_saved(Image.fromarray(stored), "PNG", icc_profile=REFUSED_PROFILES[why](icc)))
    assert photo.profile is None and np.array_equal(photo.pixels.numpy(), stored)
    largest = _padded(icc, MAX_PROFILE_BYTES)
    assert decode_upright(_saved(Image.fromarray(stored), "PNG", icc_profile=largest)).profile == largest


def test_the_output_png_and_preview_carry_the_profile_their_pixels_are_in():
    """What a viewer reads back: the same pixels, and the photo's profile (iCCP in the PNG, APP2
    in the JPEG preview); none for a photo without one, nor for a grey mask."""
    image = np.random.default_rng(7).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    icc = _swapped_icc()
    for profile in (icc, None):
        with Image.open(io.BytesIO(encode_png(torch.from_numpy(image), profile=profile))) as png:
            assert png.info.get("icc_profile") == profile and np.array_equal(np.asarray(png), image)
        with Image.open(io.BytesIO(encode_preview(torch.from_numpy(image), profile=profile))) as preview:
            assert preview.info.get("icc_profile") == profile and preview.size == (60, 40)
    large = _padded(_srgb_icc(), MAX_PREVIEW_PROFILE_BYTES + 4)  # over the preview's bound (below): the output's
    with Image.open(io.BytesIO(encode_png(torch.from_numpy(image), profile=large))) as png:
        assert png.info.get("icc_profile") == large
    grey = torch.from_numpy(image[..., 0].copy())
    with Image.open(io.BytesIO(encode_png(grey, profile=icc))) as mask:
        assert "icc_profile" not in mask.info and np.array_equal(np.asarray(mask), image[..., 0])


def _on_white(data: bytes) -> np.ndarray:
    """What a viewer shows of ``data`` on a white page: its pixels composited over white."""
    with Image.open(io.BytesIO(data)) as img:
        rgba = img.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))


def _cut_out() -> np.ndarray:
    """A product cut out of its background (RGBA): the colours under its clear pixels are what
    the editor left there, a keying green here, which no viewer shows."""
    pixels = np.zeros((16, 24, 4), dtype=np.uint8)
    pixels[...] = (0, 255, 0, 0)  # clear, keyed green underneath
    pixels[4:12, 6:18] = (180, 60, 40, 255)  # the product, opaque
    pixels[4:12, 5] = (180, 60, 40, 128)  # its soft edge
    return pixels


def _paletted(transparent: int) -> Image.Image:
    indices = np.ones((16, 24), dtype=np.uint8)
    indices[:, :8] = transparent
    img = Image.fromarray(indices, "P")
    img.putpalette([0, 255, 0, 180, 60, 40] + [0] * 762)
    return img


@pytest.mark.parametrize("what", ["RGBA PNG", "RGBA WebP", "grey and alpha PNG", "palette PNG", "GIF"])
def test_a_photos_transparent_pixels_are_read_on_white_not_as_the_colours_under_them(what: str):
    """Transparency was dropped: a cut-out's clear background was edited, and came out, as the
    colours stored under it (black, or an editor's keying green) that the user never saw."""
    upload = {
        "RGBA PNG": lambda: _saved(Image.fromarray(_cut_out()), "PNG"),
        "RGBA WebP": lambda: _saved(Image.fromarray(_cut_out()), "WEBP", lossless=True, exact=True),
        "grey and alpha PNG": lambda: _saved(Image.fromarray(_cut_out()).convert("LA"), "PNG"),
        "palette PNG": lambda: _saved(_paletted(0), "PNG", transparency=0),  # index 0 clear
        "GIF": lambda: _saved(_paletted(0), "GIF", transparency=0),
    }[what]()
    seen = _on_white(upload)
    assert seen[0, 0].tolist() == [255, 255, 255]  # the oracle: clear is the page
    assert np.array_equal(decode(upload).numpy(), seen), what


def test_an_opaque_photo_with_an_alpha_channel_is_read_as_stored():
    stored = np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    opaque = np.dstack([stored, np.full((16, 24), 255, dtype=np.uint8)])
    assert np.array_equal(decode(_saved(Image.fromarray(opaque), "PNG")).numpy(), stored)


def _exif(order: str, kind: int, values: bytes, count: int) -> bytes:
    """A TIFF header and one IFD of a single entry, the orientation (0x0112) of type ``kind``
    and ``count`` values, stored after the IFD (or in the entry when they fit in 4 bytes)."""
    ifd_end = 8 + 2 + 12 + 4
    inline = len(values) <= 4
    field = values.ljust(4, b"\0") if inline else struct.pack(order + "I", ifd_end)
    entry = struct.pack(order + "HHI", 0x0112, kind, count) + field
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", 8)
    return head + struct.pack(order + "H", 1) + entry + b"\0\0\0\0" + (b"" if inline else values)


def _png_with_exif(exif: bytes, side: int = 16) -> bytes:
    """A grey PNG, ``side`` square, whose eXIf chunk is ``exif``."""
    rows = b"".join(b"\0" + bytes(range(y, y + side)) for y in range(side))
    return (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + _chunk(b"eXIf", exif) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def test_an_orientation_of_millions_of_values_is_not_decoded():
    """PIL's EXIF parser decodes the whole value of the tag asked for: a 4 MB EXIF whose
    orientation held 500,000 rationals made as many Python objects (an 18 MB one held a worker
    7 s and 640 MB, for the photo and again for each mask). Only the one SHORT the standard
    gives the tag is read, as browsers read it."""
    import tracemalloc

    count = 500_000
    values = np.random.default_rng(0).integers(1, 2**31, 2 * count, dtype=np.uint32).astype(">u4").tobytes()
    data = _png_with_exif(_exif(">", 5, values, count))
    tracemalloc.start()
    try:
        photo, orientation, _ = decode_upright(data)
        decode_mask(data, (16, 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert orientation == 1 and photo.shape == (16, 16, 3)
    assert peak < 32 * 1024 * 1024  # PIL's copies of the 4 MB chunk; before: 146 MB


@pytest.mark.parametrize("order", ["<", ">"])
def test_an_orientation_is_one_short_in_either_byte_order_and_anything_else_is_none(order: str):
    def read(kind: int, values: bytes, count: int) -> int:
        return decode_upright(_png_with_exif(_exif(order, kind, values, count))).orientation

    assert read(3, struct.pack(order + "H", 6), 1) == 6
    assert read(3, struct.pack(order + "H", 9), 1) == 1  # no such orientation
    assert read(4, struct.pack(order + "I", 6), 1) == 1  # a LONG: browsers ignore it, so does the worker
    assert read(3, struct.pack(order + "HH", 6, 6), 2) == 1
    damaged = _exif(order, 3, struct.pack(order + "H", 6), 1)[:12]  # the IFD cut off
    assert decode_upright(_png_with_exif(damaged)).orientation == 1


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("I;16", "PNG")])
def test_an_rgb_profile_on_a_photo_whose_values_are_not_rgb_is_not_carried(mode: str, fmt: str):
    """A grey or CMYK photo tagged with an RGB profile (libpng refuses one on a grey PNG: "RGB
    color space not permitted on grayscale PNG"; a CMYK JPEG's values are not the RGB ones PIL
    makes of them) is shown by a viewer without it: its RGB output must not carry it either."""
    img = Image.fromarray(np.random.default_rng(8).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    img = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    assert decode_upright(_saved(img, fmt, icc_profile=_srgb_icc())).profile is None
    assert decode_upright(_saved(img.convert("RGB"), fmt, icc_profile=_srgb_icc())).profile == _srgb_icc()


def test_a_profile_at_each_bound_of_libpngs_checks_is_carried():
    """The other side of the bounds above: a tag ending at the profile's last byte, and a table
    of one empty tag that the profile holds exactly."""
    icc = _srgb_icc()
    stored = np.random.default_rng(6).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    last_tag = _first_tag_at(icc, len(icc) - int.from_bytes(icc[140:144], "big"))
    one_empty_tag = (144).to_bytes(4, "big") + icc[4:128] + (1).to_bytes(4, "big") + b"\0" * 12
    for profile in (last_tag, one_empty_tag):
        assert decode_upright(_saved(Image.fromarray(stored), "PNG", icc_profile=profile)).profile == profile


def test_a_preview_carries_a_profile_of_up_to_its_bound():
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    for size, carried in ((MAX_PREVIEW_PROFILE_BYTES, True), (MAX_PREVIEW_PROFILE_BYTES + 4, False)):
        profile = _padded(_srgb_icc(), size)
        with Image.open(io.BytesIO(encode_preview(image, profile=profile))) as preview:
            assert (preview.info.get("icc_profile") == profile) is carried, size


def test_a_photo_translucent_everywhere_is_read_on_white():
    """No pixel is clear, none opaque: each is shown blended with the page, not as stored."""
    pixels = np.random.default_rng(8).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    pixels[..., 3] = np.random.default_rng(9).integers(1, 255, (16, 24), dtype=np.uint8)
    upload = _saved(Image.fromarray(pixels), "PNG")
    assert np.array_equal(decode(upload).numpy(), _on_white(upload))


@pytest.mark.parametrize("order", ["<", ">"])
def test_an_orientation_entry_is_read_up_to_the_exifs_last_byte_and_no_further(order: str):
    """The bounds of the walk over a damaged or odd EXIF: an entry ending at the last byte (no
    next-IFD offset after it) is read; a TIFF header cut anywhere is no orientation, never an
    error; a magic other than 42, a value of 0, or the first entry not the orientation's one is 1;
    a PNG's eXIf written with a JPEG's prefix (Exif and two zeros) is read too."""
    def read(exif: bytes) -> int:
        return decode_upright(_png_with_exif(exif)).orientation

    six = _exif(order, 3, struct.pack(order + "H", 6), 1)
    assert read(six[:-4]) == 6
    for cut in range(0, 12):
        assert read(six[:cut]) == 1, cut
    assert read(six[:2] + struct.pack(order + "H", 43) + six[4:]) == 1
    assert read(_exif(order, 3, struct.pack(order + "H", 0), 1)) == 1
    assert read(b"Exif\0\0" + six) == 6  # PIL puts a prefix of its own before a PNG's: two
