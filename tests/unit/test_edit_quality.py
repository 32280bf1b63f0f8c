"""Edit quality against ground truth: the metrics of ``tests.bench.quality`` on hand-made cases
whose answer is known, then the worker's own compute on a small fixed set of generated scenes,
held to the goals of issue 20 (see ``palette bench --quality`` for the full set)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gpu_consumer import ops
from tests.bench import quality
from tests.bench.quality import Case
from tests.bench.scenes import Scene, generate

N = 40
TARGET_HEX = "#2e8b57"
TARGET_RGB = np.array([round(255 * c) for c in ops.hex_to_rgb(TARGET_HEX)], dtype=np.uint8)


def flat_scene() -> Scene:
    """A grey 40 x 40 'wall' (left 24 columns) beside a beige 'floor', a 6 x 6 'lamp' on the
    wall at rows 10..15, columns 8..13, a 'sofa' square on the floor, and the lamp-free render."""
    image = np.full((N, N, 3), 128, dtype=np.uint8)
    image[:, 24:] = (200, 180, 150)
    wall = np.zeros((N, N), dtype=bool)
    wall[:, :24] = True
    lamp = np.zeros_like(wall)
    lamp[10:16, 8:14] = True
    sofa = np.zeros_like(wall)
    sofa[30:36, 30:36] = True
    removed = image.copy()
    image[lamp] = (250, 220, 60)
    image[sofa] = (40, 40, 120)
    masks = {"wall": wall & ~lamp, "lamp": lamp, "sofa": sofa, "floor": ~wall & ~sofa}
    return Scene(seed=0, image=image, masks=masks, removed={"lamp": removed}, colours={})


RECOLOR = Case("recolor", "wall", {"action": "recolor", "value": TARGET_HEX}, ("sofa",))


def test_recolouring_exactly_half_the_target_covers_half() -> None:
    scene = flat_scene()
    after = scene.image.copy()
    half = scene.masks["wall"] & (np.arange(N)[:, None] < N // 2)  # the top 20 rows of the wall
    after[half] = TARGET_RGB
    row = quality.measure(RECOLOR, scene, after)
    assert row["coverage"] == pytest.approx(half.sum() / scene.masks["wall"].sum())
    assert row["leak"] == 0 and row["protect"] == 0


def test_changes_far_outside_are_leak_and_inside_the_protected_region_are_counted() -> None:
    scene = flat_scene()
    after = scene.image.copy()
    after[scene.masks["wall"]] = TARGET_RGB
    after[0:2, 36:40] = (0, 0, 0)  # 8 floor pixels, more than 3 px from the wall
    after[31, 31:34] = (0, 0, 0)  # 3 sofa pixels
    row = quality.measure(RECOLOR, scene, after)
    outside = N * N - N * (24 + 3)  # columns 27.. are farther than 3 px from the wall
    assert row["leak"] == pytest.approx((8 + 3) / outside)
    assert row["protect"] == 3
    assert row["coverage"] == 1.0


def test_old_colour_left_around_an_object_is_halo() -> None:
    scene = flat_scene()
    after = scene.image.copy()
    after[scene.masks["wall"]] = TARGET_RGB
    frame = np.zeros((N, N), dtype=bool)
    frame[9:17, 7:15] = True
    frame &= ~scene.masks["lamp"]  # the one-pixel frame around the lamp keeps its old grey
    after[frame] = scene.image[frame]
    ring = np.zeros((N, N), dtype=bool)
    ring[0:26, 0:24] = True  # within 10 px (chessboard) of the lamp ...
    ring[20:40, 20:24] = True  # ... or of the sofa, inside the wall
    ring &= scene.masks["wall"]
    row = quality.measure(RECOLOR, scene, after)
    assert row["halo"] == pytest.approx(frame.sum() / ring.sum())
    assert row["delta_l"] > 0  # the target's L differs from grey: lightness is not kept here


def test_a_perfect_removal_scores_zero_delta_e_and_no_removal_scores_no_coverage() -> None:
    scene = flat_scene()
    case = Case("remove", "lamp", {"action": "remove", "value": ""}, ())
    perfect = quality.measure(case, scene, scene.removed["lamp"])
    assert perfect["delta_e"] == pytest.approx(0, abs=1e-3) and perfect["coverage"] == 1.0
    untouched = quality.measure(case, scene, scene.image.copy())
    assert untouched["coverage"] == 0.0 and untouched["delta_e"] > 20


def test_a_generated_scene_is_deterministic_and_its_masks_partition_it() -> None:
    scene, again = generate(5, (120, 160), rug=True), generate(5, (120, 160), rug=True)
    # Seen to fail once in a loaded full unit run, never since (929 pairs under 3 busy cores): say
    # what differed, should it again.
    differs = [name for name, a, b in [("image", scene.image, again.image),
                                       *((f"mask {k}", scene.masks[k], again.masks[k]) for k in scene.masks),
                                       *((f"without {k}", scene.removed[k], again.removed[k]) for k in scene.removed)]
               if not np.array_equal(a, b)]
    assert not differs, (differs, int((scene.image != again.image).sum()), torch.get_num_threads())
    assert set(scene.removed) == {"sofa", "lamp", "rug"}
    stacked = sum(m.astype(int) for m in scene.masks.values())
    assert (stacked == 1).all()  # every pixel belongs to exactly one concept
    assert scene.masks["sofa"].any() and scene.masks["lamp"].any() and scene.masks["rug"].any()


# -- the worker's compute on a small fixed set --------------------------------------------------
SMALL = [(seed, (240, 320)) for seed in range(3)]


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    return quality.run(SMALL)


def lines(result: dict[str, Any], source: str) -> list[dict[str, Any]]:
    return [s for s in quality.summary(result) if s["source"] == source]


def test_true_masks_meet_the_goals(measured: dict[str, Any]) -> None:
    for s in lines(measured, "true"):
        assert s["refused"] == 0
        assert s["protect_changed_px"] == 0, s
        assert s["coverage_min"] >= 0.97, s
        assert s["leak_max"] <= 0.01, s
        assert s.get("halo_max", 0) <= 0.02, s
        assert s.get("delta_e_median_max", 0) <= 5, s


def test_the_built_in_segmenter_meets_the_goals(measured: dict[str, Any]) -> None:
    for concept, v in quality.iou_summary(measured).items():
        assert v["min"] >= (0.9 if concept in quality.PLANES else 0.8), (concept, v)
    for s in lines(measured, "segmenter"):
        assert s["refused"] == 0
        assert s["coverage_min"] >= 0.97, s
        assert s["leak_max"] <= 0.01, s
        # Held in every scene here (1.0 % in this set's worst): the plank grooves a dark sofa's
        # mask took are the floor's again (segment.floor_lines), a groove along the sofa's whole
        # bottom edge too (segment.contact; 1.44 % in the full set's worst).
        assert s.get("halo_mean", 0) <= 0.02 and s.get("halo_max", 0) <= 0.02, s
        assert s.get("delta_e_median_max", 0) <= 5, s


def test_the_fast_recolor_is_40_db_or_more_from_the_per_pixel_formula_on_every_scene(measured: dict[str, Any]) -> None:
    assert len(measured["fast_recolor_db"]) == len(SMALL)
    assert min(measured["fast_recolor_db"]) >= quality.GOALS["fast_recolor_db"], measured["fast_recolor_db"]



def test_the_fast_recolor_figure_falls_for_a_coarser_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    # The figure can disagree with the code: the same formula per pixel scores no difference at
    # all, and cells of 32 px, which spread the wall's change over 32 px, score lower than 4 px.
    scene = generate(0, (240, 320))
    at_4 = quality.fast_recolor_db(scene, "#5b7f95")
    monkeypatch.setattr(ops, "CHROMA_STEP", 1)
    assert quality.fast_recolor_db(scene, "#5b7f95") == float("inf")
    monkeypatch.setattr(ops, "CHROMA_STEP", 32)
    assert quality.fast_recolor_db(scene, "#5b7f95") < at_4 - 2
