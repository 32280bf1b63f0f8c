"""What the worker refuses to decode before it holds anything up (gpu_consumer.codec.read_header):
scans a byte out of place would hide, masks read as photos are, formats not accepted."""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
import zlib
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from gpu_consumer.codec import (
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    PNG_SIGNATURE,
    BadInput,
    _gif_blocks,
    _jpeg_scans,
    decode,
    decode_mask,
    read_header,
)

# Where a clean encoder's file has a marker: 0xFF then neither a stuffed zero, a restart marker
# nor fill (in entropy-coded data 0xFF is always followed by one of those; the tables of these
# small files hold no 0xFF).
MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def _progressive(mode: str) -> bytes:
    colour = {"L": 128, "CMYK": (10, 200, 30, 0)}[mode]
    buf = io.BytesIO()
    Image.new(mode, (16, 16), colour).save(buf, "JPEG", progressive=True)
    return buf.getvalue()


def _segments(clean: bytes) -> list[bytes]:
    """A clean JPEG cut at its markers: SOI, then each segment with what follows it."""
    starts = [m.start() for m in MARKER.finditer(clean)]
    return [clean[a:b] for a, b in zip(starts, [*starts[1:], len(clean)], strict=True)]


junk = st.one_of(st.binary(min_size=1, max_size=6).map(lambda b: b.replace(b"\xff", b"\x01")),
                 st.just(b"\xff\x00"), st.just(b"\xff\xff"))


@settings(max_examples=80, deadline=None)
@given(mode=st.sampled_from(["L", "CMYK"]), repeats=st.integers(0, MAX_JPEG_SCANS + 20),
       junk_before=st.lists(st.one_of(st.none(), junk), min_size=64, max_size=64))
def test_every_scan_libjpeg_reads_is_counted_whatever_sits_before_a_marker(mode, repeats, junk_before):
    """libjpeg skips bytes where a marker should be (a warning, nothing more) and reads the scans
    after them; the count stopped there, so one byte before the first scan let a CMYK JPEG of
    15,000 scans through (the worker held for 113 s)."""
    segments = _segments(_progressive(mode))
    assert segments[0] == b"\xff\xd8" and segments[-1] == b"\xff\xd9"
    last_scan = next(s for s in reversed(segments) if s.startswith(b"\xff\xda"))
    body = [*segments[1:-1], *[last_scan] * repeats, segments[-1]]
    junk_before[0] = None  # right after SOI: PIL would not know the file for a JPEG (refused: safe)
    data = segments[0] + b"".join((junk_before[i % 64] or b"") + s for i, s in enumerate(body))
    scans = sum(s.startswith(b"\xff\xda") for s in body)
    assert _jpeg_scans(data) == min(scans, MAX_JPEG_SCANS + 1)
    if mode == "CMYK" and scans <= MAX_JPEG_SCANS:  # PIL's path: the decoder reads on past the junk
        assert decode(data).shape == (16, 16, 3)


def test_a_cmyk_jpeg_with_a_byte_before_its_thousands_of_scans_is_refused_before_decoding():
    segments = _segments(_progressive("CMYK"))
    first_scan = next(i for i, s in enumerate(segments) if s.startswith(b"\xff\xda"))
    last_scan = next(s for s in reversed(segments) if s.startswith(b"\xff\xda"))
    data = (b"".join(segments[:first_scan]) + b"\x00" + b"".join(segments[first_scan:-1])
            + last_scan * 5000 + segments[-1])
    with pytest.raises(BadInput, match="scans"):
        decode(data)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_mask_is_refused_as_a_photo_is():
    """Masks (a rerun's, or a client's) were decoded with no scan or chunk limit: a 0.56 MB
    progressive mask held the worker 123 s."""
    clean = _progressive("L")
    last_scan = clean[clean.rfind(b"\xff\xda"):-2]
    with pytest.raises(BadInput, match="scans"):
        decode_mask(clean[:-2] + last_scan * (MAX_JPEG_SCANS + 1) + b"\xff\xd9", (16, 16))
    head = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    pixels = _png_chunk(b"IDAT", zlib.compress(b"\0" + b"\xff" * 8) * 1)
    flood = head + _png_chunk(b"abCd", b"") * (MAX_PNG_CHUNKS + 1) + pixels + _png_chunk(b"IEND", b"")
    with pytest.raises(BadInput, match="chunks"):
        decode_mask(flood, (8, 8))
    assert decode_mask(clean, (16, 16)).shape == (1, 1, 16, 16)  # a JPEG mask is read


