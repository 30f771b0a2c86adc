"""The DNP3 and BACnet devices and sources of the policy: every refusal, told as users see it
(`FILE:LINE: key.path: what`), and the lines `policy show` prints for them.

A signed policy means exactly what `policy show` says: a key that would do nothing (a variation
on a device read by class polls, an empty list of event classes that would run as all three)
is refused, and every key that changes what runs changes the text.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker import policy
from broker.commands.plan import requests_per_scan
from broker.policy import BacnetSource, Dnp3Device, Dnp3Source, parse, report
from broker.policy import envelope as envelopes
from broker.policy.schema import DNP3_VARIATIONS
from tests.harness import dmzbroker
from tests.policy.test_errors_teach import line_of, refusal

GOOD = """\
deployment_id: site-a
version: 1
expires: '2036-01-01T00:00:00Z'
devices:
  - name: rtu-1
    protocol: dnp3
    host: 127.0.0.1
    outstation_address: 10
  - name: ahu-1
    protocol: bacnet
    host: 127.0.0.1
    device_instance: 1234
signals:
  - path: site/well/pump/running
    device: rtu-1
    source: {group: 1, index: 0}
  - path: site/well/pump/flow
    device: rtu-1
    source: {group: 30, index: 3, variation: 5}
  - path: site/room/ahu/supply
    device: ahu-1
    source: {object_type: analog-input, instance: 1}
