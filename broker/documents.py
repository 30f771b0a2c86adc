"""Strict YAML documents turned into typed structures.

Both the appliance config and the policy are YAML written by people. This module is the one
place that parses them: a strict subset of YAML (no duplicate keys, anchors, aliases, tags or
merge keys, which hide meaning from a reviewer), then a typed conversion that refuses unknown
keys, then the checks across fields a caller gives. Every mistake becomes one `ConfigError`
line, `FILE:LINE: key.path[3]: what is wrong`, the line found from the key path in the same
parse; data that has no lines (a signed JSON payload) gives `SOURCE: key.path: what`.
A document that is JSON (RFC 8259, which YAML 1.2 reads alike) is read as JSON, in C: a
site's generated policy of 100,000 signals is 24 MB, which PyYAML takes minutes to read; its
errors give the key path, without a line. JSON cannot hold anchors, aliases, tags or merge
keys, and a duplicate key is refused there too. It never executes anything the document says.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import msgspec
import yaml

from broker.conversion_errors import Place, explain, parse_path, render_path
from broker.errors import ConfigError

T = TypeVar("T")

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # YAML: read in Python, at a few MB a minute
MAX_JSON_DOCUMENT_BYTES = 64 * 1024 * 1024  # JSON: 100,000 signals and their model are 24 MB


def _refuse(problem: str, mark: Any) -> NoReturn:
    raise yaml.MarkedYAMLError(problem=problem, problem_mark=mark)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without the parts of YAML that make a reviewed file mean something hidden.

    It keeps each key as constructed (`5:` is the number 5), by key node, so that an error about
    a key that is not text is told at that key's line.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.keys: dict[int, Any] = {}  # id(key node) → the key; the nodes live as long as this

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            _refuse("aliases are not allowed; write the value out", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            _refuse("anchors are not allowed; write the value out", event.start_mark)
        tag = getattr(event, "tag", None)  # None unless the document names a tag explicitly
        if tag is not None:
            _refuse(f"tag {tag!r} is not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                _refuse("merge keys (<<) are not allowed", key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                _refuse("a key must be a plain value, not a list or mapping", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            self.keys[id(key_node)] = key
            if key in seen:
                _refuse(f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class KeyLines:
    """The line (1-based) each key and list item of a parsed YAML document is written on."""

    def __init__(self, lines: dict[Place, int]) -> None:
        self._lines = lines

    def line(self, path: Place) -> int:
        """The line of `path`, or of its deepest prefix written in the document.

        A missing key is shown at its mapping; a key `prepare` implied, at the mapping too.
        """
        for end in range(len(path), -1, -1):
            if (line := self._lines.get(path[:end])) is not None:
                return line
        return 1


def parse_yaml(text: str, source: str) -> Any:
    """Parse strict YAML; `source` names the document in errors."""
    return parse_yaml_lines(text, source)[0]


def parse_yaml_lines(text: str, source: str) -> tuple[Any, KeyLines]:
    """Parse strict YAML, and note where each key path is written, from the same parse."""
    try:
        loader = _StrictLoader(text)  # the reader refuses characters YAML forbids here
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
            keys = loader.keys
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: {e.problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    except RecursionError as e:  # PyYAML composes recursively; no real document nests so deep
        raise ConfigError(f"{source}: nested too deeply to be a configuration") from e
    return data, KeyLines(_lines_of(node, keys))


def _lines_of(root: Any, keys: dict[int, Any]) -> dict[Place, int]:
    """Key path → line, for every key (its own line) and list item of the composed tree;
    `keys` holds each key as constructed, by key node."""
    if root is None:
        return {}
    lines: dict[Place, int] = {(): root.start_mark.line + 1}
    pending: list[tuple[Place, Any]] = [((), root)]  # a loop, not recursion: depth is free
    while pending:
        path, node = pending.pop()
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, keys.get(id(key_node), key_node.value))
                lines[key] = key_node.start_mark.line + 1
                pending.append((key, value_node))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, index)] = item.start_mark.line + 1
                pending.append(((*path, index), item))
    return lines


def convert(
    data: Any,
    type_: type[T],
    source: str,
    base_dir: Path | None = None,
    *,
    lines: KeyLines | None = None,
    check: Callable[[T], Iterable[str]] | None = None,
) -> T:
    """Convert parsed data to `type_`, refusing unknown keys and wrong types.

    Fields typed `Path` are resolved against `base_dir` (the document's own directory).
    `check` yields what no single field can show, each problem `key.path: what is wrong`;
    the first is raised. `lines` (from `parse_yaml_lines`) puts the line in every error.
    """

    def decode_path(field_type: type, value: Any) -> Any:
        if field_type is not Path or base_dir is None:
            raise NotImplementedError(f"no decoder for {field_type}")
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file system path")
        return (base_dir / value).resolve()

    try:
        converted = msgspec.convert(data, type_, strict=True, dec_hook=decode_path)
    except msgspec.ValidationError as e:
        explained = explain(e, data, type_, decode_path)
        where = _where(source, lines, explained.place)
        raise ConfigError(f"{where}: {render_path(explained.path)}: {explained.what}") from e
    for problem in check(converted) if check is not None else ():
        path, _, _ = problem.partition(": ")
        raise ConfigError(f"{_where(source, lines, parse_path(path))}: {problem}")
    return converted


def _where(source: str, lines: KeyLines | None, path: Place) -> str:
    return source if lines is None else f"{source}:{lines.line(path)}"


def load(
    path: Path,
    type_: type[T],
    prepare: Callable[[Any], Any] | None = None,
    check: Callable[[T], Iterable[str]] | None = None,
) -> T:
    """Read, parse and type-check one YAML file; `prepare` may fill in implied keys first,
    `check` yields the problems across fields (see `convert`)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_DOCUMENT_BYTES:
            raise ConfigError(
                f"{path}: file is {size} bytes, over the {MAX_JSON_DOCUMENT_BYTES} limit"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    if size <= MAX_DOCUMENT_BYTES:
        return from_text(text, type_, str(path), path.parent, prepare=prepare, check=check)
    try:  # too large to read as YAML: JSON, or refused
        data = _json_document(text, str(path))
    except _NotJson as e:
        raise ConfigError(
            f"{path}: file is {size} bytes, over the {MAX_DOCUMENT_BYTES} limit of a YAML "
            f"document, and not JSON ({e})"
        ) from e
    return _typed(data, type_, str(path), path.parent, prepare=prepare, check=check)


def from_text(
    text: str,
    type_: type[T],
    source: str,
    base_dir: Path | None = None,
    *,
    prepare: Callable[[Any], Any] | None = None,
    check: Callable[[T], Iterable[str]] | None = None,
) -> T:
    """Parse and type-check one YAML document already read; errors carry its lines (a JSON
    document's carry the key path alone)."""
    try:
        data, lines = _json_document(text, source), None
    except _NotJson:  # YAML, then: most documents
        data, lines = parse_yaml_lines(text, source)
    if data is None:
        raise ConfigError(f"{source}: the file is empty")
    return _typed(data, type_, source, base_dir, lines=lines, prepare=prepare, check=check)


def _typed(
    data: Any,
    type_: type[T],
    source: str,
    base_dir: Path | None,
    *,
    lines: KeyLines | None = None,
    prepare: Callable[[Any], Any] | None,
    check: Callable[[T], Iterable[str]] | None,
) -> T:
    if prepare is not None:
        data = prepare(data)
    return convert(data, type_, source, base_dir, lines=lines, check=check)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return mapping


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999 is JSON's grammar, beyond any double
        raise ValueError(f"the number {text} is too large")
    return number


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


class _NotJson(ValueError):
    pass


def _json_document(text: str, source: str) -> Any:
    """The document if `text` is a JSON object; _NotJson says why not (then it may still
    be YAML: a flow mapping, say). A duplicate key is refused here, as in YAML."""
    if not text.lstrip().startswith("{"):
        raise _NotJson("it does not start with {")
    try:
        return json.loads(
            text, object_pairs_hook=_unique_keys, parse_float=_finite,
            parse_constant=_refuse_constant,
        )  # fmt: skip
    except _DuplicateKey as e:
        raise ConfigError(f"{source}: duplicate key {e.args[0]!r}") from e
    except json.JSONDecodeError as e:
        raise _NotJson(f"line {e.lineno} column {e.colno}: {e.msg}") from e
    except (ValueError, RecursionError) as e:
        raise _NotJson(str(e) or "nested too deeply") from e
