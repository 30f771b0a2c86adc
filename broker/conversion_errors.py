"""How a refused typed conversion is told to a person: where it is, and what to write instead.

msgspec says what failed and at which key path (`$.signals[3].source.table`), in its own words.
This module turns that into the words of the documents people write: the valid values of an
enum and the nearest one, the nearest known key for an unknown one, the `{min: 0, max: 400}`
form for a struct written as a list. It finds them by walking the target type along the error
path, choosing a tagged union's member by its tag as msgspec does. What the document wrote (an
unknown key, a wrong value, a key that is not text) is taken from the data, not from msgspec's
text, whose quoting a key with a backtick in it confuses; it is shown quoted once, with every
non-printable character spelled out, so that no value can start a line of its own. It also
parses and renders key paths, so that a path means the same here, in `documents.py` and in
every check's message. It only explains: it never accepts or corrects a document.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

Step = str | int
KeyPath = tuple[Step, ...]
Place = tuple[Hashable, ...]  # a key path whose keys may be any YAML scalar (`5:`, `null:`)

_ANY_KEY = "[...]"  # msgspec's step for "some value of a dict", resolved to its key below
_STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\['([^']*)'\]|(\[\.\.\.\])")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# msgspec's paths name struct fields, list indexes and `[...]`, never a key from the document,
# so a path has no backtick; " - at `key` in" says the error is about a key of that mapping.
_MSGSPEC = re.compile(
    r"^(?P<what>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL
)
_UNKNOWN = "Object contains unknown field `"
_FORM_KEYS = 4  # the most keys a suggested `{key: …}` form lists without the values
_QUOTED = re.compile(r"`([^`]*)`|'([^']*)'")


def parse_path(text: str) -> KeyPath:
    """The steps of a key path such as `signals[3].source` (as far as it parses)."""
    steps: list[Step] = []
    position = 0
    while position < len(text):
        match = _STEP.match(text, position)
        if match is None or match.end() == position:
            break
        name, index, quoted, any_key = match.groups()
        if index is not None:
            steps.append(int(index))
        else:
            steps.append(name if name is not None else quoted if quoted is not None else any_key)
        position = match.end()
    return tuple(steps)


def render_path(path: KeyPath) -> str:
    """`signals[3].source`; `(top level)` for the document itself."""
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        elif step == _ANY_KEY:
            text += step
        elif _NAME.fullmatch(step):
            text += f".{step}" if text else step
        else:
            text += f"[{step!r}]"
    return text or "(top level)"


@dataclass(frozen=True)
class Explained:
    """A conversion error in people's words; `place` is the path whose line shows it."""

    path: KeyPath
    place: Place
    what: str


def explain(
    error: msgspec.ValidationError,
    data: Any,
    type_: Any,
    dec_hook: Callable[[type, Any], Any] | None = None,
) -> Explained:
    """Word `error`, raised converting `data` to `type_`, so that it says how to fix it."""
    text = str(error)
    match = _MSGSPEC.match(text)
    assert match is not None  # the pattern matches any text
    what = match["what"]
    path = _resolve_any_keys(parse_path(match["path"] or ""), type_, data, dec_hook)
    if text.startswith(_UNKNOWN):  # the one message that quotes the document's own words
        path, key = _unknown_field(text, text[len(what) :], path, data, type_)
        target, _ = _walk(type_, data, path)
        return Explained(
            path, (*path, key), f"unknown key {_shown(key)}" + _nearest_key(key, _keys(target))
        )
    target, value = _walk(type_, data, path)
    quoted = _QUOTED.search(what)
    named = next((q for q in quoted.groups() if q is not None), "") if quoted else ""
    place: Place = path
    if match["key"] is not None and (key := _not_text_key(value)) is not _NONE:
        place = (*path, key)
        what = f"keys must be text, got {_scalar(key)}"
    elif what.startswith("Object missing required field"):
        what = f"missing required key {named!r}"
    elif what.startswith("Invalid enum value") and _is_literal(target):
        what = f"invalid enum value {_shown(value)}" + choices(value, get_args(target))
    elif what.startswith("Invalid value") and path:
        parent, written = _walk(type_, data, path[:-1])
        tags = _tags(parent, path[-1])
        if tags and isinstance(written, dict):
            tag = written.get(path[-1])
            what = f"invalid value {_shown(tag)}" + choices(tag, tags)
    elif what.startswith("Expected `object") and what.endswith("got `array`"):
        written_as = _struct_form(target, value)
        what = "expected an object, got a list" + (
            f" — write it as {written_as}" if written_as else ""
        )
    elif what.lower().startswith("expected") and ", got" not in what:  # ours start lowercase
        if isinstance(value, (int, float, str)):
            what += f", got `{_printable(str(value))}`"
    else:  # a check of the struct itself (__post_init__): at the key it names first, if any
        first = re.match(r"[A-Za-z_][A-Za-z0-9_]*", what)
        if first and isinstance(value, dict) and first[0] in value:
            place = (*path, first[0])
    if what[1:2].islower():  # msgspec's "Expected …", not an acronym such as "OPC UA"
        what = what[:1].lower() + what[1:]
    return Explained(path, place, what)


