"""The host-firewall judgement, table-driven (no root, no kernel): a ruleset in (nft text as a
user writes it, turned into nft JSON by hand-written fixtures, or iptables-save text), the
conflicts out; and the accepts we keep in the host's FORWARD chains."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from firewall_view import DOCKER_SAVE

from tagrouted.core.config import load_config
from tagrouted.core.desired import assumed_facts, desired_state
from tagrouted.core.hostfw import (
    HOSTFW_CHAIN,
    Conflict,
    HostfwView,
    Ruleset,
    hostfw_in_sync,
    hostfw_places,
    hostfw_rules,
    judge,
    nft_texts,
    parse_nft,
    parse_save,
    parse_save_view,
    restore_batch,
    rule_comment,
    with_integration,
)
from tagrouted.core.state import FirewallIntent

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "etc" / "tagrouted" / "examples"


def intent_of(example: str) -> FirewallIntent:
    config = load_config(str(EXAMPLES / example))
    return desired_state(config, assumed_facts(config)).firewall


GATEWAY = intent_of("remote-server.yaml")
VPN_SERVER = intent_of("vpn-server.yaml")
VPN_CLIENT = intent_of("vpn-client.yaml")
SERVICE = intent_of("web-service.yaml")


# ---- nft JSON fixtures, written as small builders -------------------------------------------------

def chain(family: str, table: str, name: str, hook: str | None = None, prio: int = 0,
          policy: str = "accept", type_: str = "filter") -> dict[str, Any]:
    c: dict[str, Any] = {"family": family, "table": table, "name": name}
    if hook:
        c.update(hook=hook, prio=prio, policy=policy, type=type_)
    return {"chain": c}


def rule(family: str, table: str, chain_name: str, handle: int, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": family, "table": table, "chain": chain_name, "handle": handle,
                     "expr": list(expr)}}


def m(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


CT_STATE = {"ct": {"key": "state"}}
CT_STATUS = {"ct": {"key": "status"}}
IIF = {"meta": {"key": "iifname"}}
MARK = {"meta": {"key": "mark"}}
ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}


def nft(*items: dict[str, Any]) -> Ruleset:
    return Ruleset(tuple(parse_nft({"nftables": list(items)})))


def save(text: str, source: str = "iptables-nft", family: str = "ip") -> Ruleset:
    return Ruleset(tuple(parse_save(text, source, family)))  # type: ignore[arg-type]


def fails(conflicts: tuple[Conflict, ...]) -> list[Conflict]:
    return [c for c in conflicts if c.severity == "fail"]


def warns(conflicts: tuple[Conflict, ...]) -> list[Conflict]:
    return [c for c in conflicts if c.severity == "warn"]


def judged_as(conflicts: tuple[Conflict, ...], expect: str | None, name: str) -> None:
    """None: no conflict; "fail": at least one sure one; "warn": only `may` ones."""
    lines = [c.line() for c in conflicts]
    if expect is None:
        assert conflicts == (), (name, lines)
    elif expect == "fail":
        assert fails(conflicts), (name, lines)
    else:
        assert warns(conflicts) and not fails(conflicts), (name, lines)


FIREWALLD_STYLE = (
    chain("inet", "filter", "forward", "forward", policy="drop"),
    rule("inet", "filter", "forward", 3, m(CT_STATE, ["established", "related"], "in"), ACCEPT),
)
DOCKER_DROP = DOCKER_SAVE
UFW_STYLE = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:ufw-before-forward - [0:0]
:ufw-user-forward - [0:0]
-A FORWARD -j ufw-before-forward
-A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ufw-before-forward -p icmp -m icmp --icmp-type 3 -j ACCEPT
-A ufw-before-forward -j ufw-user-forward
COMMIT
"""