def test_a_mask_the_decoder_chokes_on_fails_as_unreadable_not_as_a_bug():
    """An iCCP profile decompressing past PIL's limit raised ValueError, which the worker took for a
    bug: the item parked on the dead-letter topic with PIL's message."""
    head = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    bomb = _png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (64 * 1024 * 1024), 9))
    rows = _png_chunk(b"IDAT", zlib.compress((b"\0" + b"\xff" * 8) * 8))
    with pytest.raises(BadInput, match="the mask is not a readable image"):
        decode_mask(head + bomb + rows + _png_chunk(b"IEND", b""), (8, 8))


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG2000", "TGA", "PCX", "ICO"])
def test_formats_not_accepted_are_refused_by_name_before_decoding(fmt: str):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 150)).save(buf, fmt)
    for read in (decode, lambda data: decode_mask(data, (32, 32))):
        with pytest.raises(BadInput, match="JPEG, PNG, WebP, GIF or BMP"):
            read(buf.getvalue())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_accepted_formats_decode(fmt: str):
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (90, 120, 150)).save(buf, fmt)
    assert decode(buf.getvalue()).shape == (24, 32, 3)
    assert decode_mask(buf.getvalue(), (24, 32)).shape == (1, 1, 24, 32)


def _hidden_behind_a_reserved_marker(mode: str, side: int) -> tuple[bytes, int]:
    """A progressive JPEG with restart markers whose last scan is repeated inside a reserved
    marker's segment (0xFF02), placed where a restart marker is due: libjpeg, resynchronising
    there, scans past the marker without reading its length and decodes every scan inside; a walk
    that skips the segment by its length saw none of them. Returns the file and the scans hidden."""
    colour = {"CMYK": (90, 120, 30, 10), "L": 90}[mode]
    buf = io.BytesIO()
    Image.new(mode, (side, side), colour).save(buf, "JPEG", progressive=True, restart_marker_blocks=1)
    clean = buf.getvalue()
    last = clean.rfind(b"\xff\xda")
    scan = clean[last:-2]
    first_restart = re.search(rb"\xff[\xd0-\xd7]", scan)
    assert first_restart is not None
    hidden = scan * (MAX_JPEG_SCANS + 1) + scan[:first_restart.start()]
    segment = b"\xff\x02" + (len(hidden) + 4).to_bytes(2, "big") + b"\x00\x00" + hidden
    return clean[:last] + scan[:first_restart.start()] + segment + b"\xff\xd9", MAX_JPEG_SCANS + 1


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_scans_hidden_in_a_reserved_markers_segment_at_a_restart_point_are_refused(mode: str):
    data, hidden = _hidden_behind_a_reserved_marker(mode, 64)
    assert hidden > MAX_JPEG_SCANS
    with pytest.raises(BadInput, match="0xFF02"):
        decode(data)
    with pytest.raises(BadInput, match="0xFF02"):
        decode_mask(data, (64, 64))


def test_a_jpeg_padded_between_its_markers_past_the_bound_is_refused_before_pil_reads_it(monkeypatch):
    from gpu_consumer import codec

    clean = _progressive("L")
    first_scan = clean.index(b"\xff\xda")
    opened: list[bytes] = []
    monkeypatch.setattr(codec, "_open", lambda data: opened.append(data))  # PIL walks fill byte by byte
    with pytest.raises(BadInput, match="between its markers"):
        decode(clean[:first_scan] + b"\xff" * (codec.MAX_JPEG_SKIPPED + 1) + clean[first_scan:])
    assert opened == []
    monkeypatch.undo()
    assert decode(clean[:first_scan] + b"\xff" * 1000 + clean[first_scan:]).shape == (16, 16, 3)  # fill is legal


