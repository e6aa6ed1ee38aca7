"""The operator's JSON parsing: same values as json, and Kopf's watch stream really uses it."""

from __future__ import annotations

import inspect
import json

import pytest
from kopf._cogs.clients import api as kopf_api

from dsjobs.controller import fastjson

DOCS = [
    b'{"type":"MODIFIED","object":{"kind":"Pod","metadata":{"name":"p","labels":{"a":"b"}},'
    b'"spec":{"containers":[{"name":"c","args":["x","\\u00e9",""]}]},"status":{"phase":"Pending"}}}',
    '{"ünïcode":"日本","n":-1,"f":1.5e3,"t":true,"z":null,"e":[],"o":{}}'.encode(),
    b'{"big":123456789012345678901234567890,"nan":NaN}',  # orjson refuses both; json accepts them
]


@pytest.mark.parametrize("doc", DOCS)
def test_loads_gives_what_json_gives(doc: bytes) -> None:
    # Compared serialised: NaN != NaN, but both print it the same way.
    assert json.dumps(fastjson.loads(doc)) == json.dumps(json.loads(doc))


def test_loads_still_rejects_what_is_not_json() -> None:
    with pytest.raises(ValueError):
        fastjson.loads(b'{"unterminated": ')


def test_install_makes_kopf_watch_lines_parse_with_it() -> None:
    # Kopf parses each watch line with its module's `json.loads`: the patch point must stay.
    assert "json.loads(" in inspect.getsource(kopf_api.stream)
    fastjson.install()
    fastjson.install()  # idempotent
    assert kopf_api.json.loads is fastjson.loads
    assert kopf_api.json.loads(DOCS[0].decode()) == json.loads(DOCS[0])