# ---- drops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "ruleset", "intent", "expect"), [
    ("firewalld-style policy drop, gateway", nft(*FIREWALLD_STYLE), GATEWAY, "fail"),
    ("firewalld-style + ct status dnat accept", nft(
        *FIREWALLD_STYLE,
        rule("inet", "filter", "forward", 4, m(CT_STATUS, "dnat", "in"), ACCEPT)), GATEWAY, None),
    ("firewalld-style, vpn-server", nft(*FIREWALLD_STYLE), VPN_SERVER, "fail"),
    ("firewalld-style, vpn-client", nft(*FIREWALLD_STYLE), VPN_CLIENT, "fail"),
    ("an ip table does not see IPv6", nft(chain("ip", "f", "fw", "forward", policy="drop")), VPN_SERVER, "fail"),
    ("a drop for another interface: only the replies may meet it", nft(
        chain("inet", "f", "fw", "forward"),
        rule("inet", "f", "fw", 2, m(IIF, "wlan9"), DROP)), GATEWAY, "warn"),  # replies come in from home
    ("a drop for any input interface of ours", nft(
        chain("inet", "f", "fw", "forward"),
        rule("inet", "f", "fw", 2, m(IIF, "eth0"), DROP)), GATEWAY, "fail"),
    ("a client blocklist may drop", nft(
        chain("inet", "f", "fw", "forward"),
        rule("inet", "f", "fw", 2, m({"payload": {"protocol": "ip", "field": "saddr"}}, "203.0.113.66"), DROP)),
     GATEWAY, "warn"),
    ("a rate limit is not understood: may", nft(
        chain("inet", "f", "fw", "forward"),
        rule("inet", "f", "fw", 2, m(IIF, "eth0"), {"limit": {"rate": 10, "per": "second"}}, DROP)),
     GATEWAY, "warn"),
    ("a drop of other ports", nft(
        chain("inet", "f", "fw", "forward"),
        rule("inet", "f", "fw", 2, m({"payload": {"protocol": "tcp", "field": "dport"}},
                                     {"set": [22, {"range": [8000, 8100]}]}), DROP)), GATEWAY,
     "warn"),  # the new connections' ports are known; the replies go to any client port
    ("a drop through a jump", nft(
        chain("inet", "f", "fw", "forward"), chain("inet", "f", "sub"),
        rule("inet", "f", "fw", 2, {"jump": {"target": "sub"}}),
        rule("inet", "f", "sub", 3, m(IIF, "eth0"), {"reject": None})), GATEWAY, "fail"),
    ("a vmap that sends us to a drop", nft(
        chain("inet", "f", "fw", "forward"), chain("inet", "f", "zone"),
        rule("inet", "f", "fw", 2, {"vmap": {"key": IIF, "data": {"set": [
            ["eth0", {"goto": {"target": "zone"}}], ["lo", ACCEPT]]}}}),
        rule("inet", "f", "zone", 3, DROP)), GATEWAY, "fail"),
    ("priority after ours does not matter for drops: any base chain counts", nft(
        chain("inet", "f", "late", "forward", prio=100, policy="drop")), VPN_SERVER, "fail"),
    ("a nat chain never drops", nft(chain("ip", "n", "pre", "forward", type_="nat", policy="accept")),
     GATEWAY, None),
    ("Docker's FORWARD DROP (iptables-nft)", save(DOCKER_DROP), GATEWAY, "fail"),
    ("ufw's forward chains", save(UFW_STYLE), VPN_CLIENT, "fail"),
    ("legacy iptables FORWARD DROP", save(DOCKER_DROP, "legacy"), VPN_SERVER, "fail"),
])
def test_drops(name: str, ruleset: Ruleset, intent: FirewallIntent, expect: str | None) -> None:
    judged_as(judge(ruleset, intent, "nftables"), expect, name)


def test_dnat_state_accepts_both_directions() -> None:
    text = DOCKER_DROP.replace("-A FORWARD -j DOCKER-USER",
                               "-A FORWARD -m conntrack --ctstate DNAT -j ACCEPT\n-A FORWARD -j DOCKER-USER")
    # ctstate DNAT holds for every packet of a DNATed connection, replies too: no conflict
    assert judge(save(text), GATEWAY, "nftables") == ()


def test_the_conflict_names_table_chain_rule_and_fix() -> None:
    c = fails(judge(nft(*FIREWALLD_STYLE), GATEWAY, "nftables"))[0]
    assert (c.table, c.chain, c.rule) == ("inet filter", "forward", "policy drop")
    assert c.does.startswith("drops new connections to web (tcp 192.168.100.3 port 443)")
    assert c.fix == "nft insert rule inet filter forward ct status dnat accept"
    docker = fails(judge(save(DOCKER_DROP), GATEWAY, "nftables"))[0]
    assert docker.table == "iptables-nft filter (IPv4)" and docker.rule == "policy drop"
    assert "iptables-nft -t filter -I DOCKER-USER -m conntrack --ctstate DNAT -j ACCEPT" in docker.fix
    client = fails(judge(nft(*FIREWALLD_STYLE), VPN_CLIENT, "nftables"))[0]
    assert 'iifname "tun0" oifname "eth0"' in client.fix


def test_our_jump_accepts_our_traffic() -> None:
    places = hostfw_places(save(DOCKER_DROP), GATEWAY, "nftables", {})
    assert [(p.source, p.family, p.parent) for p in places] == [("iptables-nft", 4, "DOCKER-USER")]
    integrated = with_integration(save(DOCKER_DROP), places)
    assert judge(integrated, GATEWAY, "nftables") == ()
    again = hostfw_places(integrated, GATEWAY, "nftables", {})
    assert again == places, "judged without our own jump: the place stays"


