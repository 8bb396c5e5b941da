"""Link tokens: signed, expiring, rotatable, one purpose each."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from itsdangerous import BadData, URLSafeSerializer

from plumbing.signing import Purpose, TokenExpired, TokenInvalid, TokenSigner

OLD_KEY = "old-key-0123456789abcdef"
NEW_KEY = "new-key-0123456789abcdef"


def in_days(days: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


class TestRoundTrip:
    """A token we signed comes back with the same link id and expiry."""

    def test_round_trip(self) -> None:
        signer = TokenSigner([NEW_KEY], Purpose.PAY)
        link_id = uuid.uuid4()
        expires = in_days(30).replace(microsecond=0)
        claims = signer.verify(signer.sign(link_id, expires))
        assert claims.subject_id == link_id
        assert claims.expires_at == expires

    def test_token_is_url_safe_and_short(self) -> None:
        token = TokenSigner([NEW_KEY], Purpose.PAY).sign(uuid.uuid4(), in_days(30))
        assert len(token) < 140
        assert all(c.isalnum() or c in "-_." for c in token)


class TestTampering:
    """Anything we did not sign is rejected, in memory."""

    def test_tampered_signature(self) -> None:
        signer = TokenSigner([NEW_KEY], Purpose.PAY)
        token = signer.sign(uuid.uuid4(), in_days(30))
        forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        with pytest.raises(TokenInvalid):
            signer.verify(forged)

    def test_tampered_payload(self) -> None:
        signer = TokenSigner([NEW_KEY], Purpose.PAY)
        token = signer.sign(uuid.uuid4(), in_days(30))
        other = signer.sign(uuid.uuid4(), in_days(30))
        spliced = other.split(".")[0] + "." + token.split(".")[1]
        with pytest.raises(TokenInvalid):
            signer.verify(spliced)

    @pytest.mark.parametrize("garbage", ["", "abc", "a.b", "x" * 600, "WyJ4Il0.sig", "../../etc/passwd"])
    def test_garbage(self, garbage: str) -> None:
        with pytest.raises(TokenInvalid):
            TokenSigner([NEW_KEY], Purpose.PAY).verify(garbage)

    def test_other_key(self) -> None:
        token = TokenSigner(["attacker-key-0123456789"], Purpose.PAY).sign(uuid.uuid4(), in_days(30))
        with pytest.raises(TokenInvalid):
            TokenSigner([NEW_KEY], Purpose.PAY).verify(token)

    def test_one_purpose_cannot_serve_another(self) -> None:
        link_id = uuid.uuid4()
        pay_token = TokenSigner([NEW_KEY], Purpose.PAY).sign(link_id, in_days(30))
        with pytest.raises(TokenInvalid):
            TokenSigner([NEW_KEY], Purpose.VERIFY_EMAIL).verify(pay_token)


class TestExpiry:
    """An expired token is recognised as ours, so the page can offer a fresh link."""

    def test_expired_token_names_its_link(self) -> None:
        signer = TokenSigner([NEW_KEY], Purpose.PAY)
        link_id = uuid.uuid4()
        token = signer.sign(link_id, in_days(-1))
        with pytest.raises(TokenExpired) as caught:
            signer.verify(token)
        assert caught.value.subject_id == link_id

    def test_valid_until_the_second_it_expires(self) -> None:
        signer = TokenSigner([NEW_KEY], Purpose.PAY)
        expires = in_days(1).replace(microsecond=0)
        token = signer.sign(uuid.uuid4(), expires)
        signer.verify(token, now=expires - timedelta(seconds=1))
        with pytest.raises(TokenExpired):
            signer.verify(token, now=expires)

    def test_expired_and_forged_is_invalid_not_expired(self) -> None:
        token = TokenSigner(["attacker-key-0123456789"], Purpose.PAY).sign(uuid.uuid4(), in_days(-1))
        with pytest.raises(TokenInvalid):
            TokenSigner([NEW_KEY], Purpose.PAY).verify(token)


class TestKeyRotation:
    """New keys sign; old keys still verify while listed; removed keys stop working."""

    def test_old_key_still_verifies(self) -> None:
        link_id = uuid.uuid4()
        old_token = TokenSigner([OLD_KEY], Purpose.PAY).sign(link_id, in_days(30))
        assert TokenSigner([NEW_KEY, OLD_KEY], Purpose.PAY).verify(old_token).subject_id == link_id

    def test_newest_key_signs(self) -> None:
        token = TokenSigner([NEW_KEY, OLD_KEY], Purpose.PAY).sign(uuid.uuid4(), in_days(30))
        TokenSigner([NEW_KEY], Purpose.PAY).verify(token)
        with pytest.raises(TokenInvalid):
            TokenSigner([OLD_KEY], Purpose.PAY).verify(token)

    def test_removed_key_fails(self) -> None:
        old_token = TokenSigner([OLD_KEY], Purpose.PAY).sign(uuid.uuid4(), in_days(30))
        with pytest.raises(TokenInvalid):
            TokenSigner([NEW_KEY], Purpose.PAY).verify(old_token)


class TestForgedAgreesWithVerify:
    """`forged` (the hot path's quick check) says "forged" exactly when `verify` raises TokenInvalid."""

    @staticmethod
    def agree(signer: TokenSigner, token: str) -> None:
        try:
            signer.verify(token)
            invalid = False
        except TokenExpired:
            invalid = False
        except TokenInvalid:
            invalid = True
        assert signer.forged(token) is invalid, token

    def test_known_shapes(self) -> None:
        rotated = TokenSigner([NEW_KEY, OLD_KEY], Purpose.PAY)
        genuine = rotated.sign(uuid.uuid4(), in_days(30))
        by_old_key = TokenSigner([OLD_KEY], Purpose.PAY).sign(uuid.uuid4(), in_days(30))
        expired = rotated.sign(uuid.uuid4(), in_days(-1))
        other_purpose = TokenSigner([NEW_KEY], Purpose.VERIFY_EMAIL).sign(uuid.uuid4(), in_days(30))
        head, _, signature = genuine.rpartition(".")
        for token in (
            genuine, by_old_key, expired, other_purpose, "", ".", "a.b", "no-dot", head, head + ".", "." + signature,
            head + "." + signature[:-1], head + "." + signature + "A", head[1:] + "." + signature, genuine + "." + signature,
            head + "." + signature.replace(signature[0], "A" if signature[0] != "A" else "B"), "é." + signature, "x" * 600,
        ):  # fmt: skip
            self.agree(rotated, token)
        assert not rotated.forged(genuine) and not rotated.forged(by_old_key) and not rotated.forged(expired)
        assert rotated.forged(other_purpose)

    @given(st.text(max_size=200))
    def test_any_text(self, token: str) -> None:
        self.agree(TokenSigner([NEW_KEY, OLD_KEY], Purpose.PAY), token)

    @given(st.integers(min_value=0, max_value=200), st.characters(codec="ascii"))
    def test_any_one_character_changed(self, at: int, character: str) -> None:
        signer = TokenSigner([NEW_KEY], Purpose.PAY)
        genuine = signer.sign(uuid.UUID(int=at), in_days(30))
        position = at % len(genuine)
        self.agree(signer, genuine[:position] + character + genuine[position + 1 :])


def reference_serializer(keys: list[str]) -> URLSafeSerializer:
    """itsdangerous as TokenSigner configures it (newest key first in `keys`; itsdangerous signs with the last)."""
    return URLSafeSerializer(list(reversed(keys)), salt=Purpose.PAY, signer_kwargs={"digest_method": hashlib.sha256})


class TestVerifyAgreesWithItsdangerous:
    """`verify` checks signatures itself (each key's HMAC keyed once) and reads the payload with
    itsdangerous's `load_payload`: for ASCII tokens of up to 512 characters (every token we sign) it
    accepts exactly what itsdangerous's own `loads` accepts, with the same claims."""

    @staticmethod
    def agree(keys: list[str], token: str) -> None:
        reference = reference_serializer(keys)
        try:
            subject_hex, expires_ts = reference.loads(token)
            expected: tuple[uuid.UUID, datetime] | None = (uuid.UUID(hex=subject_hex), datetime.fromtimestamp(expires_ts, UTC))
        except (BadData, ValueError, TypeError, AttributeError, OverflowError, OSError):  # not a link's claims
            expected = None
        try:
            claims = TokenSigner(keys, Purpose.PAY).verify(token)
            got: tuple[uuid.UUID, datetime] | None = (claims.subject_id, claims.expires_at)
        except TokenExpired as exc:
            got = (exc.subject_id, exc.expired_at)
        except TokenInvalid:
            got = None
        assert got == expected, token

    def test_known_shapes(self) -> None:
        keys = [NEW_KEY, OLD_KEY]
        genuine = TokenSigner(keys, Purpose.PAY).sign(uuid.uuid4(), in_days(30))
        head, _, signature = genuine.rpartition(".")
        by_old_key = TokenSigner([OLD_KEY], Purpose.PAY).sign(uuid.uuid4(), in_days(30))
        expired = TokenSigner(keys, Purpose.PAY).sign(uuid.uuid4(), in_days(-1))
        other_purpose = TokenSigner([NEW_KEY], Purpose.VERIFY_EMAIL).sign(uuid.uuid4(), in_days(30))
        # Signed with our key but not a link's claims: itsdangerous reads them, `verify` must refuse them.
        reference = reference_serializer(keys)
        odd = [
            reference.dumps(value)
            for value in (["zz", 1], ["0" * 32], "text", [uuid.uuid4().hex, "x"], ["a" * 100, 1], [5, 1], [uuid.uuid4().hex, 1e300])
        ]
        for token in (genuine, by_old_key, expired, other_purpose, head, head + "." + signature[:-1], "x" * 600, *odd):
            self.agree(keys, token)

    @given(st.integers(min_value=0, max_value=200), st.characters(codec="ascii"))
    def test_any_one_character_changed(self, at: int, character: str) -> None:
        genuine = TokenSigner([NEW_KEY], Purpose.PAY).sign(uuid.UUID(int=at), in_days(30))
        position = at % len(genuine)
        self.agree([NEW_KEY], genuine[:position] + character + genuine[position + 1 :])

    def test_what_itsdangerous_would_take_and_we_do_not(self) -> None:
        """Beyond the agreement: a genuine token with a character added that itsdangerous's base64 skips
        (non-ASCII) or a payload over 512 characters is refused; odd claims signed with our key are
        TokenInvalid, never another exception (a 500)."""
        signer = TokenSigner([NEW_KEY], Purpose.PAY)
        genuine = signer.sign(uuid.uuid4(), in_days(30))
        for token in (genuine + "é", genuine + "\udc80", genuine[:-4] + "é" + genuine[-4:]):
            with pytest.raises(TokenInvalid):
                signer.verify(token)
            assert signer.forged(token)
        reference = reference_serializer([NEW_KEY])
        for value in ([5, 1], [uuid.uuid4().hex, 1e300], [uuid.uuid4().hex, float("inf")], [uuid.uuid4().hex, 10**30], ["a" * 600, 1]):
            with pytest.raises(TokenInvalid):
                signer.verify(reference.dumps(value))
