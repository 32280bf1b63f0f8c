"""Masks that follow the photo: each mask's edge is moved onto the image edge next to it.

A mask is trusted far from its edge; within ``radius`` pixels of it (the *band*) each pixel is
classified by colour against the mask's own surroundings: the mean colour of the mask's interior
nearby and of its exterior nearby (window means, so a lighting gradient does not matter). A
pixel closer to the inside colour joins the mask, one closer to the outside colour leaves it,
with a one-pixel soft ramp between (antialiasing). Where the two sides do not differ in colour
(an edge drawn through a flat wall), or differ less than each side's own texture spreads (an
edge across planks), the mask is kept as it was: there is no image edge a pixel's colour can show.

This fixes what coarse masks get wrong at object boundaries: a halo of old colour where a wall
mask stops short of the sofa, and the rounded corners of a protected sofa whose mask is a blob.
Window statistics are computed at a reduced resolution (cheap: box sums by cumulative sums) and
only the band's pixels are classified at full resolution, so the cost follows the edge length.

Only a segmenter's masks are refined: they are guesses, and move either way, a protect mask
included (a blob around the sofa would otherwise protect the wall above it, a halo, and cut its
corners). A client's mask is used as given, so a client's protect mask holds its region bit for
bit; refining exact masks too (grown where the photo continues them) was measured to make them
worse, not better (`palette bench --quality --quick`: floor halo 0.00 % -> up to 0.40 %).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F

STATS_STEP = 4  # the statistics resolution is radius / STATS_STEP pixels per cell
MIN_CONTRAST = 0.03  # below this RGB distance between the two sides there is no edge to follow
FULL_CONTRAST = 0.08  # from this distance on the colour decision is trusted fully
MIN_SEPARATION, FULL_SEPARATION = 1.5, 3.0  # contrast over the two sides' spread (standard deviations)
FIT = 3.0  # a pixel within this many standard deviations of a side's colour looks like that side
RAMP = 1.5  # slope of the soft edge in units of the position between the two side colours


def segmenter_radius(h: int, w: int) -> int:
    """How far a segmenter's edge may move: one and a half cells of a 64-pixel working resolution."""
    return max(2, round(max(h, w) / 40))


def box_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum over the ``(2r+1)^2`` window around each pixel (zero outside), any ``r`` at the same cost:
    running sums along each axis in turn, in float64 so that differences of large running sums
    stay exact enough (an all-zero window sums to 0, not to a rounding residue)."""
    h, w = x.shape[-2:]
    c = F.pad(x.double(), (r + 1, r)).cumsum(-1)
    rows = c[..., 2 * r + 1:] - c[..., :w]
    c = F.pad(rows, (0, 0, r + 1, r)).cumsum(-2)
    return (c[..., 2 * r + 1:, :] - c[..., :h, :]).to(x.dtype)


def colour_cells(image: torch.Tensor, step: int) -> torch.Tensor:
    """``[1, 4, h, w]``: each ``step``-pixel cell's mean colour and mean squared colour norm (so
    window variances include the texture finer than a cell)."""
    norm = image.square().sum(1, keepdim=True)
    if step == 1:
        return torch.cat([image, norm], dim=1)
    # pooled apart, joined small: the same numbers (the pool is per channel) without a full-size copy
    return torch.cat([F.avg_pool2d(image, step, ceil_mode=True), F.avg_pool2d(norm, step, ceil_mode=True)], dim=1)


def _side_stats(cells: torch.Tensor, hard: torch.Tensor, r: int) -> torch.Tensor:
    """``[1, 10, h, w]``: mean colour, colour variance and how much was seen, inside then outside,
    over a window of radius ``2r`` (it reaches the interior from anywhere in the band). Pixels at
    least ``r`` from the edge dominate; where there are none (a thin object) the rest counts."""
    inside = box_sum(hard, r) >= (2 * r + 1) ** 2 - 0.5
    outside = box_sum(1 - hard, r) >= (2 * r + 1) ** 2 - 0.5
    out = []
    for weight in (hard * (0.05 + inside.to(hard.dtype)), (1 - hard) * (0.05 + outside.to(hard.dtype))):
        sums = box_sum(torch.cat([cells * weight, weight], dim=1), 2 * r)
        n = sums[:, 4:5]
        mean = sums[:, :4] / n.clamp_min(1e-6)
        variance = (mean[:, 3:4] - mean[:, :3].square().sum(1, keepdim=True)).clamp_min(0)
        out += [mean[:, :3], variance, (n > 1e-3).to(hard.dtype)]
    return torch.cat(out, dim=1)


def _band_pixels(cells: torch.Tensor, step: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-resolution pixels ``(ys, xs)`` of the given ``[N, 2]`` cells of ``step`` pixels."""
    offsets = torch.arange(step, device=cells.device)
    ys = (cells[:, 0, None, None] * step + offsets[None, :, None]).expand(-1, step, step).reshape(-1)
    xs = (cells[:, 1, None, None] * step + offsets[None, None, :]).expand(-1, step, step).reshape(-1)
    inside = (ys < h) & (xs < w)
    return ys[inside], xs[inside]


