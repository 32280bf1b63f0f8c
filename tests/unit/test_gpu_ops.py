"""Pure image ops on small synthetic images."""

from __future__ import annotations

import io

import kornia
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gpu_consumer import ops
from gpu_consumer.codec import BadInput, decode, encode_preview
from gpu_consumer.segment import PriorClusterSegmenter

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
    changed = mask * (protect <= 0.5)
    out_u8 = ops.to_u8(out, img_u8, changed)
    untouched = (changed[0, 0] == 0)
    assert torch.equal(out_u8[untouched], img_u8[untouched])


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


def test_decode_refuses_corrupt_and_oversized_inputs():
    with pytest.raises(BadInput, match="not a readable image"):
        decode(b"this is not a jpeg at all")
    buf = io.BytesIO()
    Image.new("RGB", (4097, 2)).save(buf, "PNG")
    with pytest.raises(BadInput, match="4097x2"):
        decode(buf.getvalue())
    with pytest.raises(BadInput, match="20 MB"):
        decode(b"\xff" * (20 * 1024 * 1024 + 1))


def test_preview_longest_side_is_320():
    preview = encode_preview(torch.zeros(500, 800, 3, dtype=torch.uint8))
    assert Image.open(io.BytesIO(preview)).size == (320, 200)