"""
DNP3 = "    outstation_address: 10\n"
BACNET = "    device_instance: 1234\n"
BINARY = "    source: {group: 1, index: 0}\n"
ANALOG_IN = "    source: {object_type: analog-input, instance: 1}\n"


def test_the_base_policy_loads_with_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    loaded = policy.load(path)
    rtu, ahu = loaded.devices
    assert isinstance(rtu, Dnp3Device)
    assert (rtu.port, rtu.master_address, rtu.read, rtu.unsolicited) == (20000, 1, "static", False)
    assert (rtu.classes_polled, rtu.integrity_every_s) == ((), None)
    assert (ahu.port, ahu.read, ahu.timeout_s, ahu.max_requests_per_s) == (47808, "poll", 3.0, 20)
    assert [s.source.type for s in loaded.signals] == ["bool", "float32", "float32"]
    assert isinstance(loaded.signals[2].source, BacnetSource)
    assert loaded.signals[2].source.property == "present-value"


@pytest.mark.parametrize(
    ("old", "new", "needle", "expected"),
    [
        # DNP3 device
        (DNP3, "    outstation_address: 1\n", "outstation_address",
         "devices[0]: outstation_address 1 is also the broker's master_address (default 1): "
         "the two link addresses must differ"),
        (DNP3, DNP3 + "    master_address: 10\n", "outstation_address",
         "devices[0]: outstation_address 10 is also the broker's master_address (default 1): "
         "the two link addresses must differ"),
        (DNP3, "    outstation_address: 65520\n", "outstation_address",
         "devices[0].outstation_address: expected `int` <= 65519, got `65520`"),
        (DNP3, DNP3 + "    master_address: -1\n", "master_address",
         "devices[0].master_address: expected `int` >= 0, got `-1`"),
        (DNP3, DNP3 + "    event_classes: [1]\n", "event_classes",
         "devices[0]: event_classes applies only to `read: events`: leave it out, or set "
         "`read: events`"),
        (DNP3, DNP3 + "    integrity_interval_s: 60\n", "integrity_interval_s",
         "devices[0]: integrity_interval_s applies only to `read: events`: leave it out, or set "
         "`read: events`"),
        (DNP3, DNP3 + "    event_classes: [2]\n    integrity_interval_s: 60\n", "event_classes",
         "devices[0]: event_classes and integrity_interval_s apply only to `read: events`: "
         "leave them out, or set `read: events`"),
        (DNP3, DNP3 + "    unsolicited: true\n", "unsolicited",
         "devices[0]: unsolicited: true applies only to `read: events` (unsolicited responses "
         "carry events): set `read: events`, or leave it out"),
        (DNP3, DNP3 + "    read: events\n    event_classes: [1, 3, 1]\n", "event_classes",
         "devices[0]: event_classes: class 1 is named twice"),
        (DNP3, DNP3 + "    read: events\n    event_classes: []\n", "event_classes",
         "devices[0]: event_classes: [] would poll no class: name the classes (1, 2, 3) to "
         "poll, or leave it out for all three"),
        (DNP3, DNP3 + "    read: events\n    event_classes: [0]\n", "event_classes",
         "devices[0].event_classes[0]: invalid enum value 0 (one of: 1, 2, 3)"),
        (DNP3, DNP3 + "    read: event\n", "read: event",
         "devices[0].read: invalid enum value 'event' — did you mean 'events'? "
         "(one of: static, events)"),
        (DNP3, DNP3 + "    read: events\n    integrity_interval_s: 0\n", "integrity_interval_s",
         "devices[0].integrity_interval_s: expected `float` >= 0.05, got `0`"),
        # DNP3 source
        (BINARY, "    source: {group: 2, index: 0}\n", "group: 2",
         "signals[0].source: group 2: the broker reads the static groups 1, 3, 10, 20, 21, 30, "
         "40 (events report points of these)"),
        (BINARY, "    source: {group: 32, index: 0}\n", "group: 32",
         "signals[0].source: group 32: the broker reads the static groups 1, 3, 10, 20, 21, 30, "
         "40 (events report points of these)"),
        (BINARY, "    source: {group: 1, index: 0, variation: 3}\n", "variation: 3",
         "signals[0].source: variation 3: group 1 has variations 0, 1, 2 (0: the outstation's "
         "default)"),
        (BINARY, "    source: {group: 20, index: 0, variation: 3}\n", "variation: 3",
         "signals[0].source: variation 3: group 20 has variations 0, 1, 2, 5, 6 (0: the "
         "outstation's default)"),
        (BINARY, "    source: {group: 1, index: 65536}\n", "index: 65536",
         "signals[0].source.index: expected `int` <= 65535, got `65536`"),
        (BINARY, "    source: {group: 1}\n", "group: 1}",
         "signals[0].source: missing required key 'index'"),
        # BACnet device
        (BACNET, "    device_instance: 4194303\n", "device_instance",
         "devices[1].device_instance: expected `int` <= 4194302, got `4194303`"),
        (BACNET, BACNET + "    read: subscribe\n", "read: subscribe",
         "devices[1].read: invalid enum value 'subscribe' (one of: poll, cov)"),
        (BACNET, BACNET + "    max_requests_per_s: 0\n", "name: ahu-1",
         "devices[1]: device 'ahu-1': max_requests_per_s 0 must be above 0 and at most 10000 "
         "requests per second (leave it out for the default 20)"),
        (BACNET, BACNET + "    max_requests_per_s: 10001\n", "name: ahu-1",
         "devices[1]: device 'ahu-1': max_requests_per_s 10001 must be above 0 and at most "
         "10000 requests per second (leave it out for the default 20)"),
        (BACNET, BACNET + "    unit_id: 1\n", "unit_id",
         "devices[1]: unknown key 'unit_id' (known keys: protocol, name, host, "
         "device_instance, port, read, poll_interval_s, timeout_s, max_requests_per_s)"),
        # BACnet source
        (ANALOG_IN, "    source: {object_type: analog-inptu, instance: 1}\n", "analog-inptu",
         "signals[2].source.object_type: invalid enum value 'analog-inptu' — did you mean "
         "'analog-input'? (one of: analog-input, analog-output, analog-value, binary-input, "
         "binary-output, binary-value, multi-state-input, multi-state-output, "
         "multi-state-value, accumulator)"),
        (ANALOG_IN, "    source: {object_type: device, instance: 1}\n", "object_type: device",
         "signals[2].source.object_type: invalid enum value 'device' (one of: analog-input, "
         "analog-output, analog-value, binary-input, binary-output, binary-value, "
         "multi-state-input, multi-state-output, multi-state-value, accumulator)"),
        (ANALOG_IN, "    source: {object_type: analog-input, instance: 4194303}\n", "4194303",
         "signals[2].source.instance: expected `int` <= 4194302, got `4194303`"),
        (ANALOG_IN, "    source: {object_type: analog-input, instance: -1}\n", "instance: -1",
         "signals[2].source.instance: expected `int` >= 0, got `-1`"),
        (ANALOG_IN,
         "    source: {object_type: analog-input, instance: 1, property: Present_Value}\n",
         "Present_Value",
         "signals[2].source: property 'Present_Value': must be a BACnet property identifier "
         "such as 'present-value'"),
        # a source of the other protocol: by its keys, or by an explicit tag
        (ANALOG_IN, "    source: {group: 30, index: 1}\n", "group: 30, index: 1",
         "signals[2].source: unknown key 'group' (known keys: protocol, object_type, instance, "
         "property)"),
        (ANALOG_IN, "    source: {protocol: dnp3, group: 30, index: 1}\n", "protocol: dnp3,",
         "signals[2].source: a dnp3 source on bacnet device 'ahu-1'"),
        (BINARY, "    source: {object_type: binary-input, instance: 1}\n", "binary-input",
         "signals[0].source: unknown key 'object_type' (known keys: protocol, group, index, "
         "variation)"),
        (BINARY, "    source: {protocol: bacnet, object_type: binary-input, instance: 1}\n",
         "binary-input", "signals[0].source: a bacnet source on dnp3 device 'rtu-1'"),
        # scale and offset on a binary or a double-bit value
        (BINARY, BINARY + "    scale: 2\n", "scale: 2",
         "signals[0]: scale and offset do not apply to a bool signal"),
        (BINARY, "    source: {group: 10, index: 0}\n    offset: 1\n", "pump/running",
         "signals[0]: scale and offset do not apply to a bool signal"),
        (BINARY, "    source: {group: 3, index: 0}\n    scale: 2\n", "scale: 2",
         "signals[0]: scale and offset do not apply to a string signal"),
        (ANALOG_IN, "    source: {object_type: binary-value, instance: 1}\n    scale: 2\n",
         "scale: 2", "signals[2]: scale and offset do not apply to a bool signal"),
    ],
)  # fmt: skip
def test_each_refusal_is_told_at_its_line_with_how_to_fix_it(
    tmp_path: Path, old: str, new: str, needle: str, expected: str
) -> None:
    assert GOOD.count(old) == 1
    text = GOOD.replace(old, new)
    assert refusal(tmp_path, text) == f"{line_of(text, needle)}: {expected}"


def test_a_variation_on_a_device_read_by_events_is_refused_as_doing_nothing(
    tmp_path: Path,
) -> None:
    # Class polls (integrity and events) return the variations the outstation is set up
    # for: a named variation would be signed and shown, and never asked for.
    text = GOOD.replace(DNP3, DNP3 + "    read: events\n")
    assert refusal(tmp_path, text) == (
        f"{line_of(text, 'variation: 5')}: signals[1].source.variation: device 'rtu-1' is "
        "read by events (read: events), whose class polls return the variations the "
        "outstation is set up for: leave variation out, or read the device with read: static"
    )
    path = tmp_path / "ok.yaml"
    path.write_text(text.replace(", variation: 5}", "}"))
    assert policy.load(path).signals[1].source.type == "variant"  # the outstation's choice


def test_the_cli_prints_a_dnp3_refusal_on_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace(BINARY, "    source: {group: 2, index: 0}\n"))
    result = dmzbroker(
        "policy", "compile", str(path), "--out", str(tmp_path / "p.json"), check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"dmzbroker: error: {path}:{line_of(GOOD, 'group: 1,')}: signals[0].source: group 2: "
        "the broker reads the static groups 1, 3, 10, 20, 21, 30, 40 (events report points of "
        "these)"
    )


# `policy show`: what the signers read, from the compiled payload the broker runs

EXPIRES = (datetime.now(UTC) + timedelta(days=30)).isoformat()
DOCUMENT: dict[str, Any] = {
    "deployment_id": "show",
    "version": 1,
    "expires": EXPIRES,
    "devices": [
        {"name": "rtu", "protocol": "dnp3", "host": "10.0.0.7", "outstation_address": 10},
        {"name": "ahu", "protocol": "bacnet", "host": "10.0.0.8", "device_instance": 1234},
    ],
    "signals": [
        {"path": "site/well/pump/running", "device": "rtu", "source": {"group": 1, "index": 0}},
        {"path": "site/well/pump/state", "device": "rtu", "source": {"group": 3, "index": 2}},
        {"path": "site/well/pump/flow", "device": "rtu", "unit": "m3/h", "scale": 0.1,
         "source": {"group": 30, "index": 3, "variation": 2}},
        {"path": "site/well/pump/starts", "device": "rtu",
         "source": {"group": 20, "index": 0, "variation": 5}},
        {"path": "site/room/ahu/supply", "device": "ahu", "unit": "°C",
         "source": {"object_type": "analog-input", "instance": 1}},
        {"path": "site/room/ahu/fan", "device": "ahu",
         "source": {"object_type": "binary-output", "instance": 2}},
        {"path": "site/room/ahu/supply_name", "device": "ahu",
         "source": {"object_type": "analog-input", "instance": 1, "property": "object-name"}},
    ],
}  # fmt: skip


def shown(document: dict[str, Any]) -> list[str]:
    """`policy show`'s lines for the compiled and reloaded payload, as the signers see them."""
    accepted = parse.from_payload(msgspec.json.encode(document), "policy.yaml")
    payload = envelopes.compile_policy(accepted).untrusted_payload
    signed = parse.from_payload(payload, "policy.dsse.json")
    assert signed == accepted  # what is signed is what was written
    text = report.show(signed, "0" * 64, datetime.now(UTC), requests_per_scan(signed))
    return text.splitlines()


