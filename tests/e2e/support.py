"""Helpers shared by the end-to-end modules: one lab per module, the daemon-needed skip, and
the numbers measured on the way (shown in the test summary by conftest.py, passing runs too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from lab import Lab, daemon_available

MEASUREMENTS: list[str] = []
DAEMON = daemon_available()
needs_daemon = pytest.mark.skipif(
    not DAEMON, reason="the tagrouted daemon is not installed (no tagrouted.daemon_main): "
    "the lab ran `tagroutectl apply` instead, which cannot react to tunnel flaps or flushes")


def measured(line: str) -> None:
    MEASUREMENTS.append(line)
    print(line)


@contextmanager
def built_lab(**kwargs: Any) -> Iterator[Lab]:
    """A lab for one module; skipped without root (it builds network namespaces)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab(**kwargs) as lab:
        measured(f"lab {lab.variant}/{lab.layout} with {lab.manager}: built in "
                 f"{lab.timings['build']:.2f} s (tunnel up {lab.timings['tunnel_up']:.2f} s after "
                 "the client started)")
        yield lab
