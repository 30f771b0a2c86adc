"""A writer's forward-secure checkpoint keys: one Ed25519 key per epoch, in a certified chain.

Each writer folder holds `epochs.jsonl`, one certificate line per epoch, and `epoch.key`,
the current epoch's private key (ADR 0016). Epoch 1, and the first epoch of a new link after
a writer lost its key, is certified by the appliance's root audit key (`audit.key`, public
half `audit.pub`); every other epoch by the epoch before it. An epoch signs checkpoints only
from its `from_seq` on, and `from_seq` grows with every epoch, so a key taken from the
appliance today cannot sign a checkpoint for yesterday's entries: their epochs' keys are gone.

Epoch 1 of a writer that runs as another user is certified by root before its first start
(`enroll`: `dmzbroker audit enroll`, or `run` as root), with its files given to that user, so
that no half ever needs to read the root key (ADR 0018). Readers (`audit verify`, the writer
at start) rebuild the chain from `audit.pub` alone with `read_chain`. This module never deletes or rewrites a certificate that verifies, and never
writes a private key with wider permissions than 0600.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.audit.entry import canonical
from broker.audit.segments import segment_numbers
from broker.errors import ConfigError, TrustError
from broker.safe_files import fsync_folder, read_regular
from broker.trust.keys import key_id, load_private, parse_public_pem, verifies

CHAIN_FILE = "epochs.jsonl"
KEY_FILE = "epoch.key"
NEXT_KEY_FILE = "epoch.key.next"  # a key being certified: see `advance`
REJECTED_FILE = "epochs.rejected"  # certificate lines the writer cut off its chain, kept
UNREADABLE_FILE = "epochs.unreadable"  # an epochs.jsonl that could not be read, moved aside
TORN = "incomplete (a torn write)"  # read_chain's problem for a last line without newline
MAX_CHAIN_BYTES = 64 * 1024 * 1024  # about 300 bytes an epoch: decades of hourly epochs
MAX_KEY_BYTES = 64 * 1024  # a PEM Ed25519 key is 119 bytes
EPOCH_S = 3600.0  # a new epoch at every start and then at the first checkpoint after this
_FIELDS = frozenset(
    {"epoch", "from_seq", "key", "certified_by", "appliance", "writer", "signature"}
)


@dataclass(frozen=True)
class Epoch:
    number: int
    from_seq: int
    key: Ed25519PublicKey
    keyid: str  # broker.trust.keys.key_id(key)
    line: int  # line in epochs.jsonl, for messages
    root_certified: bool = False  # the first epoch of a link: certified by the root key
    appliance: str = ""  # the appliance the certificate names


@dataclass(frozen=True)
class RootKey:
    """The appliance's root audit key: its public half to check chains, and a way to load the
    private half, called only when a writer must certify a first epoch (it may be offline)."""

    public: Ed25519PublicKey
    load_private: Callable[[], Ed25519PrivateKey]

    @classmethod
    def of(cls, key: Ed25519PrivateKey) -> RootKey:
        return cls(key.public_key(), lambda: key)

    @classmethod
    def from_files(cls, private: Path) -> RootKey:
        """The root key configured as `audit.key`: its public half from `audit.pub` beside it
        (so the private key may be taken off the appliance), else from the private key."""
        public_path = private.with_suffix(".pub")

        def load() -> Ed25519PrivateKey:
            try:
                return load_private(private, passphrase=None)
            except (TrustError, OSError) as e:
                what = f"{private}: cannot read: {e.strerror}" if isinstance(e, OSError) else e
                raise ConfigError(
                    f"{what}: the root audit key certifies a writer's first epoch key. Before a "
                    "writer's first start, run `dmzbroker audit enroll --config FILE` as root "
                    "(`dmzbroker run` as root does it itself); a writer that lost epoch.key "
                    "needs the key for one start (a new link, recorded as a chain break): put "
                    "it back, readable by that writer, and take it away again afterwards"
                ) from e

        try:
            text = public_path.read_text()
        except FileNotFoundError:
            key = load()
            return cls(key.public_key(), lambda: key)
        except OSError as e:
            raise ConfigError(f"{public_path}: cannot read: {e.strerror}") from e
        try:
            public = parse_public_pem(text, str(public_path))
        except TrustError as e:
            raise ConfigError(str(e)) from e

        def load_matching() -> Ed25519PrivateKey:
            key = load()
            if key_id(key.public_key()) != key_id(public):
                raise ConfigError(f"{private}: not the private half of {public_path}")
            return key

        return cls(public, load_matching)


def certificate_message(
    appliance: str, writer: str, epoch: int, from_seq: int, key_b64: str
) -> bytes:
    """What a certificate signs: `key_b64` signs `writer`'s checkpoints from `from_seq` on."""
    return f"dmzbroker audit epoch v1|{appliance}|{writer}|{epoch}|{from_seq}|{key_b64}".encode()


