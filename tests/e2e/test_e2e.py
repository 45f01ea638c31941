"""End to end, the seed's layout with real OpenVPN and tagrouted on each host of the path.

What a user checks: through the public IPv4 and IPv6 addresses, TLS and UDP, the home service
sees the client's own address; without tagrouted it does not work (the control); hardened
rp_filter, a tunnel restart, a flushed firewall and a reload with a new service all leave it
working; another tool that ORs its own bit into every packet's mark does not break it (masks);
nothing that is not configured is reachable from outside.
One lab per firewall backend: tests that break something put it back before they end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from firewall_view import BACKENDS
from lab import (
    CLIENT4,
    CLIENT6,
    LANHOST4,
    LANHOST6,
    PUBLIC4,
    PUBLIC6,
    SPARE_TLS_PORT,
    SPARE_UDP_PORT,
    TLS_PORT,
    UDP_PORT,
    Lab,
)
from nslab import wait_for
from support import FAIL_TIMEOUT, PATHS, all_paths, ask, built_lab, expected_paths, require_daemon

pytestmark = pytest.mark.e2e

RESYNC_INTERVAL = 2.0  # the example configs' default resync_interval


@pytest.fixture(scope="module", params=BACKENDS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with built_lab(variant="openvpn", layout="seed", manager="tagrouted", backend=request.param) as lab:
        yield lab


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize(("public", "client", "family"), PATHS, ids=["ipv4", "ipv6"])
def test_service_sees_the_clients_own_address(lab: Lab, proto: str, public: str, client: str,
                                              family: int) -> None:
    port = TLS_PORT if proto == "tcp" else UDP_PORT
    before = lab.arrivals(lab.web, proto, port, family)
    assert ask(lab, proto, public) == client
    assert lab.arrivals(lab.web, proto, port, family) > before


def test_every_host_is_in_sync(lab: Lab) -> None:
    for host in lab.configs:
        res = lab.tagroutectl(host, "diff")
        assert res.returncode == 0, f"{host} drifted:\n{res.stdout}{res.stderr}"


def test_metrics_in_sync_tunnel_up_and_service_counters_rising_with_traffic(lab: Lab) -> None:
    """What Prometheus scrapes from each host (the lab adds metrics.listen to every config): in
    sync, the tunnel up, and the services' counters rising with their traffic on the gateway
    (its DNAT) and the VPN client (its FORWARD accept), each seeing every new connection."""
    require_daemon(lab)
    for host in lab.configs:
        assert lab.metrics(host)["tagrouted_in_sync"] == 1, host
    for host in ("vpnserver", "vpnclient"):
        assert lab.metrics(host)['tagrouted_tunnel_up{interface="tun0"}'] == 1, host
    watched = [(host, service) for host in ("remote", "vpnclient") for service in ("web", "echo6")]

    def counters() -> dict[tuple[str, str], tuple[float, float]]:
        scraped = {host: lab.metrics(host) for host in ("remote", "vpnclient")}
        return {(h, s): (scraped[h][f'tagrouted_service_packets_total{{service="{s}"}}'],
                         scraped[h][f'tagrouted_service_bytes_total{{service="{s}"}}']) for h, s in watched}

    before = counters()
    for _ in range(3):
        assert ask(lab, "tcp", PUBLIC4) == CLIENT4
        assert ask(lab, "udp", PUBLIC6) == CLIENT6
    def risen() -> dict[tuple[str, str], tuple[float, float]] | None:
        now = counters()
        return now if all(now[k][0] >= before[k][0] + 3 and now[k][1] > before[k][1] for k in watched) else None

    # The worker reads the kernel's counters on each firewall pass: within a resync interval.
    wait_for(risen, timeout=RESYNC_INTERVAL * 2 + 10, interval=0.2, what="the web and echo6 counters to rise by 3")


@pytest.mark.parametrize(("public", "family"), [(PUBLIC4, 4), (PUBLIC6, 6)], ids=["ipv4", "ipv6"])
def test_port_not_configured_is_not_reachable_through_the_public_address(
        lab: Lab, public: str, family: int) -> None:
    # the service listens on these ports too: only the configuration keeps them closed
    tcp_before = lab.arrivals(lab.web, "tcp", SPARE_TLS_PORT, family)
    udp_before = lab.arrivals(lab.web, "udp", SPARE_UDP_PORT, family)
    assert lab.request_tcp(public, SPARE_TLS_PORT, timeout=FAIL_TIMEOUT) is None
    assert lab.request_udp(public, SPARE_UDP_PORT, timeout=FAIL_TIMEOUT) is None
    assert lab.arrivals(lab.web, "tcp", SPARE_TLS_PORT, family) == tcp_before
    assert lab.arrivals(lab.web, "udp", SPARE_UDP_PORT, family) == udp_before


def test_lan_host_that_is_no_service_is_not_reachable(lab: Lab) -> None:
    """An attacker one hop away routes the home networks straight at the public server, and
    the VPN server's side of the tunnel sends into it: neither reaches a LAN host that is no
    service, nor a service host's other ports."""
    probes = [(LANHOST4, TLS_PORT, lab.lanhost, 4), (LANHOST6, TLS_PORT, lab.lanhost, 6),
              ("192.168.100.3", SPARE_TLS_PORT, lab.web, 4), ("fd00:100::3", SPARE_TLS_PORT, lab.web, 6)]
    lab.isp.run("ip -4 route add 192.168.100.0/24 via 192.0.2.200")
    lab.isp.run("ip -6 route add fd00:100::/64 via 2001:db8:a::200")
    try:
        for address, port, host, family in probes:
            before = lab.arrivals(host, "tcp", port, family)
            assert lab.request_tcp(address, port, timeout=FAIL_TIMEOUT) is None
            assert lab.arrivals(host, "tcp", port, family) == before, f"{address}:{port} reached from the Internet"
    finally:
        lab.isp.run("ip -4 route del 192.168.100.0/24 via 192.0.2.200", check=False)
        lab.isp.run("ip -6 route del fd00:100::/64 via 2001:db8:a::200", check=False)
    from peer_echo import ask_tcp
    for address, port, host, family in probes:
        before = lab.arrivals(host, "tcp", port, family)
        lab.vpnserver.call(ask_tcp, address, port, FAIL_TIMEOUT)
        assert lab.arrivals(host, "tcp", port, family) == before, f"{address}:{port} reached from the tunnel"


