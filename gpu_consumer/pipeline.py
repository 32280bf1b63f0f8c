"""One item's edit, start to finish: fetch and decode its photo and masks, segment and refine,
edit on the device, encode, store the output, preview, used masks and instances."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from domain.contracts.gpu_task import Task
from domain.contracts.keys import MAX_INPUT_BYTES
from gpu_consumer import ops
from gpu_consumer.codec import BadInput, decode_upright, encode_png, encode_preview, read_mask
from gpu_consumer.fill import has_surroundings
from gpu_consumer.refine import refine_masks
from gpu_consumer.segment import Instance, Segmenter, built_in


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class Fetched(NamedTuple):
    """An item's photo and client masks, decoded, and the photo's colour profile, if it carries one."""

    image: torch.Tensor
    masks: dict[str, torch.Tensor]
    profile: bytes | None = None


@dataclass(frozen=True)
class Edited:
    """One edited item on the CPU, as it is stored: the output ``[H, W, 3]``, each mask the edit
    used as uint8 ``[H, W]`` (rounded up: a pixel the edit could touch is at least 1), the
    concepts whose mask was the client's, and the instances the segmenter found."""

    image: torch.Tensor
    masks: dict[str, torch.Tensor]
    client: frozenset[str]
    found: list[Instance]
    profile: bytes | None = None  # the photo's ICC profile, which the output and preview carry

    def instances_json(self, task: Task) -> bytes:
        """The instances document (deterministic bytes: a retry writes the same)."""
        concepts: dict[str, Any] = {}
        for concept, mask in self.masks.items():
            if concept in self.client:
                whole = Instance.of_mask(concept, mask > 127, 1.0, "client")
                instances = [whole] if whole is not None else []
            else:
                instances = [i for i in self.found if i.concept == concept]
            concepts[concept] = {
                "role": "protect" if concept in task.protect else "edit",
                "source": "client" if concept in self.client else "segmenter",
                "instances": [{k: v for k, v in i.as_json().items() if k != "concept"} for i in instances]}
        h, w = self.image.shape[:2]
        return json.dumps({"idx": task.idx, "width": w, "height": h, "concepts": concepts}, sort_keys=True).encode()


