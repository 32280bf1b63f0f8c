"""Concept masks for images that come without a client mask, behind one :class:`Segmenter` protocol.

- :class:`RegionSegmenter` (no weights): the image is cut into regions of similar colour at a
  reduced resolution (connected neighbours within a small colour step, so a lighting gradient
  stays one region; thin seams handed to their neighbours; similar neighbours merged), and the
  regions are named by rules (:class:`Layout`): ceiling, wall and floor are large planar regions
  by position; a sofa (or bed) is a large region standing on the floor in front of the wall; a
  lamp is a compact, solid region that differs from the wall around it, wherever it hangs; a rug
  is flat and lies on the floor. Each mask's edge is then placed pixel by pixel at full size
  (:func:`snap`), and the floor's thin lines that went to the sofa standing on it are handed back
  to the floor (:func:`floor_lines`). Each found instance has a box, an area and a confidence.
- :class:`TorchScriptSegmenter`: a semantic segmentation model from a local file the operator
  provides, with a label map (ADE20K's by default); nothing is downloaded.
- :class:`PriorClusterSegmenter`: colour clusters picked by per-concept position priors; it knows
  where a concept usually is, not what it looks like (kept as a fallback for concepts without a
  region rule, e.g. the seller preset's).

When no region fits a concept, the segmenters refuse (:class:`NothingFits`, a ``BadInput``: the
item fails with the reason and is refunded) rather than edit the wrong place; a concept passed as
``optional`` (a protected one: nothing to protect is not an error) is left out instead. Honest
limits of the rules: two touching things of one colour are one region; objects the rules do not
know (chairs, plants, shelves) need a client mask or a model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import kornia
import torch
import torch.nn.functional as F

from gpu_consumer.codec import BadInput
from gpu_consumer.refine import box_sum

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
    def masks(self, image: torch.Tensor, concepts: Sequence[str],
              optional: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """Soft masks ``[1, 1, H, W]`` for the concepts of one image ``[1, 3, H, W]``. A concept
        in ``optional`` (a protected one) that is not found is left out; any other raises
        :class:`NothingFits`."""
        ...

    def segment(self, image: torch.Tensor, concepts: Sequence[str],
                optional: Collection[str] = ()) -> tuple[dict[str, torch.Tensor], list[Instance]]:
        """The masks as :meth:`masks` gives them, and the instances found behind them."""
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

    def masks(self, image: torch.Tensor, concepts: Sequence[str],
              optional: Collection[str] = ()) -> dict[str, torch.Tensor]:
        _, _, h, w = image.shape
        scale = WORK / max(h, w)
        k = int(2 * round(2 * self.softness) + 1)  # the blur's kernel: its reflection padding of
        least = max(4, k // 2 + 1)  # k // 2 raises on a side no longer than that (a 1:15 panorama)
        sh, sw = max(least, round(h * scale)), max(least, round(w * scale))
        small = F.interpolate(image, size=(sh, sw), mode="area")
        lab = kornia.color.rgb_to_lab(small)[0]
        ys = torch.linspace(0, 1, sh, device=image.device).view(sh, 1).expand(sh, sw)
        xs = torch.linspace(0, 1, sw, device=image.device).view(1, sw).expand(sh, sw)
        feats = torch.stack([lab[0] / 100, lab[1] / 128, lab[2] / 128, ys * 0.5, xs * 0.5], dim=-1).reshape(-1, 5)
        labels = kmeans(feats, self.clusters).reshape(sh, sw)
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for concept in concepts:
            prior = PRIORS.get(concept)
            if prior is None:
                if concept not in optional:
                    missing.append(concept)
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
            soft = kornia.filters.gaussian_blur2d(chosen.view(1, 1, sh, sw), (k, k), (self.softness, self.softness))
            soft = (soft * 1.6 - 0.3).clamp(0, 1)  # a solid core with a soft rim
            mask = F.interpolate(soft, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
            if bool((mask > 0.5).any()):
                out[concept] = mask
            elif concept not in optional:  # a prior a few pixels across (a label on an 8x8 photo) or none
                missing.append(concept)
        if missing:  # an edit of nothing would be billed as done
            raise NothingFits(f"no part of the image fits {', '.join(sorted(missing))}; rerun the job "
                              "(POST /jobs/{id}/rerun) and upload a mask to the slot it gives")
        return out

    def segment(self, image: torch.Tensor, concepts: Sequence[str],
                optional: Collection[str] = ()) -> tuple[dict[str, torch.Tensor], list[Instance]]:
        """The masks, each one instance of confidence 0: a position prior, not a finding."""
        out = self.masks(image, concepts, optional)
        return out, _prior_instances(out)


# -- regions: connected areas of similar colour, named by shape, size, placement and colour ----
REGION_WORK = 160  # region resolution (pixels on the long side)
LOCAL_DE = 4.0  # neighbours closer than this (CIE76 at the work resolution) are one region
MERGE_DE = 10.0  # adjacent regions whose mean colours are closer than this merge
WALLS = ("ceiling", "wall", "floor")
STANDING = ("sofa", "bed")  # concepts found by the rule of a large region standing on the floor


class NothingFits(BadInput):
    """No region of the image fits a concept: the item fails (and is refunded) rather than being
    edited in the wrong place."""


@dataclass(frozen=True)
class Instance:
    """One found object: its box ``(x0, y0, x1, y1)`` and area in image pixels, and how sure."""

    concept: str
    box: tuple[int, int, int, int]
    area: int
    confidence: float
    source: str = "segmenter"

    def as_json(self) -> dict[str, object]:
        return {"concept": self.concept, "box": list(self.box), "area": self.area,
                "confidence": round(self.confidence, 3), "source": self.source}

    @classmethod
    def of_mask(cls, concept: str, hard: torch.Tensor, confidence: float, source: str) -> Instance | None:
        """The whole of a boolean mask ``[..., H, W]`` as one instance (None when it is empty)."""
        rows = hard.reshape(hard.shape[-2:]).any(dim=1).nonzero()
        cols = hard.reshape(hard.shape[-2:]).any(dim=0).nonzero()
        if not len(rows):
            return None
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        return cls(concept, box, int(hard.sum()), confidence, source)


def _prior_instances(masks: Mapping[str, torch.Tensor]) -> list[Instance]:
    """Masks guessed from position priors, each as one instance of confidence 0."""
    found = (Instance.of_mask(c, m > 0.5, 0.0, "prior") for c, m in masks.items())
    return [i for i in found if i is not None]


def _distance2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance over the first (channel) dimension; faster than ``norm`` there."""
    d = a - b
    return d[0] * d[0] + d[1] * d[1] + d[2] * d[2]


