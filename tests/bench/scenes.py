"""Procedural interior scenes with ground truth: the photo, each concept's exact mask and, for
every object, the same scene without it (what a perfect ``remove`` returns).

A scene is ceiling, wall and floor (planks or tiles) under a lighting gradient, with a sofa
(straight-topped back, two arms, a seat) standing on the floor in front of the wall, a compact
round or oval lamp anywhere on the free wall, and sometimes a rug on the floor. Layout, shapes,
colours, textures, light and noise all come from the seed; the photo goes through a JPEG round
trip as an upload does. Masks are occlusion-aware (the wall's mask has holes where the sofa and
the lamp stand). The object-free renders reuse the scene's light and noise, so outside the
removed object they equal the photo before JPEG bit for bit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OBJECTS = ("sofa", "lamp", "rug")  # painted over the room in this order


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # [H, W, 3] uint8, after the JPEG round trip (the upload)
    masks: dict[str, np.ndarray]  # concept -> [H, W] bool, the visible pixels of that concept
    removed: dict[str, np.ndarray] = field(default_factory=dict)  # object -> [H, W, 3] uint8 without it
    colours: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # mean sRGB albedo

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


def _smooth_noise(h: int, w: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Value noise in [-1, 1] with about ``cells`` bumps across the long side."""
    ch, cw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    grid = torch.rand(1, 1, ch, cw, generator=gen) * 2 - 1
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)[0, 0]


def _colour(gen: torch.Generator, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> torch.Tensor:
    low, high = torch.tensor(lo), torch.tensor(hi)
    return low + (high - low) * torch.rand(3, generator=gen)


def _distinct(gen: torch.Generator, lo: tuple[float, float, float], hi: tuple[float, float, float],
              others: list[torch.Tensor], min_de: float = 18.0) -> torch.Tensor:
    """A colour at least ``min_de`` (CIE76) from each of ``others``: two touching things of one
    colour are a test of a different kind (no colour segmenter can split them)."""
    def lab(c: torch.Tensor) -> torch.Tensor:
        return kornia.color.rgb_to_lab(c.view(1, 3, 1, 1)).view(3)

    colour = _colour(gen, lo, hi)
    for _ in range(100):
        if all(float((lab(colour) - lab(o)).norm()) >= min_de for o in others):
            break
        colour = _colour(gen, lo, hi)
    return colour


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=gen))


