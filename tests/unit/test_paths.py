"""Issue 14, several public servers: the `paths:` config (strict), and the desired state per path
on the vpn-client and the service host, table-driven (no root, no kernel).

What a user checks: the multipath examples are valid and plan one rule, one table (with its own
unreachable fallback) and one tag per path; a path whose tunnel is down keeps only its fallback
while the others keep theirs; every refused file names FILE:LINE: key.path; the single-path
form still means exactly one path, the tag.
"""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest
from test_config import parser, problems_of  # noqa: F401 - `parser`: every test under both YAML parsers

from tagrouted.core.config import DEFAULT_PATH, TagPath, load_config, parse_config
from tagrouted.core.desired import assumed_facts, desired_state, named_interfaces
from tagrouted.core.iptables_rules import legacy_chains, path_counted_rules
from tagrouted.core.nft_rules import nft_table, path_counter_name
from tagrouted.core.plan import path_lines, plan_lines
from tagrouted.core.state import UNREACHABLE_METRIC, HostFacts, LinkFacts, PolicyRule, Route

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "etc" / "tagrouted" / "examples"
VPN_CLIENT = EXAMPLES / "vpn-client-multipath.yaml"
WEB = EXAMPLES / "web-service-multipath.yaml"
VPS = EXAMPLES / "vps-wireguard.yaml"


A = "{name: a, dscp: 42, mark: 42, table: 42, priority: 1042, tunnel_interface: tun0}"
B = "{name: b, dscp: 43, mark: 43, table: 43, priority: 1043, tunnel_interface: wg0}"
SERVICES = ("services:\n  - {name: web, proto: tcp, port: 443, address: 192.168.100.3}\n"
            "  - {name: web6, proto: tcp, port: 443, address: \"fd00:100::3\"}\n")


def client(a: str = A, b: str = B, extra: str = "", section: str = "{lan_interface: eth0}") -> str:
    """A multipath vpn-client: line 3 is path a, line 4 path b, line 5 the vpn_client section."""
    return f"roles: [vpn-client]\npaths:\n  - {a}\n  - {b}\nvpn_client: {section}\n{extra}"


def web(a: str, b: str, extra: str = "", roles: str = "[service]") -> str:
    """A multipath service host: line 3 path a, line 4 path b, then `extra` from line 5."""
    return f"roles: {roles}\npaths:\n  - {a}\n  - {b}\n{extra}"


WA = "{name: a, dscp: 42, mark: 42, table: 42, priority: 1042}"
WB = "{name: b, dscp: 43, mark: 43, table: 43, priority: 1043}"
VIA = "service: {via: [192.168.100.2, \"fd00:100::2\"]}\n"


# ---- valid files ----------------------------------------------------------------------------
def test_the_multipath_examples_are_valid_paths() -> None:
    vc = load_config(str(VPN_CLIENT))
    assert [p.name for p in vc.tag_paths()] == ["server-a", "server-b"]
    assert vc.tag_paths()[1] == TagPath("server-b", 43, 43, 43, 1043, "wg0", ())
    assert vc.vpn_client is not None and vc.vpn_client.tunnel_interface is None
    service = load_config(str(WEB))
    via = (ip_address("192.168.100.2"), ip_address("fd00:100::2"))
    assert [p.via for p in service.tag_paths()] == [via, via], "service.via is every path's default"
    gateway = load_config(str(VPS))
    assert not gateway.paths, "a public server runs its own single path"


def test_the_single_path_form_is_one_path_named_default() -> None:
    config = load_config(str(EXAMPLES / "vpn-client.yaml"))
    assert config.tag_paths() == (TagPath(DEFAULT_PATH, 42, 42, 42, 1042, "tun0", ()),)
    service = load_config(str(EXAMPLES / "web-service.yaml"))
    assert service.tag_paths()[0].via == (ip_address("192.168.100.2"), ip_address("fd00:100::2"))
    custom = parse_config("roles: [vpn-client]\ntag: {dscp: 11, mark: 7, table: 100, priority: 2000}\n"
                          "vpn_client: {tunnel_interface: tun1, lan_interface: eth0}\n", "t.yaml")
    assert custom.tag_paths() == (TagPath(DEFAULT_PATH, 11, 7, 100, 2000, "tun1", ()),)


