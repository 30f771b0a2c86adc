"""BACnet/IP datagrams the BACnet connector sends and receives, sans I/O (bacpypes3 codecs).

Read-only by construction: this module builds only the requests in `SERVICES_USED` — a
Who-Is (for `discover bacnet`; the connector sends none), ReadProperty, ReadPropertyMultiple
and SubscribeCOV (a subscription or its cancellation) — and imports no other request class. Each confirmed request goes out as one unsegmented APDU that does not accept a
segmented answer, in an Original-Unicast-NPDU for the local network (no DNET: routed
networks are not supported yet).

`peek` reads a datagram's BVLL, NPDU and APDU headers without decoding the service (a few
octets, constant time), so that what answers no outstanding request is dropped before
bacpypes3 spends time on it. `parse` decodes whatever passes and raises `FrameError` (saying
what is wrong) for anything that is not a well-formed BVLL, NPDU and APDU for us: neither may
let a bacpypes3 exception or a half-decoded value out, because the bytes come from the OT
network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from bacpypes3.apdu import (
    APDU,
    APCISequence,
    ComplexAckPDU,
    ErrorPDU,
    PropertyReference,
    ReadAccessSpecification,
    ReadPropertyMultipleRequest,
    ReadPropertyRequest,
    SubscribeCOVRequest,
    UnconfirmedRequestPDU,
    WhoIsRequest,
)
from bacpypes3.basetypes import ObjectType, PropertyIdentifier
from bacpypes3.constructeddata import SequenceOf
from bacpypes3.ipv4.bvll import OriginalUnicastNPDU
from bacpypes3.npdu import NPDU
from bacpypes3.pdu import PDU
from bacpypes3.primitivedata import Atomic, CharacterString, ObjectIdentifier, OctetString
from bacpypes3.vendor import get_vendor_info

# The only services the connector sends (docs/bacnet.md); subscribeCOV only with `read: cov`.
SERVICES_USED: Final = frozenset({"whoIs", "readProperty", "readPropertyMultiple", "subscribeCOV"})

MAX_APDU: Final = 1476  # the largest answer we accept: one Ethernet frame of BACnet/IP
# The largest BACnet/IP datagram: BVLL (4) + the largest NPDU header (21) + MAX_APDU
# (Annex J, clause 6.2); anything longer is not BACnet/IP and is dropped undecoded.
MAX_DATAGRAM: Final = 4 + 21 + MAX_APDU
_MAX_RESP_CODE: Final = 5  # clause 20.1.2.5: 5 means up to 1476 octets
WILDCARD_INSTANCE: Final = 4194303  # "the device that receives this" (clause 15.5.2)

MAX_COV_LIFETIME_S: Final = 3600  # a subscription lapses within the hour if we vanish
_LONG: Final = 265  # a text of 255 octets with its tags: longer ones are split on refusal

_BVLL_TYPE = 0x81
_ORIGINAL_UNICAST = 0x0A
_ORIGINAL_BROADCAST = 0x0B

_OBJECTS = get_vendor_info(0)  # the standard object types and their properties' datatypes

Property = tuple[ObjectIdentifier, str]  # an object and one property identifier


class FrameError(ValueError):
    """A datagram that is not a well-formed BACnet/IP message for us."""


def _datagram(apdu: APDU, *, expecting_reply: bool) -> bytes:
    npdu = NPDU(apdu.encode().pduData)
    npdu.npduVersion = 1
    npdu.pduExpectingReply = expecting_reply
    return bytes(OriginalUnicastNPDU(npdu.encode().pduData).encode().pduData)


def _confirmed(request: APCISequence, invoke_id: int) -> bytes:
    request.apduInvokeID = invoke_id
    request.apduSeg = request.apduMor = request.apduSA = 0  # unsegmented, nor accepted
    request.apduMaxSegs = 0
    request.apduMaxResp = _MAX_RESP_CODE
    return _datagram(request.encode(), expecting_reply=True)


def who_is() -> bytes:
    """A Who-Is without a range, sent to the device's own address (not broadcast)."""
    return _datagram(WhoIsRequest().encode(), expecting_reply=False)


