"""A rerun copies its source's photos and masks in S3 at the server's cost, and a rerun canceled
(or failed) spends no credit while its copy is kept a day: rerun-and-cancel of one upload stored
that upload again per round, bounded only by the job budget's 1,000 creations a day (a 1 GB
upload: 1 TB a day, for nothing). The bytes a user's reruns copy are bounded per day
(PALETTE_RERUN_COPY_BYTES_PER_DAY): past them a rerun is a 429 with Retry-After, before anything
is recorded or copied; a rerun refused for another reason spends none of them. Its mask links,
signed once the copy is done, expire LINKS_EXPIRED_S after the new job's creation at the latest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit
from uuid import UUID, uuid4

from fastapi.testclient import TestClient

from adapters.api.app import create_app
from adapters.settings import Settings
from application.services import RerunSource
from application.unit_of_work import Committed
from domain.contracts.keys import LINKS_EXPIRED_S, REISSUE_S, URL_TTL_S, input_key
from domain.errors import InvalidState
from domain.job import JobStatus

GB = 2**30
PHOTOS, PHOTO_BYTES = 50, 20 * 2**20  # a free user's largest job of 20 MB photos: 1 GiB a rerun


class FakeS3:
    def __init__(self, user_id: UUID, source: UUID) -> None:
        self.listing = [{"Key": input_key(user_id, source, i), "Size": PHOTO_BYTES} for i in range(PHOTOS)]
        self.copies = 0

    def get_paginator(self, _name: str) -> SimpleNamespace:
        return SimpleNamespace(paginate=lambda **kw: [{"Contents": [o for o in self.listing
                                                                   if o["Key"].startswith(kw["Prefix"])]}])

    def copy_object(self, **_kw: object) -> None:
        self.copies += 1


class FakeService:
    """A source job of PHOTOS photos; each rerun makes a new job waiting for its photos."""

    def __init__(self) -> None:
        self.refuse: Exception | None = None
        self.made_before: UUID | None = None  # a retry under the same Idempotency-Key: the job made then
        self.concepts: tuple[str, ...] = ()
        self.created_on: datetime | None = None  # the new job's creation (None: now)
        self.sealer = SimpleNamespace(evict=lambda _u: None)
        self.user_views = None

    async def rerun_source_async(self, _user: UUID, _job: UUID) -> RerunSource:
        return RerunSource(item_count=PHOTOS, concepts=self.concepts)

    def rerun_job_command(self, *_a: object) -> None:
        return None

    async def run(self, _command: object) -> Committed[UUID]:
        if self.refuse is not None:
            raise self.refuse
        if self.made_before is not None:
            return Committed(value=self.made_before, position=None, versions={}, recorded=False)
        new = uuid4()
        return Committed(value=new, position=1, versions={new: 1}, recorded=True)

    async def get_job_async(self, _user: UUID, _job: UUID) -> SimpleNamespace:
        return SimpleNamespace(status=JobStatus.CREATED, created_on=self.created_on or datetime.now(UTC))


def _client(per_day: int) -> tuple[TestClient, FakeS3, FakeService, dict[str, str], UUID]:
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48,
                        rerun_copy_bytes_per_day=per_day)
    user, source = uuid4(), uuid4()
    s3, service = FakeS3(user, source), FakeService()
    container = SimpleNamespace(settings=settings, read_pool=None, service=service, s3=s3,
                                last_writes=SimpleNamespace(record=lambda *a: None))
    app = create_app(container)  # type: ignore[arg-type]
    token = app.state.tokens.issue(user, datetime.now(UTC))
    return TestClient(app, raise_server_exceptions=False), s3, service, {"Authorization": f"Bearer {token}"}, source


def test_reruns_past_the_days_copy_bytes_are_refused_before_anything_is_copied() -> None:
    api, s3, _service, auth, source = _client(per_day=5 * GB)
    answers = [api.post(f"/jobs/{source}/rerun", headers=auth) for _ in range(6)]
    assert [a.status_code for a in answers] == [201] * 5 + [429], [a.text[:120] for a in answers]
    assert answers[-1].json()["error"]["code"] == "RATE_LIMITED"
    assert int(answers[-1].headers["Retry-After"]) > 3600  # a day's bytes come back over the day
    assert s3.copies == 5 * PHOTOS


def test_a_rerun_refused_for_another_reason_spends_no_copy_bytes() -> None:
    api, s3, service, auth, source = _client(per_day=5 * GB)
    service.refuse = InvalidState("the user holds an unfinished job")
    assert all(api.post(f"/jobs/{source}/rerun", headers=auth).status_code == 409 for _ in range(8))
    service.refuse = None
    assert [api.post(f"/jobs/{source}/rerun", headers=auth).status_code for _ in range(5)] == [201] * 5
    assert s3.copies == 5 * PHOTOS


def test_a_rerun_that_hands_back_the_job_made_before_spends_no_copy_bytes() -> None:
    """A retry under the same Idempotency-Key copies the same objects onto the same keys again:
    nothing more is stored, so it spends none of the day's bytes."""
    api, s3, service, auth, source = _client(per_day=5 * GB)
    service.made_before = uuid4()
    assert [api.post(f"/jobs/{source}/rerun", headers=auth).status_code for _ in range(8)] == [201] * 8
    service.made_before = None
    answers = [api.post(f"/jobs/{source}/rerun", headers=auth).status_code for _ in range(6)]
    assert answers == [201] * 5 + [429]
    assert s3.copies == (8 + 5) * PHOTOS


