"""brokers.base.url_options: the one reader of every engine's URL options (names, kinds,
unknown, repeated and bad values, percent-encoding), and each engine's use of it."""

from __future__ import annotations

import pytest

from tidings.brokers import create_broker
from tidings.brokers.base import OptionKind, url_options

KNOWN: dict[str, OptionKind] = {
    "prefix": str,
    "timeout": float,
    "replicas": int,
    "unlogged": bool,
    "storage": ("file", "memory"),
}


def test_options_are_converted_and_absent_ones_default() -> None:
    rest, options = url_options(
        "x://h:1/db?prefix=app&timeout=2.5&replicas=3.0&unlogged=ON&storage=memory", "x", KNOWN
    )
    assert rest == "x://h:1/db"
    assert options.get("prefix", "") == "app"
    assert options.get("timeout", 5.0) == 2.5
    assert options.get("replicas", 1) == 3 and type(options.get("replicas", 1)) is int
    assert options.get("unlogged", False) is True
    assert options.get("storage", "file") == "memory"
    _, none = url_options("x://h:1", "x", KNOWN)
    assert (none.get("timeout", 5.0), none.get("replicas", 1), none.get("unlogged", False)) == (
        5.0,
        1,
        False,
    )
    assert "timeout" in options and "timeout" not in none
    for raw, flag in [("1", True), ("yes", True), ("true", True), ("0", False), ("off", False)]:
        assert url_options(f"x://h?unlogged={raw}", "x", KNOWN)[1].get("unlogged", True) is flag
    assert url_options("x://h?replicas=1e2", "x", KNOWN)[1].get("replicas", 1) == 100


def test_unknown_options_are_an_error_unless_passed_through() -> None:
    with pytest.raises(
        ValueError,
        match=r"^unknown x URL option\(s\): a, b; known: prefix, timeout, replicas, unlogged, "
        r"storage$",
    ):
        url_options("x://h?b=1&prefix=p&a=2&b=3", "x", KNOWN)
    rest, options = url_options("x://h/0?b=1&prefix=p&a=2&b=3", "x", KNOWN, passthrough=True)
    assert rest == "x://h/0?b=1&a=2&b=3"  # theirs, repeats and order kept
    assert options.get("prefix", "") == "p"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("timeout=soon", "timeout='soon': expected a positive number of seconds"),
        ("timeout=0", "timeout='0': expected a positive number of seconds"),
        ("timeout=-1", "timeout='-1': expected a positive number of seconds"),
        ("timeout=nan", "timeout='nan': expected a positive number of seconds"),
        # infinity is no number of seconds: nats' max_age=inf failed at start, OverflowError
        ("timeout=inf", "timeout='inf': expected a positive number of seconds"),
        ("timeout=1e400", "timeout='1e400': expected a positive number of seconds"),
        ("timeout=", "timeout='': expected a positive number of seconds"),
        ("replicas=1.5", "replicas='1.5': expected a positive whole number"),
        ("replicas=0", "replicas='0': expected a positive whole number"),
        ("replicas=inf", "replicas='inf': expected a positive whole number"),
        ("replicas=two", "replicas='two': expected a positive whole number"),
        ("unlogged=maybe", "unlogged='maybe': expected true or false (or 1/0, yes/no, on/off)"),
        ("storage=disk", "storage='disk': expected file or memory"),
        # an empty value (a failed ${VAR} substitution) is not the default
        ("prefix=", "prefix='': expected a value (it is empty)"),
    ],
)
def test_a_bad_value_names_the_option_and_what_it_expects(query: str, expected: str) -> None:
    for passthrough in (False, True):
        with pytest.raises(ValueError) as info:
            url_options(f"x://h?{query}", "x", KNOWN, passthrough=passthrough)
        assert str(info.value) == f"x URL option {expected}"


def test_a_repeated_option_is_an_error() -> None:
    """Which of two values the user meant is not for the engine to guess."""
    for query in ("timeout=1&timeout=2", "prefix=a&prefix=a", "prefix=a&pre%66ix=b"):
        for passthrough in (False, True):
            with pytest.raises(ValueError, match=r"^x URL option (timeout|prefix) is given more"):
                url_options(f"x://h?{query}", "x", KNOWN, passthrough=passthrough)


def test_names_and_values_are_percent_decoded() -> None:
    rest, options = url_options(
        "x://u:p%40w@h:1/d%2Fb?pre%66ix=a%20b%26c+d&other=x%2By+z&timeout=%32", "x", KNOWN,
        passthrough=True,
    )  # fmt: skip
    assert options.get("prefix", "") == "a b&c d"
    assert options.get("timeout", 5.0) == 2.0
    # what is not ours is decoded and encoded again (form encoding), the rest left as it was
    assert rest == "x://u:p%40w@h:1/d%2Fb?other=x%2By+z"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1/0?prefix=a&prefix=b", "redis URL option prefix is given more"),
        ("postgresql://h/db?pool_size=2&pool_size=3", "postgresql URL option pool_size is given"),
        ("postgresql://h/db?pool_size=2.5", "pool_size='2.5': expected a positive whole number"),
        ("postgresql://h/db?unlogged=maybe", "unlogged='maybe': expected true or false"),
        ("nats://127.0.0.1?timeout=1&timeout=2", "nats URL option timeout is given more"),
        ("nats://127.0.0.1?max_age=inf", "max_age='inf': expected a positive number of"),
        ("redis://127.0.0.1/0?ping_interval=inf", "ping_interval='inf': expected a positive"),
        ("nats://127.0.0.1?replicas=1.5", "replicas='1.5': expected a positive whole number"),
        ("nats://127.0.0.1?x=1", r"unknown nats URL option\(s\): x; known: prefix, timeout"),
        ("kafka://k:9092?x=1", r"unknown kafka URL option\(s\): x; known: prefix, topic"),
        ("kafka://k:9092?repair=maybe", "repair='maybe': expected true or false"),
        ("kafka://k:9092?topic=a&topic=b", "kafka URL option topic is given more"),
    ],
)
def test_every_engine_reads_its_options_the_same_way(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_broker(url)
