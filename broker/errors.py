"""The errors dmzbroker raises on purpose, and how the CLI reports them.

    DmzBrokerError           one line for the user, never a traceback
    ├── ConfigError          a config or policy file is wrong: names the file and the key path
    │   ├── PolicyRefused    a policy is not signed, not trusted, expired, or rolled back
    │   └── TrustRootRefused a trust root is not signed by its owners, or may not replace
    │                        the one in force (rollback, swapped, not signed by the current)
    ├── TrustError           certificates, keys or TLS material are missing or unusable
    ├── ChannelError         the one-way spool cannot be written or read
    └── DeviceError          a plant device failed to answer or answered with an error

Hostile or mistaken input becomes one of these. Programming mistakes stay `RuntimeError`,
`TypeError` and friends, so that they are not mistaken for a user's fault. The tree is
shallow on purpose: callers catch `DmzBrokerError` at the boundary and pick by type only
where the reaction differs (exit code 2 for configuration and trust problems).
"""


class DmzBrokerError(Exception):
    """Base of every error dmzbroker reports to a user."""

    exit_code = 1


class ConfigError(DmzBrokerError):
    """A configuration or policy file is invalid; the message names file and key path."""

    exit_code = 2


class PolicyRefused(ConfigError):
    """A policy that must not take effect; `reason` is a short code for audit and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrustRootRefused(ConfigError):
    """A trust root that must not take effect; `reason` is a short code for audit and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrustError(DmzBrokerError):
    """Certificate, key or TLS material is missing, malformed or does not match."""

    exit_code = 2


class ChannelError(DmzBrokerError):
    """The spool between the halves cannot be written or read."""


class DeviceError(DmzBrokerError):
    """A plant device did not answer, or answered with a protocol error."""
