"""The signed callback: an item's result reported to the API (HMAC over timestamp, job and
body, a nonce each; ``CallbackUnavailable`` when the API does not acknowledge it)."""

from __future__ import annotations

import logging
import secrets
import time

import httpx

from domain.contracts import trace
from domain.contracts.callback import callback_body, signed_headers
from domain.contracts.gpu_task import Task
from domain.text import escaped

log = logging.getLogger("palette.gpu")


# Refusals that record nothing and ask to try again (a save that met conflicts through all its
# retries answers 409 CONFLICT): not the item's fault, so not a refusal that drops it.
TRY_AGAIN = frozenset({"CONFLICT"})


def _error_code(r: httpx.Response) -> str:
    """The envelope's error code of an API answer ("" when it has none)."""
    try:
        error = r.json().get("error")
    except (ValueError, AttributeError):
        return ""
    return str(error.get("code", "")) if isinstance(error, dict) else ""


class CallbackUnavailable(RuntimeError):
    """The API did not acknowledge a result: the offset must not be committed."""


class CallbackClient:
    """Reports item results to the API, signed with HMAC over timestamp + body."""

    def __init__(self, base_url: str, secret: str, timeout_s: float = 10.0) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s)
        self._secret = secret

    def report(self, task: Task, status: str, output_key: str = "", preview_key: str = "", error: str = "") -> str:
        # the error may quote the bad input: made printable first
        raw = callback_body(task.idx, status, task.idempotency_key, output_key=output_key,
                            preview_key=preview_key, error=escaped(error)[:2000])
        nonce = secrets.token_hex(8)  # every request signs differently: the API takes a signature once
        headers = signed_headers(self._secret, int(time.time()), task.job_id, raw, nonce)
        if task.traceparent:  # the result is recorded in the trace of the request that queued the job
            headers[trace.HEADER] = task.traceparent
        try:
            r = self.http.post(f"/jobs/{task.job_id}/callback", content=raw, headers=headers)
        except httpx.HTTPError as e:
            raise CallbackUnavailable(f"callback failed: {type(e).__name__}") from None
        if r.status_code >= 500 or r.status_code in (401, 429):
            raise CallbackUnavailable(f"callback answered {r.status_code}")
        if r.status_code >= 400:
            if (code := _error_code(r)) in TRY_AGAIN:
                raise CallbackUnavailable(f"callback answered {r.status_code} {code}")
            # The job is gone or in a state that takes no results: nothing to retry.
            log.warning("callback for %s refused: %s", task.idempotency_key, r.text[:200])
            return "refused"
        try:
            return str(r.json()["data"]["outcome"])
        except (ValueError, KeyError, TypeError):
            raise CallbackUnavailable(f"callback answered {r.status_code} with an unreadable body") from None

    def close(self) -> None:
        self.http.close()
