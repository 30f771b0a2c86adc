"""Strict YAML and typed conversion: every refusal names the file, the place and the problem."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest
import yaml

from broker import config
from broker.documents import (
    MAX_DOCUMENT_BYTES,
    MAX_JSON_DOCUMENT_BYTES,
    convert,
    from_text,
    load,
    parse_yaml,
)
from broker.errors import ConfigError


class Listener(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Doc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=2)]
    listeners: Annotated[list[Listener], msgspec.Meta(min_length=1)]
    cert: Path | None = None


GOOD = {"name": "plant", "listeners": [{"host": "127.0.0.1", "port": 8443}]}


def where(text: str, needle: str, occurrence: int = 1) -> str:
    """`LINE:COL` (1-based) of the start of the `occurrence`-th `needle` in `text`."""
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"{line}:{column}"


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_yaml(text, "site.yaml")
    return str(caught.value)


def conversion_error(data: object) -> str:
    with pytest.raises(ConfigError) as caught:
        convert(data, Doc, "site.yaml")
    return str(caught.value)


# parse_yaml


def test_plain_yaml_parses_to_plain_data() -> None:
    text = "name: plant\nlisteners:\n  - {host: 127.0.0.1, port: 8443}\n"
    assert parse_yaml(text, "site.yaml") == GOOD


@pytest.mark.parametrize(
    ("text", "needle", "occurrence", "problem"),
    [
        ("a: 1\nb: 2\na: 3\n", "a:", 2, "duplicate key 'a'"),
        ("outer:\n  inner: {x: 1, x: 2}\n", "x:", 2, "duplicate key 'x'"),
        ("- {k: 1}\n- {k: 1, k: 1}\n", "k:", 3, "duplicate key 'k'"),
        ("a: &shared 1\nb: 2\n", "&shared", 1, "anchors are not allowed"),
        ("a: 1\nb: *shared\n", "*shared", 1, "aliases are not allowed"),
        ("base: {x: 1}\nd:\n  <<: {x: 1}\n", "<<", 1, "merge keys (<<) are not allowed"),
    ],
)
def test_hidden_meaning_is_refused_with_file_line_and_column(
    text: str, needle: str, occurrence: int, problem: str
) -> None:
    message = refusal(text)
    assert message.startswith(f"site.yaml:{where(text, needle, occurrence)}: ")
    assert problem in message


@pytest.mark.parametrize(
    "tagged",
    [
        "!!str 1",
        "!!int 7",
        "!!float 1",
        "!!bool yes",
        "!!null ''",
        "!!binary aGk=",
        "!!python/object/apply:os.system [ls]",
        "!custom x",
        "! plain",
        "!<tag:yaml.org,2002:str> x",
    ],
)
def test_every_explicit_tag_is_refused(tagged: str) -> None:
    text = f"a: 1\nb: {tagged}\n"
    message = refusal(text)
    assert message.startswith(f"site.yaml:{where(text, '!')}: tag ")
    assert "is not allowed" in message


@pytest.mark.parametrize("tagged", ["!!map {a: 1}", "!!seq [1]"])
def test_explicit_tags_on_collections_are_refused(tagged: str) -> None:
    assert refusal(tagged).startswith("site.yaml:1:1: tag ")


@pytest.mark.parametrize(
    ("text", "same"), [("true: 1\nTrue: 2\n", "True"), ("1: a\n0x1: b\n", "0x1")]
)
def test_keys_that_mean_the_same_value_are_duplicates(text: str, same: str) -> None:
    assert refusal(text).startswith(f"site.yaml:{where(text, same)}: duplicate key ")


def test_keys_that_differ_in_type_or_case_are_not_duplicates() -> None:
    assert parse_yaml("a: 1\nA: 2\n1: 3\n'1': 4\n", "site.yaml") == {"a": 1, "A": 2, 1: 3, "1": 4}


def test_repeated_list_items_are_not_duplicate_keys() -> None:
    assert parse_yaml("- a\n- a\n", "site.yaml") == ["a", "a"]


def test_a_syntax_error_names_file_line_and_column() -> None:
    text = "a: 1\nb: {c: 2\n"
    message = refusal(text)
    assert message.startswith("site.yaml:")
    line, column = message.split(":")[1:3]
    assert int(line) >= 2
    assert int(column) >= 1


def test_a_character_yaml_forbids_is_refused_naming_the_file() -> None:
    assert refusal("a: \x07\n").startswith("site.yaml: not valid YAML: ")


def test_more_than_one_document_is_refused() -> None:
    text = "a: 1\n---\nb: 2\n"
    assert refusal(text).startswith(f"site.yaml:{where(text, '---')}: ")


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", "? {a: 1}\n: 1\n"])
def test_a_collection_as_a_key_is_refused_as_a_config_error(text: str) -> None:
    assert refusal(text).startswith("site.yaml:1:")


# convert


def test_good_data_converts_to_the_type() -> None:
    assert convert(GOOD, Doc, "site.yaml") == Doc(
        name="plant", listeners=[Listener(host="127.0.0.1", port=8443)]
    )


def test_a_wrong_type_names_the_key_path() -> None:
    data = {"name": "plant", "listeners": [GOOD["listeners"][0], {"host": "h", "port": "80"}]}
    assert conversion_error(data) == "site.yaml: listeners[1].port: expected `int`, got `str`"


@pytest.mark.parametrize(
    ("value", "bound"), [(0, "`int` >= 1"), (65536, "`int` <= 65535"), (-8, "`int` >= 1")]
)
def test_a_scalar_out_of_range_shows_the_value(value: int, bound: str) -> None:
    data = {"name": "plant", "listeners": [{"host": "h", "port": value}]}
    assert (
        conversion_error(data) == f"site.yaml: listeners[0].port: expected {bound}, got `{value}`"
    )


def test_a_string_too_short_shows_the_value() -> None:
    data = {**GOOD, "name": "p"}
    assert conversion_error(data) == "site.yaml: name: expected `str` of length >= 2, got `p`"


def test_a_value_shown_after_a_bound_has_its_control_characters_spelled_out() -> None:
    data = {**GOOD, "name": "\n"}
    assert conversion_error(data) == "site.yaml: name: expected `str` of length >= 2, got `\\n`"


def test_a_collection_value_is_not_shown() -> None:
    message = conversion_error({**GOOD, "listeners": []})
    assert message.startswith("site.yaml: listeners: expected `array` of length >= 1")
    assert ", got" not in message


def test_an_unknown_key_names_where_it_is() -> None:
    data = {"name": "plant", "listeners": [{"host": "h", "port": 1, "bind": "0.0.0.0"}]}
    assert conversion_error(data) == (
        "site.yaml: listeners[0]: unknown key 'bind' (known keys: host, port)"
    )


def test_an_unknown_key_close_to_a_known_one_suggests_it() -> None:
    data = {"name": "plant", "listeners": [{"host": "h", "prot": 1}]}
    assert (
        conversion_error(data)
        == "site.yaml: listeners[0]: unknown key 'prot' — did you mean 'port'?"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([GOOD], "expected an object, got a list — write it as {name: …, listeners: …}"),
        ("plant", "expected `object`, got `str`"),
        (42, "expected `object`, got `int`"),
    ],
)
def test_a_wrong_root_says_top_level(data: object, expected: str) -> None:
    assert conversion_error(data) == f"site.yaml: (top level): {expected}"


def test_a_missing_required_key_at_the_root_says_top_level() -> None:
    assert conversion_error({"name": "plant"}) == (
        "site.yaml: (top level): missing required key 'listeners'"
    )


def test_the_problem_starts_lowercase_after_the_path() -> None:
    message = conversion_error({"name": "plant"})
    problem = message.removeprefix("site.yaml: (top level): ")
    assert problem[0].islower()


def test_path_fields_resolve_against_base_dir(tmp_path: Path) -> None:
    base = tmp_path / "etc" / "broker"
    data = {**GOOD, "cert": "../tls/server.crt"}
    converted = convert(data, Doc, "site.yaml", base_dir=base)
    assert converted.cert == (tmp_path / "etc" / "tls" / "server.crt").resolve()
    assert converted.cert.is_absolute()


def test_absolute_path_fields_stay_where_they_point(tmp_path: Path) -> None:
    absolute = (tmp_path / "server.crt").resolve()
    converted = convert({**GOOD, "cert": str(absolute)}, Doc, "s", base_dir=tmp_path / "x")
    assert converted.cert == absolute


@pytest.mark.parametrize("value", ["", 3])
def test_a_path_field_that_is_not_a_path_is_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        convert({**GOOD, "cert": value}, Doc, "site.yaml", base_dir=tmp_path)
    assert str(caught.value).startswith("site.yaml: cert: expected a file system path")


# load


def write(directory: Path, content: str | bytes, name: str = "site.yaml") -> Path:
    path = directory / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, Doc)
    return str(caught.value)


def test_load_reads_parses_and_converts(tmp_path: Path) -> None:
    path = write(tmp_path, "name: plant\nlisteners:\n  - host: 127.0.0.1\n    port: 8443\n")
    assert load(path, Doc) == convert(GOOD, Doc, "x")


def test_load_resolves_paths_against_the_files_own_directory(tmp_path: Path) -> None:
    directory = tmp_path / "conf"
    directory.mkdir()
    path = write(directory, "name: plant\nlisteners: [{host: h, port: 1}]\ncert: tls/a.crt\n")
    assert load(path, Doc).cert == (directory / "tls" / "a.crt").resolve()


def test_load_errors_name_the_file_and_line(tmp_path: Path) -> None:
    text = "name: plant\nlisteners: [{host: h, port: 1}]\nname: again\n"
    path = write(tmp_path, text)
    assert load_error(path).startswith(f"{path}:{where(text, 'name:', 2)}: duplicate key")


def test_load_conversion_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "name: plant\nlisteners: [{host: h, port: 0}]\n")
    assert load_error(path) == f"{path}:2: listeners[0].port: expected `int` >= 1, got `0`"


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    assert load_error(missing) == f"{missing}: file not found"


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content)
    assert load_error(path) == f"{path}: the file is empty"


def test_invalid_utf8_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, b"name: pl\xff\xfeant\n")
    message = load_error(path)
    assert message.startswith(f"{path}: ")
    assert "utf-8" in message.lower()


def test_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    assert load_error(tmp_path).startswith(f"{tmp_path}: ")


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path) -> None:
    size = MAX_DOCUMENT_BYTES + 1
    path = write(tmp_path, b"#" * size)
    message = load_error(path)
    assert message.startswith(f"{path}: ")
    assert str(size) in message
    assert str(MAX_DOCUMENT_BYTES) in message


def test_a_file_exactly_at_the_size_limit_is_read(tmp_path: Path) -> None:
    head = b"name: plant\nlisteners: [{host: h, port: 1}]\n#"
    path = write(tmp_path, head + b"x" * (MAX_DOCUMENT_BYTES - len(head) - 1) + b"\n")
    assert path.stat().st_size == MAX_DOCUMENT_BYTES
    assert load(path, Doc).name == "plant"


# where: every error while loading a YAML document gives its line


class Range(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    low: float
    high: float
    step: float = 1.0


class Probe(msgspec.Struct, forbid_unknown_fields=True, tag="probe", tag_field="kind"):
    mode: Literal["fast", "slow"] | None = None


class Meter(msgspec.Struct, forbid_unknown_fields=True, tag="meter", tag_field="kind"):
    unit: str


class Site(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    zones: dict[str, Range] = {}
    sensors: list[Probe | Meter] = []

    def __post_init__(self) -> None:
        if self.name == "reserved":
            raise ValueError("name 'reserved' is taken")


SITE = """\
name: plant
zones:
  cold room:
    low: -30
    high: -18
  dock: {low: 0, high: 10}