def test_a_rerun_larger_than_a_whole_days_copy_bytes_is_refused_as_such_not_told_to_wait() -> None:
    api, s3, _service, auth, source = _client(per_day=5 * GB)
    s3.listing.append({"Key": s3.listing[0]["Key"].replace("/0.", "/extra."), "Size": 5 * GB})  # 6 GiB in all
    answer = api.post(f"/jobs/{source}/rerun", headers=auth)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "INVALID_STATE", answer.text
    assert "GiB" in answer.json()["error"]["message"] and s3.copies == 0


def test_a_reruns_mask_links_expire_within_links_expired_s_of_the_new_jobs_creation() -> None:
    """A retry under the same Idempotency-Key hands the job back up to REISSUE_S after its
    creation, and the mask links are signed only once the copy is done (a big job's takes a
    while): a link must still have expired LINKS_EXPIRED_S after the creation, when the sweeper
    deletes what the links admitted beyond the largest photo (a presigned PUT bounds no size)."""
    api, _s3, service, auth, source = _client(per_day=50 * GB)
    service.concepts, service.made_before = ("wall",), uuid4()
    for late_s in (0, REISSUE_S - 1, REISSUE_S + 60):  # the retry's answer, and the copy's time
        service.created_on = created = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=late_s)
        answer = api.post(f"/jobs/{source}/rerun", headers=auth)
        assert answer.status_code == 201, answer.text
        data = answer.json()["data"]
        assert len(data["masks"]) == PHOTOS
        for slot in data["masks"]:
            query = parse_qs(urlsplit(slot["url"]).query)
            signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            expires_s = int(query["X-Amz-Expires"][0])
            assert expires_s == data["expires_in"] <= URL_TTL_S
            assert signed + timedelta(seconds=expires_s) <= created + timedelta(seconds=LINKS_EXPIRED_S), late_s
        if late_s == 0:
            assert data["expires_in"] == URL_TTL_S


def test_the_users_of_one_address_share_its_days_copy_bytes() -> None:
    """A user costs a registration (20 at once from one address), so a budget per user alone let
    one client's throw-away users copy a day's bytes each: 25 users rerunning and canceling one
    20 MB upload apiece stored 400 GB a day. The users of one client address share
    PALETTE_RERUN_COPY_BYTES_PER_ADDRESS_PER_DAY; another address has its own."""
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48,
                        rerun_copy_bytes_per_day=5 * GB, rerun_copy_bytes_per_address_per_day=7 * GB,
                        trusted_proxies=1)
    users, source = [uuid4() for _ in range(3)], uuid4()
    s3, service = FakeS3(users[0], source), FakeService()
    s3.listing = [{"Key": input_key(u, source, i), "Size": PHOTO_BYTES} for u in users for i in range(PHOTOS)]
    container = SimpleNamespace(settings=settings, read_pool=None, service=service, s3=s3,
                                last_writes=SimpleNamespace(record=lambda *a: None))
    app = create_app(container)  # type: ignore[arg-type]
    api = TestClient(app, raise_server_exceptions=False)

    def rerun(user: UUID, address: str) -> int:
        token = app.state.tokens.issue(user, datetime.now(UTC))
        return api.post(f"/jobs/{source}/rerun", headers={"Authorization": f"Bearer {token}",
                                                          "X-Forwarded-For": address}).status_code

    assert [rerun(users[0], "203.0.113.7") for _ in range(5)] == [201] * 5
    assert [rerun(users[1], "203.0.113.7") for _ in range(3)] == [201, 201, 429]  # the address's 7 GiB spent
    assert s3.copies == 7 * PHOTOS
    assert rerun(users[2], "198.51.100.9") == 201  # another address: its own day
    assert s3.copies == 8 * PHOTOS


def test_a_rerun_larger_than_the_addresss_day_names_the_addresss_limit() -> None:
    """The refusal names the limit that refused it: one address's day (6 GiB here) when it is
    smaller than a user's (8 GiB), not the user's."""
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48,
                        rerun_copy_bytes_per_day=8 * GB, rerun_copy_bytes_per_address_per_day=6 * GB)
    user, source = uuid4(), uuid4()
    s3 = FakeS3(user, source)
    s3.listing.append({"Key": s3.listing[0]["Key"].replace("/0.", "/extra."), "Size": 6 * GB})  # 7 GiB in all
    container = SimpleNamespace(settings=settings, read_pool=None, service=FakeService(), s3=s3,
                                last_writes=SimpleNamespace(record=lambda *a: None))
    app = create_app(container)  # type: ignore[arg-type]
    token = app.state.tokens.issue(user, datetime.now(UTC))
    answer = TestClient(app).post(f"/jobs/{source}/rerun", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 409, answer.text
    message = answer.json()["error"]["message"]
    assert "7.0 GiB, more than the 6.0 GiB the reruns from one address may copy" in message, message
    assert s3.copies == 0
