"""The BACnet/IP reader of passive discovery (broker/passive/bacnet.py): a poller's reads and
a device's answers become Requests, Values and Descriptions, matched by invoke id; I-Am and
COV notifications name the device instance; writes and services that change a device are
writes; what was not asked for, hostile and broken datagrams give no data, only warnings.
Requests are built by the connector's own encoders (bacnet_frames), the device's side with
bacpypes3 APDUs."""

from __future__ import annotations

from typing import Any

import pytest
from bacpypes3.apdu import (
    APDU,
    APCISequence,
    ConfirmedCOVNotificationRequest,
    DeleteObjectRequest,
    IAmRequest,
    ReadPropertyACK,
    ReadPropertyMultipleACK,
    ReinitializeDeviceRequest,
    SubscribeCOVRequest,
    UnconfirmedCOVNotificationRequest,
    WritePropertyMultipleRequest,
    WritePropertyRequest,
)
from bacpypes3.basetypes import (
    EngineeringUnits,
    ErrorType,
    PropertyValue,
    ReadAccessResult,
    ReadAccessResultElement,
    ReadAccessResultElementChoice,
    WriteAccessSpecification,
)
from bacpypes3.constructeddata import Any as AnyValue
from bacpypes3.primitivedata import CharacterString, Enumerated, Null, ObjectIdentifier, Real
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.passive import bacnet
from broker.passive.bacnet import BacnetReader
from broker.passive.capture import Packet
from broker.passive.observations import (
    UNKNOWN_UNIT,
    Description,
    Observation,
    Peer,
    Request,
    Values,
    Warnings,
)
from broker.plant.connectors import bacnet_frames as frames

SCADA = Peer("10.0.0.5", 47808)
DEVICE = Peer("10.0.0.20", 47808)
INSTANCE = 1234
AI1 = ObjectIdentifier("analog-input,1")
AV3 = ObjectIdentifier("analog-value,3")
BI2 = ObjectIdentifier("binary-input,2")


def to_device(data: bytes, number: int = 1, time: float = 1.0) -> Packet:
    return Packet(number, time, "udp", SCADA, DEVICE, data)


def to_scada(data: bytes, number: int = 2, time: float = 1.1) -> Packet:
    return Packet(number, time, "udp", DEVICE, SCADA, data)


def unconfirmed(apdu: APDU) -> bytes:
    return frames._datagram(apdu.encode(), expecting_reply=False)


def answer(ack: APCISequence, invoke_id: int) -> bytes:
    ack.apduInvokeID = invoke_id
    ack.apduSeg = ack.apduMor = 0  # unsegmented
    return unconfirmed(ack)


def confirmed(request: APCISequence, invoke_id: int) -> bytes:
    return frames._confirmed(request, invoke_id)


def i_am() -> bytes:
    return unconfirmed(
        IAmRequest(
            iAmDeviceIdentifier=ObjectIdentifier(("device", INSTANCE)),
            maxAPDULengthAccepted=1476,
            segmentationSupported="noSegmentation",
            vendorID=999,
        )
    )


def result(obj: ObjectIdentifier, **properties: Any) -> ReadAccessResult:
    elements = [
        ReadAccessResultElement(
            propertyIdentifier=name.replace("_", "-"),
            readResult=ReadAccessResultElementChoice(propertyValue=AnyValue(value)),
        )
        for name, value in properties.items()
    ]
    return ReadAccessResult(objectIdentifier=obj, listOfResults=elements)


def access_error(obj: ObjectIdentifier, prop: str) -> ReadAccessResult:
    error = ErrorType(errorClass="property", errorCode="unknownProperty")
    element = ReadAccessResultElement(
        propertyIdentifier=prop, readResult=ReadAccessResultElementChoice(propertyAccessError=error)
    )
    return ReadAccessResult(objectIdentifier=obj, listOfResults=[element])


def request(
    table: str, start: int, function: str, unit: int = INSTANCE, write: bool = False
) -> Request:
    count = 1 if table else 0
    return Request("bacnet", 1.0, SCADA.host, DEVICE, unit, table, start, count, function, write)


