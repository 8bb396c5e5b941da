"""Signed, expiring link tokens.

A token carries a link's UUID and its expiry, signed with HMAC-SHA256 (itsdangerous). Forged and
expired tokens are rejected here, in memory, before any database query. Keys come from
LINK_SECRET_KEYS, newest first: the newest signs, every listed key verifies, so keys rotate by
prepending a new one and later dropping the old. Each purpose has its own salt, so a token made
for one purpose (pay) can never be used for another (verify an email address).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

from itsdangerous import BadData, URLSafeSerializer, URLSafeTimedSerializer
from itsdangerous.encoding import base64_decode, base64_encode, int_to_bytes
from itsdangerous.signer import HMACAlgorithm

from plumbing.settings import Settings


class Purpose:
    PAY = "paylink.pay.v1"
    VERIFY_EMAIL = "paylink.verify-email.v1"
    CSRF = "paylink.csrf.v1"


class TokenInvalid(Exception):
    """The token was not made by us (forged, tampered, truncated, wrong purpose or retired key)."""


class TokenExpired(Exception):
    """The token is ours but its time is up; `subject_id` says which link or customer it named."""

    def __init__(self, subject_id: uuid.UUID, expired_at: datetime) -> None:
        super().__init__("token expired")
        self.subject_id = subject_id
        self.expired_at = expired_at


@dataclass(frozen=True)
class TokenClaims:
    subject_id: uuid.UUID
    expires_at: datetime


VERIFIED_MEMO = 4096  # genuine tokens remembered per signer (about 1 MB at most)


class TokenSigner:
    def __init__(self, keys: Sequence[str], purpose: str) -> None:
        if not keys:
            raise ValueError("at least one signing key is required")
        # itsdangerous signs with the *last* key and verifies with all of them.
        self._serializer = URLSafeSerializer(list(reversed(keys)), salt=purpose, signer_kwargs={"digest_method": hashlib.sha256})
        # Genuine tokens seen lately and what they say (the hot path verifies the same few again and
        # again; the signature is a pure function of token and keys). Forged ones are never kept.
        self._verified: dict[str, tuple[uuid.UUID, datetime]] = {}
        # Each key's HMAC, keyed once: `forged` checks a signature without itsdangerous's per-call setup.
        signer = self._serializer.make_signer()
        self._macs = [hmac.new(signer.derive_key(key), digestmod=hashlib.sha256) for key in signer.secret_keys]
        self._sep = signer.sep.decode()

    def sign(self, subject_id: uuid.UUID, expires_at: datetime) -> str:
        return self._serializer.dumps([subject_id.hex, int(expires_at.timestamp())])

    def forged(self, token: str) -> bool:
        """Whether no key of ours signed `token`: what `verify` would raise TokenInvalid for, decided
        in a few microseconds (the hot path answers forged links with it; tests/unit/test_tokens.py
        checks both agree). A genuine token's payload is always well-formed: only we sign. Every token we
        sign is ASCII and ~107 characters: anything else is forged (itsdangerous's base64 decoding skips
        characters outside its alphabet, so a genuine token with one added would otherwise pass)."""
        if token in self._verified:
            return False
        if len(token) > 512 or not token.isascii():
            return True
        value, sep, signature = token.rpartition(self._sep)
        if not sep:
            return True
        try:
            claimed = base64_decode(signature)
            signed = value.encode()
        except (BadData, ValueError):
            return True
        for keyed in self._macs:
            mac = keyed.copy()
            mac.update(signed)
            if hmac.compare_digest(mac.digest(), claimed):
                return False
        return True

    def verify(self, token: str, now: datetime | None = None) -> TokenClaims:
        """Return the claims of a valid token; raise TokenExpired or TokenInvalid otherwise. It accepts
        what itsdangerous's `loads` accepts (with the same keys, salt and digest), except tokens longer
        than 512 characters or not ASCII (ours never are), and payloads that are not a link's claims."""
        if len(token) > 512:
            raise TokenInvalid("token too long")
        known = self._verified.get(token)
        if known is None:
            # The signature checked by `forged` (each key's HMAC keyed once; what itsdangerous's `loads`
            # checks, in a fraction of its time: 10,000 distinct links overflow the memo), the payload
            # read by itsdangerous's own `load_payload`.
            if self.forged(token):
                raise TokenInvalid("bad signature")
            try:
                payload = self._serializer.load_payload(token.rpartition(self._sep)[0].encode())
                subject_hex, expires_ts = payload
                if not isinstance(subject_hex, str) or type(expires_ts) is not int:
                    raise TypeError("not a link's claims")
                subject_id = uuid.UUID(hex=subject_hex)
                expires_at = datetime.fromtimestamp(expires_ts, UTC)
            except (BadData, ValueError, TypeError, OverflowError, OSError) as exc:
                raise TokenInvalid(str(exc)) from None
            if len(self._verified) >= VERIFIED_MEMO:
                self._verified.clear()
            known = self._verified[token] = (subject_id, expires_at)
        subject_id, expires_at = known
        if (now or datetime.now(UTC)) >= expires_at:
            raise TokenExpired(subject_id, expires_at)
        return TokenClaims(subject_id, expires_at)


