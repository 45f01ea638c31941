"""The compiler and the plan, table-driven: config in, the whole plan out (no root, no kernel)."""

from __future__ import annotations

import random
import subprocess
import sys
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
    VpnServerSection,
    load_config,
)
from tagrouted.core.desired import assumed_facts, desired_state, empty_state, forwarded_families
from tagrouted.core.iptables_rules import legacy_chains
from tagrouted.core.plan import plan_lines, sysctl_cli_key, sysctl_line
from tagrouted.core.state import UNREACHABLE_METRIC, HostFacts, LinkFacts, PolicyRule, Route, Sysctl

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "etc" / "tagrouted" / "examples"

WEB = Service("web", "tcp", PortRange(443, 443), ip_address("192.168.100.3"))
WEB6 = Service("web6", "tcp", PortRange(443, 443), ip_address("fd00:100::3"))
GAMES = Service("games", "udp", PortRange(27015, 27020), ip_address("192.168.100.4"))
ALT = Service("alt", "tcp", PortRange(8443, 8443), ip_address("192.168.100.3"), to_port=443)
OPENVPN = Service("openvpn", "udp", PortRange(1194, 1194), ip_address("192.168.200.2"))

GATEWAY = GatewaySection(
    public_interface="eth0",
    public_addresses=(ip_address("192.0.2.200"), ip_address("2001:db8:a::200")),
    home_networks=(ip_network("192.168.100.0/24"), ip_network("fd00:100::/64")),
    via=(ip_address("192.168.200.2"), ip_address("fd00:200::2")),
    forwards=(OPENVPN,),
)
VPN_CLIENT = VpnClientSection("tun0", "eth0", "off")


def cfg(*roles: str, **kw: object) -> Config:
    return Config(path="test.yaml", roles=roles, **kw)  # type: ignore[arg-type]


def facts(*names: str, rp_filter_all: int = 0, accept_ra: int | None = None) -> HostFacts:
    return HostFacts(
        links=tuple(LinkFacts(n, i + 1, accept_ra=accept_ra) for i, n in enumerate(names)),
        rp_filter_all=rp_filter_all,
    )


def lines(config: Config, host: HostFacts | None = None) -> list[str]:
    """The plan with the iptables-legacy rendering (tests/unit/test_nft_rules.py has nft's)."""
    return plan_lines(desired_state(config, host or assumed_facts(config)), "iptables-legacy")


# ---- the seed's rules, per host --------------------------------------------------------------
def test_vpn_client_has_the_seed_rules() -> None:
    out = lines(cfg("vpn-client", services=(WEB, WEB6), vpn_client=VPN_CLIENT))
    for expected in [
        "ip -4 rule add fwmark 0x2a/0xff lookup 42 pref 1042",
        "ip -6 rule add fwmark 0x2a/0xff lookup 42 pref 1042",
        "ip -4 route add default dev tun0 table 42 proto 142",
        f"ip -4 route add unreachable default table 42 proto 142 metric {UNREACHABLE_METRIC}",
        f"ip -6 route add unreachable default table 42 proto 142 metric {UNREACHABLE_METRIC}",
        "sysctl -w net.ipv4.conf.tun0.rp_filter=0",
        "sysctl -w net.ipv4.ip_forward=1",
        "sysctl -w net.ipv6.conf.all.forwarding=1",
        "-A PREROUTING -m comment --comment tagrouted -j TAGROUTED-PREROUTING",
        "-A TAGROUTED-PREROUTING -i tun0 -j DSCP --set-dscp 0x2a",
        "-A TAGROUTED-PREROUTING -i eth0 -m dscp --dscp 0x2a -j MARK --set-xmark 0x2a/0xff",
        "-A TAGROUTED-POSTROUTING -o tun0 -j DSCP --set-dscp 0x00",
        "-A TAGROUTED-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A TAGROUTED-FORWARD -d 192.168.100.3/32 -i tun0 -o eth0 -p tcp -m tcp --dport 443 -j ACCEPT",
        "-A TAGROUTED-FORWARD -d fd00:100::3/128 -i tun0 -o eth0 -p tcp -m tcp --dport 443 -j ACCEPT",
        "-A TAGROUTED-FORWARD -i tun0 -o eth0 -j DROP",
    ]:
        assert expected in out, expected
    # default-deny comes after every accept
    v4_forward = [x for x in out if x.startswith("-A TAGROUTED-FORWARD") and "fd00" not in x]
    assert v4_forward[-1].endswith("-j DROP")


