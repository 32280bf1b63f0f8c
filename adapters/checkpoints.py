"""Signed checkpoints of the billing ledger's chain heads: what makes a consistent rewrite of a
user's chain (every later hash recomputed, which `palette audit verify` alone passes) visible.

A checkpoint is ``{"payload": {...}, "signature", "public_key", "algorithm": "Ed25519"}``; the
payload holds the log position the ledger had folded, every user's head (user, seq, hash, the
head row's position) and when it was taken. It is signed with an Ed25519 key that only the
signer holds (``PALETTE_AUDIT_SIGNING_KEY`` or ``PALETTE_AUDIT_SIGNING_KEY_FILE``; never in the
database) and kept outside the ledger tables: in the object store under ``audit/checkpoints/``
(use a bucket with object lock in production) and/or as files in
``PALETTE_AUDIT_CHECKPOINT_DIR``. An auditor verifies with the public key they were given
(``PALETTE_AUDIT_PUBLIC_KEY`` or ``--public-key``), never with the one a checkpoint carries.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from adapters.settings import Settings
from adapters.whole_files import write_new, write_whole

PREFIX = "audit/checkpoints/"
KIND = "palette.audit.checkpoint/1"
MAX_FILE_BYTES = 1 << 30  # a checkpoint read (file or object): about 7M chain heads


class CheckpointError(ValueError):
    """No key, a bad key, a checkpoint that does not verify or cannot be found; one line."""


def _raw_key(text: str, what: str) -> bytes:
    """32 raw bytes from hex or base64 text."""
    text = text.strip()
    try:
        raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise CheckpointError(f"{what} is neither 64 hex digits nor base64 of 32 bytes") from None
    if len(raw) != 32:
        raise CheckpointError(f"{what} must be 32 bytes (got {len(raw)})")
    return raw


def private_key(settings: Settings) -> Ed25519PrivateKey:
    """The signing key from the settings: raw (hex/base64) text, or a PEM (PKCS#8) file."""
    if settings.audit_signing_key:
        return Ed25519PrivateKey.from_private_bytes(_raw_key(settings.audit_signing_key, "PALETTE_AUDIT_SIGNING_KEY"))
    if settings.audit_signing_key_file:
        path = Path(settings.audit_signing_key_file).expanduser()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read the signing key file {path}: {e.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # cryptography's answer to a key under a passphrase, asked for none
            raise CheckpointError(f"{path} is under a passphrase: the signing key file must hold the key "
                                  "unencrypted (mode 0600, as `palette audit keygen` writes it)") from None
        except UnsupportedAlgorithm:
            raise CheckpointError(f"{path} holds no Ed25519 private key") from None
        except ValueError:
            key = Ed25519PrivateKey.from_private_bytes(_raw_key(data.decode(errors="replace"), str(path)))
        if not isinstance(key, Ed25519PrivateKey):
            raise CheckpointError(f"{path} holds no Ed25519 private key")
        return key
    raise CheckpointError("no signing key: set PALETTE_AUDIT_SIGNING_KEY or PALETTE_AUDIT_SIGNING_KEY_FILE "
                          "(`palette audit keygen --out FILE` makes one)")


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key(text: str) -> Ed25519PublicKey:
    """A public key from hex/base64 text or a PEM file path."""
    path = Path(text).expanduser()
    if len(text) < 256 and path.is_file():
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read the public key file {path}: {e.strerror}") from None
        try:
            loaded = serialization.load_pem_public_key(data)
        except ValueError:
            raise CheckpointError(f"{path} holds no PEM public key") from None
        except UnsupportedAlgorithm:  # a key of an algorithm cryptography does not know: no ValueError
            raise CheckpointError(f"{path} holds no Ed25519 public key") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise CheckpointError(f"{path} holds no Ed25519 public key")
        return loaded
    try:
        return Ed25519PublicKey.from_public_bytes(_raw_key(text, "the public key"))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            if "/" in text or text.endswith(".pem"):  # meant as a PEM file: say what is wrong with the path
                why = "is not a file" if path.exists() else "no such file"
                raise CheckpointError(f"{path}: {why} (a public key is 64 hex digits, base64 of 32 bytes, "
                                      "or a PEM file)") from None
            raise
        raise CheckpointError("the public key is not a valid Ed25519 key") from None


def trusted_key(settings: Settings, given: str | None) -> Ed25519PublicKey:
    """The key a checkpoint must verify under: given, configured, or the signing key's own."""
    if given:
        return public_key(given)
    if settings.audit_public_key:
        return public_key(settings.audit_public_key)
    try:
        return private_key(settings).public_key()
    except CheckpointError:
        raise CheckpointError("no public key to trust: pass --public-key or set PALETTE_AUDIT_PUBLIC_KEY") from None


def keygen(out: Path) -> Ed25519PublicKey:
    """A new signing key as a PEM file (mode 0600), written whole (``write_new``): an existing
    file is never overwritten."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        write_new(out, pem, 0o600)
    except FileExistsError:
        raise CheckpointError(f"{out} exists: not overwritten") from None
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    except ValueError as e:  # a NUL, which no path holds
        raise CheckpointError(f"cannot write {out!r}: {e}") from None
    return key.public_key()


def canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(payload: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"payload": payload, "algorithm": "Ed25519", "public_key": public_hex(key.public_key()),
            "signature": key.sign(canonical(payload)).hex()}


def verified_payload(doc: Any, key: Ed25519PublicKey) -> dict[str, Any]:
    """The payload of a checkpoint whose signature holds under ``key``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("payload"), dict) or doc.get("algorithm") != "Ed25519":
        raise CheckpointError("not a checkpoint (payload, algorithm Ed25519 and signature expected)")
    payload = doc["payload"]
    if payload.get("kind") != KIND:
        raise CheckpointError(f"not a checkpoint of this kind ({payload.get('kind')!r})")
    try:
        key.verify(bytes.fromhex(str(doc.get("signature", ""))), canonical(payload))
    except (InvalidSignature, ValueError):
        raise CheckpointError("the signature does not verify under the trusted public key "
                              f"{public_hex(key)}: the checkpoint was altered or signed by another key") from None
    return dict(payload)


@dataclass(frozen=True)
class CheckpointStore:
    """Checkpoints in the object store (``audit/checkpoints/<position>-<time>.json``) and/or a
    directory; names sort by log position, so the last name is the latest."""

    s3: Any | None
    bucket: str
    directory: Path | None

    @classmethod
    def of(cls, settings: Settings, use_s3: bool = True) -> CheckpointStore:
        from infra.s3 import s3_client

        folder = Path(settings.audit_checkpoint_dir).expanduser() if settings.audit_checkpoint_dir else None
        return cls(s3_client(settings) if use_s3 else None, settings.s3_bucket, folder)

    @staticmethod
    def name(payload: dict[str, Any]) -> str:
        taken = datetime.fromisoformat(payload["taken_at"]).strftime("%Y%m%dT%H%M%S%fZ")
        return f"{int(payload['log_position']):020d}-{taken}.json"

    def put(self, doc: dict[str, Any]) -> list[str]:
        """Keep a checkpoint everywhere configured; where it went."""
        body = json.dumps(doc, separators=(",", ":")).encode()
        name = self.name(doc["payload"])
        where = []
        if self.directory is not None:  # first: an object store that does not answer loses no copy here
            self.directory.mkdir(parents=True, exist_ok=True)
            write_whole(self.directory / name, body)
            where.append(str(self.directory / name))
        if self.s3 is not None:
            self.s3.put_object(Bucket=self.bucket, Key=PREFIX + name, Body=body, ContentType="application/json")
            where.append(f"s3://{self.bucket}/{PREFIX}{name}")
        if not where:
            raise CheckpointError("nowhere to keep checkpoints: no object store and no PALETTE_AUDIT_CHECKPOINT_DIR")
        return where

    def _kept(self) -> list[tuple[str, str]]:
        """Every checkpoint's name, with where it is kept ("s3" or "dir")."""
        found: list[tuple[str, str]] = []
        if self.s3 is not None:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=PREFIX)
            found += [(o["Key"][len(PREFIX):], "s3") for page in pages for o in page.get("Contents", [])
                      if o["Key"].endswith(".json")]
        if self.directory is not None and self.directory.is_dir():
            found += [(p.name, "dir") for p in self.directory.glob("*.json")]
        return found

    def _read(self, name: str, source: str) -> tuple[str, Any]:
        """The checkpoint kept under ``name``, refused when its payload gives it another name."""
        if source == "s3":
            body = self.s3.get_object(Bucket=self.bucket, Key=PREFIX + name)["Body"].read(  # type: ignore[union-attr]
                MAX_FILE_BYTES + 1)
            where = f"s3://{self.bucket}/{PREFIX}{name}"
            return where, _named(name, _document(body, name), where)
        assert self.directory is not None
        return str(self.directory / name), _named(name, read_file(self.directory / name), str(self.directory / name))

    def latest(self) -> tuple[str, Any]:
        """The newest checkpoint (by log position) and where it came from."""
        found = self._kept()
        if not found:
            raise CheckpointError("no checkpoint has been taken yet (`palette audit checkpoint`)")
        return self._read(*max(found))

    def before(self, payload: dict[str, Any]) -> tuple[str, Any] | None:
        """The checkpoint signed just before the one whose payload this is (None: none was), by
        the name its own payload gives it (log position, then time taken); refused, as latest()
        refuses one, when its payload gives it another name. Only that one is read: a chain of
        hourly checkpoints over years is never walked."""
        own = self.name(payload)
        earlier = [kept for kept in self._kept() if kept[0] < own]
        return self._read(*max(earlier)) if earlier else None


