"""The boundary in the code itself: import contracts and the absence of any write path.

Each check is a function over one module's syntax tree, so that planting a violation in a
small module (`test_each_check_finds_a_planted_violation`) proves the check would see it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from bacpypes3 import apdu

from broker.plant.connectors import bacnet_frames, dnp3_objects
from tests.harness import REPO

BROKER = REPO / "broker"
# Every pymodbus client call that writes, and the generic ones that could; the OPC UA ones;
# the bacpypes3 Application calls that write, control a device or serve a local one.
WRITE_CALLS = {
    "write_coil", "write_coils", "write_register", "write_registers", "mask_write_register",
    "readwrite_registers", "execute", "write_value", "write_attribute", "write_values", "call_method",
    "write_property", "enable_communications", "disable_communications", "i_am", "i_have",
    "add_object", "delete_object",
}  # fmt: skip

# BACnet: the services the connector sends (bacnet_frames.SERVICES_USED), and the two it only
# decodes: an I-Am (the answer to a directed Who-Is) and a change-of-value notification.
BACNET_SENT = frozenset({"whoIs", "readProperty", "readPropertyMultiple", "subscribeCOV"})
BACNET_DECODED = frozenset({"iAm", "unconfirmedCOVNotification"})
_TABLES = (apdu.ConfirmedServiceChoice._enum_map, apdu.UnconfirmedServiceChoice._enum_map)
# Every other service bacpypes3 knows (writes, DeviceCommunicationControl, ReinitializeDevice,
# files, objects, lists, alarms, time synchronisation, virtual terminals, private transfers):
# by its request class, and by its service name in both spellings (writeProperty,
# write-property). Taken from bacpypes3 itself, so a service it adds is forbidden too.
BACNET_FORBIDDEN = frozenset(
    c.__name__
    for c in [*apdu.confirmed_request_types.values(), *apdu.unconfirmed_request_types.values()]
    if c.__name__ not in {f"{s[0].upper()}{s[1:]}Request" for s in BACNET_SENT | BACNET_DECODED}
) | frozenset(
    name
    for table in _TABLES
    for name, number in table.items()
    if number not in {table[s] for s in BACNET_SENT | BACNET_DECODED if s in table}
)
# A bacpypes3 Application with a device object answers Who-Is, ReadProperty and WriteProperty
# from the OT network: the plant half encodes and decodes APDUs and serves nothing.
BACNET_SERVING = frozenset(
    {"Application", "ApplicationServiceElement", "DeviceObject", "NetworkServiceElement"}
)
# DNP3 request function codes (IEEE 1815 table 4-1) other than READ (1) and CONFIRM (0).
DNP3_FORBIDDEN = frozenset(
    [
        "WRITE",
        "SELECT",
        "OPERATE",
        "DIRECT_OPERATE",
        "DIRECT_OPERATE_NR",
        "IMMED_FREEZE",
        "IMMED_FREEZE_NR",
        "FREEZE_CLEAR",
        "FREEZE_CLEAR_NR",
        "FREEZE_AT_TIME",
        "FREEZE_AT_TIME_NR",
        "COLD_RESTART",
        "WARM_RESTART",
        "INITIALIZE_DATA",
        "INITIALIZE_APPLICATION",
        "START_APPLICATION",
        "STOP_APPLICATION",
        "SAVE_CONFIGURATION",
        "ENABLE_UNSOLICITED",
        "DISABLE_UNSOLICITED",
        "ASSIGN_CLASS",
        "DELAY_MEASURE",
        "RECORD_CURRENT_TIME",
        "OPEN_FILE",
        "CLOSE_FILE",
        "DELETE_FILE",
        "GET_FILE_INFO",
        "AUTHENTICATE_FILE",
        "ABORT_FILE",
        "ACTIVATE_CONFIG",
        "AUTHENTICATE_REQ",
        "AUTH_REQ_NO_ACK",
    ]
)

Check = Callable[[str, ast.AST], list[str]]


def product_modules() -> list[Path]:
    """The code that runs in the broker's processes (the simulators are not part of it)."""
    return [p for p in BROKER.rglob("*.py") if "sim" not in p.relative_to(BROKER).parts]


def sending_modules() -> list[Path]:
    """The product modules that could send: all but passive discovery's, which must name the
    write services and functions a capture shows in order to mark them, and can send nothing
    (test_passive_discovery_imports_nothing_that_opens_a_socket_or_sends)."""
    return [p for p in product_modules() if "passive" not in p.relative_to(BROKER).parts]