def test_a_path_of_its_own_via_overrides_service_via() -> None:
    config = parse_config(web(WA, WB[:-1] + ", via: [192.168.100.5, \"fd00:100::5\"]}", VIA), "t.yaml")
    assert [str(p.via[0]) for p in config.tag_paths()] == ["192.168.100.2", "192.168.100.5"]
    every = parse_config(web(WA[:-1] + ", via: [192.168.100.4]}", WB[:-1] + ", via: [192.168.100.5]}"),
                         "t.yaml")
    assert every.service is None, "with paths, the service section is optional"


def test_a_home_router_with_paths_needs_no_service_section() -> None:
    for section in ("", "service: {}\n"):
        config = parse_config(web(A, B, "vpn_client: {lan_interface: eth0}\n" + section,
                                  roles="[vpn-client, service]"), "t.yaml")
        assert [p.tunnel_interface for p in config.tag_paths()] == ["tun0", "wg0"]


def test_mark_mask_is_one_for_all_paths() -> None:
    wide = client(A.replace("mark: 42", "mark: 0x100"), extra="tag: {mark_mask: 0xffff}\n")
    assert parse_config(wide, "t.yaml").tag.mark_mask == 0xFFFF


# ---- refused files --------------------------------------------------------------------------
BROKEN: list[tuple[str, str, list[tuple[int, str, str]]]] = [
    ("tag-values-with-paths", client(extra="tag: {dscp: 42, table: 42, mark_mask: 0xff}\n"),
     [(6, "tag.dscp", "not used with paths"), (6, "tag.table", "not used with paths")]),
    ("vpn-client-tunnel-with-paths", client(section="{tunnel_interface: tun0, lan_interface: eth0}"),
     [(5, "vpn_client.tunnel_interface", "each path names its own tunnel_interface")]),
    ("vpn-client-tunnel-missing-without-paths", "roles: [vpn-client]\nvpn_client: {lan_interface: eth0}\n",
     [(2, "vpn_client.tunnel_interface", "required key missing")]),
    ("service-tunnel-with-paths", web(A, B, "vpn_client: {lan_interface: eth0}\nservice: {tunnel_interface: tun0}\n",
                                      roles="[vpn-client, service]"),
     [(6, "service.tunnel_interface", "into that path's tunnel_interface")]),
    ("service-via-on-a-home-router-with-paths",
     web(A, B, "vpn_client: {lan_interface: eth0}\n" + VIA, roles="[vpn-client, service]"),
     [(6, "service.via", "straight into that path's tunnel_interface")]),
    ("path-via-on-a-home-router", web(A, B[:-1] + ", via: [192.168.100.5]}", "vpn_client: {lan_interface: eth0}\n",
                                      roles="[vpn-client, service]"),
     [(4, "paths[1].via", "straight into its tunnel_interface")]),
    ("duplicate-name", client(b=B.replace("name: b", "name: a")), [(4, "paths[1].name", "also paths[0]'s name")]),
    ("duplicate-dscp", client(b=B.replace("dscp: 43", "dscp: 42")), [(4, "paths[1].dscp", "42 is also paths[0]'s dscp (line 3)")]),
    ("duplicate-mark", client(b=B.replace("mark: 43", "mark: 42")), [(4, "paths[1].mark", "0x2a is also paths[0]'s mark")]),
    ("duplicate-table", client(b=B.replace("table: 43", "table: 42")), [(4, "paths[1].table", "also paths[0]'s table")]),
    ("duplicate-priority", client(b=B.replace("priority: 1043", "priority: 1042")),
     [(4, "paths[1].priority", "also paths[0]'s priority")]),
    ("duplicate-tunnel", client(b=B.replace("wg0", "tun0")), [(4, "paths[1].tunnel_interface", "also paths[0]'s")]),
    ("mark-outside-the-mask", client(b=B.replace("mark: 43", "mark: 0x143")),
     [(4, "paths[1].mark", "bits outside tag.mark_mask 0xff")]),
    ("tunnel-missing-on-a-vpn-client", client(b="{name: b, dscp: 43, mark: 43, table: 43, priority: 1043}"),
     [(4, "paths[1].tunnel_interface", "required on a vpn-client host")]),
    ("tunnel-is-the-lan", client(b=B.replace("wg0", "eth0")), [(4, "paths[1].tunnel_interface", "must differ")]),
    ("no-via-on-a-service-host", web(WA, WB), [(3, "paths[0].via", "required on a service host"),
                                              (4, "paths[1].via", "required on a service host")]),
    ("service-via-unused", web(WA[:-1] + ", via: [192.168.100.4]}", WB[:-1] + ", via: [192.168.100.5]}",
                               "service: {via: [192.168.100.2]}\n"),
     [(5, "service.via", "every path names its own via")]),
    ("via-lacks-a-family", web(WA, WB[:-1] + ", via: [192.168.100.5]}", VIA + SERVICES),
     [(4, "paths[1].via", "no IPv6 address")]),
    ("service-via-lacks-a-family", web(WA, WB, "service: {via: [192.168.100.2]}\n" + SERVICES),
     [(5, "service.via", "no IPv6 address")]),
    ("required-keys", client(b="{name: b, tunnel_interface: wg0}"),
     [(4, "paths[1].dscp", "required key missing"), (4, "paths[1].mark", "required key missing"),
      (4, "paths[1].table", "required key missing"), (4, "paths[1].priority", "required key missing")]),
    ("unknown-key", client(b=B[:-1] + ", tabel: 44}"), [(4, "paths[1].tabel", "did you mean table")]),
    ("foreign-values", client(b=B.replace("table: 43", "table: 51820").replace("dscp: 43", "dscp: 46")),
     [(4, "paths[1].dscp", "EF"), (4, "paths[1].table", "wg-quick")]),
    ("reserved-table", client(b=B.replace("table: 43", "table: 254")), [(4, "paths[1].table", "main")]),
    ("bad-name", client(b=B.replace("name: b", "name: \"b b\"")), [(4, "paths[1].name", "letters, digits")]),
    ("empty", "roles: [vpn-client]\npaths: []\nvpn_client: {lan_interface: eth0}\n",
     [(2, "paths", "at least one")]),
    ("not-a-list", "roles: [vpn-client]\npaths: {a: 1}\nvpn_client: {lan_interface: eth0}\n",
     [(2, "paths", "expected a list")]),
    ("too-many", "roles: [service]\npaths:\n" + "".join(
        f"  - {{name: p{i}, dscp: {2 + i}, mark: {2 + i}, table: {100 + i}, priority: {2000 + i}}}\n"
        for i in range(33)), [(3, "paths", "more than the limit of 32")]),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_broken(text: str, expected: list[tuple[int, str, str]]) -> None:
    problems = problems_of(text)
    assert [(p.line, p.path) for p in problems] == [(line, path) for line, path, _ in expected], \
        "\n".join(map(str, problems))
    for problem, (_, _, words) in zip(problems, expected, strict=True):
        assert words in problem.message, str(problem)


# ---- the desired state ----------------------------------------------------------------------
def links(*names: str) -> HostFacts:
    return HostFacts(links=tuple(LinkFacts(n, i + 2) for i, n in enumerate(names)))


def test_vpn_client_keeps_one_rule_table_fallback_and_tag_per_path() -> None:
    config = load_config(str(VPN_CLIENT))
    state = desired_state(config, links("tun0", "wg0", "eth0"))
    for family in (4, 6):
        assert PolicyRule(family, 1042, 42, 42, 0xFF) in state.rules
        assert PolicyRule(family, 1043, 43, 43, 0xFF) in state.rules
        for table, tun in ((42, "tun0"), (43, "wg0")):
            assert Route(family, table, "default", dev=tun) in state.routes
            assert Route(family, table, "default", kind="unreachable", metric=UNREACHABLE_METRIC) in state.routes
    assert len(state.rules) == 4 and len(state.routes) == 8
    tags = {(t.family, t.tunnel, t.dscp, t.mark, t.path) for t in state.firewall.tunnel_tags}
    assert tags == {(f, tun, v, v, name) for f in (4, 6)
                    for tun, v, name in (("tun0", 42, "server-a"), ("wg0", 43, "server-b"))}
    assert {a.tunnel for a in state.firewall.admissions} == {"tun0", "wg0"}
    sysctls = {s.key: s.value for s in state.sysctls}
    assert sysctls["net.ipv4.conf.tun0.rp_filter"] == sysctls["net.ipv4.conf.wg0.rp_filter"] == "2"
    assert named_interfaces(config) == ["tun0", "wg0", "eth0"]


def test_one_tunnel_down_leaves_the_other_path_and_its_own_fallback() -> None:
    config = load_config(str(VPN_CLIENT))
    state = desired_state(config, links("tun0", "eth0"))  # wg0 is gone
    table43 = {r for r in state.routes if r.table == 43}
    assert table43 == {Route(f, 43, "default", kind="unreachable", metric=UNREACHABLE_METRIC) for f in (4, 6)}
    assert Route(4, 42, "default", dev="tun0") in state.routes
    assert PolicyRule(4, 1043, 43, 43, 0xFF) in state.rules, "the rule stays: replies meet the fallback"
    assert "net.ipv4.conf.wg0.rp_filter" not in {s.key for s in state.sysctls}
    # the firewall does not depend on the tunnel being there (names, not indexes)
    assert state.firewall == desired_state(config, links("tun0", "wg0", "eth0")).firewall


@pytest.mark.parametrize("backend", ["iptables-legacy", "nftables"])
def test_vpn_client_plan_tags_each_tunnel_with_its_dscp(backend: str) -> None:
    config = load_config(str(VPN_CLIENT))
    out = plan_lines(desired_state(config, assumed_facts(config)), backend)
    expected = {
        "iptables-legacy": ["-A TAGROUTED-PREROUTING -i tun0 -j DSCP --set-dscp 0x2a",
                            "-A TAGROUTED-PREROUTING -i wg0 -j DSCP --set-dscp 0x2b",
                            "-A TAGROUTED-PREROUTING -i eth0 -m dscp --dscp 0x2b -j MARK --set-xmark 0x2b/0xff",
                            "-A TAGROUTED-POSTROUTING -o wg0 -j DSCP --set-dscp 0x00",
                            "-A TAGROUTED-FORWARD -d 192.168.100.3/32 -i wg0 -o eth0 -p tcp -m tcp --dport 443 -j ACCEPT",
                            "-A TAGROUTED-FORWARD -i wg0 -o eth0 -j DROP"],
        "nftables": ['iifname "wg0" ip dscp set 43 counter name "path_server-b_requests"',
                     'iifname "eth0" ip6 dscp 43 meta mark set meta mark and 0xffffff00 or 0x2b '
                     'counter name "path_server-b_replies"',
                     'oifname "wg0" ip dscp set 0',
                     'iifname "wg0" oifname "eth0" ip saddr . ip daddr . meta l4proto . th dport @admit4 counter accept',
                     'iifname "wg0" oifname "eth0" counter drop'],
    }[backend]
    for line in expected:
        assert any(line in x for x in out), line
    assert "ip -4 rule add fwmark 0x2b/0xff lookup 43 pref 1043" in out
    # default-deny after every accept of both tunnels
    v4 = out[:out.index("# ip6tables-legacy-save")] if backend == "iptables-legacy" else []
    forward = [x for x in v4 if x.startswith("-A TAGROUTED-FORWARD")]
    if forward:
        assert [x.endswith("-j DROP") for x in forward] == [False] * (len(forward) - 2) + [True, True]


@pytest.mark.parametrize("backend", ["iptables-legacy", "nftables"])
def test_service_host_remembers_each_connections_path(backend: str) -> None:
    config = load_config(str(WEB))
    state = desired_state(config, assumed_facts(config))
    assert Route(4, 43, "default", gateway="192.168.100.2") in state.routes
    assert Route(6, 42, "default", gateway="fd00:100::2") in state.routes
    out = plan_lines(state, backend)
    expected = {
        "iptables-legacy": ["-A TAGROUTED-INPUT -m dscp --dscp 0x2b -j CONNMARK --set-xmark 0x2b/0xff",
                            "-A TAGROUTED-OUTPUT -m connmark --mark 0x2b/0xff -j CONNMARK --restore-mark "
                            "--nfmask 0xff --ctmask 0xff",
                            "-A TAGROUTED-OUTPUT -m mark --mark 0x2b/0xff -j DSCP --set-dscp 0x2b"],
        "nftables": ["ip dscp 43 ct mark set ct mark and 0xffffff00 or 0x2b",
                     "ct mark and 0xff == 0x2b meta mark set meta mark and 0xffffff00 or 0x2b",
                     "meta mark and 0xff == 0x2b ip6 dscp set 43"],
    }[backend]
    for line in expected:
        assert any(line in x for x in out), line


def test_a_path_with_its_own_vpn_client() -> None:
    config = parse_config(web(WA, WB[:-1] + ", via: [192.168.100.5, \"fd00:100::5\"]}", VIA), "t.yaml")
    routes = desired_state(config, assumed_facts(config)).routes
    assert Route(4, 42, "default", gateway="192.168.100.2") in routes
    assert Route(4, 43, "default", gateway="192.168.100.5") in routes
    assert Route(6, 43, "default", gateway="fd00:100::5") in routes


def test_home_router_with_paths_sends_each_reply_into_its_tunnel_and_counts_requests_once() -> None:
    config = parse_config(web(A, B, "vpn_client: {lan_interface: eth0}\n" + SERVICES.replace(".3", ".2")
                              .replace("::3", "::2"), roles="[vpn-client, service]"), "t.yaml")
    state = desired_state(config, assumed_facts(config))
    assert {r for r in state.routes if r.kind == "unicast"} == {
        Route(f, t, "default", dev=d) for f in (4, 6) for t, d in ((42, "tun0"), (43, "wg0"))}
    assert all(not r.stamp_dscp for r in state.firewall.reply_tags), "into the tunnel: no DSCP stamp"
    table = nft_table(state.firewall)
    rules = {c.name: [r.text for r in c.rules] for c in table.chains}
    requests = path_counter_name("a", "requests")
    assert sum(requests in t for t in rules["prerouting"]) == 2
    assert not any(requests in t for t in rules["input"]), "a request is counted where it leaves the tunnel"
    assert sum(path_counter_name("a", "replies") in t for t in rules["output"]) == 1
    counted = path_counted_rules(state.firewall)
    assert {c for _, _, c, _ in counted["a"]["requests"]} == {"TAGROUTED-PREROUTING"}
    assert {c for _, _, c, _ in counted["a"]["replies"]} == {"TAGROUTED-PREROUTING", "TAGROUTED-OUTPUT"}


def test_every_path_is_counted_on_both_backends_also_the_single_one() -> None:
    single = load_config(str(EXAMPLES / "vpn-client.yaml"))
    firewall = desired_state(single, assumed_facts(single)).firewall
    assert set(nft_table(firewall).counters) >= {"path_default_requests", "path_default_replies"}
    assert set(path_counted_rules(firewall)) == {"default"}
    multi = load_config(str(WEB))
    firewall = desired_state(multi, assumed_facts(multi)).firewall
    assert set(path_counted_rules(firewall)) == {"server-a", "server-b"}
    for kinds in path_counted_rules(firewall).values():
        assert all(len(rules) == 2 for rules in kinds.values()), "one rule per family each"
        for rules in kinds.values():
            for family, table, chain, rule in rules:
                chains = {(c.family, c.table, c.name): c.rules for c in legacy_chains(firewall)}
                assert rule in chains[(family, table, chain)], "a counted rule is one we write"


def test_plan_names_each_path() -> None:
    assert path_lines(load_config(str(VPN_CLIENT))) == [
        "# path server-a: dscp 42, fwmark 0x2a -> table 42 (rule pref 1042); replies into tun0",
        "# path server-b: dscp 43, fwmark 0x2b -> table 43 (rule pref 1043); replies into wg0"]
    assert path_lines(load_config(str(WEB)))[1].endswith("replies via 192.168.100.2, fd00:100::2")
    assert path_lines(load_config(str(EXAMPLES / "vpn-client.yaml"))) == [], "single-path plans unchanged"
