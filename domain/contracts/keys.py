"""The S3 key layout (ARCHITECTURE §3): every object of a job lives under its user's prefix."""

from __future__ import annotations

from uuid import UUID

URL_TTL_S = 900  # a presigned link to any of these objects lives at most 15 minutes
# A job's creation retried once its Idempotency-Key is forgotten hands its upload links out again
# only this soon after the creation, so every upload link of a job has expired LINKS_EXPIRED_S
# after its creation.
REISSUE_S = 300
LINKS_EXPIRED_S = URL_TTL_S + REISSUE_S
# The largest photo taken: confirm-upload refuses (and deletes) a larger input, a rerun refuses
# to copy one, and the GPU worker refuses to read one. A presigned PUT cannot bound what is sent:
# the sweeper deletes a larger input or mask once the job's links have expired.
MAX_INPUT_BYTES = 20 * 1024 * 1024


def inputs_prefix(user_id: UUID, job_id: UUID) -> str:
    return f"inputs/{user_id}/{job_id}/"


def input_key(user_id: UUID, job_id: UUID, idx: int) -> str:
    return f"{inputs_prefix(user_id, job_id)}{idx}.jpg"


def output_key(user_id: UUID, job_id: UUID, idx: int) -> str:
    return f"outputs/{user_id}/{job_id}/{idx}_result.png"


def masks_prefix(user_id: UUID, job_id: UUID) -> str:
    """A job's masks: the client's (``mask_key``, written through upload links) and the used ones."""
    return f"masks/{user_id}/{job_id}/"


def mask_key(user_id: UUID, job_id: UUID, idx: int, concept: str) -> str:
    return f"{masks_prefix(user_id, job_id)}{idx}_{concept}.png"


def used_masks_prefix(user_id: UUID, job_id: UUID) -> str:
    """Where the GPU worker writes the masks it used. Apart from the client's ``mask_key`` on
    purpose: the worker never reads what it wrote, so a retried or redelivered task sees the same
    inputs as the first attempt and computes the same."""
    return f"{masks_prefix(user_id, job_id)}used/"


def used_mask_key(user_id: UUID, job_id: UUID, idx: int, concept: str) -> str:
    """A mask the GPU worker used for an item, as refined against the photo (what the edit was held to)."""
    return f"{used_masks_prefix(user_id, job_id)}{idx}_{concept}.png"


def instances_key(user_id: UUID, job_id: UUID, idx: int) -> str:
    """The JSON beside an item's used masks: per concept its source (client or segmenter) and its
    instances (box, area, confidence)."""
    return f"{used_masks_prefix(user_id, job_id)}{idx}_instances.json"


def preview_key(user_id: UUID, job_id: UUID, idx: int) -> str:
    return f"previews/{user_id}/{job_id}/{idx}_thumb.jpg"


def callback_key(job_id: UUID, idx: int) -> str:
    """The idempotency key a GPU worker reports an item result under."""
    return f"{job_id}:{idx}"


KINDS = ("inputs", "outputs", "masks", "previews")  # every object of a job is under one of these


def job_prefixes(user_id: UUID, job_id: UUID) -> list[str]:
    """The prefixes that hold every object of one job (what deleting the job removes)."""
    return [f"{kind}/{user_id}/{job_id}/" for kind in KINDS]


def user_prefixes(user_id: UUID) -> list[str]:
    """The prefixes that hold every object of one user (what erasing the user removes)."""
    return [f"{kind}/{user_id}/" for kind in KINDS]