def test_control_without_tagrouted_the_request_fails(lab: Lab, report: Callable[[str], None]) -> None:
    """The control: the same requests fail once tagrouted is stopped and its state removed.
    First only on the web host: the request still arrives there, its reply leaks to the ISP."""
    try:
        lab.stop_tagrouted(["web"], remove_state=True)
        before = lab.arrivals(lab.web, "tcp", TLS_PORT, 4)
        assert all_paths(lab, timeout=FAIL_TIMEOUT) == dict.fromkeys(expected_paths())
        assert lab.arrivals(lab.web, "tcp", TLS_PORT, 4) > before, "the request did not even arrive"
        lab.stop_tagrouted(remove_state=True)
        assert lab.request_tcp(PUBLIC4, timeout=FAIL_TIMEOUT) is None
        assert lab.request_udp(PUBLIC6, timeout=FAIL_TIMEOUT) is None
    finally:
        restore(lab)
    t0 = time.monotonic()
    lab.wait_path(timeout=40)
    report(f"control: tagrouted started again -> path working after {time.monotonic() - t0:.2f} s")
    assert all_paths(lab) == expected_paths()


def restore(lab: Lab) -> None:
    if lab.manager == "tagrouted":
        lab.start_tagrouted()
    else:
        lab.apply_tagrouted()


def test_hardened_rp_filter_on_the_vpn_client_still_works(lab: Lab) -> None:
    """all.rp_filter=1 (the kernel uses max(all, tun0)): the seed's tun0=0 silently fails here."""
    lab.vpnclient.run("sysctl -qw net.ipv4.conf.all.rp_filter=1")
    try:
        assert all_paths(lab) == expected_paths()
        # and still after tagrouted has looked at the changed sysctl again
        wait_for(lambda: lab.tagroutectl("vpnclient", "diff").returncode == 0, timeout=10,
                 what="vpnclient in sync")
        assert lab.vpnclient.out("sysctl -n net.ipv4.conf.tun0.rp_filter").strip() in ("2",)
        assert all_paths(lab) == expected_paths()
    finally:
        lab.vpnclient.run("sysctl -qw net.ipv4.conf.all.rp_filter=0")


def test_openvpn_client_restart_works_again(lab: Lab, report: Callable[[str], None]) -> None:
    require_daemon(lab)
    lab.stop_vpn_client()  # tun0 is gone, and with it the `default dev tun0` of table 42
    assert lab.request_tcp(PUBLIC4, timeout=FAIL_TIMEOUT) is None
    t0 = time.monotonic()
    lab.start_vpn_client(wait=False)
    wait_for(lab.tunnel_up, timeout=30, what="tun0 back")
    t_tun = time.monotonic() - t0
    wait_for(lambda: lab.request_tcp(PUBLIC4, timeout=1.0) == CLIENT4, timeout=30, interval=0.02,
             what="TLS through the public address after the restart")
    t_path = time.monotonic() - t0
    report(f"openvpn client restart: tun0 back after {t_tun:.2f} s, "
           f"path working again after {t_path:.2f} s (from the client's start)")
    assert all_paths(lab) == expected_paths()


FLUSH = {  # backend -> (what flushes our tagging on the web host, is it back?)
    "iptables-legacy": ("iptables-legacy -t mangle -F",
                        lambda lab: "TAGROUTED-OUTPUT" in lab.web.out("iptables-legacy -t mangle -S OUTPUT")
                        and "-j CONNMARK" in lab.web.out("iptables-legacy -t mangle -S TAGROUTED-INPUT")),
    "nftables": ("nft flush table inet tagrouted",
                 lambda lab: "ct mark set" in lab.web.out("nft list chain inet tagrouted input")
                 and "meta mark set" in lab.web.out("nft list chain inet tagrouted output")),
}