# -- GIF: PIL reads what comes before the first image a block (or a stray byte) at a time -------
GIF_BOUND = 40  # MAX_GIF_BLOCKS made small, so that a file past it stays small


def _gif() -> tuple[bytes, int]:
    """A 16x16 GIF, and where its first image descriptor starts (0x2C, left and top 0, 16, 16)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 90)).save(buf, "GIF")
    clean = buf.getvalue()
    return clean, clean.index(b"\x2c\x00\x00\x00\x00\x10\x00\x10\x00")


extension = st.tuples(st.sampled_from([0x01, 0xF9, 0xFE, 0xFF]),
                      st.lists(st.binary(min_size=4, max_size=12), min_size=1, max_size=6))
stray = st.integers(0, 255).filter(lambda b: b not in (0x21, 0x2C, 0x3B))


@settings(max_examples=120, deadline=None)
@given(pieces=st.lists(st.one_of(extension, stray), max_size=30))
@example(pieces=[(0xFF, [b"NETSCAPE2.0"])])
def test_what_comes_before_a_gifs_image_is_counted_and_bounded(pieces):
    from gpu_consumer import codec

    clean, at = _gif()
    inserted, expected = b"", 0  # the oracle: a read per stray byte; per extension its introducer,
    for piece in pieces:  # its label, each sub-block and the empty one that ends them
        if isinstance(piece, int):
            inserted, expected = inserted + bytes([piece]), expected + 1
        else:
            label, blocks = piece
            if label == 0xF9:  # a graphic control block's transparency flag clear: a transparent
                blocks = [bytes([blocks[0][0] & 0xFE]) + blocks[0][1:], *blocks[1:]]  # index is shown white
            if label == 0xFF and blocks[0].startswith(b"NETSCAPE2.0"):  # its loop sub-block, as every
                blocks = [blocks[0], b"\x01\x00\x00", *blocks[1:]]  # encoder writes: PIL reads one after
                # NETSCAPE2.0 whatever it is, so without it PIL took the terminator for it and the image
                # descriptor for a sub-block (Hypothesis draws the name from the code's own constants)
            inserted += b"\x21" + bytes([label]) + b"".join(bytes([len(b)]) + b for b in blocks) + b"\x00"
            expected += 3 + len(blocks)
    data = clean[:at] + inserted + clean[at:]
    with mock.patch.object(codec, "MAX_GIF_BLOCKS", GIF_BOUND):
        counted = _gif_blocks(data)  # the walk stops once past the bound
        assert counted == expected + 1 if expected + 1 <= GIF_BOUND else counted > GIF_BOUND  # + the image's 0x2C
        if expected + 1 > GIF_BOUND:
            with pytest.raises(BadInput, match="GIF of more than"):
                decode(data)
        else:  # what PIL skips changes no pixel
            assert (decode(data) == decode(clean)).all()


class _Reads(io.BytesIO):
    """A file that counts what PIL's GIF reader reads a step at a time: read(1) outside its
    data() (a byte between blocks, an extension's label), and each data() (a sub-block)."""

    steps = 0
    in_data = False

    def read(self, size: int | None = -1) -> bytes:
        if size == 1 and not self.in_data:
            self.steps += 1
        return super().read(size)


@settings(max_examples=300, deadline=None)
@given(inserted=st.lists(st.one_of(st.sampled_from([0x21, 0x00, 0x01, 0x02, 0x05, 0xF9, 0xFE, 0xFF, 0x2C, 0x3B]),
                                   st.integers(0, 255)), max_size=60).map(bytes),
       netscape=st.booleans())
@example(inserted=b"\x21\x01\x00", netscape=False)  # PIL takes the image's 0x2C for a sub-block's length
@example(inserted=b"", netscape=True)
@example(inserted=b"\x00\x2c" + b"x" * 44 + b"\x01a" * 20 + b"\x00", netscape=True)  # read after NETSCAPE2.0
def test_pil_reads_no_more_before_a_gifs_image_than_the_walk_counted(inserted, netscape):
    """Against PIL itself, on any bytes (its quirks: an empty first sub-block not taken for the
    end, a second read after NETSCAPE2.0): when the walk lets a GIF through, PIL's reader took at
    most one step more than it counted (the image's code size, or the end of the file)."""
    from PIL import GifImagePlugin

    clean, at = _gif()
    data = clean[:at] + (b"\x21\xff\x0bNETSCAPE2.0" if netscape else b"") + inserted + clean[at:]
    counted = _gif_blocks(data)
    reads = _Reads(data)
    plain = GifImagePlugin.GifImageFile.data

    def data_counted(self: GifImagePlugin.GifImageFile) -> bytes | None:
        reads.steps += 1
        reads.in_data = True
        try:
            return plain(self)
        finally:
            reads.in_data = False

    with mock.patch.object(GifImagePlugin.GifImageFile, "data", data_counted), \
            contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.open(reads, formats=["GIF"]).close()
    assert reads.steps <= counted + 1


def test_a_gif_of_a_million_comments_before_its_image_is_refused_before_pil_reads_it(monkeypatch):
    from gpu_consumer import codec

    clean, at = _gif()
    opened: list[bytes] = []
    monkeypatch.setattr(codec, "_open", lambda data: opened.append(data))  # PIL took 3.4 s a read at 20 MB
    for filler in (b"\x21\xfe\x01a\x00" * 1_000_000, b"\x00" * 5_000_000):
        with pytest.raises(BadInput, match="GIF of more than 65,536 blocks"):
            decode(clean[:at] + filler + clean[at:])
    assert opened == []


def _rle8_bmp(side: int, rows: bytes) -> bytes:
    """A BMP of ``side`` x ``side``, 8 bits a pixel, compressed with RLE8 (``rows``: its RLE data)."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


def test_a_bmp_compressed_as_rle_is_refused_before_pil_decodes_it(monkeypatch):
    """PIL's RLE decoder runs in Python, a byte a turn: a 17 KB 4096x4096 one took 1.6 s."""
    from PIL import BmpImagePlugin

    decoded: list[bool] = []
    monkeypatch.setattr(BmpImagePlugin.BmpRleDecoder, "decode", lambda self, buffer: decoded.append(True))
    small = _rle8_bmp(16, b"\x10\x07\x00\x00" * 16 + b"\x00\x01")  # each row 16 pixels of colour 7
    big = _rle8_bmp(4096, b"\x01\x07\x00\x00" * 4096 + b"\x00\x01")
    for data, what in ((small, "photo"), (big, "photo"), (small, "mask")):
        with pytest.raises(BadInput, match="compressed as bmp_rle"):
            decode_mask(data, (16, 16)) if what == "mask" else decode(data)
    assert decoded == []
    monkeypatch.undo()
    with Image.open(io.BytesIO(small)) as img:  # what was refused is a readable image
        assert img.convert("L").getpixel((3, 3)) == 7


@pytest.mark.parametrize(("width", "height", "accepted"), [(4096, 8, True), (8, 4096, True), (4097, 8, False),
                                                           (8, 4097, False)])
def test_a_photo_of_up_to_4096_pixels_a_side_is_read_and_one_a_pixel_longer_is_refused(width, height, accepted):
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    if accepted:
        assert decode(buf.getvalue()).shape == (height, width, 3)
    else:
        with pytest.raises(BadInput, match="the limit is 4096x4096"):
            decode(buf.getvalue())


@pytest.mark.parametrize("segment", [b"\xff\xfe\x00\x02", b"\xff\xe1\x00\x02", b"\xff\xd0"])
def test_a_jpeg_of_millions_of_empty_segments_is_refused_before_pil_reads_it(monkeypatch, segment: bytes):
    """PIL reads a JPEG's segments before its first scan one at a time in Python: 5 million empty
    APP1 segments (20 MB) held a worker 9.8 s and 630 MB a read, a mask of 5 million comments 12 s.
    A camera writes a few dozen; extended XMP (a depth map) a few hundred."""
    from gpu_consumer import codec

    clean = _progressive("L")
    opened: list[bytes] = []
    monkeypatch.setattr(codec, "_open", lambda data: opened.append(data))
    flood = clean[:2] + segment * 65_536 + clean[2:]
    for read in (decode, lambda data: decode_mask(data, (16, 16))):
        with pytest.raises(BadInput, match="JPEG of more than 65,536 segments"):
            read(flood)
    assert opened == []
    monkeypatch.undo()
    assert decode(clean[:2] + segment * 1000 + clean[2:]).shape == (16, 16, 3)


def _exif_segments(tiff: bytes, size: int) -> bytes:
    """``tiff`` as a JPEG's EXIF, cut into APP1 segments of at most ``size`` bytes after their
    "Exif" prefix, each with the prefix (as PIL reads one that goes on past a segment)."""
    parts = [tiff[i:i + size] for i in range(0, len(tiff), size)] if tiff else [b""]
    return b"".join(b"\xff\xe1" + struct.pack(">H", 8 + len(part)) + b"Exif\x00\x00" + part for part in parts)


def _exif_flood(kind: str) -> bytes:
    clean = _progressive("L")
    if kind == "empty":  # 20,000 EXIF segments of nothing
        return clean[:2] + _exif_segments(b"", 0) * 20_000 + clean[2:]
    rationals = 2_400_000  # XResolution, whose whole value PIL decodes for the photo's dpi
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x011A, 5, rationals, 26)
            + b"\0\0\0\0" + struct.pack("<II", 72, 1) * rationals)
    return clean[:2] + _exif_segments(tiff, 65_000) + clean[2:]


