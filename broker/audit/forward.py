"""Log events that are audit events (the catalogue) also go into the audit log.

A structlog processor: call sites log as usual, and the audit log cannot miss an event that
the catalogue names. Each entry is bounded in size (broker.audit.bound), a value that became
the entry's actor or object is not repeated in its details, and events a source can repeat at
will (outsiders' on the IT side, a device's on the plant side) are throttled by source
(broker.audit.throttle): one counted instead of written is dropped from the process log too,
and the count reaches both logs as `events_suppressed` once per interval — written by
`flush()`, which the audit log calls from `check()` and before its closing checkpoint.

It never raises into the caller; a failing audit log is reported by the log's own `failing`
flag, which closes the data path.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import msgspec
import structlog

from broker.audit.bound import INSIDER, OUTSIDER, SUMMARY, bound_entry
from broker.audit.catalogue import (
    ACTOR_FIELDS,
    ADDRESS_FIELDS,
    AGGREGATED,
    DEVICE_AGGREGATED,
    DEVICE_FIELDS,
    EVENTS,
    IDENTITY_FIELDS,
    NOT_DETAILS,
    OBJECT_FIELDS,
    SUPPRESSED,
    TRUST_REASONS,
    VERSION_FIELDS,
)
from broker.audit.log import AuditLog
from broker.audit.monitor import AuditMonitor
from broker.audit.throttle import Kind, Throttle

log = structlog.get_logger("audit")


class AuditForwarder:
    def __init__(self, audit: AuditLog, throttle: Throttle | None = None) -> None:
        self._audit = audit
        self._throttle = throttle or Throttle()
        audit.held_back = self

    @property
    def suppressed(self) -> Mapping[str, int]:
        return self._throttle.suppressed

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        kind = EVENTS.get(event) if isinstance(event, str) else None
        if kind is None:
            return event_dict
        assert isinstance(event, str)
        outsider = event in AGGREGATED
        if outsider or event in DEVICE_AGGREGATED:
            self.flush()  # an interval that ended since the last check() is summed up first
            source, budget = _source(event_dict, device=not outsider)
            trust = budget is Kind.IDENTITY and event_dict.get("reason") in TRUST_REASONS
            if not self._throttle.admit(
                event, source, budget, reserved=self._reserved(), trust=trust
            ):
                raise structlog.DropEvent
        actor_field = _first_field(event_dict, ACTOR_FIELDS)
        object_field = _first_field(event_dict, OBJECT_FIELDS)
        once = NOT_DETAILS | {actor_field, object_field}
        details = msgspec.to_builtins(
            {k: v for k, v in event_dict.items() if k not in once}, enc_hook=str
        )
        actor, object, details = bound_entry(
            _text(event_dict.get(actor_field)) if actor_field else None,
            _text(event_dict.get(object_field)) if object_field else None,
            details,
            OUTSIDER if outsider else INSIDER,
        )
        version = _first(event_dict, VERSION_FIELDS)
        self._audit.record(
            event,
            category=kind[0],
            outcome=kind[1],
            actor=actor,
            object=object,
            policy_version=version if isinstance(version, int) else None,
            details=details,
        )
        return event_dict

    def flush(self, *, final: bool = False) -> None:
        """Write the interval's `events_suppressed` entry if it is due (`final`: now)."""
        summary = self._throttle.summary(reserved=self._reserved(), final=final)
        if summary is None:
            return
        _, _, details = bound_entry(None, None, summary, SUMMARY)
        self._audit.record(SUPPRESSED, category="audit", outcome="unknown", details=details)
        log.warning(SUPPRESSED, **summary)  # not in the catalogue: recorded once, just above

    def _reserved(self) -> bool:
        """Past the capacity warning, the rest of the log is kept for security events."""
        return self._audit.usage >= AuditMonitor.CAPACITY_WARNING


def _source(event_dict: MutableMapping[str, Any], *, device: bool) -> tuple[str, Kind]:
    """Who caused a repeatable event, and so which budget it draws on."""
    if device:
        return _text(_first(event_dict, DEVICE_FIELDS)) or "unknown", Kind.DEVICE
    for name in IDENTITY_FIELDS:
        if event_dict.get(name):  # a certificate of the site CA: an identity, else its serial
            prefix = "" if name == IDENTITY_FIELDS[0] else f"{name}:"
            return prefix + str(event_dict[name]), Kind.IDENTITY
    return _text(_first(event_dict, ADDRESS_FIELDS)) or "unknown", Kind.ADDRESS


def _first_field(event_dict: MutableMapping[str, Any], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if event_dict.get(n) is not None), None)


def _first(event_dict: MutableMapping[str, Any], names: tuple[str, ...]) -> object:
    name = _first_field(event_dict, names)
    return None if name is None else event_dict[name]


def _text(value: object) -> str | None:
    return None if value is None else str(value)
