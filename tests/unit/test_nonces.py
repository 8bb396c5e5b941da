"""CSP nonces and browser ids (plumbing/web.py): from the kernel's CSPRNG in batches, each byte used once."""

from __future__ import annotations

import os
import re

from plumbing.web import SecurityPolicy, _Randomness, new_browser_id


def test_every_nonce_differs_and_has_144_random_bits() -> None:
    nonces = [SecurityPolicy.new_nonce() for _ in range(2 * _Randomness.BATCH // 18 + 7)]  # over several batches
    assert len(set(nonces)) == len(nonces)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", nonce) for nonce in nonces)  # 18 bytes, base64url, no padding
    # Every character position varies (a constant or a counter would not): the bytes are random.
    assert all(len({nonce[i] for nonce in nonces}) > 30 for i in range(24))


def test_browser_ids_keep_their_format() -> None:
    ids = [new_browser_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(re.fullmatch(r"[A-Za-z0-9_-]{43}", i) for i in ids)  # as secrets.token_urlsafe(32)


def test_a_forked_child_never_hands_out_its_parents_bytes() -> None:
    SecurityPolicy.new_nonce()  # the parent holds a batch
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.write(writer, " ".join(SecurityPolicy.new_nonce() for _ in range(300)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader) as pipe:
        theirs = set(pipe.read().split())
    ours = {SecurityPolicy.new_nonce() for _ in range(300)}
    assert len(theirs) == 300 and not theirs & ours