@pytest.mark.parametrize("kind", ["empty", "rationals"])
def test_a_jpeg_of_many_exif_segments_is_refused_before_pil_joins_them(monkeypatch, kind: str):
    """PIL joins a JPEG's EXIF segments before its first scan, each onto a copy of those before
    it, then decodes the resolution tags of the whole: 65,000 empty ones (20 MB) held a worker 56 s
    a read, 294 of 64 KB holding 2.4 million rationals 8.3 s and 500 MB, twice for a photo (its
    header, then its decode). A camera writes one; a few are read, the orientation of the first."""
    from gpu_consumer import codec

    flood = _exif_flood(kind)
    assert len(flood) < codec.MAX_BYTES
    opened: list[bytes] = []
    monkeypatch.setattr(codec, "_open", lambda data: opened.append(data))
    for read in (decode, lambda data: decode_mask(data, (16, 16))):
        with pytest.raises(BadInput, match="JPEG of more than 4 EXIF segments"):
            read(flood)
    assert opened == []
    monkeypatch.undo()
    clean = _progressive("L")
    turned = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\0\0\0\0"
    four = clean[:2] + _exif_segments(turned, 65_000) * codec.MAX_JPEG_EXIF_SEGMENTS + clean[2:]
    assert read_header(four).orientation == 6
    with pytest.raises(BadInput, match="JPEG of more than 4 EXIF segments"):  # one more is refused
        read_header(clean[:2] + _exif_segments(turned, 65_000) * (codec.MAX_JPEG_EXIF_SEGMENTS + 1) + clean[2:])


