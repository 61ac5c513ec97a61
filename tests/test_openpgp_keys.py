"""bridge.email.openpgp.keys: key shape, serialisation, encrypt/decrypt, signatures, limits,
and that no secret reaches a repr. The engine (`openpgp`) is used here only to inspect."""

from __future__ import annotations

import dataclasses

import pytest
from openpgp.composed import (
    EncryptionCaps,
    KeyType,
    Message,
    SecretKeyParamsBuilder,
    SubkeyParamsBuilder,
)
from openpgp.packet import Packet

from bridge.email.openpgp import autocrypt, keys, pgpmime, vcard
from bridge.email.openpgp.keys import (
    DecryptionError,
    KeyFormatError,
    PublicKey,
    SecretKey,
    SignatureStatus,
    TooLargeError,
    decrypt,
    encrypt,
    sign_detached,
    verify_detached,
)


@pytest.fixture(scope="module")
def alice() -> SecretKey:
    return SecretKey.generate("alice@example.org")


@pytest.fixture(scope="module")
def bob() -> SecretKey:
    return SecretKey.generate("bob@example.net")


def test_key_is_autocrypt_shaped(alice: SecretKey) -> None:
    public = alice.public_key.native
    assert public.version == 4
    assert public.public_key_algorithm == "eddsa-legacy"
    assert alice.user_ids == ["alice@example.org"]
    [user] = public.details.users
    [certification] = user.signatures
    flags = certification.key_flags()
    assert (flags.certify, flags.sign, flags.encrypt_communications) == (True, True, False)
    assert certification.features().seipd_v1 and not certification.features().seipd_v2
    assert certification.preferred_symmetric_algs() == ["aes256", "aes128"]
    [subkey] = public.public_subkeys
    assert subkey.key.public_key_algorithm == "ecdh"
    assert subkey.key.public_params.curve == "curve25519"
    [binding] = subkey.signatures
    assert binding.key_flags().encrypt_communications and not binding.key_flags().sign
    assert not binding.key_flags().encrypt_storage  # flags 04 exactly
    assert alice.public_key.encryption_subkey_fingerprint == subkey.key.fingerprint.upper()
    assert len(alice.fingerprint) == 40 and alice.fingerprint == alice.fingerprint.upper()


def test_created_at_is_kept() -> None:
    key = SecretKey.generate("a@example.org", created_at=1_700_000_000)
    assert key.created_at == key.public_key.created_at == 1_700_000_000


@pytest.mark.parametrize("armored", [False, True])
def test_secret_and_public_keys_round_trip(alice: SecretKey, armored: bool) -> None:
    if armored:
        secret = SecretKey.from_armored(alice.to_armored())
        public = PublicKey.from_armored(alice.public_key.to_armored())
        assert alice.to_armored().startswith("-----BEGIN PGP PRIVATE KEY BLOCK-----")
    else:
        secret = SecretKey.from_bytes(alice.to_bytes())
        public = PublicKey.from_bytes(alice.public_key.to_bytes())
    assert secret.fingerprint == public.fingerprint == alice.fingerprint
    assert secret.to_bytes() == alice.to_bytes()
    assert public == alice.public_key
    armored_text = encrypt(b"x", signer=alice, recipients=[public])
    assert decrypt(armored_text, secret, verify_with=[public]).plaintext == b"x"


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x99\x00\x01", b"\x00" * 100])
def test_garbage_keys_are_key_format_errors(data: bytes) -> None:
    with pytest.raises(KeyFormatError):
        PublicKey.from_bytes(data)
    with pytest.raises(KeyFormatError):
        SecretKey.from_bytes(data)


def test_public_key_is_not_a_secret_key(alice: SecretKey) -> None:
    with pytest.raises(KeyFormatError):
        SecretKey.from_bytes(alice.public_key.to_bytes())


def test_oversized_key_is_refused() -> None:
    with pytest.raises(KeyFormatError, match="above"):
        PublicKey.from_bytes(b"\x00" * (keys.MAX_KEY_BYTES + 1))


def test_forged_subkey_binding_is_refused(alice: SecretKey, bob: SecretKey) -> None:
    """Alice's primary and user ID with Bob's subkey and binding: mail 'to Alice' would be
    readable by Bob. verify_bindings refuses it."""
    mine = Packet.from_bytes_many(alice.public_key.to_bytes())
    theirs = Packet.from_bytes_many(bob.public_key.to_bytes())
    forged = b"".join(bytes(p.to_bytes()) for p in mine[:3] + theirs[3:])
    with pytest.raises(KeyFormatError):
        PublicKey.from_bytes(forged)


