"""How `discover pcap` shows what a capture holds: addresses (as themselves, or `--redact`
pseudonyms) and text a device or a frame supplied (BACnet names, units, the readers' words).

Capture text is hostile until cleaned: `one_line` is the only way it reaches the draft's YAML,
the summary table or the JSON. It strips every control and format character (C0, C1, bidi
overrides and isolates, zero-width joiners) and line and paragraph separators, so a device
cannot start a new YAML line, move a terminal's cursor, or make a draft read differently
from what it holds.
"""

from __future__ import annotations

import re
import unicodedata

from broker.passive.observations import Peer

MAX_TEXT = 160  # characters of capture text kept in one comment, description or JSON string
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})  # unicodedata categories
_SPACES = re.compile(r"\s{2,}")
_ADDRESS = re.compile(  # IPv6 (an IPv4-mapped tail too), else IPv4 (a port may follow)
    r"(?<![\w:.])(?:[0-9a-fA-F]{0,4}:){2,7}(?:[0-9a-fA-F]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:.])"
    r"|(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"
)  # a false match (a time written 12:30:45) only hides more than asked


def one_line(text: str) -> str:
    """Capture text fit for a comment, a YAML value or a terminal: one line of printable
    characters, bounded."""
    shown = "".join(" " if unicodedata.category(c) in _HIDDEN else c for c in text)
    cleaned = _SPACES.sub(" ", shown).strip()
    return cleaned if len(cleaned) <= MAX_TEXT else cleaned[: MAX_TEXT - 1] + "…"


def seconds(value: float) -> str:
    """An interval as the comments show it: 1.0, 0.5, 2.25."""
    shown = f"{value:.3g}"
    return shown if "." in shown or "e" in shown else shown + ".0"


class Hosts:
    """How an address is shown: as itself, or (--redact) as `host-N`, numbered in the order
    first asked for within the run. A pseudonym, not a hash: trying addresses finds nothing."""

    def __init__(self, redact: bool) -> None:
        self.redact = redact
        self._names: dict[str, str] = {}

    def __call__(self, host: str) -> str:
        if not self.redact:
            return host
        return self._names.setdefault(host, f"host-{len(self._names) + 1}")

    def peer(self, peer: Peer) -> str:
        return str(Peer(self(peer.host), peer.port))

    def text(self, text: str) -> str:
        """`text` with every IPv4 and IPv6 address in it shown as `__call__` shows it."""
        return _ADDRESS.sub(lambda m: self(m.group()), text) if self.redact else text
