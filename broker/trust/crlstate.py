"""The CRLs the consumer endpoint has accepted, kept in the enterprise half's state dir.

`crl-accepted.json` holds, per CRL issuer, the last accepted list's CRL number and SHA-256
(`[{"issuer": ..., "crl_number": ..., "sha256": ...}]`), so that an older CRL put back while
the half is stopped is refused at its next start as it is at a reload (tls.EndpointReloader
compares; CRL numbers mean something only between lists of one issuer).

This module never lowers a record: a file it cannot read is an error, never "nothing
accepted yet". It never follows a symbolic link, reads only a regular file of at most
`MAX_BYTES`, and replaces the file whole (a new file made with O_EXCL, fsynced, renamed in
place, the folder fsynced), so a crash leaves the old record or the new one.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from broker.errors import TrustError
from broker.safe_files import read_regular, replace_durably

STATE = "crl-accepted.json"
MAX_BYTES = 1 << 20  # a record per issuer is ~200 B: far more than any client CA file holds


class AcceptedCrl(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    issuer: str  # RFC 4514
    crl_number: int | None  # None: the CRL carried no number (only ever accepted first)
    sha256: str  # of the list (DER), hex


def read_accepted(state_dir: Path) -> dict[str, AcceptedCrl]:
    """The accepted record of each issuer; empty when the half never accepted a CRL."""
    path = state_dir / STATE
    try:
        data = read_regular(path, MAX_BYTES)
    except FileNotFoundError:
        return {}
    except OSError as e:  # a link, a FIFO, larger than any record of ours
        raise TrustError(f"{path}: cannot read the record of accepted CRLs: {e.strerror}") from e
    try:
        records = msgspec.json.decode(data, type=list[AcceptedCrl])
    except msgspec.DecodeError as e:
        # Never "nothing accepted yet": that would let an older CRL back in.
        raise TrustError(f"{path}: unreadable record of accepted CRLs: {e}") from e
    accepted = {r.issuer: r for r in records}
    if len(accepted) != len(records):
        raise TrustError(f"{path}: an issuer is recorded twice; not a record this half wrote")
    return accepted


def record_accepted(state_dir: Path, accepted: dict[str, AcceptedCrl]) -> None:
    """Replace the record, durably, before what it records takes effect. Raises OSError."""
    data = msgspec.json.encode(sorted(accepted.values(), key=lambda r: r.issuer))
    replace_durably(state_dir / STATE, data)
