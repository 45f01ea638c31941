"""Per-service policy (issue 13) in the pure core: the config keys and their refusals (FILE:LINE,
both YAML parsers), the intent they compile to, both renderers' rules as `plan` prints them, and
the nft diff treating meters (sets the kernel fills) by their declaration only."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from test_config import parser, problems_of, where  # noqa: F401 - `parser` runs each test with both parsers

from tagrouted.core.config import parse_config
from tagrouted.core.desired import assumed_facts, desired_state
from tagrouted.core.iptables_rules import policy_rules
from tagrouted.core.nft_diff import KernelNft, KernelSet, drift_lines, nft_transaction
from tagrouted.core.nft_rules import nft_table
from tagrouted.core.plan import plan_lines
from tagrouted.core.state import MssClamp, RateLimit

TAIL = (
    "gateway:\n"
    "  public_interface: eth0\n"
    "  public_addresses: [192.0.2.200, \"2001:db8:a::200\"]\n"
    "  home_networks: [192.168.100.0/24, \"fd00:100::/64\"]\n"
    "  via: [192.168.200.2, \"fd00:200::2\"]\n"
)


def gw(*services: str, forwards: str = "") -> str:
    """A gateway config whose services start at line 3, one per line."""
    body = "".join(f"  - {s}\n" for s in services)
    fwd = f"  forwards:\n    - {forwards}\n" if forwards else ""
    return f"roles: [gateway]\nservices:\n{body}{TAIL}{fwd}"


def svc(extra: str, name: str = "web", port: int = 443, address: str = "192.168.100.3") -> str:
    return f"{{name: {name}, proto: tcp, port: {port}, address: {address}, {extra}}}"


def vc(extra: str) -> str:
    return ("roles: [vpn-client]\nservices:\n  - {name: web, proto: tcp, port: 443, address: 192.168.100.3}\n"
            f"vpn_client: {{tunnel_interface: tun0, lan_interface: eth0, {extra}}}\n")


def test_the_keys_parse_and_normalise() -> None:
    c = parse_config(gw(svc('allow_from: [198.51.100.0/24, 203.0.113.7, "198.51.100.128/25"], '
                            'rate_limit: "10/s", burst: 25'),
                        svc('allow_from: ["2001:db8:c::/48"], rate_limit: 30/min', "web6", 443, '"fd00:100::3"'),
                        forwards='{name: openvpn, proto: udp, port: 1194, address: 192.168.200.2, '
                                 'allow_from: [203.0.113.0/24], rate_limit: 5/s}'), "t.yaml")
    web, web6 = c.services
    assert web.allow_from == (ip_network("198.51.100.0/24"), ip_network("203.0.113.7/32"),
                              ip_network("198.51.100.128/25"))
    assert web.rate_limit == RateLimit(10, "second", 25)
    assert web6.rate_limit == RateLimit(30, "minute", 30)  # burst defaults to N
    assert c.gateway is not None and c.gateway.forwards[0].rate_limit == RateLimit(5, "second", 5)
    fw = desired_state(c, assumed_facts(c)).firewall
    exposed = {e.name: e for g in fw.gateways for e in g.exposed}
    # overlapping prefixes merged: an interval set refuses overlaps
    assert exposed["web"].allow_from == ("198.51.100.0/24", "203.0.113.7/32")
    assert exposed["web6"].sources == ("2001:db8:c::/48",)
    assert exposed["openvpn"].restricted and not exposed["openvpn"].tagged


@pytest.mark.parametrize(("value", "mss"), [("pmtu", None), ("1300", 1300), ("off", "off"), ('"off"', "off")])
def test_mss_clamp_forms(value: str, mss: int | str | None) -> None:
    c = parse_config(vc(f"mss_clamp: {value}"), "t.yaml")
    clamps = desired_state(c, assumed_facts(c)).firewall.mss_clamps
    assert clamps == (() if mss == "off" else (MssClamp(4, "tun0", mss),))  # type: ignore[arg-type]


def test_mss_clamp_defaults_to_pmtu_on_both_tunnel_roles() -> None:
    c = parse_config("roles: [vpn-server]\nvpn_server: {tunnel_interface: wg0, uplink_interface: eth0}\n", "t")
    assert desired_state(c, assumed_facts(c)).firewall.mss_clamps == (MssClamp(4, "wg0"), MssClamp(6, "wg0"))


def test_the_vpn_client_enforces_allow_from_but_not_rate_limit() -> None:
    c = parse_config(vc("rp_filter: loose").replace(
        "address: 192.168.100.3}", "address: 192.168.100.3, allow_from: [198.51.100.0/24], rate_limit: 1/s}"), "t")
    (admission,) = desired_state(c, assumed_facts(c)).firewall.admissions
    assert admission.exposed[0].allow_from == ("198.51.100.0/24",)
    assert admission.exposed[0].rate_limit is None


REFUSED = [
    ("bad-prefix", gw(svc("allow_from: [198.51.100.0/33]")), [(3, "services[0].allow_from[0]", "not an IPv4")]),
    ("host-bits", gw(svc("allow_from: [198.51.100.1/24]")), [(3, "services[0].allow_from[0]", "host bits set")]),
    ("other-family", gw(svc('allow_from: ["2001:db8::/32"]')),
     [(3, "services[0].allow_from[0]", "IPv6 prefix, but the service's address 192.168.100.3 is IPv4")]),
    ("twice", gw(svc("allow_from: [198.51.100.0/24, 198.51.100.0/24]")),
     [(3, "services[0].allow_from[1]", "listed twice")]),
    ("empty", gw(svc("allow_from: []")), [(3, "services[0].allow_from", "at least one")]),
    ("not-a-list", gw(svc("allow_from: 198.51.100.0/24")), [(3, "services[0].allow_from", "expected a list")]),
    ("mapped", gw(svc('allow_from: ["::ffff:198.51.100.0/120"]', "w6", 443, '"fd00:100::3"')),
     [(3, "services[0].allow_from[0]", "IPv4-mapped")]),
    ("forward-family", gw(svc("rate_limit: 1/s"), forwards="{name: vpn, proto: udp, port: 1194, "
                                                           "address: 192.168.200.2, allow_from: [\"2001:db8::/32\"]}"),
     [(10, "gateway.forwards[0].allow_from[0]", "would never match")]),
    ("rate-zero", gw(svc("rate_limit: 0/s")), [(3, "services[0].rate_limit", "0 would admit nobody")]),
    ("rate-unit", gw(svc("rate_limit: 10/hour")), [(3, "services[0].rate_limit", "write N/s or N/min")]),
    ("rate-number", gw(svc("rate_limit: 10")), [(3, "services[0].rate_limit", "expected a rate")]),
    ("rate-huge", gw(svc("rate_limit: 100000/s")), [(3, "services[0].rate_limit", "out of range 1..10000")]),
    ("burst-alone", gw(svc("burst: 5")), [(3, "services[0].burst", "only with rate_limit")]),
    ("burst-zero", gw(svc("rate_limit: 5/s, burst: 0")), [(3, "services[0].burst", "out of range 1..10000")]),
    ("mss-low", vc("mss_clamp: 100"), [(4, "vpn_client.mss_clamp", "out of range 536..65495")]),
    ("mss-high", vc("mss_clamp: 65496"), [(4, "vpn_client.mss_clamp", "out of range 536..65495")]),
    ("mss-word", vc("mss_clamp: auto"), [(4, "vpn_client.mss_clamp", "expected pmtu, off or an MSS")]),
    ("mss-server", "roles: [vpn-server]\nvpn_server: {tunnel_interface: tun0, uplink_interface: eth0,\n"
                   "  mss_clamp: yes}\n", [(3, "vpn_server.mss_clamp", "expected pmtu, off or an MSS")]),
    ("shared-home", gw(svc("allow_from: [198.51.100.0/24]"), "{name: alt, proto: tcp, port: 8443, to_port: 443, "
                                                               "address: 192.168.100.3}"),
     [(4, "services[1].name", "both reach 192.168.100.3 tcp port 443")]),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_refused(text: str, expected: list[tuple[int, str, str]]) -> None:
    problems = problems_of(text)
    assert where(problems) == [(line, path) for line, path, _ in expected], "\n".join(map(str, problems))
    for problem, (_, _, words) in zip(problems, expected, strict=True):
        assert words in problem.message, str(problem)
        assert str(problem).startswith(f"t.yaml:{problem.line}: {problem.path}: ")


def test_shared_home_with_the_same_policy_is_fine() -> None:
    parse_config(gw(svc("allow_from: [198.51.100.0/24]"),
                    "{name: alt, proto: tcp, port: 8443, to_port: 443, address: 192.168.100.3, "
                    "allow_from: [198.51.100.0/24]}"), "t.yaml")


POLICY = gw(svc("allow_from: [198.51.100.0/24], rate_limit: 1/min, burst: 10"),
            svc("rate_limit: 1/min, burst: 10", "api", 8080),
            "{name: echo, proto: udp, port: 7000, address: 192.168.100.3}")


def plan(text: str, backend: str) -> list[str]:
    c = parse_config(text, "t.yaml")
    return plan_lines(desired_state(c, assumed_facts(c)), backend)


def test_plan_shows_the_nft_rules() -> None:
    out = plan(POLICY, "nftables")
    text = "\n".join(out)
    assert "      198.51.100.0/24 . 192.168.100.3 . tcp . 443 comment \"web " in text
    assert "      0.0.0.0/0 . 192.168.100.3 . udp . 7000 comment \"echo " in text
    # one rule per distinct limit, whatever the number of services it holds
    limit = [x for x in out if "limit rate over" in x]
    assert len(limit) == 1 and limit[0].strip().startswith(
        'ct state new iifname "eth0" ip saddr . ip daddr . meta l4proto . th dport @limit_1_minute_10_4 '
        "update @meter_1_minute_10_4 { ip saddr . ip daddr . meta l4proto . th dport limit rate over "
        "1/minute burst 10 packets } counter name ip daddr . meta l4proto . th dport map @svc_limited4 drop")
    assert "set meter_1_minute_10_4 { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags dynamic, " \
           "timeout; timeout 600s; size 65536;" in text
    assert '192.168.100.3 . tcp . 443 comment "web ' in text and ': "dropped_web",' in text
    assert ': "limited_api",' in text and "dropped_api" not in text
    forward = out[out.index("  chain forward {"):]
    order = [next(i for i, x in enumerate(forward) if needle in x) for needle in
             ("ct state established,related", "limit rate over", "@gw_allow4 counter accept",
              "map @svc_dropped4 drop", "@gw_home4 counter drop")]
    assert order == sorted(order), "established, limits, accepts, counted drops, drops"


def test_plan_shows_the_iptables_rules() -> None:
    out = plan(POLICY, "iptables-legacy")
    fwd = [x for x in out if x.startswith("-A TAGROUTED-FORWARD")]
    assert fwd[1:5] == [
        "-A TAGROUTED-FORWARD -s 198.51.100.0/24 -d 192.168.100.3/32 -i eth0 -p tcp -m tcp --dport 443 "
        "-m conntrack --ctstate NEW -m hashlimit --hashlimit-above 1/min --hashlimit-burst 10 --hashlimit-mode "
        f"srcip --hashlimit-name {fwd[1].split('--hashlimit-name ')[1].split()[0]} --hashlimit-htable-expire 600000 "
        "-j DROP",
        "-A TAGROUTED-FORWARD -s 198.51.100.0/24 -d 192.168.100.3/32 -i eth0 -p tcp -m tcp --dport 443 -j ACCEPT",
        "-A TAGROUTED-FORWARD -d 192.168.100.3/32 -i eth0 -p tcp -m tcp --dport 443 -j DROP",
        fwd[4],
    ]
    assert "--hashlimit-name tr-" in fwd[4] and "-s " not in fwd[4]
    names = {x.split("--hashlimit-name ")[1].split()[0] for x in fwd if "hashlimit" in x}
    assert len(names) == 2 and all(len(n) <= 15 for n in names)  # the kernel's name limit


@pytest.mark.parametrize("backend", ["nftables", "iptables-legacy"])
def test_plan_shows_the_mss_clamp(backend: str) -> None:
    out = "\n".join(plan("roles: [vpn-server]\nvpn_server: {tunnel_interface: tun0, uplink_interface: eth0, "
                         "families: [6], mss_clamp: 1220}\n", backend))
    if backend == "nftables":
        assert "chain mss {\n    type filter hook forward priority -140; policy accept;\n" \
               '    meta nfproto ipv6 oifname "tun0" tcp flags & (syn | rst) == syn tcp option maxseg size set 1220' \
               in out
        assert 'meta nfproto ipv6 iifname "tun0" tcp flags & (syn | rst) == syn' in out
    else:
        assert "# ip6tables-legacy-save\n*mangle\n:TAGROUTED-FORWARD - [0:0]" in out
        assert "-A TAGROUTED-FORWARD -o tun0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1220" in out
        assert "-A TAGROUTED-FORWARD -i tun0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1220" in out


def test_policy_counters_name_their_rules() -> None:
    c = parse_config(POLICY, "t.yaml")
    rules = policy_rules(desired_state(c, assumed_facts(c)).firewall)
    assert set(rules) == {"web", "api"} and set(rules["web"]) == {"dropped", "limited"}
    assert set(rules["api"]) == {"limited"}
    assert rules["web"]["dropped"][0][3].target == "DROP"


def _kernel_of(table: object, **meter: object) -> KernelNft:
    """The kernel holding exactly `table` (as the backend reads it back), meters as given."""
    from tagrouted.core.nft_diff import KernelChain
    from tagrouted.core.nft_rules import NftTable

    assert isinstance(table, NftTable)
    sets = {s.name: KernelSet(s.kind, s.key, s.value, tuple(f for f in s.flags if f != "dynamic"),
                              tuple(e.comment for e in s.elements), s.timeout, s.size) for s in table.sets}
    for name, comments in meter.items():
        sets[name] = KernelSet(**{**sets[name].__dict__, "comments": comments})  # type: ignore[arg-type]
    chains = {c.name: KernelChain(c.type, c.hook, c.priority, c.policy, tuple(r.comment for r in c.rules))
              for c in table.chains}
    return KernelNft(True, frozenset(table.counters), sets, chains)


def test_a_meter_is_compared_by_its_declaration_only() -> None:
    c = parse_config(POLICY, "t.yaml")
    table = nft_table(desired_state(c, assumed_facts(c)).firewall)
    meter = next(s for s in table.sets if s.dynamic)
    kernel = _kernel_of(table, **{meter.name: (None, None, None)})  # three buckets, no comments
    assert nft_transaction(table, kernel).script.lines == []
    assert drift_lines(table, kernel) == []
    # another timeout (someone re-made it): replaced, and the chains refilled around it
    changed = KernelSet(**{**kernel.sets[meter.name].__dict__, "timeout": 60})  # type: ignore[arg-type]
    tx = nft_transaction(table, KernelNft(True, kernel.counters, {**kernel.sets, meter.name: changed},
                                          kernel.chains))
    assert f"delete set inet tagrouted {meter.name}" in tx.script.lines
    assert any(x.startswith(f"add set inet tagrouted {meter.name} ") for x in tx.script.lines)