# The outputs that write on the IT side, into what they own: the PostgreSQL sink into its
# historian (SQL `execute`), the OPC UA server into its own address space. They live in the
# enterprise half, which cannot import the plant half (the import contracts), and
# `test_it_side_writers_reach_nothing_else` checks they open no other client.
IT_SIDE_WRITERS = ("postgres", "postgres_schema", "postgres_writer", "opcua", "opcua_space", "opcua_guard",
                   "opcua_session", "opcua_trust")  # fmt: skip
IT_SIDE_WRITER_PATHS = {BROKER / "enterprise" / "outputs" / f"{m}.py" for m in IT_SIDE_WRITERS}


def boundary_modules() -> list[Path]:
    """The product code that must never write: everything but the IT-side writers."""
    return [p for p in product_modules() if p not in IT_SIDE_WRITER_PATHS]


def _names(tree: ast.AST) -> list[tuple[int, str]]:
    """Every name a module uses: attributes, variables, imported names, string constants."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.alias):
            found.append((node.lineno, node.name.rpartition(".")[2]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def write_calls(where: str, tree: ast.AST) -> list[str]:
    return [f"{where}:{line}: {name}" for line, name in _names(tree) if name in WRITE_CALLS]


def bacnet_services(where: str, tree: ast.AST) -> list[str]:
    return [f"{where}:{line}: {name}" for line, name in _names(tree) if name in BACNET_FORBIDDEN]


def bacnet_serving(where: str, tree: ast.AST) -> list[str]:
    uses_bacpypes3 = any(
        isinstance(node, ast.ImportFrom | ast.Import)
        and any(
            n.startswith("bacpypes3")
            for n in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            + [a.name for a in getattr(node, "names", [])]
        )
        for node in ast.walk(tree)
    )
    if not uses_bacpypes3:  # aiohttp's web.Application is another thing
        return []
    return [f"{where}:{line}: {name}" for line, name in _names(tree) if name in BACNET_SERVING]


def _dnp3_function(name: str) -> str | None:
    """The forbidden function code an upper-case name spells, alone or inside (FC_WRITE)."""
    if not name.isupper():  # `writer.write(...)` is the TCP stream, not a DNP3 WRITE
        return None
    words = name.strip("_").split("_")
    for code in DNP3_FORBIDDEN:
        n = len(code.split("_"))
        if any("_".join(words[i : i + n]) == code for i in range(len(words) - n + 1)):
            return code
    return None


def dnp3_functions(where: str, tree: ast.AST) -> list[str]:
    return [
        f"{where}:{line}: {name}" for line, name in _names(tree) if _dnp3_function(name) is not None
    ]


def unconnected_datagrams(where: str, tree: ast.AST) -> list[str]:
    """A datagram socket of the plant half must be connected to its device (remote_addr), so
    the kernel drops datagrams from anyone else; one bound without a peer, or made by hand
    (SOCK_DGRAM, `sock=`), would take them from the whole OT network."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "SOCK_DGRAM":
            found.append(f"{where}:{node.lineno}: SOCK_DGRAM")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "create_datagram_endpoint"
        ):
            keys = {k.arg for k in node.keywords}
            if "remote_addr" not in keys or "sock" in keys:
                found.append(f"{where}:{node.lineno}: create_datagram_endpoint without remote_addr")
    return found


def listening(where: str, tree: ast.AST) -> list[str]:
    servers = {"start_server", "create_server", "TCPSite", "listen", "serve_forever"}
    return [
        f"{where}:{node.lineno}: {node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in servers
    ]


def offenders(check: Check, paths: list[Path]) -> list[str]:
    return [
        finding
        for path in paths
        for finding in check(str(path.relative_to(REPO)), ast.parse(path.read_text(), str(path)))
    ]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports)], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_no_product_module_calls_a_write_service() -> None:
    assert offenders(write_calls, boundary_modules()) == []


def test_it_side_writers_reach_nothing_else() -> None:
    """The exempted modules exist (a rename would silently end the exemption's reason), and
    none of them makes an OPC UA client or a Modbus, DNP3 or BACnet one: their writes can
    only go to the historian and to the server's own nodes."""
    assert all(path.exists() for path in IT_SIDE_WRITER_PATHS)
    clients = {"Client", "AsyncModbusTcpClient", "ModbusTcpClient", "Application"}
    found = [
        f"{path.name}:{line}: {name}"
        for path in sorted(IT_SIDE_WRITER_PATHS)
        for line, name in _names(ast.parse(path.read_text()))
        if name in clients or name.startswith(("broker.plant", "pymodbus", "bacpypes3"))
    ]
    assert found == []


