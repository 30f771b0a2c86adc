"""Strict YAML documents turned into typed structures.

Both the appliance config and the policy are YAML written by people. This module is the one
place that parses them: a strict subset of YAML (no duplicate keys, anchors, aliases, tags or
merge keys, which hide meaning from a reviewer), then a typed conversion that refuses unknown
keys. Every mistake becomes a `ConfigError` of the form `FILE: key.path[3]: what is wrong`.
It never executes anything the document says.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import msgspec
import yaml

from broker.errors import ConfigError

T = TypeVar("T")

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # a policy for a large site fits in far less


def _refuse(problem: str, mark: Any) -> NoReturn:
    raise yaml.MarkedYAMLError(problem=problem, problem_mark=mark)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without the parts of YAML that make a reviewed file mean something hidden."""

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
            if key in seen:
                _refuse(f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """Parse strict YAML; `source` names the document in errors."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: {e.problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e


_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def convert(data: Any, type_: type[T], source: str, base_dir: Path | None = None) -> T:
    """Convert parsed data to `type_`, refusing unknown keys and wrong types.

    Fields typed `Path` are resolved against `base_dir` (the document's own directory).
    """

    def decode_path(field_type: type, value: Any) -> Any:
        if field_type is not Path or base_dir is None:
            raise NotImplementedError(f"no decoder for {field_type}")
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file system path")
        return (base_dir / value).resolve()

    try:
        return msgspec.convert(data, type_, strict=True, dec_hook=decode_path)
    except msgspec.ValidationError as e:
        match = _MSGSPEC_PATH.match(str(e))
        assert match is not None  # the pattern matches any text
        path = (match["path"] or "").lstrip(".")
        what = match["what"]
        what = what[:1].lower() + what[1:]
        if what.startswith("expected") and ", got" not in what:
            value = _value_at(data, path)
            if isinstance(value, (int, float, str)):
                what += f", got `{value}`"
        raise ConfigError(f"{source}: {path or '(top level)'}: {what}") from e


_PATH_STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def _value_at(data: Any, path: str) -> Any:
    """The value at a msgspec error path such as `signals[3].source.address`, or None."""
    for key, index in _PATH_STEP.findall(path):
        try:
            data = data[key] if key else data[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def load(path: Path, type_: type[T], prepare: Callable[[Any], Any] | None = None) -> T:
    """Read, parse and type-check one YAML file; `prepare` may fill in implied keys first."""
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise ConfigError(f"{path}: file is {size} bytes, over the {MAX_DOCUMENT_BYTES} limit")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if prepare is not None:
        data = prepare(data)
    return convert(data, type_, str(path), base_dir=path.parent)