_NONE = object()  # no such key (None is a key YAML can write: `null:`)


def _unknown_field(
    text: str, suffix: str, path: KeyPath, data: Any, type_: Any
) -> tuple[KeyPath, str]:
    """Where an unknown key is and what it is, found in the data and checked against msgspec's
    text: a key such as ``a - at `$.devices`` at the top level reads like a path of its own."""
    for at, after in ((path, suffix), ((), "")):
        target, value = _walk(type_, data, at)
        known = _keys(target)
        unknown = [k for k in value if isinstance(k, str) and k not in known] if known else []
        if unknown and isinstance(value, dict) and text == f"{_UNKNOWN}{unknown[0]}`{after}":
            return at, unknown[0]
    return path, text[len(_UNKNOWN) : len(text) - len(suffix) - 1]  # not found: msgspec's words


def _not_text_key(mapping: Any) -> Any:
    """The first key of `mapping` that is not text (a number, `null`, a date), else `_NONE`."""
    if not isinstance(mapping, dict):
        return _NONE
    return next((key for key in mapping if not isinstance(key, str)), _NONE)


def _resolve_any_keys(
    path: KeyPath, type_: Any, data: Any, dec_hook: Callable[[type, Any], Any] | None
) -> KeyPath:
    """Replace msgspec's `[...]` by the key whose value failed: the first that does not convert.

    msgspec converts a dict's values in order and stops at the first failure, so the first
    value that fails on its own is the one the error is about.
    """
    resolved: list[Step] = []
    for step in path:
        key = _failing_key(type_, data, tuple(resolved), dec_hook) if step == _ANY_KEY else None
        resolved.append(step if key is None else key)
    return tuple(resolved)


def _failing_key(
    type_: Any, data: Any, at: KeyPath, dec_hook: Callable[[type, Any], Any] | None
) -> str | None:
    """The key of the first value of the dict at `at` that does not convert on its own."""
    target, value = _walk(type_, data, at)
    if get_origin(target) is not dict or not isinstance(value, dict):
        return None
    value_type = get_args(target)[1]
    for key, item in value.items():
        try:
            msgspec.convert(item, value_type, strict=True, dec_hook=dec_hook)
        except msgspec.ValidationError:
            return key if isinstance(key, str) else None
    return None


def _walk(type_: Any, data: Any, path: KeyPath) -> tuple[Any, Any]:
    """The type expected at `path` and the data written there (None where it is missing)."""
    for step in path:
        type_ = _unwrap(type_, data)
        origin = get_origin(type_)
        if isinstance(step, int) and origin in (list, tuple):  # list[X] or tuple[X, ...]
            type_ = get_args(type_)[0]
            data = data[step] if isinstance(data, list) and step < len(data) else None
        elif isinstance(step, str) and origin is dict:
            type_ = get_args(type_)[1]
            data = data.get(step) if isinstance(data, dict) else None
        elif isinstance(step, str) and _is_struct(type_):
            fields = {f.encode_name: f.type for f in msgspec.structs.fields(type_)}
            if step not in fields:
                return None, None
            type_ = fields[step]
            data = data.get(step) if isinstance(data, dict) else None
        else:
            return None, None
    return _unwrap(type_, data), data