def test_web_service_has_the_seed_rules() -> None:
    via = ServiceSection(via=(ip_address("192.168.100.2"), ip_address("fd00:100::2")))
    out = lines(cfg("service", service=via))
    for expected in [
        "ip -4 rule add fwmark 0x2a/0xff lookup 42 pref 1042",
        "ip -4 route add default via 192.168.100.2 table 42 proto 142",
        "ip -6 route add default via fd00:100::2 table 42 proto 142",
        "-A TAGROUTED-INPUT -m dscp --dscp 0x2a -j CONNMARK --set-xmark 0x2a/0xff",
        "-A TAGROUTED-OUTPUT -m connmark --mark 0x2a/0xff -j CONNMARK --restore-mark "
        "--nfmask 0xff --ctmask 0xff",
        "-A TAGROUTED-OUTPUT -m mark --mark 0x2a/0xff -j DSCP --set-dscp 0x2a",
    ]:
        assert expected in out, expected
    # restore-mark precedes the DSCP stamp that reads the mark
    restore = out.index(next(x for x in out if "--restore-mark" in x and "ip6" not in x))
    stamp = out.index("-A TAGROUTED-OUTPUT -m mark --mark 0x2a/0xff -j DSCP --set-dscp 0x2a")
    assert restore < stamp
    assert not any("sysctl" in x for x in out), "a service host needs no forwarding"


def test_gateway_dnat_forward_and_home_route() -> None:
    out = lines(cfg("gateway", services=(WEB, WEB6, GAMES, ALT), gateway=GATEWAY))
    for expected in [
        "-A TAGROUTED-PREROUTING -d 192.0.2.200/32 -i eth0 -p tcp -m tcp --dport 443 "
        "-j DNAT --to-destination 192.168.100.3",
        "-A TAGROUTED-PREROUTING -d 192.0.2.200/32 -i eth0 -p udp -m udp --dport 27015:27020 "
        "-j DNAT --to-destination 192.168.100.4",
        "-A TAGROUTED-PREROUTING -d 192.0.2.200/32 -i eth0 -p tcp -m tcp --dport 8443 "
        "-j DNAT --to-destination 192.168.100.3:443",
        "-A TAGROUTED-PREROUTING -d 2001:db8:a::200/128 -i eth0 -p tcp -m tcp --dport 443 "
        "-j DNAT --to-destination fd00:100::3",
        "-A TAGROUTED-PREROUTING -d 192.0.2.200/32 -i eth0 -p udp -m udp --dport 1194 "
        "-j DNAT --to-destination 192.168.200.2",
        "-A TAGROUTED-FORWARD -d 192.168.100.3/32 -i eth0 -p tcp -m tcp --dport 443 -j ACCEPT",
        "-A TAGROUTED-FORWARD -d 192.168.200.2/32 -i eth0 -p udp -m udp --dport 1194 -j ACCEPT",
        "-A TAGROUTED-FORWARD -d 192.168.100.0/24 -i eth0 -j DROP",
        "-A TAGROUTED-FORWARD -d 192.168.200.2/32 -i eth0 -j DROP",
        "-A TAGROUTED-FORWARD -d fd00:100::/64 -i eth0 -j DROP",
        "ip -4 route add 192.168.100.0/24 via 192.168.200.2 proto 142 metric 1042",
        "ip -6 route add fd00:100::/64 via fd00:200::2 proto 142 metric 1042",
        "sysctl -w net.ipv4.ip_forward=1",
    ]:
        assert expected in out, expected
    # the accept for the DNATed alt service uses the port it has after DNAT
    assert "-A TAGROUTED-FORWARD -d 192.168.100.3/32 -i eth0 -p tcp -m tcp --dport 443 -j ACCEPT" in out
    assert not any("--dport 8443 -j ACCEPT" in x for x in out)
    assert not any(" rule add " in x for x in out), "the gateway routes nothing by tag"