def read_property(invoke_id: int, obj: ObjectIdentifier, prop: str) -> bytes:
    return _confirmed(ReadPropertyRequest(objectIdentifier=obj, propertyIdentifier=prop), invoke_id)


def read_property_multiple(invoke_id: int, wanted: Sequence[Property]) -> bytes:
    """One ReadPropertyMultiple for `wanted`, grouped by object in the order given."""
    specs: list[ReadAccessSpecification] = []
    for obj, prop in wanted:
        if not specs or specs[-1].objectIdentifier != obj:
            specs.append(ReadAccessSpecification(objectIdentifier=obj, listOfPropertyReferences=[]))
        specs[-1].listOfPropertyReferences.append(PropertyReference(propertyIdentifier=prop))
    request = ReadPropertyMultipleRequest(
        listOfReadAccessSpecs=SequenceOf(ReadAccessSpecification)(specs)
    )
    return _confirmed(request, invoke_id)


def subscribe_cov(invoke_id: int, process_id: int, obj: ObjectIdentifier, lifetime_s: int) -> bytes:
    """Unconfirmed notifications of `obj` to this socket for `lifetime_s` (never 0: forever)."""
    if not 0 < lifetime_s <= MAX_COV_LIFETIME_S:
        raise ValueError(f"a COV lifetime of {lifetime_s} s: 1 .. {MAX_COV_LIFETIME_S} s only")
    request = SubscribeCOVRequest(
        subscriberProcessIdentifier=process_id,
        monitoredObjectIdentifier=obj,
        issueConfirmedNotifications=False,
        lifetime=lifetime_s,
    )
    return _confirmed(request, invoke_id)


def cancel_cov(invoke_id: int, process_id: int, obj: ObjectIdentifier) -> bytes:
    """The cancellation of our subscription to `obj`: a SubscribeCOV without
    issue-confirmed-notifications and lifetime (clause 13.14.1.1.3)."""
    request = SubscribeCOVRequest(
        subscriberProcessIdentifier=process_id, monitoredObjectIdentifier=obj
    )
    return _confirmed(request, invoke_id)


def answer_size(wanted: Sequence[Property]) -> int:
    """A safe estimate of the octets of a ReadPropertyMultiple-ACK for `wanted`, with the 3
    octets of the ACK's header: batches are cut so that this stays within the device's
    max-apdu-length-accepted. A number, an enumeration or a bit string takes at most 12
    octets with its tags (an error takes 8); text, octet strings, arrays, lists and
    properties of unknown type are counted at `_LONG` each."""
    objects = len({obj for obj, _ in wanted})
    return 3 + objects * 7 + sum(_property_size(obj, prop) for obj, prop in wanted)


def _property_size(obj: ObjectIdentifier, prop: str) -> int:
    try:
        kind = _OBJECTS.get_object_class(ObjectType(obj[0]))
        datatype = kind.get_property_type(PropertyIdentifier(prop)) if kind is not None else None
    except (ValueError, KeyError, TypeError):
        datatype = None
    if datatype is None or not issubclass(datatype, Atomic):
        return _LONG
    if issubclass(datatype, CharacterString | OctetString):
        return _LONG
    return 12


class Peek(NamedTuple):
    """A datagram's APDU type (clause 20.1.1: 0 confirmed request … 7 abort), its invoke id
    (None for an unconfirmed request) and its service choice (None where it has none)."""

    kind: int
    invoke_id: int | None
    service: int | None