def key_for(epochs: list[Epoch], seq: int) -> Epoch | None:
    """The epoch whose from_seq <= seq < the next epoch's from_seq."""
    found = None
    for epoch in epochs:
        if epoch.from_seq > seq:
            break
        found = epoch
    return found


def read_chain(directory: Path, root: Ed25519PublicKey) -> tuple[list[Epoch], str | None]:
    """The certified epochs of the writer folder `directory`, in order, verified from `root`,
    and the first problem found or None. Stops at the first problem; the epochs before it are
    still returned."""
    try:
        data = read_regular(directory / CHAIN_FILE, MAX_CHAIN_BYTES)
    except FileNotFoundError:
        return [], f"{CHAIN_FILE}: missing (the key chain from audit.pub)"
    except OSError as e:
        return [], f"{CHAIN_FILE}: cannot read: {e.strerror}"
    epochs: list[Epoch] = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        try:
            epochs.append(_certified(line, number, epochs, root, directory.name))
        except _Refused as e:
            return epochs, f"{CHAIN_FILE} line {number}: {e}"
    if lines[-1]:
        return epochs, f"{CHAIN_FILE} line {len(lines)}: {TORN}"
    return epochs, None


class _Refused(Exception):
    """A certificate line that is not a valid next link; the message says why."""