def _floor(h: int, w: int, top: int, gen: torch.Generator, wall: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Planks (staggered rows, darker grooves, per-plank tone, grain) or tiles with grout (the
    albedo and the base colour)."""
    ys = torch.arange(h).view(h, 1).expand(h, w).float()
    xs = torch.arange(w).view(1, w).expand(h, w).float()
    if float(torch.rand(1, generator=gen)) < 0.55:
        base = _distinct(gen, (0.45, 0.28, 0.15), (0.70, 0.50, 0.32), [wall])
        row_h = max(4.0, h * _uniform(gen, 0.035, 0.06))
        plank_w = w * _uniform(gen, 0.18, 0.35)
        row = torch.floor((ys - top) / row_h)
        shift = (row * 0.37 % 1.0) * plank_w
        plank = torch.floor((xs + shift) / plank_w)
        ident = (row * 131 + plank * 17) % 97 / 97.0
        tone = 0.88 + 0.2 * ident
        groove = (((ys - top) % row_h) < max(1.0, row_h * 0.08)) | (((xs + shift) % plank_w) < max(1.0, w / 600))
        grain = 0.04 * torch.sin(ys * 0.9 + 3 * _smooth_noise(h, w, 40, gen))
        albedo = base.view(3, 1, 1) * (tone + grain).unsqueeze(0)
        return albedo * torch.where(groove, 0.7, 1.0).unsqueeze(0), base
    base = _distinct(gen, (0.55, 0.55, 0.52), (0.85, 0.82, 0.76), [wall])
    tile = max(6.0, w * _uniform(gen, 0.06, 0.12))
    grout = (((ys - top) % (tile * 0.6)) < max(1.0, tile * 0.05)) | ((xs % tile) < max(1.0, tile * 0.05))
    speckle = 0.03 * _smooth_noise(h, w, 120, gen)
    albedo = base.view(3, 1, 1) * (1 + speckle).unsqueeze(0)
    return torch.where(grout.unsqueeze(0), base.view(3, 1, 1) * 0.6, albedo), base


def _sofa(h: int, w: int, floor_y: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A sofa seen from the front: a back with straight top corners, two arms and a seat (the
    mask, and the arms' part of it)."""
    width = int(w * _uniform(gen, 0.3, 0.55))
    x0 = int(_uniform(gen, 0.05, 0.95) * (w - width))
    bottom = min(h - 2, floor_y + int(h * _uniform(gen, 0.05, 0.16)))
    top = floor_y - int(h * _uniform(gen, 0.12, 0.22))
    arm_w = max(2, int(width * _uniform(gen, 0.08, 0.14)))
    arm_top = top + int((bottom - top) * _uniform(gen, 0.3, 0.45))
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:bottom - int(h * 0.015), x0 + arm_w:x0 + width - arm_w] = True  # back and seat
    arms = torch.zeros(h, w, dtype=torch.bool)
    arms[arm_top:bottom, x0:x0 + arm_w] = True
    arms[arm_top:bottom, x0 + width - arm_w:x0 + width] = True
    mask |= arms
    legs = max(2, arm_w // 3)
    mask[bottom - int(h * 0.015):bottom, x0 + arm_w:x0 + arm_w + legs] = True
    mask[bottom - int(h * 0.015):bottom, x0 + width - arm_w - legs:x0 + width - arm_w] = True
    return mask, arms


def _lamp(h: int, w: int, wall: tuple[int, int], sofa: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A round or oval lamp anywhere on the wall, clear of the sofa."""
    ys = torch.arange(h).view(h, 1).float()
    xs = torch.arange(w).view(1, w).float()
    for _ in range(50):
        rx = max(3.0, w * _uniform(gen, 0.02, 0.045))
        ry = rx * _uniform(gen, 0.8, 1.6)
        cy = _uniform(gen, wall[0] + ry + 4, wall[1] - ry - 4)
        cx = _uniform(gen, rx + 4, w - rx - 4)
        mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        near = F.max_pool2d(mask.float().view(1, 1, h, w), 9, 1, 4)[0, 0] > 0
        if not (near & sofa).any():
            return mask
    return torch.zeros(h, w, dtype=torch.bool)


def _rug(h: int, w: int, floor_y: int, sofa: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A flat rectangle on the floor in front of the sofa."""
    cols = sofa.any(dim=0).nonzero()
    sofa_bottom = int(sofa.any(dim=1).nonzero().max()) if sofa.any() else floor_y
    top = min(h - 6, sofa_bottom + int(h * 0.02))
    bottom = min(h - 2, top + int(h * _uniform(gen, 0.06, 0.12)))
    x0 = int(cols.min()) - int(w * 0.05) if len(cols) else w // 4
    x1 = int(cols.max()) + int(w * 0.05) if len(cols) else 3 * w // 4
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:bottom, max(0, x0):min(w, x1)] = True
    return mask


def _to_u8(image: torch.Tensor) -> np.ndarray:
    u8: np.ndarray = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return u8


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()


def generate(seed: int, size: tuple[int, int] = (480, 640), rug: bool | None = None) -> Scene:
    """The scene of ``seed`` at ``size`` (H, W); ``rug`` forces a rug in or out (default: by seed)."""
    h, w = size
    gen = torch.Generator().manual_seed(seed)
    ceiling_y = int(h * _uniform(gen, 0.08, 0.2))
    floor_y = int(h * _uniform(gen, 0.58, 0.72))
    ceiling_c = _colour(gen, (0.88, 0.88, 0.86), (0.97, 0.96, 0.95))
    wall_c = _distinct(gen, (0.35, 0.3, 0.25), (0.85, 0.8, 0.75), [ceiling_c], 12.0)
    ys = torch.arange(h).view(h, 1).expand(h, w)
    regions = {"ceiling": ys < ceiling_y, "wall": (ys >= ceiling_y) & (ys < floor_y), "floor": ys >= floor_y}
    albedo = torch.empty(3, h, w)
    albedo[:, regions["ceiling"]] = ceiling_c.view(3, 1)
    wall = wall_c.view(3, 1, 1) * (1 + 0.03 * _smooth_noise(h, w, 30, gen)).unsqueeze(0)
    albedo = torch.where(regions["wall"].unsqueeze(0), wall, albedo)
    floor, floor_c = _floor(h, w, floor_y, gen, wall_c)
    albedo = torch.where(regions["floor"].unsqueeze(0), floor, albedo)
    colours = {"ceiling": tuple(ceiling_c.tolist()), "wall": tuple(wall_c.tolist()), "floor": tuple(floor_c.tolist())}

    sofa, arms = _sofa(h, w, floor_y, gen)
    sofa_c = _distinct(gen, (0.1, 0.1, 0.1), (0.6, 0.55, 0.6), [wall_c, floor_c])
    sofa_albedo = sofa_c.view(3, 1, 1) * (1 + 0.04 * _smooth_noise(h, w, 60, gen)).unsqueeze(0)
    lamp = _lamp(h, w, (ceiling_y, floor_y), sofa, gen)
    bright = float(torch.rand(1, generator=gen)) < 0.6
    lamp_c = _distinct(gen, (0.85, 0.7, 0.3) if bright else (0.1, 0.1, 0.1),
                       (1.0, 0.95, 0.7) if bright else (0.3, 0.25, 0.2), [wall_c])
    with_rug = bool(torch.rand(1, generator=gen) < 0.5) if rug is None else rug
    rug_mask = _rug(h, w, floor_y, sofa, gen) if with_rug else torch.zeros(h, w, dtype=torch.bool)
    rug_c = _distinct(gen, (0.3, 0.1, 0.1), (0.8, 0.5, 0.5), [floor_c, sofa_c])
    rug_albedo = rug_c.view(3, 1, 1) * (1 + 0.05 * _smooth_noise(h, w, 200, gen)).unsqueeze(0)
    layers = {"rug": (rug_mask & ~sofa, rug_albedo), "sofa": (sofa, sofa_albedo * torch.where(arms, 0.92, 1.0)),
              "lamp": (lamp, lamp_c.view(3, 1, 1).expand(3, h, w))}
    colours.update({"sofa": tuple(sofa_c.tolist()), "lamp": tuple(lamp_c.tolist()), "rug": tuple(rug_c.tolist())})

    # Light from a window at a random side: a smooth falloff, stronger towards the floor.
    lx, ly = _uniform(gen, -0.2, 1.2), _uniform(gen, 0.1, 0.5)
    yy = torch.linspace(0, 1, h).view(h, 1)
    xx = torch.linspace(0, 1, w).view(1, w)
    light = (1.1 - _uniform(gen, 0.2, 0.45) * ((xx - lx) ** 2 + (yy - ly) ** 2).sqrt()).clamp(0.45, 1.2)
    sigma = _uniform(gen, 0.004, 0.015)
    noise = sigma * torch.randn(3, h, w, generator=gen)
    quality = int(_uniform(gen, 85, 95))

    def render(skip: str | None) -> np.ndarray:
        out = albedo.clone()
        for name in OBJECTS:
            mask, layer = layers[name]
            if name != skip:
                out = torch.where(mask.unsqueeze(0), layer, out)
        return _to_u8(out * light + noise)

    masks = {name: regions[name].clone() for name in ("ceiling", "wall", "floor")}
    for name in OBJECTS:  # occlusion: what an object covers leaves every mask below it
        visible = layers[name][0]
        for other in masks:
            masks[other] &= ~visible
        if visible.any():
            masks[name] = visible.clone()
    photo = render(None)
    removed = {name: render(name) for name in masks if name in OBJECTS}
    return Scene(seed=seed, image=_jpeg(photo, quality), masks={k: v.numpy() for k, v in masks.items()},
                 removed=removed, colours=colours)