def feed(reader: BacnetReader, *packets: Packet) -> list[Observation]:
    return [o for p in packets for o in reader.feed(p, to_server=p.dst == DEVICE)]


def test_a_read_property_multiple_and_its_ack_give_requests_values_and_descriptions() -> None:
    warnings = Warnings()
    reader = BacnetReader(warnings)
    wanted = [
        (AI1, "present-value"), (AI1, "object-name"), (AI1, "units"), (AI1, "description"),
        (BI2, "present-value"), (AV3, "status-flags"),
    ]  # fmt: skip
    ack = ReadPropertyMultipleACK(
        listOfReadAccessResults=[
            result(
                AI1,
                present_value=Real(21.5),
                object_name=CharacterString("Room temperature"),
                units=EngineeringUnits("degreesCelsius"),
                description=CharacterString("north wall"),
            ),
            result(BI2, present_value=Enumerated(1)),  # active
            access_error(AV3, "status-flags"),
            result(ObjectIdentifier("analog-input,9"), present_value=Real(5.0)),  # not asked
        ]
    )
    observed = feed(
        reader,
        to_scada(i_am(), number=1),
        to_device(frames.read_property_multiple(7, wanted)),
        to_scada(answer(ack, 7)),
    )
    assert observed == [
        request("analog-input", 1, "ReadPropertyMultiple"),
        request("binary-input", 2, "ReadPropertyMultiple"),
        Values("bacnet", 1.1, DEVICE, INSTANCE, "analog-input", 1, (21.5,)),
        Description(
            "bacnet", DEVICE, INSTANCE, "analog-input", 1,
            name="Room temperature", units="degC", description="north wall",
        ),
        Values("bacnet", 1.1, DEVICE, INSTANCE, "binary-input", 2, (True,)),
    ]  # fmt: skip
    assert len(warnings) == 0


def test_read_property_acks_are_taken_only_when_they_answer_a_request_seen() -> None:
    warnings = Warnings()
    reader = BacnetReader(warnings)
    ack = ReadPropertyACK(
        objectIdentifier=AI1, propertyIdentifier="present-value", propertyValue=AnyValue(Real(3.0))
    )
    units = ReadPropertyACK(
        objectIdentifier=AI1,
        propertyIdentifier="units",
        propertyValue=AnyValue(EngineeringUnits("cubicFeetPerMinute")),  # no policy spelling
    )
    observed = feed(
        reader,
        to_scada(answer(ack, 3)),  # before any request: the capture began mid-exchange
        to_device(frames.read_property(3, AI1, "present-value")),
        to_scada(answer(ack, 4)),  # another invoke id: answers nothing asked
        to_scada(answer(ack, 3)),
        to_scada(answer(ack, 3)),  # a repeat: its request was answered already
        to_device(frames.read_property(5, AI1, "units")),  # reads no value: no Request
        to_scada(answer(units, 5)),
    )
    # no I-Am in this capture: the device's instance is unknown
    assert observed == [
        request("analog-input", 1, "ReadProperty", unit=UNKNOWN_UNIT),
        Values("bacnet", 1.1, DEVICE, UNKNOWN_UNIT, "analog-input", 1, (3.0,)),
        Description(
            "bacnet", DEVICE, UNKNOWN_UNIT, "analog-input", 1, units="cubic-feet-per-minute"
        ),
    ]
    assert reader.instance_of(DEVICE) == UNKNOWN_UNIT
    assert warnings.items() == [("BACnet answer to no request seen", 3, "packet 2")]


def test_a_device_read_names_its_instance_and_polls_no_value() -> None:
    reader = BacnetReader(Warnings())
    device = ObjectIdentifier(("device", INSTANCE))
    ack = ReadPropertyACK(
        objectIdentifier=device,
        propertyIdentifier="object-name",
        propertyValue=AnyValue(CharacterString("AHU-1")),
    )
    observed = feed(
        reader,
        to_device(frames.read_property(0, device, "object-name")),  # invoke id 0 is one too
        to_scada(answer(ack, 0)),
    )
    assert observed == [Description("bacnet", DEVICE, INSTANCE, "device", INSTANCE, name="AHU-1")]
    assert reader.instance_of(DEVICE) == INSTANCE


