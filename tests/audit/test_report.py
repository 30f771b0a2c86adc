"""`dmzbroker audit report`: the page a security team reads, rendered by headless Chromium with
JavaScript off, from logs written by real AuditLog writers through the real forwarder (the
call sites' event fields, the throttle's summaries) and a real policy reload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from structlog.testing import capture_logs

from broker import policy
from broker.audit import report as report_page
from broker.audit.forward import AuditForwarder
from broker.audit.log import AuditLog
from broker.policy import report as policy_report
from broker.policy.access import Access
from broker.policy.watch import CHECK_INTERVAL_S, PolicyWatcher
from broker.trust import keys
from tests.audit.support import segments
from tests.harness import (
    ENERGY_URI,
    STRANGER_URI,
    Owners,
    accepted_first_policy,
    demo_policy,
    dmzbroker,
    eventually,
    sign_policy,
    write_policy_yaml,
)

pytestmark = pytest.mark.timeout(180)

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT_PATH = '/v1/signals/<script>alert("x")</script>'
IMG_PATH = '/v1/signals/"><img src=x onerror=alert(1)>'
NEW_CONSUMER = "spiffe://demo/consumer/new-dashboard"
SIGNERS = ["ot:Olga OT:0123456789abcdef", "it:Ivan IT:fedcba9876543210"]
# The tags the report may hold (and those Chromium adds when it parses a table).
TAGS = {
    *[
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "h3",
        "p",
        "code",
        "table",
        "tbody",
        "tr",
        "th",
        "td",
        "ul",
        "li",
    ],
    *["svg", "g", "text", "rect", "line", "circle"],
}


def emit(forwarder: AuditForwarder, event: str, **fields: Any) -> None:
    """What a call site's `log.warning(event, **fields)` does to the audit log."""
    with contextlib.suppress(structlog.DropEvent):  # counted into events_suppressed instead
        forwarder(None, "warning", {"event": event, **fields})


def widened_policy(port: int) -> dict[str, Any]:
    """The demo policy, version 2, with one more consumer who sees the energy signals."""
    document = demo_policy(port, version=2)
    document["consumers"].append({"identity": NEW_CONSUMER, "roles": ["energy"]})
    return document


@pytest.fixture
def audit_dir(tmp_path: Path, owners: Owners) -> Path:
    """Two writers' logs with every kind of entry the report gathers, hostile strings too."""
    root = tmp_path / "audit"
    key = keys.load_private(owners.audit_key, passphrase=None)
    old = policy.load(write_policy_yaml(tmp_path, demo_policy(5020), "v1"))
    new = policy.load(write_policy_yaml(tmp_path, widened_policy(5020), "v2"))
    for writer in ("plant", "enterprise"):
        log = AuditLog(root, writer, "coldstore-demo", key)
        forwarder = AuditForwarder(log)
        try:
            emit(forwarder, "policy_accepted", version=1, sha256="a" * 64, signers=SIGNERS)
            emit(forwarder, "island_mode_on", noticed_by=writer)
            emit(forwarder, "island_mode_off", noticed_by=writer)
            emit(
                forwarder,
                "policy_accepted",
                version=2,
                sha256="b" * 64,
                signers=SIGNERS,
                previous_version=1,
                widened=policy_report.widening(old, new),
            )
            if writer == "plant":
                emit(forwarder, "point_denied", signal="coldstore/secret", reason="not in policy")
                continue
            for path in [SCRIPT_PATH] * 3 + [IMG_PATH] * 25:  # past the throttle: summarised
                emit(forwarder, "consumer_denied", reason="not_allowed", identity=ENERGY_URI,
                     serial="1f", remote="127.0.0.1:40000", path=path)  # fmt: skip
            emit(forwarder, "consumer_denied", reason="unknown_identity", identity=STRANGER_URI,
                 serial="2a", remote="127.0.0.1:40001", path="/v1/signals")  # fmt: skip
            for reason in ("CERTIFICATE_VERIFY_FAILED",) * 3 + ("WRONG_VERSION_NUMBER",):
                emit(forwarder, "tls_handshake_failed", remote="127.0.0.2:5000", reason=reason,
                     detail="")  # fmt: skip
            emit(forwarder, "audit_write_failed", consequence="nothing crosses")
            emit(forwarder, "audit_write_recovered")
            forwarder.flush(final=True)
        finally:
            log.close()
    return root


