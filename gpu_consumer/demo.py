"""Before/after images of each action, made by the project itself (for the README).

    python -m gpu_consumer.demo docs/images

The input is a synthetic room (no photos ship with the project); wall and floor masks come from the
built-in segmenter, exactly as the worker uses it without client masks; the lamp's mask is a
client-provided one (small objects need one, see gpu_consumer/segment.py). The sofa is protected.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from gpu_consumer import ops
from gpu_consumer.segment import PriorClusterSegmenter

ACTIONS = {
    "recolor": ("wall", {"action": "recolor", "value": "#5b7f95"}),
    "tone": ("floor", {"action": "tone", "value": "cool"}),
    "texture": ("floor", {"action": "texture", "value": "marble"}),
    "remove": ("lamp", {"action": "remove", "value": ""}),
}


def lamp_mask(h: int = 384, w: int = 512) -> torch.Tensor:
    """What a client would upload as masks/.../{idx}_lamp.png: small objects need one."""
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    return ((((ys - 0.42) ** 2 / 0.016 + (xs - 0.8) ** 2 / 0.0028) < 1).float()).view(1, 1, h, w)


def synthetic_room(h: int = 384, w: int = 512) -> torch.Tensor:
    """A room with shading: ceiling, wall, wooden floor, a sofa and a lamp."""
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    img = torch.zeros(3, h, w)
    colour = {"ceiling": (0.93, 0.93, 0.91), "wall": (0.86, 0.80, 0.68), "floor": (0.55, 0.38, 0.24)}
    regions = {"ceiling": ys < 0.15, "wall": (ys >= 0.15) & (ys < 0.72), "floor": ys >= 0.72}
    for name, region in regions.items():
        img[:, region] = torch.tensor(colour[name]).view(3, 1)
    planks = (torch.sin(xs * 90) > 0.96) & regions["floor"]
    img[:, planks] *= 0.8
    sofa = (ys > 0.55) & (ys < 0.8) & (xs > 0.3) & (xs < 0.7)
    img[:, sofa] = torch.tensor((0.35, 0.42, 0.40)).view(3, 1)
    lamp = ((ys - 0.42) ** 2 / 0.012 + (xs - 0.8) ** 2 / 0.002) < 1
    img[:, lamp] = torch.tensor((0.95, 0.85, 0.45)).view(3, 1)
    light = 1.05 - 0.35 * ((xs - 0.2) ** 2 + (ys - 0.3) ** 2).sqrt()  # a window on the left
    return (img * light).clamp(0, 1).unsqueeze(0)


def save(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    room = synthetic_room()
    save(room, out / "before.png")
    segmenter = PriorClusterSegmenter()
    for action, (concept, edit) in ACTIONS.items():
        masks = segmenter.masks(room, [concept, "sofa"])
        if concept == "lamp":
            masks["lamp"] = lamp_mask()
        edited = ops.apply_edits(room, masks, {concept: edit}, protect=masks["sofa"])
        save(edited, out / f"after_{action}.png")
        print(f"{action}: {concept} -> {out / f'after_{action}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
