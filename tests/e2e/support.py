"""Helpers shared by the end-to-end modules: one lab per module, the daemon-needed skip, and
the numbers measured on the way (shown in the test summary by conftest.py, passing runs too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from lab import CLIENT4, CLIENT6, PUBLIC4, PUBLIC6, TLS_PORT, UDP_PORT, Lab

MEASUREMENTS: list[str] = []


def require_daemon(lab: Lab) -> None:
    """Skip a test that needs the long-running daemon when the lab could only `apply`."""
    if lab.manager != "tagrouted":
        pytest.skip("the tagrouted daemon is not installed (no tagrouted.daemon.main): the lab "
                    "ran `tagroutectl apply` instead, which cannot react to tunnel flaps or flushes")


def measured(line: str) -> None:
    MEASUREMENTS.append(line)
    print(line)


@contextmanager
def built_lab(**kwargs: Any) -> Iterator[Lab]:
    """A lab for one module; skipped without root (it builds network namespaces)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab(**kwargs) as lab:
        backend = f" ({lab.backend})" if lab.backend else ""
        measured(f"lab {lab.variant}/{lab.layout} with {lab.manager}{backend}: built in "
                 f"{lab.timings['build']:.2f} s (tunnel up {lab.timings['tunnel_up']:.2f} s after "
                 "the client started)")
        yield lab


PATHS = [(PUBLIC4, CLIENT4, 4), (PUBLIC6, CLIENT6, 6)]   # public address, client, family
FAIL_TIMEOUT = 2.0  # how long a request that is expected to fail waits for an answer


def ask(lab: Lab, proto: str, address: str, port: int | None = None,
        timeout: float = 3.0) -> str | None:
    if proto == "tcp":
        return lab.request_tcp(address, port or TLS_PORT, timeout=timeout)
    return lab.request_udp(address, port or UDP_PORT, timeout=timeout)


def all_paths(lab: Lab, timeout: float = 3.0) -> dict[tuple[str, str], str | None]:
    """TLS and UDP through both public addresses: what the service saw, per (proto, address)."""
    return {(proto, public): ask(lab, proto, public, timeout=timeout)
            for public, _client, _family in PATHS for proto in ("tcp", "udp")}


def expected_paths() -> dict[tuple[str, str], str | None]:
    return {(proto, public): client for public, client, _f in PATHS for proto in ("tcp", "udp")}
