"""The strict config loader: every example parses, every broken file is refused with the exact
line and key path of each of its problems, under both the libyaml and the pure-Python parser."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path

import pytest

from tagrouted.core import config as config_module
from tagrouted.core.config import (
    MAX_FILE_BYTES,
    Config,
    ConfigError,
    ConfigProblem,
    MetricsSection,
    PortRange,
    Service,
    Tag,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "etc" / "tagrouted" / "examples").glob("*.yaml"))
BROKEN_CORPUS = sorted((Path(__file__).parent / "broken").glob("*.yaml"))


@pytest.fixture(params=["libyaml", "python"], autouse=True)
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test runs with both YAML parsers: they must report the same lines and paths."""
    if request.param == "libyaml":
        import yaml

        if not yaml.__with_libyaml__:
            pytest.skip("PyYAML without libyaml")
    monkeypatch.setattr(config_module, "USE_LIBYAML", request.param == "libyaml")
    yield request.param


def problems_of(text: str | bytes, filename: str = "t.yaml") -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename)
    return info.value.problems


def where(problems: list[ConfigProblem]) -> list[tuple[int, str]]:
    return [(p.line, p.path) for p in problems]


# --- valid files --------------------------------------------------------------------------


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"remote-server.yaml", "vpn-server.yaml", "vpn-client.yaml", "web-service.yaml",
            "vps.yaml", "home-router.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(path: Path) -> None:
    config = load_config(str(path))
    assert config.path == str(path)
    assert config.roles


def test_remote_server_example_normalised() -> None:
    path = str(REPO / "etc/tagrouted/examples/remote-server.yaml")
    config = load_config(path)
    assert config.roles == ("gateway",)
    assert config.services[1] == Service("web6", "tcp", PortRange(443, 443), IPv6Address("fd00:100::3"))
    gw = config.gateway
    assert gw is not None
    assert gw.public_interface == "eth0"
    assert gw.public_addresses == (IPv4Address("192.0.2.200"), IPv6Address("2001:db8:a::200"))
    assert gw.home_networks == (ip_network("192.168.100.0/24"), ip_network("fd00:100::/64"))
    assert gw.via == (IPv4Address("192.168.200.2"), IPv6Address("fd00:200::2"))
    assert gw.forwards == (Service("openvpn", "udp", PortRange(1194, 1194), IPv4Address("192.168.200.2")),)


def test_combined_examples() -> None:
    vps = load_config(str(REPO / "etc/tagrouted/examples/vps.yaml"))
    assert vps.roles == ("gateway", "vpn-server") and vps.gateway and vps.gateway.via == ()
    router = load_config(str(REPO / "etc/tagrouted/examples/home-router.yaml"))
    assert router.roles == ("vpn-client", "service")
    assert router.vpn_client and router.vpn_client.rp_filter == "off"  # bare `off`, read as false
    assert router.service and router.service.tunnel_interface == "tun0"


def test_defaults() -> None:
    config = parse_config("roles: [vpn-client]\nvpn_client: {tunnel_interface: tun0, lan_interface: eth0}\n",
                          "min.yaml")
    assert config == Config(
        path="min.yaml", roles=("vpn-client",), tag=Tag(42, 42, 42, 1042), services=(),
        vpn_client=config.vpn_client, on_stop="keep", resync_interval=2.0,
    )
    assert config.vpn_client is not None and config.vpn_client.rp_filter == "loose"
    server = parse_config("roles: [vpn-server]\nvpn_server: {tunnel_interface: tun0, uplink_interface: eth0}\n",
                          "s.yaml")
    assert server.vpn_server is not None and server.vpn_server.families == (4, 6)


def test_normalisation() -> None:
    config = parse_config(
        "roles: [service, vpn-client]\n"
        "tag: {dscp: 11, mark: 0x100, table: 100, priority: 32764}\n"
        "services:\n"
        "  - {name: games, proto: udp, port: \"27015-27020\", address: 192.168.100.4}\n"
        "  - {name: ssh, proto: tcp, port: 2222, to_port: 22, address: \"fd00:100::4\"}\n"
        "  - {name: one, proto: tcp, port: \"8080\", address: 192.168.100.4}\n"
        "vpn_client: {tunnel_interface: tun1, lan_interface: br-lan, rp_filter: \"off\"}\n"
        "service: {tunnel_interface: tun1}\n"
        "on_stop: remove\n"
        "resync_interval: 500ms\n",
        "n.yaml",
    )
    assert config.roles == ("service", "vpn-client")
    # a mark beyond the default mask (0xff) keeps owning the whole mark, as before masks existed
    assert config.tag == Tag(dscp=11, mark=256, table=100, priority=32764, mark_mask=0xFFFFFFFF)
    assert config.services[0].port == PortRange(27015, 27020)
    assert config.services[1].home_port == PortRange(22, 22) and config.services[1].family == 6
    assert config.services[2].port == PortRange(8080, 8080)
    assert config.on_stop == "remove" and config.resync_interval == 0.5


