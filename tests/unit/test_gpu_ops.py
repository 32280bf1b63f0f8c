"""Pure image ops on small synthetic images."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import kornia
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from domain.contracts.gpu_task import Task
from gpu_consumer import fill, ops, refine
from gpu_consumer.codec import BadInput, decode, encode_png, encode_preview
from gpu_consumer.demo import synthetic_room
from gpu_consumer.pipeline import ImagePipeline
from gpu_consumer.segment import NothingFits, PriorClusterSegmenter

H = W = 64


def room() -> torch.Tensor:
    """Ceiling (white), wall (beige), floor (brown) bands with a little noise."""
    g = torch.Generator().manual_seed(1)
    img = torch.empty(1, 3, H, W)
    img[..., :10, :] = torch.tensor([0.95, 0.95, 0.93]).view(1, 3, 1, 1)
    img[..., 10:46, :] = torch.tensor([0.85, 0.78, 0.62]).view(1, 3, 1, 1)
    img[..., 46:, :] = torch.tensor([0.45, 0.30, 0.18]).view(1, 3, 1, 1)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def box_mask(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(1, 1, H, W)
    m[..., y0:y1, x0:x1] = 1
    return m


def test_recolor_reaches_the_target_hue_and_keeps_lightness():
    img, mask = room(), box_mask(12, 40, 5, 60)
    out = ops.apply_edit(img, mask, "recolor", "#2255cc")
    lab_in, lab_out = kornia.color.rgb_to_lab(img), kornia.color.rgb_to_lab(out)
    inside = mask[0, 0] > 0
    target_ab = kornia.color.rgb_to_lab(torch.tensor(ops.hex_to_rgb("#2255cc")).view(1, 3, 1, 1))[0, 1:, 0, 0]
    got_ab = lab_out[0, 1:][:, inside].mean(dim=1)
    cos = torch.nn.functional.cosine_similarity(got_ab, target_ab, dim=0)
    assert cos > 0.97  # same hue direction
    assert (lab_out[0, 0][inside] - lab_in[0, 0][inside]).abs().mean() < 2.0  # lightness kept (L units)
    assert torch.equal(out[..., ~inside.view(1, 1, H, W)[0, 0]], img[..., ~inside.view(1, 1, H, W)[0, 0]])


@settings(max_examples=25, deadline=None)
@given(action=st.sampled_from([("recolor", "#aa3300"), ("tone", "vivid"), ("texture", "brick"), ("remove", "")]),
       y0=st.integers(0, 40), x0=st.integers(0, 40))
def test_protected_and_unmasked_pixels_are_bit_identical(action, y0, x0):
    img_u8 = (room()[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    img = ops.to_float(img_u8)
    mask = box_mask(y0, y0 + 20, x0, x0 + 20)
    protect = box_mask(y0 + 5, y0 + 12, x0 + 5, x0 + 12)
    out = ops.apply_edits(img, {"wall": mask}, {"wall": {"action": action[0], "value": action[1]}}, protect)
    untouched = (mask * (protect <= 0.5))[0, 0] == 0
    # the edits' own output, before to_u8 (which copies the original bytes where nothing changed)
    assert torch.equal(out[0][:, untouched], img[0][:, untouched])
    assert torch.equal(ops.to_u8(out, img_u8)[untouched], img_u8[untouched])


def test_the_fast_recolor_matches_the_per_pixel_formula_within_40_db():
    img = shaded_scene(96, 128)
    mask = torch.zeros(1, 1, 96, 128)
    mask[..., 10:60, :] = 1
    fast = ops.recolor(img, "#5b7f95", mask, chroma_step=ops.CHROMA_STEP)
    exact = ops.recolor(img, "#5b7f95", mask)
    mse = float(((fast - exact)[..., 10:60, :] ** 2).mean())
    assert 10 * math.log10(1 / mse) >= 40


def test_a_texture_is_the_same_whether_its_region_was_cropped_or_not():
    img, mask = room(), box_mask(40, 64, 10, 50)
    cropped = ops.apply_edit(img, mask, "texture", "wood", crop=True)
    whole = ops.apply_edit(img, mask, "texture", "wood", crop=False)
    assert torch.allclose(cropped, whole, atol=1e-6)


def test_removed_region_matches_its_surroundings():
    img = torch.full((1, 3, H, W), 0.6)
    img[..., 20:40, 20:40] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)  # a red lamp on grey
    mask = box_mask(18, 42, 18, 42)
    out = ops.apply_edit(img, mask, "remove", "")
    hole = out[..., 20:40, 20:40]
    assert (hole - 0.6).abs().max() < 0.02


@pytest.mark.parametrize("name", ops.TEXTURES)
def test_textures_are_deterministic_and_distinct(name):
    a, b = ops.make_texture(name, 48, 48), ops.make_texture(name, 48, 48)
    assert torch.equal(a, b) and a.shape == (3, 48, 48)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and float(a.std()) > 0.005
    others = [ops.make_texture(n, 48, 48) for n in ops.TEXTURES if n != name]
    assert all(not torch.allclose(a, o, atol=0.02) for o in others)


@pytest.mark.parametrize(("name", "check"), [
    ("warm", lambda i, o: (o[:, 0] - o[:, 2]).mean() > (i[:, 0] - i[:, 2]).mean()),
    ("cool", lambda i, o: (o[:, 2] - o[:, 0]).mean() > (i[:, 2] - i[:, 0]).mean()),
    ("bright", lambda i, o: o.mean() > i.mean()),
    ("dark", lambda i, o: o.mean() < i.mean()),
    ("vivid", lambda i, o: o.std(dim=1).mean() > i.std(dim=1).mean()),
    ("muted", lambda i, o: o.std(dim=1).mean() < i.std(dim=1).mean()),
])
def test_tones_move_the_image_the_named_way(name, check):
    img = room()
    assert check(img, ops.tone(img, name))


def test_segmenter_finds_floor_at_the_bottom_and_ceiling_at_the_top():
    masks = PriorClusterSegmenter().masks(room(), ["floor", "ceiling", "wall"])
    floor, ceiling = masks["floor"][0, 0], masks["ceiling"][0, 0]
    assert floor[52:].mean() > 0.7 and floor[:30].mean() < 0.05
    assert ceiling[:6].mean() > 0.6 and ceiling[30:].mean() < 0.05


@pytest.mark.parametrize("size", [(8, 300), (300, 8)])
def test_prior_segmenter_takes_a_long_thin_photo(size):
    """A panorama of 1:15 or thinner is a few work pixels across: its masks blur there, not crash."""
    image = torch.linspace(0, 1, size[0]).view(1, 1, -1, 1).expand(1, 3, *size).contiguous()
    masks = PriorClusterSegmenter().masks(image, ["floor", "product"])
    assert {m.shape for m in masks.values()} == {(1, 1, *size)}


def test_prior_segmenter_refuses_a_concept_its_mask_has_nothing_of():
    """A label's prior is a few work pixels: on an 8x8 photo its mask is empty, an edit of nothing."""
    image = torch.full((1, 3, 8, 8), 0.5)
    with pytest.raises(NothingFits, match="label"):
        PriorClusterSegmenter().masks(image, ["label", "product"])
    assert set(PriorClusterSegmenter().masks(image, ["label", "product"], optional=["label"])) == {"product"}


