"""A floor line one pixel wide running along the whole bottom edge of a dark sofa (a plank groove
as dark as the sofa, smeared into it by JPEG) is floor, not sofa: the floor's edit reaches the
sofa, and the sofa loses no more than that row."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from gpu_consumer.segment import RegionSegmenter

H, W = 240, 320
FLOOR_Y = 150
SOFA_ROWS, SOFA_COLS = (95, 187), (70, 250)  # the body; a groove right below it, legs beside
GROOVE_ROWS = (187, 188)  # one pixel, along the sofa's whole bottom and across the floor
LEGS = ((70, 82), (238, 250))


def room() -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """A wall, a planked floor from FLOOR_Y with a horizontal groove every 16 rows (one of them
    right under the sofa's body), a dark red sofa on two legs, through a JPEG round trip. The
    image ``[1, 3, H, W]`` and the drawn masks."""
    g = np.random.default_rng(3)
    ys = np.arange(H)[:, None].repeat(W, 1)
    xs = np.arange(W)[None, :].repeat(H, 0)
    sofa = (ys >= SOFA_ROWS[0]) & (ys < SOFA_ROWS[1]) & (xs >= SOFA_COLS[0]) & (xs < SOFA_COLS[1])
    for x0, x1 in LEGS:
        sofa |= (ys >= SOFA_ROWS[1]) & (ys < GROOVE_ROWS[1] + 6) & (xs >= x0) & (xs < x1)
    floor = (ys >= FLOOR_Y) & ~sofa
    groove = floor & ((ys - GROOVE_ROWS[0]) % 16 == 0)
    image = np.empty((H, W, 3))
    image[:] = (127, 104, 133)  # wall
    image[floor] = (133, 57, 44)  # planks
    image[groove] = (80, 34, 22)  # grooves: as dark as the sofa, another hue
    image[sofa] = (105, 23, 37)
    image = (image + g.normal(0, 2, image.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    photo = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    tensor = torch.from_numpy(photo.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return tensor, {"floor": floor, "sofa": sofa, "groove": groove}


def test_the_groove_along_a_dark_sofas_bottom_edge_is_floor() -> None:
    image, drawn = room()
    masks = RegionSegmenter().masks(image, ["floor", "sofa"])
    floor, sofa = masks["floor"][0, 0].numpy() > 0.5, masks["sofa"][0, 0].numpy() > 0.5
    under = drawn["groove"] & (np.arange(H)[:, None] < GROOVE_ROWS[1])  # the groove along the sofa
    under &= (np.arange(W)[None, :] >= LEGS[0][1] + 2) & (np.arange(W)[None, :] < LEGS[1][0] - 2)
    assert under.sum() > 100
    assert floor[under].mean() > 0.95
    assert sofa[under].mean() < 0.05


def test_the_sofa_keeps_all_but_its_bottom_row() -> None:
    image, drawn = room()
    sofa = RegionSegmenter().masks(image, ["sofa"])["sofa"][0, 0].numpy() > 0.5
    body = drawn["sofa"] & (np.arange(H)[:, None] < SOFA_ROWS[1] - 1)
    assert sofa[body].mean() > 0.99
    assert not sofa[drawn["floor"] & ~drawn["groove"]].any()