sensors:
  - kind: probe
    mode: fast
  - {kind: meter, unit: kW}
"""


def site_error(text: str, check: Callable[[Site], Iterable[str]] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        from_text(text, Site, "site.yaml", check=check)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_site_document_loads() -> None:
    assert from_text(SITE, Site, "site.yaml").sensors[1] == Meter(unit="kW")


@pytest.mark.parametrize(
    ("old", "new", "line", "expected"),
    [
        ("high: -18", "high: cold", 5, "zones['cold room'].high: expected `float`, got `str`"),
        ("high: 10}", "hihg: 10}", 6, "zones.dock: unknown key 'hihg' — did you mean 'high'?"),
        ("high: 10}", "top: 10}", 6, "zones.dock: unknown key 'top' (known keys: low, high, step)"),
        ("{low: 0, high: 10}", "[0, 10]", 6,
         "zones.dock: expected an object, got a list — write it as {low: 0, high: 10}"),
        ("{low: 0, high: 10}", "[0, 10, 2]", 6,
         "zones.dock: expected an object, got a list — write it as {low: 0, high: 10, step: 2}"),
        ("{low: 0, high: 10}", "[0]", 6,
         "zones.dock: expected an object, got a list — write it as {low: …, high: …}"),
        ("mode: fast", "mode: fats", 9,
         "sensors[0].mode: invalid enum value 'fats' — did you mean 'fast'? (one of: fast, slow)"),
        ("mode: fast", "mode: quick", 9,
         "sensors[0].mode: invalid enum value 'quick' (one of: fast, slow)"),
        ("kind: meter", "kind: metre", 10,
         "sensors[1].kind: invalid value 'metre' — did you mean 'meter'? (one of: probe, meter)"),
        ("unit: kW", "units: kW", 10, "sensors[1]: unknown key 'units' — did you mean 'unit'?"),
        ("{kind: meter, unit: kW}", "{kind: meter}", 10, "sensors[1]: missing required key 'unit'"),
        ("name: plant", "name: reserved", 1, "(top level): name 'reserved' is taken"),
        # a key that is not text: at its own line, named as written (issue 15 review L1)
        ("  dock: {low", "  7: {low", 6, "zones: keys must be text, got 7"),
        ("  dock: {low", "  null: {low", 6, "zones: keys must be text, got null"),
        ("  dock: {low", "  2.5: {low", 6, "zones: keys must be text, got 2.5"),
        ("    mode: fast", "    mode: fast\n    9: x", 10, "sensors[0]: keys must be text, got 9"),
        ("name: plant", "name: plant\ntrue: 1", 2, "(top level): keys must be text, got true"),
        # a key with a backtick: named whole, at its own line (L2)
        ("    high: -18", "    \"hi`gh\": -18", 5,
         "zones['cold room']: unknown key 'hi`gh' — did you mean 'high'?"),
        ("    high: -18", "    \"a`b`c\": -18", 5,
         "zones['cold room']: unknown key 'a`b`c' (known keys: low, high, step)"),
        # a top-level key that reads like msgspec's path suffix is still the key
        ("zones:", "\"x - at `$.zones\": 1\nzones:", 2,
         "(top level): unknown key 'x - at `$.zones' (known keys: name, zones, sensors)"),
        # a value is shown once, quoted once: backslashes as written (L6)
        ("mode: fast", "mode: 'C:\\fast'", 9,
         "sensors[0].mode: invalid enum value 'C:\\fast' — did you mean 'fast'? (one of: fast, slow)"),
        ("kind: meter", "kind: 'me\\ter'", 10,
         "sensors[1].kind: invalid value 'me\\ter' — did you mean 'meter'? (one of: probe, meter)"),
    ],
)  # fmt: skip
def test_conversion_errors_give_the_line_of_the_key_and_teach(
    old: str, new: str, line: int, expected: str
) -> None:
    assert old in SITE
    assert site_error(SITE.replace(old, new)) == f"site.yaml:{line}: {expected}"


@pytest.mark.parametrize(
    ("old", "new", "written"),
    [
        ("mode: fast", 'mode: "fa\\nst\\e[31m\\u2028"', "'fa\\nst\\x1b[31m\\u2028'"),
        ("kind: meter", 'kind: "me\\rter\\x85"', "'me\\rter\\x85'"),
        ("unit: kW", '"un\\nit\\e": kW', "'un\\nit\\x1b'"),
        ("high: 10}", '"hi\\ngh": 10}', "'hi\\ngh'"),
    ],
)
def test_a_value_from_the_document_cannot_start_a_line_or_an_escape_of_its_own(
    old: str, new: str, written: str
) -> None:
    message = site_error(SITE.replace(old, new))  # site_error: one line, no newline
    assert written in message
    assert message.isprintable(), repr(message)


def test_a_check_across_fields_is_told_at_the_line_of_its_key_path() -> None:
    def check(site: Site) -> Iterator[str]:
        yield "sensors[1].unit: kW is not measured here"

    assert site_error(SITE, check) == "site.yaml:10: sensors[1].unit: kW is not measured here"


def test_a_check_naming_a_key_not_written_is_told_at_the_deepest_written_one() -> None:
    def check(site: Site) -> Iterator[str]:
        yield "zones['cold room'].step: the default step is too coarse here"

    assert site_error(SITE, check) == (
        "site.yaml:3: zones['cold room'].step: the default step is too coarse here"
    )


def test_without_lines_a_check_keeps_the_key_path_alone() -> None:
    def check(site: Site) -> Iterator[str]:
        yield "sensors[1].unit: kW is not measured here"

    data = yaml.safe_load(SITE)
    with pytest.raises(ConfigError) as caught:
        convert(data, Site, "site.dsse.json", check=check)
    assert str(caught.value) == "site.dsse.json: sensors[1].unit: kW is not measured here"


def test_keys_implied_before_conversion_are_told_at_their_mapping() -> None:
    def imply(data: Any) -> Any:
        data["zones"]["dock"]["step"] = "fine"  # as a `prepare` fills in a key people omit
        return data

    with pytest.raises(ConfigError) as caught:
        from_text(SITE, Site, "site.yaml", prepare=imply)
    assert str(caught.value) == "site.yaml:6: zones.dock.step: expected `float`, got `str`"


def test_a_document_nested_too_deeply_is_refused_naming_it() -> None:
    assert refusal("a: " + "[" * 1000 + "]" * 1000 + "\n") == (
        "site.yaml: nested too deeply to be a configuration"
    )


# broker.yaml: the same mechanism, through config.load

BROKER_YAML = """\
policy: policy.dsse.json
trust_root: trust-root.yaml
spool: {dir: spool}
audit: {dir: audit, key: audit.key}
enterprise:
  state_dir: state
  tls:
    cert: server.crt
    key: server.key
    client_ca: ca.crt
