"""Before/after images of each action, made by the project itself (for the README).

    python -m gpu_consumer.demo docs/images

The input is a synthetic room (no photos ship with the project). Every edit goes through the
worker's own path, ``ImagePipeline.compute``: wall and floor masks come from the built-in
segmenter, the lamp's from a client mask (a loose ellipse around it, used as given), the sofa is
protected, and every segmenter mask is refined against the photo first. Two comparisons show what the refinement and the
structured fill change, side by side at twice the size:

* ``compare_refine.png``: the sofa's corner after ``recolor wall``, with the colour-cluster
  segmenter's masks as they come (``PriorClusterSegmenter``, the default before the region
  segmenter; left: a beige halo, blue on the protected sofa) and through the worker's own path
  (right: the region segmenter, refined). On this room the region segmenter's masks show neither
  even unrefined: the picture shows the segmenter's change more than the refinement's.
* ``compare_remove.png``: a rug removed from the planks, by push-pull (left: a smooth smudge)
  and by the structured fill (right: the planks continue).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from domain.contracts.gpu_task import Task
from gpu_consumer import fill, ops
from gpu_consumer.pipeline import ImagePipeline
from gpu_consumer.segment import PriorClusterSegmenter

ACTIONS = {
    "recolor": ("wall", {"action": "recolor", "value": "#5b7f95"}),
    "tone": ("floor", {"action": "tone", "value": "cool"}),
    "texture": ("floor", {"action": "texture", "value": "marble"}),
    "remove": ("lamp", {"action": "remove", "value": ""}),
}


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    return ys, xs


def lamp_mask(h: int = 384, w: int = 512) -> torch.Tensor:
    """What a client would upload as masks/.../{idx}_lamp.png: small objects need one."""
    ys, xs = _grid(h, w)
    return ((((ys - 0.42) ** 2 / 0.016 + (xs - 0.8) ** 2 / 0.0028) < 1).float()).view(1, 1, h, w)


def rug_mask(h: int = 384, w: int = 512) -> torch.Tensor:
    """Where :func:`synthetic_room` puts a rug when asked for one."""
    ys, xs = _grid(h, w)
    return ((((ys - 0.87) ** 2 / 0.004 + (xs - 0.22) ** 2 / 0.01) < 1).float()).view(1, 1, h, w)


def synthetic_room(h: int = 384, w: int = 512, lamp: bool = True, rug: bool = False) -> torch.Tensor:
    """A room with shading: ceiling, wall, wooden floor, a sofa and a lamp (and a rug if asked).
    Without the lamp or the rug it is the object-free truth a removal is judged against."""
    ys, xs = _grid(h, w)
    img = torch.zeros(3, h, w)
    colour = {"ceiling": (0.93, 0.93, 0.91), "wall": (0.86, 0.80, 0.68), "floor": (0.55, 0.38, 0.24)}
    regions = {"ceiling": ys < 0.15, "wall": (ys >= 0.15) & (ys < 0.72), "floor": ys >= 0.72}
    for name, region in regions.items():
        img[:, region] = torch.tensor(colour[name]).view(3, 1)
    planks = (torch.sin(xs * 90) > 0.96) & regions["floor"]
    img[:, planks] *= 0.8
    sofa = (ys > 0.55) & (ys < 0.8) & (xs > 0.3) & (xs < 0.7)
    img[:, sofa] = torch.tensor((0.35, 0.42, 0.40)).view(3, 1)
    if lamp:
        img[:, ((ys - 0.42) ** 2 / 0.012 + (xs - 0.8) ** 2 / 0.002) < 1] = torch.tensor((0.95, 0.85, 0.45)).view(3, 1)
    if rug:
        img[:, rug_mask(h, w)[0, 0] > 0.5] = torch.tensor((0.25, 0.30, 0.55)).view(3, 1)
    light = 1.05 - 0.35 * ((xs - 0.2) ** 2 + (ys - 0.3) ** 2).sqrt()  # a window on the left
    return (img * light).clamp(0, 1).unsqueeze(0)


def to_u8(image: torch.Tensor) -> torch.Tensor:
    return (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8)


def save(image_u8: torch.Tensor, path: Path) -> None:
    Image.fromarray(image_u8.numpy()).save(path)


def task(concepts: dict[str, dict[str, str]], protect: list[str]) -> Task:
    """A worker task for one demo image (no storage behind it: keys are placeholders)."""
    return Task.parse(json.dumps({
        "job_id": "00000000-0000-4000-8000-000000000000", "user_id": "demo", "idx": 0, "concepts": concepts,
        "protect": protect, "input_key": "demo", "output_key": "demo.png", "preview_key": "demo.jpg",
        "mask_keys": {}, "idempotency_key": "demo:0"}).encode())


def side_by_side(left: torch.Tensor, right: torch.Tensor, box: tuple[int, int, int, int]) -> Image.Image:
    """Two uint8 images cropped to ``box`` (y0, y1, x0, x1), next to each other at twice the size."""
    y0, y1, x0, x1 = box
    panes = [Image.fromarray(img[y0:y1, x0:x1].numpy()) for img in (left, right)]
    w, h = panes[0].size
    out = Image.new("RGB", (2 * w + 4, h), (255, 255, 255))
    out.paste(panes[0], (0, 0))
    out.paste(panes[1], (w + 4, 0))
    return out.resize((out.width * 2, out.height * 2), Image.Resampling.NEAREST)


def compare_refine(room: torch.Tensor, pipeline: ImagePipeline) -> Image.Image:
    edit = {"wall": {"action": "recolor", "value": "#5b7f95"}}
    raw = PriorClusterSegmenter().masks(room, ["wall", "sofa"])
    unrefined = ops.apply_edits(room, raw, edit, protect=raw["sofa"])
    refined = pipeline.compute(to_u8(room), {}, task(edit, ["sofa"]))
    return side_by_side(to_u8(unrefined), refined, (180, 260, 120, 240))


def compare_remove(pipeline: ImagePipeline) -> Image.Image:
    with_rug = synthetic_room(lamp=False, rug=True)
    smudge = ops.blend(with_rug, fill.push_pull(with_rug, 1 - rug_mask()), rug_mask())
    structured = pipeline.compute(to_u8(with_rug), {"rug": rug_mask()},
                                  task({"rug": {"action": "remove", "value": ""}}, []))
    return side_by_side(to_u8(smudge), structured, (300, 384, 40, 190))


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    room = synthetic_room()
    save(to_u8(room), out / "before.png")
    pipeline = ImagePipeline(s3=None, bucket="", device=torch.device("cpu"))
    for action, (concept, edit) in ACTIONS.items():
        client = {"lamp": lamp_mask()} if concept == "lamp" else {}
        save(pipeline.compute(to_u8(room), client, task({concept: edit}, ["sofa"])), out / f"after_{action}.png")
        print(f"{action}: {concept} -> {out / f'after_{action}.png'}")
    compare_refine(room, pipeline).save(out / "compare_refine.png")
    compare_remove(pipeline).save(out / "compare_remove.png")
    print(f"comparisons -> {out / 'compare_refine.png'}, {out / 'compare_remove.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