def test_decode_refuses_corrupt_and_oversized_inputs():
    with pytest.raises(BadInput, match="not a readable image"):
        decode(b"this is not a jpeg at all")
    buf = io.BytesIO()
    Image.new("RGB", (4097, 2)).save(buf, "PNG")
    with pytest.raises(BadInput, match="4097x2"):
        decode(buf.getvalue())
    with pytest.raises(BadInput, match="20 MB"):
        decode(b"\xff" * (20 * 1024 * 1024 + 1))


def _saved(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_turns_a_photo_upright_as_its_exif_orientation_says(orientation: int):
    from PIL import ImageOps

    y, x = np.mgrid[0:16, 0:24]  # smooth (JPEG keeps it), and no two corners alike
    stored = Image.fromarray(np.stack([x * 10, y * 15, (x + 2 * y) * 4], axis=2).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_saved(stored, "PNG", exif=exif)))))
    assert np.array_equal(decode(_saved(stored, "PNG", exif=exif)).numpy(), upright)  # PIL's path: exact
    jpeg = decode(_saved(stored, "JPEG", exif=exif, quality=100)).numpy()  # kornia-rs's path
    assert jpeg.shape == upright.shape and np.abs(jpeg.astype(int) - upright).mean() < 4


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_a_mask_on_the_stored_pixels_of_a_turned_photo_is_turned_as_the_photo_is(orientation: int):
    from gpu_consumer.codec import decode_mask, decode_upright

    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    drawn = (rng.random((12, 20)) > 0.5).astype(np.uint8) * 255  # on the stored pixels, 20 wide
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo, found, _ = decode_upright(_saved(Image.fromarray(stored), "PNG", exif=exif))
    assert found == orientation and photo.shape[:2] == (20, 12)
    turned = decode_mask(_saved(Image.fromarray(drawn), "PNG"), (20, 12), orientation)[0, 0].numpy()
    # The oracle: the photo's own pixels, turned by decode, carry the mask as a fourth channel.
    with_mask = np.concatenate([stored, drawn[..., None]], axis=2)
    expected = np.asarray(exif_transposed(with_mask, orientation))[..., 3] / 255.0
    assert np.array_equal(turned, expected)
    upright = (rng.random((20, 12)) > 0.5).astype(np.uint8) * 255  # drawn on the upright photo: as it is
    assert np.array_equal(decode_mask(_saved(Image.fromarray(upright), "PNG"), (20, 12), orientation)[0, 0].numpy(),
                          upright / 255.0)