plant:
  state_dir: plant-state
  opcua:
    certificate: c.pem
    private_key: k.pem
    users:
      plc-1: {username: u, password_file: p}
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "expected"),
    [
        ("client_ca: ca.crt", "client-ca: ca.crt", 10,
         "enterprise.tls: unknown key 'client-ca' — did you mean 'client_ca'?"),
        ("    key: server.key\n", "    key: server.key\n    profile: moden\n", 10,
         "enterprise.tls.profile: invalid enum value 'moden' — did you mean 'modern'? "
         "(one of: modern, intermediate)"),
        ("{username: u, password_file: p}", "{username: u}", 17,
         "plant.opcua.users.plc-1: username and password_file go together"),
        ("spool: {dir: spool}", "spool: {dir: spool, segment_mib: 64, retention_mib: 100}", 3,
         "spool: retention_mib (100) must be at least twice segment_mib (64)"),
        ("    cert: server.crt\n", "", 7, "enterprise.tls: missing required key 'cert'"),
        ("      plc-1: {username", "      plc-1: {username: u, password_file: p}\n      2001: {username",
         18, "plant.opcua.users: keys must be text, got 2001"),
    ],
)  # fmt: skip
def test_broker_yaml_errors_give_the_line_and_teach(
    tmp_path: Path, old: str, new: str, line: int, expected: str
) -> None:
    assert old in BROKER_YAML
    path = write(tmp_path, BROKER_YAML.replace(old, new), "broker.yaml")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value).startswith(f"{path}:{line}: {expected}")