def test_places_only_where_something_can_drop() -> None:
    accepting = DOCKER_DROP.replace(":FORWARD DROP", ":FORWARD ACCEPT")
    assert hostfw_places(save(accepting), GATEWAY, "nftables", {}) == []
    no_docker = DOCKER_DROP.replace(":DOCKER-USER - [0:0]\n", "").replace("-A FORWARD -j DOCKER-USER\n", "") \
        .replace("-A DOCKER-USER -j RETURN\n", "")
    assert [p.parent for p in hostfw_places(save(no_docker), GATEWAY, "nftables", {})] == ["FORWARD"]
    legacy = save(DOCKER_DROP, "legacy")
    assert [p.source for p in hostfw_places(legacy, GATEWAY, "nftables", {4: True})] == ["legacy"]
    # the legacy backend's own chain is first in legacy FORWARD already
    assert hostfw_places(legacy, GATEWAY, "iptables-legacy", {4: True}) == []


def test_the_legacy_backends_chain_counts_as_ours() -> None:
    text = DOCKER_DROP.replace("-A FORWARD -j DOCKER-USER",
                               "-A FORWARD -m comment --comment tagrouted -j TAGROUTED-FORWARD\n"
                               "-A FORWARD -j DOCKER-USER")
    assert judge(save(text, "legacy"), VPN_SERVER, "iptables-legacy") == ()


# ---- marks and DSCP ------------------------------------------------------------------------------

def out_chain(prio: int, *stmts: dict[str, Any], hook: str = "output", type_: str = "route") -> Ruleset:
    return nft(chain("inet", "ks", "c", hook, prio=prio, type_=type_), rule("inet", "ks", "c", 2, *stmts))


def mangle(key: dict[str, Any], value: Any) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": value}}


CT_MARK = {"ct": {"key": "mark"}}
DSCP4 = {"payload": {"protocol": "ip", "field": "dscp"}}


@pytest.mark.parametrize(("name", "ruleset", "intent", "backend", "expect"), [
    ("mark set before ours (mangle)", out_chain(-150, mangle(MARK, 1)), SERVICE, "nftables", None),
    ("mark set after ours", out_chain(0, mangle(MARK, 1)), SERVICE, "nftables", "fail"),
    ("mark set at our priority on legacy (load order)", out_chain(-150, mangle(MARK, 1)), SERVICE,
     "iptables-legacy", "warn"),
    ("mark bit ORed outside our mask", out_chain(0, mangle(MARK, {"|": [MARK, 0x100]})), SERVICE,
     "nftables", None),
    ("mark bit ORed inside our mask", out_chain(0, mangle(MARK, {"|": [MARK, 0x1]})), SERVICE,
     "nftables", "fail"),
    ("exemption for our mark first", nft(
        chain("inet", "ks", "c", "output", prio=0, type_="route"),
        rule("inet", "ks", "c", 2, m({"&": [MARK, 0xFF]}, 0x2A), ACCEPT),
        rule("inet", "ks", "c", 3, mangle(MARK, 1))), SERVICE, "nftables", None),
    ("ct mark set anywhere", out_chain(-300, mangle(CT_MARK, 5), hook="prerouting", type_="filter"),
     SERVICE, "nftables", "fail"),
    ("ct mark ORed outside our mask", out_chain(0, mangle(CT_MARK, {"|": [CT_MARK, 0x80000]}),
                                                hook="postrouting", type_="filter"), SERVICE, "nftables", None),
    ("DSCP cleared in mangle postrouting: ours runs after", out_chain(
        -150, mangle(DSCP4, "cs0"), hook="postrouting", type_="filter"), SERVICE, "nftables", None),
    ("DSCP cleared after ours", out_chain(0, mangle(DSCP4, "cs0"), hook="postrouting", type_="filter"),
     SERVICE, "nftables", "fail"),
    ("DSCP cleared in postrouting, legacy stamps in OUTPUT", out_chain(
        -150, mangle(DSCP4, "cs0"), hook="postrouting", type_="filter"), SERVICE, "iptables-legacy", "fail"),
    ("DSCP cleared on what leaves the VPN client's tunnel", out_chain(
        0, mangle(DSCP4, 0), hook="forward", type_="filter"), VPN_CLIENT, "nftables", "fail"),
    ("iptables-nft mangle DSCP clear, nft backend", save(
        "*mangle\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j DSCP --set-dscp 0x00\nCOMMIT\n"),
     SERVICE, "nftables", None),
    ("legacy CONNMARK on every packet", save(
        "*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j CONNMARK --set-xmark 0x1/0xffffffff\nCOMMIT\n", "legacy"),
     SERVICE, "nftables", "fail"),
    ("legacy MARK OR outside mask", save(
        "*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j MARK --set-xmark 0x100/0x100\nCOMMIT\n", "legacy"),
     SERVICE, "iptables-legacy", None),
])
def test_tags(name: str, ruleset: Ruleset, intent: FirewallIntent, backend: str, expect: str | None) -> None:
    judged_as(judge(ruleset, intent, backend), expect, name)


