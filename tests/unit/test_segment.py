"""The built-in segmenters: regions named by rules, refusal when nothing fits, and a learned
model plugged in from a local TorchScript file (a tiny one, built and scripted here)."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_consumer.codec import BadInput
from gpu_consumer.segment import (
    NothingFits,
    RegionSegmenter,
    TorchScriptSegmenter,
    built_in,
    components,
    load_labels,
)

H, W = 120, 160


def room(lamp: tuple[int, int] | None = (40, 120), sofa: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Ceiling, wall and floor bands, a sofa standing on the floor and a round lamp centred at
    ``lamp`` (row, column); the image ``[1, 3, H, W]`` and each concept's drawn mask."""
    g = torch.Generator().manual_seed(3)
    ys = torch.arange(H).view(H, 1).expand(H, W)
    xs = torch.arange(W).view(1, W).expand(H, W)
    drawn = {"ceiling": ys < 18, "wall": (ys >= 18) & (ys < 80), "floor": ys >= 80}
    colours = {"ceiling": (0.94, 0.93, 0.9), "wall": (0.62, 0.7, 0.55), "floor": (0.5, 0.33, 0.2),
               "sofa": (0.25, 0.2, 0.45), "lamp": (0.98, 0.85, 0.4)}
    if sofa:
        drawn["sofa"] = (ys >= 60) & (ys < 95) & (xs >= 40) & (xs < 110)
    if lamp is not None:
        drawn["lamp"] = (ys - lamp[0]) ** 2 + (xs - lamp[1]) ** 2 <= 36
    image = torch.empty(3, H, W)
    for name, region in drawn.items():  # later ones cover earlier ones
        image[:, region] = torch.tensor(colours[name]).view(3, 1)
        for other in drawn:
            if other != name and list(drawn).index(other) < list(drawn).index(name):
                drawn[other] = drawn[other] & ~region
    shade = torch.linspace(1.0, 0.8, W).view(1, 1, W)  # light from the left
    image = (image * shade + 0.01 * torch.randn(3, H, W, generator=g)).clamp(0, 1)
    return image.unsqueeze(0), drawn


def iou(mask: torch.Tensor, truth: torch.Tensor) -> float:
    m = mask[0, 0] > 0.5
    return float((m & truth).sum() / (m | truth).sum())


@pytest.mark.parametrize("lamp", [(40, 120), (30, 15), (70, 150), (25, 80)])
def test_the_lamp_is_found_wherever_it_hangs_on_the_wall(lamp: tuple[int, int]) -> None:
    image, drawn = room(lamp)
    masks = RegionSegmenter().masks(image, ["lamp", "wall", "sofa"])
    assert iou(masks["lamp"], drawn["lamp"]) > 0.8
    assert iou(masks["wall"], drawn["wall"]) > 0.9
    assert iou(masks["sofa"], drawn["sofa"]) > 0.9


def test_planes_and_a_sofa_with_straight_corners_are_found() -> None:
    image, drawn = room()
    masks = RegionSegmenter().masks(image, ["ceiling", "wall", "floor", "sofa"])
    for concept in ("ceiling", "wall", "floor", "sofa"):
        assert iou(masks[concept], drawn[concept]) > 0.95, concept
    corner = masks["sofa"][0, 0, 60:63, 40:43]  # the sofa's top-left corner is square, not rounded
    assert bool((corner > 0.5).all())


def test_a_concept_nothing_fits_is_refused_as_bad_input() -> None:
    image, _ = room(lamp=None)
    with pytest.raises(NothingFits, match="lamp") as refused:
        RegionSegmenter().masks(image, ["wall", "lamp"])
    assert isinstance(refused.value, BadInput)  # the worker fails the item (refunded), no retry


def test_an_optional_concept_that_is_missing_is_left_out() -> None:
    image, _ = room(lamp=None, sofa=False)
    masks = RegionSegmenter().masks(image, ["wall", "sofa"], optional=["sofa"])
    assert set(masks) == {"wall"}


def test_a_concept_without_a_rule_is_refused_or_given_to_the_fallback() -> None:
    image, _ = room()
    with pytest.raises(NothingFits, match="curtain"):
        RegionSegmenter().masks(image, ["curtain"])

    class Everything:
        def masks(self, image: torch.Tensor, concepts: object, optional: object = ()) -> dict[str, torch.Tensor]:
            return {"curtain": torch.ones(1, 1, H, W)}

    masks, instances = RegionSegmenter(fallback=Everything()).segment(image, ["curtain", "wall"])
    assert float(masks["curtain"].min()) == 1.0
    assert {(i.concept, i.source) for i in instances} == {("curtain", "prior"), ("wall", "segmenter")}