def _named(name: str, doc: Any, where: str) -> Any:
    """``doc``, kept under ``name``, if that is the name its payload gives it. The name is not
    signed: an older checkpoint copied under a name that sorts last (a bucket with object lock
    takes new objects) would pass for the latest and hide a rewrite after its heads."""
    try:
        own = CheckpointStore.name(doc["payload"])
    except (TypeError, KeyError, ValueError, OverflowError):
        return doc  # no checkpoint: verified_payload says so
    if own != name:
        raise CheckpointError(f"{where} holds the checkpoint named {own} (log position "
                              f"{int(doc['payload']['log_position']):,}): renamed or copied, not the "
                              "checkpoint its name says")
    return doc


def _document(body: bytes, where: str) -> Any:
    """The JSON document ``body`` holds, read to one byte past MAX_FILE_BYTES: refused (naming
    ``where``) when it is longer, not JSON, or nested deeper than the decoder goes."""
    if len(body) > MAX_FILE_BYTES:
        raise CheckpointError(f"{where} is over {MAX_FILE_BYTES >> 20} MB: not a checkpoint")
    try:
        return json.loads(body)
    except ValueError:
        raise CheckpointError(f"{where} is not JSON") from None
    except RecursionError:  # nested deeper than the decoder goes: no checkpoint is
        raise CheckpointError(f"{where} is not a checkpoint (JSON nested too deep)") from None


