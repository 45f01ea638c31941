"""Stale UDP conntrack deletion against the real kernel: a client namespace keeps sending to a
gateway namespace since before a NAT rule existed; only the flushed endpoint's entries go, and
the flows they belonged to come back NATed."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from nslab import Netns, veth, wait_for

from tagrouted.core.state import ConntrackFlush
from tagrouted.kernel.conntrack import delete_udp_entries

pytestmark = pytest.mark.kernel

NAT_PORT = 7000
# One socket per destination, a datagram to each every 50 ms, until killed.
SENDER = """
import socket, sys, time
targets = [(a.rsplit(":", 1)[0].strip("[]"), int(a.rsplit(":", 1)[1])) for a in sys.argv[1:]]
fam = socket.AF_INET6 if ":" in targets[0][0] else socket.AF_INET
socks = [socket.socket(fam, socket.SOCK_DGRAM) for _ in targets]
while True:
    for s, t in zip(socks, targets):
        try:
            s.sendto(b"ping", t)
        except OSError:
            pass
    time.sleep(0.05)
"""


def flows(ns: Netns, family: int) -> dict[tuple[str, int], int]:
    """`conntrack -L` for UDP: (original dst, original dport) -> reply source port.

    The reply source port equals the original dport unless a NAT rewrote the flow."""
    out = ns.out(["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6", "-p", "udp"])
    result = {}
    for line in out.splitlines():
        fields = [tok.split("=", 1) for tok in line.split() if "=" in tok]
        dsts = [v for k, v in fields if k == "dst"]
        dports = [int(v) for k, v in fields if k == "dport"]
        sports = [int(v) for k, v in fields if k == "sport"]
        if len(dsts) >= 2 and len(dports) >= 2 and len(sports) >= 2:
            result[(dsts[0], dports[0])] = sports[1]
    return result


def pair(netns: Callable[[str], Netns], family: int) -> tuple[Netns, Netns]:
    """gateway (tracking, addresses .1 and .3) <- veth -> client (.2)."""
    gw, client = netns("ctgw"), netns("ctcl")
    veth(gw, "gw0", client, "cl0")
    if family == 4:
        gw.run("ip addr add 10.0.0.1/24 dev gw0")
        gw.run("ip addr add 10.0.0.3/24 dev gw0")
        client.run("ip addr add 10.0.0.2/24 dev cl0")
        gw.run("iptables-legacy -A INPUT -m conntrack --ctstate NEW -j ACCEPT")  # makes it track
    else:
        gw.run("ip -6 addr add fd00:1::1/64 dev gw0 nodad")
        gw.run("ip -6 addr add fd00:1::3/64 dev gw0 nodad")
        client.run("ip -6 addr add fd00:1::2/64 dev cl0 nodad")
        gw.run("ip6tables-legacy -A INPUT -m conntrack --ctstate NEW -j ACCEPT")
    return gw, client


@pytest.mark.parametrize("family", [4, 6])
def test_stale_udp_entries_are_deleted_and_come_back_natted(
        netns: Callable[[str], Netns], family: int) -> None:
    gw, client = pair(netns, family)
    ip1, ip3 = ("10.0.0.1", "10.0.0.3") if family == 4 else ("fd00:1::1", "fd00:1::3")
    wrap = (lambda a: a) if family == 4 else (lambda a: f"[{a}]")
    targets = [(ip1, 5000), (ip1, 5001), (ip1, 6000), (ip3, 5000)]
    client.popen([sys.executable, "-c", SENDER, *(f"{wrap(a)}:{p}" for a, p in targets)])
    wait_for(lambda: set(targets) <= flows(gw, family).keys(), what="four UDP flows tracked")

    # The NAT arrives while the clients keep sending: their entries stay un-NATed.
    iptables = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    gw.run(f"{iptables} -t nat -A PREROUTING -p udp -j REDIRECT --to-ports {NAT_PORT}")
    before = flows(gw, family)
    assert {t: before[t] for t in targets} == {t: t[1] for t in targets}

    deleted = gw.call(delete_udp_entries, ConntrackFlush(family, ip1, 5000, 5001))  # type: ignore[arg-type]
    assert deleted == 2

    flushed = [(ip1, 5000), (ip1, 5001)]
    wait_for(lambda: all(flows(gw, family).get(t) == NAT_PORT for t in flushed),
             what="the flushed flows to come back through the NAT")
    after = flows(gw, family)
    # another port of that address, and the same port of another address, were not touched
    assert after[(ip1, 6000)] == 6000
    assert after[(ip3, 5000)] == 5000


def test_nothing_tracked_deletes_nothing(netns: Callable[[str], Netns]) -> None:
    gw, client = pair(netns, 4)
    client.popen([sys.executable, "-c", SENDER, "10.0.0.1:5000"])
    wait_for(lambda: (("10.0.0.1", 5000) in flows(gw, 4)), what="the flow tracked on the gateway")
    # the client namespace has no ruleset that tracks: conntrack is not active there
    assert client.call(delete_udp_entries, ConntrackFlush(4, "10.0.0.1", 5000, 5000)) == 0
    # on the gateway, a port nobody sends to and the other family have nothing to delete
    assert gw.call(delete_udp_entries, ConntrackFlush(4, "10.0.0.1", 5001, 5999)) == 0
    assert gw.call(delete_udp_entries, ConntrackFlush(6, "fd00:1::1", 5000, 5000)) == 0
    assert ("10.0.0.1", 5000) in flows(gw, 4)


@pytest.mark.parametrize("family", [4, 6])
def test_an_entry_already_natted_to_the_target_is_kept(netns: Callable[[str], Netns], family: int) -> None:
    """A reload flushes every UDP endpoint again: a flow the DNAT already sends to its target
    (the OpenVPN forward's live session) must survive it; only un-NATed ones go."""
    gw, client = pair(netns, family)
    ip1 = "10.0.0.1" if family == 4 else "fd00:1::1"
    wrap = (lambda a: a) if family == 4 else (lambda a: f"[{a}]")
    client.popen([sys.executable, "-c", SENDER, f"{wrap(ip1)}:5000"])
    wait_for(lambda: (ip1, 5000) in flows(gw, family), what="the flow tracked")
    iptables = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    gw.run(f"{iptables} -t nat -A PREROUTING -p udp --dport 5000 -j DNAT --to-destination {wrap(ip1)}:{NAT_PORT}")
    flush = ConntrackFlush(family, ip1, 5000, 5000, to_address=ip1, to_port=NAT_PORT)  # type: ignore[arg-type]
    assert gw.call(delete_udp_entries, flush) == 1  # un-NATed: stale
    wait_for(lambda: flows(gw, family).get((ip1, 5000)) == NAT_PORT, what="the flow back through the NAT")
    assert gw.call(delete_udp_entries, flush) == 0  # NATed to the target: the DNAT at work
    assert flows(gw, family).get((ip1, 5000)) == NAT_PORT
    # the same entry is stale for a DNAT that now sends that port elsewhere
    moved = ConntrackFlush(family, ip1, 5000, 5000, to_address=ip1, to_port=NAT_PORT + 1)  # type: ignore[arg-type]
    assert gw.call(delete_udp_entries, moved) == 1
