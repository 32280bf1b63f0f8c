"""Decoding and encoding with input limits: the fastest decoder available (kornia-rs for JPEG), PNG
written here (one filter, one zlib call), previews through PIL."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_BYTES = 20 * 1024 * 1024
MAX_SIDE = 4096
PREVIEW_SIDE = 320
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE  # PIL refuses decompression bombs beyond this


class BadInput(ValueError):
    """The upload cannot be processed; the item fails with this message (no retry)."""


def check_size(data: bytes) -> None:
    if len(data) > MAX_BYTES:
        raise BadInput(f"input is {len(data) / 1e6:.1f} MB; the limit is {MAX_BYTES // (1024 * 1024)} MB")


def decode(data: bytes) -> torch.Tensor:
    """``[H, W, 3]`` uint8. JPEG through kornia-rs (libjpeg-turbo), anything else through PIL."""
    check_size(data)
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            fmt = probe.format
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadInput(f"not a readable image ({type(e).__name__})") from None
    if width > MAX_SIDE or height > MAX_SIDE:
        raise BadInput(f"image is {width}x{height}; the limit is {MAX_SIDE}x{MAX_SIDE}")
    try:
        if fmt == "JPEG":
            import kornia_rs

            array = kornia_rs.io.decode_image_jpegturbo(data, "rgb")
        else:
            with Image.open(io.BytesIO(data)) as img:
                array = np.asarray(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault
        raise BadInput(f"corrupt image data ({type(e).__name__})") from None
    return torch.from_numpy(np.ascontiguousarray(array))


def decode_mask(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """A client mask PNG as ``[1, 1, H, W]`` float in [0, 1], resized to the image if needed."""
    check_size(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width > MAX_SIDE or img.height > MAX_SIDE:  # before a pixel is decoded
                raise BadInput(f"mask is {img.width}x{img.height}; the limit is {MAX_SIDE}x{MAX_SIDE}")
            gray = img.convert("L")
            if gray.size != (size[1], size[0]):
                gray = gray.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(gray, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadInput(f"mask is not a readable image ({type(e).__name__})") from None
    return torch.from_numpy(array).view(1, 1, *array.shape)


def _png_chunk(kind: bytes, data: bytes) -> list[bytes]:
    """A chunk's parts, to be joined once (no copy of ``data`` for its CRC)."""
    return [struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))]


def encode_png(image_u8: torch.Tensor, level: int = 1) -> bytes:
    """A PNG of ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey) uint8 in one zlib stream at ``level``: a
    photo's rows with the Up filter (each byte less the one above it, mod 256), a mask's as they
    are (long runs compress by themselves). As small as PIL's level-1 PNG within a few percent,
    and on a 1 MP edit written in 12 ms instead of 29 (numpy filters, zlib compresses without
    holding the GIL)."""
    a = image_u8.cpu().numpy()
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or 0 in a.shape:
        raise ValueError(f"not an [H, W] or [H, W, 3] uint8 image: {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    rows = np.ascontiguousarray(a).reshape(h, -1)
    filtered = np.empty((h, rows.shape[1] + 1), dtype=np.uint8)
    if a.ndim == 2:
        filtered[:, 0] = 0  # no filter
        filtered[:, 1:] = rows
    else:
        filtered[:, 0] = 2  # Up; the first row's "above" is zeros
        filtered[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps: mod 256
    del rows  # a copy when the image was not contiguous
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if a.ndim == 2 else 2, 0, 0, 0)  # 8-bit grey or RGB
    idat = zlib.compress(filtered.data, level)
    del filtered  # at most two image-sized buffers at once: the compressed data and the file
    return b"".join([PNG_SIGNATURE, *_png_chunk(b"IHDR", header), *_png_chunk(b"IDAT", idat),
                     *_png_chunk(b"IEND", b"")])


def encode_preview(image_u8: torch.Tensor, side: int = PREVIEW_SIDE, quality: int = 82) -> bytes:
    """A JPEG thumbnail whose longest side is ``side``."""
    img = Image.fromarray(image_u8.cpu().numpy())
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
