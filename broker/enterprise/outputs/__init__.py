"""Output registry: each way out of the enterprise half, built where the config asks for it.

One line per output (docs/specs/output.md): a function that takes the half's
`OutputContext` and returns the output, or None when the appliance config leaves it out.
"""

from collections.abc import Callable

from broker.enterprise.outputs import https, mqtt, opcua, postgres
from broker.enterprise.outputs.base import Output, OutputContext, run_contained

REGISTRY: tuple[Callable[[OutputContext], Output | None], ...] = (
    https.configured,
    mqtt.configured,
    opcua.configured,
    postgres.configured,
)


def outputs_for(context: OutputContext) -> list[Output]:
    """The outputs the appliance config asks for, in registry order (the order they start)."""
    return [output for build in REGISTRY if (output := build(context)) is not None]


__all__ = ["REGISTRY", "Output", "OutputContext", "outputs_for", "run_contained"]
