"""`dmzbroker discover dnp3` against opendnp3's outstation on 127.0.0.1, through the proxy that
counts what the master sends: the starter policy lists every point of the integrity poll and
compiles as printed, the command sends READ (and only the CONFIRMs a multi-fragment answer
or a null unsolicited response asks for), never confirms an unsolicited response with
objects, and says in one line what went wrong when nothing listens, nothing answers, the
answer is not DNP3, is not numbered as an answer to its READ, or never ends."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import yaml

from broker.plant.connectors.dnp3_frames import PRI_UNCONFIRMED_USER_DATA, PRM, encode_frame
from tests.harness import dmzbroker
from tests.plant.connectors.dnp3_outstation import ONLINE, CountingProxy, Dnp3Outstation
from tests.plant.discover_support import assert_compiles, one_line_error, tcp_server
from tests.plant.discover_support import discover as discover_cli

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

GROUPS = {1, 3, 10, 20, 21, 30, 40}  # opendnp3 serves frozen counters (21) too
discover = partial(discover_cli, "dnp3")


@pytest.fixture(scope="module")
def station() -> Iterator[Dnp3Outstation]:
    with Dnp3Outstation(size=100) as outstation:  # an answer of several fragments
        outstation.set("analog", 7, 21.5, flags=ONLINE)
        outstation.set("double_bit", 3, "on", flags=ONLINE)
        yield outstation


async def test_the_integrity_poll_becomes_a_starter_policy_that_compiles_as_printed(
    station: Dnp3Outstation, tmp_path: Path
) -> None:
    async with CountingProxy(station.port) as proxy:
        done = await discover(f"127.0.0.1:{proxy.port}", "--outstation", "1024",
                              "--device-name", "lift-station")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert proxy.functions["READ"] == 1  # one integrity poll, nothing else read
        assert proxy.functions["CONFIRM"] >= 1  # the answer came in fragments that asked for it
        proxy.assert_read_only()
    starter = yaml.safe_load(done.stdout)
    assert starter["devices"] == [{"name": "lift-station", "protocol": "dnp3", "host": "127.0.0.1",
                                   "port": proxy.port, "outstation_address": 1024,
                                   "master_address": 1}]  # fmt: skip
    sources = {(s["source"]["group"], s["source"]["index"]): s for s in starter["signals"]}
    assert {group for group, _ in sources} == GROUPS
    assert len(sources) == len(starter["signals"]) == len(GROUPS) * station.size
    analog = sources[(30, 7)]
    assert analog["path"] == "lift-station/analog-input-7"
    assert analog["source"]["variation"] in (1, 2, 3, 4, 5, 6)  # the one it came in
    assert set(analog["source"]) == {"group", "variation", "index"}  # the device says dnp3
    lines = done.stdout.splitlines()
    comment = lines[lines.index("  - path: lift-station/analog-input-7") - 1]
    assert comment.startswith(f"  # g30v{analog['source']['variation']} index 7: 21")
    assert "flags 0x01 (good)" in comment
    restarted = lines[lines.index("  - path: lift-station/analog-input-8") - 1]
    assert "RESTART" in restarted and "(bad" in restarted  # never set: as it started
    double_bit = lines[lines.index("  - path: lift-station/double-bit-input-3") - 1]
    assert double_bit.endswith(": 'on', flags 0x81 (good), string")  # state in bits 6-7
    assert "# Indications (IIN) set:" in done.stdout and "DEVICE_RESTART" in done.stdout
    await assert_compiles(done.stdout, tmp_path)


async def test_a_null_unsolicited_response_is_confirmed_so_the_answer_comes() -> None:
    """opendnp3 sends a null unsolicited response at start and holds its answers until it is
    confirmed or its 5 s confirm timeout ends: beyond a --timeout of 2 s."""
    with Dnp3Outstation(size=2, unsolicited=True, outstation=10, master=3) as chatty:
        async with CountingProxy(chatty.port) as proxy:
            done = await discover(f"127.0.0.1:{proxy.port}", "--outstation", "10",
                                  "--master", "3", "--timeout", "2")  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert proxy.functions["READ"] == 1
            assert proxy.unsolicited_confirms >= 1  # the null one: it carries no event
            assert proxy.unsolicited_with_objects == proxy.data_confirms == 0
            proxy.assert_read_only()
    assert len(yaml.safe_load(done.stdout)["signals"]) == len(GROUPS) * 2


async def test_a_wrong_link_address_gets_no_answer_and_says_which_flags_to_check(
    station: Dnp3Outstation,
) -> None:
    async with CountingProxy(station.port) as proxy:
        done = await discover(f"127.0.0.1:{proxy.port}", "--outstation", "7", "--timeout", "1")
        assert dict(proxy.functions) == {"READ": 1}
    line = one_line_error(done)
    assert "(outstation 7, master 1): no answer to the integrity poll within 1 s" in line
    assert "check --outstation and --master" in line


async def test_an_outstation_that_talks_to_another_master_is_named_with_its_addresses() -> None:
    """Its unsolicited null response at start goes to the master it is configured for."""
    with Dnp3Outstation(size=1, unsolicited=True, outstation=10, master=2) as other:
        async with CountingProxy(other.port) as proxy:
            done = await discover(f"127.0.0.1:{proxy.port}", "--outstation", "10")
            assert dict(proxy.functions) == {"READ": 1}
    line = one_line_error(done)
    assert "(frame at byte 0: from 10 to 2, not from outstation 10 to master 1)" in line
    assert "--outstation/--master" in line


async def test_nothing_listening_is_named_with_the_usual_port() -> None:
    # a port bound and never listened on: connecting is refused, and for as long as it is
    # held no other test can start a server on it
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        line = one_line_error(await discover(f"127.0.0.1:{port}", "--outstation", "10"))
    assert "cannot connect (Connection refused)" in line and "usual port is 20000" in line


async def test_a_host_that_does_not_resolve_is_named_as_such() -> None:
    line = one_line_error(await discover("no-such-host.invalid", "--outstation", "10"))
    # the resolver's words vary with the machine's DNS (unknown name, or no server reachable)
    assert line.startswith(
        "dmzbroker: error: no-such-host.invalid:20000: cannot resolve 'no-such-host.invalid' ("
    )
    assert line.endswith("): check the host name")


@asynccontextmanager
async def answering(answer: bytes | None) -> AsyncIterator[int]:
    """A TCP server that answers anything with `answer`, or says nothing (None)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        if answer is not None:
            writer.write(answer)
            await writer.drain()
        await reader.read(4096)  # until the client hangs up
        writer.close()

    async with tcp_server(serve) as port:
        yield port


