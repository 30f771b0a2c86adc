"""The OPC UA server's address space: the policy's semantic model as nodes, and records as
their values (docs/opcua-server.md).

Each asset path segment is an object under Objects (site → area → asset, as the policy's
paths nest them); each approved signal is a variable under its asset, NodeId
`ns=<urn:dmzbroker:DEPLOYMENT>;s=<signal path>`, with its Description, the properties
EngineeringUnits (EUInformation, UNECE code where the unit has one) and EURange, and the
context of its latest record as properties State, Assessment and ActiveAlerts. A record's
quality becomes the value's StatusCode; its source_time and broker_time the Source- and
ServerTimestamp.

This module also answers which signals make a node visible (`signals_of`): the session
guard shows a client a node only if its identity is granted one of them. It never gives a
client's request a way to change a node: every node is made here, by the server's own
session, with read-only access levels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import cast

from asyncua import ua
from asyncua.common.manage_nodes import delete_nodes
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from broker.policy import Policy
from broker.policy.schema import Signal
from broker.records import Quality, Record

NAMESPACE = "urn:dmzbroker:{deployment}"
PROPERTIES = ("State", "Assessment", "ActiveAlerts")  # a record's context, per variable
UNITS_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"
CHUNK = 200  # values written between yields (about 2 ms)
BUILD_CHUNK = 16  # nodes made or removed between yields (about 20 ms)
STATUS: dict[Quality, int] = {
    "good": StatusCodes.Good,
    "uncertain": StatusCodes.Uncertain,
    "stale": StatusCodes.UncertainLastUsableValue,
    "bad": StatusCodes.Bad,
}
# UNECE Recommendation 20 codes of the units policies use most (OPC UA Part 8, EUInformation)
UNECE = {
    "degC": "CEL", "K": "KEL", "degF": "FAH", "bar": "BAR", "Pa": "PAL", "kPa": "KPA",
    "MPa": "MPA", "%": "P1", "A": "AMP", "V": "VLT", "W": "WTT", "kW": "KWT", "kWh": "KWH",
    "Hz": "HTZ", "s": "SEC", "min": "MIN", "h": "HUR", "rpm": "RPM", "m3/h": "MQH", "l/s": "G51",
}  # fmt: skip


def status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def unit_id(code: str) -> int:
    """The UnitId OPC UA derives from a UNECE code: its letters as big-endian bytes."""
    return int.from_bytes(code.encode("ascii"), "big")


def variant_type(signal: Signal) -> ua.VariantType:
    kind = getattr(signal.source, "type", "float64")  # a derived signal is a number
    if kind == "bool":
        return ua.VariantType.Boolean
    if kind == "string":
        return ua.VariantType.String
    return ua.VariantType.Double  # scale and offset make any number a real one


class AddressSpace:
    """The nodes of one policy in a running asyncua server, and which signals each shows."""

    def __init__(self, server: Server, namespace: int) -> None:
        self._server = server
        self._ns = namespace
        self._signals: dict[str, Signal] = {}  # the variables in the space, by path
        self._objects: dict[str, frozenset[str]] = {}  # asset path prefix → signals below
        self._visible: dict[ua.NodeId, frozenset[str]] = {}  # node → the signals it shows
        self._context: dict[str, tuple[str, str, list[str]]] = {}  # what properties hold

    def node_id(self, path: str, part: str = "") -> ua.NodeId:
        return ua.NodeId(ua.String(f"{path}.{part}" if part else path), ua.Int16(self._ns))

    def signals_of(self, node: ua.NodeId) -> frozenset[str] | None:
        """The signals that make `node` visible; None for a node outside the model (the
        standard Server object and types, which every client may read); none for a node
        that does not exist, so that it is answered as one not granted is."""
        if node.NamespaceIndex != self._ns:
            return None if node in self._server.iserver.aspace else frozenset()
        return self._visible.get(node, frozenset())

    def has(self, signal: str) -> bool:
        return signal in self._signals

    async def use_policy(self, policy: Policy) -> None:
        """Make the space the policy's model: nodes of signals gone or changed are removed,
        those new or changed are made, yielding every BUILD_CHUNK nodes."""
        wanted = {s.path: s for s in policy.signals if s.lifecycle == "approved"}
        gone = [p for p, s in self._signals.items() if wanted.get(p) != s]
        for i, path in enumerate(gone):
            signal = self._signals.pop(path)
            self._context.pop(path, None)
            await self._remove(path, [self.node_id(path, part) for part in _parts(signal)])
            await _pause(i + 1)
        objects = _objects_of(wanted.values())
        for path in sorted((p for p in self._objects if p not in objects), reverse=True):
            await self._remove(path, [])  # deepest first: its children are gone already
            await asyncio.sleep(0)
        made = 0
        for path in sorted(objects, key=lambda p: p.count("/")):
            if path not in self._objects:
                parent = path.rpartition("/")[0]
                where = (
                    self.node_id(parent) if parent else ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder))
                )
                await self._server.get_node(where).add_object(
                    self.node_id(path), ua.QualifiedName(path.rpartition("/")[2], self._ns)
                )
                made += 1
            made = await _pause(made)
        self._objects = objects
        for path, signal in wanted.items():
            if path not in self._signals:
                await self._add_variable(signal)
                self._signals[path] = signal
                made = await _pause(made + 1)
        visible = {self.node_id(p): s for p, s in objects.items()}
        for path, signal in self._signals.items():
            only = frozenset((path,))
            visible[self.node_id(path)] = only
            for part in _parts(signal):
                visible[self.node_id(path, part)] = only
        self._visible = visible

    async def _add_variable(self, signal: Signal) -> None:
        asset = self._server.get_node(self.node_id(signal.asset))
        kind = variant_type(signal)
        node = await asset.add_variable(
            self.node_id(signal.path), ua.QualifiedName(signal.measure, self._ns), ua.Variant(),
            datatype=ua.NodeId(ua.Int32(kind.value)),
        )  # fmt: skip
        # Into the server's own nodes, as every value is (never a service a client could send).
        waiting = status(StatusCodes.BadWaitingForInitialData)
        await self._server.write_attribute_value(node.nodeid, ua.DataValue(StatusCode=waiting))
        if signal.description:
            text = ua.Variant(ua.LocalizedText(signal.description))
            await self._server.write_attribute_value(
                node.nodeid, ua.DataValue(text), AttributeIds.Description
            )
        code = UNECE.get(signal.unit)
        units = ua.EUInformation(
            NamespaceUri=UNITS_NAMESPACE,
            UnitId=unit_id(code) if code else -1,
            DisplayName=ua.LocalizedText(signal.unit),
            Description=ua.LocalizedText(signal.unit),
        )
        await node.add_property(
            self.node_id(signal.path, "EngineeringUnits"),
            ua.QualifiedName("EngineeringUnits", 0),
            units,
        )
        if signal.range is not None:
            span = ua.Range(Low=signal.range.min, High=signal.range.max)
            await node.add_property(
                self.node_id(signal.path, "EURange"), ua.QualifiedName("EURange", 0), span
            )
        for name, (value, kind) in zip(
            PROPERTIES,
            (("", ua.VariantType.String), ("", ua.VariantType.String), ([], ua.VariantType.String)),
            strict=True,
        ):
            await node.add_property(
                self.node_id(signal.path, name), ua.QualifiedName(name, self._ns), value, kind
            )

    async def _remove(self, path: str, parts: list[ua.NodeId]) -> None:
        """Delete the node at `path` and its `parts` (properties). Only its parent refers to
        it: that one reference is removed, instead of asyncua's DeleteTargetReferences, which
        scans every node of the server for each node deleted (minutes for a thousand)."""
        parent_path = path.rpartition("/")[0]
        node = self.node_id(path)
        parent = self._server.get_node(
            self.node_id(parent_path)
            if parent_path
            else ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder))
        )
        for reference in await parent.get_references():
            if reference.NodeId == node and reference.IsForward:
                await parent.delete_reference(node, reference.ReferenceTypeId)
        nodes = [self._server.get_node(n) for n in (*parts, node)]
        await delete_nodes(self._server.iserver.isession, nodes, delete_target_references=False)

    async def write(self, record: Record) -> None:
        """The record as its variable's value, and its context as the properties (written
        only when they change: a notification per record, not four)."""
        signal = self._signals.get(record.signal)
        if signal is None:
            return  # a record of a signal this policy does not publish
        kind = variant_type(signal)
        value = record.value
        if value is not None and kind is ua.VariantType.Double:
            value = float(value)  # an int read from a register, of a Double variable
        variant = ua.Variant(value, kind) if value is not None else ua.Variant()
        await self._server.write_attribute_value(
            self.node_id(record.signal),
            ua.DataValue(
                variant,
                StatusCode=status(STATUS[record.quality]),
                SourceTimestamp=cast(ua.DateTime, record.source_time),
                ServerTimestamp=cast(ua.DateTime, record.broker_time),
            ),
        )
        context = record.context
        now = (
            context.asset_state,
            context.assessment.label if context.assessment is not None else "",
            [f"{a.severity} {a.rule}: {a.message}" for a in context.alerts],
        )
        if self._context.get(record.signal) == now:
            return
        self._context[record.signal] = now
        at = cast(ua.DateTime, record.source_time)
        for name, text in zip(PROPERTIES, now, strict=True):
            await self._server.write_attribute_value(
                self.node_id(record.signal, name),
                ua.DataValue(ua.Variant(text, ua.VariantType.String), SourceTimestamp=at),
            )


def _parts(signal: Signal) -> tuple[str, ...]:
    """The property nodes of a signal's variable."""
    return ("EngineeringUnits", *(("EURange",) if signal.range else ()), *PROPERTIES)


def _objects_of(signals: Iterable[Signal]) -> dict[str, frozenset[str]]:
    """Every asset path prefix (site, site/area, ...) → the signals below it."""
    below: dict[str, set[str]] = {}
    for signal in signals:
        parts = signal.asset.split("/")
        for depth in range(1, len(parts) + 1):
            below.setdefault("/".join(parts[:depth]), set()).add(signal.path)
    return {path: frozenset(signals) for path, signals in below.items()}


async def _pause(made: int) -> int:
    if made and made % BUILD_CHUNK == 0:
        await asyncio.sleep(0)
    return made