def used_masks(masks: dict[str, torch.Tensor], concepts: Sequence[str],
               size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The masks of ``concepts`` as uint8 ``[H, W]`` on the CPU (one transfer), rounded up; a
    concept without a mask (a protected one not in the photo) as zeros."""
    present = [c for c in concepts if c in masks]
    out = {c: torch.zeros(size, dtype=torch.uint8) for c in concepts if c not in masks}
    if present:
        device = masks[present[0]].device
        stacked = torch.empty((len(present), *size), dtype=torch.uint8, device=device)
        scaled = torch.empty(size, dtype=torch.float32, device=device)  # one scratch for all
        for i, c in enumerate(present):
            mask = masks[c].reshape(size).to(torch.float32)  # as they come (float32): no copy
            stacked[i].copy_(torch.mul(mask, 255, out=scaled).ceil_().clamp_(0, 255))
        out.update(zip(present, stacked.cpu(), strict=True))
    return {c: out[c] for c in concepts}


def _fraction(mask: torch.Tensor) -> torch.Tensor:
    """A mask as float in [0, 1]: a uint8 one over 255 (as codec.decode_mask reads it)."""
    return mask.to(torch.float32).div_(255.0) if mask.dtype == torch.uint8 else mask


class ImagePipeline:
    """Fetch -> decode -> masks -> edits -> encode -> upload, for one item or a same-size group."""

    def __init__(self, s3: Any, bucket: str, device: torch.device, segmenter: Segmenter | None = None,
                 texture_cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.device = device
        self.segmenter = segmenter or built_in()
        self.texture_cache = ops.TextureCache(texture_cache_bytes)

    def _get(self, key: str, what: str) -> bytes | None:
        """The object at ``key`` (None when there is none), refused unread when the store says it
        is over the input limit (``what`` names it in the reason: "photo", "mask of wall")."""
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=key)
        except self.s3.exceptions.NoSuchKey:
            return None
        except self.s3.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        if obj.get("ContentLength", 0) > MAX_INPUT_BYTES:
            obj["Body"].close()
            raise BadInput(f"the {what} is larger than {MAX_INPUT_BYTES >> 20} MB")
        # A byte past the limit at most, whatever the store said (an answer may come without a
        # length): a presigned PUT bounds nothing. A read may return less than asked before the end.
        parts: list[bytes] = []
        size = 0
        while size <= MAX_INPUT_BYTES and (part := obj["Body"].read(MAX_INPUT_BYTES + 1 - size)):
            parts.append(part)
            size += len(part)
        if size > MAX_INPUT_BYTES:
            obj["Body"].close()
            raise BadInput(f"the {what} is larger than {MAX_INPUT_BYTES >> 20} MB")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fetch(self, task: Task) -> Fetched:
        """The decoded input, the client masks that exist, uint8 (read_mask: they wait for the
        edit a byte a pixel), and the photo's colour profile (I/O; runs on a thread)."""
        data = self._get(task.input_key, "photo")
        if data is None:
            raise BadInput("input image is missing")
        image, orientation, profile = decode_upright(data)
        masks = {}
        for concept in [*task.concepts, *task.protect]:
            key = task.mask_keys.get(concept)
            blob = self._get(key, f"mask of {concept}") if key else None
            if blob is not None:  # a reason names the mask: an item may have one a concept
                masks[concept] = read_mask(blob, (image.shape[0], image.shape[1]), orientation,
                                           f"mask of {concept}")
        empty = sorted(c for c in task.concepts if c in masks and not bool((masks[c] > 127).any()))  # > 0.5
        if empty:  # an edit of nothing, billed: say why instead (the item fails, refunded)
            raise BadInput(f"the mask of {', '.join(empty)} is empty: white is the concept, black is not "
                           "(transparency is not read)")
        return Fetched(image, masks, profile)

    def compute(self, image_u8: torch.Tensor, client_masks: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
        """Edit one image on the device; returns uint8 ``[H, W, 3]`` on the CPU."""
        return self.edit(image_u8, client_masks, task).image

    def edit(self, image_u8: torch.Tensor, client_masks: dict[str, torch.Tensor], task: Task,
             profile: bytes | None = None) -> Edited:
        """Edit one image on the device; the output and the masks it used (those the task has a
        ``used_mask_keys`` entry for) on the CPU, with the photo's ``profile`` to store them with.
        Client masks come as float in [0, 1] or as uint8 (fetch's), made float on the device.
        A segmenter's masks are first refined against the photo; a client's are used as given
        (:mod:`gpu_consumer.refine`)."""
        for edit in task.concepts.values():  # a bad edit fails the item before the segmenter runs
            ops.check_edit(edit.get("action"), edit.get("value", ""))
        original = image_u8.to(self.device, non_blocking=True)
        image = ops.to_float(original)
        wanted = [*task.concepts, *task.protect]
        missing = [c for c in wanted if c not in client_masks]
        masks = {c: _fraction(m.to(self.device)) for c, m in client_masks.items()}
        found: list[Instance] = []
        if missing:
            segmented, found = self.segmenter.segment(image, missing,
                                                      optional=[c for c in missing if c in task.protect])
            masks.update(segmented)
        masks = refine_masks(image, masks, client=client_masks.keys())
        protect = None
        if task.protect:
            protect = torch.stack([masks[c] for c in task.protect if c in masks]).amax(dim=0) if any(
                c in masks for c in task.protect) else None
        if protect is not None:  # protection wins: edits it wholly covers change nothing, billed
            open_ = protect <= 0.5
            covered = sorted(c for c in task.concepts if c in masks and not bool(((masks[c] > 0.5) & open_).any()))
            if covered and len(covered) == sum(c in masks for c in task.concepts):  # another edit still shows
                raise BadInput(f"the mask of {', '.join(covered)} lies wholly under what is protected "
                               f"({', '.join(c for c in task.protect if c in masks)}): nothing would change")
        for concept, edit in task.concepts.items():  # a fill from nothing is a black photo, billed
            if edit.get("action") == "remove" and concept in masks and not has_surroundings(
                    masks[concept] if protect is None else masks[concept] * (protect <= 0.5)):
                raise BadInput(f"the mask of {concept} covers the whole photo: remove fills it from what is "
                               "around it, and nothing is")
        out = ops.apply_edits(image, masks, task.concepts, protect, self.texture_cache,
                              crop=self.device.type == "cpu")
        changed = torch.zeros_like(image[:, :1])
        for concept in task.concepts:
            if concept in masks:
                changed = torch.maximum(changed, masks[concept])
        if protect is not None:
            changed = changed * (protect <= 0.5)
        out_u8 = ops.to_u8(out, original, changed).cpu()
        kept = used_masks(masks, [c for c in wanted if c in task.used_mask_keys], (out_u8.shape[0], out_u8.shape[1]))
        return Edited(out_u8, kept, frozenset(client_masks), found, profile)

    def store(self, task: Task, edited: Edited) -> None:
        """The masks used and their instances, then the output and its preview (all before the
        callback: a reported item has every object)."""
        for concept, mask in edited.masks.items():
            self.s3.put_object(Bucket=self.bucket, Key=task.used_mask_keys[concept], Body=encode_png(mask),
                               ContentType="image/png")
        if task.instances_key:
            self.s3.put_object(Bucket=self.bucket, Key=task.instances_key, Body=edited.instances_json(task),
                               ContentType="application/json")
        self.s3.put_object(Bucket=self.bucket, Key=task.output_key,
                           Body=encode_png(edited.image, profile=edited.profile), ContentType="image/png")
        self.s3.put_object(Bucket=self.bucket, Key=task.preview_key,
                           Body=encode_preview(edited.image, profile=edited.profile), ContentType="image/jpeg")
