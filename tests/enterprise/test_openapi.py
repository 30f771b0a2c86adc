"""docs/openapi.yaml describes the consumer API, the API serves it, and a fuzzer finds no lie.

The fuzz runs schemathesis against a live `dmzbroker run` over real mutual TLS, as the full
consumer and as a stranger the policy does not name (so the 403 answers are exercised too):
no 5xx, no status or content type the document does not declare, every body valid against
its schema, and no stack trace or internal path in any body. `make test` runs a bounded
campaign; `make fuzz` sets DMZBROKER_FUZZ_EXAMPLES for a longer one.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import jsonschema
import msgspec
import pytest
import requests
import schemathesis
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# The official OpenAPI 3.1 meta-schema, as schemathesis ships it to check documents itself.
from schemathesis.specs.openapi.definitions import OPENAPI_31

from broker import policy
from broker.audit.log import AuditLog
from broker.enterprise.api import create_app
from broker.enterprise.authz import Authorization
from broker.enterprise.store import Store
from broker.metrics import EnterpriseMetrics
from tests.enterprise.served import Api, get
from tests.enterprise.test_authz import certificate_with
from tests.harness import (
    DEMO_POLICY,
    REPO,
    BrokerProcess,
    Deployment,
    Pki,
    consumer_ssl,
    eventually,
    get_json,
)

DOCUMENT = REPO / "docs" / "openapi.yaml"
RECORD_SCHEMA = REPO / "docs" / "record.schema.json"
# Per operation and identity. Unset (make test): few, and the same cases every run, so a
# failure is reproducible; `make fuzz` sets many, drawn afresh each run.
LONG_CAMPAIGN = "DMZBROKER_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("DMZBROKER_FUZZ_EXAMPLES", "30"))
# What no answer may show: a Python stack trace, a source file, where the broker is installed
# or keeps its files (the tests' folders are under the temporary directory).
INTERNALS = (
    "Traceback", 'File "', '.py"', "site-packages", str(REPO), sys.prefix, tempfile.gettempdir(),
)  # fmt: skip


def bundled_by_hand() -> dict[str, Any]:
    """docs/openapi.yaml with docs/record.schema.json put where it refers to it."""
    document = yaml.safe_load(DOCUMENT.read_text())
    assert document["components"]["schemas"]["Record"] == {"$ref": "record.schema.json"}
    text = RECORD_SCHEMA.read_text().replace('"#/$defs/', '"#/components/schemas/Record/$defs/')
    record = json.loads(text)
    del record["$schema"]
    document["components"]["schemas"]["Record"] = record
    return document


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of every mapping inside `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def resolve(document: dict[str, Any], pointer: str) -> Any:
    node: Any = document
    for token in pointer.removeprefix("#/").split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


# ---------------------------------------------------------------- the document


@pytest.mark.parametrize("form", ["yaml", "bundled"])
def test_the_document_is_valid_openapi_3_1(form: str) -> None:
    document = yaml.safe_load(DOCUMENT.read_text()) if form == "yaml" else bundled_by_hand()
    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    assert document["openapi"].startswith("3.1.")
    # The meta-schema leaves Schema Objects to their dialect: check each one against it.
    for key, value in walk(document):
        if key == "schema" and isinstance(value, dict):
            jsonschema.Draft202012Validator.check_schema(value)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_bundled_document_needs_nothing_else_to_resolve() -> None:
    document = bundled_by_hand()
    refs = [value for key, value in walk(document) if key == "$ref"]
    assert len(refs) > 20  # the record's own references came along
    for ref in refs:
        assert ref.startswith("#/"), ref
        assert isinstance(resolve(document, ref), dict), ref


def test_the_record_schema_is_the_one_in_docs_record_schema_json() -> None:
    record = bundled_by_hand()["components"]["schemas"]["Record"]
    published = json.loads(RECORD_SCHEMA.read_text())
    assert record["properties"].keys() == published["properties"].keys()
    assert record["$defs"].keys() == published["$defs"].keys()
    assert record["required"] == published["required"]


def test_every_route_is_described_and_every_description_is_a_route(tmp_path: Path) -> None:
    demo = policy.load(DEMO_POLICY)
    store = Store(demo, queue_limit=10)
    audit = AuditLog(
        tmp_path / "audit", "enterprise", demo.deployment_id, Ed25519PrivateKey.generate()
    )
    app = create_app(
        store, Authorization(demo), audit, EnterpriseMetrics(lambda: 0, lambda: False), tmp_path
    )
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    described = {
        (method.upper(), path)
        for path, operations in yaml.safe_load(DOCUMENT.read_text())["paths"].items()
        for method in operations
    }
    assert routes == described
    audit.close()


def test_the_package_serves_the_files_in_docs() -> None:
    """The installed package reads docs/ itself (symlinks a wheel build fills in), no copy."""
    package = resources.files("broker.enterprise")
    assert (package / "openapi.yaml").read_bytes() == DOCUMENT.read_bytes()
    assert (package / "record.schema.json").read_bytes() == RECORD_SCHEMA.read_bytes()


# ---------------------------------------------------------------- serving it


async def test_any_authenticated_consumer_gets_the_bundled_document(api: Api) -> None:
    stranger = api.client_ssl(api.pki.stranger_cert, api.pki.stranger_key)  # not in the policy
    status, body = await get(api, "/v1/openapi.json", stranger)
    assert status == 200
    assert body == bundled_by_hand()


async def test_a_certificate_that_names_no_consumer_does_not_get_the_document(
    api: Api, tmp_path: Path
) -> None:
    cert, key = certificate_with(api.pki.ca, tmp_path / "cn-only", [])
    status, body = await get(api, "/v1/openapi.json", api.client_ssl(cert, key))
    assert status == 403 and set(body) == {"error"}  # type: ignore[arg-type]


async def test_the_document_stays_readable_while_data_is_refused(api: Api) -> None:
    expired = msgspec.structs.replace(
        api.authz.policy, expires=datetime.now(UTC) - timedelta(seconds=1)
    )
    api.authz.use_policy(expired)
    status, _ = await get(api, "/v1/snapshot", api.consumer_ssl())
    assert status == 503
    status, body = await get(api, "/v1/openapi.json", api.consumer_ssl())
    assert status == 200 and body["openapi"].startswith("3.1.")  # type: ignore[index]


# ---------------------------------------------------------------- what the HTTP layer answers

LONG = b"a" * 9000
RAW_REQUESTS = {
    "head": (b"HEAD /v1/snapshot HTTP/1.1\r\nHost: x\r\n\r\n", "/v1/snapshot", 405),
    "options": (b"OPTIONS /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n", "/v1/stream", 405),
    "trace": (b"TRACE /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n", "/v1/openapi.json", 405),
    "post-with-body": (
        b"POST /v1/signals HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096,
        "/v1/signals",
        405,
    ),
    "get-with-body": (
        b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096,
        "/v1/snapshot",
        200,
    ),
    "unknown-path": (b"GET /v2/snapshot HTTP/1.1\r\nHost: x\r\n\r\n", None, 404),
    "trailing-slash": (b"GET /v1/snapshot/ HTTP/1.1\r\nHost: x\r\n\r\n", None, 404),
    "asterisk": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", None, 404),
    "nul-in-path": (b"GET /v1/signals/%00 HTTP/1.1\r\nHost: x\r\n\r\n", "/v1/signals/{path}", 403),
    "dot-dot": (
        b"GET /v1/signals/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
        "/v1/signals/{path}",
        403,
    ),
    "long-request-line": (b"GET /v1/signals/" + LONG + b" HTTP/1.1\r\nHost: x\r\n\r\n", "*", 400),
    "long-header": (
        b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\nX-A: " + LONG + b"\r\n\r\n",
        "*",
        400,
    ),
    "bad-method": (b"G(T /v1/snapshot HTTP/1.1\r\nHost: x\r\n\r\n", "*", 400),
    "bad-version": (b"GET /v1/snapshot HTTP/9.9\r\nHost: x\r\n\r\n", "*", 400),
    "bad-content-length": (
        b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "*",
        400,
    ),
    "too-many-headers": (
        b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(129))
        + b"\r\n",
        "*",
        400,
    ),
    "non-ascii-path": (b"GET /v1/signals/\xff HTTP/1.1\r\nHost: x\r\n\r\n", "*", 400),
}


async def exchange(api: Api, raw: bytes) -> tuple[int, str, bytes]:
    """Send raw bytes over mutual TLS; the status, content type and body of the answer."""
    port = int(api.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=api.consumer_ssl(), server_hostname="localhost"
    )
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int(headers.get("Content-Length", "0"))
            body = await reader.readexactly(length) if not raw.startswith(b"HEAD") else b""
    finally:
        writer.close()
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


@pytest.mark.parametrize("name", RAW_REQUESTS)
async def test_what_the_http_layer_answers_is_declared(api: Api, name: str) -> None:
    raw, path, expected = RAW_REQUESTS[name]
    status, content_type, body = await exchange(api, raw)
    assert status == expected
    document = bundled_by_hand()
    if status == 400:  # the HTTP parser's, before the API sees the request
        declared = document["components"]["responses"]["BadRequest"]["content"]
        for operation in document["paths"].values():
            assert operation["get"]["responses"]["400"] == {
                "$ref": "#/components/responses/BadRequest"
            }
    elif path is None:  # undescribed paths: 404, JSON (docs say so in info.description)
        declared = {"application/json": {}}
        assert json.loads(body).keys() == {"error"}
    else:
        response = document["paths"][path]["get"]["responses"][str(status)]
        response = resolve(document, response["$ref"]) if "$ref" in response else response
        declared = response["content"]
    assert content_type.split(";")[0] in declared
    for internal in INTERNALS:
        assert internal.encode() not in body, (internal, body[:300])


# ---------------------------------------------------------------- the fuzz


def no_internals(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A schemathesis check: no stack trace or internal path in any body or header."""
    text = response.content.decode("utf-8", "replace") + str(response.headers)
    for internal in INTERNALS:
        assert internal not in text, f"{internal!r} in the answer to {case.path}"


