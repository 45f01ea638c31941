"""End to end in the other shapes the seed is run in: WireGuard (wireguard-go) instead of
OpenVPN, and the combined layout (a VPS that is gateway + VPN server, a home router that is VPN
client + service), with OpenVPN and with WireGuard. One lab per shape, tagrouted on every host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from firewall_view import BACKENDS
from lab import CLIENT4, LANHOST4, LANHOST6, PUBLIC4, SPARE_TLS_PORT, SPARE_UDP_PORT, TLS_PORT, Lab
from nslab import wait_for
from peer_echo import ask_tcp
from support import FAIL_TIMEOUT, PATHS, all_paths, built_lab, expected_paths, require_daemon

pytestmark = pytest.mark.e2e

SHAPES = [(v, lay, b) for v, lay in [("wireguard", "seed"), ("openvpn", "combined"), ("wireguard", "combined")]
          for b in BACKENDS]


@pytest.fixture(scope="module", params=SHAPES, ids=[f"{v}-{lay}-{b}" for v, lay, b in SHAPES])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    variant, layout, backend = request.param
    with built_lab(variant=variant, layout=layout, manager="tagrouted", backend=backend) as lab:
        yield lab


def test_service_sees_the_clients_own_address(lab: Lab) -> None:
    assert all_paths(lab) == expected_paths()


def test_every_host_is_in_sync(lab: Lab) -> None:
    for host in lab.configs:
        res = lab.tagroutectl(host, "diff")
        assert res.returncode == 0, f"{host} drifted:\n{res.stdout}{res.stderr}"


def test_doctor_finds_nothing_wrong_on_any_host(lab: Lab) -> None:
    for host in lab.configs:
        res = lab.tagroutectl(host, "doctor")
        assert res.returncode == 0, f"{host}:\n{res.stdout}{res.stderr}"


def test_nothing_unconfigured_is_reachable(lab: Lab) -> None:
    for public, _client, family in PATHS:
        before = lab.arrivals(lab.web, "udp", SPARE_UDP_PORT, family)
        assert lab.request_udp(public, SPARE_UDP_PORT, timeout=FAIL_TIMEOUT) is None
        assert lab.arrivals(lab.web, "udp", SPARE_UDP_PORT, family) == before
    # from the VPN server's side of the tunnel: no LAN host that is no service (and, where the
    # service host is not the VPN client itself, no other port of it: a home router's own ports
    # are its INPUT, which DESIGN leaves to the host's firewall)
    probes = [(LANHOST4, TLS_PORT, lab.lanhost, 4), (LANHOST6, TLS_PORT, lab.lanhost, 6)]
    if lab.layout == "seed":
        probes.append((lab.service4, SPARE_TLS_PORT, lab.web, 4))
    for address, port, host, family in probes:
        before = lab.arrivals(host, "tcp", port, family)
        lab.vpnserver.call(ask_tcp, address, port, FAIL_TIMEOUT)
        assert lab.arrivals(host, "tcp", port, family) == before, f"{address}:{port} reached from the tunnel"


def test_control_without_tagrouted_on_the_service_host_the_reply_leaks(lab: Lab) -> None:
    service_host = "web" if lab.layout == "seed" else "vpnclient"
    try:
        lab.stop_tagrouted([service_host], remove_state=True)
        before = lab.arrivals(lab.web, "tcp", TLS_PORT, 4)
        assert lab.request_tcp(PUBLIC4, timeout=FAIL_TIMEOUT) is None
        assert lab.arrivals(lab.web, "tcp", TLS_PORT, 4) > before, "the request did not even arrive"
    finally:
        if lab.manager == "tagrouted":
            lab.start_tagrouted([service_host])
        else:
            lab.apply_tagrouted([service_host])
    lab.wait_path(timeout=30)
    assert all_paths(lab) == expected_paths()


def test_tunnel_restart_works_again(lab: Lab, report: Callable[[str], None]) -> None:
    require_daemon(lab)
    lab.stop_vpn_client()
    t0 = time.monotonic()
    lab.start_vpn_client(wait=False)
    wait_for(lambda: lab.request_tcp(PUBLIC4, timeout=1.0) == CLIENT4, timeout=30, interval=0.02,
             what="TLS through the public address after the restart")
    report(f"{lab.variant}/{lab.layout} client restart: path working again after "
           f"{time.monotonic() - t0:.2f} s (from the client's start)")
    assert all_paths(lab) == expected_paths()