def test_gateway_udp_endpoints_are_marked_for_conntrack_flush() -> None:
    state = desired_state(cfg("gateway", services=(WEB, GAMES), gateway=GATEWAY), facts("eth0"))
    assert {(e.address, e.first_port, e.last_port) for e in state.udp_endpoints} == {
        ("192.0.2.200", 27015, 27020), ("192.0.2.200", 1194, 1194)}


def test_vpn_server_forwards_between_tunnel_and_uplink_both_families() -> None:
    out = lines(cfg("vpn-server", vpn_server=VpnServerSection("tun0", "eth0")))
    assert out.count("-A TAGROUTED-FORWARD -i tun0 -o eth0 -j ACCEPT") == 2
    assert out.count("-A TAGROUTED-FORWARD -i eth0 -o tun0 -j ACCEPT") == 2
    assert "sysctl -w net.ipv4.ip_forward=1" in out
    assert "sysctl -w net.ipv6.conf.all.forwarding=1" in out


def test_vpn_server_families_narrow_forwarding() -> None:
    out = lines(cfg("vpn-server", vpn_server=VpnServerSection("tun0", "eth0", families=(4,))))
    assert "sysctl -w net.ipv6.conf.all.forwarding=1" not in out
    assert "# ip6tables-legacy-save" not in out


# ---- combined roles ---------------------------------------------------------------------------
def test_vps_routes_home_via_the_tunnel_and_keeps_default_deny() -> None:
    gw = replace(GATEWAY, via=(), forwards=())
    config = cfg("gateway", "vpn-server", services=(WEB, WEB6), gateway=gw,
                 vpn_server=VpnServerSection("tun0", "eth0"))
    out = lines(config)
    assert "ip -4 route add 192.168.100.0/24 dev tun0 proto 142 metric 1042" in out
    assert "ip -6 route add fd00:100::/64 dev tun0 proto 142 metric 1042" in out
    # the uplink is the public interface: no blanket accept toward the tunnel, a deny instead
    assert "-A TAGROUTED-FORWARD -i eth0 -o tun0 -j ACCEPT" not in out
    assert "-A TAGROUTED-FORWARD -i eth0 -o tun0 -j DROP" in out
    fwd = [x for x in out if x.startswith("-A TAGROUTED-FORWARD")]
    assert fwd.index("-A TAGROUTED-FORWARD -d 192.168.100.3/32 -i eth0 -p tcp -m tcp --dport 443 -j ACCEPT") < \
        fwd.index("-A TAGROUTED-FORWARD -i eth0 -o tun0 -j DROP")
    for chain in legacy_chains(desired_state(config, assumed_facts(config)).firewall):
        assert len(chain.rules) == len(set(chain.rules)), f"duplicate rule in {chain}"
    # tunnel down: no dev route to a missing link
    state = desired_state(config, facts("eth0"))
    assert not any(r.dev == "tun0" for r in state.routes)


def test_home_router_is_one_non_duplicated_state() -> None:
    svc = replace(WEB, address=ip_address("192.168.100.2"))
    config = cfg("vpn-client", "service", services=(svc,), vpn_client=VPN_CLIENT,
                 service=ServiceSection(tunnel_interface="tun0"))
    state = desired_state(config, facts("tun0", "eth0"))
    assert state.rules == frozenset({PolicyRule(4, 1042, 42, 42, 0xFF)})
    assert Route(4, 42, "default", dev="tun0") in state.routes
    assert len([r for r in state.routes if r.kind == "unicast"]) == 1
    for chain in legacy_chains(state.firewall):
        assert len(chain.rules) == len(set(chain.rules)), f"duplicate rule in {chain}"
    out = plan_lines(state, "iptables-legacy")
    # replies go straight into the tunnel: no DSCP stamp on output that POSTROUTING would clear
    assert not any("TAGROUTED-OUTPUT -m mark" in x for x in out)
    assert "-A TAGROUTED-INPUT -m dscp --dscp 0x2a -j CONNMARK --set-xmark 0x2a/0xff" in out