def report(audit_dir: Path, out: Path, owners: Owners) -> str:
    pubkey = owners.audit_key.with_suffix(".pub")
    done = dmzbroker("audit", "report", str(audit_dir), "--html", str(out), "--pubkey", str(pubkey))
    assert f"report written to {out}" in done.stdout, done.stdout + done.stderr
    return out.read_text()


class Page(HTMLParser):
    """The rendered DOM: its tags, attributes, text, and the rows of its tables."""

    def __init__(self, dom: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.text: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes |= {name for name, _ in attrs}
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "li" and self._cell:  # list items in a cell: " | " between them
            self._cell.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> list[str]:
        (found,) = [r for r in self.rows if r and r[0] == first]
        return found


@contextlib.contextmanager
def chromium_profile(tmp_path: Path) -> Iterator[Path]:
    """A fresh profile whose content settings block JavaScript on every page.

    Chromium's `--blink-settings=scriptEnabled=false` also stops headless mode's own
    `--dump-dom` and `--screenshot` (they print and write nothing), so scripts are blocked the
    way a user blocks them: the profile's JavaScript content setting."""
    profile = tmp_path / "chromium-profile"
    (profile / "Default").mkdir(parents=True)
    settings = {"profile": {"default_content_setting_values": {"javascript": 2}}}
    (profile / "Default" / "Preferences").write_bytes(msgspec.json.encode(settings))
    try:
        yield profile
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def chromium(profile: Path, *args: str, timeout: float = 120) -> str:
    """Run headless Chromium once; its stdout. The whole process group goes on a timeout."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium, `make system-packages`)")
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, f"chromium exited with {process.returncode}"
    return out


def scanlines(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the (filtered) pixel rows of a non-interlaced 8-bit PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        chunk = png[position + 8 : position + 8 + length]
        header = chunk if kind == b"IHDR" else header
        idat += chunk if kind == b"IDAT" else b""
        position += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and interlace == 0, (depth, interlace)
    stride = 1 + width * {2: 3, 6: 4}[color]
    raw = zlib.decompress(idat)
    return width, height, [raw[i : i + stride] for i in range(0, len(raw), stride)]


def screenshot(profile: Path, page: Path, tmp_path: Path) -> bytes:
    shot = tmp_path / f"{page.stem}.png"
    chromium(profile, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    return shot.read_bytes()


def test_the_report_renders_offline_without_javascript_with_every_section(
    audit_dir: Path, tmp_path: Path, owners: Owners
) -> None:
    out = tmp_path / "report.html"
    html = report(audit_dir, out, owners)
    assert "http://" not in html and "https://" not in html  # nothing to fetch, no xmlns URL
    assert "<script" not in html and "<img" not in html

    with chromium_profile(tmp_path) as profile:
        canary = tmp_path / "canary.html"  # proves this Chromium runs no script
        canary.write_text('<p id="c">static</p><script>c.textContent = "ran"</script>')
        assert '<p id="c">static</p>' in chromium(profile, "--dump-dom", canary.as_uri())
        page = Page(chromium(profile, "--dump-dom", out.as_uri()))
        png = screenshot(profile, out, tmp_path)
        blank = tmp_path / "blank.html"
        blank.write_text("<!DOCTYPE html><html><body></body></html>")
        blank_png = screenshot(profile, blank, tmp_path)

    assert page.tags <= TAGS, page.tags - TAGS
    assert not {a for a in page.attributes if a.startswith("on") or a in ("src", "href")}
    text = "".join(page.text)
    pubkey = owners.audit_key.with_suffix(".pub")
    verified = dmzbroker("audit", "verify", str(audit_dir), "--pubkey", str(pubkey)).stdout
    for writer in ("plant", "enterprise"):
        assert f"  {writer}: {page.row(writer)[1]}\n" in verified  # as `audit verify` says it
        assert page.row(writer)[1].startswith("INTACT")
    assert "Checkpoint signatures and the key chain were checked" in text

    assert page.row("1")[3:] == ["a" * 64, " | ".join(SIGNERS), report_page.FIRST_ACCEPTED]
    widened = page.row("2")[5]
    assert NEW_CONSUMER in widened and "may now see coldstore/machine-room/" in widened
    assert page.row("2")[2] == "enterprise, plant"

    # 28 denials of ENERGY_URI: 10 written in full, the rest counted by the throttle.
    assert page.row(ENERGY_URI)[1:] == ["10", "18", "28"]
    assert page.row(STRANGER_URI)[1:] == ["1", "0", "1"]
    assert page.row(IMG_PATH)[1:] == ["consumer_denied", "7"]
    assert page.row(SCRIPT_PATH)[1:] == ["consumer_denied", "3"]
    assert page.row("coldstore/secret")[1:] == ["point_denied", "1"]
    assert page.row("CERTIFICATE_VERIFY_FAILED") == ["CERTIFICATE_VERIFY_FAILED", "3"]
    assert page.row("WRONG_VERSION_NUMBER") == ["WRONG_VERSION_NUMBER", "1"]
    island = [r for r in page.rows if r[:2] in (["island", "plant"], ["island", "enterprise"])]
    assert len(island) == 2 and all(r[2] < r[3] for r in island), island
    assert page.row("audit failure")[1] == "enterprise"
    assert page.row("consumer_denied") == ["consumer_denied", "18"]
    assert "no audit_chain_break entry in this log" in text

    width, height, rows = scanlines(png)
    assert (width, height) == (1280, 2000) and len(png) > 20_000
    assert len(set(rows)) > 200  # text, tables and charts: many different pixel rows
    assert len(set(scanlines(blank_png)[2])) < 10  # what a blank page gives


def test_hostile_strings_in_the_log_stay_text(
    audit_dir: Path, tmp_path: Path, owners: Owners
) -> None:
    html = report(audit_dir, tmp_path / "report.html", owners)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert SCRIPT_PATH not in html and IMG_PATH not in html


def test_a_tampered_log_is_reported_broken(audit_dir: Path, tmp_path: Path, owners: Owners) -> None:
    segment = segments(audit_dir / "enterprise")[0]
    segment.write_bytes(segment.read_bytes().replace(b"not_allowed", b"not_allowee", 1))
    page = Page(report(audit_dir, tmp_path / "report.html", owners))
    assert page.row("enterprise")[1].startswith("BROKEN at ")
    assert "edited" in page.row("enterprise")[1]
    assert page.row("plant")[1].startswith("INTACT")
    assert "Overall: BROKEN or UNPROVEN" in "".join(page.text)


def test_without_a_public_key_the_report_says_signatures_were_not_checked(
    audit_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    dmzbroker("audit", "report", str(audit_dir), "--html", str(out))
    assert "Checkpoint signatures were NOT checked (no --pubkey)" in out.read_text()


def test_a_directory_without_an_audit_log_is_a_clear_error(tmp_path: Path) -> None:
    done = dmzbroker("audit", "report", str(tmp_path), "--html", str(tmp_path / "r.html"),
                     check=False)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "no audit log here" in done.stderr
    assert not (tmp_path / "r.html").exists()


async def test_a_reload_logs_what_the_new_policy_widened(tmp_path: Path, owners: Owners) -> None:
    """The watcher's policy_accepted names what the reloaded policy newly lets cross."""
    signers = [owners.ot_key, owners.it_key]
    envelope, state, current = accepted_first_policy(tmp_path, owners)
    watcher = PolicyWatcher(envelope, owners.trust_root, state, current)
    updates = watcher.updates()
    with capture_logs() as logs:
        task = asyncio.ensure_future(anext(updates))
        try:
            os.replace(sign_policy(tmp_path, widened_policy(5020), signers, "v2"), envelope)
            await eventually(task.done, timeout=10 * CHECK_INTERVAL_S)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await updates.aclose()
    (accepted,) = [e for e in logs if e["event"] == "policy_accepted"]
    assert accepted["version"] == 2 and accepted["previous_version"] == 1
    energy = Access(current.policy).visible_to(ENERGY_URI)  # the role it was given
    assert energy and accepted["widened"] == [
        f"{NEW_CONSUMER} may now see {path}" for path in sorted(energy)
    ]