@pytest.mark.parametrize("marker", [0xC0, 0xC2, 0xCF])
def test_a_jpeg_of_many_frame_headers_is_refused_before_pil_reads_them(monkeypatch, marker: int):
    """PIL keeps a tuple for every 3 bytes of each frame header (SOFn) before the first scan, not
    for each component it names: 319 of 64 KB (20 MB) held a worker 2.1 s and 600 MB a read, twice
    for a photo (kornia-rs refuses it, then PIL opens it again to fail). libjpeg refuses a second
    one (JERR_SOF_DUPLICATE), so no decoder here reads such a file; one is read as ever."""
    from gpu_consumer import codec

    clean = _progressive("L")
    first = clean.index(b"\xff\xc2")
    body = clean[first + 4:first + 2 + int.from_bytes(clean[first + 2:first + 4], "big")]
    padded = body + b"\x01\x11\x00" * ((65_533 - len(body)) // 3)
    header = bytes([0xFF, marker]) + struct.pack(">H", 2 + len(padded)) + padded
    flood = clean[:2] + header * 319 + clean[2:]
    assert len(flood) < codec.MAX_BYTES
    opened: list[bytes] = []
    monkeypatch.setattr(codec, "_open", lambda data: opened.append(data))
    for read in (decode, lambda data: decode_mask(data, (16, 16))):
        with pytest.raises(BadInput, match="more than one frame header"):
            read(flood)
    assert opened == []
    monkeypatch.undo()
    assert decode(clean).shape == (16, 16, 3)
    with pytest.raises(BadInput):  # what it was before: no decoder reads two frame headers
        decode(clean[:2] + header + clean[2:])
    monkeypatch.setattr(codec, "_open", lambda data: opened.append(data))
    with pytest.raises(BadInput, match="more than one frame header"):  # a second one is refused before PIL
        decode(clean[:2] + header + clean[2:])
    assert opened == []


@pytest.mark.parametrize("kind", ["tables", "photoshop"])
def test_a_jpeg_of_many_segments_pil_walks_in_python_is_refused_before_it_reads_them(monkeypatch, kind: str):
    """PIL walks the quantization tables (DQT) and Photoshop resources (APP13) before a JPEG's
    first scan in Python, copying the rest of the segment at each step: 320 of 64 KB (20 MB) held
    a worker 1.4 s and 1 s a read, twice for a photo PIL decodes. An encoder writes one to four
    DQT segments; up to 64 of the two are read."""
    from gpu_consumer import codec

    if kind == "tables":
        segment = b"\xff\xdb" + struct.pack(">H", 2 + 65 * 1008) + (b"\x00" + b"\x01" * 64) * 1008
    else:
        resource = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", 0)  # an empty IPTC block
        body = b"Photoshop 3.0\x00" + resource * 5458
        segment = b"\xff\xed" + struct.pack(">H", 2 + len(body)) + body
    clean = _progressive("L")
    flood = clean[:2] + segment * 320 + clean[2:]
    assert len(flood) < codec.MAX_BYTES
    opened: list[bytes] = []
    monkeypatch.setattr(codec, "_open", lambda data: opened.append(data))
    for read in (decode, lambda data: decode_mask(data, (16, 16))):
        with pytest.raises(BadInput, match="more than 64 quantization table or Photoshop segments"):
            read(flood)
    assert opened == []
    monkeypatch.undo()
    own = clean[:clean.index(b"\xff\xda")].count(b"\xff\xdb")  # the photo's own tables count too
    at_most = clean[:2] + segment * (codec.MAX_JPEG_PARSED_SEGMENTS - own) + clean[2:]
    assert decode(at_most).shape == (16, 16, 3)
    with pytest.raises(BadInput, match="more than 64 quantization table or Photoshop segments"):  # one more
        decode(at_most[:2] + segment + at_most[2:])


def test_a_png_of_many_colour_profiles_is_refused_before_pil_inflates_them():
    """PIL inflates every iCCP chunk before the first IDAT as it opens a PNG (up to 1 MB each, none
    counted against its text limit) and keeps the last: a 20 MB PNG of 19,896 such chunks, each
    1 KB inflating to 1 MB, held the worker 96 s (read_header, then the decode's open again). A
    PNG holds at most one; one, before or after the pixels, is read."""
    head = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    profile = _png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (1024 * 1024 - 1), 9))
    rows = _png_chunk(b"IDAT", zlib.compress((b"\0" + b"\x80" * 24) * 8))
    end = _png_chunk(b"IEND", b"")
    for read in (decode, lambda data: decode_mask(data, (8, 8))):
        with pytest.raises(BadInput, match="colour profiles"):
            read(head + profile * 2 + rows + end)
        read(head + profile + rows + end)
        read(head + rows + profile + end)


