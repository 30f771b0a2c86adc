"""Command groups of the CLI; a new group is one module here and one line in this list."""

from broker.commands import (
    audit,
    certs,
    deploy,
    diode,
    discover,
    island,
    keys,
    plan,
    policy,
    posture,
    processes,
    sim,
    trust,
    validate,
)

COMMAND_GROUPS = [
    processes,
    certs,
    keys,
    trust,
    policy,
    island,
    audit,
    plan,
    discover,
    validate,
    deploy,
    posture,
    diode,
    sim,
]
