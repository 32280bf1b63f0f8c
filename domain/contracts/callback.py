"""The GPU callback: ``POST /jobs/{job_id}/callback`` with a JSON body, signed with HMAC-SHA256.

The worker reports each item under its callback key (``keys.callback_key``); the API accepts a
valid signature inside ``CALLBACK_WINDOW_S`` once (the nonce makes every request sign differently).
"""

from __future__ import annotations

import hashlib
import hmac
import json

CALLBACK_WINDOW_S = 300
TIMESTAMP_HEADER = "X-Palette-Timestamp"
NONCE_HEADER = "X-Palette-Nonce"
SIGNATURE_HEADER = "X-Palette-Signature"


def callback_body(idx: int, status: str, idempotency_key: str, *, output_key: str = "", preview_key: str = "",
                  error: str = "") -> bytes:
    """The body of one item's report: ``done`` names its output and preview, ``failed`` its error."""
    body: dict[str, object] = {"idx": idx, "status": status, "idempotency_key": idempotency_key}
    if status == "done":
        body |= {"output_key": output_key, "preview_key": preview_key}
    else:
        body["error"] = error
    return json.dumps(body).encode()


def sign_callback(secret: str, timestamp: int, job_id: str, body: bytes, nonce: str = "") -> str:
    """HMAC-SHA256 over ``timestamp.nonce.job_id.body``: good for one job's URL only, and (with a
    fresh nonce per request) unique, so the API can accept each signature once."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{nonce}.{job_id}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, timestamp: int, job_id: str, body: bytes, nonce: str = "") -> dict[str, str]:
    """The headers of a signed report (JSON content type, timestamp, nonce, signature)."""
    return {"content-type": "application/json", TIMESTAMP_HEADER: str(timestamp), NONCE_HEADER: nonce,
            SIGNATURE_HEADER: sign_callback(secret, timestamp, job_id, body, nonce)}


def verify_callback(
    secret: str, now: int, job_id: str, body: bytes, *, shared_secret: str | None = None,
    timestamp: str | None = None, signature: str | None = None, nonce: str | None = None,
    allow_shared_secret: bool = True,
) -> bool:
    """Accept a valid HMAC signature inside the window, or (when allowed, and only when no
    signature is offered) the shared secret, compared in constant time."""
    if signature is not None or timestamp is not None:
        # A signature offered is the whole proof: a wrong or partial one is refused, never
        # excused by a shared secret riding along with it.
        if signature is None or timestamp is None:
            return False
        try:
            ts = int(timestamp)
        except ValueError:
            return False
        if abs(now - ts) > CALLBACK_WINDOW_S:
            return False
        return hmac.compare_digest(sign_callback(secret, ts, job_id, body, nonce or "").encode(),
                                   signature.encode())
    if allow_shared_secret and shared_secret is not None:
        return hmac.compare_digest(shared_secret.encode(), secret.encode())
    return False
