"""Settings for every test process."""

from __future__ import annotations

import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs the suite on pytest-xdist workers, which ignore SIGINT (Ctrl-C is the
    # controller's). Tests of interrupted runs press Ctrl-C in their own process or in a medcap
    # subprocess, which inherits an ignored SIGINT across exec: restore Python's own handling, as in
    # a plain pytest run.
    if hasattr(config, "workerinput"):
        signal.signal(signal.SIGINT, signal.default_int_handler)