def exif_transposed(pixels: np.ndarray, orientation: int) -> Image.Image:
    """PIL's own exif_transpose of ``pixels`` (RGBA) saved with ``orientation``."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    return ImageOps.exif_transpose(Image.open(io.BytesIO(_saved(Image.fromarray(pixels), "PNG", exif=exif))))


@pytest.mark.parametrize("orientation", [None, 6])
def test_a_png_is_decoded_once_not_by_its_probe_too(monkeypatch: pytest.MonkeyPatch, orientation: int | None):
    from PIL import PngImagePlugin

    decoded: set[int] = set()  # the PNG files whose pixel data was read
    real = PngImagePlugin.PngImageFile.load_read

    def counted(self: Any, read_bytes: int) -> bytes:
        decoded.add(id(self))
        return real(self, read_bytes)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_read", counted)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    decode(_saved(Image.new("RGB", (24, 16)), "PNG", exif=exif))
    assert len(decoded) == 1  # before: getexif() on the probe of a PNG without EXIF read the pixels too


def test_decode_scales_a_16_bit_grey_and_converts_cmyk():
    grey = np.random.default_rng(1).integers(0, 256, (10, 14), dtype=np.uint8)
    wide = Image.fromarray(grey.astype(np.uint16) * 257)  # the same greys over 16 bits
    assert wide.mode.startswith("I;16")
    decoded = decode(_saved(wide, "PNG")).numpy()
    assert all(np.array_equal(decoded[..., c], grey) for c in range(3))  # before: all white
    rgb = np.random.default_rng(2).integers(40, 216, (16, 16, 3), dtype=np.uint8)
    cmyk = decode(_saved(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100)).numpy()  # before: refused
    assert np.abs(cmyk.astype(int) - rgb).mean() < 8


def test_decode_refuses_a_jpeg_of_endless_scans_and_an_image_too_thin():
    progressive = _saved(Image.new("L", (64, 64), 128), "JPEG", progressive=True)
    assert decode(progressive).shape == (64, 64, 3)
    assert progressive.endswith(b"\xff\xd9")
    last_scan = progressive[progressive.rfind(b"\xff\xda"):-2]
    bomb = progressive[:-2] + last_scan * 200 + b"\xff\xd9"  # each repeat read over the whole image
    with pytest.raises(BadInput, match="scans"):
        decode(bomb)
    mpo = io.BytesIO()  # the same bomb as the first image of an MPO (which PIL does not call JPEG)
    Image.new("L", (64, 64), 128).save(mpo, "MPO", save_all=True, append_images=[Image.new("L", (8, 8))],
                                      progressive=True)
    first_end = mpo.getvalue().find(b"\xff\xd9")
    first = mpo.getvalue()[:first_end]
    with pytest.raises(BadInput, match="scans"):
        decode(first + first[first.rfind(b"\xff\xda"):] * 200 + mpo.getvalue()[first_end:])
    motion = progressive + b"\xff\xda" * 500  # what a phone appends after the photo (a video) is not read
    assert decode(motion).shape == (64, 64, 3)
    with pytest.raises(BadInput, match="at least 8"):
        decode(_saved(Image.new("RGB", (4096, 7)), "PNG"))
    assert decode(_saved(Image.new("RGB", (8, 8)), "PNG")).shape == (8, 8, 3)


def test_decode_refuses_a_png_flooded_with_chunks_and_reads_one_of_many_data_chunks():
    import struct
    import zlib

    from gpu_consumer.codec import MAX_PNG_CHUNKS, PNG_SIGNATURE

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    w = h = 16
    pixels = zlib.compress((b"\0" + bytes(range(3 * w))) * h)
    head = PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    tail = chunk(b"IEND", b"")
    split = b"".join(chunk(b"IDAT", pixels[i:i + 8]) for i in range(0, len(pixels), 8))  # tiny, many: legal
    assert decode(head + split + tail)[0, :, :].flatten().tolist() == list(range(3 * w))
    flood = head + chunk(b"abCd", b"") * (MAX_PNG_CHUNKS + 10) + chunk(b"IDAT", pixels) + tail
    with pytest.raises(BadInput, match="chunks"):
        decode(flood)


def test_preview_longest_side_is_320():
    preview = encode_preview(torch.zeros(500, 800, 3, dtype=torch.uint8))
    assert Image.open(io.BytesIO(preview)).size == (320, 200)


@settings(max_examples=80, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), seed=st.integers(0, 2**31 - 1), density=st.floats(0, 0.2),
       pad=st.integers(0, 9), odd=st.floats(0, 0.1))
def test_a_masks_bounding_box_holds_every_pixel_it_has_and_its_pad(h, w, seed, density, pad, odd):
    """Negative pixels and NaNs (a fraction ``odd`` of them) count as empty, as ever."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, 1, h, w, generator=g) * (torch.rand(1, 1, h, w, generator=g) < density)
    mask[torch.rand(1, 1, h, w, generator=g) < odd] = -0.5
    mask[torch.rand(1, 1, h, w, generator=g) < odd] = float("nan")
    ys, xs = (mask[0, 0] > 0).nonzero(as_tuple=True)
    box = ops.mask_bbox(mask, pad)
    if ys.numel() == 0:
        assert box is None
        return
    assert box == (max(0, int(ys.min()) - pad), min(h, int(ys.max()) + pad + 1),
                   max(0, int(xs.min()) - pad), min(w, int(xs.max()) + pad + 1))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 24), w=st.integers(1, 24), seed=st.integers(0, 2**31 - 1))
