"""Benchmark: `dmzbroker discover pcap` — packets/s and MB/s parsed, and peak memory at two
capture sizes (it must stay flat: the capture is streamed, every table bounded).

It writes a capture of a SCADA polling many PLCs (classic pcap, Ethernet, one TCP connection
per PLC; FC 1 coils, FC 3 int16 holding registers, FC 4 float32 input register pairs, each
range every second) with struct, fast enough for hundreds of MB, then runs the real CLI on
it in a child process and reads the child's own peak RSS (wait4). TCP checksums are left
zero, as captures taken on a host with checksum offload show them. The run fails unless
every float32 pair is drafted as a big-endian float32: figures for work the command did
not do would say nothing.
Run: `.venv/bin/python bench/discover_pcap.py` (`--mb 50 200`, `--plcs 20`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from support import REPO

SCADA = bytes([10, 0, 0, 5])
T0 = 1_783_000_000
# Distinct answers per range, repeated. Well above what inference keeps of a register's
# distinct values (broker/passive/series.py DISTINCT, 64), so a float's low word looks rough
# and the float32 path is what runs: at 64, every float pair was drafted as two 16-bit signals.
CYCLE = 256
# (function code, start, count) each PLC is polled for
RANGES = ((1, 0, 16), (3, 0, 10), (4, 0, 20))


def _answers(function: int, count: int, plc: int) -> list[bytes]:
    """CYCLE response PDUs of a range: bits toggling, int16 ramps, float32 sine waves."""
    out = []
    for k in range(CYCLE):
        if function == 1:
            bits = (0x5A5A ^ (k * 257 + plc)) & 0xFFFF
            out.append(struct.pack(">BBH", 1, 2, bits))
        elif function == 3:
            words = [(k * 3 + i * 100 - 250) & 0xFFFF for i in range(count)]
            out.append(struct.pack(f">BB{count}H", 3, 2 * count, *words))
        else:
            values = [20 + i + 5 * math.sin((k + plc) / 10 + i) for i in range(count // 2)]
            out.append(struct.pack(f">BB{count // 2}f", 4, 2 * count, *values))
    return out


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    return ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF


class _Flow:
    """One SCADA → PLC connection: its addresses and both directions' next sequence numbers."""

    def __init__(self, plc: int) -> None:
        self.plc = bytes([10, 0, 1, plc + 1])
        self.port = 40_000 + plc
        self.seq = {True: 1_000 + plc, False: 9_000_000 + plc}  # by from_client

    def packet(self, time_s: float, from_client: bool, payload: bytes) -> bytes:
        src, dst = (SCADA, self.plc) if from_client else (self.plc, SCADA)
        sport, dport = (self.port, 502) if from_client else (502, self.port)
        seq, ack = self.seq[from_client], self.seq[not from_client]
        self.seq[from_client] = (seq + len(payload)) & 0xFFFFFFFF
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, 0x18, 8192, 0, 0)
        frame = b"\x02\x00\x00\x00\x00\x07\x02\x00\x00\x00\x00\x05\x08\x00" + ip + tcp + payload
        usec = round((time_s % 1) * 1e6)
        return struct.pack("<IIII", int(time_s), usec, len(frame), len(frame)) + frame


def _records(plcs: int) -> Iterator[bytes]:
    flows = [_Flow(p) for p in range(plcs)]
    answers = {(p, r): _answers(r[0], r[2], p) for p in range(plcs) for r in RANGES}
    transaction, tick = 0, 0
    while True:
        for p, flow in enumerate(flows):
            for i, r in enumerate(RANGES):
                transaction = (transaction + 1) & 0xFFFF
                at = T0 + tick + p * 0.001 + i * 0.0002
                pdu = answers[(p, r)][tick % CYCLE]
                mbap = struct.pack(">HHHB", transaction, 0, 6, 1)
                yield flow.packet(at, True, mbap + struct.pack(">BHH", *r))
                answer = struct.pack(">HHHB", transaction, 0, len(pdu) + 1, 1) + pdu
                yield flow.packet(at + 0.0001, False, answer)
        tick += 1


def write_capture(path: Path, megabytes: int, plcs: int) -> int:
    """A capture of about `megabytes` MB; the number of packets in it."""
    limit, written, packets = megabytes * 1_000_000, 24, 0
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        chunk: list[bytes] = []
        for record in _records(plcs):
            chunk.append(record)
            written += len(record)
            packets += 1
            if len(chunk) == 10_000:
                f.write(b"".join(chunk))
                chunk.clear()
                if written >= limit:
                    break
        f.write(b"".join(chunk))
    return packets


def discover(path: Path) -> tuple[float, int, dict[str, object]]:
    """Run the CLI on `path`: wall seconds, the child's peak RSS in KiB, its JSON output."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "broker", "discover", "pcap", str(path), "--json"],
            cwd=REPO, stdout=out, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"discover pcap {path} failed with exit code {child.returncode}")
        out.seek(0)
        return wall, usage.ru_maxrss, json.loads(out.read())


def floats_found(found: dict[str, object], plcs: int) -> int:
    """How many of the capture's float32 input register pairs were drafted as float32 in big
    word order (as written); every other guess for them fails the run: a bench of the wrong
    work says nothing."""
    signals = found.get("signals")
    assert isinstance(signals, list)
    inputs = {
        (s["server"], s["address"]): (s["type"], s["word_order"])
        for s in signals
        if s["table"] == "input_register"
    }
    count = next(r[2] for r in RANGES if r[0] == 4)
    expected = {(f"10.0.1.{p + 1}:502", a) for p in range(plcs) for a in range(0, count, 2)}
    wrong = {k: v for k, v in inputs.items() if k not in expected or v != ("float32", "big")}
    if wrong or len(inputs) != len(expected):
        raise SystemExit(f"discover pcap: float32 pairs not found: {sorted(wrong.items())[:5]}")
    return len(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[50, 200], help="capture sizes")
    parser.add_argument("--plcs", type=int, default=20, help="PLCs the SCADA polls")
    args = parser.parse_args()
    print(f"{'capture':>9} {'packets':>10} {'write':>7} {'discover':>9} "
          f"{'packets/s':>10} {'MB/s':>6} {'peak RSS':>9} {'signals':>8} {'float32':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in args.mb:
            path = Path(tmp) / f"bench-{megabytes}.pcap"
            start = time.perf_counter()
            packets = write_capture(path, megabytes, args.plcs)
            written = time.perf_counter() - start
            size = path.stat().st_size / 1e6
            wall, rss_kib, found = discover(path)
            signals = found.get("signals")
            print(
                f"{size:>7.0f}MB {packets:>10,} {written:>6.1f}s {wall:>8.1f}s "
                f"{packets / wall:>10,.0f} {size / wall:>6.1f} {rss_kib / 1024:>7.0f}MB "
                f"{len(signals) if isinstance(signals, list) else '?':>8} "
                f"{floats_found(found, args.plcs):>8}"
            )
            path.unlink()


if __name__ == "__main__":
    main()