def test_no_product_module_names_a_bacnet_service_beyond_reads_and_subscriptions() -> None:
    named = {
        "WritePropertyRequest", "WritePropertyMultipleRequest", "WriteGroupRequest",
        "DeviceCommunicationControlRequest", "ReinitializeDeviceRequest",
        "AtomicWriteFileRequest", "CreateObjectRequest", "DeleteObjectRequest",
        "AddListElementRequest", "RemoveListElementRequest", "TimeSynchronizationRequest",
        "LifeSafetyOperationRequest", "AcknowledgeAlarmRequest", "VTOpenRequest",
        "ConfirmedPrivateTransferRequest", "IHaveRequest", "writeProperty", "write-property",
        "deviceCommunicationControl", "reinitialize-device",
    }  # fmt: skip
    assert named <= BACNET_FORBIDDEN
    assert not {"ReadPropertyRequest", "WhoIsRequest", "IAmRequest", "readProperty"} & (
        BACNET_FORBIDDEN
    )
    assert offenders(bacnet_services, sending_modules()) == []
    assert bacnet_frames.SERVICES_USED <= BACNET_SENT


def test_no_product_module_runs_a_bacnet_application_that_would_serve() -> None:
    assert offenders(bacnet_serving, product_modules()) == []


def test_the_dnp3_master_sends_only_read_and_confirm() -> None:
    assert dnp3_objects.FUNCTIONS_SENT == {"CONFIRM": 0, "READ": 1}
    header = dnp3_objects.class_header(0)
    for apdu_bytes in (
        dnp3_objects.read_request(5, [header]),
        dnp3_objects.confirm(5, unsolicited=False),
        dnp3_objects.confirm(5, unsolicited=True),
    ):  # the function code is the APDU's second octet
        assert apdu_bytes[1] in dnp3_objects.FUNCTIONS_SENT.values()
    dnp3_modules = [p for p in sending_modules() if "dnp3" in p.name]
    assert len(dnp3_modules) >= 3, dnp3_modules  # frames, objects, connector (and discovery)
    assert offenders(dnp3_functions, dnp3_modules) == []


def test_the_plant_half_has_no_server_code() -> None:
    assert offenders(listening, list((BROKER / "plant").rglob("*.py"))) == []


def test_the_plant_half_opens_only_connected_datagram_sockets() -> None:
    # `dmzbroker discover bacnet` (an operator's one-off command, not the running half) may
    # broadcast a Who-Is and take I-Ams from any device for its few seconds (docs/bacnet.md).
    plant = [p for p in (BROKER / "plant").rglob("*.py") if not p.name.startswith("discovery")]
    assert offenders(unconnected_datagrams, plant) == []


# `discover pcap` reads a capture someone else took: broker.passive may import no module that
# opens a socket, sends a packet or is a connector's I/O (the pure frame parsers are fine).
# A trailing "*" also matches longer names (opcua_session).
PASSIVE_FORBIDDEN = (
    "socket", "asyncio", "selectors", "ssl", "aiohttp", "http.client", "urllib.request",
    "pymodbus.client", "pymodbus.server", "pymodbus.transport", "asyncua", "aiomqtt", "paho",
    "scapy.all", "scapy.sendrecv", "scapy.arch", "scapy.supersocket", "scapy.automaton",
    "bacpypes3.app", "broker.plant.connectors.modbus", "broker.plant.connectors.dnp3",
    "broker.plant.connectors.dnp3_link", "broker.plant.connectors.bacnet",
    "broker.plant.connectors.bacnet_link", "broker.plant.connectors.opcua*",
)  # fmt: skip


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules (or module.name) an import statement names, relative ones resolved as
    from inside broker.passive."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = ["broker", "passive"]
    base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
    module = ".".join(p for p in (base, node.module or "") if p)
    return [module, *(f"{module}.{a.name}" for a in node.names)]


def passive_imports(where: str, tree: ast.AST) -> list[str]:
    def forbidden(name: str) -> bool:
        return any(
            name.startswith(p[:-1]) if p.endswith("*") else name == p or name.startswith(p + ".")
            for p in PASSIVE_FORBIDDEN
        )

    return [
        f"{where}:{node.lineno}: {name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in _imported(node)
        if forbidden(name)
    ]