def test_a_png_of_many_colour_profiles_after_its_pixels_is_refused_too():
    """PIL inflates the iCCP chunks after a PNG's IDAT as it decodes the pixels (``load_end``,
    up to 1 MB each): a 20 MB PNG of 18,902 such chunks after a 64x64 image held the worker
    12.6 s a read, where those before the pixels were counted and refused."""
    head = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    profile = _png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (1024 * 1024 - 1), 9))
    rows = _png_chunk(b"IDAT", zlib.compress((b"\0" + b"\x80" * 24) * 8))
    end = _png_chunk(b"IEND", b"")
    for read in (decode, lambda data: decode_mask(data, (8, 8))):
        for data in (head + rows + profile * 2 + end, head + profile + rows + profile + end):
            with pytest.raises(BadInput, match="colour profiles"):
                read(data)


# -- found by mutation testing: bounds whose tests could not fail --------------------------------
SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def test_bytes_between_markers_count_together_however_they_are_spread():
    """The bound is on the file's junk as a whole: 70 gaps of 1,000 bytes are 70,000, past it,
    though none alone is (a count that restarted at each marker let 20 MB through in pieces)."""
    from gpu_consumer import codec

    def spread(gaps: int) -> bytes:
        return SOI + (b"\0" * 1000 + b"\xff\xfe\x00\x02") * gaps + EOI  # junk, then an empty COM

    assert 1000 * 60 <= codec.MAX_JPEG_SKIPPED < 1000 * 70
    assert codec._jpeg_scans(spread(60)) == 0
    with pytest.raises(BadInput, match="between its markers"):
        read_header(spread(70))


