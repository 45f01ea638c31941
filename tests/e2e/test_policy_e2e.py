"""End to end: per-service policy that the client's true source address makes possible
(issue 13), with OpenVPN and with WireGuard, on both firewall backends.

The lab has extra Internet client addresses, a tunnel of MTU 1280 whose own MSS clamping is off
(OpenVPN `mssfix 0`; WireGuard has none) and an ISP that drops ICMP "fragmentation needed" /
"packet too big" (a PMTU black hole). What a user checks:
- allow_from: an allowed second client address is served, others are not, and nothing of theirs
  reaches the service host; the VPN client enforces it as well when the gateway does not;
- rate_limit: 30 quick connections against a limited service get only its burst through (the
  rest counted as limited) while an unlimited one serves all 30, and a connection opened before
  stays usable throughout;
- mss_clamp: a 6000-byte exchange both ways, from a client address the service host has never
  seen, completes with the default (pmtu) and stalls with `mss_clamp: off`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from firewall_view import BACKENDS
from lab import BULK_PORTS, CLIENT4, PUBLIC4, PUBLIC6, Lab, client_address
from nslab import wait_for
from support import FAIL_TIMEOUT, built_lab, require_daemon

pytestmark = pytest.mark.e2e

OPEN_PORT, LIMITED_PORT, GUARDED_PORT = BULK_PORTS
BURST = 10
ALLOWED = 1          # client_address(f, 1) is allowed to the guarded service
EXCHANGE = 6000
STALL = 8.0          # how long an exchange that is expected to stall is given

GUARDED4 = f'allow_from: ["{client_address(4, ALLOWED)}/32"]'
GATEWAY_SERVICES = f"""\
  - {{name: open, proto: tcp, port: {OPEN_PORT}, address: 192.168.100.3}}
  - {{name: open6, proto: tcp, port: {OPEN_PORT}, address: "fd00:100::3"}}
  - {{name: limited, proto: tcp, port: {LIMITED_PORT}, address: 192.168.100.3, rate_limit: 1/min, burst: {BURST}}}
  - {{name: guarded, proto: tcp, port: {GUARDED_PORT}, address: 192.168.100.3, {GUARDED4}}}
  - {{name: guarded6, proto: tcp, port: {GUARDED_PORT}, address: "fd00:100::3",
     allow_from: ["{client_address(6, ALLOWED)}"]}}
