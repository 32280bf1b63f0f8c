"""The s3 service's health check (``EmbeddedStack._s3_writes``): what counts as SeaweedFS not doing
its work, which the supervisor restarts it for, and what does not (a full disk is not its fault)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

import infra.stack as stack_module
from adapters.bootstrap import embedded_stack
from adapters.settings import load_settings
from infra.stack import S3_HEALTH_BYTES, S3_HEALTH_FREE_BYTES, S3_HEALTH_KEY


class Store:
    """An S3 client whose put answers ``refusal`` (None: takes it); what was put and deleted."""

    def __init__(self, refusal: Exception | None = None) -> None:
        self.refusal = refusal
        self.put: list[tuple[str, int]] = []
        self.deleted: list[str] = []

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:
        if self.refusal is not None:
            raise self.refusal
        self.put.append((Key, len(Body)))

    def delete_object(self, Bucket: str, Key: str) -> None:
        self.deleted.append(Key)


def _answer(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Store, free: int = 10 * 2**30,
             size: int = 20 * 2**30) -> bool:
    stack = embedded_stack(load_settings(data_dir=tmp_path))
    (tmp_path / "s3").mkdir(exist_ok=True)
    real = os.statvfs

    def statvfs(path: Any) -> Any:
        fs = real(path)
        return os.statvfs_result((fs.f_bsize, 4096, size // 4096, free // 4096, free // 4096, *fs[5:]))

    monkeypatch.setattr(stack_module.os, "statvfs", statvfs)
    monkeypatch.setattr(stack, "_s3_probe", lambda: store)
    return stack._s3_writes()


def test_a_store_that_takes_the_write_is_healthy_and_the_object_is_deleted(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store()
    assert _checked(tmp_path, monkeypatch, store)
    assert store.put == [(S3_HEALTH_KEY, S3_HEALTH_BYTES)] and store.deleted == [S3_HEALTH_KEY]


@pytest.mark.parametrize("refusal", [_answer(500, "InternalError"), _answer(503, "ServiceUnavailable"),
                                     EndpointConnectionError(endpoint_url="http://127.0.0.1:1/palette-images"),
                                     ReadTimeoutError(endpoint_url="http://127.0.0.1:1/palette-images")])
def test_a_store_that_refuses_with_a_5xx_or_does_not_answer_while_its_disk_has_room_is_unhealthy(
        refusal: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _checked(tmp_path, monkeypatch, Store(refusal))


def test_a_refusal_of_the_request_itself_is_an_answer_not_a_store_in_trouble(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert _checked(tmp_path, monkeypatch, Store(_answer(404, "NoSuchBucket")))
    assert _checked(tmp_path, monkeypatch, Store(_answer(403, "AccessDenied")))


def test_a_store_refusing_writes_on_a_disk_with_little_room_left_is_not_blamed(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart would not give the disk room, and would cut off the reads the store still serves."""
    store = Store(_answer(500, "InternalError"))
    small = 4 * 2**30  # 2% of it under S3_HEALTH_FREE_BYTES: the bytes decide
    assert _checked(tmp_path, monkeypatch, store, free=S3_HEALTH_FREE_BYTES - 4096, size=small)
    assert not _checked(tmp_path, monkeypatch, store, free=S3_HEALTH_FREE_BYTES + 4096, size=small)


def test_the_check_makes_one_attempt_on_one_client_kept_between_checks(tmp_path: Path) -> None:
    """It runs in `palette up`'s one loop: against a store that takes the connection and never
    answers, a new client each check with the default retries held that loop (other restarts,
    Ctrl-C) 9 s of every 15."""
    stack = embedded_stack(load_settings(data_dir=tmp_path))
    client = stack._s3_probe()
    assert stack._s3_probe() is client
    assert client.meta.config.retries["total_max_attempts"] == 1
    assert client.meta.config.read_timeout <= 2 and client.meta.config.connect_timeout <= 2


def test_a_store_refusing_writes_under_seaweedfs_own_free_space_floor_is_not_blamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SeaweedFS's volume server marks every volume read-only with under 1% of its disk free (weed
    mini's default minFreeSpace): on a disk of 500 GiB, 2 GiB free is far over S3_HEALTH_FREE_BYTES,
    and a restart every minute would neither give it room nor let it write, only cut off its reads."""
    store = Store(_answer(500, "InternalError"))
    assert _checked(tmp_path, monkeypatch, store, free=2 * 2**30, size=500 * 2**30)
    assert not _checked(tmp_path, monkeypatch, store, free=20 * 2**30, size=500 * 2**30)
