"""Page tokens: round trip, and every way a client can tamper with one is INVALID_ARGUMENT material."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsjobs.api import pagetoken as pt

KEY = b"k" * 32


def _token(project: str = "p1", flt: str = "", cont: str = "abc") -> str:
    return pt.encode(pt.PageState(project, pt.filter_digest(flt), cont), KEY)


@given(
    st.text(min_size=1, max_size=40),
    st.text(max_size=60),
    st.text(max_size=300),
    st.text(max_size=63),
)
def test_round_trip(project: str, flt: str, cont: str, after: str) -> None:
    token = pt.encode(pt.PageState(project, pt.filter_digest(flt), cont, after), KEY)
    state = pt.decode(token, KEY, project_id=project, filter_expr=flt)
    assert (state.continue_token, state.after) == (cont, after)


def test_token_is_opaque_and_urlsafe() -> None:
    token = _token(cont="secret-etcd-key")
    assert "secret-etcd-key" not in token
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_filter_whitespace_is_normalized() -> None:
    token = _token(flt='status = "SUCCESS"')
    state = pt.decode(token, KEY, project_id="p1", filter_expr='status  =  "SUCCESS" ')
    assert state.continue_token == "abc"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "not issued"),
        ("garbage", "not issued"),
        ("a.b.c", "malformed"),
        ("!!!.???", "malformed"),
        ("x" * (pt.MAX_TOKEN_LENGTH + 1), "too long"),
    ],
)
def test_garbage_is_rejected(token: str, message: str) -> None:
    with pytest.raises(pt.PageTokenError, match=message):
        pt.decode(token, KEY, project_id="p1", filter_expr="")


def test_forged_payload_is_rejected() -> None:
    body, _, mac = _token().partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["c"] = "another-continue"
    forged_body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    with pytest.raises(pt.PageTokenError, match="not issued"):
        pt.decode(f"{forged_body}.{mac}", KEY, project_id="p1", filter_expr="")


def test_other_key_is_rejected() -> None:
    with pytest.raises(pt.PageTokenError, match="not issued"):
        pt.decode(_token(), b"other" * 8, project_id="p1", filter_expr="")


def _signed(payload: dict[str, object]) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return f"{pt._b64(raw)}.{pt._b64(pt._mac(KEY, raw))}"


@pytest.mark.parametrize(
    "payload",
    [
        # Version 1 as an earlier build of the same version wrote it: a skip count under "s".
        {"v": 1, "p": "p1", "f": pt.filter_digest(""), "c": "abc", "s": 4},
        # A newer build's key this one would not understand.
        {"v": 2, "p": "p1", "f": pt.filter_digest(""), "c": "abc", "z": 1},
    ],
)
def test_a_token_of_another_version_is_refused_not_misread(payload: dict[str, object]) -> None:
    # Misread, a replica of the other version gave the listing's same page again and again.
    with pytest.raises(pt.PageTokenError, match="incompatible server version"):
        pt.decode(_signed(payload), KEY, project_id="p1", filter_expr="")


def test_what_a_token_carries_is_pinned_to_its_version() -> None:
    # Changing the keys a token carries means a new _VERSION (and this pin with it).
    assert (pt._VERSION, sorted(pt._KEYS)) == (2, ["a", "c", "f", "p", "v"])
    payload = json.loads(pt._unb64(pt.encode(pt.PageState("p1", "d", "c", "after"), KEY).partition(".")[0]))
    assert set(payload) == pt._KEYS


def test_token_of_another_project_or_filter_is_rejected() -> None:
    with pytest.raises(pt.PageTokenError, match="another project"):
        pt.decode(_token(project="p1"), KEY, project_id="p2", filter_expr="")
    with pytest.raises(pt.PageTokenError, match="another filter"):
        pt.decode(_token(flt='name = "a"'), KEY, project_id="p1", filter_expr='name = "b"')


@given(st.binary(min_size=1, max_size=60))
def test_random_bytes_never_verify(data: bytes) -> None:
    token = base64.urlsafe_b64encode(data).decode() + "." + base64.urlsafe_b64encode(data[:16]).decode()
    with pytest.raises(pt.PageTokenError):
        pt.decode(token, KEY, project_id="p1", filter_expr="")