def _certified(
    line: bytes, number: int, before: list[Epoch], root: Ed25519PublicKey, writer: str
) -> Epoch:
    unverified = _parse(line)
    if unverified["writer"] != writer:
        raise _Refused(f"certifies writer {unverified['writer']!r}, not {writer!r}")
    epoch, from_seq = int(unverified["epoch"]), int(unverified["from_seq"])
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(unverified["key"], validate=True))
        signature = base64.b64decode(unverified["signature"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise _Refused("key or signature is not base64 of an Ed25519 key / signature") from e
    previous = before[-1] if before else None
    expected = previous.number + 1 if previous else 1
    if epoch != expected:
        raise _Refused(f"epoch {epoch} where epoch {expected} must come (reordered or removed)")
    if from_seq < 1 or (previous is not None and from_seq <= previous.from_seq):
        after = f"epoch {previous.number}'s from_seq {previous.from_seq}" if previous else "0"
        raise _Refused(f"from_seq {from_seq} goes back: it must be after {after}")
    if previous is not None and unverified["appliance"] != previous.appliance:
        raise _Refused(f"appliance {unverified['appliance']!r} differs from the earlier epochs'")
    message = certificate_message(
        unverified["appliance"], unverified["writer"], epoch, from_seq, unverified["key"]
    )
    certifier: Ed25519PublicKey | None = None
    if unverified["certified_by"] == key_id(root):
        certifier = root
    elif previous is not None and unverified["certified_by"] == previous.keyid:
        certifier = previous.key
    if certifier is None or not verifies(certifier, signature, message):
        by = f"epoch {previous.number}'s key or " if previous else ""
        raise _Refused(f"epoch {epoch} not certified by {by}the root key (audit.pub)")
    return Epoch(
        epoch, from_seq, key, key_id(key), number, certifier is root, unverified["appliance"]
    )


def _parse(line: bytes) -> dict[str, Any]:
    """The fields of a certificate line, checked for form only (not yet trusted)."""
    try:
        unverified: Any = msgspec.json.decode(line)
    except msgspec.DecodeError as e:
        raise _Refused("not JSON") from e
    if not isinstance(unverified, dict) or set(unverified) != _FIELDS:
        raise _Refused(f"not a certificate (fields must be {', '.join(sorted(_FIELDS))})")
    if canonical(unverified) != line:
        raise _Refused("not in canonical form (edited)")
    ints = (unverified["epoch"], unverified["from_seq"])
    texts = [unverified[k] for k in ("key", "certified_by", "appliance", "writer", "signature")]
    if not all(type(v) is int for v in ints) or not all(isinstance(v, str) for v in texts):
        raise _Refused("epoch and from_seq must be integers, the other fields text")
    return unverified


def current_key(directory: Path, epochs: list[Epoch]) -> tuple[Ed25519PrivateKey | None, str]:
    """The last epoch's private key, after finishing an epoch change a crash interrupted (see
    `advance`); or None and why there is none that may be used."""
    pending = directory / NEXT_KEY_FILE
    if os.path.lexists(pending):
        key, _ = _read_key(pending)
        if key is not None and epochs and key_id(key.public_key()) == epochs[-1].keyid:
            os.replace(pending, directory / KEY_FILE)  # certified: the change was complete
            fsync_folder(directory)
        else:
            pending.unlink()  # never certified (or not ours), so never used
    if not epochs:
        return None, f"{KEY_FILE}: no certified epoch to use it for"
    key, problem = _read_key(directory / KEY_FILE)
    if key is None:
        return None, problem
    last = epochs[-1]
    if key_id(key.public_key()) != last.keyid:
        return (
            None,
            f"{KEY_FILE}: not the key of epoch {last.number} ({CHAIN_FILE} line {last.line})",
        )
    return key, ""


def advance(
    directory: Path,
    appliance: str,
    epochs: list[Epoch],
    from_seq: int,
    certifier: Ed25519PrivateKey,
    *,
    owner: tuple[int, int] | None = None,
) -> tuple[Epoch, Ed25519PrivateKey]:
    """Certify a fresh key as the next epoch, from `from_seq` on, and make it the current one.
    `owner` (uid, gid): root enrolling another user's writer (`enroll`); its files are given
    to that user.

    Crash-safe order: the new key is on disk (`epoch.key.next`) before its certificate, and
    the certificate before the key replaces the old one, so whatever instant a crash hits, the
    next start finds either the old key with the old chain or a certified new key
    (`current_key`). The caller drops its reference to the old key: from here on only the
    new one can sign.
    """
    number = epochs[-1].number + 1 if epochs else 1
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_b64 = base64.b64encode(raw).decode()
    message = certificate_message(appliance, directory.name, number, from_seq, key_b64)
    certificate = {
        "epoch": number,
        "from_seq": from_seq,
        "key": key_b64,
        "certified_by": key_id(certifier.public_key()),
        "appliance": appliance,
        "writer": directory.name,
        "signature": base64.b64encode(certifier.sign(message)).decode(),
    }
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_durably(directory / NEXT_KEY_FILE, pem, mode=0o600, append=False, owner=owner)
    chain = directory / CHAIN_FILE
    try:
        size = chain.stat().st_size
    except FileNotFoundError:
        size = 0
    try:
        # Enrolling, the chain is empty: written anew (O_EXCL), never appended to a file the
        # writer's user could have made a link to something of root's.
        line = canonical(certificate) + b"\n"
        _write_durably(chain, line, mode=0o640, append=owner is None, owner=owner)
    except OSError:
        # Not certified: undo what may be on disk, so that the chain never holds a torn line
        # and the old key, still the certified one, goes on signing.
        with contextlib.suppress(OSError):
            os.truncate(chain, size)
        with contextlib.suppress(OSError):
            (directory / NEXT_KEY_FILE).unlink()
        raise
    with contextlib.suppress(OSError):  # else the next start renames it (`current_key`)
        os.replace(directory / NEXT_KEY_FILE, directory / KEY_FILE)
        fsync_folder(directory)
    root_certified = not epochs or certificate["certified_by"] != epochs[-1].keyid
    epoch = Epoch(
        number, from_seq, public, key_id(public), len(epochs) + 1, root_certified, appliance
    )
    return epoch, key


def cut(directory: Path, epochs: list[Epoch]) -> None:
    """Keep only the certificates of `epochs` (the valid start of the chain) in epochs.jsonl,
    so that new epochs can follow them; the lines cut off are appended to `epochs.rejected`,
    never deleted."""
    path = directory / CHAIN_FILE
    try:
        data = read_regular(path, MAX_CHAIN_BYTES)
    except FileNotFoundError:
        return
    except OSError:  # a link, a FIFO, a device, a giant: moved aside, never read
        os.replace(path, directory / UNREADABLE_FILE)
        data = b""
    keep = b"".join(line + b"\n" for line in data.split(b"\n")[: len(epochs)])
    rejected = data[len(keep) :]
    if rejected:
        if not rejected.endswith(b"\n"):
            rejected += b"\n"
        _write_durably(directory / REJECTED_FILE, rejected, mode=0o640, append=True)
    staged = directory / f"{CHAIN_FILE}.new"
    _write_durably(staged, keep, mode=0o640, append=False)
    os.replace(staged, path)
    fsync_folder(directory)


def enroll(directory: Path, appliance: str, root: RootKey, owner: tuple[int, int]) -> str | None:
    """As root, certify epoch 1 of the writer folder `directory` for the writer that runs as
    `owner` (uid, gid): `epochs.jsonl` and `epoch.key` (0600) are created anew and given to
    it, and its first start continues this chain without the root key (`AuditLog._start`
    adopts a log of no entries whose chain is one epoch from seq 1). None when enrolled;
    else why nothing was changed: a writer that has a key chain or a log already certifies
    its own next epochs, and one whose chain broke starts a new link itself."""
    chain = directory / CHAIN_FILE
    try:
        status = os.lstat(chain)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(status.st_mode) or status.st_size:
            return f"has a key chain ({CHAIN_FILE}) already"
    if segment_numbers(directory):
        return "has an audit log already"
    advance(directory, appliance, [], 1, root.load_private(), owner=owner)
    return None


def _read_key(path: Path) -> tuple[Ed25519PrivateKey | None, str]:
    """A private key file this process wrote: regular, ours, 0600 at most. Another mode or
    owner means someone else could read it or swapped it: not used."""
    try:
        status = os.lstat(path)
        data = read_regular(path, MAX_KEY_BYTES)
    except FileNotFoundError:
        return None, f"{path.name}: missing"
    except OSError as e:
        return None, f"{path.name}: cannot read: {e.strerror}"
    if status.st_uid != os.geteuid() or status.st_mode & 0o077:
        return None, (
            f"{path.name}: mode {stat.S_IMODE(status.st_mode):04o}, owner uid {status.st_uid}: "
            "not private to this writer (it may have been read or swapped)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError):
        return None, f"{path.name}: not a PEM private key"
    if not isinstance(key, Ed25519PrivateKey):
        return None, f"{path.name}: not an Ed25519 private key"
    return key, ""


def _write_durably(
    path: Path, data: bytes, *, mode: int, append: bool, owner: tuple[int, int] | None = None
) -> None:
    """Append to `path`, or write it anew. A new file is created by this call (O_EXCL, after
    removing what was there), so a file someone made in advance, with a wider mode or as a
    link, never receives a key. `owner`: (uid, gid) a new file is given to before any byte."""
    if append:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if not append:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_folder(path.parent)