def test_sign_with_primary_and_encrypt_to_subkeys(alice: SecretKey, bob: SecretKey) -> None:
    armored = encrypt(b"hello", signer=alice, recipients=[bob.public_key, alice.public_key])
    message, _ = Message.from_armor(armored)
    recipients = {
        p.recipient_key_id.upper() for p in message.public_key_encrypted_session_key_packets()
    }
    subkeys = {
        bob.public_key.encryption_subkey_fingerprint[-16:],
        alice.public_key.encryption_subkey_fingerprint[-16:],
    }
    assert recipients == subkeys
    assert message.encrypted_data_packet().kind == "seipd-v1"
    for reader in (alice, bob):
        got = decrypt(armored, reader, verify_with=[alice.public_key])
        assert got.plaintext == b"hello"
        assert got.verification.status is SignatureStatus.GOOD
        assert got.verification.signed_by_primary


def v2_key(address: str) -> PublicKey:
    """A key that advertises SEIPDv2, as Delta Chat's do (features 09)."""
    sub = (
        SubkeyParamsBuilder()
        .version(4)
        .key_type(KeyType.ecdh("curve25519"))
        .can_encrypt(EncryptionCaps.communication())
        .build()
    )
    native = (
        SecretKeyParamsBuilder()
        .version(4)
        .key_type(KeyType.ed25519_legacy())
        .can_sign(True)
        .can_certify(True)
        .feature_seipd_v1(True)
        .feature_seipd_v2(True)
        .primary_user_id(address)
        .subkey(sub)
        .generate()
    )
    return PublicKey(native.to_public_key())


@pytest.mark.parametrize(
    ("peers", "expected"),
    [
        (["v1"], "seipd-v1"),
        (["v2"], "seipd-v2"),
        (["v2", "v2"], "seipd-v2"),
        (["v2", "v1"], "seipd-v1"),  # one reader without v2: everyone gets v1
    ],
)
def test_seipd_v2_only_when_every_peer_advertises_it(alice, bob, peers, expected) -> None:
    chosen = [
        v2_key(f"p{i}@example.net") if p == "v2" else bob.public_key for i, p in enumerate(peers)
    ]
    assert [k.supports_seipd_v2 for k in chosen] == [p == "v2" for p in peers]
    armored = encrypt(b"x", signer=alice, recipients=[*chosen, alice.public_key])
    assert Message.from_armor(armored)[0].encrypted_data_packet().kind == expected
    assert decrypt(armored, alice, verify_with=[alice.public_key]).plaintext == b"x"


def test_compressed_by_default_and_plain_on_request(alice: SecretKey) -> None:
    compressed = encrypt(b"a" * 10000, signer=alice, recipients=[alice.public_key])
    plain = encrypt(b"a" * 10000, signer=alice, recipients=[alice.public_key], compress=False)
    assert len(compressed) < len(plain) / 5
    for armored in (compressed, plain):
        got = decrypt(armored, alice, verify_with=[alice.public_key])
        assert got.plaintext == b"a" * 10000 and got.verification.status is SignatureStatus.GOOD


def test_hidden_recipients_still_decrypt(alice: SecretKey, bob: SecretKey) -> None:
    armored = encrypt(b"x", signer=alice, recipients=[bob.public_key], hide_recipients=True)
    [pkesk] = Message.from_armor(armored)[0].public_key_encrypted_session_key_packets()
    assert pkesk.recipient_is_anonymous
    assert decrypt(armored, bob, verify_with=[alice.public_key]).plaintext == b"x"


def test_signature_statuses(alice: SecretKey, bob: SecretKey) -> None:
    armored = encrypt(b"x", signer=alice, recipients=[bob.public_key])
    status = lambda keys_: decrypt(armored, bob, verify_with=keys_).verification  # noqa: E731
    assert status([alice.public_key]).status is SignatureStatus.GOOD
    assert status([bob.public_key, alice.public_key]).key_fingerprint == alice.fingerprint
    unknown = status([bob.public_key])
    assert unknown.status is SignatureStatus.UNKNOWN_SIGNER
    assert unknown.signer_fingerprint == alice.fingerprint  # who it claims to be
    assert status([]).status is SignatureStatus.UNKNOWN_SIGNER


def test_unsigned_message_is_unsigned(alice: SecretKey, bob: SecretKey) -> None:
    from openpgp.composed import MessageBuilder

    builder = MessageBuilder.from_bytes("", b"no signature").seipd_v1("aes256")
    subkey = keys._encryption_subkey(bob.public_key.native)
    armored = builder.encrypt_to_key(subkey).to_armored_string()
    got = decrypt(armored, bob, verify_with=[alice.public_key])
    assert got.plaintext == b"no signature"
    assert got.verification.status is SignatureStatus.UNSIGNED


def test_tampered_ciphertext_never_returns_plaintext(alice: SecretKey, bob: SecretKey) -> None:
    armored = encrypt(b"secret " * 100, signer=alice, recipients=[bob.public_key])
    binary = bytearray(Message.from_armor(armored)[0].to_bytes())
    for where in (len(binary) // 2, len(binary) - 3):
        tampered = bytearray(binary)
        tampered[where] ^= 0x01
        with pytest.raises(DecryptionError):
            decrypt(bytes(tampered), bob, verify_with=[alice.public_key])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        "-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----\n",
        "-----BEGIN PGP MESSAGE-----\n\n" + "QUJD" * 30 + "\n-----END PGP MESSAGE-----\n",
        b"\xff" * 64,
        "-----BEGIN PGP MESSAGE-----\n\n\u00e9\n-----END PGP MESSAGE-----\n".encode(),
    ],
)
def test_garbage_is_a_decryption_error(bob: SecretKey, data) -> None:
    with pytest.raises(DecryptionError):
        decrypt(data, bob)