# The API takes no query parameters; whatever a client adds must change nothing it declares.
JUNK_QUERY = hypothesis.strategies.dictionaries(
    hypothesis.strategies.text(max_size=20), hypothesis.strategies.text(max_size=60), max_size=3
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    no_internals,
]


def fuzz(
    schema: schemathesis.BaseSchema,
    base_url: str,
    identity: tuple[Path, Path, Path],
    examples: int,
    budget_s: float,
) -> int:
    """Generated cases for every operation of `schema`; the number of requests made."""
    cert, key, ca = identity
    session = requests.Session()
    tls = {"cert": (str(cert), str(key)), "verify": str(ca)}  # per call: schemathesis sets both
    deadline = time.monotonic() + budget_s
    calls = 0

    for result in schema.get_all_operations():
        operation = result.ok()
        # An operation without parameters varies only in its junk query, and a stream case
        # for a consumer that sees nothing lasts its whole timeout: fewer cases for those.
        if "{" in operation.path:
            cases = examples
        else:
            cases = max(3, min(examples // 10, 10 if "stream" in operation.path else examples))
        strategies = [
            operation.as_strategy(),
            *schema.get_strategies_from_examples(operation),  # the signal path the document names
        ]

        @hypothesis.settings(
            max_examples=cases,
            deadline=None,
            database=None,
            derandomize=not LONG_CAMPAIGN,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=hypothesis.strategies.one_of(strategies), query=JUNK_QUERY)
        def run(case: schemathesis.Case, query: dict[str, str]) -> None:
            nonlocal calls
            if time.monotonic() > deadline:
                return  # the time bound: remaining examples are skipped, not failed
            # An event stream is read for at most this long (schemathesis cuts it there).
            response = case.call(base_url=base_url, session=session, params=query, timeout=1, **tls)
            calls += 1
            case.validate_response(response, checks=CHECKS)

        run()
    session.close()
    return calls


async def test_schemathesis_finds_no_undeclared_answer_on_the_live_api(
    deployment: Deployment,
    start_broker: Any,
    pki: Pki,
) -> None:
    broker: BrokerProcess = start_broker("run", deployment.config)

    async def serving() -> bool:
        try:
            status, body = await get_json(deployment.base_url + "/v1/snapshot", consumer_ssl(pki))
        except (OSError, ssl.SSLError, aiohttp.ClientError):  # not listening yet
            return False
        return status == 200 and len(body["records"]) > 0

    try:
        await eventually(serving, timeout=60, interval=0.2)
    except AssertionError:
        pytest.fail("the broker served no records:\n" + "\n".join(broker.events()[-20:]))
    consumer = (pki.client_cert, pki.client_key, pki.ca)  # every signal: 200, 404, streams
    stranger = (pki.stranger_cert, pki.stranger_key, pki.ca)  # named nowhere: empty views, 403
    published = schemathesis.openapi.from_path(DOCUMENT)
    for identity in (consumer, stranger):
        calls = await asyncio.to_thread(
            fuzz, published, deployment.base_url, identity, EXAMPLES, budget_s=30 + EXAMPLES * 0.3
        )
        print(f"fuzz: {calls} requests as {identity[0].stem}")  # make fuzz shows it
        assert calls > EXAMPLES  # the path operation alone makes about that many
    assert broker.process.poll() is None, "the broker must survive the fuzz"
    assert not any("Traceback" in line for line in broker.events())

    # The checks can fail: a document that leaves out a status, or a record field, is caught.
    without_403 = bundled_by_hand()
    del without_403["paths"]["/v1/signals/{path}"]["get"]["responses"]["403"]
    another_record = bundled_by_hand()
    another_record["components"]["schemas"]["Record"]["required"].append("temperature")
    for lie, identity, caught in (
        (without_403, stranger, "Undocumented status code"),
        (another_record, consumer, "violates schema"),
    ):
        with pytest.raises(schemathesis.errors.FailureGroup, match=caught):
            await asyncio.to_thread(
                fuzz, schemathesis.openapi.from_dict(lie), deployment.base_url, identity, 5, 20
            )