def peek(datagram: bytes) -> Peek:
    """The headers of a datagram from the device, without decoding its service: FrameError
    for what is not an unsegmented local BACnet/IP APDU (checked again, in full, by `parse`)."""
    if len(datagram) > MAX_DATAGRAM:
        raise FrameError(f"a datagram of {len(datagram)} octets, over BACnet/IP's {MAX_DATAGRAM}")
    _check_bvll(datagram, shortest=7)
    control = datagram[5]
    if datagram[4] != 1 or control & 0x80:
        raise FrameError("a network-layer message or an NPDU of another version, not an APDU")
    if control & 0x28:
        raise FrameError("a routed message (DNET/SNET): routed networks are not supported")
    apdu = datagram[6:]
    kind = apdu[0] >> 4
    segmented = bool(apdu[0] & 0x08)
    at: dict[int, tuple[int | None, int | None]] = {
        0: (2, 5 if segmented else 3),  # confirmed request: flags, max segs/resp, invoke id
        1: (None, 1),  # unconfirmed request
        2: (1, 2),  # simple ACK
        3: (1, 4 if segmented else 2),  # complex ACK
        4: (1, None),  # segment ACK
        5: (1, 2),  # error
        6: (1, None),  # reject
        7: (1, None),  # abort
    }
    if kind not in at:
        raise FrameError(f"APDU type {kind} is not defined")
    invoke_at, service_at = at[kind]
    last = max(i for i in (invoke_at, service_at) if i is not None)
    if len(apdu) <= last:
        raise FrameError(f"an APDU of type {kind} cut after {len(apdu)} octets")
    return Peek(
        kind,
        apdu[invoke_at] if invoke_at is not None else None,
        apdu[service_at] if service_at is not None else None,
    )


def _check_bvll(datagram: bytes, shortest: int) -> None:
    """FrameError unless the datagram has `shortest` octets or more and its BVLL header is
    BACnet/IP's, brings a message (an original unicast or broadcast) and says its length."""
    if len(datagram) < shortest or datagram[0] != _BVLL_TYPE:
        raise FrameError(f"not BACnet/IP (BVLL type {datagram[:1].hex() or 'missing'})")
    if datagram[1] not in (_ORIGINAL_UNICAST, _ORIGINAL_BROADCAST):
        raise FrameError(f"BVLL function 0x{datagram[1]:02x} carries no message for us")
    if int.from_bytes(datagram[2:4], "big") != len(datagram):
        raise FrameError(
            f"BVLL length {int.from_bytes(datagram[2:4], 'big')} but {len(datagram)} octets"
        )


def parse(datagram: bytes) -> APDU:
    """The APDU in a datagram from the device, decoded as far as its service (an ACK's and
    an unconfirmed request's parameters included)."""
    _check_bvll(datagram, shortest=4)
    try:
        npdu = NPDU.decode(PDU(datagram[4:]))
    except Exception as e:  # bacpypes3 raises assorted errors on short or odd input
        raise FrameError(f"malformed NPDU: {_said(e)}") from e
    if npdu.npduNetMessage is not None:
        raise FrameError(f"a network-layer message ({npdu.npduNetMessage}), not an APDU")
    if npdu.npduDADR is not None or npdu.npduSADR is not None:
        raise FrameError("a routed message (DNET/SNET): routed networks are not supported")
    try:
        apdu = APDU.decode(PDU(npdu.pduData))
    except Exception as e:
        raise FrameError(f"malformed APDU: {_said(e)}") from e
    if not isinstance(apdu, ComplexAckPDU | ErrorPDU | UnconfirmedRequestPDU):
        return apdu  # a simple ACK, reject or abort is whole; a request to us is not read
    if getattr(apdu, "apduSeg", 0):
        raise FrameError("a segmented answer, though segmentation was not accepted")
    try:
        decoded: APDU = APCISequence.decode(apdu)
    except Exception as e:
        raise FrameError(f"malformed {type(apdu).__name__}: {_said(e)}") from e
    return decoded


def value_of(object_type: str, prop: str, value: Any) -> Any:
    """A property value of an ACK or a notification (an `Any`) as the standard datatype of
    that property of that object type (clause 12), e.g. a REAL present-value of an analog
    input, a BinaryPV of a binary input, a StatusFlags bit string."""
    try:
        kind = _OBJECTS.get_object_class(ObjectType(object_type))
        datatype = kind.get_property_type(PropertyIdentifier(prop)) if kind is not None else None
    except (ValueError, KeyError, TypeError):
        datatype = None
    if datatype is None:
        raise FrameError(f"{object_type} {prop}: not a standard property")
    try:
        return value.cast_out(datatype)
    except Exception as e:
        raise FrameError(f"{object_type} {prop}: not a {datatype.__name__}: {_said(e)}") from e


def _said(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:200]