# a JSON document: read as JSON (a large generated policy), as strictly


def test_a_json_document_is_read_as_its_yaml_form_is(tmp_path: Path) -> None:
    text = json.dumps({**GOOD, "cert": "c.pem"}, indent=1)
    assert load(write(tmp_path, text), Doc) == load(
        write(tmp_path, yaml.safe_dump(GOOD | {"cert": "c.pem"}), "y.yaml"), Doc
    )


def test_a_json_document_over_the_yaml_limit_is_read(tmp_path: Path) -> None:
    listeners = [
        {"host": f"h{i:07d}", "port": 1 + i % 65535} for i in range(MAX_DOCUMENT_BYTES // 30)
    ]
    path = write(tmp_path, json.dumps({"name": "plant", "listeners": listeners}))
    assert path.stat().st_size > MAX_DOCUMENT_BYTES
    assert len(load(path, Doc).listeners) == len(listeners)


def test_a_large_document_that_is_not_json_is_refused_saying_why(tmp_path: Path) -> None:
    path = write(tmp_path, b"{" + b" " * MAX_DOCUMENT_BYTES + b"name: plant}")
    message = load_error(path)
    size = path.stat().st_size
    assert message.startswith(f"{path}: file is {size} bytes, over the {MAX_DOCUMENT_BYTES} ")
    assert "not JSON (line 1 column" in message


def test_a_file_over_the_json_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as f:
        f.truncate(MAX_JSON_DOCUMENT_BYTES + 1)  # sparse: no disk, and never read
    assert str(MAX_JSON_DOCUMENT_BYTES) in load_error(path)


def test_a_duplicate_key_in_json_is_refused(tmp_path: Path) -> None:
    text = '{"name": "plant", "listeners": [{"host": "a", "port": 1, "port": 2}]}'
    assert load_error(write(tmp_path, text)) == f"{tmp_path / 'site.yaml'}: duplicate key 'port'"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1e999"])
def test_json_numbers_beyond_doubles_are_not_taken_as_json(tmp_path: Path, number: str) -> None:
    """Then the document is YAML, and YAML's reading of the value is refused with its line."""
    text = '{"name": "plant", "listeners": [{"host": "a", "port": NUMBER}]}'.replace(
        "NUMBER", number
    )
    assert "listeners[0].port" in load_error(write(tmp_path, text))


def test_a_yaml_flow_mapping_is_still_yaml(tmp_path: Path) -> None:
    assert (
        load(write(tmp_path, "{name: plant, listeners: [{host: h, port: 1}]}"), Doc).name == "plant"
    )


def test_a_json_document_s_errors_name_the_key_path(tmp_path: Path) -> None:
    text = json.dumps({"name": "plant", "listeners": [{"host": "a", "port": 0}]})
    message = load_error(write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'site.yaml'}: listeners[0].port: ")
