"""Behind a proxy (``http_proxy`` set in the environment, as a corporate network's machines have it
to reach the package registries for `make install`), every HTTP client of the stack sent its
requests to the embedded stack's loopback addresses through the proxy: `palette up` ended with
"s3 not ready after 60s" (botocore asked the proxy for 127.0.0.1), and the API's readiness, the GPU
worker's callbacks and the tests' clients went the same way. Loopback is never proxied now:
`palette`'s main adds it to ``no_proxy``, which boto3, urllib and httpx all read."""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Iterator

import httpx
import pytest
from botocore.utils import should_bypass_proxies

from adapters.cli import main
from infra.config import LOOPBACK_HOSTS, unproxied_loopback
from tests.served import answering

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens


@contextlib.contextmanager
def _local_server() -> Iterator[str]:
    with answering(200, b"ok") as port:
        yield f"http://127.0.0.1:{port}/"


def _opened(url: str) -> bytes:
    """What urllib reads at ``url``, by an opener made now (urlopen's is made once and keeps the
    proxies of the environment it was made in)."""
    with urllib.request.build_opener().open(url, timeout=5) as resp:
        return bytes(resp.read())


@pytest.fixture
def behind_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_palettes_main_takes_loopback_out_of_the_proxys_way(behind_a_proxy: None) -> None:
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    for name in ("no_proxy", "NO_PROXY"):
        assert set(LOOPBACK_HOSTS) <= set(os.environ[name].split(","))


def test_every_client_then_reaches_loopback_directly(behind_a_proxy: None) -> None:
    with _local_server() as url:
        with pytest.raises(OSError):  # the oracle: through the dead proxy, before
            _opened(url)
        assert not should_bypass_proxies(url)
        unproxied_loopback(os.environ)
        assert _opened(url) == b"ok"
        with httpx.Client(timeout=5) as client:
            assert client.get(url).text == "ok"
        assert should_bypass_proxies(url)  # botocore's test, for every S3 client
        assert urllib.request.getproxies()["http"] == DEAD_PROXY  # the rest of the world still goes through it


def test_what_was_unproxied_already_is_kept_and_nothing_is_doubled() -> None:
    env = {"NO_PROXY": "internal.example,localhost"}
    unproxied_loopback(env)
    unproxied_loopback(env)
    for name in ("no_proxy", "NO_PROXY"):
        entries = env[name].split(",")
        assert entries[:2] == ["internal.example", "localhost"]
        assert sorted(entries) == sorted({"internal.example", *LOOPBACK_HOSTS})
