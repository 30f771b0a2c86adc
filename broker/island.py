"""Island mode: the plant operator's switch that stops all data crossing.

A flag file in the plant half's state directory, so it survives restarts until turned off
and is set from the plant side only. The plant half checks it several times a second.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec

from broker.errors import ConfigError

FLAG = "island"
CHECK_INTERVAL_S = 0.25  # data stops crossing well within one second of `island on`


class IslandFlag(msgspec.Struct, frozen=True):
    since: datetime
    reason: str


def is_on(state_dir: Path) -> bool:
    return (state_dir / FLAG).exists()


def turn_on(state_dir: Path, reason: str) -> bool:
    """Returns False if island mode was already on."""
    flag = state_dir / FLAG
    try:
        state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(flag, "xb") as f:
            f.write(msgspec.json.encode(IslandFlag(datetime.now(UTC), reason)))
    except FileExistsError:
        return False
    except OSError as e:
        raise ConfigError(f"{flag}: cannot set island mode: {e.strerror}") from e
    return True


def turn_off(state_dir: Path) -> bool:
    """Returns False if island mode was already off."""
    flag = state_dir / FLAG
    try:
        flag.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ConfigError(f"{flag}: cannot clear island mode: {e.strerror}") from e
    return True
