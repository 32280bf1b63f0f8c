"""The S3 key layout: every object a job makes lies under one of the prefixes that deleting the
job (and erasing its user) removes, and under no other job's or user's; the forms the worker and
the client share are pinned."""

from __future__ import annotations

from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from domain.contracts import keys

CONCEPTS = st.sampled_from(["wall", "floor", "sofa", "lamp", "product"])


def every_key(user: UUID, job: UUID, idx: int, concept: str) -> list[str]:
    return [keys.input_key(user, job, idx), keys.output_key(user, job, idx), keys.mask_key(user, job, idx, concept),
            keys.used_mask_key(user, job, idx, concept), keys.instances_key(user, job, idx),
            keys.preview_key(user, job, idx)]


@given(st.uuids(), st.uuids(), st.uuids(), st.integers(0, 199), CONCEPTS)
def test_every_object_of_a_job_is_under_the_prefixes_deleting_it_removes(user, job, other, idx, concept):
    for key in every_key(user, job, idx, concept):
        assert sum(key.startswith(p) for p in keys.job_prefixes(user, job)) == 1, key
        assert sum(key.startswith(p) for p in keys.user_prefixes(user)) == 1, key
        assert not any(key.startswith(p) for p in keys.job_prefixes(user, other)), key
        assert not any(key.startswith(p) for p in keys.user_prefixes(other)), key


def test_the_forms_the_worker_and_the_client_share():
    user, job = UUID(int=1), UUID(int=2)
    assert keys.callback_key(job, 7) == f"{job}:7"
    assert keys.input_key(user, job, 7) == f"inputs/{user}/{job}/7.jpg"
    assert keys.output_key(user, job, 7) == f"outputs/{user}/{job}/7_result.png"
    assert keys.preview_key(user, job, 7) == f"previews/{user}/{job}/7_thumb.jpg"
    assert keys.mask_key(user, job, 7, "wall") == f"masks/{user}/{job}/7_wall.png"
    assert sorted(keys.job_prefixes(user, job)) == sorted(
        f"{kind}/{user}/{job}/" for kind in ("inputs", "outputs", "masks", "previews"))