def _relabel(labels: torch.Tensor) -> torch.Tensor:
    """The same partition with labels 0..n-1."""
    inverse: torch.Tensor = torch.unique(labels, return_inverse=True)[1]
    return inverse


def components(right: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Connected-component labels ``[h, w]`` (0..n-1) of the grid whose links to the right
    (``[h, w-1]`` bool) and downward (``[h-1, w]`` bool) neighbour are given: root hooking with
    pointer jumping (Shiloach-Vishkin style), a few vectorised rounds whatever the shapes."""
    h, w = right.shape[0], down.shape[1]
    index = torch.arange(h * w, device=right.device).view(h, w)
    u = torch.cat([index[:, :-1][right], index[:-1][down]])
    v = torch.cat([index[:, 1:][right], index[1:][down]])
    parent = index.reshape(-1).clone()
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not bool(differ.any()):
            break
        high, low = torch.maximum(pu[differ], pv[differ]), torch.minimum(pu[differ], pv[differ])
        parent = parent.scatter_reduce(0, high, low, "amin")
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
    return _relabel(parent).view(h, w)


@dataclass
class Regions:
    """Region labels at the work resolution and what the rules read of each region."""

    labels: torch.Tensor  # [h, w] long
    lab: torch.Tensor  # [3, h, w] Lab of the work image
    area: torch.Tensor  # [n] pixels
    mean: torch.Tensor  # [n, 3] Lab
    box: torch.Tensor  # [n, 4] y0, x0, y1, x1 (inclusive), work pixels
    centre: torch.Tensor  # [n, 2] y, x in [0, 1]
    touch: dict[tuple[int, int], int]  # (a, b) with a < b -> shared boundary length
    _adjacent: dict[int, dict[int, int]] | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return int(self.area.numel())

    def neighbours(self, region: int) -> dict[int, int]:
        """The regions touching ``region``, with the shared boundary's length (the adjacency is
        built once, on first use: a walk of ``touch`` per call is quadratic on a busy image)."""
        if self._adjacent is None:
            adjacent: dict[int, dict[int, int]] = {}
            for (a, b), n in self.touch.items():
                adjacent.setdefault(a, {})[b] = n
                adjacent.setdefault(b, {})[a] = n
            self._adjacent = adjacent
        return self._adjacent.get(region, {})


def _stats(labels: torch.Tensor, lab: torch.Tensor) -> Regions:
    h, w = labels.shape
    flat = labels.view(-1)
    n = int(flat.max()) + 1
    area = torch.bincount(flat, minlength=n).float()
    mean = torch.stack([torch.bincount(flat, lab[c].reshape(-1), minlength=n) for c in range(3)], 1) / area[:, None]
    ys = torch.arange(h, device=labels.device).view(h, 1).expand(h, w).reshape(-1)
    xs = torch.arange(w, device=labels.device).view(1, w).expand(h, w).reshape(-1)
    box = torch.stack([torch.full((n,), v, dtype=torch.long, device=labels.device).scatter_reduce(0, flat, c, op)
                       for c, op, v in ((ys, "amin", h), (xs, "amin", w), (ys, "amax", 0), (xs, "amax", 0))], 1)
    centre = torch.stack([torch.bincount(flat, ys.float(), minlength=n) / area / max(1, h - 1),
                          torch.bincount(flat, xs.float(), minlength=n) / area / max(1, w - 1)], 1)
    a = torch.cat([labels[:, :-1].reshape(-1), labels[:-1].reshape(-1)])
    b = torch.cat([labels[:, 1:].reshape(-1), labels[1:].reshape(-1)])
    edge = a != b
    key = torch.minimum(a[edge], b[edge]) * n + torch.maximum(a[edge], b[edge])
    keys, counts = torch.unique(key, return_counts=True)
    touch = {(int(k) // n, int(k) % n): int(c) for k, c in zip(keys.tolist(), counts.tolist(), strict=True)}
    return Regions(labels, lab, area, mean, box, centre, touch)


def _dissolve_thin(labels: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """Regions without an interior (edge seams, grooves, noise specks) are handed pixel by pixel
    to the neighbouring region of the closest mean colour, so they cannot bridge two regions."""
    h, w = labels.shape
    n = int(labels.max()) + 1
    pad = F.pad(labels.view(1, 1, h, w).float(), (1, 1, 1, 1), mode="replicate")[0, 0]
    inner = ((pad[1:-1, 1:-1] == pad[:-2, 1:-1]) & (pad[1:-1, 1:-1] == pad[2:, 1:-1])
             & (pad[1:-1, 1:-1] == pad[1:-1, :-2]) & (pad[1:-1, 1:-1] == pad[1:-1, 2:]))
    core = torch.bincount(labels.view(-1), inner.view(-1).float(), minlength=n)
    keep = core >= 4
    out = torch.where(keep[labels], labels, torch.full_like(labels, -1))
    if bool(keep.all()) or not bool(keep.any()):
        return labels
    flat_lab = lab.reshape(3, -1)
    means = torch.zeros(n, 3, device=labels.device)
    known = out.view(-1) >= 0
    means.index_add_(0, out.view(-1)[known], flat_lab[:, known].T)
    means /= torch.bincount(out.view(-1)[known], minlength=n).clamp_min(1).float()[:, None]
    limit = MERGE_DE**2  # a pixel joins a neighbour of its own colour first (the floor in a gap
    while bool((out < 0).any()):  # between two objects comes from the floor at the gap's ends)
        best = torch.full((h, w), limit, device=labels.device)
        choice = out.clone()
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            shifted = torch.roll(out, (dy, dx), (0, 1))
            valid = (shifted >= 0) & (out < 0)
            if dy:
                valid[0 if dy > 0 else -1] = False
            if dx:
                valid[:, 0 if dx > 0 else -1] = False
            dist = _distance2(lab, means[shifted.clamp_min(0)].permute(2, 0, 1))
            better = valid & (dist < best)
            best = torch.where(better, dist, best)
            choice = torch.where(better, shifted, choice)
        if torch.equal(choice, out):
            limit = float("inf")  # nothing of its colour reaches the rest: the closest neighbour wins
        out = choice
    return _relabel(out).view(h, w)


def _merge_similar(regions: Regions) -> torch.Tensor:
    """Adjacent regions whose (running, area-weighted) mean colours are within MERGE_DE, merged
    closest pair first: planks of one floor join, a sofa and the wall behind it do not."""
    parent = list(range(regions.count))
    area = regions.area.tolist()
    mean = regions.mean.tolist()

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def distance(a: int, b: int) -> float:
        return float(sum((x - y) ** 2 for x, y in zip(mean[a], mean[b], strict=True)) ** 0.5)

    for a, b in sorted(regions.touch, key=lambda p: distance(*p)):
        ra, rb = root(a), root(b)
        if ra == rb or distance(ra, rb) >= MERGE_DE:
            continue
        total = area[ra] + area[rb]
        mean[ra] = [(x * area[ra] + y * area[rb]) / total for x, y in zip(mean[ra], mean[rb], strict=True)]
        area[ra] = total
        parent[rb] = ra
    roots = torch.tensor([root(i) for i in range(regions.count)], device=regions.labels.device)
    return _relabel(roots[regions.labels])


def find_regions(image: torch.Tensor, work: int = REGION_WORK) -> Regions:
    """Regions of one image ``[1, 3, H, W]`` at ``work`` pixels on the long side."""
    _, _, h, w = image.shape
    scale = work / max(h, w)
    sh, sw = max(8, round(h * scale)), max(8, round(w * scale))
    small = F.interpolate(image, size=(sh, sw), mode="area")
    lab = kornia.color.rgb_to_lab(small)[0]
    right = _distance2(lab[:, :, 1:], lab[:, :, :-1]) < LOCAL_DE**2
    down = _distance2(lab[:, 1:], lab[:, :-1]) < LOCAL_DE**2
    labels = _dissolve_thin(components(right, down), lab)
    return _stats(_merge_similar(_stats(labels, lab)), lab)


@dataclass(frozen=True)
class Found:
    """The regions named one concept, and how well they fit its rule (0..1)."""

    regions: tuple[int, ...]
    confidence: float


class Layout:
    """Names the regions of an interior: ceiling, wall and floor first (large planar regions by
    position), then the objects in front of them by shape, size, placement and contrast."""

    def __init__(self, regions: Regions) -> None:
        self.r = regions
        self.h, self.w = regions.labels.shape
        n = regions.count
        self.share_top = torch.bincount(regions.labels[0], minlength=n).float() / self.w
        self.share_bottom = torch.bincount(regions.labels[-1], minlength=n).float() / self.w
        box = regions.box
        self.sides = ((box[:, 1] == 0) | (box[:, 3] == self.w - 1)).tolist()
        self.size = (regions.area / (self.h * self.w)).tolist()
        self.cy = regions.centre[:, 0].tolist()
        self.perimeter = [max(1, sum(regions.neighbours(i).values())) for i in range(n)]
        self.ceiling = self._ceiling()
        self.floor = self._floor()
        self.wall = self._wall()
        taken = {*self.ceiling.regions, *self.floor.regions, *self.wall.regions}
        self.objects = [i for i in range(n) if i not in taken]

    def touch(self, region: int, group: Sequence[int]) -> float:
        """The share of a region's boundary it shares with ``group``."""
        near = self.r.neighbours(region)
        return sum(near.get(g, 0) for g in group) / self.perimeter[region]

    def _alike(self, region: int, group: Sequence[int], limit: float = 15.0) -> bool:
        """Whether a region's colour is near that of the group member it shares most boundary with
        (another plank row is; a rug is not)."""
        near = self.r.neighbours(region)
        closest = max(group, key=lambda g: near.get(g, 0))
        return float((self.r.mean[region] - self.r.mean[closest]).norm()) < limit

    def _ceiling(self) -> Found:
        i = int(self.share_top.argmax())
        bottom = float(self.r.box[i, 2]) / self.h
        if self.share_top[i] < 0.5 or self.cy[i] > 0.35 or bottom > 0.5:
            return Found((), 0.0)
        return Found((i,), float(self.share_top[i]))

    def _floor(self) -> Found:
        i = int(self.share_bottom.argmax())
        if self.share_bottom[i] < 0.5 or self.cy[i] < 0.55:
            return Found((), 0.0)
        chosen = [i]
        grew = True
        while grew:  # plank rows or tiles the colour merge kept apart, reaching a side of the frame
            grew = False
            for j in range(self.r.count):
                if j in chosen or j in self.ceiling.regions or not self.sides[j] or self.cy[j] < 0.5:
                    continue
                if float(self.r.box[j, 0]) / self.h > 0.35 and self.touch(j, chosen) > 0.2 and self._alike(j, chosen):
                    chosen.append(j)
                    grew = True
        return Found(tuple(chosen), float(self.share_bottom[i]))

    def _wall(self) -> Found:
        taken = {*self.ceiling.regions, *self.floor.regions}
        candidates = [i for i in range(self.r.count)
                      if i not in taken and self.sides[i] and 0.1 <= self.cy[i] <= 0.8 and self.size[i] > 0.05]
        if not candidates:
            return Found((), 0.0)
        i = max(candidates, key=lambda c: self.size[c])
        return Found((i,), min(1.0, self.size[i] / 0.2))

    def find(self, concept: str) -> Found | None:
        """The regions of ``concept``; None when this layout has no rule for it."""
        if concept in WALLS:
            found: Found = getattr(self, concept)
            if concept != "ceiling" and found.regions:
                # specks the wall or floor encloses (noise, a knot in the wood) are part of it
                specks = [o for o in self.objects if self.size[o] < 0.001 and self.touch(o, found.regions) > 0.9
                          and not self._lamp_like(o)]
                return Found((*found.regions, *specks), found.confidence)
            return found
        rule = {"sofa": self._sofa, "bed": self._sofa, "lamp": self._lamps, "rug": self._rug}.get(concept)
        return rule() if rule is not None else None

    def _sofa(self) -> Found:
        """A large region standing on the floor in front of the wall."""
        best, score = None, 0.0
        for o in self.objects:
            y0, x0, y1, x1 = (float(v) for v in self.r.box[o])
            aspect = (x1 - x0 + 1) / (y1 - y0 + 1)
            if self.size[o] < 0.01 or y1 / self.h < 0.5 or not 0.6 <= aspect <= 6:
                continue
            on_floor, on_wall = self.touch(o, self.floor.regions), self.touch(o, self.wall.regions)
            if on_floor <= 0.05 or on_wall <= 0.05:
                continue
            s = min(1.0, self.size[o] / 0.04) * min(1.0, (on_floor + on_wall) / 0.6)
            if s > score:
                best, score = o, s
        return Found((best,), score) if best is not None else Found((), 0.0)

    def _lamp_like(self, o: int) -> float:
        """How much a region looks like a lamp on the wall: compact, solid, set off from the wall
        around it (0 when it is not one)."""
        y0, x0, y1, x1 = (float(v) for v in self.r.box[o])
        bh, bw = y1 - y0 + 1, x1 - x0 + 1
        solidity = float(self.r.area[o]) / (bh * bw)
        if not self.wall.regions or not 0.0001 <= self.size[o] <= 0.03 or not 0.3 <= bw / bh <= 3.3:
            return 0.0
        on_wall = self.touch(o, self.wall.regions)
        contrast = float((self.r.mean[o] - self.r.mean[self.wall.regions[0]]).norm())
        if on_wall < 0.6 or solidity < 0.5 or contrast < 8:
            return 0.0
        big_enough = min(1.0, float(self.r.area[o]) / 9)  # a few work pixels could be a stain
        return min(1.0, on_wall) * min(1.0, solidity / 0.7) * min(1.0, contrast / 15) * big_enough

    def _lamps(self) -> Found:
        scored = [(o, self._lamp_like(o)) for o in self.objects]
        lamps = [(o, s) for o, s in scored if s >= 0.5]
        return Found(tuple(o for o, _ in lamps), max((s for _, s in lamps), default=0.0))

    def _rug(self) -> Found:
        """A flat, wide region lying on the floor."""
        best, score = None, 0.0
        sofa = self._sofa().regions
        for o in self.objects:
            if o in sofa:
                continue
            y0, x0, y1, x1 = (float(v) for v in self.r.box[o])
            flat = (x1 - x0 + 1) / (y1 - y0 + 1)
            on_floor = self.touch(o, [*self.floor.regions, *sofa])
            if self.size[o] < 0.005 or flat < 1.8 or self.cy[o] < 0.6 or on_floor < 0.6:
                continue
            s = min(1.0, on_floor) * min(1.0, self.size[o] / 0.02)
            if s > score:
                best, score = o, s
        return Found((best,), score) if best is not None else Found((), 0.0)


