"""Output registry: each way out of the enterprise half, built where the config asks for it.

One line per output (docs/specs/output.md): the `enterprise` config section that asks for it
(None: always built) and its module, whose `configured` function takes the half's
`OutputContext` and returns the output, or None when the appliance config leaves it out.
A module is imported only where its section is set: its library (aiomqtt, asyncua, psycopg)
is memory the half would otherwise hold for an output nobody asked for (ADR 0029).
"""

import importlib
from collections.abc import Callable

from broker.enterprise.outputs.base import Output, OutputContext, run_contained

REGISTRY: tuple[tuple[str | None, str], ...] = (
    (None, "https"),
    ("mqtt", "mqtt"),
    ("opcua", "opcua"),
    ("postgres", "postgres"),
)


def outputs_for(context: OutputContext) -> list[Output]:
    """The outputs the appliance config asks for, in registry order (the order they start)."""
    outputs = []
    for section, module in REGISTRY:
        if section is not None and getattr(context.config.enterprise, section) is None:
            continue
        build: Callable[[OutputContext], Output | None] = importlib.import_module(
            f"{__name__}.{module}"
        ).configured
        if (output := build(context)) is not None:
            outputs.append(output)
    return outputs


__all__ = ["REGISTRY", "Output", "OutputContext", "outputs_for", "run_contained"]