async def test_an_answer_that_is_not_dnp3_is_named_as_such() -> None:
    async with answering(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        line = one_line_error(await discover(f"127.0.0.1:{port}", "--outstation", "10"))
    assert "the answer is not DNP3 this master accepts" in line and "check the port" in line


async def test_a_silent_server_times_out_in_one_line() -> None:
    async with answering(None) as port:
        done = await discover(f"127.0.0.1:{port}", "--outstation", "10", "--timeout", "0.5")
    assert "no answer to the integrity poll within 0.5 s" in one_line_error(done)


@asynccontextmanager
async def fragments_server(apdus: Callable[[int], bytes], every_s: float) -> AsyncIterator[int]:
    """A DNP3 endpoint that answers a READ with the fragments `apdus(n)`, one every `every_s`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        try:
            for n in range(10_000):
                apdu = apdus(n)
                segment = bytes((0xC0 | n & 0x3F,)) + apdu
                writer.write(encode_frame(PRM | PRI_UNCONFIRMED_USER_DATA, 1, 10, segment))
                await writer.drain()
                await asyncio.sleep(every_s)
        except OSError:
            pass
        finally:
            writer.close()

    async with tcp_server(serve) as port:
        yield port


async def test_an_answer_that_never_ends_is_cut_at_the_overall_deadline() -> None:
    """Each fragment comes within --timeout, none is final: 10 × --timeout in all."""

    def fragment(n: int) -> bytes:  # FIR on the first only, never FIN, numbered as due
        return bytes(((0x80 if n == 0 else 0) | n & 0x0F, 129, 0, 0))

    async with fragments_server(fragment, every_s=0.05) as port:
        started = time.monotonic()
        done = await discover(f"127.0.0.1:{port}", "--outstation", "10", "--timeout", "0.3")
        took = time.monotonic() - started
    line = one_line_error(done)
    assert "no answer to the integrity poll within 0.3 s (the whole answer within 3 s)" in line
    # the CLI's start-up and 3 s, with room for a loaded CI; without the deadline, 10,000 ×
    # 0.05 s
    assert took < 30


async def test_a_fragment_numbered_for_another_request_is_refused() -> None:
    async with fragments_server(lambda n: bytes((0xC5, 129, 0, 0)), every_s=0.05) as port:
        line = one_line_error(await discover(f"127.0.0.1:{port}", "--outstation", "10"))
    assert "fragment 1 of the answer has sequence 5 (first) where 0 (first) was due" in line


async def test_an_answer_without_a_point_the_broker_reads_says_what_to_check() -> None:
    async with fragments_server(lambda n: bytes((0xC0, 129, 0, 0)), every_s=0.05) as port:
        line = one_line_error(await discover(f"127.0.0.1:{port}", "--outstation", "10"))
    assert "the integrity poll returned 0 points, none of a group the broker reads (1, 3," in line
    assert line.endswith("check which points the outstation assigns to class 0")


async def test_help_shows_the_defaults_and_the_outstation_is_required() -> None:
    shown = await asyncio.to_thread(dmzbroker, "discover", "dnp3", "--help")
    words = " ".join(shown.stdout.split())  # as wrapped for any terminal width
    assert "expects it (default: 1)" in words and "each answer (default: 5.0)" in words
    missing = await discover("127.0.0.1:20000")
    assert missing.returncode == 2 and "--outstation" in missing.stderr