# ---- facts: tunnel presence, rp_filter, accept_ra ---------------------------------------------
def test_tunnel_down_keeps_only_the_unreachable_fallback() -> None:
    config = cfg("vpn-client", services=(WEB,), vpn_client=VPN_CLIENT)
    state = desired_state(config, facts("eth0"))
    assert state.routes == frozenset(
        {Route(4, 42, "default", kind="unreachable", metric=UNREACHABLE_METRIC)})
    assert not any("tun0" in s.key for s in state.sysctls)
    down = HostFacts(links=(LinkFacts("eth0", 1), LinkFacts("tun0", 2, up=False)))
    assert not any(r.dev == "tun0" for r in desired_state(config, down).routes), \
        "the kernel refuses a route on a down link"
    assert state.firewall == desired_state(config, facts("eth0", "tun0")).firewall, \
        "firewall rules name interfaces, not indexes: the tunnel's presence never changes them"


@pytest.mark.parametrize(("mode", "all_value", "want"), [
    ("off", 0, "0"), ("off", 1, "2"), ("off", 2, "2"), ("loose", 0, "2"), ("loose", 1, "2"),
])
def test_rp_filter_is_effective_despite_all(mode: str, all_value: int, want: str) -> None:
    config = cfg("vpn-client", services=(WEB,), vpn_client=replace(VPN_CLIENT, rp_filter=mode))
    state = desired_state(config, facts("eth0", "tun0", rp_filter_all=all_value))
    assert Sysctl("net.ipv4.conf.tun0.rp_filter", want) in state.sysctls
    assert max(all_value, int(want)) in (0, 2)


def test_ipv6_forwarding_keeps_router_advertisements() -> None:
    config = cfg("vpn-server", vpn_server=VpnServerSection("tun0", "eth0"))
    state = desired_state(config, facts("eth0", "tun0", accept_ra=1))
    assert Sysctl("net.ipv6.conf.eth0.accept_ra", "2") in state.sysctls
    state = desired_state(config, facts("eth0", "tun0", accept_ra=0))
    assert not any("accept_ra" in s.key for s in state.sysctls)


def test_accept_ra_2_only_on_the_default_route_and_named_links() -> None:
    """A rogue RA on an unnamed LAN link must not become trusted (issue 16)."""
    config = cfg("vpn-server", vpn_server=VpnServerSection("tun0", "eth0"))
    links = replace(facts("eth0", "tun0", "lan1", "up0", accept_ra=1), ipv6_default_devs=("up0",))
    keys = {s.key for s in desired_state(config, links).sysctls if "accept_ra" in s.key}
    assert keys == {"net.ipv6.conf.eth0.accept_ra", "net.ipv6.conf.tun0.accept_ra",
                    "net.ipv6.conf.up0.accept_ra"}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_ipv6_default_routes_are_read_exactly_when_ipv6_is_forwarded(path: Path) -> None:
    config = load_config(str(path))
    state = desired_state(config, assumed_facts(config))
    forwards6 = any(s.key == "net.ipv6.conf.all.forwarding" for s in state.sysctls)
    assert (6 in forwarded_families(config)) == forwards6


@pytest.mark.parametrize(("key", "cli"), [
    ("net.ipv4.conf.tun0.100.rp_filter", "net.ipv4.conf.tun0/100.rp_filter"),
    ("net.ipv6.conf.eth0.accept_ra", "net.ipv6.conf.eth0.accept_ra"),
    ("net.ipv4.ip_forward", "net.ipv4.ip_forward"),
    ("net.ipv6.conf.all.forwarding", "net.ipv6.conf.all.forwarding"),
])
def test_plan_prints_sysctl_keys_as_sysctl_8_reads_them(key: str, cli: str) -> None:
    assert sysctl_cli_key(key) == cli
    assert sysctl_line(Sysctl(key, "2")) == f"sysctl -w {cli}=2"


def test_custom_tag_is_used_everywhere() -> None:
    tag = Tag(dscp=10, mark=0x100, table=100, priority=2000, mark_mask=0xFFFFFFFF)
    out = lines(cfg("vpn-client", tag=tag, services=(WEB,), vpn_client=VPN_CLIENT))
    assert "ip -4 rule add fwmark 0x100 lookup 100 pref 2000" in out
    assert "-A TAGROUTED-PREROUTING -i tun0 -j DSCP --set-dscp 0x0a" in out
    assert "-A TAGROUTED-PREROUTING -i eth0 -m dscp --dscp 0x0a -j MARK --set-xmark 0x100/0xffffffff" in out