@pytest.mark.parametrize("marker", [0x01, *range(0xD0, 0xD8)])
def test_a_marker_without_a_length_hides_no_scan_behind_what_follows_it(marker: int):
    """TEM and RSTn have no length (libjpeg reads on at the next byte): a walk that took the next
    two bytes for one skipped the 0xFFDA... after it, and the scans it covered went uncounted."""
    from gpu_consumer import codec

    scans = (b"\xff\xda\x00\x02" + b"\x11") * (codec.MAX_JPEG_SCANS + 1)  # each: SOS, 1 byte of data
    assert codec._jpeg_scans(SOI + bytes([0xFF, marker]) + scans + EOI) == codec.MAX_JPEG_SCANS + 1
    with pytest.raises(BadInput, match="scans"):
        read_header(SOI + bytes([0xFF, marker]) + scans + EOI)


@pytest.mark.parametrize("marker", [0x02, 0xBF, 0xDE, 0xDF, 0xF0, 0xFD])
def test_a_marker_libjpeg_does_not_read_at_the_top_level_is_refused(marker: int):
    """DHP (0xDE) and EXP (0xDF), hierarchical JPEG, are no marker libjpeg reads (jdmarker.c
    read_markers: JERR_UNKNOWN_MARKER), nor are the reserved ones: their length would cover scans."""
    with pytest.raises(BadInput, match=f"0xFF{marker:02X}"):
        read_header(SOI + bytes([0xFF, marker]) + b"\x00\x04\x00\x00" + EOI)


def test_restart_markers_inside_a_scan_are_its_data_not_bytes_between_markers():
    """A camera's JPEG with restart intervals (DRI) has a RSTn every few blocks: the data after
    each is the scan's, not junk where a marker should be, so a large one is not refused."""
    from gpu_consumer import codec

    data = b"".join(b"\x11" * 1000 + bytes([0xFF, 0xD0 + i % 8]) for i in range(100))  # 100 KB
    assert codec._jpeg_scans(SOI + b"\xff\xda\x00\x02" + data + EOI) == 1


def test_at_most_max_jpeg_segments_markers_are_walked():
    from gpu_consumer import codec

    com = b"\xff\xfe\x00\x02"
    assert codec._jpeg_scans(SOI + com * (codec.MAX_JPEG_SEGMENTS - 1) + EOI) == 0  # EOI is one more
    with pytest.raises(BadInput, match="segments"):
        codec._jpeg_scans(SOI + com * codec.MAX_JPEG_SEGMENTS + EOI)


def test_what_follows_a_pngs_end_is_not_counted_as_its_chunks():
    """Chunks are counted up to IEND, as PIL reads them: zeros after it (a padded file, an appended
    one) are 12-byte "chunks" of nothing to a walk that went on, and refused a readable PNG."""
    from gpu_consumer import codec

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (20, 40, 60)).save(buf, "PNG")
    header = read_header(buf.getvalue() + b"\0" * (12 * (codec.MAX_PNG_CHUNKS + 1)))
    assert (header.width, header.height, header.format) == (16, 16, "PNG")