def test_to_u8_keeps_the_original_bytes_exactly_where_nothing_changed(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, h, w, generator=g)
    original = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    changed = torch.rand(1, 1, h, w, generator=g) * (torch.rand(1, 1, h, w, generator=g) > 0.5)
    rounded = (image[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    expected = torch.where((changed[0, 0] > 0)[..., None], rounded, original)
    assert torch.equal(ops.to_u8(image, original, changed), expected)
    assert torch.equal(ops.to_u8(image, original), rounded)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), rgb=st.booleans(), seed=st.integers(0, 2**31 - 1),
       level=st.integers(0, 9), transposed=st.booleans())
def test_a_png_decodes_to_the_same_pixels_in_pil(h, w, rgb, seed, level, transposed):
    """Our writer against PIL's reader (and its CRC checks): every byte back, grey or RGB, any size,
    a tensor that is not contiguous too."""
    g = torch.Generator().manual_seed(seed)
    shape = (w, h, 3) if rgb else (w, h)
    pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    pixels = pixels.transpose(0, 1) if transposed else pixels.reshape(h, w, *shape[2:])
    img = Image.open(io.BytesIO(encode_png(pixels, level)))
    img.load()
    assert img.mode == ("RGB" if rgb else "L") and img.size == (w, h)
    assert torch.equal(torch.from_numpy(np.asarray(img).copy()), pixels)


