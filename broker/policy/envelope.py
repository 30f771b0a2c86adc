"""The signed policy file: a DSSE envelope around the policy as RFC 8785 canonical JSON.

The trust root uses the same envelope with its own payload type (broker/policy/trustroot.py).

Signatures are Ed25519 over DSSE's pre-authentication encoding (PAE) of the payload type and
the exact payload bytes. Nothing in the payload is parsed here: this module moves bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.errors import ConfigError
from broker.policy.collection import collection_paused
from broker.policy.schema import Policy
from broker.trust.keys import key_id

PAYLOAD_TYPE = "application/vnd.dmzbroker.policy+json; v=1"
MAX_ENVELOPE_BYTES = 128 * 1024 * 1024  # 100,000 signals and their model: 70 MB
_SAFE_INTEGER = 2**53 - 1  # RFC 8785: integers JSON's doubles hold exactly


class Signature(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    keyid: str
    sig: str  # base64


# dict=True: room for the decoded payload, kept once decoded (50 MB of base64 at 100,000
# signals took 0.3 s each time it was decoded, three times a load).
class Envelope(msgspec.Struct, forbid_unknown_fields=True, frozen=True, dict=True):
    payloadType: str
    payload: str  # base64 of the canonical JSON
    signatures: list[Signature]

    @functools.cached_property
    def untrusted_payload(self) -> bytes:
        """The payload bytes, not yet verified: never parse them before verification."""
        return base64.b64decode(self.payload, validate=True)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def compile_policy(policy: Policy) -> Envelope:
    """An unsigned envelope holding the policy as canonical JSON."""
    with collection_paused():
        canonical = canonical_policy(policy)
    return Envelope(PAYLOAD_TYPE, base64.b64encode(canonical).decode(), [])


def canonical_policy(policy: Policy) -> bytes:
    """`canonical_json` of the policy's plain data, the same bytes in half the time (a policy
    of 100,000 signals is 3 million values, which `_prepared` visits one by one in Python).

    msgspec writes the policy with every object's keys sorted, in C; reading that back hands
    only the floats to Python, each formatted by `_number` as `canonical_json` formats it (a
    float is written in the shortest digits that read back as the same float, so `_number`
    sees the policy's own values); written again, the rest comes out as `canonical_json`
    writes it. This leaves out only canonical_json's refusals of what JSON cannot hold, which
    the policy's schema refuses first: every number a policy holds is finite, and every
    integer within 2**53 (tests/policy/test_canonical.py walks the schema to keep it so).
    A policy with text of U+E000-U+FFFF, where UTF-16 order may sort keys apart, is written
    by `canonical_json`."""
    encoded = msgspec.json.encode(policy, order="sorted")
    if b"\xee" in encoded or b"\xef" in encoded:
        return canonical_json(msgspec.to_builtins(policy))
    return msgspec.json.encode(_FLOATS_PREPARED.decode(encoded))


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON of plain data: the bytes `rfc8785.dumps` gives, 4x as fast
    (a policy of 100,000 signals is 50 MB). msgspec writes the JSON, escaping strings as
    RFC 8785 does; only what msgspec would write otherwise is prepared here: each number in
    ECMAScript's form, by rfc8785 itself, which also refuses what JSON cannot hold (NaN,
    integers beyond 2**53), and object keys in UTF-16 order. That order differs from code
    point order only for text holding U+E000-U+FFFF (UTF-8 EE or EF..): then sort again."""
    encoded = msgspec.json.encode(_prepared(value, None))
    if b"\xee" in encoded or b"\xef" in encoded:
        encoded = msgspec.json.encode(_prepared(value, _utf16))
    return encoded


def _prepared(value: Any, order: Callable[[str], Any] | None) -> Any:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is dict:
        return {k: _prepared(value[k], order) for k in sorted(value, key=order)}
    if kind is list or kind is tuple:
        return [_prepared(item, order) for item in value]
    return _number(value)


def _number(value: Any) -> Any:
    """What msgspec writes as RFC 8785 does as it is; the rest formatted by rfc8785."""
    if type(value) is int and -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
        return value
    if type(value) is float:  # most of a policy's: scale 1.0, offset 0.0
        if value.is_integer():
            if -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
                return int(value)  # ECMAScript writes 2.0 as 2, and -0.0 as 0
        elif 1e-4 <= abs(value) < 1e16:
            return value  # shortest digits, no exponent: written alike by both
    return msgspec.Raw(rfc8785.dumps(value))  # or refused by rfc8785 (NaN, 2**60)


@functools.lru_cache(maxsize=4096)
def _float_written(text: str) -> Any:
    """`_number` of a float as msgspec wrote it; a policy repeats a few (scale 1.0, offset 0.0)
    hundreds of thousands of times."""
    return _number(float(text))


_FLOATS_PREPARED = msgspec.json.Decoder(float_hook=_float_written)


def _utf16(key: str) -> bytes:
    return key.encode("utf-16be")


def sign(envelope: Envelope, key: Ed25519PrivateKey) -> Envelope:
    """The envelope with one more signature (replacing an earlier one by the same key)."""
    signature = key.sign(pae(envelope.payloadType, envelope.untrusted_payload))
    keyid = key_id(key.public_key())
    others = [s for s in envelope.signatures if s.keyid != keyid]
    added = Signature(keyid, base64.b64encode(signature).decode())
    return msgspec.structs.replace(envelope, signatures=[*others, added])


def read(path: Path) -> Envelope:
    return decode(read_bytes(path), str(path))


def read_bytes(path: Path) -> bytes:
    """An envelope file's bytes, refused when missing, unreadable or over the size limit."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ConfigError(f"{path}: {len(data)} bytes, over the {MAX_ENVELOPE_BYTES} limit")
    return data


def decode(
    data: bytes,
    source: str,
    what: str = "a policy envelope",
    remedy: str = "compile one with `dmzbroker policy compile`",
) -> Envelope:
    """The envelope in `data` (signatures not checked); `what` and `remedy` word the refusal."""
    try:
        envelope = msgspec.json.decode(data, type=Envelope)
        envelope.untrusted_payload  # noqa: B018 - refuse bad base64 here, with the file's name
        for signature in envelope.signatures:
            base64.b64decode(signature.sig, validate=True)
    except (msgspec.DecodeError, binascii.Error) as e:
        raise ConfigError(f"{source}: not {what} ({e}); {remedy}") from e
    return envelope


def encode(envelope: Envelope) -> bytes:
    """The file form of an envelope: indented JSON, so that a reviewer can read it."""
    return msgspec.json.format(msgspec.json.encode(envelope)) + b"\n"


def write(envelope: Envelope, path: Path) -> None:
    try:
        path.write_bytes(encode(envelope))
    except OSError as e:  # a folder, a read-only file or place: the user's to fix
        raise ConfigError(f"{path}: cannot write: {e.strerror}") from e