def test_signed_but_not_encrypted_is_a_decryption_error(alice: SecretKey) -> None:
    from openpgp.util import sign_message

    with pytest.raises(DecryptionError, match="not an encrypted message"):
        decrypt(sign_message(b"x", alice.native), alice)


def test_message_for_another_key_is_a_decryption_error(alice, bob) -> None:
    armored = encrypt(b"x", signer=alice, recipients=[alice.public_key])
    with pytest.raises(DecryptionError):
        decrypt(armored, bob)


def test_limit_is_checked_before_any_work(bob: SecretKey) -> None:
    with pytest.raises(TooLargeError):
        decrypt(b"x" * 101, bob, max_bytes=100)


def test_verify_with_may_depend_on_the_plaintext(alice: SecretKey, bob: SecretKey) -> None:
    armored = encrypt(b"key inside", signer=alice, recipients=[bob.public_key])
    seen: list[bytes] = []

    def keys_for(plaintext: bytes) -> list[PublicKey]:
        seen.append(plaintext)
        return [alice.public_key]

    got = decrypt(armored, bob, verify_with=keys_for)
    assert seen == [b"key inside"] and got.verification.status is SignatureStatus.GOOD


def test_detached_signatures(alice: SecretKey, bob: SecretKey) -> None:
    data = b"Content-Type: text/plain\r\n\r\nsigned\r\n"
    signature = sign_detached(data, alice)
    assert signature.startswith("-----BEGIN PGP SIGNATURE-----")
    check = lambda d, s, k: verify_detached(d, s, k).status  # noqa: E731
    assert check(data, signature, [alice.public_key]) is SignatureStatus.GOOD
    assert check(data + b"x", signature, [alice.public_key]) is SignatureStatus.BAD
    assert check(data, signature, [bob.public_key]) is SignatureStatus.UNKNOWN_SIGNER
    assert check(data, "garbage", [alice.public_key]) is SignatureStatus.BAD
    assert check(data, signature.encode(), [alice.public_key]) is SignatureStatus.GOOD
    assert verify_detached(data, signature, [alice.public_key]).signed_by_primary


def test_one_megabyte_round_trips(alice: SecretKey, bob: SecretKey) -> None:
    # Speed is the bench's business (Makefile: never timed in tests); this is correctness.
    data = bytes(range(256)) * 4096
    armored = encrypt(data, signer=alice, recipients=[bob.public_key, alice.public_key])
    got = decrypt(armored, bob, verify_with=[alice.public_key])
    assert got.plaintext == data and got.verification.status is SignatureStatus.GOOD


# --- no secret in any repr -------------------------------------------------------------------


def test_no_private_key_material_in_any_repr(alice: SecretKey, bob: SecretKey) -> None:
    stored = autocrypt.MailboxKey.generate("carol@example.com")
    secret_bytes = stored.secret_key
    armored = encrypt(b"plaintext-marker", signer=alice, recipients=[bob.public_key])
    decrypted = decrypt(armored, bob, verify_with=[alice.public_key])
    mail = pgpmime.encrypt_mail(
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: s\r\n\r\nplaintext-marker\r\n",
        sender=alice,
        recipients={"bob@example.net": bob.public_key},
    )
    opened = pgpmime.open_mail(mail, bob, peer_keys=[alice.public_key])
    header = autocrypt.parse_header(
        "".join(autocrypt.build_header("a@b.example", alice.public_key).lines)
    )
    peer = autocrypt.PeerState("a@b.example", 1, 1, alice.public_key.to_bytes(), "mutual", 1, b"k")
    contact = vcard.parse_vcard(vcard.make_vcard("a@b.example", alice.public_key))[0]
    objects = [
        alice,
        alice.public_key,
        stored,
        decrypted,
        decrypted.verification,
        opened,
        header,
        peer,
        autocrypt.Advice(autocrypt.Recommendation.ENCRYPT, {"a": b"k"}),
        contact,
    ]
    secrets_ = [secret_bytes, alice.to_bytes(), bob.to_bytes()]
    for obj in objects:
        text = repr(obj)
        assert "plaintext-marker" not in text, text
        for secret in secrets_:
            assert secret.hex() not in text.lower() and repr(secret) not in text
            assert secret[-32:].hex() not in text.lower()
        assert "PRIVATE KEY" not in text
    # Every dataclass field holding key bytes or plaintext is out of the repr.
    for cls in (autocrypt.MailboxKey, keys.Decrypted, pgpmime.OpenedMail, autocrypt.PeerState):
        for f in dataclasses.fields(cls):
            if f.name in {"secret_key", "plaintext", "content", "public_key", "gossip_key"}:
                assert f.repr is False, (cls, f.name)