def test_passive_discovery_imports_nothing_that_opens_a_socket_or_sends() -> None:
    passive = sorted((BROKER / "passive").glob("*.py"))
    assert len(passive) >= 2, passive
    assert offenders(passive_imports, passive) == []
    for planted in (
        "import socket\n",
        "import asyncio.streams\n",
        "from scapy.sendrecv import sendp\n",
        "from scapy import all as scapy\n",
        "from broker.plant.connectors import modbus\n",
        "from ..plant.connectors.dnp3_link import Link\n",
        "from broker.plant.connectors.opcua_session import SessionSettings\n",
    ):
        assert passive_imports("planted.py", ast.parse(planted)), planted
    for clean in (
        "from scapy.utils import RawPcapReader, RawPcapNgReader\n",
        "from broker.plant.connectors import dnp3_frames, dnp3_objects, modbus_plan\n",
        "from .observations import Peer\n",
        "import struct\n",
    ):
        assert passive_imports("clean.py", ast.parse(clean)) == [], clean


def test_the_discover_pcap_command_loads_no_connector_that_talks_to_a_device() -> None:
    """The import check above sees the source; this sees what a real process loads, through
    every package __init__ on the way."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, broker.passive.discover; print(*sorted(sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    ).stdout.split()  # fmt: skip
    talking = ("broker.plant.connectors.modbus", "broker.plant.connectors.dnp3",
               "broker.plant.connectors.dnp3_link", "broker.plant.connectors.bacnet",
               "broker.plant.connectors.bacnet_link", "broker.plant.connectors.opcua",
               "broker.plant.connectors.registry", "broker.plant.run", "broker.enterprise",
               "asyncua", "pymodbus.client", "scapy.sendrecv")  # fmt: skip
    assert "broker.plant.connectors.dnp3_frames" in loaded  # what it does load: the parsers
    assert [m for m in loaded if m in talking] == []


PLANTED: list[tuple[Check, str]] = [
    (write_calls, "async def f(c):\n    await c.write_register(1, 2)\n"),
    (write_calls, "async def f(app, a, o):\n    await app.write_property(a, o, 'present-value', 1)\n"),
    (write_calls, "def f(app):\n    app.add_object(object())\n"),
    (bacnet_services, "from bacpypes3.apdu import WritePropertyRequest\n"),
    (bacnet_services, "from bacpypes3 import apdu\nr = apdu.DeviceCommunicationControlRequest()\n"),
    (bacnet_services, "from bacpypes3.apdu import ReinitializeDeviceRequest as Read\n"),
    (bacnet_services, "SERVICES = {'readProperty', 'writePropertyMultiple'}\n"),
    (bacnet_services, "SERVICE = 'atomic-write-file'\n"),
    (bacnet_services, "from bacpypes3.apdu import UTCTimeSynchronizationRequest\n"),
    (bacnet_serving, "from bacpypes3.app import Application\n"),
    (bacnet_serving, "import bacpypes3.local.device\nd = bacpypes3.local.device.DeviceObject()\n"),
    (dnp3_functions, "FUNCTIONS = {'READ': 1, 'WRITE': 2}\n"),
    (dnp3_functions, "_DIRECT_OPERATE = 5\n"),
    (dnp3_functions, "FC_DISABLE_UNSOLICITED: int = 21\n"),
    (dnp3_functions, "def f(o):\n    return o.COLD_RESTART\n"),
    (listening, "import asyncio\nasync def f():\n    await asyncio.start_server(None, '', 0)\n"),
    (unconnected_datagrams,
     "async def f(loop, p):\n    await loop.create_datagram_endpoint(p, local_addr=('', 47808))\n"),
    (unconnected_datagrams, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"),
    (unconnected_datagrams,
     "async def f(loop, p, s):\n    await loop.create_datagram_endpoint(p, sock=s, remote_addr=1)\n"),
]  # fmt: skip
CLEAN: list[tuple[Check, str]] = [
    (dnp3_functions, "async def f(writer, b):\n    writer.write(b)\n    await writer.drain()\n"),
    (dnp3_functions, "FUNCTIONS_SENT = {'CONFIRM': 0, 'READ': 1}\nLOCAL_FORCED = 0x10\n"),
    (bacnet_services, "from bacpypes3.apdu import ReadPropertyRequest, IAmRequest\n"),
    (bacnet_serving, "from aiohttp import web\napp = web.Application()\n"),
    (unconnected_datagrams,
     "async def f(loop, p):\n    await loop.create_datagram_endpoint(p, remote_addr=('h', 1))\n"),
]  # fmt: skip


@pytest.mark.parametrize(("check", "source"), PLANTED)
def test_each_check_finds_a_planted_violation(check: Check, source: str) -> None:
    found = check("planted.py", ast.parse(source))
    assert found and all(f.startswith("planted.py:") for f in found)


@pytest.mark.parametrize(("check", "source"), CLEAN)
def test_the_checks_pass_what_reads_only(check: Check, source: str) -> None:
    assert check("clean.py", ast.parse(source)) == []
