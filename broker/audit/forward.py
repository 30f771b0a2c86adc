"""Log events that are audit events (the catalogue) also go into the audit log.

A structlog processor: call sites log as usual, and the audit log cannot miss an event that
the catalogue names. It never raises into the caller; a failing audit log is reported by
the log's own `failing` flag, which closes the data path.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import msgspec

from broker.audit.catalogue import ACTOR_FIELDS, EVENTS, NOT_DETAILS, OBJECT_FIELDS, VERSION_FIELDS
from broker.audit.log import AuditLog


class AuditForwarder:
    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        kind = EVENTS.get(event) if isinstance(event, str) else None
        if kind is not None:
            assert isinstance(event, str)
            details = msgspec.to_builtins(
                {k: v for k, v in event_dict.items() if k not in NOT_DETAILS}, enc_hook=str
            )
            version = _first(event_dict, VERSION_FIELDS)
            self._audit.record(
                event,
                category=kind[0],
                outcome=kind[1],
                actor=_text(_first(event_dict, ACTOR_FIELDS)),
                object=_text(_first(event_dict, OBJECT_FIELDS)),
                policy_version=version if isinstance(version, int) else None,
                details=details,
            )
        return event_dict


def _first(event_dict: MutableMapping[str, Any], names: tuple[str, ...]) -> object:
    return next((event_dict[n] for n in names if event_dict.get(n) is not None), None)


def _text(value: object) -> str | None:
    return None if value is None else str(value)
