"""Structured logging for every process: JSON in production, readable on a terminal.

Third-party libraries log through the standard library; their lines get the same format.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from broker.audit.forward import AuditForwarder
from broker.audit.log import AuditLog


def configure(
    fmt: Literal["auto", "json", "console"], process: str, audit: AuditLog | None = None
) -> None:
    """Set up logging for this process; with `audit`, catalogue events also go there."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    forward: list[structlog.typing.Processor] = [AuditForwarder(audit)] if audit else []
    structlog.configure(
        processors=[*shared, *forward, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    final: list[structlog.typing.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if as_json:  # the console renderer formats exceptions itself
        final.append(structlog.processors.format_exc_info)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[*final, renderer])
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # pymodbus logs each failed connect at ERROR; our connector reports those as events.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # asyncua logs every request at INFO and each lost session at ERROR; ours are events.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    logging.getLogger("casbin").setLevel(logging.WARNING)  # it logs its model at INFO
    structlog.contextvars.bind_contextvars(process=process)
