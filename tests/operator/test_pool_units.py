from datetime import timedelta

import pytest

from tars_operator.units import format_mebibytes, parse_duration, parse_quantity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s", timedelta(seconds=10)),
        ("5m", timedelta(minutes=5)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(minutes=90)),
        ("250ms", timedelta(milliseconds=250)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "10", "5 m", "-1s", "1d", "m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128Mi", 128 * 2**20),
        ("2Gi", 2 * 2**30),
        ("1G", 10**9),
        ("1.5Ki", 1536),
        ("1000", 1000),
        ("0.5k", 500),
    ],
)
def test_parse_quantity(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "1e9", "128mi", "Mi", "100m", "-1Gi"])
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        parse_quantity(text)


@pytest.mark.parametrize(("n", "text"), [(2**20, "1Mi"), (2**20 + 1, "2Mi"), (10**9, "954Mi")])
def test_format_mebibytes_rounds_up(n: int, text: str) -> None:
    assert format_mebibytes(n) == text
