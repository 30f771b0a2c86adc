"""The consumer API's OpenAPI document, as `/v1/openapi.json` serves it.

docs/openapi.yaml and docs/record.schema.json are the only copies: this package holds
symlinks to them (an editable install reads the files themselves; a wheel build stores
their content), so the served document cannot drift from the published one. The YAML
refers to the record schema by file name; the JSON served is self-contained: the record
schema is bundled in as `components.schemas.Record`, its own `#/...` references rewritten
to point inside it. This module never reads anything but those two files.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from broker.documents import parse_yaml
from broker.errors import ConfigError
from broker.records import to_json

RECORD_SCHEMA = "record.schema.json"
RECORD_POINTER = "#/components/schemas/Record"


@functools.cache
def served_document() -> bytes:
    """The bundled document as JSON bytes; read once per process."""
    package = resources.files(__package__)
    try:
        document = parse_yaml((package / "openapi.yaml").read_text("utf-8"), "openapi.yaml")
        record = json.loads((package / RECORD_SCHEMA).read_text("utf-8"))
    except (
        OSError,
        ValueError,
        ConfigError,
    ) as e:  # a broken installation, not anything a user did
        raise RuntimeError(f"the installed package lacks its OpenAPI document: {e}") from e
    return to_json(bundle(document, record))


def bundle(document: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """`document` with the record schema in place of its one reference to the file."""
    schemas = document["components"]["schemas"]
    if schemas.get("Record") != {"$ref": RECORD_SCHEMA}:
        raise RuntimeError(f"openapi.yaml: components.schemas.Record must be $ref {RECORD_SCHEMA}")
    # `$schema` may only stand at the root of a schema resource; the document's dialect
    # (OpenAPI 3.1's, based on draft 2020-12) applies instead.
    embedded = {key: value for key, value in record.items() if key != "$schema"}
    return {
        **document,
        "components": {
            **document["components"],
            "schemas": {**schemas, "Record": _rebase(embedded)},
        },
    }


def _rebase(node: Any) -> Any:
    """Point the schema's document-local references (`#/$defs/x`) inside the bundle."""
    if isinstance(node, dict):
        return {
            key: RECORD_POINTER + value[1:]
            if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else _rebase(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rebase(item) for item in node]
    return node
