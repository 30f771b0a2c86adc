"""Error classes carry their exit codes; the CLI turns them into one line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import (
    ChannelError,
    ConfigError,
    DeviceError,
    DmzBrokerError,
    PolicyRefused,
    TrustError,
)
from tests.harness import dmzbroker


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (TrustError("x"), 2),
        (PolicyRefused("expired", "x"), 2),
        (ChannelError("x"), 1),
        (DeviceError("x"), 1),
        (DmzBrokerError("x"), 1),
    ],
)
def test_exit_codes(error: DmzBrokerError, code: int) -> None:
    assert error.exit_code == code


@pytest.mark.parametrize(
    "kind", [ConfigError, PolicyRefused, TrustError, ChannelError, DeviceError]
)
def test_every_error_is_a_dmzbroker_error(kind: type[DmzBrokerError]) -> None:
    assert issubclass(kind, DmzBrokerError)


@pytest.mark.parametrize("kind", [TrustError, ChannelError, DeviceError])
def test_other_errors_are_not_config_errors(kind: type[DmzBrokerError]) -> None:
    assert not issubclass(kind, ConfigError)


def test_policy_refused_keeps_its_reason_and_message() -> None:
    error = PolicyRefused("rolled_back", "policy.dsse.json: version 3 is older than 5")
    assert error.reason == "rolled_back"
    assert str(error) == "policy.dsse.json: version 3 is older than 5"


def test_policy_refused_is_caught_as_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        raise PolicyRefused("unsigned", "policy.dsse.json: not signed")
    assert isinstance(caught.value, PolicyRefused)
    assert caught.value.reason == "unsigned"


def test_a_missing_config_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    missing = tmp_path / "broker.yaml"
    result = dmzbroker("run", "--config", str(missing), check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("dmzbroker: error: ")]
    assert errors == [f"dmzbroker: error: {missing}: file not found"]
    assert lines[-1] == errors[0]