def test_empty_state_owns_nothing() -> None:
    state = empty_state(Tag())
    assert not state.routes and not state.rules and not state.sysctls and state.firewall.empty
    assert plan_lines(state) == plan_lines(state, "iptables-legacy") == []


# ---- determinism ------------------------------------------------------------------------------
def test_plan_is_deterministic_whatever_the_order_of_services_facts() -> None:
    services = [WEB, WEB6, GAMES, ALT]
    base = cfg("gateway", services=tuple(services), gateway=GATEWAY)
    first = lines(base)
    rng = random.Random(7)
    for _ in range(5):
        links = ["eth0", "tun0", "br0"]
        rng.shuffle(links)
        assert lines(base, facts(*links)) == lines(base, facts("eth0", "br0", "tun0"))
    assert lines(base) == first


def test_service_order_is_rule_order() -> None:
    a = lines(cfg("gateway", services=(WEB, GAMES), gateway=GATEWAY))
    b = lines(cfg("gateway", services=(GAMES, WEB), gateway=GATEWAY))
    assert sorted(a) == sorted(b)


# ---- the example files and the CLI --------------------------------------------------------------
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_plans(path: Path) -> None:
    config = load_config(str(path))
    assert plan_lines(desired_state(config, assumed_facts(config)))


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tagrouted.cli", *args],
                          capture_output=True, text=True, timeout=30)


PLAN_SAYS = {  # backend -> (a vpn-client line, a web-service line), each in the backend's syntax
    "iptables-legacy": ("-A TAGROUTED-PREROUTING -i tun0 -j DSCP --set-dscp 0x2a", "-j CONNMARK --restore-mark"),
    "nftables": ('iifname "tun0" ip dscp set 42', "ct mark and 0xff == 0x2a meta mark set meta mark and "
                                                   "0xffffff00 or 0x2a"),
}


@pytest.mark.parametrize("backend", sorted(PLAN_SAYS))
def test_cli_check_and_plan_on_the_seed_hosts(tmp_path: Path, backend: str) -> None:
    for name in [p.name for p in EXAMPLE_FILES]:
        res = _ctl("--config", str(EXAMPLES / name), "check")
        assert res.returncode == 0, res.stderr
    client, web = (tmp_path / "vpn-client.yaml", tmp_path / "web-service.yaml")
    for copy in (client, web):
        copy.write_text((EXAMPLES / copy.name).read_text() + f"firewall: {{backend: {backend}}}\n")
    res = _ctl("--config", str(client), "plan")
    assert res.returncode == 0, res.stderr
    assert f"# firewall backend: {backend} (firewall.backend)" in res.stdout.splitlines()
    assert PLAN_SAYS[backend][0] in res.stdout
    assert "ip -4 rule add fwmark 0x2a/0xff lookup 42 pref 1042" in res.stdout
    res2 = _ctl("--config", str(client), "plan")
    assert res.stdout == res2.stdout
    res = _ctl("--config", str(web), "plan")
    assert PLAN_SAYS[backend][1] in res.stdout


def test_cli_check_rejects_a_bad_file_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("roles: [vpn-client]\nvpn_client: {tunnel_interface: tun0, lan_interface: eth0}\n"
                   "tag: {dscp: 99}\n")
    res = _ctl("--config", str(bad), "check")
    assert res.returncode == 1
    assert res.stderr.startswith(f"{bad}:3: tag.dscp:"), res.stderr
    res = _ctl("--config", str(bad), "plan")
    assert res.returncode == 1 and not res.stdout


def test_cli_fast_paths_do_not_import_the_kernel_libraries() -> None:
    code = ("import sys; from tagrouted import cli; "
            "cli.main(['--config', sys.argv[1], 'plan']); "
            "bad = [m for m in ('pyroute2', 'iptc', 'watchdog', 'systemd') if m in sys.modules]; "
            "sys.stderr.write(repr(bad))")
    path = EXAMPLES / "remote-server.yaml"
    if not path.exists():
        pytest.skip("examples not present")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert res.stderr.strip().endswith("[]"), res.stderr


def test_cli_default_config_path_is_the_config_modules() -> None:
    from tagrouted import cli
    from tagrouted.core import config

    assert cli.DEFAULT_CONFIG_PATH == config.DEFAULT_CONFIG_PATH
