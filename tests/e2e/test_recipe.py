"""The seed's original recipe (tests/bench/recipe_up.sh) in the same lab: the baseline the
benchmarks compare tagrouted with, and the proof that the lab sees what breaks it (so the
tagrouted tests that survive the same events mean something)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lab import CLIENT6, PUBLIC4, PUBLIC6, Lab
from nslab import wait_for
from support import FAIL_TIMEOUT, all_paths, built_lab, expected_paths

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab(variant="openvpn", layout="seed", manager="recipe") as lab:
        yield lab


def test_the_recipe_works_on_a_quiet_day(lab: Lab) -> None:
    assert all_paths(lab) == expected_paths()


def test_the_recipe_fails_with_hardened_rp_filter(lab: Lab) -> None:
    """all.rp_filter=1: the kernel uses max(all, tun0), the recipe's tun0=0 is ignored and the
    requests out of the tunnel are dropped (IPv4 only: IPv6 has no rp_filter sysctl)."""
    lab.vpnclient.run("sysctl -qw net.ipv4.conf.all.rp_filter=1")
    try:
        assert lab.request_tcp(PUBLIC4, timeout=FAIL_TIMEOUT) is None
        assert lab.request_tcp(PUBLIC6) == CLIENT6
    finally:
        lab.vpnclient.run("sysctl -qw net.ipv4.conf.all.rp_filter=0")
    lab.wait_path()


def test_the_recipe_breaks_when_the_tunnel_restarts(lab: Lab) -> None:
    """Its `default dev tun0` in table 42 dies with tun0 and nobody puts it back."""
    lab.stop_vpn_client()
    lab.start_vpn_client()
    wait_for(lambda: lab.link_exists(lab.vpnclient, "tun0"), what="tun0 back")
    assert lab.vpnclient.out("ip -4 route show table 42").strip() == ""
    assert lab.request_tcp(PUBLIC4, timeout=FAIL_TIMEOUT) is None