def cell_size(radius: int) -> int:
    """The side of the cells the window statistics for ``radius`` are computed on."""
    return max(1, radius // STATS_STEP)


def refine(image: torch.Tensor, mask: torch.Tensor, radius: int, snap: bool = False,
           image_cells: torch.Tensor | None = None) -> torch.Tensor:
    """``mask`` ``[1, 1, H, W]`` with its edge within ``radius`` pixels moved onto the image edge
    of ``image`` ``[1, 3, H, W]``. Pixels farther than ``radius`` from the edge are returned as is,
    or with ``snap`` made 0 or 1 (a segmenter's soft ramp far from its edge would leave a halo of
    half-edited pixels). ``image_cells``: ``colour_cells(image, cell_size(radius))``, when the
    masks of one image share it."""
    h, w = mask.shape[-2:]
    step = cell_size(radius)
    r = max(1, round(radius / step))
    hard = (mask > 0.5).to(image.dtype)
    small = F.avg_pool2d(hard, step, ceil_mode=True) if step > 1 else hard
    band_small = box_sum(((small > 0) & (small < 1)).to(image.dtype), r + 1) > 0  # cells near the edge
    cells = band_small[0, 0].nonzero()
    if cells.numel() == 0:
        return hard.to(mask.dtype) if snap else mask
    # window statistics on the cells around the band only (its bounding box plus their reach)
    reach = 3 * r + 2
    cy0, cx0 = (cells.min(dim=0).values - reach).clamp_min(0).tolist()
    cy1, cx1 = (cells.max(dim=0).values + reach + 1).tolist()
    crop = (slice(None), slice(None), slice(cy0 * step, cy1 * step), slice(cx0 * step, cx1 * step))
    cells_here = image_cells[..., cy0:cy1, cx0:cx1] if image_cells is not None else colour_cells(image[crop], step)
    small_hard = (small[..., cy0:cy1, cx0:cx1] > 0.5).to(image.dtype)
    stats = _side_stats(cells_here, small_hard, r)
    ys, xs = _band_pixels(cells, step, h, w)
    # the cell statistics, bilinearly interpolated at the band's pixels (cell centres as anchors)
    gy = ((ys.to(image.dtype) + 0.5) / step - cy0) / stats.shape[-2] * 2 - 1
    gx = ((xs.to(image.dtype) + 0.5) / step - cx0) / stats.shape[-1] * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).view(1, 1, -1, 2)
    at = F.grid_sample(stats, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
    colour = image[0][:, ys, xs]
    mean_in, var_in, seen_in, mean_out, var_out, seen_out = at[:3], at[3], at[4], at[5:8], at[8], at[9]
    contrast = (mean_in - mean_out).square().sum(0)
    # position between the outside (0) and inside (1) colour, projected on the line joining them
    t = ((colour - mean_out) * (mean_in - mean_out)).sum(0) / contrast.clamp_min(1e-8)
    decided = ((t - 0.5) * RAMP * 2 + 0.5).clamp(0, 1)
    old = (hard if snap else mask)[0, 0, ys, xs]  # what an untrusted pixel keeps
    # a pixel joins only if it looks like the inside, leaves only if it looks like the outside:
    # where three surfaces meet (wall, floor and a sofa's corner) the outside mean is a mix that
    # a wall pixel can sit closer to than to the floor, without being floor
    fits_in = (colour - mean_in).square().sum(0) <= (FIT * var_in.sqrt() + MIN_CONTRAST) ** 2
    fits_out = (colour - mean_out).square().sum(0) <= (FIT * var_out.sqrt() + MIN_CONTRAST) ** 2
    decided = torch.where(((decided > old) & ~fits_in) | ((decided < old) & ~fits_out), old, decided)
    trust = ((contrast.sqrt() - MIN_CONTRAST) / (FULL_CONTRAST - MIN_CONTRAST)).clamp(0, 1)
    # a textured side (planks, a patterned rug) whose own spread rivals the contrast cannot be
    # told from the other side pixel by pixel: the mask is kept there
    separation = contrast.sqrt() / (var_in.sqrt() + var_out.sqrt() + 1e-3)
    trust = trust * ((separation - MIN_SEPARATION) / (FULL_SEPARATION - MIN_SEPARATION)).clamp(0, 1)
    trust = trust * (seen_in > 0.5) * (seen_out > 0.5)
    new = trust * decided + (1 - trust) * old
    out = hard.to(mask.dtype) if snap else mask.clone()
    out[0, 0, ys, xs] = new.to(mask.dtype)
    return out


def refine_masks(image: torch.Tensor, masks: dict[str, torch.Tensor],
                 client: Collection[str]) -> dict[str, torch.Tensor]:
    """Every mask of an item against its photo: a segmenter's refined (its edge moves either way
    by up to ``segmenter_radius``, and it is made hard elsewhere), a client's as given."""
    guessed = set(masks) - set(client)
    if not guessed:
        return dict(masks)
    radius = segmenter_radius(*image.shape[-2:])
    cells = colour_cells(image, cell_size(radius))
    return {concept: refine(image, mask, radius, snap=True, image_cells=cells) if concept in guessed else mask
            for concept, mask in masks.items()}