def test_a_png_of_a_photo_or_a_mask_is_no_bigger_than_pils():
    """One filter for a photo (a shaded room through JPEG), none for a mask: within 5 % of the size
    of PIL's level-1 PNG, which picks a filter for every row."""
    room = (synthetic_room(400, 640)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(room.numpy()).save(jpeg, "JPEG", quality=90)
    photo = decode(jpeg.getvalue())
    mask = (photo[..., 2] < 100).to(torch.uint8) * 255
    for pixels in (photo, mask):
        pil = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(pil, "PNG", compress_level=1)
        assert len(encode_png(pixels)) <= 1.05 * len(pil.getvalue())


@pytest.mark.parametrize("bad", [torch.zeros(4, 4, 4, dtype=torch.uint8), torch.zeros(4, 4, 3),
                                 torch.zeros(0, 4, dtype=torch.uint8), torch.zeros(2, 4, 4, 3, dtype=torch.uint8)])
def test_png_refuses_what_it_cannot_write(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


# -- masks that follow the image ------------------------------------------------------------------
def shaded_scene(h: int, w: int) -> torch.Tensor:
    """A beige wall with a lighting gradient over a floor of vertical dark-lined planks."""
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    img = torch.empty(3, h, w)
    img[:] = torch.tensor([0.86, 0.80, 0.68]).view(3, 1, 1)
    floor = ys >= 0.6
    img[:, floor] = torch.tensor([0.55, 0.38, 0.24]).view(3, 1)
    img[:, floor & (torch.remainder(torch.arange(w), 16) < 3).view(1, w).expand(h, w)] *= 0.7
    return (img * (1.05 - 0.3 * xs)).clamp(0, 1).unsqueeze(0)


def with_object(img: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scene with a sharp green-grey box pasted in, and the box's exact mask."""
    out = img.clone()
    out[..., y0:y1, x0:x1] = torch.tensor([0.30, 0.45, 0.40]).view(1, 3, 1, 1)
    truth = torch.zeros(1, 1, *img.shape[-2:])
    truth[..., y0:y1, x0:x1] = 1
    return out, truth


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / (a | b).sum())


def test_a_coarse_mask_snaps_to_the_objects_sharp_edge():
    img, truth = with_object(shaded_scene(128, 192), 15, 60, 60, 140)  # on the wall
    ys = torch.arange(128).view(128, 1).float()
    xs = torch.arange(192).view(1, 192).float()
    blob = ((((ys - 37) / 26) ** 2 + ((xs - 98) / 44) ** 2) < 1).float().view(1, 1, 128, 192)  # rounded, off by px
    refined = refine.refine(img, blob, radius=8)
    assert iou(blob, truth) < 0.85
    assert iou(refined, truth) > 0.97
    assert float(refined[0, 0, 16, 61]) > 0.9  # the corner the blob cut off


def test_a_mask_edge_on_planks_is_kept_where_colour_cannot_tell_the_sides_apart():
    img = shaded_scene(128, 192)
    floor = torch.zeros(1, 1, 128, 192)
    floor[..., 77:, 40:150] = 1  # a floor mask cut across the planks: no image edge there
    refined = refine.refine(img, floor, radius=8)
    assert torch.equal(refined > 0.5, floor > 0.5)


def test_a_mask_across_a_flat_surface_keeps_its_edge():
    img = torch.full((1, 3, 64, 64), 0.6)
    half = box_mask(0, 64, 0, 30)
    assert torch.equal(refine.refine(img, half, radius=6), half)


def test_a_clients_mask_stays_as_it_is_and_a_segmenters_follows_the_photo():
    img, truth = with_object(shaded_scene(320, 480), 100, 220, 150, 350)
    blob = torch.nn.functional.avg_pool2d(torch.nn.functional.max_pool2d(truth, 9, 1, 4), 5, 1, 2)  # 4 px too big, soft
    refined = refine.refine_masks(img, {"sofa": blob, "guess": blob}, client={"sofa"})
    assert torch.equal(refined["sofa"], blob)  # bit for bit, soft values included
    off = (refined["guess"] > 0.5) != (truth > 0.5)
    assert int(off.sum()) < int(((blob > 0.5) != (truth > 0.5)).sum()) * 2 / 3, int(off.sum())  # moved to the edge


def pipeline_task(concepts: dict[str, dict[str, str]], protect: list[str]) -> Task:
    return Task.parse(json.dumps({
        "job_id": "00000000-0000-4000-8000-000000000001", "user_id": "u", "idx": 0, "concepts": concepts,
        "protect": protect, "input_key": "in", "output_key": "out.png", "preview_key": "out.jpg",
        "mask_keys": {}, "idempotency_key": "k:0"}).encode())


@settings(max_examples=15, deadline=None)
@given(y0=st.integers(0, 100), x0=st.integers(0, 150), h=st.integers(1, 60), w=st.integers(1, 80),
       ry=st.integers(0, 100), rx=st.integers(0, 150),
       action=st.sampled_from([("recolor", "#aa3300"), ("texture", "brick"), ("remove", ""), ("tone", "dark")]))
def test_protect_masks_as_given_are_bit_identical_after_refinement_and_edits(y0, x0, h, w, ry, rx, action):
    img, _ = with_object(shaded_scene(128, 192), 40, 90, 60, 140)
    image_u8 = (img[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    sofa, rug = torch.zeros(1, 1, 128, 192), torch.zeros(1, 1, 128, 192)
    sofa[..., y0:y0 + h, x0:x0 + w] = 1
    rug[..., ry:ry + 24, rx:rx + 40] = 1  # a second protected concept: each one's pixels are kept
    pipeline = ImagePipeline(s3=None, bucket="", device=torch.device("cpu"))
    task = pipeline_task({"wall": {"action": action[0], "value": action[1]},
                          "floor": {"action": "recolor", "value": "#224466"}}, ["sofa", "rug"])
    out = pipeline.compute(image_u8, {"sofa": sofa, "rug": rug}, task)
    kept = (sofa[0, 0] > 0.5) | (rug[0, 0] > 0.5)
    assert torch.equal(out[kept], image_u8[kept])



def test_protection_begins_above_one_half_as_documented():
    img, wall = room(), box_mask(10, 46, 0, W)
    edits = {"wall": {"action": "recolor", "value": "#2255cc"}}
    half = torch.full((1, 1, H, W), 0.5)
    assert torch.equal(ops.apply_edits(img, {"wall": wall}, edits, half), ops.apply_edits(img, {"wall": wall}, edits))

# -- remove with structure ----------------------------------------------------------------------
def delta_e(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (kornia.color.rgb_to_lab(a) - kornia.color.rgb_to_lab(b)).square().sum(1).sqrt()[0]


@pytest.mark.parametrize("box", [(78, 110, 40, 120), (20, 60, 100, 170), (60, 100, 30, 90)],
                         ids=["on the planks", "on the wall", "across the wall's foot"])
def test_remove_continues_the_planks_the_wall_and_its_boundary(box):
    scene = shaded_scene(128, 192)
    img, mask = with_object(scene, *box)
    out = ops.apply_edit(img, mask, "remove", "")
    inside = mask[0, 0] > 0.5
    error = delta_e(out, scene)[inside]
    smooth = ops.blend(img, fill.push_pull(img, 1 - mask), mask)
    assert float(error.median()) <= 2.0
    assert float(error.median()) < float(delta_e(smooth, scene)[inside].median())


def test_remove_is_deterministic():
    img, mask = with_object(shaded_scene(128, 192), 78, 110, 40, 120)
    assert torch.equal(ops.apply_edit(img, mask, "remove", ""), ops.apply_edit(img, mask, "remove", ""))


@pytest.mark.parametrize("size", [(256, 256), (1024, 768)])
def test_a_removal_of_all_but_a_corner_fills_from_the_corner_not_black(size):
    # Pixels with no known one on their row or column (push-pull's), far from the corner: the
    # coarsest cells there knew nothing, and came out black (a client's mask, billed as done).
    h, w = size
    colour = torch.tensor([0.8, 0.6, 0.4]).view(1, 3, 1, 1)
    img = colour.expand(1, 3, h, w).clone()
    mask = torch.ones(1, 1, h, w)
    mask[..., :12, :12] = 0
    assert fill.has_surroundings(mask)
    out = ops.apply_edit(img, mask, "remove", "")
    assert float((out - colour).abs().max()) < 1e-3


def test_a_huge_or_unreadable_client_mask_fails_the_item_without_decoding_it():
    import io

    from PIL import Image

    from gpu_consumer.codec import MAX_SIDE, decode_mask

    buf = io.BytesIO()
    Image.new("1", (MAX_SIDE + 1, 8)).save(buf, "PNG")  # a few hundred bytes on the wire
    with pytest.raises(BadInput, match="limit"):
        decode_mask(buf.getvalue(), (8, 8))
    with pytest.raises(BadInput, match="readable"):
        decode_mask(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, (8, 8))
    small = io.BytesIO()
    Image.new("L", (4, 2), 255).save(small, "PNG")
    assert decode_mask(small.getvalue(), (2, 4)).shape == (1, 1, 2, 4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.data())
def test_a_hole_has_surroundings_exactly_when_some_pixel_is_farther_than_the_rim_from_it(h, w, data):
    # The oracle walks every pixel: is any more than RIM pixels (in x or y) from every hole pixel?
    cells = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    hole = np.array(cells, dtype=bool).reshape(h, w)
    if data.draw(st.booleans()):  # near-whole holes too: a box grown to the edges, with gaps
        top, left_, bottom, right = (data.draw(st.integers(0, n)) for n in (fill.RIM + 1, fill.RIM + 1, h, w))
        hole[:] = False
        hole[top:max(top + 1, h - bottom // 4), left_:max(left_ + 1, w - right // 4)] = True
        for y, x in data.draw(st.lists(st.tuples(st.integers(0, h - 1), st.integers(0, w - 1)), max_size=3)):
            hole[y, x] = False
    points = np.argwhere(hole)
    left = points.size == 0 or any(
        np.abs(points - (y, x)).max(axis=1).min() > fill.RIM for y in range(h) for x in range(w))
    mask = torch.from_numpy(hole.astype(np.float32)).view(1, 1, h, w)
    assert fill.has_surroundings(mask) == left