def with_device(index: int, **keys: object) -> dict[str, Any]:
    document = copy.deepcopy(DOCUMENT)
    document["devices"][index].update(keys)
    if keys.get("read") == "events":  # class polls choose their variations
        for signal in document["signals"]:
            signal["source"].pop("variation", None)
    return document


def test_policy_show_describes_the_dnp3_and_bacnet_devices_and_their_signals() -> None:
    lines = shown(DOCUMENT)

    assert (
        "  rtu: dnp3 10.0.0.7:20000 master 1 → outstation 10, static reads of the named points, "
        "every 1 s, timeout 2 s"
    ) in lines
    assert (
        "  ahu: bacnet 10.0.0.8:47808 device 1234, poll, every 1 s, timeout 3 s, "
        "at most 20 requests/s"
    ) in lines
    for line in [
        "  site/well/pump/running ← rtu g1v0 index 0 bool",
        "  site/well/pump/state ← rtu g3v0 index 2 string",
        "  site/well/pump/flow [m3/h] ← rtu g30v2 index 3 int16 ×0.1",
        "  site/well/pump/starts ← rtu g20v5 index 0 uint32",
        "  site/room/ahu/supply [°C] ← ahu analog-input,1 present-value float32",
        "  site/room/ahu/fan ← ahu binary-output,2 present-value bool",
        "  site/room/ahu/supply_name ← ahu analog-input,1 object-name variant",
    ]:
        assert line in lines


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        ({"read": "events"},
         "  rtu: dnp3 10.0.0.7:20000 master 1 → outstation 10, events of class 1, 2, 3 "
         "confirmed (consumed for master 1), integrity poll every 3600 s, unsolicited ignored, every 1 s, timeout 2 s"),
        ({"read": "events", "event_classes": [3, 1], "integrity_interval_s": 600,
          "unsolicited": True, "master_address": 3, "port": 20001, "poll_interval_s": 5},
         "  rtu: dnp3 10.0.0.7:20001 master 3 → outstation 10, events of class 1, 3 "
         "confirmed (consumed for master 3), integrity poll every 600 s, unsolicited accepted, every 5 s, timeout 2 s"),
    ],
)  # fmt: skip
def test_policy_show_says_what_a_dnp3_device_read_by_events_polls(
    keys: dict[str, Any], line: str
) -> None:
    assert line in shown(with_device(0, **keys))


