"""Edit quality against ground truth (`palette bench --quality`): every op run through the worker's
own ``ImagePipeline.compute`` on generated scenes (``tests.bench.scenes``), judged against the
scene's exact masks and object-free renders.

Each scene is edited twice per op: with the true masks given as client masks (judges the ops) and
with none (the built-in segmenter finds them: judges the segmenter too; its IoU per concept is
measured on its own). Metrics, per op and concept (``edited`` is decided per pixel, per op):

- protect: pixels of the true protected region whose bytes changed (must be 0)
- coverage: share of the true target region edited. recolor: the pixel's ab chroma moved at least
  half way to the target's; texture: CIE76 ΔE to the input ≥ 3; tone: any byte changed; remove:
  ΔE to the object-free render at most half the input's
- leak: share of the pixels farther than 3 px from the target whose bytes changed
- halo: share of the target within 10 px of an object (sofa, lamp, rug) left unedited
- ΔL: mean |ΔL| (CIE L) over the target, recolor only (it keeps lightness by design)
- ΔE: median CIE76 ΔE over the removed object's pixels against the object-free render (remove)
- fast recolor: PSNR (dB, RGB in [0, 1]) inside the true wall of the fast recolor (its colour
  change solved on ``ops.CHROMA_STEP`` cells, as the worker runs it) against the per-pixel
  formula (``chroma_step=1``), the same target and mask; goal >= 40 dB

A refusal (the segmenter's ``NothingFits``) is counted, not scored.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from domain.contracts.edits import TEXTURES
from domain.contracts.gpu_task import Task, tasks_for
from gpu_consumer import ops
from gpu_consumer.codec import BadInput
from gpu_consumer.pipeline import ImagePipeline
from gpu_consumer.segment import RegionSegmenter, Segmenter
from tests.bench.scenes import OBJECTS, Scene, generate

GOALS = {"protect": 0, "coverage": 0.97, "halo": 0.02, "leak": 0.01, "delta_e": 5.0,
         "iou_planes": 0.9, "iou_objects": 0.8, "fast_recolor_db": 40.0}
RECOLOURS = ("#5b7f95", "#a0522d", "#2e8b57", "#8b3a62", "#c8b400")
HALO_PX, BAND_PX = 10, 3
PLANES = ("ceiling", "wall", "floor")
FULL = [(seed, size) for seed, size in enumerate([(480, 640)] * 4 + [(768, 1024)] * 2 + [(1728, 2304)])]
QUICK = [(seed, (360, 480)) for seed in range(4)]


@dataclass(frozen=True)
class Case:
    """One edit of one scene: the op on a concept, with the sofa protected where there is one."""

    op: str
    concept: str
    edit: dict[str, str]
    protect: tuple[str, ...]


def _lab(image_u8: np.ndarray) -> torch.Tensor:
    """``[3, H, W]`` CIE Lab of an ``[H, W, 3]`` uint8 image."""
    return kornia.color.rgb_to_lab(ops.to_float(torch.from_numpy(image_u8)))[0]


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    """The mask dilated by ``px`` pixels (chessboard distance)."""
    t = torch.from_numpy(mask).float().view(1, 1, *mask.shape)
    rows = F.max_pool2d(t, (2 * px + 1, 1), 1, (px, 0))  # a square window, one axis at a time
    grown: np.ndarray = (F.max_pool2d(rows, (1, 2 * px + 1), 1, (0, px))[0, 0] > 0).numpy()
    return grown


def _farthest(options: Sequence[str], colour: Sequence[float], as_lab: Any) -> str:
    """The option whose colour (``as_lab(option)``) is farthest from ``colour`` in Lab."""
    ref = kornia.color.rgb_to_lab(torch.tensor(list(colour)).view(1, 3, 1, 1)).view(3)
    return max(options, key=lambda o: float((as_lab(o) - ref).norm()))


def _hex_lab(value: str) -> torch.Tensor:
    return kornia.color.rgb_to_lab(torch.tensor(ops.hex_to_rgb(value)).view(1, 3, 1, 1)).view(3)


def _texture_lab(name: str) -> torch.Tensor:
    return kornia.color.rgb_to_lab(ops.make_texture(name, 32, 32).mean(dim=(1, 2)).view(1, 3, 1, 1)).view(3)


def cases(scene: Scene) -> list[Case]:
    """The ops judged on a scene; colours and textures far from what they replace, so an
    unedited pixel cannot pass for an edited one."""
    protect = ("sofa",) if "sofa" in scene.masks else ()
    recolour = _farthest(RECOLOURS, scene.colours["wall"], _hex_lab)
    texture = _farthest(TEXTURES, scene.colours["floor"], _texture_lab)
    out = [Case("recolor", "wall", {"action": "recolor", "value": recolour}, protect),
           Case("texture", "floor", {"action": "texture", "value": texture}, protect),
           Case("tone", "floor", {"action": "tone", "value": "warm"}, protect)]
    if "lamp" in scene.masks:
        out.append(Case("remove", "lamp", {"action": "remove", "value": ""}, ()))
    return out


def task(case: Case) -> Task:
    """The task as the dispatcher writes it and the worker parses it."""
    raw = tasks_for(uuid.uuid4(), uuid.uuid4(), 1, {case.concept: case.edit}, list(case.protect), [])[0]
    return Task.parse(json.dumps(raw).encode())


def edited(case: Case, scene: Scene, before: np.ndarray, after: np.ndarray,
           lab_in: torch.Tensor, lab_out: torch.Tensor) -> np.ndarray:
    """``[H, W]`` bool: the pixels this op visibly did its job on (see the module docstring);
    ``lab_in`` and ``lab_out`` are the Lab of ``before`` and ``after``."""
    if case.op == "tone":
        moved: np.ndarray = (before != after).any(axis=2)
        return moved
    if case.op == "recolor":
        target = _hex_lab(case.edit["value"])[1:].view(2, 1, 1)
        was, now = (lab_in[1:] - target).norm(dim=0), (lab_out[1:] - target).norm(dim=0)
        result: np.ndarray = (now <= 0.5 * was).numpy()
        return result
    if case.op == "texture":
        result = ((lab_out - lab_in).norm(dim=0) >= 3).numpy()
        return result
    clean = _lab(scene.removed[case.concept])
    result = ((lab_out - clean).norm(dim=0) <= 0.5 * (lab_in - clean).norm(dim=0)).numpy()
    return result


def measure(case: Case, scene: Scene, after: np.ndarray) -> dict[str, float]:
    """The metrics of one edited scene (true masks as the yardstick)."""
    before, target = scene.image, scene.masks[case.concept]
    changed = (before != after).any(axis=2)
    lab_in, lab_out = _lab(before), _lab(after)
    done = edited(case, scene, before, after, lab_in, lab_out)
    outside = ~_grow(target, BAND_PX)
    row = {"coverage": float(done[target].mean()), "leak": float(changed[outside].mean())}
    protected = np.zeros_like(target)
    for concept in case.protect:
        protected |= scene.masks[concept]
    row["protect"] = float(changed[protected].sum())
    objects = np.zeros_like(target)
    for concept in OBJECTS:
        if concept != case.concept and concept in scene.masks:
            objects |= scene.masks[concept]
    ring = target & _grow(objects, HALO_PX)
    if case.op != "remove" and ring.any():
        row["halo"] = float(1 - done[ring].mean())
    if case.op == "recolor":
        row["delta_l"] = float((lab_out[0] - lab_in[0]).abs()[torch.from_numpy(target)].mean())
    if case.op == "remove":
        delta = (lab_out - _lab(scene.removed[case.concept])).norm(dim=0)[torch.from_numpy(target)]
        row["delta_e"] = float(delta.median())
    return row


def iou(segmenter: Segmenter, scene: Scene) -> dict[str, float]:
    """The segmenter's IoU per concept of the scene (its soft masks cut at 0.5); 0 where missed."""
    image = ops.to_float(torch.from_numpy(scene.image))
    found = segmenter.masks(image, list(scene.masks), optional=list(scene.masks))
    out = {}
    for concept, truth in scene.masks.items():
        mask = found[concept][0, 0].numpy() > 0.5 if concept in found else np.zeros_like(truth)
        out[concept] = float((mask & truth).sum() / max(1, (mask | truth).sum()))
    return out