def test_cov_notifications_are_values_and_name_the_device() -> None:
    reader = BacnetReader(Warnings())
    note = UnconfirmedCOVNotificationRequest(
        subscriberProcessIdentifier=1,
        initiatingDeviceIdentifier=ObjectIdentifier(("device", INSTANCE)),
        monitoredObjectIdentifier=AV3,
        timeRemaining=300,
        listOfValues=[
            PropertyValue(propertyIdentifier="present-value", value=AnyValue(Real(4.25))),
            PropertyValue(propertyIdentifier="status-flags", value=AnyValue(Real(0.0))),
        ],
    )
    subscribe = SubscribeCOVRequest(
        subscriberProcessIdentifier=1, monitoredObjectIdentifier=AV3, lifetime=300,
        issueConfirmedNotifications=False,
    )  # fmt: skip
    confirmed_note = ConfirmedCOVNotificationRequest(
        subscriberProcessIdentifier=1,
        initiatingDeviceIdentifier=ObjectIdentifier(("device", INSTANCE)),
        monitoredObjectIdentifier=BI2,
        timeRemaining=300,
        listOfValues=[
            PropertyValue(propertyIdentifier="present-value", value=AnyValue(Enumerated(0)))
        ],
    )
    observed = feed(
        reader,
        to_device(confirmed(subscribe, 9)),
        to_scada(unconfirmed(note)),
        to_scada(confirmed(confirmed_note, 3)),  # a request the device sends
    )
    # a subscription is no poll and changes nothing: no Request
    assert observed == [
        Values("bacnet", 1.1, DEVICE, INSTANCE, "analog-value", 3, (4.25,)),
        Values("bacnet", 1.1, DEVICE, INSTANCE, "binary-input", 2, (False,)),
    ]


def test_requests_never_answered_are_forgotten_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bacnet, "MAX_PENDING", 4)
    warnings = Warnings()
    reader = BacnetReader(warnings)
    ack = ReadPropertyACK(
        objectIdentifier=AI1, propertyIdentifier="present-value", propertyValue=AnyValue(Real(1.0))
    )
    for invoke_id in range(6):
        reader.feed(to_device(frames.read_property(invoke_id, AI1, "present-value")), True)
    assert reader.feed(to_scada(answer(ack, 1)), False) == []  # forgotten
    assert reader.feed(to_scada(answer(ack, 2)), False) != []  # the oldest remembered
    assert reader.feed(to_scada(answer(ack, 5)), False) != []
    kinds = {kind: n for kind, n, _ in warnings.items()}
    assert kinds == {"BACnet requests never answered": 2, "BACnet answer to no request seen": 1}


def test_writes_and_services_that_change_a_device_are_writes() -> None:
    warnings = Warnings()
    reader = BacnetReader(warnings)
    write = WritePropertyRequest(
        objectIdentifier=AV3, propertyIdentifier="present-value",
        propertyValue=AnyValue(Real(21.5)), priority=8,
    )  # fmt: skip
    relinquish = WritePropertyRequest(
        objectIdentifier=AV3, propertyIdentifier="present-value",
        propertyValue=AnyValue(Null(())), priority=8,
    )  # fmt: skip
    several = WritePropertyMultipleRequest(
        listOfWriteAccessSpecs=[
            WriteAccessSpecification(
                objectIdentifier=ObjectIdentifier("binary-value,4"),
                listOfProperties=[
                    PropertyValue(
                        propertyIdentifier="present-value", value=AnyValue(Enumerated(1))
                    ),
                    PropertyValue(
                        propertyIdentifier="description", value=AnyValue(CharacterString("x"))
                    ),
                ],
            )
        ]
    )
    restart = ReinitializeDeviceRequest(reinitializedStateOfDevice="warmstart")
    delete = DeleteObjectRequest(objectIdentifier=AV3)
    observed = feed(
        reader,
        to_scada(i_am(), number=1),
        *(
            to_device(confirmed(r, n))
            for n, r in enumerate((write, relinquish, several, restart, delete))
        ),
    )
    assert observed == [
        request("analog-value", 3, "WriteProperty", write=True),
        Values("bacnet", 1.0, DEVICE, INSTANCE, "analog-value", 3, (21.5,), written=True),
        request("analog-value", 3, "WriteProperty", write=True),  # a Null: relinquished
        request("binary-value", 4, "WritePropertyMultiple", write=True),
        Values("bacnet", 1.0, DEVICE, INSTANCE, "binary-value", 4, (True,), written=True),
        request("", 0, "ReinitializeDevice", write=True),
        request("analog-value", 3, "DeleteObject", write=True),
    ]
    assert len(warnings) == 0