# --- every signer, in one place: one salt per purpose, keys from LINK_SECRET_KEYS -----------------


@lru_cache(maxsize=8)
def pay_signer(settings: Settings) -> TokenSigner:
    """Tokens of emailed pay links (/pay/<token>)."""
    return TokenSigner([str(k) for k in settings.link_secret_keys], Purpose.PAY)


@lru_cache(maxsize=8)
def verify_signer(settings: Settings) -> TokenSigner:
    """Tokens of emailed address-confirmation links (/verify/<token>)."""
    return TokenSigner([str(k) for k in settings.link_secret_keys], Purpose.VERIFY_EMAIL)


@lru_cache(maxsize=8)
def csrf_serializer(settings: Settings) -> URLSafeTimedSerializer:
    """CSRF tokens of the forms on link pages (timed: a form older than a day is refused)."""
    return URLSafeTimedSerializer([str(k) for k in reversed(settings.link_secret_keys)], salt=Purpose.CSRF)


class QuickTimedDumps:
    """`URLSafeTimedSerializer.dumps` for the small JSON lists the forms carry, in a few microseconds
    instead of ~16: the key is derived and the HMAC keyed once (itsdangerous derives it per token, and
    hashes through a Python-level SHA-1 wrapper), and the payload is not zlib-compressed (`loads`
    takes an uncompressed payload as well: the same serializer verifies these tokens unchanged).
    tests/integration/test_hot_path.py checks that its tokens are exactly what itsdangerous signs."""

    def __init__(self, serializer: URLSafeTimedSerializer) -> None:
        signer = serializer.make_signer()
        algorithm = signer.algorithm
        if not isinstance(algorithm, HMACAlgorithm) or algorithm.digest_method().name != "sha1":
            raise ValueError("QuickTimedDumps signs like itsdangerous's default HMAC-SHA1 signer only")
        self._mac = hmac.new(signer.derive_key(), digestmod=hashlib.sha1)
        self._sep = signer.sep

    def dumps(self, value: list[str]) -> str:
        if all(v.isascii() and v.isalnum() for v in value):  # ids and digests: JSON without an encoder
            text = '["' + '","'.join(value) + '"]'
        else:
            text = json.dumps(value, separators=(",", ":"))
        payload = base64_encode(text.encode())
        signed = payload + self._sep + base64_encode(int_to_bytes(int(time.time())))
        mac = self._mac.copy()
        mac.update(signed)
        return (signed + self._sep + base64_encode(mac.digest())).decode("ascii")


@lru_cache(maxsize=8)
def csrf_dumps(settings: Settings) -> QuickTimedDumps:
    """Signs CSRF tokens that `csrf_serializer(settings).loads` verifies."""
    return QuickTimedDumps(csrf_serializer(settings))
