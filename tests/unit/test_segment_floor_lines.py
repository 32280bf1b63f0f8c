"""The floor's thin lines (plank grooves) that the colour decision gave to a dark sofa standing on
it go back to the floor; the sofa's own parts, legs included, stay the sofa's."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_consumer.segment import RegionSegmenter, thin_parts

H, W = 120, 160
SOFA_ROWS, SOFA_COLS = (50, 92), (40, 120)  # the body; legs below it to row 98
LEGS = ((40, 48), (112, 120))  # columns: 8 pixels wide, as wide as the groove is long
GROOVE_COL = 80  # a vertical plank groove, one pixel wide, from under the sofa to the bottom


def room() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A wall, a planked floor from row 70 and a dark blue-grey sofa whose body ends at row 92,
    on two legs down to row 98; one dark groove (darker than the sofa) runs down the floor from
    the sofa's underside. The image ``[1, 3, H, W]`` and the drawn masks."""
    g = torch.Generator().manual_seed(5)
    ys = torch.arange(H).view(H, 1).expand(H, W)
    xs = torch.arange(W).view(1, W).expand(H, W)
    sofa = (ys >= SOFA_ROWS[0]) & (ys < SOFA_ROWS[1]) & (xs >= SOFA_COLS[0]) & (xs < SOFA_COLS[1])
    for x0, x1 in LEGS:
        sofa |= (ys >= SOFA_ROWS[1]) & (ys < 98) & (xs >= x0) & (xs < x1)
    floor = (ys >= 70) & ~sofa
    groove = floor & (xs == GROOVE_COL)
    image = torch.empty(3, H, W)
    image[:] = torch.tensor((0.8, 0.75, 0.65)).view(3, 1, 1)  # wall
    image[:, floor] = torch.tensor((0.5, 0.55, 0.58)).view(3, 1)  # planks
    image[:, groove] = torch.tensor((0.28, 0.31, 0.33)).view(3, 1)  # a groove, darker than the sofa
    image[:, sofa] = torch.tensor((0.36, 0.34, 0.42)).view(3, 1)
    image = (image + 0.005 * torch.randn(3, H, W, generator=g)).clamp(0, 1)
    return image.unsqueeze(0), {"floor": floor, "sofa": sofa, "groove": groove}


def test_a_groove_under_a_dark_sofa_is_floor_not_sofa() -> None:
    image, drawn = room()
    masks = RegionSegmenter().masks(image, ["floor", "sofa"])
    floor, sofa = masks["floor"][0, 0] > 0.5, masks["sofa"][0, 0] > 0.5
    under = drawn["groove"] & (torch.arange(H).view(H, 1) < SOFA_ROWS[1] + 6)  # the groove's top, by the sofa
    assert under.sum() == 6
    assert bool(floor[under].all()) and not bool(sofa[under].any())


def test_the_sofas_legs_stay_the_sofas() -> None:
    image, drawn = room()
    masks = RegionSegmenter().masks(image, ["floor", "sofa"])
    floor, sofa = masks["floor"][0, 0] > 0.5, masks["sofa"][0, 0] > 0.5
    legs = drawn["sofa"] & (torch.arange(H).view(H, 1) >= SOFA_ROWS[1])
    assert bool(sofa[legs].all()) and not bool(floor[legs].any())


def test_the_floor_alone_gets_the_groove_too() -> None:
    image, drawn = room()
    floor = RegionSegmenter().masks(image, ["floor"])["floor"][0, 0] > 0.5
    assert bool(floor[drawn["groove"]].all())
    assert not bool(floor[drawn["sofa"]].any())


def test_thin_parts_are_a_blocks_one_pixel_spur_not_its_body() -> None:
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[5:15, 5:15] = True
    mask[15:19, 9] = True  # a spur one pixel wide
    spur = torch.zeros_like(mask)
    spur[15:19, 9] = True
    assert torch.equal(thin_parts(mask, 1), spur)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**16), st.floats(0.5, 0.9))
def test_thin_parts_are_the_pixels_no_square_inside_the_mask_covers(px: int, seed: int, density: float) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(16, 16, generator=g) < density
    side = 2 * px + 1
    padded = torch.ones(16 + 2 * px, 16 + 2 * px, dtype=torch.bool)  # outside the image counts as inside
    padded[px:-px, px:-px] = mask
    covered = torch.zeros_like(padded)
    for y in range(padded.shape[0] - side + 1):  # brute force: every square inside the mask
        for x in range(padded.shape[1] - side + 1):
            if bool(padded[y:y + side, x:x + side].all()):
                covered[y:y + side, x:x + side] = True
    assert torch.equal(thin_parts(mask, px), mask & ~covered[px:-px, px:-px])
