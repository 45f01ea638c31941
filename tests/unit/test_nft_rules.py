"""The nftables rendering and its diff, table-driven, without a kernel.

A `KernelNft` is what the backend reads back from libnftables JSON; `as_kernel(table)` builds the
one a kernel holding exactly `table` would give, so each case is: a desired table, a kernel that
differs from it in one way, and the one transaction (commands and records) that mends it.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from tagrouted.core.config import (
    Config,
    GatewaySection,
    PortRange,
    Service,
    ServiceSection,
    Tag,
    VpnClientSection,
    load_config,
)
from tagrouted.core.desired import assumed_facts, desired_state
from tagrouted.core.nft_diff import KernelChain, KernelNft, KernelSet, drift_lines, nft_transaction
from tagrouted.core.nft_rules import NftTable, creation_script, nft_table, table_lines
from tagrouted.kernel.firewall.nftables import parse_table

EXAMPLES = Path(__file__).resolve().parents[2] / "etc" / "tagrouted" / "examples"
WEB = Service("web", "tcp", PortRange(443, 443), ip_address("192.168.100.3"))
WEB6 = Service("web6", "tcp", PortRange(443, 443), ip_address("fd00:100::3"))
GAMES = Service("games", "udp", PortRange(27015, 27020), ip_address("192.168.100.4"))
ALT = Service("alt", "tcp", PortRange(8443, 8443), ip_address("192.168.100.3"), to_port=443)
GATEWAY = GatewaySection("eth0", (ip_address("192.0.2.200"), ip_address("2001:db8:a::200")),
                         (ip_network("192.168.100.0/24"), ip_network("fd00:100::/64")),
                         via=(ip_address("192.168.200.2"), ip_address("fd00:200::2")))


def cfg(*roles: str, **kw: object) -> Config:
    return Config(path="t.yaml", roles=roles, **kw)  # type: ignore[arg-type]


def table_of(config: Config) -> NftTable:
    return nft_table(desired_state(config, assumed_facts(config)).firewall)


def as_kernel(table: NftTable) -> KernelNft:
    return KernelNft(
        exists=True, counters=frozenset(table.counters),
        sets={s.name: KernelSet(s.kind, s.key, s.value, s.flags, tuple(e.comment for e in s.elements))
              for s in table.sets},
        chains={c.name: KernelChain(c.type, c.hook, c.priority, c.policy, tuple(r.comment for r in c.rules),
                                    tuple(range(1, len(c.rules) + 1)))
                for c in table.chains})


def rules(table: NftTable, chain: str) -> list[str]:
    return [r.text for c in table.chains if c.name == chain for r in c.rules]


# ---- the rendering ----------------------------------------------------------------------------

def test_vpn_client_tags_marks_clears_and_admits() -> None:
    t = table_of(cfg("vpn-client", services=(WEB, WEB6), vpn_client=VpnClientSection("tun0", "eth0")))
    # the tagging rules count into the path's named counters (requests in, replies back)
    assert rules(t, "prerouting") == [
        'iifname "tun0" ip dscp set 42 counter name "path_default_requests"',
        'iifname "eth0" ip dscp 42 meta mark set meta mark and 0xffffff00 or 0x2a counter name "path_default_replies"',
        'iifname "tun0" ip6 dscp set 42 counter name "path_default_requests"',
        'iifname "eth0" ip6 dscp 42 meta mark set meta mark and 0xffffff00 or 0x2a counter name "path_default_replies"']
    assert rules(t, "postrouting") == ['oifname "tun0" ip dscp set 0 counter',
                                       'oifname "tun0" ip6 dscp set 0 counter']
    fwd = rules(t, "forward")
    # every accept of both families before the family-neutral drop
    assert fwd[-1] == 'iifname "tun0" oifname "eth0" counter drop'

    assert any("@admit6 counter accept" in r for r in fwd)
    # the sources are part of the key (everyone: 0.0.0.0/0), then the home endpoint
    assert [e.key for e in t.set("admit4").elements] == ["0.0.0.0/0 . 192.168.100.3 . tcp . 443"]
    assert t.counters == ("path_default_requests", "path_default_replies", "svc_web", "svc_web6")
    assert {c.name: (c.type, c.hook, c.priority) for c in t.chains} == {
        "prerouting": ("filter", "prerouting", -140), "postrouting": ("filter", "postrouting", -140),
        "mss": ("filter", "forward", -140), "forward": ("filter", "forward", 0)}


def test_service_host_restores_only_our_bits_and_stamps_dscp() -> None:
    via = ServiceSection(via=(ip_address("192.168.100.2"),))
    t = table_of(cfg("service", service=via))
    assert rules(t, "input") == [
        'ip dscp 42 ct mark set ct mark and 0xffffff00 or 0x2a counter name "path_default_requests"']
    assert rules(t, "output") == [
        'ct mark and 0xff == 0x2a meta mark set meta mark and 0xffffff00 or 0x2a counter name "path_default_replies"']
    assert rules(t, "postrouting") == ["meta mark and 0xff == 0x2a ip dscp set 42 counter"]
    output = next(c for c in t.chains if c.name == "output")
    assert output.type == "route", "a mark set on output must re-route the reply"
    full = table_of(cfg("service", service=via, tag=Tag(mark=0x100, mark_mask=0xFFFFFFFF)))
    assert rules(full, "output") == ['ct mark 0x100 meta mark set 0x100 counter name "path_default_replies"']


def test_gateway_maps_dnat_and_admits_in_sets() -> None:
    t = table_of(cfg("gateway", services=(WEB, WEB6, GAMES, ALT), gateway=GATEWAY))
    dnat4 = {e.key: e.value for e in t.set("dnat4").elements}
    assert dnat4 == {"192.0.2.200 . tcp . 443": "192.168.100.3",
                     "192.0.2.200 . udp . 27015-27020": "192.168.100.4"}
    assert {e.key: e.value for e in t.set("dnat4_port").elements} == {
        "192.0.2.200 . tcp . 8443": "192.168.100.3 . 443"}
    assert rules(t, "dstnat") == [
        'iifname "eth0" counter dnat ip to ip daddr . meta l4proto . th dport map @dnat4',
        'iifname "eth0" meta l4proto { tcp, udp } counter dnat ip to ip daddr . meta l4proto . th dport '
        "map @dnat4_port",
        'iifname "eth0" counter dnat ip6 to ip6 daddr . meta l4proto . th dport map @dnat6']
    # 443 and 8443 -> .3:443 share one home endpoint: one admission, one counter element
    assert [e.key for e in t.set("gw_allow4").elements] == [
        "0.0.0.0/0 . 192.168.100.3 . tcp . 443", "0.0.0.0/0 . 192.168.100.4 . udp . 27015-27020"]
    assert [e.key for e in t.set("svc_counters4").elements] == [
        "192.168.100.3 . tcp . 443", "192.168.100.4 . udp . 27015-27020"]
    fwd = rules(t, "forward")
    assert fwd[0].startswith("counter name ip daddr") and fwd[2].startswith("counter name ip6 daddr")
    assert fwd[4] == "ct state established,related counter accept"
    assert fwd[-2:] == ['iifname "eth0" ip daddr @gw_home4 counter drop',
                        'iifname "eth0" ip6 daddr @gw_home6 counter drop']


def test_every_rule_and_element_carries_the_digest_of_its_text() -> None:
    t = table_of(cfg("gateway", services=(WEB, GAMES), gateway=GATEWAY))
    comments = [r.comment for c in t.chains for r in c.rules]
    comments += [e.comment for s in t.sets for e in s.elements]
    assert len(comments) == len(set(comments)), "each object says which one it is"
    moved = table_of(cfg("gateway", services=(replace(WEB, port=PortRange(444, 444)), GAMES), gateway=GATEWAY))
    assert t.set("dnat4").elements[0].comment != moved.set("dnat4").elements[0].comment
    assert t.set("dnat4").elements[1].comment == moved.set("dnat4").elements[1].comment


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_rendering_is_deterministic_whatever_the_order(path: Path) -> None:
    config = load_config(str(path))
    first = table_lines(table_of(config))
    shuffled = list(config.services)
    random.Random(3).shuffle(shuffled)
    again = table_lines(table_of(replace(config, services=tuple(shuffled))))
    assert sorted(first) == sorted(again) and table_lines(table_of(config)) == first


# ---- the transaction ----------------------------------------------------------------------------

DESIRED = table_of(cfg("gateway", services=(WEB, WEB6, GAMES), gateway=GATEWAY))


def kernel_with(**changes: object) -> KernelNft:
    return replace(as_kernel(DESIRED), **changes)  # type: ignore[arg-type]


def test_in_sync_is_no_transaction() -> None:
    tx = nft_transaction(DESIRED, as_kernel(DESIRED))
    assert tx.script.lines == [] and tx.changes == [] and not tx.dnat_changed
    assert drift_lines(DESIRED, as_kernel(DESIRED)) == []


def test_no_table_is_created_in_one_transaction() -> None:
    tx = nft_transaction(DESIRED, KernelNft())
    assert tx.script.lines == creation_script(DESIRED).lines
    assert tx.script.lines[0] == "add table inet tagrouted"
    assert tx.changes[0].object == "table" and tx.dnat_changed == {4, 6}
    assert drift_lines(DESIRED, KernelNft())[0] == "+add table inet tagrouted"


def test_an_empty_desire_deletes_the_table_and_nothing_else() -> None:
    tx = nft_transaction(NftTable(), as_kernel(DESIRED))
    assert tx.script.lines == ["delete table inet tagrouted"]
    assert nft_transaction(NftTable(), KernelNft()).script.lines == []


def _chain(kernel: KernelNft, name: str, **changes: object) -> KernelNft:
    chains = dict(kernel.chains)
    chains[name] = replace(chains[name], **changes)  # type: ignore[arg-type]
    return replace(kernel, chains=chains)


def _set(kernel: KernelNft, name: str, **changes: object) -> KernelNft:
    sets = dict(kernel.sets)
    sets[name] = replace(sets[name], **changes)  # type: ignore[arg-type]
    return replace(kernel, sets=sets)


def test_a_flushed_chain_is_refilled_alone() -> None:
    kernel = _chain(as_kernel(DESIRED), "forward", comments=(), handles=())
    tx = nft_transaction(DESIRED, kernel)
    forward = next(c for c in DESIRED.chains if c.name == "forward")
    assert tx.script.lines[0] == "flush chain inet tagrouted forward"
    assert len(tx.script.lines) == 1 + len(forward.rules)
    assert all(line.startswith("add rule inet tagrouted forward ") for line in tx.script.lines[1:])
    assert [(c.action, c.object) for c in tx.changes] == [("replaced", "chain")]


def test_a_foreign_rule_in_our_chain_goes() -> None:
    k = as_kernel(DESIRED).chains["dstnat"]
    kernel = _chain(as_kernel(DESIRED), "dstnat", comments=(None, *k.comments), handles=(99, *k.handles))
    tx = nft_transaction(DESIRED, kernel)
    assert tx.script.lines[0] == "flush chain inet tagrouted dstnat"
    assert "1 not ours" in tx.changes[0].message
    assert "-rule of chain dstnat (inet tagrouted), handle 99: not written by tagrouted" in drift_lines(DESIRED, kernel)


def test_a_reordered_chain_is_rewritten() -> None:
    k = as_kernel(DESIRED).chains["forward"]
    kernel = _chain(as_kernel(DESIRED), "forward", comments=tuple(reversed(k.comments)))
    tx = nft_transaction(DESIRED, kernel)
    assert tx.script.lines[0] == "flush chain inet tagrouted forward"
    assert "wrong order" in tx.changes[0].message


def test_a_chain_at_another_priority_is_replaced() -> None:
    kernel = _chain(as_kernel(DESIRED), "dstnat", priority=0)
    tx = nft_transaction(DESIRED, kernel)
    assert tx.script.lines[:3] == ["flush chain inet tagrouted dstnat", "delete chain inet tagrouted dstnat",
                                   "add chain inet tagrouted dstnat { type nat hook prerouting priority -100; "
                                   "policy accept; }"]


def test_a_missing_element_is_added_without_touching_the_rest() -> None:
    dnat = as_kernel(DESIRED).sets["dnat4"]
    kernel = _set(as_kernel(DESIRED), "dnat4", comments=dnat.comments[1:])
    tx = nft_transaction(DESIRED, kernel)
    assert len(tx.script.lines) == 1 and tx.script.lines[0].startswith("add element inet tagrouted dnat4 {")
    assert [(c.action, c.object) for c in tx.changes] == [("added", "element")]
    assert tx.dnat_changed == {4}, "a changed DNAT: stale UDP conntrack goes"


def test_a_foreign_element_makes_the_set_refilled() -> None:
    allow = as_kernel(DESIRED).sets["gw_allow4"]
    kernel = _set(as_kernel(DESIRED), "gw_allow4", comments=(*allow.comments, None))
    tx = nft_transaction(DESIRED, kernel)
    assert tx.script.lines[0] == "flush set inet tagrouted gw_allow4"
    assert [(c.action, c.object) for c in tx.changes] == [("removed", "element")]


def test_a_set_of_another_type_is_recreated_with_every_chain_refilled() -> None:
    kernel = _set(as_kernel(DESIRED), "dnat4", flags=())
    tx = nft_transaction(DESIRED, kernel)
    flushed = [line for line in tx.script.lines if line.startswith("flush chain")]
    assert len(flushed) == len(DESIRED.chains), "rules reference sets: every chain is emptied first"
    delete = tx.script.lines.index("delete map inet tagrouted dnat4")
    assert all(tx.script.lines.index(f) < delete for f in flushed)
    assert any(line.startswith("add map inet tagrouted dnat4 {") for line in tx.script.lines[delete:])


def test_what_we_no_longer_want_goes_last_counters_after_their_elements() -> None:
    smaller = table_of(cfg("gateway", services=(WEB,), gateway=GATEWAY))
    tx = nft_transaction(smaller, as_kernel(DESIRED))
    lines = tx.script.lines
    assert "delete set inet tagrouted gw_allow6" in lines and "delete map inet tagrouted dnat6" in lines
    assert lines[-1].startswith("delete counter inet tagrouted ")
    refill = lines.index("flush map inet tagrouted svc_counters4")
    assert refill < lines.index("delete counter inet tagrouted svc_games")


def test_counters_of_kept_services_are_never_recreated() -> None:
    more = table_of(cfg("gateway", services=(WEB, WEB6, GAMES, ALT), gateway=GATEWAY))
    tx = nft_transaction(more, as_kernel(DESIRED))
    assert not any(line.startswith(("delete counter", "flush map inet tagrouted svc_counters"))
                   for line in tx.script.lines), tx.script.lines


# ---- reading the kernel's JSON --------------------------------------------------------------------

LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "tagrouted", "handle": 1}},
    {"counter": {"family": "inet", "name": "svc_web", "table": "tagrouted", "packets": 3, "bytes": 180}},
    {"map": {"family": "inet", "name": "dnat4", "table": "tagrouted",
             "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "ipv4_addr . inet_service",
             "flags": ["interval"],
             "elem": [[{"elem": {"val": {"concat": ["192.0.2.200", "tcp", 443]}, "comment": "web abc"}},
                       {"concat": ["192.168.100.3", 8443]}],
                      [{"concat": ["192.0.2.200", "tcp", 80]}, {"concat": ["192.168.100.3", 80]}]]}},
    {"set": {"family": "inet", "name": "home", "table": "tagrouted", "type": "ipv4_addr",
             "elem": [{"elem": {"val": {"prefix": {"addr": "10.0.0.0", "len": 8}}, "comment": "home x"}}]}},
    {"chain": {"family": "inet", "table": "tagrouted", "name": "output", "handle": 3, "type": "route",
               "hook": "output", "prio": "mangle + 10", "policy": "accept"}},
    {"rule": {"family": "inet", "table": "tagrouted", "chain": "output", "handle": 7, "comment": "d1", "expr": []}},
    {"rule": {"family": "inet", "table": "tagrouted", "chain": "output", "handle": 8, "expr": []}},
]}


def test_the_reader_takes_only_stable_fields_and_normalises_their_shapes() -> None:
    k = parse_table(json.loads(json.dumps(LISTING)))
    assert k.exists and k.counters == frozenset({"svc_web"})
    assert k.sets["dnat4"] == KernelSet("map", ("ipv4_addr", "inet_proto", "inet_service"),
                                        ("ipv4_addr", "inet_service"), ("interval",), ("web abc", None))
    assert k.sets["home"].comments == ("home x",) and k.sets["home"].value is None
    assert k.chains["output"] == KernelChain("route", "output", -140, "accept", ("d1", None), (7, 8))
    list_form = json.loads(json.dumps(LISTING))
    list_form["nftables"][3]["map"]["map"] = ["ipv4_addr", "inet_service"]  # as newer nft may print it
    assert parse_table(list_form).sets["dnat4"].value == ("ipv4_addr", "inet_service")
    assert not parse_table({"nftables": []}).exists
