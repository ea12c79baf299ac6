"""What a relay tells a secondary newer than itself, from what the primary it follows says."""

from __future__ import annotations

import pytest
from ZODB.utils import p64

from replicator.integrity import TxnIdentity
from replicator.primary import UpstreamAnswer, relay_verdict

OURS = p64(100)  # the relay's newest transaction
LAST = p64(200)  # the secondary's
THEIRS = TxnIdentity(LAST, " ", b"d" * 32, b"m" * 32)


def verdict(answer: UpstreamAnswer | None):
    return relay_verdict("s1", "the primary p:1", OURS, THEIRS, answer)


@pytest.mark.parametrize("answer, code, words", [
    (None, "behind", "which it could not ask"),
    (UpstreamAnswer(THEIRS, p64(300), True, "p"), "behind", "has that transaction: this node is catching up"),
    # The same transaction, packed there: still the same one.
    (UpstreamAnswer(TxnIdentity(LAST, "p", b"x" * 32, b"m" * 32), p64(300), True, "p"), "behind",
     "has that transaction"),
    (UpstreamAnswer(TxnIdentity(LAST, " ", b"x" * 32, b"n" * 32), p64(300), True, "p"), "diverged",
     "differs from the transaction with the same TID"),
    # Not there though its history goes further: a fork, or a pack dropped it; told once caught up.
    (UpstreamAnswer(None, p64(300), True, "p"), "behind", "a pack may have dropped it"),
    (UpstreamAnswer(None, p64(150), False, "r"), "behind", "is a relay itself and older still"),
    (UpstreamAnswer(None, p64(150), True, "p"), "ahead", "the source of this chain"),
])
def test_relay_verdicts(answer, code, words):
    reject = verdict(answer)
    assert reject.code == code
    assert words in reject.message, reject.message