def test_flushed_tagging_on_the_web_host_is_repaired(lab: Lab, report: Callable[[str], None]) -> None:
    require_daemon(lab)
    command, repaired = FLUSH[lab.backend or "nftables"]
    lab.web.run(command)
    t0 = time.monotonic()
    wait_for(lambda: repaired(lab), timeout=RESYNC_INTERVAL + 3, interval=0.02,
             what="the tagging rules repaired")
    t_repair = time.monotonic() - t0
    wait_for(lambda: lab.request_tcp(PUBLIC4, timeout=1.0) == CLIENT4, timeout=RESYNC_INTERVAL + 3,
             what="TLS through the public address after the flush")
    how = "by event" if lab.backend == "nftables" else f"resync_interval {RESYNC_INTERVAL:g} s"
    report(f"{command} on the web host: repaired after {t_repair:.3f} s, "
           f"path working after {time.monotonic() - t0:.2f} s ({how})")


# Another tool's boot-time table on the service host: it ORs its own bit into every packet's
# mark, at mangle priority (loaded before tagrouted: at equal priority it would run after us) and
# again at filter priority (after any mangle chain). Our tagging runs after mangle priority, and
# with tag.mark_mask (0xff) our rule matches fwmark 0x2a/0xff whatever the tool adds.
MARK_OR = """
table inet othertool {
  chain pre { type filter hook prerouting priority mangle; policy accept; meta mark set meta mark or 0x80000; }
  chain out { type route hook output priority mangle; policy accept; meta mark set meta mark or 0x80000; }
  chain late { type route hook output priority filter; policy accept; meta mark set meta mark or 0x80000; }
}
"""


def test_a_tool_that_ors_its_bit_into_every_mark_does_not_break_the_path(lab: Lab) -> None:
    require_daemon(lab)
    lab.stop_tagrouted(["web"], remove_state=True)
    lab.web.run("nft -f -", input=MARK_OR)  # loaded first, as at boot
    original = lab.configs["web"].read_text()
    try:
        lab.start_tagrouted(["web"])
        lab.wait_path(timeout=30)
        assert all_paths(lab) == expected_paths()
        # The control: the whole mark as ours (the behaviour before masks) breaks the path.
        lab.configs["web"].write_text(original.rstrip("\n") + "\ntag: {mark_mask: 0xffffffff}\n")
        assert lab.tagroutectl("web", "reload").returncode == 0
        assert "fwmark 0x2a lookup 42" in lab.web.out("ip -4 rule show")
        assert lab.request_tcp(PUBLIC4, timeout=FAIL_TIMEOUT) is None
    finally:
        lab.configs["web"].write_text(original)
        lab.tagroutectl("web", "reload")
        lab.web.run("nft delete table inet othertool", check=False)
    lab.wait_path(timeout=30)
    assert all_paths(lab) == expected_paths()
    assert all_paths(lab) == expected_paths()


SPARE_SERVICES = (
    f"  - {{name: spare, proto: tcp, port: {SPARE_TLS_PORT}, address: 192.168.100.3}}\n"
    f"  - {{name: spare6, proto: tcp, port: {SPARE_TLS_PORT}, address: \"fd00:100::3\"}}\n"
    f"  - {{name: spare-udp, proto: udp, port: {SPARE_UDP_PORT}, address: 192.168.100.3}}\n"
    f"  - {{name: spare-udp6, proto: udp, port: {SPARE_UDP_PORT}, address: \"fd00:100::3\"}}\n"
)


def test_reload_makes_a_new_service_reachable_without_restart(lab: Lab) -> None:
    require_daemon(lab)
    pids = {h: p.pid for h, p in lab.daemons.items()}
    edited = ("remote", "vpnclient")  # the gateway exposes it, the vpn-client admits it
    originals = {h: lab.configs[h].read_text() for h in edited}
    try:
        for host in edited:
            assert "services:\n" in originals[host]
            lab.configs[host].write_text(originals[host].replace("services:\n", "services:\n" + SPARE_SERVICES, 1))
        for host in edited:
            res = lab.tagroutectl(host, "reload")
            assert res.returncode == 0, res.stdout + res.stderr
        for public, client, _family in PATHS:
            assert lab.request_tcp(public, SPARE_TLS_PORT) == client
            assert lab.request_udp(public, SPARE_UDP_PORT) == client
        assert {h: p.pid for h, p in lab.daemons.items()} == pids
        assert all(p.poll() is None for p in lab.daemons.values())
    finally:
        for host in edited:
            lab.configs[host].write_text(originals[host])
            lab.tagroutectl(host, "reload")
    assert lab.request_tcp(PUBLIC4, SPARE_TLS_PORT, timeout=FAIL_TIMEOUT) is None
