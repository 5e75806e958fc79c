"""The host worker's bounds are read from the environment and refused, by name, when wrong."""

from __future__ import annotations

import pytest

from snapferry.activities.settings import Settings


def test_defaults_run_a_dozen_vms_side_by_side_and_four_long_operations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SNAPFERRY_HOST_CONCURRENCY", raising=False)
    monkeypatch.delenv("SNAPFERRY_HOST_LONG_CONCURRENCY", raising=False)
    settings = Settings.from_env()
    assert (settings.host_concurrency, settings.host_long_concurrency) == (16, 4)


@pytest.mark.parametrize(
    ("total", "long", "named"),
    [
        ("0", "1", "SNAPFERRY_HOST_CONCURRENCY='0'"),
        ("many", "1", "SNAPFERRY_HOST_CONCURRENCY='many'"),
        ("8", "0", "SNAPFERRY_HOST_LONG_CONCURRENCY='0'"),
        ("4", "8", "SNAPFERRY_HOST_LONG_CONCURRENCY=8 is more than SNAPFERRY_HOST_CONCURRENCY=4"),
    ],
)
def test_bad_bounds_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, total: str, long: str, named: str
) -> None:
    monkeypatch.setenv("SNAPFERRY_HOST_CONCURRENCY", total)
    monkeypatch.setenv("SNAPFERRY_HOST_LONG_CONCURRENCY", long)
    with pytest.raises(ValueError) as err:
        Settings.from_env()
    assert named in str(err.value)


def test_a_set_bound_is_what_the_worker_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPFERRY_HOST_CONCURRENCY", "24")
    monkeypatch.setenv("SNAPFERRY_HOST_LONG_CONCURRENCY", "2")
    settings = Settings.from_env()
    assert (settings.host_concurrency, settings.host_long_concurrency) == (24, 2)
