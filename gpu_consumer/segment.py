"""Concept masks without model weights: colour clustering in Lab with per-concept position priors.

Behind the :class:`Segmenter` protocol so a learned model can be plugged in later.

Limits, honestly: this is a heuristic. It finds *regions of similar colour in the place a
concept usually is* (walls in the upper middle, floors at the bottom, a seller's product in
the centre). It does not know what a sofa is: two concepts of the same colour in the same
place merge, a concept outside its usual place is missed, and small objects (lamps, labels)
are hit or miss. Clients that need precision upload their own masks
(``masks/{user}/{job}/{idx}_{concept}.png``), which are always used as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import kornia
import torch
import torch.nn.functional as F

WORK = 64  # clustering resolution (pixels on the long side)
CLUSTERS = 8

Prior = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _band(y0: float, y1: float, x0: float = 0.0, x1: float = 1.0) -> Prior:
    def prior(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return ((ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)).float()
    return prior


def _ellipse(cy: float, cx: float, ry: float, rx: float) -> Prior:
    def prior(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return (((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1).float()
    return prior


def _border(width: float) -> Prior:
    def prior(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return ((ys < width) | (ys > 1 - width) | (xs < width) | (xs > 1 - width)).float()
    return prior


def _sides(y0: float, y1: float, width: float) -> Prior:
    def prior(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return (((xs < width) | (xs > 1 - width)) & (ys >= y0) & (ys <= y1)).float()
    return prior


PRIORS: dict[str, Prior] = {
    # interior
    "ceiling": _band(0.0, 0.18), "wall": _band(0.12, 0.6), "floor": _band(0.72, 1.0),
    "rug": _band(0.75, 1.0, 0.2, 0.8), "sofa": _ellipse(0.68, 0.5, 0.16, 0.35),
    "chair": _ellipse(0.68, 0.25, 0.15, 0.15), "table": _ellipse(0.72, 0.5, 0.1, 0.22),
    "bed": _ellipse(0.7, 0.5, 0.2, 0.4), "cabinet": _sides(0.3, 0.85, 0.25),
    "curtain": _sides(0.05, 0.75, 0.18), "lamp": _ellipse(0.35, 0.75, 0.15, 0.1),
    "plant": _sides(0.4, 0.9, 0.15),
    # seller
    "product": _ellipse(0.5, 0.5, 0.3, 0.3), "background": _border(0.15),
    "surface": _band(0.78, 1.0), "shadow": _ellipse(0.82, 0.5, 0.08, 0.3),
    "prop": _sides(0.3, 0.9, 0.22), "label": _ellipse(0.5, 0.5, 0.08, 0.12),
}


class Segmenter(Protocol):
    def masks(self, image: torch.Tensor, concepts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Soft masks ``[1, 1, H, W]`` for the concepts of one image ``[1, 3, H, W]``."""
        ...


def kmeans(features: torch.Tensor, k: int, iterations: int = 10) -> torch.Tensor:
    """Deterministic k-means (init on evenly spaced points of the lightness order)."""
    order = features[:, 0].argsort()
    centres = features[order[torch.linspace(0, len(order) - 1, k).long()]].clone()
    labels = torch.zeros(len(features), dtype=torch.long, device=features.device)
    for _ in range(iterations):
        labels = torch.cdist(features, centres).argmin(dim=1)
        for c in range(k):
            members = features[labels == c]
            if len(members):
                centres[c] = members.mean(dim=0)
    return labels


class PriorClusterSegmenter:
    """Colour clusters (Lab + position) picked by how well they fill each concept's prior."""

    def __init__(self, clusters: int = CLUSTERS, min_score: float = 0.35, softness: float = 2.0) -> None:
        self.clusters = clusters
        self.min_score = min_score
        self.softness = softness

    def masks(self, image: torch.Tensor, concepts: Sequence[str]) -> dict[str, torch.Tensor]:
        _, _, h, w = image.shape
        scale = WORK / max(h, w)
        sh, sw = max(4, round(h * scale)), max(4, round(w * scale))
        small = F.interpolate(image, size=(sh, sw), mode="area")
        lab = kornia.color.rgb_to_lab(small)[0]
        ys = torch.linspace(0, 1, sh, device=image.device).view(sh, 1).expand(sh, sw)
        xs = torch.linspace(0, 1, sw, device=image.device).view(1, sw).expand(sh, sw)
        feats = torch.stack([lab[0] / 100, lab[1] / 128, lab[2] / 128, ys * 0.5, xs * 0.5], dim=-1).reshape(-1, 5)
        labels = kmeans(feats, self.clusters).reshape(sh, sw)
        out: dict[str, torch.Tensor] = {}
        for concept in concepts:
            prior = PRIORS.get(concept)
            if prior is None:
                continue
            p = prior(ys, xs)
            chosen = torch.zeros(sh, sw, device=image.device)
            best, best_score = None, 0.0
            for c in range(self.clusters):
                member = (labels == c).float()
                size = member.sum()
                if size == 0:
                    continue
                score = float((member * p).sum() / size)  # how much of the cluster lies in the prior
                if score >= self.min_score:
                    # A region about the prior's size is taken whole (not cut at the prior's edge);
                    # a much larger one (the wall behind a lamp) only where the prior is.
                    whole = size <= 3 * p.sum()
                    chosen = torch.maximum(chosen, member if whole else member * p)
                if score > best_score:
                    best, best_score = c, score
            if chosen.sum() == 0 and best is not None:
                chosen = (labels == best).float() * p
            # Soften at the work resolution (cheap), then upsample: edges stay soft at full size.
            k = int(2 * round(2 * self.softness) + 1)
            soft = kornia.filters.gaussian_blur2d(chosen.view(1, 1, sh, sw), (k, k), (self.softness, self.softness))
            soft = (soft * 1.6 - 0.3).clamp(0, 1)  # a solid core with a soft rim
            out[concept] = F.interpolate(soft, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
        return out
