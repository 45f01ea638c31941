"""NetlinkAdapter against the real kernel, each test in its own throw-away namespace.

What is asserted is what a user would check: routes and rules read back equal to the values
added, `ip route`/`ip rule` show them, foreign routes and rules are left alone and not reported,
and adds/deletes are safe to repeat."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from typing import Any

import pytest
from nslab import Netns, wait_for

from tagrouted.core.state import ROUTE_PROTO, UNREACHABLE_METRIC, PolicyRule, Route
from tagrouted.kernel.netlink import NetlinkAdapter, NetlinkFailed, NetlinkTransient

pytestmark = pytest.mark.kernel

T = 42
BIG_TABLE = 100042  # tables > 255 only exist in RTA_TABLE / FRA_TABLE

OURS = frozenset({
    Route(4, T, "default", dev="tun0"),
    Route(4, T, "default", kind="unreachable", metric=UNREACHABLE_METRIC),
    Route(6, T, "default", dev="tun0"),
    Route(6, T, "default", kind="unreachable", metric=UNREACHABLE_METRIC),
    Route(6, BIG_TABLE, "default", gateway="fd00:200::2"),
    Route(4, BIG_TABLE, "default", gateway="192.168.200.2", metric=7),
    Route(4, 254, "192.168.100.0/24", gateway="192.168.200.2"),
    Route(4, 254, "192.168.101.0/24", dev="tun0", metric=1042),
    Route(6, 254, "fd00:100::/64", dev="tun0"),
    Route(6, 254, "fd00:101::/64", gateway="fd00:200::2", metric=1042),
})


def in_ns(ns: Netns, fn: Callable[[NetlinkAdapter], Any]) -> Any:
    """fn(adapter) in a child that entered `ns`; the adapter is opened and closed there."""

    def run() -> Any:
        with NetlinkAdapter() as nl:
            return fn(nl)

    return ns.call(run)


def lab(netns: Callable[[str], Netns], name: str = "nl") -> Netns:
    """tun0 (up, no carrier) and a veth pair va/vb with a /24 and a /64 on va."""
    ns = netns(name)
    ns.run("ip tuntap add tun0 mode tun")
    ns.run("ip link set tun0 up")
    ns.run("ip link add va type veth peer name vb")
    ns.run("ip link set va up")
    ns.run("ip link set vb up")
    ns.run("ip addr add 192.168.200.1/24 dev va")
    ns.run("ip -6 addr add fd00:200::1/64 dev va nodad")
    return ns


def ip_json(ns: Netns, cmd: str) -> list[dict[str, Any]]:
    return json.loads(ns.out(f"ip -j {cmd}") or "[]")


def proto_routes(ns: Netns) -> list[str]:
    """The routes `ip route show table all` lists with our protocol, both families."""
    lines = []
    for fam in ("-4", "-6"):
        lines += [line for line in ns.out(f"ip {fam} route show table all").splitlines()
                  if f" proto {ROUTE_PROTO} " in line]
    return sorted(lines)


def test_routes_read_back_equal_to_what_was_added(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)

    def add_all(nl: NetlinkAdapter) -> frozenset[Route]:
        for route in sorted(OURS):
            nl.add_route(route)
        return nl.read_routes(T)

    assert in_ns(ns, add_all) == OURS
    listed = proto_routes(ns)
    assert "default dev tun0 table 42 proto 142 scope link linkdown " in listed
    assert "unreachable default table 42 proto 142 metric 4294967295 " in listed
    assert any(line.startswith("default via fd00:200::2 dev va table 100042 proto 142 metric 1024")
               for line in listed)
    assert "192.168.100.0/24 via 192.168.200.2 dev va proto 142 " in listed
    assert "192.168.101.0/24 dev tun0 proto 142 scope link metric 1042 linkdown " in listed
    assert len(listed) == len(OURS)


def test_foreign_routes_are_not_reported_and_left_alone(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    ns.run("ip route add 10.1.0.0/16 via 192.168.200.2 proto static")          # main, not ours
    ns.run("ip route add 10.2.0.0/16 dev tun0 table 43")                      # other table
    ns.run("ip -6 route add fd00:300::/64 dev va table 43 proto static")
    ns.run("ip route add 10.3.0.0/16 dev tun0 table 42 proto static")         # table T is ours
    ns.run("ip route add blackhole 10.4.0.0/16 table 42")

    kernel = in_ns(ns, lambda nl: nl.read_routes(T))
    assert kernel == {
        Route(4, T, "10.3.0.0/16", dev="tun0", proto=4),
        Route(4, T, "10.4.0.0/16", kind="blackhole", proto=3),
    }

    def sweep(nl: NetlinkAdapter) -> frozenset[Route]:
        for route in nl.read_routes(T):
            nl.del_route(route)
        return nl.read_routes(T)

    assert in_ns(ns, sweep) == frozenset()
    assert ns.out("ip route show table 42") == ""
    # what is not ours is still there, byte for byte
    assert ns.out("ip route show 10.1.0.0/16") == "10.1.0.0/16 via 192.168.200.2 dev va proto static \n"
    assert ns.out("ip route show table 43") == "10.2.0.0/16 dev tun0 scope link linkdown \n"
    assert ns.out("ip -6 route show table 43") == "fd00:300::/64 dev va proto static metric 1024 pref medium\n"


def test_add_twice_and_delete_missing_are_not_errors(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)

    def twice(nl: NetlinkAdapter) -> frozenset[Route]:
        for route in sorted(OURS):
            nl.add_route(route)
            nl.add_route(route)
        return nl.read_routes(T)

    assert in_ns(ns, twice) == OURS
    assert len(proto_routes(ns)) == len(OURS)

    def delete_twice(nl: NetlinkAdapter) -> frozenset[Route]:
        for route in sorted(OURS):
            nl.del_route(route)
            nl.del_route(route)
        return nl.read_routes(T)

    assert in_ns(ns, delete_twice) == frozenset()
    assert proto_routes(ns) == []


def test_delete_removes_only_the_named_metric(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    base = Route(6, 254, "fd00:100::/64", dev="tun0")
    other = Route(6, 254, "fd00:100::/64", dev="tun0", metric=1042)
    base4 = Route(4, 254, "192.168.100.0/24", dev="tun0")
    other4 = Route(4, 254, "192.168.100.0/24", dev="tun0", metric=1042)

    def run(nl: NetlinkAdapter) -> frozenset[Route]:
        for route in (base, other, base4, other4):
            nl.add_route(route)
        nl.del_route(other)
        nl.del_route(base4)
        return nl.read_routes(T)

    assert in_ns(ns, run) == {base, other4}


def test_conflicting_add_is_a_clear_error(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    ns.run("ip route add default via 192.168.200.2 table 42")

    def run(nl: NetlinkAdapter) -> str:
        try:
            nl.add_route(Route(4, T, "default", dev="tun0"))
        except NetlinkTransient as e:
            return f"transient: {e}"
        except NetlinkFailed as e:
            return f"failed: {e}"
        return "no error"

    msg = in_ns(ns, run)
    assert msg.startswith("failed: add route default dev tun0 table 42 proto 142")
    assert "same destination" in msg


def test_missing_or_down_link_is_transient(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    ns.run("ip tuntap add tun1 mode tun")  # created, not yet up: what OpenVPN does first

    def run(nl: NetlinkAdapter) -> list[tuple[str, str]]:
        out = []
        for dev in ("tun9", "tun1"):
            for family in (4, 6):
                try:
                    nl.add_route(Route(family, T, "default", dev=dev))  # type: ignore[arg-type]
                    out.append(("no error", ""))
                except NetlinkTransient as e:
                    out.append(("transient", errno.errorcode[e.errno]))
        return out

    assert in_ns(ns, run) == [("transient", "ENODEV")] * 2 + [("transient", "ENETDOWN")] * 2


def test_tunnel_gone_leaves_only_the_unreachable(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    unreachable = {r for r in OURS if r.table == T and r.kind == "unreachable"}

    def add(nl: NetlinkAdapter) -> frozenset[Route]:
        for route in sorted(r for r in OURS if r.table == T):
            nl.add_route(route)
        return frozenset(r for r in nl.read_routes(T) if r.table == T)

    assert in_ns(ns, add) == {r for r in OURS if r.table == T}
    ns.run("ip link del tun0")
    wait_for(lambda: frozenset(r for r in in_ns(ns, lambda nl: nl.read_routes(T)) if r.table == T)
             == unreachable, what="table 42 to hold only the unreachable defaults")
    assert ns.out("ip -4 route show table 42") == "unreachable default proto 142 metric 4294967295 \n"

    def delete_gone(nl: NetlinkAdapter) -> frozenset[Route]:
        for route in OURS:
            if route.table == T and route.dev == "tun0":
                nl.del_route(route)  # its link is gone, so is the route: not an error
        return nl.read_routes(T)

    assert {r for r in in_ns(ns, delete_gone) if r.table == T} == unreachable


RULES = frozenset({
    PolicyRule(4, 1042, 42, T),
    PolicyRule(6, 1042, 42, T),
    PolicyRule(4, 1043, 0x2A00, T, mask=0xFF00),
    PolicyRule(6, 1043, 0x2A, T, mask=0xFF),
})


def test_rules_add_read_delete(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    ns.run("ip rule add from 10.0.0.0/8 fwmark 42 lookup 42 pref 1044")   # other selector
    ns.run("ip rule add iif va fwmark 42 lookup 42 pref 1045")
    ns.run("ip rule add not fwmark 42 lookup 42 pref 1046")
    ns.run("ip rule add fwmark 42 lookup 43 pref 1047")                   # other table
    ns.run("ip rule add lookup 42 pref 1048")                             # no fwmark
    ns.run("ip -6 rule add to fd00::/8 fwmark 42 lookup 42 pref 1044")
    foreign = {fam: ns.out(f"ip {fam} rule show") for fam in ("-4", "-6")}

    def add_twice(nl: NetlinkAdapter) -> frozenset[PolicyRule]:
        for rule in sorted(RULES):
            nl.add_rule(rule)
            nl.add_rule(rule)
        return nl.read_rules(T)

    assert in_ns(ns, add_twice) == RULES
    v4 = ns.out("ip -4 rule show").splitlines()
    v6 = ns.out("ip -6 rule show").splitlines()
    assert v4.count("1042:\tfrom all fwmark 0x2a lookup 42") == 1
    assert v4.count("1043:\tfrom all fwmark 0x2a00/0xff00 lookup 42") == 1
    assert v6.count("1042:\tfrom all fwmark 0x2a lookup 42") == 1
    assert v6.count("1043:\tfrom all fwmark 0x2a/0xff lookup 42") == 1

    def delete_twice(nl: NetlinkAdapter) -> frozenset[PolicyRule]:
        for rule in sorted(RULES):
            nl.del_rule(rule)
            nl.del_rule(rule)
        return nl.read_rules(T)

    assert in_ns(ns, delete_twice) == frozenset()
    assert {fam: ns.out(f"ip {fam} rule show") for fam in ("-4", "-6")} == foreign


def test_rule_to_a_big_table(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    rule = PolicyRule(4, 1042, 42, BIG_TABLE)
    ns.run(f"ip rule add fwmark 42 lookup {BIG_TABLE} pref 2000")  # same mark+table, other pref

    def run(nl: NetlinkAdapter) -> tuple[frozenset[PolicyRule], frozenset[PolicyRule]]:
        nl.add_rule(rule)
        return nl.read_rules(BIG_TABLE), nl.read_rules(T)

    ours, in_t = in_ns(ns, run)
    assert ours == {rule, PolicyRule(4, 2000, 42, BIG_TABLE)}
    assert in_t == frozenset()
    assert "1042:\tfrom all fwmark 0x2a lookup 100042" in ns.out("ip rule show").splitlines()


def test_host_facts(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    ns.run("sysctl -qw net.ipv4.conf.all.rp_filter=2")
    ns.run("sysctl -qw net.ipv6.conf.va.accept_ra=2")
    ns.run("sysctl -qw net.ipv6.conf.vb.accept_ra=0")
    ns.run("ip link set vb down")
    facts = in_ns(ns, lambda nl: nl.host_facts())

    assert facts.rp_filter_all == 2
    indexes = {link["ifname"]: link["ifindex"] for link in ip_json(ns, "link show")}
    assert {link.name: link.index for link in facts.links} == indexes
    va, vb, tun, lo = (facts.link(n) for n in ("va", "vb", "tun0", "lo"))
    assert va is not None and va.up and va.accept_ra == 2
    assert vb is not None and not vb.up and vb.accept_ra == 0
    assert tun is not None and tun.up
    assert tun.accept_ra == int(ns.out("cat /proc/sys/net/ipv6/conf/tun0/accept_ra"))
    assert lo is not None and lo.up


def test_host_facts_link_without_ipv6(netns: Callable[[str], Netns]) -> None:
    ns = lab(netns)
    ns.run("ip link set vb mtu 1200")  # below the IPv6 minimum: the kernel drops IPv6 there
    wait_for(lambda: ns.run("test -e /proc/sys/net/ipv6/conf/vb", check=False).returncode != 0,
             what="vb's IPv6 conf to go")
    facts = in_ns(ns, lambda nl: nl.host_facts())
    vb = facts.link("vb")
    assert vb is not None and vb.up and vb.accept_ra is None


def test_nft_table_names_are_the_tables_nft_lists(netns: Callable[[str], Netns]) -> None:
    from tagrouted.kernel.netlink import nft_table_names

    ns = netns("nftn")
    assert ns.call(nft_table_names) == []
    for family, name in (("inet", "tagrouted"), ("ip", "filter"), ("ip6", "nat"), ("bridge", "b"),
                         ("netdev", "n"), ("arp", "a"), ("inet", "x" * 200)):
        ns.run(f"nft add table {family} {name}")
    listed = json.loads(ns.out("nft -j list tables"))["nftables"]
    want = sorted((t["table"]["family"], t["table"]["name"]) for t in listed if "table" in t)
    assert sorted(ns.call(nft_table_names)) == want and len(want) == 7