def test_mark_conflict_fix_is_an_exemption_in_their_table() -> None:
    c = fails(judge(out_chain(0, mangle(MARK, 1)), SERVICE, "nftables"))[0]
    assert c.kind == "mark" and c.table == "inet ks" and c.chain == "c"
    assert c.fix.startswith("nft insert rule inet ks c meta mark and 0xff == 0x2a accept")


# ---- the accepts we keep ---------------------------------------------------------------------------

def test_accepts_match_exactly_our_traffic() -> None:
    gw = [r.save_args() for r in hostfw_rules(GATEWAY)[4]]
    assert gw[0] == ("-m conntrack --ctstate DNAT --ctproto tcp --ctreplsrc 192.168.100.3/32 --ctreplsrcport 443 "
                     f"-m comment --comment {rule_comment(hostfw_rules(GATEWAY)[4][0])} -j ACCEPT")
    assert len(gw) == 3  # web, echo, the openvpn forward
    vs = [r.save_args() for r in hostfw_rules(VPN_SERVER)[6]]
    assert [x.split(" -m comment")[0] for x in vs] == ["-i tun0 -o eth0", "-i eth0 -o tun0"]
    vc = hostfw_rules(VPN_CLIENT)[4]
    assert vc[0].save_args().startswith("-d 192.168.100.3/32 -i tun0 -o eth0 -p tcp -m tcp --dport 443")
    assert "--ctorigdst 192.168.100.3/32 --ctorigdstport 443" in vc[1].save_args()
    assert hostfw_rules(SERVICE) == {}
    assert all(" " not in rule_comment(r) for rules in hostfw_rules(GATEWAY).values() for r in rules)


def test_allow_from_narrows_our_accepts_to_its_prefixes() -> None:
    config = load_config(str(EXAMPLES / "remote-server.yaml"))
    web = config.services[0]
    limited = replace(config, services=(replace(web, allow_from=(ip_network("198.51.100.0/24"),
                                                                 ip_network("203.0.113.0/25"))),))
    intent = desired_state(limited, assumed_facts(limited)).firewall
    rules = [r.save_args() for r in hostfw_rules(intent)[4] if "192.168.100.3" in r.save_args()]
    assert len(rules) == 2
    assert "--ctorigsrc 198.51.100.0/24 --ctreplsrc 192.168.100.3/32" in rules[0]
    assert "--ctorigsrc 203.0.113.0/25" in rules[1]


SAVED = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
:TAGROUTED-HOSTFW - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -m comment --comment tagrouted -j TAGROUTED-HOSTFW
-A DOCKER-USER -m comment --comment tagrouted -j TAGROUTED-HOSTFW
-A TAGROUTED-HOSTFW -i tun0 -o eth0 -m comment --comment "tagrouted:vpn-server:abc" -j ACCEPT
COMMIT
"""


def test_view_and_batch() -> None:
    view = parse_save_view(SAVED)
    assert view.chain_present and view.comments == ["tagrouted:vpn-server:abc"]
    assert view.jumps == [("FORWARD", 1, True), ("DOCKER-USER", 0, True)]
    rules = hostfw_rules(VPN_SERVER)[4]
    assert not hostfw_in_sync(view, rules, "DOCKER-USER")
    batch = restore_batch(view, rules, "DOCKER-USER")
    assert batch[0] == "*filter" and batch[-1] == "COMMIT"
    assert "-D FORWARD 2" in batch and not any(x.startswith("-D DOCKER-USER") for x in batch)
    assert f":{HOSTFW_CHAIN} - [0:0]" in batch
    assert not any(x.startswith("-I ") for x in batch), "the exact jump first in DOCKER-USER stays"
    removal = restore_batch(view, (), "DOCKER-USER")
    assert removal == ["*filter", "-D DOCKER-USER 1", "-D FORWARD 2", f"-F {HOSTFW_CHAIN}", f"-X {HOSTFW_CHAIN}",
                       "COMMIT"]
    fresh = restore_batch(HostfwView(exists=True), rules, "FORWARD")
    assert fresh[-2] == f"-I FORWARD 1 -m comment --comment tagrouted -j {HOSTFW_CHAIN}"
    in_sync = HostfwView(True, True, [rule_comment(r) for r in rules], [("FORWARD", 0, True)])
    assert hostfw_in_sync(in_sync, rules, "FORWARD")


def test_nft_texts_name_rules_by_handle() -> None:
    listing = """table inet filter { # handle 3
\tchain forward { # handle 1
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept # handle 4
\t}
}
"""
    assert nft_texts(listing) == {("inet", "filter", "forward", 4): "ct state established,related accept"}
