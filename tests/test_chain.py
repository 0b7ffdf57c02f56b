"""The hash chain's primitives."""

from __future__ import annotations

import hmac

from hypothesis import given
from hypothesis import strategies as st

from tether._chain import Mac, sign_head


@given(key=st.binary(max_size=200), message=st.binary(max_size=2000))
def test_mac_equals_the_standard_library_hmac(key: bytes, message: bytes) -> None:
    """`Mac` gives the same bytes as `hmac.digest(key, message, "sha256")` for any key."""
    assert Mac(key).digest(message) == hmac.digest(key, message, "sha256")


def test_head_signature_binds_run_seq_and_hash() -> None:
    """A head's signature changes with the run id, the sequence number or the hash."""
    key = b"k" * 32
    base = sign_head(key, "run_a", 5, b"h" * 32)

    assert Mac(key).head("run_a", 5, b"h" * 32) == base
    assert sign_head(key, "run_b", 5, b"h" * 32) != base
    assert sign_head(key, "run_a", 6, b"h" * 32) != base
    assert sign_head(key, "run_a", 5, b"i" * 32) != base