"""
# The VPN client admits the same services; it enforces allow_from too (rate limits stay at the gateway).
VPN_CLIENT_SERVICES = GATEWAY_SERVICES
FRESH: dict[int, Iterator[int]] = {}  # per lab: addresses nobody used yet (the service host caches path MTUs)


def fresh(lab: Lab, family: int) -> str:
    i = next(FRESH[id(lab)])
    assert i <= lab.extra_clients, "the lab has no fresh client address left: raise extra_clients"
    return client_address(family, i)

SHAPES = [(v, b) for v in ("openvpn", "wireguard") for b in BACKENDS]


def _edit(lab: Lab, host: str, after: str, insert: str) -> None:
    text = lab.configs[host].read_text()
    assert after in text, f"{after!r} not in {host}'s config"
    lab.configs[host].write_text(text.replace(after, after + insert, 1))


def reload(lab: Lab, *hosts: str) -> None:
    for host in hosts:
        res = lab.tagroutectl(host, "reload")
        assert res.returncode == 0, res.stdout + res.stderr
    for host in hosts:
        wait_for(lambda host=host: lab.tagroutectl(host, "diff").returncode == 0, timeout=20,
                 what=f"{host} in sync after the reload")


@pytest.fixture(scope="module", params=SHAPES, ids=[f"{v}-{b}" for v, b in SHAPES])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    variant, backend = request.param
    with built_lab(variant=variant, layout="seed", manager="tagrouted", backend=backend,
                   extra_clients=16, tunnel_mtu=1280, tunnel_clamps=False, pmtu_blackhole=True) as lab:
        require_daemon(lab)
        FRESH[id(lab)] = itertools.count(2)  # a new lab: every extra address is fresh again
        _edit(lab, "remote", "services:\n", GATEWAY_SERVICES)
        _edit(lab, "vpnclient", "services:\n", VPN_CLIENT_SERVICES)
        reload(lab, "remote", "vpnclient")
        yield lab


def service_status(lab: Lab, host: str, name: str) -> dict[str, object]:
    status = lab.status(host) or {}
    return next(s for s in status.get("services", []) if s["name"] == name)


def counted(lab: Lab, host: str, name: str, key: str, at_least: int) -> int:
    """Wait until status shows at least `at_least` for the service's `key` (counters are read
    on every firewall and timer pass); return what it shows."""
    seen: dict[str, object] = {}

    def enough() -> bool:
        seen.update(service_status(lab, host, name))
        value = seen.get(key)
        return isinstance(value, int) and value >= at_least
    wait_for(enough, timeout=15, interval=0.2, what=f"{host} status: {name} {key} >= {at_least} ({seen})")
    value = seen[key]
    assert isinstance(value, int)
    return value


@pytest.mark.parametrize("family", [4, 6])
def test_allow_from_serves_the_allowed_source_only(lab: Lab, family: int) -> None:
    public = PUBLIC4 if family == 4 else PUBLIC6
    allowed, other = client_address(family, ALLOWED), fresh(lab, family)
    name = "guarded" if family == 4 else "guarded6"
    dropped_before = service_status(lab, "remote", name)["dropped"]
    assert isinstance(dropped_before, int)
    arrived = lab.arrivals(lab.web, "tcp", GUARDED_PORT, family)
    assert lab.exchange(public, GUARDED_PORT, 100, source=allowed) == allowed
    assert lab.arrivals(lab.web, "tcp", GUARDED_PORT, family) > arrived
    arrived = lab.arrivals(lab.web, "tcp", GUARDED_PORT, family)
    assert lab.exchange(public, GUARDED_PORT, 100, timeout=FAIL_TIMEOUT, source=other) is None
    assert lab.exchange(public, GUARDED_PORT, 100, timeout=FAIL_TIMEOUT) is None  # the usual client
    assert lab.arrivals(lab.web, "tcp", GUARDED_PORT, family) == arrived, "a refused source reached the service"
    counted(lab, "remote", name, "dropped", dropped_before + 2)
    # the same client still reaches the services that admit everyone
    assert lab.exchange(public, OPEN_PORT, 100, source=other) == other


def test_the_vpn_client_enforces_allow_from_too(lab: Lab) -> None:
    """With the gateway admitting everyone to the guarded port, the VPN client still refuses
    the other source: the true source address is there too."""
    original = lab.configs["remote"].read_text()
    other = fresh(lab, 4)
    dropped_before = service_status(lab, "vpnclient", "guarded")["dropped"]
    assert isinstance(dropped_before, int)
    try:
        assert original.count(GUARDED4) == 1
        lab.configs["remote"].write_text(original.replace(", " + GUARDED4, ""))
        reload(lab, "remote")
        assert service_status(lab, "remote", "guarded")["dropped"] is None  # no allow_from there now
        arrived = lab.arrivals(lab.web, "tcp", GUARDED_PORT, 4)
        assert lab.exchange(PUBLIC4, GUARDED_PORT, 100, timeout=FAIL_TIMEOUT, source=other) is None
        assert lab.arrivals(lab.web, "tcp", GUARDED_PORT, 4) == arrived
        counted(lab, "vpnclient", "guarded", "dropped", dropped_before + 1)
        assert lab.exchange(PUBLIC4, GUARDED_PORT, 100, source=client_address(4, ALLOWED)) \
            == client_address(4, ALLOWED)
    finally:
        lab.configs["remote"].write_text(original)
        reload(lab, "remote")


def test_rate_limit_drops_new_connections_beyond_the_burst(lab: Lab, report: Callable[[str], None]) -> None:
    source = fresh(lab, 4)
    limited_before = service_status(lab, "remote", "limited")["limited"]
    assert isinstance(limited_before, int)
    before, results, after = lab.burst(PUBLIC4, LIMITED_PORT, 30, source=source)
    served = sum(r == source for r in results)
    # the held connection took one of the burst; 1/min refills one more at most while this runs
    assert before == source and after == source, "an established connection was cut"
    assert BURST - 1 <= served <= BURST + 1 and served < 30, results
    refused = 30 - served
    limited = counted(lab, "remote", "limited", "limited", limited_before + refused)
    # the unlimited service, same source, same moment: all 30
    before, results, after = lab.burst(PUBLIC4, OPEN_PORT, 30, source=source)
    assert results == [source] * 30 and before == after == source
    # another source has its own bucket
    other = fresh(lab, 4)
    assert lab.exchange(PUBLIC4, LIMITED_PORT, 1, source=other) == other
    report(f"{lab.variant}/{lab.backend}: rate_limit 1/min burst {BURST}: {served} of 30 quick connections "
           f"served, {limited - limited_before} packets counted as limited; unlimited: 30 of 30")


def _mss_off(lab: Lab) -> dict[str, str]:
    originals = {h: lab.configs[h].read_text() for h in ("vpnserver", "vpnclient")}
    _edit(lab, "vpnserver", "vpn_server:\n", "  mss_clamp: off\n")
    _edit(lab, "vpnclient", "vpn_client:\n", "  mss_clamp: off\n")
    reload(lab, "vpnserver", "vpnclient")
    return originals


@pytest.mark.parametrize("family", [4, 6])
def test_mss_clamp_carries_big_exchanges_over_a_pmtu_black_hole(lab: Lab, family: int,
                                                                report: Callable[[str], None]) -> None:
    public = PUBLIC4 if family == 4 else PUBLIC6
    assert lab.tunnel_mtu == 1280 and lab.pmtu_blackhole
    source = fresh(lab, family)
    assert lab.exchange(public, OPEN_PORT, EXCHANGE, timeout=30, source=source) == source, \
        "the default (mss_clamp: pmtu) should carry it"
    originals = _mss_off(lab)
    try:
        # the control: without our clamp, full-size segments stall in the black hole
        source = fresh(lab, family)
        assert lab.exchange(public, OPEN_PORT, EXCHANGE, timeout=STALL, source=source) is None, \
            "mss_clamp: off should stall behind the black hole (is the tunnel clamping itself?)"
        assert lab.exchange(public, OPEN_PORT, 100, source=source) == source, "small exchanges still pass"
    finally:
        for host, text in originals.items():
            lab.configs[host].write_text(text)
        reload(lab, *originals)
    source = fresh(lab, family)
    assert lab.exchange(public, OPEN_PORT, EXCHANGE, timeout=30, source=source) == source
    report(f"{lab.variant}/{lab.backend} IPv{family}: {EXCHANGE}-byte exchange over MTU 1280 + black hole: "
           "completes with mss_clamp pmtu, stalls with off")


def test_every_host_is_in_sync(lab: Lab) -> None:
    for host in lab.configs:
        res = lab.tagroutectl(host, "diff")
        assert res.returncode == 0, f"{host} drifted:\n{res.stdout}{res.stderr}"
    assert lab.request_tcp(PUBLIC4) == CLIENT4