def test_refusals_are_warnings_that_name_the_service_they_answer() -> None:
    warnings = Warnings()
    reader = BacnetReader(warnings)
    # an Error PDU (type 5) for invoke id 6, service readProperty (12): property, unknown-property
    error = b"\x81\x0a\x00\x0d\x01\x00\x50\x06\x0c\x91\x02\x91\x20"
    reject = b"\x81\x0a\x00\x09\x01\x00\x60\x08\x09"  # a Reject of invoke id 8
    observed = feed(
        reader,
        to_device(frames.read_property(6, AI1, "present-value")),
        to_scada(error, number=2),
        to_scada(reject, number=3),
    )
    assert observed == [request("analog-input", 1, "ReadProperty", unit=UNKNOWN_UNIT)]
    assert warnings.items() == [
        ("BACnet error answering ReadProperty", 1, "packet 2"),
        ("BACnet reject answering a request not seen", 1, "packet 3"),
    ]


def test_a_bbmd_forwarded_broadcast_is_read_as_from_its_original_sender() -> None:
    reader = BacnetReader(Warnings())
    original = i_am()
    bbmd = Peer("10.0.0.1", 47808)
    sender = bytes((10, 0, 0, 20)) + (47808).to_bytes(2, "big")
    forwarded = b"\x81\x04" + (len(original) + 6).to_bytes(2, "big") + sender + original[4:]
    reader.feed(Packet(1, 1.0, "udp", bbmd, Peer("10.0.0.255", 47808), forwarded), False)
    assert reader.instance_of(DEVICE) == INSTANCE
    assert reader.instance_of(bbmd) == UNKNOWN_UNIT


GARBAGE = [
    b"hello",  # not BACnet/IP
    b"\x81\x0a\x00\x20\x01\x00",  # a BVLL length that lies
    b"\x81\x0a\x00\x07\x01\x00\x30",  # a complex ACK cut after its type
    b"\x81\x0a\x00\x06\x02\x00",  # NPDU version 2
    b"\x81\x0a\x00\x0b\x01\x00\x30\x07\x0e\xff\xff",  # an ACK whose tags make no sense
    b"\x81\x0a\x00\x0a\x01\x00\x00\x05\x07\x0c",  # a ReadProperty with no parameters
    b"\x81\x0a\x00\x0b\x01\x08\x00\x05\x01\x06\x07",  # routed (SNET), cut
    b"\x81\x0a" + (2000).to_bytes(2, "big") + bytes(1996),  # over BACnet/IP's size
]


def test_broken_datagrams_are_warnings_and_management_messages_are_ignored() -> None:
    warnings = Warnings()
    reader = BacnetReader(warnings)
    for n, data in enumerate(GARBAGE):
        assert reader.feed(to_scada(data, number=n + 1), to_server=False) == []
    assert len(warnings) == len(GARBAGE)
    management = [
        b"\x81\x00\x00\x06\x00\x00",  # BVLC-Result
        b"\x81\x02\x00\x04",  # Read-Broadcast-Distribution-Table
        b"\x81\x0a\x00\x09\x01\x80\x00\x00\x01",  # network layer: Who-Is-Router-To-Network
    ]
    for data in management:
        assert reader.feed(to_scada(data), to_server=False) == []
    assert len(warnings) == len(GARBAGE)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([b"", b"\x81\x0a", b"\x81\x0a\x00\x10\x01\x00"]))
def test_any_datagram_is_read_without_an_exception(data: bytes, prefix: bytes) -> None:
    reader = BacnetReader(Warnings())
    reader.feed(to_scada(prefix + data), to_server=False)
    reader.feed(to_device(prefix + data), to_server=True)
