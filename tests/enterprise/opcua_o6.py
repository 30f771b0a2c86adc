"""A second, independent OPC UA client for the server tests: o6 (open62541, compiled C; not
asyncua's code), run as a child process: `python -m tests.enterprise.opcua_o6` with a JSON
request on stdin, one JSON answer on stdout.

o6's PyPI build runs in "Script Mode" without a licence credential: importing it starts a
ten-minute timer that ends the process. So it is imported only here, in a short-lived child,
never in a pytest worker.

The request: url, certificate and private_key (the client's, PEM), trust (the issuing CA's
DER, which verifies the server's certificate chain) and crl (DER), application_uri,
namespace (the URI whose index the NodeIds use), read (string NodeIds in that namespace),
write (string NodeIds to try a Value write on). The answer: "refused" (the status code
that ended the connection, an int) or "values" ({node: [value, status, source ticks,
server ticks]}) and "writes" ({node: status}).
"""

from __future__ import annotations

import json
import sys
from typing import Any

BASIC256SHA256 = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"
SIGN_AND_ENCRYPT = 3  # MessageSecurityMode
NAMESPACE_ARRAY = "i=2255"


def _ticks(stamp: Any) -> int | None:
    return None if stamp is None else int(stamp)


def main() -> int:
    import o6  # noqa: PLC0415  (the timer starts here: see the module docstring)

    request = json.load(sys.stdin)
    client = o6.Client(
        request["url"],
        certificate=request["certificate"],
        privateKey=request["private_key"],
        trustList=[request["trust"]],
        revocationList=[request["crl"]],
        securityMode=SIGN_AND_ENCRYPT,
        securityPolicy=BASIC256SHA256,
        applicationUri=request["application_uri"],
    )
    client.config.timeout = 20_000  # ms: a loaded CI machine
    try:
        client.connect()
    except o6.StatusCodeError as e:
        print(json.dumps({"refused": e.code}))
        return 0
    try:
        index = list(client.read(NAMESPACE_ARRAY)).index(request["namespace"])
        values: dict[str, list[Any]] = {}
        for node in request["read"]:
            read = client.read(f"ns={index};s={node}", valueOnly=False)
            value = read.value
            values[node] = [
                value.item() if hasattr(value, "item") else value,  # numpy scalars
                int(read.status),
                _ticks(read.sourceTimestamp),
                _ticks(read.serverTimestamp),
            ]
        writes: dict[str, int] = {}
        for node in request["write"]:
            try:
                writes[node] = int(client.write(f"ns={index};s={node}", o6.Double(-1.0)))
            except o6.StatusCodeError as e:
                writes[node] = e.code
        print(json.dumps({"values": values, "writes": writes}))
    finally:
        client.disconnect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