def read_file(path: Path) -> Any:
    """A checkpoint file: a regular file (a device or a pipe could be read forever) of at most
    MAX_FILE_BYTES."""
    try:
        # O_NONBLOCK: a FIFO with no writer would block the open itself, before any check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(f"{path} is not a regular file")
            os.set_blocking(fd, True)
            body = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # a NUL, which no path holds
        raise CheckpointError(f"cannot read {str(path)!r}: {e}") from None
    return _document(body, str(path))


def take(conn: Any, recorder: Any, key: Ed25519PrivateKey, now: datetime, wait_s: float = 30.0) -> dict[str, Any]:
    """A signed checkpoint of the ledger's chain heads now."""
    from projections.audit import chain_heads

    heads = chain_heads(conn, recorder, wait_s)
    payload = {"kind": KIND, "taken_at": now.isoformat(), **heads}
    return sign(payload, key)


class Checkpointer:
    """`palette serve checkpointer`: a signed checkpoint every ``interval_s`` seconds."""

    def __init__(self, settings: Settings) -> None:
        if settings.audit_checkpoint_interval_s <= 0:
            raise CheckpointError("PALETTE_AUDIT_CHECKPOINT_INTERVAL_S is 0: scheduled checkpoints are off")
        self.settings = settings
        self.key = private_key(settings)
        self.store = CheckpointStore.of(settings)
        self.interval_s = settings.audit_checkpoint_interval_s
        self.last_position = -1

    def step(self) -> list[str]:
        """Sign and keep a checkpoint, unless the log has not moved since the last one."""
        import psycopg

        from adapters.bootstrap import open_event_store
        from adapters.system import SystemClock

        app = open_event_store(self.settings, pool_size=1, saves=False)
        try:
            with psycopg.connect(self.settings.effective_database_url, autocommit=True) as conn:
                doc = take(conn, app.recorder, self.key, SystemClock().now())
        finally:
            app.close()
        if doc["payload"]["log_position"] == self.last_position:
            return []
        self.last_position = doc["payload"]["log_position"]
        return self.store.put(doc)

    def warm_up(self, stop: threading.Event) -> None:
        """Ready at once: the key was loaded and the store built when this was constructed."""

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()
            stop.wait(self.interval_s)

    def close(self) -> None:
        """Nothing is held between checkpoints."""