def fast_recolor_db(scene: Scene, target_hex: str) -> float:
    """PSNR (dB) inside the scene's true wall of the fast recolor against the per-pixel formula."""
    image = ops.to_float(torch.from_numpy(scene.image))
    mask = torch.from_numpy(scene.masks["wall"]).float().view(1, 1, *scene.size)
    fast = ops.recolor(image, target_hex, mask, chroma_step=ops.CHROMA_STEP)
    exact = ops.recolor(image, target_hex, mask)
    inside = mask[0, 0] > 0.5
    mse = float(((fast - exact)[0][:, inside] ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


def run(scenes: Sequence[tuple[int, tuple[int, int]]], segmenter: Segmenter | None = None,
        keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every case of every scene under both mask sources, plus the segmenter's IoU. With ``keep``,
    each op's first and worst (per mask source: most uncovered + halo + leak, or highest ΔE)
    before/after are kept there."""
    segmenter = segmenter or RegionSegmenter()
    pipeline = ImagePipeline(s3=None, bucket="", device=torch.device("cpu"), segmenter=segmenter)
    rows: list[dict[str, Any]] = []
    ious: list[dict[str, float]] = []
    fast_db: list[float] = []
    for seed, size in scenes:
        scene = generate(seed, size)
        ious.append(iou(segmenter, scene))
        fast_db.append(fast_recolor_db(scene, _farthest(RECOLOURS, scene.colours["wall"], _hex_lab)))
        image = torch.from_numpy(scene.image)
        for case in cases(scene):
            for source in ("true", "segmenter"):
                masks = {} if source == "segmenter" else {
                    c: torch.from_numpy(scene.masks[c]).float().view(1, 1, *scene.size)
                    for c in (case.concept, *case.protect)}
                base = {"seed": seed, "size": f"{size[1]}x{size[0]}", "op": case.op, "concept": case.concept,
                        "value": case.edit["value"], "source": source}
                started = time.perf_counter()
                try:
                    after = pipeline.compute(image, masks, task(case)).numpy()
                except BadInput as e:
                    rows.append({**base, "refused": str(e)})
                    continue
                row = {**base, **measure(case, scene, after), "seconds": time.perf_counter() - started}
                rows.append(row)
                if keep is not None:
                    _keep(keep, case.op, source, row, scene.image, after)
    return {"rows": rows, "iou": ious, "fast_recolor_db": fast_db, "goals": GOALS}


def _badness(row: dict[str, Any]) -> float:
    if row["op"] == "remove":
        return float(row["delta_e"])
    return 1 - float(row["coverage"]) + float(row.get("halo", 0.0)) + float(row["leak"])


def _keep(keep: dict[str, Any], op: str, source: str, row: dict[str, Any], before: np.ndarray,
          after: np.ndarray) -> None:
    """The first scene of an op (true masks) and the worst per mask source."""
    if source == "true":
        keep.setdefault(f"{op}-first", (row, before, after))
    worst = keep.get(f"{op}-{source}-worst")
    if worst is None or _badness(row) > _badness(worst[0]):
        keep[f"{op}-{source}-worst"] = (row, before, after)


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per (mask source, op, concept): means and the worst scene of each metric."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        groups.setdefault((row["source"], row["op"], row["concept"]), []).append(row)
    out = []
    for (source, op, concept), rows in groups.items():
        scored = [r for r in rows if "refused" not in r]
        line: dict[str, Any] = {"source": source, "op": op, "concept": concept, "scenes": len(rows),
                                "refused": len(rows) - len(scored)}
        if scored:
            line["protect_changed_px"] = int(sum(r["protect"] for r in scored))
            line["coverage_mean"], line["coverage_min"] = _mean_and(scored, "coverage", min)
            line["leak_mean"], line["leak_max"] = _mean_and(scored, "leak", max)
            if any("halo" in r for r in scored):
                line["halo_mean"], line["halo_max"] = _mean_and([r for r in scored if "halo" in r], "halo", max)
            if op == "recolor":
                line["delta_l_mean"], _ = _mean_and(scored, "delta_l", max)
            if op == "remove":
                line["delta_e_median_mean"], line["delta_e_median_max"] = _mean_and(scored, "delta_e", max)
        out.append(line)
    return out


def _mean_and(rows: Sequence[dict[str, Any]], key: str, worst: Any) -> tuple[float, float]:
    values = [float(r[key]) for r in rows]
    return sum(values) / len(values), float(worst(values))


def iou_summary(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    per: dict[str, list[float]] = {}
    for scene in result["iou"]:
        for concept, value in scene.items():
            per.setdefault(concept, []).append(value)
    return {c: {"mean": sum(v) / len(v), "min": min(v), "scenes": len(v)} for c, v in per.items()}


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


def table(result: dict[str, Any]) -> str:
    """The printed report: ops per mask source, then the segmenter's IoU, each next to its goal."""
    head = (f"{'masks':<10}{'op':<8}{'concept':<8}{'scenes':>7}{'refused':>8}{'protect px':>11}"
            f"{'coverage mean/min':>20}{'leak mean/max':>18}{'halo mean/max':>18}{'ΔL':>6}{'ΔE med mean/max':>17}")
    lines = ["Edit quality against ground truth (goals: protect 0 px, coverage ≥ 97 %, leak ≤ 1 %, halo ≤ 2 %, "
             "remove ΔE median ≤ 5)", head]
    for s in summary(result):
        de = (f"{s['delta_e_median_mean']:.1f}/{s['delta_e_median_max']:.1f}" if "delta_e_median_mean" in s else "-")
        lines.append(
            f"{s['source']:<10}{s['op']:<8}{s['concept']:<8}{s['scenes']:>7}{s['refused']:>8}"
            f"{s.get('protect_changed_px', '-'):>11}"
            f"{_pct(s.get('coverage_mean')) + '/' + _pct(s.get('coverage_min')):>20}"
            f"{_pct(s.get('leak_mean')) + '/' + _pct(s.get('leak_max')):>18}"
            f"{_pct(s.get('halo_mean')) + '/' + _pct(s.get('halo_max')):>18}"
            f"{(format(s['delta_l_mean'], '.1f') if 'delta_l_mean' in s else '-'):>6}{de:>17}")
    lines.append("")
    lines.append("Built-in segmenter IoU (goals: ceiling/wall/floor ≥ 0.9, objects ≥ 0.8)")
    for concept, v in iou_summary(result).items():
        goal = GOALS["iou_planes"] if concept in PLANES else GOALS["iou_objects"]
        lines.append(f"  {concept:<8} mean {v['mean']:.3f}  min {v['min']:.3f}  over {v['scenes']} scenes"
                     f"  {'meets' if v['min'] >= goal else 'misses'} {goal}")
    if result.get("fast_recolor_db"):
        db = result["fast_recolor_db"]
        goal = GOALS["fast_recolor_db"]
        lines.append("")
        lines.append(f"Fast recolor ({ops.CHROMA_STEP}x{ops.CHROMA_STEP} cells) against the per-pixel formula, inside "
                     f"the wall: PSNR mean {sum(db) / len(db):.1f} dB, min {min(db):.1f} dB over {len(db)} scenes  "
                     f"{'meets' if min(db) >= goal else 'misses'} {goal:.0f} dB")
    return "\n".join(lines)


def main(quick: bool = False, json_path: str | None = None, gallery_dir: str | None = None) -> int:
    """`palette bench --quality [--quick] [--json FILE]`; with ``gallery_dir`` the before/after
    gallery of the same run is written there too."""
    started = time.perf_counter()
    keep: dict[str, Any] | None = {} if gallery_dir else None
    result = run(QUICK if quick else FULL, keep=keep)
    print(table(result))
    print(f"\n{len(result['iou'])} scenes in {time.perf_counter() - started:.0f} s")
    if json_path:
        Path(json_path).write_text(json.dumps({**result, "summary": summary(result),
                                               "iou_summary": iou_summary(result)}, indent=1))
    if gallery_dir and keep is not None:
        gallery(Path(gallery_dir), keep, table(result))
    return 0


def _jpeg(image: np.ndarray, width: int = 480) -> Image.Image:
    img = Image.fromarray(image)
    img.thumbnail((width, width), Image.Resampling.LANCZOS)
    return img


def gallery(out: Path, keep: dict[str, Any], report: str) -> None:
    """Before/after of each op (the first scene, the worst per mask source) as small JPEGs, with
    an index."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Edit quality gallery", "",
             "Made by `python -m tests.bench.quality --gallery docs/quality` from generated scenes "
             "(tests/bench/scenes.py), through the worker's own compute: `first` and `true-worst` with the true "
             "masks as client masks (judges the ops), `segmenter-worst` with the built-in segmenter's masks. "
             "Left: input; right: output.", ""]
    for name in sorted(keep):
        row, before, after = keep[name]
        left, right = _jpeg(before), _jpeg(after)
        pair = Image.new("RGB", (left.width * 2 + 8, left.height), "white")
        pair.paste(left, (0, 0))
        pair.paste(right, (left.width + 8, 0))
        buf = io.BytesIO()
        pair.save(buf, "JPEG", quality=80)
        (out / f"{name}.jpg").write_bytes(buf.getvalue())
        facts = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k != "seconds")
        lines += [f"## {name.replace('-', ' ')}: {row['op']} {row['concept']} {row['value']} "
                  f"(seed {row['seed']}, {row['size']})", "", f"![{name}]({name}.jpg)", "", facts, ""]
    lines += ["## Table", "", "```", report, "```", ""]
    (out / "README.md").write_text("\n".join(lines))
    print(f"gallery written to {out}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m tests.bench.quality")
    cli.add_argument("--gallery", metavar="DIR", help="write the before/after gallery here")
    cli.add_argument("--quick", action="store_true", help="four small scenes")
    cli.add_argument("--json", dest="json_path")
    args = cli.parse_args()
    sys.exit(main(args.quick, args.json_path, args.gallery))
