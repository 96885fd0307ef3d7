"""Request metadata (SPEC §7): sources, precedence and the exact limits."""

import json

import pytest

from meterproxy.errors import GatewayError
from meterproxy.metadata import MAX_PAIRS, parse_metadata


def from_query(value: object) -> dict[str, str]:
    return parse_metadata(json.dumps(value), None, [])


def refused(query=None, header=None, headers=()) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        parse_metadata(query, header, list(headers))
    error = caught.value
    assert (error.status, error.code, error.type) == (400, "invalid_metadata", "invalid_request_error")
    return error


def test_no_metadata_is_an_empty_object():
    assert parse_metadata(None, None, [("content-type", "application/json")]) == {}


def test_query_json():
    assert parse_metadata('{"user_id": "u_42", "plan": "pro"}', None, []) == {"user_id": "u_42", "plan": "pro"}


def test_header_json():
    assert parse_metadata(None, '{"user_id": "u_42"}', []) == {"user_id": "u_42"}


def test_per_key_headers():
    headers = [("X-Lava-Metadata-user_id", "u_42"), ("x-lava-metadata-Plan", "pro"), ("accept", "*/*")]
    assert parse_metadata(None, None, headers) == {"user_id": "u_42", "Plan": "pro"}


def test_the_json_header_is_not_read_as_a_per_key_header():
    headers = [("x-lava-metadata", '{"a": "1"}'), ("x-lava-metadata-b", "2")]
    assert parse_metadata(None, '{"a": "1"}', headers) == {"a": "1", "b": "2"}


def test_later_sources_win_per_key():
    metadata = parse_metadata(
        '{"a": "query", "b": "query", "c": "query"}',
        '{"b": "header", "c": "header"}',
        [("x-lava-metadata-c", "per-key")],
    )
    assert metadata == {"a": "query", "b": "header", "c": "per-key"}


def test_the_limits_apply_to_the_merged_object():
    query = {f"q{i}": "v" for i in range(60)}
    header = {f"h{i}": "v" for i in range(40)}
    assert len(parse_metadata(json.dumps(query), json.dumps(header), [])) == 100
    error = refused(json.dumps(query), json.dumps(header), [("x-lava-metadata-one_more", "v")])
    assert error.message == "metadata has 101 pairs; at most 100 are allowed"


# --- limits, exactly at and one past ----------------------------------------------------------


def test_100_pairs_are_accepted():
    assert MAX_PAIRS == 100
    metadata = {f"k{i}": "v" for i in range(100)}
    assert from_query(metadata) == metadata


def test_101_pairs_are_refused():
    error = refused(json.dumps({f"k{i}": "v" for i in range(101)}))
    assert error.message == "metadata has 101 pairs; at most 100 are allowed"


@pytest.mark.parametrize("length, ok", [(1, True), (255, True), (256, False)])
def test_key_length(length, ok):
    key = "k" * length
    if ok:
        assert from_query({key: "v"}) == {key: "v"}
    else:
        assert "metadata keys are 1-255 characters" in refused(json.dumps({key: "v"})).message


@pytest.mark.parametrize("key", ["abc", "ABC", "a1", "123", "_", "user_id_2", "A_b_9"])
def test_key_characters_accepted(key):
    assert from_query({key: "v"}) == {key: "v"}


@pytest.mark.parametrize("key", ["", "user-id", "user id", "user.id", "ключ", "clé", "k\n", "k\x00", "k$", "１"])
def test_key_characters_refused(key):
    error = refused(json.dumps({key: "v"}))
    assert error.message == "metadata keys are 1-255 characters of ASCII letters, digits and '_'"


def test_an_empty_per_key_header_name_is_refused():
    refused(headers=[("x-lava-metadata-", "v")])


def test_a_dash_in_a_per_key_header_is_refused():
    refused(headers=[("x-lava-metadata-user-id", "u_42")])


@pytest.mark.parametrize("length", [1, 255])
def test_value_length_accepted(length):
    assert from_query({"k": "v" * length}) == {"k": "v" * length}


@pytest.mark.parametrize(
    "value",
    ["", "v" * 256, 1, 0, 1.5, True, None, ["a"], {"a": "b"}],
    ids=["empty", "256", "int", "zero", "float", "bool", "null", "list", "object"],
)
def test_values_refused(value):
    error = refused(json.dumps({"k": value}))
    assert error.message == "metadata value of 'k' must be a string of 1-255 characters"


def test_an_empty_per_key_header_value_is_refused():
    refused(headers=[("x-lava-metadata-k", "")])


# --- malformed sources ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["[]", '["a"]', '"a"', "1", "null", "true"])
@pytest.mark.parametrize("source", ["query", "header"])
def test_non_object_json_is_refused(source, raw):
    error = refused(**{source: raw})
    name = "query parameter metadata" if source == "query" else "header x-lava-metadata"
    assert error.message == f"{name} must be a JSON object"


@pytest.mark.parametrize("raw", ["", "{", "{'a': 'b'}", '{"a": "b",}', "a=b", '{"a": "b"} x'])
@pytest.mark.parametrize("source", ["query", "header"])
def test_invalid_json_is_refused(source, raw):
    error = refused(**{source: raw})
    name = "query parameter metadata" if source == "query" else "header x-lava-metadata"
    assert error.message == f"{name} is not valid JSON"


def test_deeply_nested_metadata_is_a_400_not_a_crash():
    refused("[" * 100_000 + "]" * 100_000)
