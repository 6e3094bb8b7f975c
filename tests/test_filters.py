"""core.filters speaks containerd's filter language: same grammar, same matches, same errors."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import InvalidArgument
from core.filters import match_all, parse

PLUGIN = {"type": "io.containerd.snapshotter.v1", "id": "overlayfs", "capabilities": ["rebase", "remap-ids"]}
IMAGE = {
    "name": "docker.io/library/alpine:3",
    "target": {"digest": "sha256:abc", "mediatype": "application/vnd.oci.image.index.v1+json"},
    "labels": {"com.example/team": "infra", "a.b": "c", "empty": ""},
}


def matches(filters: list[str] | str, fields: dict[str, Any]) -> bool:
    return parse(filters)(fields)


def test_equality_matches_the_field_value() -> None:
    assert matches("id==overlayfs", PLUGIN)
    assert not matches("id==native", PLUGIN)


def test_equality_needs_the_field_present() -> None:
    assert not matches('name==""', {})
    assert matches('name==""', {"name": ""})


def test_inequality_treats_an_absent_field_as_empty_like_containerd() -> None:
    assert matches("id!=native", PLUGIN)
    assert not matches("id!=overlayfs", PLUGIN)
    assert matches("missing!=x", PLUGIN)
    assert not matches('missing!=""', PLUGIN)


def test_regex_searches_unanchored() -> None:
    assert matches("type~=snapshotter", PLUGIN)
    assert matches(r"type~=^io\.containerd\.", PLUGIN)
    assert not matches("type~=^snapshotter", PLUGIN)


def test_regex_may_be_quoted_with_slashes_or_pipes() -> None:
    assert matches(r"name~=/library\/alpine/", IMAGE)
    assert matches("name~=|library/alpine:[0-9]+|", IMAGE)
    assert not matches('name~="alpine$"', IMAGE)
    assert matches('name~="alpine:3$"', IMAGE)


def test_regex_sees_an_absent_field_as_empty_like_containerd() -> None:
    assert matches("missing~=^$", PLUGIN)
    assert not matches("missing~=/./", PLUGIN)


def test_bare_fieldpath_tests_presence() -> None:
    assert matches("id", PLUGIN)
    assert not matches("name", PLUGIN)
    assert matches("labels.empty", IMAGE)


def test_comma_ands_selectors() -> None:
    assert matches("type==io.containerd.snapshotter.v1,id==overlayfs", PLUGIN)
    assert not matches("type==io.containerd.snapshotter.v1,id==native", PLUGIN)


def test_list_of_filters_ors_them() -> None:
    assert matches(["id==native", "id==overlayfs"], PLUGIN)
    assert not matches(["id==native", "id==btrfs"], PLUGIN)


@pytest.mark.parametrize("filters", [[], "", [""], ["", ""], ["", "id==native"]])
def test_no_filter_or_an_empty_one_matches_everything(filters: list[str] | str) -> None:
    assert parse(filters) is match_all
    assert matches(filters, PLUGIN)


def test_an_empty_string_does_not_excuse_a_malformed_sibling() -> None:
    with pytest.raises(InvalidArgument):
        parse(["", "id=="])


def test_quoted_field_and_value_decode_go_escapes() -> None:
    fields = {"labels": {'say "hi"\\': "tab\there", "é😀AA": "x"}}
    assert matches(r'labels."say \"hi\"\\"=="tab\there"', fields)
    assert matches(r'labels."\u00e9\U0001F600\x41\101"', fields)
    assert matches(r'labels."\xc3\xa9\U0001F600AA"==x', fields)


def test_label_keys_may_contain_dots_unquoted_or_quoted() -> None:
    assert matches("labels.a.b==c", IMAGE)
    assert matches('labels."com.example/team"==infra', IMAGE)
    assert not matches("labels.a", IMAGE)
    assert not matches("labels", IMAGE)


def test_nested_mappings_are_walked_one_field_at_a_time() -> None:
    assert matches("target.digest==sha256:abc", IMAGE)
    assert not matches("target", IMAGE)
    assert not matches("name.extra", IMAGE)


def test_list_field_matches_when_any_element_does() -> None:
    assert matches("capabilities==rebase", PLUGIN)
    assert matches("capabilities~=^remap", PLUGIN)
    assert not matches("capabilities!=rebase", PLUGIN)
    assert matches("capabilities!=other", PLUGIN)
    assert matches("capabilities", PLUGIN)
    assert not matches("capabilities", {"capabilities": []})


def test_none_is_absent_and_other_scalars_compare_as_text() -> None:
    fields = {"parent": None, "size": 42, "ready": True}
    assert not matches("parent", fields)
    assert matches("size==42,ready==true", fields)


def test_unquoted_values_keep_punctuation_and_unicode() -> None:
    fields = {"labels": {"foo": "omg_asdf.asdf-qwer"}, "name": "牛+"}
    assert matches("labels.foo==omg_asdf.asdf-qwer", fields)
    assert matches(r"name~=牛\+", fields)


def test_whitespace_is_skipped_before_fields_operators_and_values() -> None:
    assert matches("  id  ==  overlayfs,  type. v1 ~= x", {"id": "overlayfs", "type": {"v1": "x"}})


@pytest.mark.parametrize("text", ["id==overlayfs ", "id ,type", "id==overlayfs ,type", "labels .a", "id "])
def test_whitespace_elsewhere_is_rejected_like_containerd(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "==a",
        "a==",
        "a=b",
        "a===b",
        "a==!b",
        "a==.b",
        'a=="unterminated',
        'a=="two\nlines"',
        "a~=(",
        "a~=/[/",
        "a,,b",
        ",a",
        "a,",
        "a.",
        "a b",
        'a=="x"y',
        "a==/x/",
        "/a/",
        "labels.ns/key",
        r'a=="\q"',
        r'a=="\x4"',
        r'a=="\777"',
        r'a=="\U00110000"',
        "a\x00==b",
        " ",
    ],
)
def test_malformed_filters_raise_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type==a,", "[type==a,]: expected field or quoted"),
        ("labels.|foo|==x", "[labels. >|||< foo|==x]: invalid quote encountered"),
        ('labels.?"k"==v', '[labels. >|?|< "k"==v]: expected field or quoted'),
        ("image~=,id?=?fbaq", "[image~= >|,|< id?=?fbaq]: expected value or quoted"),
        ("labels.ns/key==value", "[labels.ns >|/|< key==value]: quoted literal not terminated"),
        ("labels.key==/value", "[labels.key== >|/|< value]: quoted literal not terminated"),
        ("a=b", '[a >|=|< b]: unsupported operator "="'),
        ("a b", '[a  >|b|< ]: expected an operator ("=="|"!="|"~=")'),
        ('a=="x"y', '[a=="x" >|y|< ]: unexpected input: y'),
        (r'labels."\g"', r'[labels. >|"|< \g"]: illegal escape sequence'),
        (r'labels."\xaz"', r'[labels. >|"|< \xaz"]: illegal numeric escape sequence'),
        (r'a=="\777"', r'[a== >|"|< \777"]: unquoting failed: quote syntax error'),
        ("a\x00b", "[a >|\x00|< b]: unexpected null"),
    ],
)
def test_errors_point_at_the_offending_position_like_containerd(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(text)
    assert str(caught.value) == f"filters: parse error: {message}"


def test_bad_regex_is_reported_at_parse_time() -> None:
    with pytest.raises(InvalidArgument, match=r"invalid regular expression"):
        parse("name~=a(")


CORPUS: list[dict[str, Any]] = [
    {"name": "foo", "labels": {"foo": "true"}},
    {"name": "bar"},
    {"name": "foo", "labels": {"foo": "present", "more complex label": "present"}},
    {"name": "bar", "labels": {"bar": "true"}},
    {"name": "fooer", "labels": {'more complex label with \\ and "': "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and ".post': "present"}},
    {"name": "baz", "other": "too complex, yo"},
    {"name": "bazo", "other": "abc"},
    {"name": "compound", "labels": {"foo": "omg_asdf.asdf-qwer"}},
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name", [0, 1, 2, 3, 4, 5, 6, 7, 8]),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        (r'labels."more complex label with \\ and \""==present', [4]),
        (r'labels."more complex label with \\ and \"".post==present', [5]),
    ],
)
def test_selects_the_same_objects_as_containerd(text: str, expected: list[int]) -> None:
    selected = parse(text)
    assert [i for i, fields in enumerate(CORPUS) if selected(fields)] == expected