def _unwrap(type_: Any, data: Any) -> Any:
    """`type_` without its constraints, and a union narrowed to the member `data` is for."""
    while True:
        origin = get_origin(type_)
        if origin is Annotated:
            type_ = get_args(type_)[0]
            continue
        if origin not in (Union, types.UnionType):
            return type_
        members = [m for m in get_args(type_) if m is not type(None)]
        tagged = [m for m in members if _is_struct(m) and m.__struct_config__.tag_field]
        if tagged and isinstance(data, dict):
            chosen = [
                m
                for m in tagged
                if data.get(m.__struct_config__.tag_field) == m.__struct_config__.tag
            ]
            members = chosen or members
        elif not tagged and isinstance(data, (dict, list)):
            members = [m for m in members if _is_struct(m)] or members
        if len(members) != 1:
            return type_
        type_ = members[0]


def _is_struct(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, msgspec.Struct)


def _is_literal(type_: Any) -> bool:
    return get_origin(type_) is Literal


def _keys(type_: Any) -> list[str]:
    """The keys a struct accepts, its tag first (as people write `protocol:` first)."""
    if not _is_struct(type_):
        return []
    tag_field = type_.__struct_config__.tag_field
    names = [f.encode_name for f in msgspec.structs.fields(type_)]
    return [tag_field, *names] if tag_field else names


def _tags(union: Any, field: Step) -> list[str]:
    """The tags of a tagged union whose tag field is `field`, in the order it lists them."""
    if get_origin(union) not in (Union, types.UnionType):
        return []
    return [
        str(m.__struct_config__.tag)
        for m in get_args(union)
        if _is_struct(m) and m.__struct_config__.tag_field == field
    ]


def _nearest(written: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(written, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _nearest_key(written: str, known: list[str]) -> str:
    """The nearest known key, or all of them when none is close."""
    if (near := _nearest(written, known)) is not None:
        return f" — did you mean {near!r}?"
    return f" (known keys: {', '.join(known)})" if known else ""


def choices(written: Any, values: tuple[Any, ...] | list[str]) -> str:
    """` — did you mean 'x'? (one of: …)`: the nearest valid value, and all of them."""
    valid = [str(v) for v in values]
    near = _nearest(written, valid) if isinstance(written, str) else None
    hint = f" — did you mean {near!r}?" if near is not None else ""
    return f"{hint} (one of: {', '.join(valid)})"


def _struct_form(type_: Any, written: Any) -> str:
    """`{min: 0, max: 400}`: the struct's keys, with the list's values when the counts match."""
    if not _is_struct(type_) or not isinstance(written, list):
        return ""
    fields = msgspec.structs.fields(type_)
    required = [f.encode_name for f in fields if f.required]
    every = [f.encode_name for f in fields]
    for names in (every, required):
        if names and len(names) == len(written):
            pairs = ", ".join(f"{n}: {_scalar(v)}" for n, v in zip(names, written, strict=True))
            return f"{{{pairs}}}"
    names = required or every
    if len(names) > _FORM_KEYS:
        return ""  # a whole document written as a list: its keys would not help
    return "{" + ", ".join(f"{n}: …" for n in names) + "}"


def _shown(value: Any) -> str:
    """A value the document wrote, as an error shows it: text in quotes (once), else as YAML."""
    return f"'{_printable(value)}'" if isinstance(value, str) else _scalar(value)


def _printable(text: str) -> str:
    """`text` with each non-printable character spelled out (`\\n`, `\\x1b`, `\\u2028`), so that
    it cannot break or colour the error's line; a backslash is shown as written."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _scalar(value: Any) -> str:
    """A value as it would be written in YAML flow style."""
    if isinstance(value, str) and _NAME.fullmatch(value):
        return value
    return json.dumps(value, default=str)
