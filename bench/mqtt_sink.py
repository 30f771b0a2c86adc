"""Benchmark: records/s the MQTT sink publishes at QoS 1 to a local Mosquitto over mTLS.

Fills a spool with N records (default 50,000) of the demo's signals, starts Mosquitto on a
free loopback port with a throwaway PKI (`dmzbroker certs`), and times the real sink
(`broker.enterprise.outputs.mqtt.MqttSink`) from its first publish until its spool position reaches
the last record. Target: >= 10,000 records/s. Run: `.venv/bin/python bench/mqtt_sink.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from support import REPO, cli, free_port

from broker import policy
from broker.channel.spool import SpoolReceiver, SpoolSender
from broker.config import MqttConfig
from broker.enterprise.authz import Authorization
from broker.enterprise.outputs.mqtt import MqttSink
from broker.records import Context, Record

MOSQUITTO = """listener {port} 127.0.0.1
cafile {pki}/ca.crt
certfile {pki}/broker.crt
keyfile {pki}/broker.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
persistence false
set_tcp_nodelay true
user root
max_inflight_messages 0
max_queued_messages 0
"""


def fill(spool: Path, signals: list[str], count: int) -> None:
    sender = SpoolSender(spool, segment_bytes=16 << 20, retention_bytes=1 << 30)
    now = datetime.now(UTC)
    for start in range(0, count, 1000):
        sender.send([
            Record(signal=signals[i % len(signals)], value=float(i), unit="", quality="good",
                   source_time=now, broker_time=now, policy_version=1, context=Context())
            for i in range(start, min(count, start + 1000))
        ])  # fmt: skip
    sender.close()


async def measure(workdir: Path, count: int) -> float:
    demo = policy.load(REPO / "policies" / "refrigeration.yaml")
    fill(workdir / "spool", [s.path for s in demo.signals], count)
    pki, port = workdir / "pki", free_port()
    cli("certs", "init-ca", "--out", str(pki), "--name", "bench")
    cli("certs", "issue", "server", "--ca", str(pki), "--out", str(pki), "--name", "broker",
        "--dns", "localhost", "--ip", "127.0.0.1")  # fmt: skip
    cli(
        "certs",
        "issue",
        "client",
        "--ca",
        str(pki),
        "--out",
        str(pki),
        "--name",
        "sink",
        "--uri",
        "spiffe://bench/sink",
    )
    (workdir / "mosquitto.conf").write_text(MOSQUITTO.format(port=port, pki=pki))
    broker = subprocess.Popen(["mosquitto", "-c", str(workdir / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        await asyncio.sleep(0.5)
        config = MqttConfig(host="127.0.0.1", port=port, server_name="localhost", ca=pki / "ca.crt",
                            cert=pki / "sink.crt", key=pki / "sink.key",
                            identity="spiffe://demo/consumer/historian")  # fmt: skip
        sink = MqttSink(config, workdir / "spool", workdir / "state", Authorization(demo))
        task = asyncio.create_task(sink.run())
        started = time.perf_counter()
        deadline = started + 300
        while time.perf_counter() < deadline:
            position = SpoolReceiver(workdir / "spool", workdir / "state", reader="mqtt").last_seq
            if position >= count:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return count / elapsed
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmzbroker-mqtt-bench-") as tmp:
        rate = asyncio.run(measure(Path(tmp), args.records))
    verdict = "PASS" if rate >= 10_000 else "FAIL"
    print(f"MQTT sink, QoS 1, mTLS, one message per asset per batch: {args.records:,} records, "
          f"{rate:,.0f} records/s (target >= 10,000: {verdict})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
