"""Find the BACnet/IP device `dmzbroker discover bacnet` lists: a Who-Is, and the I-Ams.

Used by the discover command only (the CLI, never a running half). It sends one Who-Is, to
the device or to a broadcast address, and takes the I-Ams that come back; it sends nothing
else and answers nothing. A datagram longer than BACnet/IP allows is dropped unread, and at
most `MAX_I_AMS` answers are kept.

ADDRESS is a broadcast when it is the broadcast address of one of the host's own IPv4
interfaces (the Who-Is then goes to that subnet and every answer within the timeout is
collected); any other address is one device's, over a socket connected to it.
255.255.255.255 is refused: it leaves by the default route's interface, which need not be
the OT one. Two I-Ams for one device instance from two addresses are an error naming both:
a duplicated instance or a spoofer, never silently the last one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import psutil
from bacpypes3.apdu import IAmRequest

from broker.errors import ConfigError, DeviceError
from broker.plant.connectors import bacnet_frames
from broker.plant.connectors.bacnet_frames import FrameError, parse

DEFAULT_PORT = 47808
MAX_I_AMS = 1000  # answers kept from one broadcast Who-Is
_ORIGINAL_BROADCAST = b"\x81\x0b"  # BVLL type and function of a broadcast (Annex J.2.10)


@dataclass(frozen=True)
class IAm:
    instance: int
    address: tuple[str, int]


class Datagrams(asyncio.DatagramProtocol):
    """Received datagrams in a queue; an ICMP refusal of a connected socket as an error."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]] | OSError] = asyncio.Queue(
            maxsize=MAX_I_AMS
        )

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > bacnet_frames.MAX_DATAGRAM:
            return  # not BACnet/IP: never decoded
        if not self.queue.full():  # a flood is dropped, not buffered
            self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and not self.queue.full():
            self.queue.put_nowait(exc)


def refused(where: str, e: OSError) -> DeviceError:
    """What an ICMP refusal of a connected socket means to the operator."""
    return DeviceError(
        f"{where}: nothing listens there ({e.strerror or e}): check the address and the "
        f"port (BACnet/IP's usual port is {DEFAULT_PORT})"
    )


def is_broadcast(host: str) -> bool:
    """Whether `host` is the broadcast address of one of this host's IPv4 interfaces (its
    subnet's directed broadcast). 255.255.255.255 is refused: it leaves by the default
    route's interface, which need not be the OT one."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    if address == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(
            "discover bacnet: 255.255.255.255 leaves by the default route, which may not be "
            f"the OT network: name the OT subnet's broadcast address ({_broadcasts()})"
        )
    return host in _interface_broadcasts()


def _interface_broadcasts() -> set[str]:
    """Each IPv4 interface address's subnet broadcast (from its netmask: `ip address add`
    without `brd +` leaves the broadcast attribute unset, though the kernel routes it)."""
    found: set[str] = set()
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family != socket.AF_INET or not a.netmask:
                continue
            network = ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False)
            if network.prefixlen < 31 and not network.is_loopback:
                found.add(str(network.broadcast_address))
            if a.broadcast:
                found.add(a.broadcast)
    return found


def _broadcasts() -> str:
    found = sorted(_interface_broadcasts())
    return "this host's: " + ", ".join(found) if found else "this host has none"


async def who_is(
    host: str, port: int, instance: int | None, timeout_s: float, port_local: int
) -> list[IAm]:
    """The devices that answer a Who-Is: the first answer when directed, every answer within
    `timeout_s` when broadcast."""
    loop = asyncio.get_running_loop()
    broadcast = is_broadcast(host)
    if broadcast:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # every interface: the I-Ams of a broadcast come back from any device, to any address
        sock.bind(("0.0.0.0", port_local))  # noqa: S104
        transport, link = await loop.create_datagram_endpoint(Datagrams, sock=sock)
    else:
        transport, link = await _connected(host, port, port_local)
    try:
        request = bacnet_frames.who_is()  # an Original-Unicast-NPDU
        if broadcast:
            transport.sendto(_ORIGINAL_BROADCAST + request[2:], (host, port))
        else:
            transport.sendto(request)
        found = await _i_ams(link, f"{host}:{port}", broadcast, timeout_s)
    finally:
        transport.close()
    if instance is not None and found and not any(i.instance == instance for i in found):
        answered = ", ".join(str(i.instance) for i in found[:20])
        raise DeviceError(
            f"{host}:{port}: no device {instance} answered the Who-Is (device {answered} did): "
            "check --device-instance"
        )
    return [i for i in found if instance is None or i.instance == instance]


async def _connected(
    host: str, port: int, port_local: int
) -> tuple[asyncio.DatagramTransport, Datagrams]:
    """A socket connected to one device: the kernel drops datagrams from anyone else."""
    try:
        return await asyncio.get_running_loop().create_datagram_endpoint(
            Datagrams,
            remote_addr=(host, port),
            local_addr=("0.0.0.0", port_local),  # noqa: S104 - connected to the device
        )
    except socket.gaierror as e:  # its errno is a resolver code, not an OS one
        raise DeviceError(
            f"{host}:{port}: cannot resolve {host!r} ({e.strerror}): check the host name"
        ) from e
    except OSError as e:
        raise DeviceError(
            f"{host}:{port}: cannot send to it ({e.strerror or e}); a broadcast must be "
            f"the broadcast address of one of this host's interfaces ({_broadcasts()})"
        ) from e


async def _i_ams(link: Datagrams, where: str, broadcast: bool, timeout_s: float) -> list[IAm]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    found: dict[int, IAm] = {}
    twice: dict[int, set[tuple[str, int]]] = {}  # instance → every address that claimed it
    while len(found) < MAX_I_AMS and (left := deadline - loop.time()) > 0:
        try:
            item = await asyncio.wait_for(link.queue.get(), left)
        except TimeoutError:
            break
        if isinstance(item, OSError):
            raise refused(where, item)
        data, source = item
        try:
            apdu = parse(data)
        except FrameError as e:
            if broadcast:  # other traffic on a shared port is not ours to judge
                continue
            raise DeviceError(f"{where}: {e}: is this the device's BACnet/IP port?") from e
        if isinstance(apdu, IAmRequest):
            try:
                instance = int(apdu.iAmDeviceIdentifier[1])
            except (TypeError, IndexError, ValueError):
                continue  # an I-Am without a device identifier names nothing
            if instance in found and found[instance].address != source:
                twice.setdefault(instance, {found[instance].address}).add(source)
                continue
            found[instance] = IAm(instance, source)
            if not broadcast:
                break
    for instance, addresses in sorted(twice.items()):
        listed = " and ".join(f"{a[0]}:{a[1]}" for a in sorted(addresses))
        raise DeviceError(
            f"{where}: device {instance} answered from {listed}: two devices share the "
            "instance, or a host spoofs it; fix that before writing a policy"
        )
    return sorted(found.values(), key=lambda i: i.instance)