def _box(x: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """The local mean over a square window (a box blur: cheap at the work resolution)."""
    return F.avg_pool2d(x, 2 * radius + 1, 1, radius, count_include_pad=False)


CLOSEST_CHUNK = 1 << 18  # image pixels _closest compares at once (~80 MB of float32 distances)


def _closest(pixels: torch.Tensor, lab: torch.Tensor, side: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor,
             radius: int = 2) -> torch.Tensor:
    """For image pixels (Lab ``[3, K]``, in work pixels ``wy, wx``), the CIE76 distance to the
    closest colour among the work pixels of ``side`` (``[h, w]`` bool) within ``radius`` of theirs
    (inf where there is none). The closest, not the mean: a side made of two surfaces (the wall
    between a lamp and a sofa is outside both) has no mean colour a pixel of either looks like."""
    sh, sw = side.shape
    blocks, which = torch.unique(wy * sw + wx, return_inverse=True)  # the neighbours, once per work pixel
    offsets = torch.arange(-radius, radius + 1, device=side.device)
    span = len(offsets)
    ny = ((blocks // sw)[:, None, None] + offsets[None, :, None]).expand(-1, span, span)
    nx = ((blocks % sw)[:, None, None] + offsets[None, None, :]).expand(-1, span, span)
    valid = ((ny >= 0) & (ny < sh) & (nx >= 0) & (nx < sw)).reshape(len(blocks), -1)
    ny, nx = ny.clamp(0, sh - 1).reshape(len(blocks), -1), nx.clamp(0, sw - 1).reshape(len(blocks), -1)
    valid &= side[ny, nx]
    colours = lab[:, ny, nx].permute(1, 2, 0)  # [blocks, neighbours, 3]
    out = torch.empty(pixels.shape[1], dtype=pixels.dtype, device=pixels.device)
    # In chunks: at once, a photo of many edges (a wall of small holes) made [K, 25, 3] tensors of
    # gigabytes (K = 11 M pixels at 4096 x 4096: 8.6 GB before it was stopped).
    for at in range(0, pixels.shape[1], CLOSEST_CHUNK):
        part = which[at:at + CLOSEST_CHUNK]
        d = (pixels[:, at:at + CLOSEST_CHUNK].T[:, None, :] - colours[part]).square().sum(-1)  # [k, neighbours]
        out[at:at + CLOSEST_CHUNK] = d.masked_fill_(~valid[part], float("inf")).amin(dim=1).sqrt()
    return out


def _blocks(work: torch.Tensor, full: int, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For work-resolution coordinates, the full-resolution coordinates nearest upsampling maps
    onto each (``[n, k]``) and which of them exist (blocks differ in size by one)."""
    start = torch.ceil(work * full / cells).long()
    end = torch.ceil((work + 1) * full / cells).long().clamp(max=full)
    coords = start[:, None] + torch.arange(-(-full // cells) + 1, device=work.device)
    return coords, coords < end[:, None]


def snap(image: torch.Tensor, lab_small: torch.Tensor, small: torch.Tensor,
         window: tuple[slice, slice] | None = None) -> torch.Tensor:
    """A work-resolution mask ``[h, w]`` at the image's size ``[1, 1, H, W]``, its edge placed
    pixel by pixel: in the work pixels next to the edge, each image pixel goes (softly) to the
    side, inside or outside, whose nearby colour it is closer to in Lab: the side's mean colour,
    or where a side nearby is two surfaces or thinner than a work pixel, the closest colour among
    its work pixels. With ``window`` (rows and columns of the image) only that part is placed and
    returned."""
    _, _, h, w = image.shape
    top, bottom, left, right = (0, h, 0, w) if window is None else (
        window[0].start, window[0].stop, window[1].start, window[1].stop)
    sh, sw = small.shape
    m = small.float().view(1, 1, sh, sw)
    soft = F.interpolate(m, size=(h, w), mode="nearest")[0, 0, top:bottom, left:right]
    inner = -F.max_pool2d(-m, 3, 1, 1)  # eroded: the edge's mixed pixels belong to neither side
    outer = 1 - F.max_pool2d(m, 3, 1, 1)
    edge = ((inner == 0) & (outer == 0))[0, 0]
    if window is not None:  # the work pixels whose blocks may reach into the window
        wy, wx = torch.arange(sh, device=m.device), torch.arange(sw, device=m.device)
        edge &= (((wy + 1) * h > top * sh) & (wy * h < bottom * sh))[:, None]
        edge &= (((wx + 1) * w > left * sw) & (wx * w < right * sw))[None, :]
    by, bx = edge.nonzero(as_tuple=True)
    if by.numel() == 0:
        return soft.reshape(1, 1, *soft.shape)
    rows, row_ok = _blocks(by, h, sh)
    cols, col_ok = _blocks(bx, w, sw)
    ys = rows[:, :, None].expand(-1, -1, cols.shape[1])[(row_ok[:, :, None] & col_ok[:, None, :])]
    xs = cols[:, None, :].expand(-1, rows.shape[1], -1)[(row_ok[:, :, None] & col_ok[:, None, :])]
    if window is not None:
        inside = (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)
        ys, xs = ys[inside], xs[inside]
    pixels = kornia.color.rgb_to_lab(image[0, :, ys, xs].view(1, 3, 1, -1))[0, :, 0]
    lab = lab_small.unsqueeze(0)
    sums = _box(torch.cat([torch.cat([lab * side, lab.square() * side, side], 1) for side in (inner, outer)], 1))
    fields = []
    for part in (sums[:, :7], sums[:, 7:]):  # each side's nearby mean colour, its spread, how much was seen
        mean = part[:, :3] / part[:, 6:].clamp_min(1e-4)
        spread = (part[:, 3:6] / part[:, 6:].clamp_min(1e-4) - mean.square()).sum(1, keepdim=True)
        fields += [mean, spread, part[:, 6:]]
    grid = torch.stack([(xs.float() + 0.5) / w * 2 - 1, (ys.float() + 0.5) / h * 2 - 1], -1).view(1, 1, -1, 2)
    sampled = F.grid_sample(torch.cat(fields, 1), grid, mode="bilinear", align_corners=False)[0, :, 0]  # [10, K]
    d_in, d_out = _distance2(pixels, sampled[:3]).sqrt(), _distance2(pixels, sampled[5:8]).sqrt()
    # where a side nearby is two surfaces (colours spread wider than a region merge: the wall between
    # a lamp and a sofa is outside both) or none is seen (a gap a work pixel wide), its mean is no
    # surface's colour: each pixel there is judged by the closest colour of each side instead
    mixed = ((sampled[3] > MERGE_DE**2) | (sampled[8] > MERGE_DE**2) | (sampled[4] <= 0.02) | (sampled[9] <= 0.02))
    if bool(mixed.any()):
        at_y, at_x = ys[mixed] * sh // h, xs[mixed] * sw // w  # the work pixels nearest upsampling took
        near_in = _closest(pixels[:, mixed], lab_small, inner[0, 0] > 0, at_y, at_x)
        near_out = _closest(pixels[:, mixed], lab_small, outer[0, 0] > 0, at_y, at_x)
        # a pixel like neither side's interior (a line a work pixel wide, a gap between two objects)
        # is judged by every work pixel of each side, the edge's own included
        odd = torch.minimum(near_in, near_out) > MERGE_DE
        if bool(odd.any()):
            near_in[odd] = _closest(pixels[:, mixed][:, odd], lab_small, m[0, 0] > 0, at_y[odd], at_x[odd])
            near_out[odd] = _closest(pixels[:, mixed][:, odd], lab_small, m[0, 0] == 0, at_y[odd], at_x[odd])
        d_in[mixed], d_out[mixed] = near_in, near_out
    decided = torch.isfinite(d_in) & torch.isfinite(d_out)
    ys, xs = ys - top, xs - left
    soft[ys, xs] = torch.where(decided, torch.sigmoid((d_out - d_in) / 1.5), soft[ys, xs])
    return soft.reshape(1, 1, *soft.shape)


def _dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """A bool mask grown by ``px`` pixels (chessboard distance): shifted copies or-ed together, one
    axis at a time (on the CPU far cheaper than a max pool)."""
    for axis in (-2, -1):
        n = mask.shape[axis]
        grown = mask.clone()
        for d in range(1, min(px, n - 1) + 1):
            grown.narrow(axis, d, n - d).logical_or_(mask.narrow(axis, 0, n - d))
            grown.narrow(axis, 0, n - d).logical_or_(mask.narrow(axis, d, n - d))
        mask = grown
    return mask


def thin_parts(mask: torch.Tensor, px: int) -> torch.Tensor:
    """The pixels of a bool mask that no ``2px+1`` square inside the mask covers: its strips and
    spurs narrower than that (what a morphological opening takes away; outside the image counts
    as inside)."""
    opened = _dilate(~_dilate(~mask, px), px)
    return mask & ~opened


def floor_lines(image: torch.Tensor, regions: Regions, layout: Layout,
                placed: Mapping[tuple[int, ...], torch.Tensor] | None = None,
                ) -> tuple[slice, slice, torch.Tensor] | None:
    """The floor's own lines (plank grooves, grout, a contact shadow) that the colour decision gave
    to the sofa (or bed) standing on it: rows, columns and the 0/1 lines ``[1, 1, h, w]`` on that
    window of the image, or None where there is none. ``placed``: snapped masks already made, by
    their regions (the sofa's, when it was asked for, is not made twice).

    A line narrower than about a work pixel is dissolved into a neighbour by the region step, and
    at full size a dark groove is often closer in colour to a dark sofa than to the planks; so the
    sofa's snapped mask is cut to the parts a square of about half a work pixel fits in, and what
    it loses next to the floor is floor (a groove that runs along the sofa's edge for its whole
    length is not thin: its row along the sofa's bottom edge is handed back when it is not a mix of
    sofa and floor, :func:`contact`). The sofa's legs, wider than that, stay the sofa's; what of
    the sofa's region next to the floor its own edge placement let go is floor too (a line of
    grout the region step joined to the sofa)."""
    floor, sofa = layout.find("floor"), layout.find("sofa")
    if floor is None or sofa is None or not floor.regions or not sofa.regions:
        return None
    _, _, h, w = image.shape
    standing = torch.isin(regions.labels, torch.tensor(sofa.regions, device=image.device))
    floor_small = torch.isin(regions.labels, torch.tensor(floor.regions, device=image.device)).to(image.dtype)
    near = F.max_pool2d(floor_small.view(1, 1, layout.h, layout.w), 3, 1, 1)[0, 0]
    ys, xs = (standing & (near > 0)).nonzero(as_tuple=True)
    if ys.numel() == 0:
        return None
    # the window: where the sofa meets the floor, with two work pixels around (the snap's and
    # the square's reach); the rest of the image is not looked at
    rows = slice(max(0, (int(ys.min()) - 2) * h // layout.h), min(h, -(-(int(ys.max()) + 3) * h // layout.h)))
    cols = slice(max(0, (int(xs.min()) - 2) * w // layout.w), min(w, -(-(int(xs.max()) + 3) * w // layout.w)))
    known = (placed or {}).get(tuple(sorted(sofa.regions)))
    soft = known[0, 0, rows, cols] if known is not None else snap(image, regions.lab, standing, (rows, cols))[0, 0]
    hard = soft > 0.5
    px = max(2, round(0.4 * max(h, w) / max(layout.h, layout.w)))
    wy = torch.arange(rows.start, rows.stop, device=image.device) * layout.h // h
    wx = torch.arange(cols.start, cols.stop, device=image.device) * layout.w // w
    by_floor = near[wy][:, wx] > 0
    given_up = standing[wy][:, wx] & ~hard  # the sofa's region where its edge placement let go
    lines = thin_parts(hard, px) | contact(image[..., rows, cols], hard, by_floor, px) | given_up
    return rows, cols, (lines & by_floor).to(image.dtype)


def contact(image: torch.Tensor, hard: torch.Tensor, by_floor: torch.Tensor, px: int) -> torch.Tensor:
    """The bottom row of an object's mask ``hard`` (``[h, w]`` bool on ``image`` ``[1, 3, h, w]``):
    its pixels with floor right below (``by_floor``: where floor may be) whose colour is more than
    a region step (LOCAL_DE) from every mix of the object's own colour and the floor's nearby (the
    means over their pixels at least ``px`` from the edge): a groove, grout or a contact shadow
    along the edge it stands on, which the colour decision gave to the object because it is as
    dark as the object, not like it. A blurred edge is such a mix and stays; one pixel at most, so
    an object shaded at its bottom loses no more than a row."""
    core = hard & ~_dilate(~hard, px)
    bottom = torch.zeros_like(hard)
    bottom[:-1] = hard[:-1] & ~hard[1:] & by_floor[1:]  # the edge it stands on, not its sides
    if not bool(bottom.any()) or not bool(core.any()):
        return torch.zeros_like(hard)
    lab = kornia.color.rgb_to_lab(image)
    floor_core = ~hard & by_floor & ~_dilate(hard | ~by_floor, px)
    sides = [w.to(lab.dtype).view(1, 1, *w.shape) for w in (core, floor_core)]
    sums = box_sum(torch.cat([lab * sides[0], sides[0], lab * sides[1], sides[1]], 1), 2 * px + 1)
    own, below = sums[:, :3] / sums[:, 3:4].clamp_min(1e-6), sums[:, 4:7] / sums[:, 7:].clamp_min(1e-6)
    # a mix of the object and the floor (its blurred edge) lies between their colours; a line does not
    span = below - own
    t = ((lab - own) * span).sum(1, keepdim=True) / span.square().sum(1, keepdim=True).clamp_min(1e-6)
    off_mix = _distance2(lab[0], (own + t.clamp(0, 1) * span)[0]) > LOCAL_DE**2
    seen = (sums[0, 3] > 0.5) & (sums[0, 7] > 0.5)
    return bottom & off_mix & seen


class RegionSegmenter:
    """Concept masks from named image regions (no weights): see :class:`Layout` for the rules.

    A concept no region fits is refused (:class:`NothingFits`) unless it is optional; a concept
    without a rule goes to ``fallback`` when one is given, else is refused too."""

    def __init__(self, work: int = REGION_WORK, min_confidence: float = 0.3,
                 fallback: Segmenter | None = None) -> None:
        self.work = work
        self.min_confidence = min_confidence
        self.fallback = fallback

    def masks(self, image: torch.Tensor, concepts: Sequence[str],
              optional: Collection[str] = ()) -> dict[str, torch.Tensor]:
        return self.segment(image, concepts, optional)[0]

    def segment(self, image: torch.Tensor, concepts: Sequence[str],
                optional: Collection[str] = ()) -> tuple[dict[str, torch.Tensor], list[Instance]]:
        """The masks and the instances behind them (boxes and areas in image pixels)."""
        regions = find_regions(image, self.work)
        layout = Layout(regions)
        _, _, h, w = image.shape
        sy, sx = h / layout.h, w / layout.w
        out: dict[str, torch.Tensor] = {}
        instances: list[Instance] = []
        unknown, missing, fitting = [], [], {}
        for concept in concepts:
            found = layout.find(concept)
            if found is None:
                unknown.append(concept)
            elif found.regions and found.confidence >= self.min_confidence:
                fitting[concept] = found
            elif concept not in optional:
                missing.append(concept)
        if self.fallback is None:
            missing += [c for c in unknown if c not in optional]
        if missing:  # refused before any work at full resolution
            raise NothingFits(f"no region of the image fits {', '.join(sorted(missing))}: the built-in segmenter "
                              "finds ceiling, wall, floor, sofa, bed, lamp and rug; for anything else, rerun the job "
                              "(POST /jobs/{id}/rerun) and upload a mask to the slot it gives")
        placed: dict[tuple[int, ...], torch.Tensor] = {}
        for concept, found in fitting.items():
            small = torch.isin(regions.labels, torch.tensor(found.regions, device=image.device))
            out[concept] = placed[tuple(sorted(found.regions))] = snap(image, regions.lab, small)
            for i in found.regions:
                y0, x0, y1, x1 = regions.box[i].tolist()
                instances.append(Instance(concept, (int(x0 * sx), int(y0 * sy), int((x1 + 1) * sx), int((y1 + 1) * sy)),
                                          int(float(regions.area[i]) * sx * sy), found.confidence))
        on_floor = {"floor", *STANDING} & set(out)
        lines = floor_lines(image, regions, layout, placed) if on_floor else None
        if lines is not None:
            rows, cols, line = lines
            for concept in on_floor:
                window = out[concept][..., rows, cols]
                out[concept][..., rows, cols] = (torch.maximum(window, line) if concept == "floor"
                                                 else window * (1 - line))
        if unknown and self.fallback is not None:
            guessed = self.fallback.masks(image, unknown, optional)
            out.update(guessed)
            instances += _prior_instances(guessed)
        return out, instances


# -- a learned segmenter the operator provides -------------------------------------------------
# ADE20K (SceneParsing, 150 classes, 0-based output channels) for the interior concepts.
ADE20K_LABELS: dict[str, tuple[int, ...]] = {
    "wall": (0,), "floor": (3,), "ceiling": (5,), "bed": (7,), "cabinet": (10, 35), "table": (15, 33),
    "plant": (17,), "curtain": (18,), "chair": (19, 30), "sofa": (23,), "rug": (28,), "lamp": (36,),
}


def load_labels(path: str | Path) -> dict[str, tuple[int, ...]]:
    """A label map file: a JSON object from concept to the model's class indices,
    e.g. ``{"wall": [0], "sofa": [23]}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"segmenter labels {str(path)!r} are not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and v and all(type(i) is int and i >= 0 for i in v)
            for k, v in data.items()):
        raise ValueError("segmenter labels must map concept names to non-empty lists of class indices")
    return {k: tuple(v) for k, v in data.items()}


class TorchScriptSegmenter:
    """A semantic segmentation model from a local TorchScript file (nothing is downloaded).

    The model takes RGB ``[1, 3, h, w]`` in [0, 1] (any normalisation is the model's own) and
    returns class scores ``[1, C, h', w']``; ``labels`` names the classes of each concept. The
    image is given at ``side`` pixels on its long side; a concept's mask is the probability of its
    classes, upsampled. A concept covering less than ``min_area`` of the image is not found."""

    def __init__(self, model_path: str | Path, labels: Mapping[str, Sequence[int]] = ADE20K_LABELS,
                 side: int = 512, min_area: float = 0.0002, min_confidence: float = 0.5) -> None:
        try:
            self.model = torch.jit.load(str(model_path), map_location="cpu").eval()  # type: ignore[no-untyped-call]
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"segmenter model {str(model_path)!r} is not a TorchScript file "
                             f"({type(e).__name__})") from None
        self.labels = {c: tuple(ids) for c, ids in labels.items()}
        self.side = side
        self.min_area = min_area
        self.min_confidence = min_confidence
        self._lock = threading.Lock()  # the module moves between devices once

    def _scores(self, image: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if next(iter(self.model.parameters()), torch.empty(0)).device != image.device:
                self.model = self.model.to(image.device)
        _, _, h, w = image.shape
        scale = self.side / max(h, w)
        small = F.interpolate(image, size=(max(8, round(h * scale)), max(8, round(w * scale))), mode="area")
        with torch.inference_mode():
            scores = self.model(small)
        if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or scores.shape[0] != 1:
            raise RuntimeError("the segmenter model must return class scores [1, C, h, w]")
        return scores.float().softmax(dim=1)[0]

    def masks(self, image: torch.Tensor, concepts: Sequence[str],
              optional: Collection[str] = ()) -> dict[str, torch.Tensor]:
        return self.segment(image, concepts, optional)[0]

    def segment(self, image: torch.Tensor, concepts: Sequence[str],
                optional: Collection[str] = ()) -> tuple[dict[str, torch.Tensor], list[Instance]]:
        """The masks and their instances (connected parts of each concept's mask)."""
        probs = self._scores(image)
        classes, sh, sw = probs.shape
        _, _, h, w = image.shape
        out: dict[str, torch.Tensor] = {}
        instances: list[Instance] = []
        missing: list[str] = []
        for concept in concepts:
            ids = [i for i in self.labels.get(concept, ()) if i < classes]
            p = probs[ids].sum(dim=0) if ids else torch.zeros(sh, sw, device=probs.device)
            hard = p > 0.5
            parts = components(hard[:, :-1] & hard[:, 1:], hard[:-1] & hard[1:])[hard]  # hard pixels' parts
            ys_all, xs_all = hard.nonzero(as_tuple=True)
            sizes = torch.bincount(parts) if parts.numel() else torch.zeros(0, dtype=torch.long)
            found = False
            for part in (sizes >= max(1.0, self.min_area * sh * sw)).nonzero().view(-1).tolist():
                member = parts == part
                confidence = float(p[ys_all[member], xs_all[member]].mean())
                if confidence < self.min_confidence:
                    continue
                found = True
                ys, xs = ys_all[member], xs_all[member]
                box = (int(xs.min()) * w // sw, int(ys.min()) * h // sh,
                       (int(xs.max()) + 1) * w // sw, (int(ys.max()) + 1) * h // sh)
                instances.append(Instance(concept, box, int(sizes[part]) * h * w // (sh * sw), confidence, "model"))
            if not found:
                if concept not in optional:
                    missing.append(concept)
                continue
            out[concept] = F.interpolate(p.view(1, 1, sh, sw), size=(h, w), mode="bilinear",
                                         align_corners=False).clamp(0, 1)
        if missing:
            raise NothingFits(f"the segmentation model finds no {', '.join(sorted(missing))} in the image; "
                              "rerun the job (POST /jobs/{id}/rerun) and upload a mask for it to the slot it gives")
        return out, instances


def built_in(model_path: str | None = None, labels_path: str | None = None) -> Segmenter:
    """The worker's segmenter: the operator's model when one is configured, else the regions (with
    the position priors for the concepts no region rule knows, such as the seller preset's)."""
    if not model_path:
        return RegionSegmenter(fallback=PriorClusterSegmenter())
    return TorchScriptSegmenter(model_path, load_labels(labels_path) if labels_path else ADE20K_LABELS)
