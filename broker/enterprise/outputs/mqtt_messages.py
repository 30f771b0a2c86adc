"""The MQTT sink's messages: a round's records grouped per asset and cut into (topic,
payload) messages bounded by count and bytes, newest last (docs/api.md#mqtt)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import structlog

from broker.records import Record, to_json

RECORDS_PER_MESSAGE = 100
# A PUBLISH's bytes besides its topic and payload: fixed header (1), remaining length (<= 4),
# topic length (2), packet id (2), properties length (1; the sink sends no properties).
PUBLISH_OVERHEAD = 10

log = structlog.get_logger("mqtt_sink")  # the sink's logger (mqtt.py says why not "mqtt")


def by_asset(records: Iterable[Record]) -> dict[str, list[Record]]:
    """The records grouped per asset path, each group in order."""
    groups: defaultdict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.signal.rpartition("/")[0]].append(record)
    return groups


def messages(
    prefix: str, groups: dict[str, list[Record]], most_bytes: int, refused: list[Record]
) -> Iterator[tuple[str, bytes]]:
    """Each group's (topic, payload) messages, in order, of up to RECORDS_PER_MESSAGE records
    and `most_bytes` a PUBLISH, cut from the newest end: the last, which the broker retains,
    holds the newest records (a whole scan of an asset, where one fits). A record that alone
    is larger is refused: logged and appended to `refused`, never sent (the broker would
    refuse it at every try). A group is taken out of `groups` as it is encoded: a batch of
    many records never holds all of them decoded and all of their JSON at once."""
    for asset in list(groups):
        group = groups.pop(asset)
        topic = f"{prefix}/{asset}"
        room = most_bytes - PUBLISH_OVERHEAD - len(topic.encode())
        for part in _newest_last(group, RECORDS_PER_MESSAGE):
            for payload in _payloads(part, room, refused):
                yield topic, payload


def _newest_last(records: list[Record], size: int) -> Iterator[list[Record]]:
    """`records` in slices of `size`, in order, the first holding the remainder."""
    first = len(records) % size or size
    yield records[:first]
    for start in range(first, len(records), size):
        yield records[start : start + size]


def _payloads(records: list[Record], room: int, refused: list[Record]) -> Iterator[bytes]:
    """`records` as JSON payloads of at most `room` bytes, in order, the last the fullest."""
    payload = to_json(records)
    if len(payload) <= room:
        yield payload
    elif len(records) == 1:
        refused.append(records[0])
        log.error(
            "mqtt_record_too_large", signal=records[0].signal, seq=records[0].seq,
            bytes=len(payload), most_bytes=room,
        )  # fmt: skip
    else:  # records are of a size: cut where they would fit, each slice checked again
        size = max(1, len(records) * room // len(payload))
        for part in _newest_last(records, size):
            yield from _payloads(part, room, refused)