@pytest.mark.parametrize(("value", "seconds"), [
    ("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), ("3", 3.0), ("0.25", 0.25),
])
def test_resync_interval_forms(value: str, seconds: float) -> None:
    config = parse_config(f"roles: [vpn-server]\nvpn_server: {{tunnel_interface: tun0, uplink_interface: eth0}}\n"
                          f"resync_interval: {value}\n", "r.yaml")
    assert config.resync_interval == seconds


def test_families_forms() -> None:
    config = parse_config("roles: [vpn-server]\nvpn_server: {tunnel_interface: tun0, uplink_interface: eth0,"
                          " families: [ipv6, 4]}\n", "f.yaml")
    assert config.vpn_server is not None and config.vpn_server.families == (4, 6)
    config = parse_config("roles: [vpn-server]\nvpn_server: {tunnel_interface: tun0, uplink_interface: eth0,"
                          " families: [6]}\n", "f.yaml")
    assert config.vpn_server is not None and config.vpn_server.families == (6,)


def test_anchors_and_merge_keys() -> None:
    config = parse_config(
        "roles: [gateway]\n"
        "services:\n"
        "  - &web {name: web, proto: tcp, port: 443, address: 192.168.100.3}\n"
        "  - {<<: *web, name: alt, port: 8443}\n"
        "gateway:\n"
        "  public_interface: eth0\n"
        "  public_addresses: [192.0.2.200]\n"
        "  home_networks: [&home 192.168.100.0/24]\n"
        "  via: [192.168.200.2]\n",
        "a.yaml",
    )
    assert [(s.name, s.port.first, str(s.address)) for s in config.services] == [
        ("web", 443, "192.168.100.3"), ("alt", 8443, "192.168.100.3")]


def test_empty_optional_lists() -> None:
    config = parse_config("roles: [gateway]\nservices:\ntag:\ngateway:\n  public_interface: eth0\n"
                          "  public_addresses: [192.0.2.200]\n  home_networks: [192.168.100.0/24]\n"
                          "  via: [192.168.200.2]\n  forwards:\n", "e.yaml")
    assert config.services == () and config.tag == Tag()
    assert config.gateway is not None and config.gateway.forwards == ()


@pytest.mark.parametrize(("value", "section", "shown"), [
    ('"127.0.0.1:9542"', MetricsSection(host="127.0.0.1", port=9542), "127.0.0.1:9542"),
    ('"0.0.0.0:9100"', MetricsSection(host="0.0.0.0", port=9100), "0.0.0.0:9100"),
    ('"[::1]:9542"', MetricsSection(host="::1", port=9542), "[::1]:9542"),
    ('"[0:0::0]:80"', MetricsSection(host="::", port=80), "[::]:80"),
    ("/run/tagrouted/metrics.sock", MetricsSection(path="/run/tagrouted/metrics.sock"),
     "/run/tagrouted/metrics.sock"),
])
def test_metrics_listen_forms(value: str, section: MetricsSection, shown: str) -> None:
    config = parse_config(vs(f"metrics: {{listen: {value}}}\n"), "m.yaml")
    assert config.metrics == section and str(config.metrics) == shown


def test_metrics_off_when_absent_or_empty() -> None:
    assert parse_config(vs(), "m.yaml").metrics is None
    assert parse_config(vs("metrics:\n"), "m.yaml").metrics is None


def test_bytes_with_bom_parse() -> None:
    text = "\ufeffroles: [service]\nservice: {via: [192.168.100.2]}\n"
    assert parse_config(text.encode(), "b.yaml").roles == ("service",)


# --- broken files: (id, text, [(line, path, words in the message)]) -----------------------

GW_TAIL = (  # lines 4..7 of the gateway cases below
    "gateway:\n"
    "  public_interface: eth0\n"
    "  public_addresses: [192.0.2.200, \"2001:db8:a::200\"]\n"
    "  home_networks: [192.168.100.0/24, \"fd00:100::/64\"]\n"
    "  via: [192.168.200.2, \"fd00:200::2\"]\n"
)


def gw(service: str) -> str:
    """A gateway config whose line 3 is the given service entry."""
    return f"roles: [gateway]\nservices:\n  - {service}\n{GW_TAIL}"


def vs(extra: str = "", tunnel: str = "tun0", uplink: str = "eth0") -> str:
    """A vpn-server config: line 2 is the section; `extra` starts at line 3."""
    return f"roles: [vpn-server]\nvpn_server: {{tunnel_interface: {tunnel}, uplink_interface: {uplink}}}\n{extra}"


def tag(body: str) -> str:
    return vs(f"tag: {{{body}}}\n")


SVC = "{name: web, proto: tcp, port: 443, address: 192.168.100.3}"

BROKEN: list[tuple[str, str, list[tuple[int, str, str]]]] = [
    # YAML itself
    ("syntax-flow", "roles: [gateway\nservices: []\n", [(2, "yaml", "syntax error")]),
    ("syntax-indent", "roles: [vpn-server]\nvpn_server:\n  tunnel_interface: tun0\n uplink_interface: eth0\n",
     [(4, "yaml", "syntax error")]),
    ("syntax-quote", "roles: [vpn-server]\non_stop: 'keep\n", [(3, "yaml", "started at line 2")]),
    ("syntax-colon", "roles: [vpn-server]\nvpn_server: tunnel_interface: tun0\n", [(2, "yaml", "syntax error")]),
    ("tab-indent", "roles: [vpn-server]\nvpn_server:\n\ttunnel_interface: tun0\n\tuplink_interface: eth0\n",
     [(3, "yaml", "tab in indentation"), (4, "yaml", "tab in indentation")]),
    ("tab-after-colon", "roles: [vpn-server]\nvpn_server:\n  tunnel_interface:\ttun0\n  uplink_interface: eth0\n",
     [(3, "yaml", "tab outside a comment")]),
    ("tab-inside-comment-is-fine", "roles: [vpn-server]  # a\tcomment\n#\tanother\n"
                                   "vpn_server: {tunnel_interface: tun0, uplink_interface: eth0}\n"
                                   "tag: {dscp: 0}\n",
     [(4, "tag.dscp", "out of range")]),
    ("tab-before-comment", "roles: [vpn-server]\t# why\n\t# indented comment\n \t\n"
                           "vpn_server: {tunnel_interface: tun0, uplink_interface: eth0}\n",
     [(1, "yaml", "tab outside a comment"), (2, "yaml", "tab in indentation"), (3, "yaml", "tab in indentation")]),
    ("tab-in-flow", vs().replace(", uplink", ",\tuplink"), [(2, "yaml", "tab outside a comment")]),
    ("control-char", "roles: [vpn-server]\n\non_stop: ke\x01ep\n", [(3, "yaml", "U+0001")]),
    ("empty", "", [(1, "yaml", "empty")]),
    ("only-comments", "# nothing here\n\n# at all\n", [(1, "yaml", "empty")]),
    ("only-null", "~\n", [(1, "yaml", "empty")]),
    ("top-list", "- roles\n- gateway\n", [(1, "yaml", "top level must be a mapping")]),
    ("top-scalar", "roles\n", [(1, "yaml", "top level must be a mapping")]),
    ("two-documents", vs() + "---\nroles: [gateway]\n", [(3, "yaml", "second YAML document")]),
    ("undefined-alias", vs("on_stop: *nothing\n"), [(3, "yaml", "no anchor")]),
    ("duplicate-key", vs("on_stop: keep\non_stop: remove\n"), [(4, "on_stop", "duplicate key (first at line 3)")]),
    ("non-string-key", vs("1: x\n"), [(3, "1", "keys must be strings")]),
    ("null-key", vs("~: x\n"), [(3, "?", "keys must be strings, got null")]),
    ("list-key", vs("? [a]\n: x\n"), [(3, "?", "keys must be strings, got a list")]),
    ("merge-not-mapping", vs("<<: 5\n"), [(3, "<<", "a merge takes mappings")]),
    ("merge-unknown-key", "x: &x {colour: blue}\nroles: [vpn-server]\n"
                          "vpn_server: {<<: *x, tunnel_interface: tun0, uplink_interface: eth0}\n",
     [(1, "x", "unknown key"), (1, "vpn_server.colour", "unknown key")]),
    # unknown keys
    ("unknown-top", vs("colour: blue\n"), [(3, "colour", "unknown key")]),
    ("unknown-nested", "roles: [vpn-server]\nvpn_server:\n  tunel_interface: tun0\n  uplink_interface: eth0\n",
     [(3, "vpn_server.tunel_interface", "did you mean tunnel_interface"),
      (3, "vpn_server.tunnel_interface", "required key missing")]),
    ("unknown-in-service", gw("{name: web, proto: tcp, port: 443, adress: 192.168.100.3}"),
     [(3, "services[0].adress", "did you mean address"), (3, "services[0].address", "required key missing")]),
    ("missing-roles", "on_stop: keep\n", [(1, "roles", "required key missing")]),
    # wrong types
    ("bool-for-int", tag("dscp: true"), [(3, "tag.dscp", "boolean")]),
    ("string-for-int", tag("mark: \"42\""), [(3, "tag.mark", "expected an integer")]),
    ("float-port", gw("{name: web, proto: tcp, port: 443.5, address: 192.168.100.3}"),
     [(3, "services[0].port", "got a number")]),
    ("bool-port", gw("{name: web, proto: tcp, port: yes, address: 192.168.100.3}"),
     [(3, "services[0].port", "boolean")]),
    ("roles-string", "roles: gateway\n", [(1, "roles", "expected a list")]),
    ("roles-empty", "roles: []\n", [(1, "roles", "at least one")]),
    ("roles-unknown", "roles: [vpn_client]\n", [(1, "roles[0]", "did you mean vpn-client")]),
    ("roles-twice", vs().replace("[vpn-server]", "[vpn-server, vpn-server]"),
     [(1, "roles[1]", "listed twice")]),
    ("services-mapping", vs("services: {web: 443}\n"), [(3, "services", "expected a list")]),
    ("section-list", "roles: [vpn-server]\nvpn_server: [tun0, eth0]\n", [(2, "vpn_server", "expected a mapping")]),
    ("int-interface", vs(tunnel="0"), [(2, "vpn_server.tunnel_interface", "interface name")]),
    ("proto", gw("{name: web, proto: TCP, port: 443, address: 192.168.100.3}"),
     [(3, "services[0].proto", "tcp, udp")]),
    ("name-chars", gw("{name: my web, proto: tcp, port: 443, address: 192.168.100.3}"),
     [(3, "services[0].name", "letters, digits")]),
    ("name-empty", gw("{name: \"\", proto: tcp, port: 443, address: 192.168.100.3}"),
     [(3, "services[0].name", "letters, digits")]),
    ("timestamp", vs("resync_interval: 2024-01-01\n"), [(3, "resync_interval", "timestamp")]),
    # addresses
    ("bad-ipv4", gw("{name: web, proto: tcp, port: 443, address: 192.168.100.300}"),
     [(3, "services[0].address", "not an IPv4 or IPv6 address")]),
    ("bad-ipv6", gw("{name: web, proto: tcp, port: 443, address: \"fd00::100::3\"}"),
     [(3, "services[0].address", "not an IPv4 or IPv6 address")]),
    ("ipv6-base60", "roles: [service]\nservice: {via: [1:2:3:4:5:6:7:8]}\n",
     [(2, "service.via[0]", "quote it")]),
    ("address-is-network", gw("{name: web, proto: tcp, port: 443, address: 192.168.100.0/24}"),
     [(3, "services[0].address", "is a network")]),
    ("address-unspecified", gw("{name: web, proto: tcp, port: 443, address: 0.0.0.0}"),
     [(3, "services[0].address", "unspecified")]),
    ("address-zone", "roles: [service]\nservice: {via: [\"fe80::1%eth0\"]}\n", [(2, "service.via[0]", "zone")]),
    ("public-address-loopback", gw(SVC).replace("192.0.2.200,", "127.0.0.1,"),
     [(6, "gateway.public_addresses[0]", "loopback")]),
    ("public-addresses-empty", gw(SVC).replace("[192.0.2.200, \"2001:db8:a::200\"]", "[]"),
     [(6, "gateway.public_addresses", "at least one")]),
    ("network-host-bits", gw(SVC).replace("192.168.100.0/24", "192.168.100.1/24"),
     [(7, "gateway.home_networks[0]", "host bits set (the network is 192.168.100.0/24)")]),
    ("network-no-prefix", gw(SVC).replace("192.168.100.0/24", "192.168.100.0"),
     [(7, "gateway.home_networks[0]", "no /prefix")]),
    ("network-default", gw(SVC).replace("\"fd00:100::/64\"", "\"::/0\""),
     [(7, "gateway.home_networks[1]", "everything")]),
    ("network-bad", gw(SVC).replace("192.168.100.0/24", "192.168.100.0/33"),
     [(7, "gateway.home_networks[0]", "not an IPv4 or IPv6 network")]),
    ("via-two-per-family", gw(SVC).replace("[192.168.200.2,", "[192.168.200.2, 192.168.200.3,"),
     [(8, "gateway.via[1]", "one address per family")]),
    ("public-address-twice", gw(SVC).replace("[192.0.2.200,", "[192.0.2.200, 192.0.2.200,"),
     [(6, "gateway.public_addresses[1]", "listed twice")]),
    # ports
    ("port-0", gw("{name: web, proto: tcp, port: 0, address: 192.168.100.3}"),
     [(3, "services[0].port", "port 0 is out of range 1..65535")]),
    ("port-65536", gw("{name: web, proto: tcp, port: 65536, address: 192.168.100.3}"),
     [(3, "services[0].port", "65536 is out of range")]),
    ("port-range-reversed", gw("{name: web, proto: tcp, port: \"200-100\", address: 192.168.100.3}"),
     [(3, "services[0].port", "reversed")]),
    ("port-range-0", gw("{name: web, proto: tcp, port: 0-100, address: 192.168.100.3}"),
     [(3, "services[0].port", "port 0")]),
    ("port-garbage", gw("{name: web, proto: tcp, port: \"80,443\", address: 192.168.100.3}"),
     [(3, "services[0].port", "expected a port or a range")]),
    ("to-port-with-range", gw("{name: web, proto: tcp, port: 1000-1010, to_port: 80, address: 192.168.100.3}"),
     [(3, "services[0].to_port", "only allowed with a single port")]),
    ("to-port-0", gw("{name: web, proto: tcp, port: 443, to_port: 0, address: 192.168.100.3}"),
     [(3, "services[0].to_port", "out of range")]),
    ("port-overlap", gw(SVC).replace("services:\n", "services:\n  - {name: alt, proto: tcp, port: 400-500, "
                                                    "address: 192.168.100.4}\n"),
     [(4, "services[1].port", "overlaps alt")]),
    # interface names
    ("ifname-too-long", vs(tunnel="averyverylongtun"), [(2, "vpn_server.tunnel_interface", "longer than 15")]),
    ("ifname-slash", vs(uplink="eth/0"), [(2, "vpn_server.uplink_interface", "'/'")]),
    ("ifname-colon", vs(uplink="eth0:1"), [(2, "vpn_server.uplink_interface", "':'")]),
    ("ifname-space", vs(uplink="\"eth 0\""), [(2, "vpn_server.uplink_interface", "whitespace")]),
    ("ifname-dot", vs(uplink="\".\""), [(2, "vpn_server.uplink_interface", ". or ..")]),
    ("ifname-empty", vs(uplink="\"\""), [(2, "vpn_server.uplink_interface", "empty")]),
    ("same-tunnel-uplink", vs(uplink="tun0"), [(2, "vpn_server.uplink_interface", "must differ")]),
    # the tag
    ("table-0", tag("table: 0"), [(3, "tag.table", "out of range")]),
    ("table-253", tag("table: 253"), [(3, "tag.table", "default table")]),
    ("table-254", tag("table: 254"), [(3, "tag.table", "main table")]),
    ("table-255", tag("table: 255"), [(3, "tag.table", "local table")]),
    ("table-too-big", tag("table: 0x100000000"), [(3, "tag.table", "out of range")]),
    ("dscp-0", tag("dscp: 0"), [(3, "tag.dscp", "0 is out of range 1..63")]),
    ("dscp-64", tag("dscp: 64"), [(3, "tag.dscp", "64 is out of range 1..63")]),
    ("mark-0", tag("mark: 0"), [(3, "tag.mark", "out of range")]),
    ("priority-0", tag("priority: 0"), [(3, "tag.priority", "kernel's own rules")]),
    ("priority-32766", tag("priority: 32766"), [(3, "tag.priority", "kernel's own rule (lookup main)")]),
    ("tag-unknown", tag("fwmark: 42"), [(3, "tag.fwmark", "did you mean mark")]),
    # other scalars
    ("rp-filter-strict", "roles: [vpn-client]\nvpn_client: {tunnel_interface: tun0, lan_interface: eth0, "
                         "rp_filter: strict}\n", [(2, "vpn_client.rp_filter", "not one of: off, loose")]),
    ("rp-filter-on", "roles: [vpn-client]\nvpn_client: {tunnel_interface: tun0, lan_interface: eth0, "
                     "rp_filter: on}\n", [(2, "vpn_client.rp_filter", "boolean")]),
    ("on-stop", vs("on_stop: delete\n"), [(3, "on_stop", "keep, remove")]),
    ("interval-0", vs("resync_interval: 0\n"), [(3, "resync_interval", "more than 0")]),
    ("interval-too-long", vs("resync_interval: 2h\n"), [(3, "resync_interval", "at most 3600")]),
    ("interval-unit", vs("resync_interval: 2 days\n"), [(3, "resync_interval", "duration like")]),
    ("interval-bool", vs("resync_interval: true\n"), [(3, "resync_interval", "boolean")]),
    ("interval-nan", vs("resync_interval: .nan\n"), [(3, "resync_interval", "more than 0")]),
    ("families-5", vs().replace("eth0}", "eth0, families: [5]}"), [(2, "vpn_server.families[0]", "got an integer")]),
    ("families-twice", vs().replace("eth0}", "eth0, families: [ipv4, 4]}"),
     [(2, "vpn_server.families[1]", "listed twice")]),
    ("families-float", vs().replace("eth0}", "eth0, families: [4.0]}"), [(2, "vpn_server.families[0]", "number")]),
    ("interval-huge", vs("resync_interval: " + "9" * 400 + "\n"), [(3, "resync_interval", "more than 64 characters")]),
    ("interval-huge-short", vs("resync_interval: " + "9" * 60 + "\n"), [(3, "resync_interval", "at most 3600")]),
    ("int-too-many-digits", tag("dscp: " + "9" * 5000), [(3, "tag.dscp", "more than 64 characters")]),
    ("families-empty", vs().replace("eth0}", "eth0, families: []}"), [(2, "vpn_server.families", "at least one")]),
    # roles and sections
    ("role-without-section", "roles: [vpn-server, vpn-client]\n"
                             "vpn_server: {tunnel_interface: tun0, uplink_interface: eth0}\n",
     [(1, "roles[1]", "needs a `vpn_client` section")]),
    ("service-needs-via-or-tunnel", "roles: [service]\nservice: {}\n", [(2, "service", "needs via")]),
    ("service-tunnel-without-vpn-client", "roles: [service]\nservice: {tunnel_interface: tun0}\n",
     [(2, "service.tunnel_interface", "only with role vpn-client")]),
    ("service-tunnel-mismatch", "roles: [vpn-client, service]\n"
                                "vpn_client: {tunnel_interface: tun0, lan_interface: eth0}\n"
                                "service: {tunnel_interface: tun1}\n",
     [(3, "service.tunnel_interface", "must be vpn_client.tunnel_interface (tun0)")]),
    ("service-via-lacks-family", "roles: [service]\n"
                                 "services: [{name: web6, proto: tcp, port: 443, address: \"fd00:100::3\"}]\n"
                                 "service: {via: [192.168.100.2]}\n",
     [(2, "services[0].address", "service.via has no IPv6")]),
    ("lan-is-tunnel", "roles: [vpn-client]\nvpn_client: {tunnel_interface: tun0, lan_interface: tun0}\n",
     [(2, "vpn_client.lan_interface", "must differ")]),
    # gateway cross-checks
    ("ipv6-service-without-ipv6-public", gw("{name: web6, proto: tcp, port: 443, address: \"fd00:100::3\"}")
     .replace(", \"2001:db8:a::200\"", ""),
     [(3, "services[0].address", "no IPv6 address")]),
    ("service-outside-home", gw("{name: web, proto: tcp, port: 443, address: 192.168.101.3}"),
     [(3, "services[0].address", "outside gateway.home_networks")]),
    ("home-family-without-via", gw(SVC).replace(", \"fd00:200::2\"", ""),
     [(7, "gateway.home_networks[1]", "gateway.via has no IPv6")]),
    ("via-family-without-home", gw(SVC).replace(", \"fd00:100::/64\"", ""),
     [(8, "gateway.via[1]", "no IPv6 home network")]),
    ("via-on-vps", gw(SVC).replace("[gateway]", "[gateway, vpn-server]")
     + "vpn_server: {tunnel_interface: tun0, uplink_interface: eth0}\n",
     [(8, "gateway.via", "not used on a host that is also the vpn-server")]),
    ("duplicate-names", gw(SVC) + "  forwards:\n  - {name: web, proto: udp, port: 1194, address: 192.168.200.2}\n",
     [(10, "gateway.forwards[0].name", "duplicate name 'web' (first at services[0], line 3)")]),
    ("duplicate-service-names", gw(SVC).replace("services:\n", "services:\n  - {name: web, proto: tcp, "
                                                              "port: 80, address: 192.168.100.3}\n"),
     [(4, "services[1].name", "duplicate name")]),
    # values another program re-reads with another meaning (issue 16)
    ("ifname-bang", gw(SVC).replace("public_interface: eth0", "public_interface: \"!eth0\""),
     [(5, "gateway.public_interface", "reads a leading '!' as 'not'")]),
    ("ifname-plus-wildcard", vs(tunnel="tun+"), [(2, "vpn_server.tunnel_interface", "'+' as a wildcard")]),
    ("ifname-star", vs(tunnel="\"tun*\""), [(2, "vpn_server.tunnel_interface", "wildcard")]),
    ("ifname-utf8", vs(tunnel="tunà"), [(2, "vpn_server.tunnel_interface", "not ASCII")]),
    ("ifname-utf8-7-letters", vs(tunnel="ééééééé"), [(2, "vpn_server.tunnel_interface", "not ASCII")]),
    ("ifname-quote", vs(uplink="'eth0\"'"), [(2, "vpn_server.uplink_interface", "a quote ends the name")]),
    ("ifname-single-quote", vs(uplink="\"eth'0\""), [(2, "vpn_server.uplink_interface", "a quote")]),
    ("ifname-all", vs(uplink="all"), [(2, "vpn_server.uplink_interface", "reserved")]),
    ("ifname-default", vs(uplink="default"), [(2, "vpn_server.uplink_interface", "reserved")]),
    ("ifname-lo", vs(uplink="lo"), [(2, "vpn_server.uplink_interface", "loopback interface")]),
    ("ifname-escape", vs(uplink="\"eth\\e[31m\""), [(2, "vpn_server.uplink_interface", "control character")]),
    ("ifname-percent", vs(uplink="eth%d"), [(2, "vpn_server.uplink_interface", "number pattern")]),
    ("ifname-comma", vs(uplink="\"eth0,eth1\""), [(2, "vpn_server.uplink_interface", "letters, digits")]),
    ("int-hex-4300-digits", tag("mark: 0x" + "f" * 4300), [(3, "tag.mark", "more than 64 characters")]),
    ("int-binary-long", tag("table: 0b" + "1" * 100), [(3, "tag.table", "more than 64 characters")]),
    ("int-base60-long", tag("priority: " + ":".join(["59"] * 30)), [(3, "tag.priority", "more than 64 characters")]),
    ("address-ipv4-mapped", gw(SVC).replace("192.168.200.2,", "\"::ffff:127.0.0.1\","),
     [(8, "gateway.via[0]", "IPv4-mapped")]),
    ("address-ipv4-compatible", gw("{name: web, proto: tcp, port: 443, address: \"::192.168.100.3\"}"),
     [(3, "services[0].address", "IPv4-compatible")]),
    ("address-this-network", gw("{name: web, proto: tcp, port: 443, address: 0.1.2.3}"),
     [(3, "services[0].address", "0.0.0.0/8")]),
    ("address-240", gw(SVC).replace("192.0.2.200,", "240.0.0.1,"),
     [(6, "gateway.public_addresses[0]", "240.0.0.0/4")]),
    ("address-v6-reserved", gw(SVC).replace("\"2001:db8:a::200\"", "\"::2:0:1\""),
     [(6, "gateway.public_addresses[1]", "::/8")]),
    ("address-link-local-service", gw("{name: web, proto: tcp, port: 443, address: 169.254.1.3}"),
     [(3, "services[0].address", "link-local")]),
    ("via-link-local", "roles: [service]\nservice: {via: [\"fe80::1\"]}\n",
     [(2, "service.via[0]", "needs a device")]),
    ("gateway-via-link-local", gw(SVC).replace("\"fd00:200::2\"", "\"fe80::2\""),
     [(8, "gateway.via[1]", "needs a device")]),
    ("home-covers-public", gw("{name: web, proto: tcp, port: 443, address: 192.0.2.3}").replace(
        "192.168.100.0/24", "192.0.2.0/24"),
     [(7, "gateway.home_networks[0]", "covers the public address 192.0.2.200")]),
    ("home-halves-of-everything", gw(SVC).replace("[192.168.100.0/24,", "[0.0.0.0/1, 128.0.0.0/1, 192.168.100.0/24,"),
     [(7, "gateway.home_networks[0]", "0.0.0.0/8"), (7, "gateway.home_networks[1]", "169.254.0.0/16")]),
    ("home-loopback", gw(SVC).replace("[192.168.100.0/24,", "[192.168.100.0/24, 127.0.0.0/8,"),
     [(7, "gateway.home_networks[1]", "loopback")]),
    ("via-inside-home", gw(SVC).replace("[192.168.200.2,", "[192.168.100.1,"),
     [(8, "gateway.via[0]", "inside the home network 192.168.100.0/24")]),
    ("dscp-ef", tag("dscp: 46"), [(3, "tag.dscp", "EF (expedited forwarding: voice)")]),
    ("dscp-af11", tag("dscp: 10"), [(3, "tag.dscp", "AF11")]),
    ("dscp-cs6", tag("dscp: 48"), [(3, "tag.dscp", "CS6")]),
    ("table-wg-quick", tag("table: 51820"), [(3, "tag.table", "wg-quick")]),
    ("table-tailscale", tag("table: 52"), [(3, "tag.table", "Tailscale")]),
    ("mark-wg-quick", tag("mark: 0xca6c"), [(3, "tag.mark", "wg-quick")]),
    ("mark-tailscale-bits", tag("mark: 0x80000"), [(3, "tag.mark", "Tailscale")]),
    ("priority-wg-quick", tag("priority: 32765"), [(3, "tag.priority", "wg-quick")]),
    ("wg-quick-all-three", tag("table: 51820, mark: 0xca6c, priority: 32765"),
     [(3, "tag.table", "wg-quick"), (3, "tag.mark", "wg-quick"), (3, "tag.priority", "wg-quick")]),
    ("combined-vpn-client-service-via", "roles: [vpn-client, service]\n"
                                        "vpn_client: {tunnel_interface: tun0, lan_interface: eth0}\n"
                                        "service: {via: [192.168.100.2]}\n",
     [(3, "service.via", "service: {tunnel_interface: tun0}")]),
    ("home-networks-over-cap", gw(SVC).replace(
        "[192.168.100.0/24,", "[192.168.100.0/24, " + ", ".join(f"10.{i}.0.0/16" for i in range(64)) + ","),
     [(7, "gateway.home_networks", "more than the limit of 64")]),
    # limits
    ("deep-flow", vs("on_stop: " + "[" * 40 + "]" * 40 + "\n"), [(3, "yaml", "deeper than 32")]),
    ("deep-block", "".join(f"{'  ' * i}k{i}:\n" for i in range(40)), [(33, "yaml", "deeper than 32")]),
    ("deep-alias", vs("x: &deep " + "[" * 30 + "]" * 30 + "\ny: [[[*deep]]]\n"),
     [(4, "yaml", "through alias *deep")]),
    ("billion-laughs", "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                       + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n"
                                 for i in range(6)),
     [(5, "yaml", "more than 100000 nodes")]),  # line 5: *d x 10 = 10^5 nodes
    ("recursive-alias", vs("x: &r [1, *r]\n"), [(3, "yaml", "contains it")]),
    # metrics
    ("metrics-empty", vs("metrics: {}\n"), [(3, "metrics.listen", "required key missing")]),
    ("metrics-unknown-key", vs("metrics: {listen: \"127.0.0.1:9542\", port: 9542}\n"),
     [(3, "metrics.port", "unknown key")]),
    ("metrics-not-mapping", vs("metrics: \"127.0.0.1:9542\"\n"), [(3, "metrics", "expected a mapping")]),
    ("metrics-int", vs("metrics: {listen: 9542}\n"), [(3, "metrics.listen", "got an integer (9542)")]),
    ("metrics-no-port", vs("metrics: {listen: \"127.0.0.1\"}\n"),
     [(3, "metrics.listen", "needs a port, as in 127.0.0.1:9542")]),
    ("metrics-no-address", vs("metrics: {listen: \":9542\"}\n"),
     [(3, "metrics.listen", "needs an address before the port")]),
    ("metrics-name", vs("metrics: {listen: \"localhost:9542\"}\n"),
     [(3, "metrics.listen", "not an IP address (names are not resolved)")]),
    ("metrics-ipv6-unbracketed", vs("metrics: {listen: \"::1:9542\"}\n"),
     [(3, "metrics.listen", "goes in brackets")]),
    ("metrics-ipv4-bracketed", vs("metrics: {listen: \"[127.0.0.1]:9542\"}\n"),
     [(3, "metrics.listen", "brackets are for IPv6")]),
    ("metrics-port-0", vs("metrics: {listen: \"127.0.0.1:0\"}\n"), [(3, "metrics.listen", "port 0 is out of range")]),
    ("metrics-port-big", vs("metrics: {listen: \"[::1]:65536\"}\n"),
     [(3, "metrics.listen", "port 65536 is out of range")]),
    ("metrics-multicast", vs("metrics: {listen: \"224.0.0.1:9542\"}\n"),
     [(3, "metrics.listen", "not an address to listen on")]),
    ("metrics-zone", vs("metrics: {listen: \"[fe80::1%eth0]:9542\"}\n"), [(3, "metrics.listen", "zone")]),
    ("metrics-relative-path", vs("metrics: {listen: run/metrics.sock}\n"),
     [(3, "metrics.listen", "absolute socket path")]),
    ("metrics-path-dir", vs("metrics: {listen: /run/tagrouted/}\n"), [(3, "metrics.listen", "name the socket file")]),
    ("metrics-path-dots", vs("metrics: {listen: /run/tagrouted/../m.sock}\n"), [(3, "metrics.listen", ". or ..")]),
    ("metrics-path-long", vs("metrics: {listen: /" + "m" * 107 + "}\n"), [(3, "metrics.listen", "longer than 107")]),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_broken(text: str, expected: list[tuple[int, str, str]]) -> None:
    problems = problems_of(text)
    assert where(problems) == [(line, path) for line, path, _ in expected], "\n".join(map(str, problems))
    for problem, (_, _, words) in zip(problems, expected, strict=True):
        assert words in problem.message, str(problem)


def test_problem_format() -> None:
    problems = problems_of(tag("dscp: 64"), "/etc/tagrouted/tagrouted.yaml")
    assert str(problems[0]) == (
        "/etc/tagrouted/tagrouted.yaml:3: tag.dscp: 64 is out of range 1..63 (6 bits; 0 is untagged traffic)")


def test_every_problem_of_a_file_is_reported() -> None:
    text = (
        "roles: [gateway, vpn-client]\n"                                            # 1
        "tag: {dscp: 0, mark: 0, table: 254, priority: 32767}\n"                   # 2
        "services:\n"                                                              # 3
        "  - {name: web, proto: tcp, port: 0, address: 192.168.100.3}\n"           # 4
        "  - {name: web, proto: sctp, port: 443, address: \"fd00:100::3\"}\n"      # 5
        "  - {name: games, proto: udp, port: 200-100, address: 192.168.100.999}\n"  # 6
        "gateway:\n"                                                               # 7
        "  public_interface: eth0.with.a.long.name\n"                              # 8
        "  public_addresses: [192.0.2.200]\n"                                      # 9
        "  home_networks: [192.168.100.1/24]\n"                                    # 10
        "  colour: blue\n"                                                         # 11
        "on_stop: never\n"                                                         # 12
        "resync_interval: 0s\n"                                                    # 13
    )
    assert where(problems_of(text)) == [
        (1, "roles[1]"),
        (2, "tag.dscp"), (2, "tag.mark"), (2, "tag.table"), (2, "tag.priority"),
        (4, "services[0].port"),
        (5, "services[1].proto"),
        (6, "services[2].port"), (6, "services[2].address"),
        (8, "gateway.public_interface"),
        (10, "gateway.home_networks[0]"),
        (11, "gateway.colour"),
        (12, "on_stop"),
        (13, "resync_interval"),
    ]


def test_cross_check_problems_are_all_reported() -> None:
    text = (
        "roles: [gateway]\n"                                                       # 1
        "services:\n"                                                              # 2
        "  - {name: web6, proto: tcp, port: 443, address: \"fd00:100::3\"}\n"      # 3
        "  - {name: web, proto: tcp, port: 443, address: 10.0.0.3}\n"              # 4
        "gateway:\n"                                                               # 5
        "  public_interface: eth0\n"                                               # 6
        "  public_addresses: [192.0.2.200]\n"                                      # 7
        "  home_networks: [192.168.100.0/24, \"fd00:100::/64\"]\n"                 # 8
        "  forwards: [{name: web, proto: udp, port: 1194, address: 192.168.200.2}]\n"  # 9
        "vpn_client: {tunnel_interface: tun0, lan_interface: eth1}\n"              # 10
    )
    problems = problems_of(text)
    assert where(problems) == [
        (3, "services[0].address"),       # IPv6 service, no IPv6 public address
        (4, "services[1].address"),       # outside the home networks
        (8, "gateway.home_networks[0]"),  # no via at all
        (8, "gateway.home_networks[1]"),
        (9, "gateway.forwards[0].name"),  # duplicate of services[1]
    ]


def test_cross_checks_see_the_valid_services_of_a_list_with_invalid_ones() -> None:
    text = gw("{name: web, proto: tcp, port: 0, address: 192.168.100.3}").replace(
        "services:\n", "services:\n  - {name: web6, proto: tcp, port: 443, address: \"fd00:100::3\"}\n",
    ).replace(", \"2001:db8:a::200\"", "")
    assert where(problems_of(text)) == [(3, "services[0].address"), (4, "services[1].port")]


def test_the_default_tag_is_none_of_the_refused_values() -> None:
    """DSCP 42 is no class in common use, and no default is another tool's table, mark or rule."""
    assert 42 not in config_module.DSCP_IN_USE
    assert config_module.DSCP_IN_USE.keys() >= {46, 10, 12, 14, 18, 20, 22, 26, 28, 30, 34, 36, 38,
                                                8, 16, 24, 32, 40, 48, 56}
    for key, value in vars(Tag()).items():
        assert config_module._foreign_tag_value(key, value) is None, key
    assert parse_config(tag("dscp: 42, mark: 42, table: 42, priority: 1042"), "t.yaml").tag == Tag()


@pytest.mark.parametrize("key", ['"a\\nb"', '"x\\e[2J\\e[Hforged.yaml:1: roles: fine"', '"\\u2028y"'])
def test_a_problem_is_one_line_whatever_its_key_holds(key: str) -> None:
    problems = problems_of(vs(f"{key}: 1\n"), "t\nforged.yaml")
    text = "\n".join(str(p) for p in problems)
    assert len(text.splitlines()) == len(problems) == 1, text
    assert "\x1b" not in text and "\u2028" not in text
    assert text.startswith("t\\x0aforged.yaml:3: ")


def test_each_overlapping_port_is_named_in_linear_time() -> None:
    """10,000 services with one overlap: sort and sweep finds it (the pairwise search took 34 s)."""
    lines = "".join(f"  - {{name: s{i}, proto: tcp, port: {1000 + i}, address: 192.168.100.3}}\n"
                    for i in range(10_000))
    lines += "  - {name: late, proto: tcp, port: 5000-5001, address: 192.168.100.3}\n"
    text = f"roles: [gateway]\nservices:\n{lines}{GW_TAIL}"
    problems = problems_of(text)
    assert [(p.line, p.path) for p in problems] == [(10_003, "services[10000].port"), (10_003, "services[10000].port")]
    assert "overlaps s4000 (services[4000], line 4003)" in problems[0].message
    assert "overlaps s4001 (services[4001], line 4004)" in problems[1].message


def test_what_a_config_expands_to_is_capped() -> None:
    services = "".join(f"  - {{name: s{i}, proto: tcp, port: {1000 + i}, address: 192.168.100.3}}\n"
                       for i in range(1000))
    publics = ", ".join(f"192.0.2.{i}" for i in range(1, 25))
    text = (f"roles: [gateway]\nservices:\n{services}gateway:\n  public_interface: eth0\n"
            f"  public_addresses: [{publics}]\n  home_networks: [192.168.100.0/24]\n  via: [192.168.200.2]\n")
    problems = problems_of(text)
    assert where(problems) == [(1005, "gateway.public_addresses")]
    assert "1000 services and forwards x 24 public addresses expand to 25001 firewall rules" in problems[0].message
    assert "limit of 25000" in problems[0].message
    fits = text.replace("  - {name: s999, proto: tcp, port: 1999, address: 192.168.100.3}\n", "")
    assert len(parse_config(fits, "t.yaml").services) == 999


def test_ten_thousand_public_addresses_are_checked() -> None:
    publics = ", ".join(f"198.18.{i // 250}.{i % 250 + 1}" for i in range(10_000))
    text = (f"roles: [gateway]\nservices:\n  - {SVC}\ngateway:\n  public_interface: eth0\n"
            f"  public_addresses: [{publics}]\n  home_networks: [192.168.100.0/24]\n  via: [192.168.200.2]\n")
    assert len(parse_config(text, "t.yaml").gateway.public_addresses) == 10_000  # type: ignore[union-attr]


# --- bytes and files ----------------------------------------------------------------------


def test_non_utf8_bytes() -> None:
    data = b"roles: [service]\nservice:\n  via: [\xff192.168.100.2]\n"
    problems = problems_of(data)
    assert where(problems) == [(3, "yaml")]
    assert "not UTF-8" in problems[0].message and "0xff" in problems[0].message


def test_utf16_is_not_utf8() -> None:
    problems = problems_of("roles: [service]\n".encode("utf-16"))
    assert where(problems) == [(1, "yaml")] and "not UTF-8" in problems[0].message


def test_problems_are_capped() -> None:
    many = vs("services:\n" + "".join(f"  - {{name: s{i}, proto: tcp, port: 0, address: 192.168.100.3}}\n"
                                     for i in range(300)))
    problems = problems_of(many)
    assert len(problems) == config_module.MAX_PROBLEMS + 1
    assert where(problems[-2:]) == [(4 + 199, "services[199].port"), (4 + 200, "file")]
    assert "not listed" in problems[-1].message
    tabs = problems_of("\tx: 1\n" * 100_000)
    assert len(tabs) == config_module.MAX_PROBLEMS + 1 and tabs[-1].line == config_module.MAX_PROBLEMS + 1


def test_oversize_text_refused_before_parsing() -> None:
    problems = problems_of("#" * (MAX_FILE_BYTES + 1))
    assert where(problems) == [(1, "file")] and "larger than" in problems[0].message


def load_problems(path: Path | str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return info.value.problems


def test_load_file_with_problems(tmp_path: Path) -> None:
    path = tmp_path / "tagrouted.yaml"
    path.write_text(tag("dscp: 64"))
    problems = load_problems(path)
    assert [str(p) for p in problems] == [f"{path}:3: tag.dscp: 64 is out of range 1..63 (6 bits; 0 is "
                                          "untagged traffic)"]


def test_load_oversize_file(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    problems = load_problems(path)
    assert where(problems) == [(1, "file")] and "larger than" in problems[0].message


def test_load_directory(tmp_path: Path) -> None:
    problems = load_problems(tmp_path)
    assert where(problems) == [(1, "file")] and problems[0].message == "not a regular file (a directory)"


def test_load_dev_zero_symlink(tmp_path: Path) -> None:
    link = tmp_path / "tagrouted.yaml"
    link.symlink_to("/dev/zero")
    problems = load_problems(link)
    assert where(problems) == [(1, "file")] and "character device" in problems[0].message


def test_load_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    problems = load_problems(fifo)
    assert where(problems) == [(1, "file")] and "FIFO" in problems[0].message


def test_load_missing_file(tmp_path: Path) -> None:
    problems = load_problems(tmp_path / "nope.yaml")
    assert where(problems) == [(1, "file")] and "No such file" in problems[0].message


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("roles: [vpn-server]\n# caf\u00e9\n".encode("latin-1"))
    assert where(load_problems(path)) == [(2, "yaml")]


@pytest.mark.parametrize("path", BROKEN_CORPUS, ids=lambda p: p.name)
def test_broken_corpus_files(path: Path) -> None:
    """Each file in tests/unit/broken/ names its expected problems in `# expect: LINE PATH` lines."""
    text = path.read_bytes()
    expected = [
        (int(line.split()[2]), line.split()[3])
        for line in text.decode("utf-8", "replace").splitlines() if line.startswith("# expect: ")
    ]
    assert expected, f"{path.name} has no '# expect: LINE PATH' line"
    assert where(load_problems(path)) == expected


def test_import_pulls_no_edge_library() -> None:
    code = ("import sys, tagrouted.core.config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyroute2', 'iptc', 'watchdog', 'systemd'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_section_without_its_role_is_allowed_and_unused() -> None:
    """One file may serve several hosts that differ only in `roles` (DESIGN.md's sample)."""
    config = parse_config(
        "roles: [service]\nservice: {via: [192.168.100.2]}\n"
        "vpn_server: {tunnel_interface: tun0, uplink_interface: eth0}\n", "t.yaml")
    assert config.roles == ("service",) and not config.has("vpn-server")
