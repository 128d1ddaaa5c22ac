"""Signed heartbeats: only an executor's own pods can publish where its replicas are.

Every companion can write any replica's heartbeat (ACLs work per key, and
heartbeats share one hash: docs/security.md T2), and routers send requests
to the pod IP a heartbeat names. So each executor has an Ed25519 key pair:

* the operator derives the private key from its own secret and the
  executor's identity (:func:`executor_seed`: namespace, name and UID, so
  a recreated executor gets a new key), puts it in a Secret mounted only
  into that executor's pods, and publishes the public key in the executor's
  record (``ExecutorRecord.heartbeat_key``), which only the operator can
  write;
* the companion signs the claim its heartbeat makes (:func:`claim`:
  executor, pod, IP, state, version, and until when the claim holds) and
  signs it again when it changes or within :data:`CLAIM_SECONDS`;
* readers count a heartbeat of an executor with a key only when its
  signature verifies against that key and its claim has not run out
  (:func:`vouched`); others are not live replicas.

A companion holding another executor's store credential can still delete
or hide that executor's heartbeats (traffic moves away), but it cannot make
routers send that executor's requests anywhere else. A replayed old claim of
a pod holds at most :data:`CLAIM_SECONDS` after it was signed. Verification
costs about 0.1 ms and is done once per distinct claim (an LRU).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import math

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .records import ReplicaRecord

# A claim is signed for the current minute and the next one: signed about once a
# minute, and an old one replayed holds at most this long.
CLAIM_SECONDS = 120.0
_CLAIM_STEP = 60.0


def executor_seed(secret: bytes, namespace: str, name: str, uid: str) -> bytes:
    """The 32-byte private key seed of one executor, derived from the operator's secret
    (so the operator keeps no per-executor state, and a lost Secret is made again the
    same)."""
    return hmac.new(secret, f"mulambda-heartbeat\0{namespace}/{name}/{uid}".encode(),
                    hashlib.sha256).digest()


def public_key(seed: bytes) -> str:
    """The public key (base64, as ``ExecutorRecord.heartbeat_key``) of a seed."""
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def claim_until(now: float) -> float:
    """Until when a claim signed at ``now`` holds: the end of the next whole minute (the
    same for a whole minute, so a companion signs about once a minute)."""
    return (math.floor(now / _CLAIM_STEP) + 2) * _CLAIM_STEP


def claim(replica: ReplicaRecord) -> bytes:
    """What a heartbeat's signature covers: who it is, where and in which state it serves,
    and until when (not ``expires_at``: liveness, renewed every interval)."""
    return json.dumps([replica.executor, replica.pod, replica.ip, replica.state,
                       replica.version, replica.claim_until],
                      separators=(",", ":")).encode()


class Signer:
    """A companion's signing key; :meth:`sign` returns its heartbeat signed."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"a heartbeat key is 32 bytes, got {len(seed)}")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._last: tuple[bytes, str] | None = None

    @classmethod
    def from_file(cls, path: str) -> Signer:
        """The key as the operator's Secret holds it (base64 of the seed)."""
        with open(path, "rb") as f:
            text = f.read().strip()
        try:
            return cls(base64.b64decode(text, validate=True))
        except binascii.Error as exc:
            raise ValueError(f"{path}: not base64") from exc

    def sign(self, replica: ReplicaRecord, now: float) -> ReplicaRecord:
        replica.claim_until = claim_until(now)
        message = claim(replica)
        if self._last is None or self._last[0] != message:
            self._last = (message, base64.b64encode(self._key.sign(message)).decode())
        replica.sig = self._last[1]
        return replica


@functools.lru_cache(maxsize=65536)
def _verified(key: str, message: bytes, sig: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(key, validate=True)).verify(
            base64.b64decode(sig, validate=True), message)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def vouched(key: str | None, replica: ReplicaRecord, now: float) -> bool:
    """Whether ``replica`` may count as a pod of the executor whose heartbeat key (its
    record's ``heartbeat_key``) is ``key``: always without a key; else only with a valid
    signature of a claim that holds at ``now``."""
    if not key:
        return True
    if not replica.sig or replica.claim_until < now:
        return False
    return _verified(key, claim(replica), replica.sig)
