"""List filters and settings of the API."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dsjobs.api import listfilter, settings
from dsjobs.api.core import transfer_ttl
from dsjobs.models import JobPhase

# --- filters ------------------------------------------------------------------------------------

FIELDS = {"id": "j1", "name": "train", "status": "SUCCESS", "created_by_id": "alice", "parent_job_id": ""}


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("", True),
        ('status = "SUCCESS"', True),
        ("status = success", True),
        ("status != SUCCESS", False),
        ('status IN ("ERROR", "SUCCESS")', True),
        ("status NOT IN (ERROR, CANCELLED)", True),
        ('status = "SUCCESS" AND created_by_id = "bob"', False),
        ("name = 'train' and id = j1", True),
        ('parent_job_id = ""', True),
        ('status = "SUCCESS"  \t\n', True),  # trailing blanks end the filter
        ("   ", True),
    ],
)
def test_filters(text: str, matches: bool) -> None:
    assert listfilter.parse(text).matches(FIELDS) is matches


def test_a_blank_filter_is_no_filter() -> None:
    assert not listfilter.parse(" \t ") and listfilter.parse("id = j1")


@pytest.mark.parametrize("phase", list(JobPhase))
def test_every_phase_is_a_status_the_filter_knows(phase: JobPhase) -> None:
    # The proto's JobStatus names are the model's phases (test_convert); the filter takes each.
    assert listfilter.parse(f"status = {phase.value}").matches({**FIELDS, "status": phase.value})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("owner = x", "unknown field 'owner'"),
        ("status = RUNNING", "unknown status"),
        ("name =", "expected a value"),
        ("name = a OR name = b", "expected AND"),
        ("status = SUCCESS AND  ", "unexpected end, expected word"),
        ("name IN (a, b", r"expected \)"),
        ('name IN ("a" "," "b")', r"expected \)"),  # a quoted comma is a value, not a separator
        ("name ~ a", "unexpected character '~' at position 5; a condition is field = value"),
        ('name = "abc', 'unterminated string at position 7: no closing "'),
        (
            '(status = "X")',
            r"expected a field \(id, name, .*\) at position 0, found '\('; conditions are not grouped",
        ),
        ("x" * 1001, "at most 1000"),
    ],
)
def test_bad_filters(text: str, message: str) -> None:
    with pytest.raises(listfilter.FilterError, match=message):
        listfilter.parse(text)


# --- settings -----------------------------------------------------------------------------------


def test_defaults() -> None:
    s = settings.from_args([], environ={})
    assert s.listen == "0.0.0.0:9090" and s.metrics_listen == "0.0.0.0:9091"
    assert s.auth_mode == "kubernetes"
    assert s.url_ttl == timedelta(minutes=15)
    assert s.page_token_key_is_random and len(s.page_token_key) >= 16


def test_replicas_without_a_key_derive_the_same_one_from_the_storage_key() -> None:
    # Page 2 of a List may be asked of another replica: all must sign alike.
    a = settings.derived_page_token_key("storage-secret")
    assert a == settings.derived_page_token_key("storage-secret") and len(a) >= 16
    assert a != settings.derived_page_token_key("another-storage-secret")
    assert b"storage-secret" not in a


def test_flags_win_over_environment(tmp_path: pytest.TempPathFactory) -> None:
    env = {
        "DSJOBS_API_LISTEN": "127.0.0.1:1",
        "DSJOBS_API_URL_TTL": "30m",
        "DSJOBS_API_PAGE_TOKEN_KEY": "x" * 20,
    }
    s = settings.from_args(["--listen", "127.0.0.1:2"], environ=env)
    assert s.listen == "127.0.0.1:2"
    assert s.url_ttl == timedelta(minutes=30)
    assert s.page_token_key == b"x" * 20 and not s.page_token_key_is_random


def test_an_empty_variable_is_an_unset_one_but_where_empty_means_off() -> None:
    # The operator reads the same ConfigMap so: a key kept with "" crash-looped the API alone.
    env = {s.env: "" for s in settings.SETTINGS}
    s = settings.from_args([], environ=env)
    assert (s.listen, s.storage_credentials, s.log_level) == ("0.0.0.0:9090", "operator", "INFO")
    assert (
        s.url_ttl == timedelta(minutes=15)
        and s.max_concurrent_rpcs == settings.from_args([], {}).max_concurrent_rpcs
    )
    assert s.metrics_listen == ""  # documented: empty disables the metrics endpoint


def test_static_tokens_imply_static_auth() -> None:
    s = settings.from_args([], environ={"DSJOBS_API_STATIC_TOKENS": "/tmp/tokens.yaml"})
    assert s.auth_mode == "static"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DSJOBS_API_URL_TTL": "2h"}, "between 1m and 1h"),
        ({"DSJOBS_API_URL_TTL": "soon"}, "DSJOBS_API_URL_TTL"),
        ({"DSJOBS_API_AUTH": "none"}, "kubernetes"),
        ({"DSJOBS_API_AUTH": "static"}, "token file"),
        ({"DSJOBS_API_TLS_CERT": "c.pem"}, "both"),
        ({"DSJOBS_API_PAGE_TOKEN_KEY": "short"}, "16 bytes"),
        ({"DSJOBS_API_MAX_MESSAGE_BYTES": "ten"}, "not an integer"),
        # The official CLI would ask for a response it cannot receive again and again.
        (
            {"DSJOBS_API_MAX_RESPONSE_BYTES": str(4 << 20)},
            "DSJOBS_API_MAX_RESPONSE_BYTES: must be at most 2097152",
        ),
        ({"DSJOBS_API_LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        # A poll interval or a timeout that never comes round.
        ({"DSJOBS_API_LOG_POLL": "infinity"}, "DSJOBS_API_LOG_POLL: must be at most 365d"),
        ({"DSJOBS_API_DRAIN_TIMEOUT": "400d"}, "DSJOBS_API_DRAIN_TIMEOUT: must be at most 365d"),
    ],
)
def test_bad_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(settings.SettingsError, match=message):
        settings.from_args([], environ=env)


def test_every_bad_setting_is_named_at_once() -> None:
    # Told one at a time, each mistake cost the admin a crash loop and a rollout.
    env = {
        "DSJOBS_API_URL_TTL": "5h",
        "DSJOBS_API_MAX_MESSAGE_BYTES": "lots",
        "DSJOBS_API_LOG_LEVEL": "loud",
        "DSJOBS_API_DRAIN_TIMEOUT": "-1s",
    }
    env = {k: v for k, v in env.items() if any(s.env == k for s in settings.SETTINGS)}
    assert len(env) == 4, "a variable's name changed"
    with pytest.raises(settings.SettingsError) as caught:
        settings.from_args([], environ=env)
    named = sorted(line.split(":", 1)[0] for line in str(caught.value).splitlines())
    assert named == sorted(env), str(caught.value)


def test_every_setting_has_a_field_or_feeds_one() -> None:
    from dataclasses import fields

    names = {f.name for f in fields(settings.Settings)}
    assert {s.name for s in settings.SETTINGS} - names == {"page_token_key_file"}


def test_the_settings_class_defaults_are_the_servers() -> None:
    # Settings() (what tests and embedders build) holds the defaults a server started with no
    # variable gets: a second copy of them had drifted (max_log_streams 4000, the server's 500).
    from dataclasses import fields

    served = settings.from_args([], environ={})
    bare = settings.Settings()
    own_key = {"page_token_key", "page_token_key_is_random"}  # random per process unless given
    differ = {f.name for f in fields(bare) if getattr(bare, f.name) != getattr(served, f.name)}
    assert differ - own_key == set()


def test_transfer_ttl_covers_all_files_on_a_slow_link() -> None:
    base = timedelta(minutes=15)
    assert transfer_ttl(base, 0) == base
    assert transfer_ttl(base, 10 << 30) == base + timedelta(seconds=40960)  # 10 GiB at 256 KiB/s
    assert transfer_ttl(base, 1 << 50) == timedelta(hours=12)
    assert transfer_ttl(timedelta(hours=1), 1) > timedelta(hours=1)
