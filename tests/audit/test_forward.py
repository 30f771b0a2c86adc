"""The forwarder: catalogue events reach the audit log bounded, outsider-caused ones
throttled, security events always in full, the summary written by `check()` and `close()`,
and nothing of an outsider's flood in the last 20 % of the capacity.

A real AuditLog on disk; the forwarder is called as structlog calls a processor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.forward import AuditForwarder
from broker.audit.log import AuditLog
from broker.audit.throttle import Limits, Throttle
from broker.audit.verify import verify_writer
from broker.metrics import EnterpriseMetrics
from tests.audit.support import read_log
from tests.audit.test_bound import PERCENT_01_PATH
from tests.harness import STRANGER_URI, dmzbroker

HANDSHAKE = "tls_handshake_failed"
SECURITY = (
    ("policy_accepted", {"version": 3, "sha256": "ab" * 32, "signers": ["ot:Olga:1", "it:Ivan:2"]}),
    ("island_mode_on", {"changed": True, "noticed_by": "plant"}),
    ("tls_reload_refused", {"path": "/etc/dmzbroker/server.crt", "error": "no key"}),
    ("audit_capacity_warning", {"used_pct": 81}),
    ("config_loaded", {"path": "/etc/dmzbroker/broker.yaml", "sha256": "cd" * 32}),
    ("process_stopped", {"pid": 7}),
)


def denied(i: int = 0, path: str = "/v1/signals/secret") -> dict[str, Any]:
    return {
        "event": "consumer_denied",
        "reason": "unknown_identity",
        "identity": STRANGER_URI,
        "serial": "5e" * 8,
        "fingerprint": "f0" * 32,
        "remote": f"127.0.0.{i % 250 + 1}",
        "path": path,
        "level": "warning",
        "timestamp": "2026-12-05T10:00:00Z",
    }


def handshake(i: int) -> dict[str, Any]:
    reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    return {"event": HANDSHAKE, "remote": f"10.1.{i // 250}.{i % 250}", "reason": reason}


def forward(forwarder: AuditForwarder, event_dict: dict[str, Any]) -> bool:
    """Pass one log event through; False when it was dropped (counted, not written)."""
    try:
        forwarder(None, "warning", dict(event_dict))
    except structlog.DropEvent:
        return False
    return True


def open_log(tmp_path: Path, key: Ed25519PrivateKey, **options: Any) -> AuditLog:
    return AuditLog(tmp_path, "enterprise", "site-1", key, **options)


def test_an_8kb_path_of_control_characters_makes_one_small_entry(tmp_path: Path) -> None:
    audit = open_log(tmp_path, Ed25519PrivateKey.generate())
    forward(AuditForwarder(audit), denied(path=PERCENT_01_PATH))
    audit.close()
    line = (tmp_path / "enterprise" / "0000000001.jsonl").read_bytes().splitlines()[1]  # 0: seal
    assert len(line) < 2048  # it was about 33 KB: the path twice, each byte as `\u0001`
    entry = json.loads(line)
    assert entry["actor"] == STRANGER_URI and entry["object"].endswith("…")
    assert "path" not in entry["details"] and "identity" not in entry["details"]  # stored once
    assert entry["details"]["truncated"]["object"]["bytes"] == len(PERCENT_01_PATH)


def test_a_flood_writes_the_first_few_and_one_summary_that_counts_the_rest(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    audit = open_log(tmp_path, key)
    forwarder = AuditForwarder(audit, Throttle(Limits(per_source=5, overall=20)))
    written = sum(forward(forwarder, denied(i)) for i in range(10_000))
    assert written == 5  # 250 addresses, but one identity: the source is who, if known
    handshakes = sum(forward(forwarder, handshake(i)) for i in range(1000))
    assert handshakes == 20  # 1,000 addresses: the addresses' overall cap of 20 is reached
    assert forwarder.suppressed == {"consumer_denied": 10_000 - 5, HANDSHAKE: 1000 - 20}
    audit.close()
    entries = read_log(tmp_path / "enterprise")
    assert sum(e["event"] == "consumer_denied" for e in entries) == 5
    assert sum(e["event"] == HANDSHAKE for e in entries) == 20
    (summary,) = [e for e in entries if e["event"] == "events_suppressed"]
    assert summary["category"] == "audit" and summary["outcome"] == "unknown"
    assert summary["details"]["suppressed"] == 10_000 - 5 + 1000 - 20
    assert summary["details"]["by_event"] == {"consumer_denied": 9995, HANDSHAKE: 980}
    by_source = summary["details"]["by_source"]
    assert {
        "event": "consumer_denied",
        "kind": "identity",
        "source": STRANGER_URI,
        "count": 10_000 - 5,
    } in by_source
    assert sum(s["kind"] == "address" for s in by_source) == 20  # the top 20 of 980 pairs
    assert summary["details"]["other_sources"] == {"address": {"pairs": 960, "count": 960}}
    assert entries[-1]["event"] == "audit_checkpoint"  # the summary is under the last one
    assert entries.index(summary) == len(entries) - 2
    assert verify_writer(tmp_path / "enterprise", key.public_key()).intact


def test_the_summary_is_written_by_check_when_its_interval_ends(tmp_path: Path) -> None:
    audit = open_log(tmp_path, Ed25519PrivateKey.generate())
    forwarder = AuditForwarder(audit, Throttle(Limits(per_source=1, interval_s=0.3)))
    for _ in range(5):
        forward(forwarder, denied())
    deadline = time.monotonic() + 10
    while not any(e["event"] == "events_suppressed" for e in read_log(tmp_path / "enterprise")):
        assert time.monotonic() < deadline, "no summary within 10 s"
        audit.check()  # what AuditMonitor does four times a second
        time.sleep(0.05)
    audit.close()
    summaries = [e for e in read_log(tmp_path / "enterprise") if e["event"] == "events_suppressed"]
    assert [s["details"]["suppressed"] for s in summaries] == [4]  # and none again at close


def test_security_events_are_never_throttled_even_during_a_flood(tmp_path: Path) -> None:
    audit = open_log(tmp_path, Ed25519PrivateKey.generate())
    forwarder = AuditForwarder(audit, Throttle(Limits(per_source=2, overall=2)))
    for round_ in range(50):
        for i in range(200):
            forward(forwarder, denied(i))
        for event, fields in SECURITY:
            assert forward(forwarder, {"event": event, **fields, "round": round_})
    audit.close()
    entries = read_log(tmp_path / "enterprise")
    for event, _ in SECURITY:
        assert sum(e["event"] == event for e in entries) == 50, event
    assert sum(e["event"] == "consumer_denied" for e in entries) == 2


def test_past_the_capacity_warning_outsider_events_are_only_counted(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    audit = open_log(tmp_path, key, capacity_bytes=200_000, segment_bytes=50_000)
    forwarder = AuditForwarder(audit, Throttle(Limits(per_source=1_000_000, overall=1_000_000)))
    i = 0
    while audit.usage < 0.8:  # an outsider fills the log up to the reserve, not beyond
        assert forward(forwarder, denied(i))
        i += 1
        assert i < 10_000
    before = audit.usage
    assert not any(forward(forwarder, denied(i)) for i in range(5000))
    assert audit.usage < before + 0.01  # the summaries only, once an hour
    for _ in range(20):  # security events still have the last 20 %
        for event, fields in SECURITY:
            assert forward(forwarder, {"event": event, **fields})
    assert not audit.failing
    audit.close()
    entries = read_log(tmp_path / "enterprise")
    assert sum(e["event"] == "policy_accepted" for e in entries) == 20
    (summary,) = [e for e in entries if e["event"] == "events_suppressed"]
    assert summary["details"]["capacity_reserve"] is True
    assert summary["details"]["suppressed"] == 5000
    assert verify_writer(tmp_path / "enterprise", key.public_key()).intact


def test_suppressed_counts_reach_the_metrics(tmp_path: Path) -> None:
    audit = open_log(tmp_path, Ed25519PrivateKey.generate())
    forwarder = AuditForwarder(audit, Throttle(Limits(per_source=3)))
    for _ in range(10):
        forward(forwarder, denied())
    metrics = EnterpriseMetrics(lambda: 0, lambda: False, audit_suppressed=lambda: audit.suppressed)
    text = metrics.exposition(tmp_path).decode()
    assert 'dmzbroker_audit_events_suppressed_total{event="consumer_denied"} 7.0' in text
    audit.close()


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "cef"])
def test_audit_show_lists_the_summary(tmp_path: Path, fmt: str) -> None:
    audit = open_log(tmp_path / "audit", Ed25519PrivateKey.generate())
    forwarder = AuditForwarder(audit, Throttle(Limits(per_source=1)))
    for _ in range(3):
        forward(forwarder, denied())
    audit.close()
    shown = dmzbroker(
        "audit", "show", str(tmp_path / "audit"), "--event", "events_suppressed", "--format", fmt
    ).stdout
    assert "events_suppressed" in shown
    if fmt == "json":
        assert json.loads(shown)["details"]["suppressed"] == 2


def test_failed_handshakes_from_many_addresses_cannot_hide_an_identity(tmp_path: Path) -> None:
    """The review's reproduction, default limits: 25 addresses x 20 failed handshakes used to
    spend the one overall budget; a stolen identity's refusals then went unwritten, and the
    summary named only the 20 largest sources. Revoked certificates likewise."""
    key = Ed25519PrivateKey.generate()
    audit = open_log(tmp_path, key)
    forwarder = AuditForwarder(audit)
    for i in range(25):
        for _ in range(20):
            forward(forwarder, handshake(i))
    stolen = {**denied(), "identity": "spiffe://site/historian", "reason": "forbidden_signal"}
    assert all(forward(forwarder, stolen) for _ in range(3))
    for i in range(25):  # then 25 identities spend the identities' own overall budget
        for _ in range(12):
            forward(forwarder, {**denied(), "identity": f"spiffe://site/c{i}"})
    revoked = {**denied(), "identity": "spiffe://site/lost-laptop", "reason": "revoked"}
    assert all(forward(forwarder, revoked) for _ in range(10))  # a trust matter: written
    assert not forward(forwarder, revoked)  # its own repeats are counted, not a flood
    no_uri = {**denied(), "identity": None, "serial": "7a" * 8, "reason": "no_uri_san"}
    assert forward(forwarder, no_uri)
    audit.close()
    entries = read_log(tmp_path / "enterprise")
    actors = [e["actor"] for e in entries if e["event"] == "consumer_denied"]
    assert actors.count("spiffe://site/historian") == 3
    assert actors.count("spiffe://site/lost-laptop") == 10
    (summary,) = [e["details"] for e in entries if e["event"] == "events_suppressed"]
    identities = {s["source"] for s in summary["by_source"] if s["kind"] == "identity"}
    assert identities == {f"spiffe://site/c{i}" for i in range(25)} | {"spiffe://site/lost-laptop"}
    assert "identity" not in summary["other_sources"]
    assert verify_writer(tmp_path / "enterprise", key.public_key()).intact


def plant_logger(forwarder: AuditForwarder, device: str) -> Any:
    """A logger as a connector has one: bound to its device, through the audit forwarder."""
    return structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            forwarder,
            structlog.processors.JSONRenderer(),
        ],
    ).bind(device=device)


def test_a_flapping_device_cannot_flood_the_plant_audit_log(tmp_path: Path) -> None:
    """From the plant review: 1,000 OPC UA items flipping Good/Bad over 10 publishes gave
    9,000 entries; a Modbus device answering one scan well and then garbage gave 100
    session_up/down entries in 10 s; scans overran and recovered under jitter."""
    key = Ed25519PrivateKey.generate()
    audit = AuditLog(tmp_path, "plant", "site-1", key)
    forwarder = AuditForwarder(audit)
    opcua, modbus = plant_logger(forwarder, "chiller-ua"), plant_logger(forwarder, "plc-7")
    for publish in range(10):
        for i in range(1000):
            signal, node = f"site/chiller/t{i}", f"ns=2;i={1000 + i}"
            if publish % 2 == 0:
                opcua.warning("device_read_refused", signal=signal, node=node,
                              reason="bad_status", status="BadSensorFailure", variant=None,
                              modelled=["Double"])  # fmt: skip
            else:
                opcua.info("device_read_recovered", signal=signal, node=node)
    for _ in range(50):
        modbus.info("device_session_up", host="127.0.0.1", port=502)
        modbus.warning("device_session_down", host="127.0.0.1", port=502, error="short_response")
        modbus.warning("scan_overrun", skipped_scans=1, scan_s=0.13, poll_interval_s=0.1)
        modbus.info("scan_overrun_ended", skipped_scans=1)
    for _ in range(30):  # a trust event of a device is never throttled
        opcua.warning("opcua_server_certificate_refused", sha256="ab" * 32, error="not trusted")
    assert not audit.failing
    audit.close()
    entries = read_log(tmp_path / "plant")
    written: dict[str, int] = {}
    for entry in entries:
        written[entry["event"]] = written.get(entry["event"], 0) + 1
    for event in ("device_read_refused", "device_read_recovered", "device_session_up",
                  "device_session_down", "scan_overrun", "scan_overrun_ended"):  # fmt: skip
        assert written[event] == 10, event  # the first 10 per (event, device) in full
    assert written["opcua_server_certificate_refused"] == 30
    (summary,) = [e["details"] for e in entries if e["event"] == "events_suppressed"]
    counted = {(s["event"], s["source"]): s["count"] for s in summary["by_source"]}
    assert counted[("device_read_refused", "chiller-ua")] == 5000 - 10
    assert counted[("device_session_down", "plc-7")] == 40
    assert summary["by_kind"] == {"device": 2 * 4990 + 4 * 40}
    assert sum(len(p.read_bytes()) for p in (tmp_path / "plant").iterdir()) < 200_000
    assert verify_writer(tmp_path / "plant", key.public_key()).intact


def test_hostile_devices_cannot_hide_a_good_devices_session_down(tmp_path: Path) -> None:
    """Review 16: a DNP3 outstation toggling its indications and refusing every other poll,
    and a BACnet device doing likewise, spend the devices' budget of the minute; the good PLC's
    session going down is still in the log in full, with its device as actor."""
    key = Ed25519PrivateKey.generate()
    audit = AuditLog(tmp_path, "plant", "site-1", key)
    forwarder = AuditForwarder(audit)
    for name in ("outstation-3", "ahu-controller", "outstation-4"):
        hostile = plant_logger(forwarder, name)
        for _ in range(100):
            hostile.warning("device_status_reported", indications=["DEVICE_TROUBLE"])
            hostile.warning("device_read_refused", reason="refused", status="NO_FUNC_CODE")
            hostile.info("device_read_recovered")
            hostile.info("device_session_up", host="127.0.0.1", port=20000)
            hostile.warning("device_session_down", host="127.0.0.1", port=20000, error="eof")
            hostile.warning("device_unsolicited_ignored", octets=17)
            hostile.warning("scan_overrun", skipped_scans=1, scan_s=0.13, poll_interval_s=0.1)
    good = plant_logger(forwarder, "plc-7")
    for _ in range(3):
        good.warning("device_session_down", host="127.0.0.1", port=502, error="timeout")
        good.info("device_session_up", host="127.0.0.1", port=502)
    audit.close()
    entries = read_log(tmp_path / "plant")
    device_entries = [e for e in entries if e["category"] == "device"]
    assert len(device_entries) == 200 + 2  # the budget, and the good device's first of each
    assert [e["event"] for e in device_entries if e["actor"] == "plc-7"] == [
        "device_session_down",
        "device_session_up",
    ]
    (summary,) = [e["details"] for e in entries if e["event"] == "events_suppressed"]
    counted = {(s["event"], s["source"]): s["count"] for s in summary["by_source"]}
    assert counted[("device_session_down", "plc-7")] == 2  # its repeats are only counted
    assert counted[("device_read_refused", "outstation-3")] == 90  # the noisy stay limited
    assert verify_writer(tmp_path / "plant", key.public_key()).intact
