"""BACnet/IP datagrams the BACnet connector sends and receives, sans I/O (bacpypes3 codecs).

Read-only by construction: this module builds only the requests in `SERVICES_USED` — a
directed Who-Is, ReadProperty, ReadPropertyMultiple and SubscribeCOV — and imports no other
request class. Each confirmed request goes out as one unsegmented APDU that does not accept a
segmented answer, in an Original-Unicast-NPDU for the local network (no DNET: routed
networks are not supported yet).

`parse` decodes whatever arrives from the device and raises `FrameError` (saying what is
wrong) for anything that is not a well-formed BVLL, NPDU and APDU for us: it must never let
a bacpypes3 exception or a half-decoded value out, because the bytes come from the OT network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

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
from bacpypes3.primitivedata import ObjectIdentifier
from bacpypes3.vendor import get_vendor_info

# The only services the connector sends (docs/bacnet.md); subscribeCOV only with `read: cov`.
SERVICES_USED: Final = frozenset({"whoIs", "readProperty", "readPropertyMultiple", "subscribeCOV"})

MAX_APDU: Final = 1476  # the largest answer we accept: one Ethernet frame of BACnet/IP
_MAX_RESP_CODE: Final = 5  # clause 20.1.2.5: 5 means up to 1476 octets
WILDCARD_INSTANCE: Final = 4194303  # "the device that receives this" (clause 15.5.2)

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
    request = SubscribeCOVRequest(
        subscriberProcessIdentifier=process_id,
        monitoredObjectIdentifier=obj,
        issueConfirmedNotifications=False,
        lifetime=lifetime_s,
    )
    return _confirmed(request, invoke_id)


def answer_size(wanted: Sequence[Property]) -> int:
    """An upper estimate of the octets of a ReadPropertyMultiple-ACK for `wanted` (a REAL or
    an enumeration; an error is 8), with the 3 octets of the ACK's header: batches are cut
    so that this stays within the device's max-apdu-length-accepted."""
    objects = len({obj for obj, _ in wanted})
    return 3 + objects * 7 + len(wanted) * 12


def parse(datagram: bytes) -> APDU:
    """The APDU in a datagram from the device, decoded as far as its service (an ACK's and
    an unconfirmed request's parameters included)."""
    if len(datagram) < 4 or datagram[0] != _BVLL_TYPE:
        raise FrameError(f"not BACnet/IP (BVLL type {datagram[:1].hex() or 'missing'})")
    if datagram[1] not in (_ORIGINAL_UNICAST, _ORIGINAL_BROADCAST):
        raise FrameError(f"BVLL function 0x{datagram[1]:02x} carries no message for us")
    if int.from_bytes(datagram[2:4], "big") != len(datagram):
        raise FrameError(
            f"BVLL length {int.from_bytes(datagram[2:4], 'big')} but {len(datagram)} octets"
        )
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