def test_policy_show_says_a_bacnet_cov_device_subscribes_on_the_device() -> None:
    lines = shown(with_device(1, read="cov", port=47809, max_requests_per_s=2.5))

    assert (
        "  ahu: bacnet 10.0.0.8:47809 device 1234, cov (SubscribeCOV: subscribes on the "
        "device), every 1 s, timeout 3 s, at most 2.5 requests/s"
    ) in lines


CHANGES: list[tuple[int, str, object]] = [
    # (device, key, another valid value): each changes what runs, so what is shown
    (0, "host", "10.0.0.9"), (0, "port", 20001), (0, "outstation_address", 11),
    (0, "master_address", 2), (0, "read", "events"), (0, "poll_interval_s", 1.0000001),
    (0, "timeout_s", 2.5),
    (1, "host", "10.0.0.9"), (1, "port", 47809), (1, "device_instance", 1235),
    (1, "read", "cov"), (1, "poll_interval_s", 2), (1, "timeout_s", 4),
    (1, "max_requests_per_s", 20.000001),
]  # fmt: skip
EVENT_CHANGES: list[tuple[str, object]] = [
    ("event_classes", [2]), ("integrity_interval_s", 60), ("unsolicited", True),
]  # fmt: skip
SOURCE_CHANGES: list[tuple[int, str, object]] = [
    (2, "group", 40), (2, "index", 4), (2, "variation", 1),
    (4, "object_type", "analog-value"), (4, "instance", 2), (4, "property", "units"),
]  # fmt: skip


@pytest.mark.parametrize(("device", "key", "value"), CHANGES)
def test_every_device_key_changes_what_policy_show_prints(
    device: int, key: str, value: object
) -> None:
    assert shown(DOCUMENT) != shown(with_device(device, **{key: value}))


@pytest.mark.parametrize(("key", "value"), EVENT_CHANGES)
def test_every_event_key_changes_what_policy_show_prints(key: str, value: object) -> None:
    assert shown(with_device(0, read="events")) != shown(
        with_device(0, read="events", **{key: value})
    )


@pytest.mark.parametrize(("signal", "key", "value"), SOURCE_CHANGES)
def test_every_source_key_changes_what_policy_show_prints(
    signal: int, key: str, value: object
) -> None:
    document = copy.deepcopy(DOCUMENT)
    document["signals"][signal]["source"][key] = value

    assert shown(DOCUMENT) != shown(document)


def test_every_dnp3_variation_the_schema_accepts_has_a_shown_type() -> None:
    # A variation of the outstation's choosing (0) keeps whatever type arrives ("variant");
    # a named one says its type, so that the signers see what is published.
    for group, variations in DNP3_VARIATIONS.items():
        for variation in variations:
            kind = Dnp3Source(group=group, index=0, variation=variation).type
            assert kind != "variant" or (variation == 0 and group in (30, 40)), (group, variation)