def test_instances_give_box_area_and_confidence_in_image_pixels() -> None:
    image, drawn = room((40, 120))
    big = torch.nn.functional.interpolate(image, scale_factor=4, mode="nearest")  # 480 x 640
    _, instances = RegionSegmenter().segment(big, ["lamp"])
    (lamp,) = instances
    x0, y0, x1, y1 = lamp.box
    assert abs(x0 - 114 * 4) <= 8 and abs(x1 - 127 * 4) <= 8 and abs(y0 - 34 * 4) <= 8 and abs(y1 - 47 * 4) <= 8
    assert abs(lamp.area - int(drawn["lamp"].sum()) * 16) < 0.25 * int(drawn["lamp"].sum()) * 16
    assert 0.5 <= lamp.confidence <= 1.0
    assert json.loads(json.dumps(lamp.as_json()))["source"] == "segmenter"


def bfs_count(right: list[list[bool]], down: list[list[bool]], h: int, w: int) -> int:
    """Connected components by breadth-first search: the oracle."""
    seen = [[False] * w for _ in range(h)]
    count = 0
    for sy in range(h):
        for sx in range(w):
            if seen[sy][sx]:
                continue
            count += 1
            queue = deque([(sy, sx)])
            seen[sy][sx] = True
            while queue:
                y, x = queue.popleft()
                steps = []
                if x + 1 < w and right[y][x]:
                    steps.append((y, x + 1))
                if x > 0 and right[y][x - 1]:
                    steps.append((y, x - 1))
                if y + 1 < h and down[y][x]:
                    steps.append((y + 1, x))
                if y > 0 and down[y - 1][x]:
                    steps.append((y - 1, x))
                for ny, nx in steps:
                    if not seen[ny][nx]:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
    return count


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(2, 9), density=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_components_agree_with_breadth_first_search(h: int, w: int, density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    right = torch.rand(h, w - 1, generator=g) < density
    down = torch.rand(max(0, h - 1), w, generator=g) < density
    labels = components(right, down)
    assert int(labels.max()) + 1 == bfs_count(right.tolist(), down.tolist(), h, w)
    assert bool((labels[:, :-1] == labels[:, 1:])[right].all()) and bool((labels[:-1] == labels[1:])[down].all())


class Redness(torch.nn.Module):
    """A two-class 'model': class 0 where red dominates, class 1 where blue does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1] - x[:, 2:3], x[:, 2:3] - x[:, :1]], dim=1) * 20


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.jit.script(Redness()).save(str(path))
    return path


def test_a_torchscript_model_plugs_in_with_a_label_map(model_file: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"wall": [0], "sofa": [1]}))
    image = torch.zeros(1, 3, 60, 80)
    image[..., :, :50] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)  # red wall left of column 50
    image[..., :, 50:] = torch.tensor([0.1, 0.2, 0.9]).view(1, 3, 1, 1)
    segmenter = built_in(str(model_file), str(labels))
    assert isinstance(segmenter, TorchScriptSegmenter)
    masks, instances = segmenter.segment(image, ["wall", "sofa"])
    assert bool((masks["wall"][0, 0, :, :48] > 0.99).all()) and bool((masks["wall"][0, 0, :, 52:] < 0.01).all())
    assert [(i.concept, i.source) for i in instances] == [("wall", "model"), ("sofa", "model")]
    assert instances[0].box == (0, 0, 50, 60)


def test_a_model_that_finds_nothing_refuses(model_file: Path) -> None:
    red = torch.zeros(1, 3, 40, 40)
    red[:, 0] = 1.0
    segmenter = TorchScriptSegmenter(model_file, {"wall": (0,), "sofa": (1,)})
    with pytest.raises(NothingFits, match="sofa"):
        segmenter.masks(red, ["wall", "sofa"])
    assert set(segmenter.masks(red, ["wall", "sofa"], optional=["sofa"])) == {"wall"}


def test_bad_model_and_label_files_are_refused_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        TorchScriptSegmenter(junk)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"wall": ["zero"]}))
    with pytest.raises(ValueError, match="class indices"):
        load_labels(labels)
    assert isinstance(built_in(None), RegionSegmenter)
