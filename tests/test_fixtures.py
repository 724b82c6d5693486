"""The shared test helpers that carry a rule: a missing tool or data folder skips on a user's
machine and fails in CI (``tests.fixtures.skip_missing``), and every such skip goes through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures import in_ci, skip_missing

TESTS = Path(__file__).resolve().parent


def test_skip_missing_skips_here_and_fails_in_ci(monkeypatch):
    for value in (None, "", "false", "0"):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        assert not in_ci()
        with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
            skip_missing("chromium is not installed")
    for value in ("true", "True", "1"):
        monkeypatch.setenv("CI", value)
        assert in_ci()
        with pytest.raises(pytest.fail.Exception, match=r"chromium is not installed .*CI=true"):
            skip_missing("chromium is not installed")


# Skips that are not about a broken environment, and so stay skips in CI.
ALLOWED_SKIPS = {
    # The slow full-size test (off by default) waits for free RAM on a shared machine.
    ("train/test_fullsize.py", "pytest.skip("),
}


def test_every_environment_skip_goes_through_skip_missing():
    """A new skip written as ``pytest.skip`` / ``skipif`` / ``importorskip`` would pass CI with a
    missing install step: tests skip through ``skip_missing`` (or are listed above with the reason)."""
    found = set()
    for path in TESTS.rglob("*.py"):
        rel = path.relative_to(TESTS).as_posix()
        if rel in ("fixtures.py", "test_fixtures.py"):
            continue
        for hit in re.findall(r"pytest\.skip\(|pytest\.mark\.skipif|pytest\.importorskip", path.read_text()):
            found.add((rel, hit))
    assert found == ALLOWED_SKIPS
