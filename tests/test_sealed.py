from __future__ import annotations

import pytest

from bridge.crypto.sealed import UnsealError, seal, unseal


def test_round_trip_and_no_plaintext() -> None:
    sealed = seal("pickle", "recovery_key", "EsTc abcd efgh")
    assert "abcd" not in sealed
    assert unseal("pickle", "recovery_key", sealed) == "EsTc abcd efgh"
    assert seal("pickle", "recovery_key", "x") != seal("pickle", "recovery_key", "x")  # nonce


@pytest.mark.parametrize(
    ("key", "purpose", "mangle"),
    [
        ("other", "recovery_key", lambda s: s),
        ("pickle", "other_purpose", lambda s: s),
        ("pickle", "recovery_key", lambda s: s[:-4] + ("AAAA" if s[-4:] != "AAAA" else "BBBB")),
        ("pickle", "recovery_key", lambda s: "v9" + s[2:]),
    ],
)
def test_wrong_key_purpose_or_tampering_is_refused(key: str, purpose: str, mangle) -> None:
    sealed = mangle(seal("pickle", "recovery_key", "secret"))
    with pytest.raises(UnsealError):
        unseal(key, purpose, sealed)


def test_bytes_round_trip_and_legacy_rows() -> None:
    from bridge.crypto.sealed import is_sealed_bytes, seal_bytes, unseal_bytes

    data = b"From: a@b\r\n\r\nsecret body \x00\xff" * 100
    sealed = seal_bytes("k", "inbound-raw", data)
    assert is_sealed_bytes(sealed) and b"secret body" not in sealed
    assert unseal_bytes("k", "inbound-raw", sealed) == data
    # A row written before sealing is plain mail text and reads back unchanged.
    assert unseal_bytes("k", "inbound-raw", b"From: a@b\r\n\r\nold") == b"From: a@b\r\n\r\nold"
    import pytest

    from bridge.crypto.sealed import UnsealError

    with pytest.raises(UnsealError):
        unseal_bytes("other", "inbound-raw", sealed)
    with pytest.raises(UnsealError):
        unseal_bytes("k", "outbox-raw", sealed)
