"""The desired-state compiler: (config, observed host facts) -> everything this host keeps.

Pure: no I/O, no edge imports. Each role contributes routes, policy rules, sysctls and rules in
our chains; combined roles on one host merge into one non-duplicated state (a route, rule or
firewall rule wanted by two roles appears once). The facts it reads are the ones netlink does
not make policy of by itself: which links exist (a route `dev tun0` only while tun0 exists),
`all.rp_filter` (the kernel uses max(all, if)), and each link's accept_ra.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from ipaddress import IPv4Address

from .config import Config, Family, IPAddress, Service, Tag
from .state import (
    BUILTIN_CHAINS,
    TABLE_ORDER,
    UNREACHABLE_METRIC,
    ConntrackFlush,
    DesiredState,
    FirewallRule,
    HostFacts,
    LinkFacts,
    Match,
    OwnedChain,
    PolicyRule,
    Route,
    Sysctl,
)

MAIN_TABLE = 254
ESTABLISHED = FirewallRule(
    matches=(Match("conntrack", (("ctstate", "RELATED,ESTABLISHED"),)),), target="ACCEPT"
)


def _hex(value: int) -> str:
    return f"0x{value:02x}"


def _host(addr: IPAddress) -> str:
    return f"{addr}/{32 if addr.version == 4 else 128}"


def _family(addr: IPAddress) -> Family:
    return 4 if isinstance(addr, IPv4Address) else 6


def _port_match(svc: Service, public: bool) -> Match:
    port = svc.port if public else svc.home_port
    return Match(svc.proto, (("dport", port.iptables),))


def _dnat_target(svc: Service) -> str:
    if svc.to_port is None:
        return str(svc.address)
    if svc.family == 6:
        return f"[{svc.address}]:{svc.to_port}"
    return f"{svc.address}:{svc.to_port}"


class _Builder:
    """Accumulates one host's state across roles, dropping exact duplicates, keeping order."""

    def __init__(self, tag: Tag) -> None:
        self.tag = tag
        self.routes: set[Route] = set()
        self.rules: set[PolicyRule] = set()
        self.sysctls: dict[str, str] = {}
        # An insertion-ordered set per chain: a list's `in` made 1000 services O(N^2) (~0.4 s).
        self.chain_rules: dict[tuple[Family, str, str], dict[FirewallRule, None]] = defaultdict(dict)
        self.udp: set[ConntrackFlush] = set()
        self.notes: list[str] = []

    def fw(self, family: Family, table: str, builtin: str, *rules: FirewallRule) -> None:
        chain = self.chain_rules[(family, table, builtin)]
        for rule in rules:
            chain.setdefault(rule, None)

    def tagged_routing(self, family: Family, route: Route | None) -> None:
        """Table T's route for tagged replies and the fwmark rule that leads there."""
        if route is not None:
            self.routes.add(route)
        self.rules.add(PolicyRule(family, self.tag.priority, self.tag.mark, self.tag.table))

    def forwarding(self, family: Family, facts: HostFacts) -> None:
        if family == 4:
            self.sysctls["net.ipv4.ip_forward"] = "1"
            return
        self.sysctls["net.ipv6.conf.all.forwarding"] = "1"
        # With forwarding on, accept_ra=1 is ignored: 2 keeps a VPS's RA-learned default route.
        for link in facts.links:
            if link.name != "lo" and link.accept_ra in (1, 2):
                self.sysctls[f"net.ipv6.conf.{link.name}.accept_ra"] = "2"

    def build(self) -> DesiredState:
        chains: list[OwnedChain] = []
        for family in (4, 6):
            for table in TABLE_ORDER:
                for builtin in BUILTIN_CHAINS[table]:
                    rules = self.chain_rules.get((family, table, builtin))
                    if rules:
                        chains.append(OwnedChain(family, table, builtin, tuple(rules)))
        return DesiredState(
            routes=frozenset(self.routes),
            rules=frozenset(self.rules),
            sysctls=tuple(Sysctl(k, v) for k, v in sorted(self.sysctls.items())),
            chains=tuple(chains),
            udp_endpoints=frozenset(self.udp),
            table=self.tag.table,
            priority=self.tag.priority,
            notes=tuple(self.notes),
        )


def _families_of(addresses: Iterable[IPAddress]) -> tuple[Family, ...]:
    return tuple(sorted({_family(a) for a in addresses}))


def _service_families(config: Config) -> tuple[Family, ...]:
    return _families_of(s.address for s in config.services) or (4, 6)


def _present(facts: HostFacts, name: str | None) -> LinkFacts | None:
    return facts.link(name) if name else None


def _up(facts: HostFacts, name: str | None) -> bool:
    """A route `dev X` needs X present AND up: the kernel refuses it on a down link (ENETDOWN),
    and OpenVPN creates its tun before it sets it up."""
    link = _present(facts, name)
    return link is not None and link.up


def _gateway(config: Config, facts: HostFacts, b: _Builder) -> None:
    gw = config.gateway
    assert gw is not None
    pub = gw.public_interface
    vs = config.vpn_server if config.has("vpn-server") else None
    via_tunnel = vs.tunnel_interface if vs else None
    exposed = (*config.services, *gw.forwards)
    for family in _families_of(gw.public_addresses):
        publics = [a for a in gw.public_addresses if _family(a) == family]
        accepts: list[FirewallRule] = []
        for svc in (s for s in exposed if s.family == family):
            for public in publics:
                b.fw(family, "nat", "PREROUTING", FirewallRule(
                    in_interface=pub, protocol=svc.proto, destination=_host(public),
                    matches=(_port_match(svc, public=True),),
                    target="DNAT", target_options=(("to-destination", _dnat_target(svc)),),
                ))
                if svc.proto == "udp":
                    b.udp.add(ConntrackFlush(family, str(public), svc.port.first, svc.port.last,
                                             str(svc.address), svc.to_port))
            accepts.append(FirewallRule(
                in_interface=pub, protocol=svc.proto, destination=_host(svc.address),
                matches=(_port_match(svc, public=False),), target="ACCEPT",
            ))
        # Default-deny toward home: only configured services and forwards pass from outside.
        denies = [FirewallRule(in_interface=pub, destination=str(net), target="DROP")
                  for net in gw.home_networks if net.version == family]
        home = [net for net in gw.home_networks if net.version == family]
        denies += [FirewallRule(in_interface=pub, destination=_host(f.address), target="DROP")
                   for f in gw.forwards
                   if f.family == family and not any(f.address in net for net in home)]
        if via_tunnel:
            denies.append(FirewallRule(in_interface=pub, out_interface=via_tunnel, target="DROP"))
        b.fw(family, "filter", "FORWARD", ESTABLISHED, *accepts, *denies)
        b.forwarding(family, facts)
        for net in home:
            # metric = priority: a route the VPN daemon installed itself (OpenVPN `route`) wins.
            if via_tunnel:
                if _up(facts, via_tunnel):
                    b.routes.add(Route(family, MAIN_TABLE, str(net), dev=via_tunnel,
                                       metric=config.tag.priority))
            else:
                for via in (v for v in gw.via if _family(v) == family):
                    b.routes.add(Route(family, MAIN_TABLE, str(net), gateway=str(via),
                                       metric=config.tag.priority))


def _vpn_server(config: Config, facts: HostFacts, b: _Builder) -> None:
    vs = config.vpn_server
    assert vs is not None
    tun, up = vs.tunnel_interface, vs.uplink_interface
    # On a VPS the uplink is the public interface: the gateway's ACL decides what goes home.
    public = config.gateway.public_interface if config.has("gateway") and config.gateway else None
    for family in vs.families:
        rules = [FirewallRule(in_interface=tun, out_interface=up, target="ACCEPT")]
        if up != public:
            rules.append(FirewallRule(in_interface=up, out_interface=tun, target="ACCEPT"))
        b.fw(family, "filter", "FORWARD", *rules)
        b.forwarding(family, facts)


def _rp_filter_value(mode: str, rp_filter_all: int, b: _Builder, tun: str) -> str:
    """The per-interface value that makes max(all, tun) the configured mode, or loose if off
    cannot be reached without weakening every interface (all=1)."""
    if mode == "loose":
        return "2"
    if rp_filter_all == 0:
        return "0"
    b.notes.append(
        f"net.ipv4.conf.all.rp_filter={rp_filter_all} makes rp_filter=0 on {tun} ineffective; "
        f"using loose (2) on {tun}, which is what the tunnel needs"
    )
    return "2"


def _vpn_client(config: Config, facts: HostFacts, b: _Builder) -> None:
    vc = config.vpn_client
    assert vc is not None
    tag, tun, lan = config.tag, vc.tunnel_interface, vc.lan_interface
    for family in _service_families(config):
        b.tagged_routing(family, Route(family, tag.table, "default", dev=tun) if _up(facts, tun) else None)
        # Tagged replies never leak to the ISP while the tunnel is down.
        b.routes.add(Route(family, tag.table, "default", kind="unreachable", metric=UNREACHABLE_METRIC))
        b.fw(family, "mangle", "PREROUTING",
             FirewallRule(in_interface=tun, target="DSCP", target_options=(("set-dscp", _hex(tag.dscp)),)),
             FirewallRule(in_interface=lan, matches=(Match("dscp", (("dscp", _hex(tag.dscp)),)),),
                          target="MARK", target_options=(("set-xmark", f"{tag.mark:#x}/0xffffffff"),)))
        b.fw(family, "mangle", "POSTROUTING",
             FirewallRule(out_interface=tun, target="DSCP", target_options=(("set-dscp", "0x00"),)))
        accepts = [
            FirewallRule(in_interface=tun, out_interface=lan, protocol=s.proto,
                         destination=_host(s.address), matches=(_port_match(s, public=False),),
                         target="ACCEPT")
            for s in config.services if s.family == family
        ]
        b.fw(family, "filter", "FORWARD", ESTABLISHED, *accepts,
             FirewallRule(in_interface=tun, out_interface=lan, target="DROP"))
        b.forwarding(family, facts)
    if _present(facts, tun) and 4 in _service_families(config):
        b.sysctls[f"net.ipv4.conf.{tun}.rp_filter"] = _rp_filter_value(
            vc.rp_filter, facts.rp_filter_all, b, tun)


def _service(config: Config, facts: HostFacts, b: _Builder) -> None:
    sv = config.service
    assert sv is not None
    tag = config.tag
    mark = f"{tag.mark:#x}"
    if sv.tunnel_interface:
        families = _service_families(config)
        up = _up(facts, sv.tunnel_interface)
        routes = {f: Route(f, tag.table, "default", dev=sv.tunnel_interface) if up else None
                  for f in families}
    else:
        families = _families_of(sv.via)
        routes = {_family(v): Route(_family(v), tag.table, "default", gateway=str(v)) for v in sv.via}
    for family in families:
        b.tagged_routing(family, routes.get(family))
        b.fw(family, "mangle", "INPUT", FirewallRule(
            matches=(Match("dscp", (("dscp", _hex(tag.dscp)),)),),
            target="CONNMARK", target_options=(("set-xmark", f"{mark}/0xffffffff"),)))
        # Restore only our mark: other tools' connmarks stay theirs.
        b.fw(family, "mangle", "OUTPUT", FirewallRule(
            matches=(Match("connmark", (("mark", mark),)),), target="CONNMARK",
            target_options=(("restore-mark", ""), ("nfmask", "0xffffffff"), ("ctmask", "0xffffffff"))))
        if not sv.tunnel_interface:
            # The next hop (the VPN client) routes on the DSCP tag; straight into a tunnel it
            # would only be cleared again.
            b.fw(family, "mangle", "OUTPUT", FirewallRule(
                matches=(Match("mark", (("mark", mark),)),),
                target="DSCP", target_options=(("set-dscp", _hex(tag.dscp)),)))


_ROLE_COMPILERS = {
    "gateway": _gateway,
    "vpn-server": _vpn_server,
    "vpn-client": _vpn_client,
    "service": _service,
}
# Chain order within a combined host: the gateway's ACL first, the VPN server's accepts after.
_ROLE_ORDER = ("gateway", "vpn-server", "vpn-client", "service")


def desired_state(config: Config, facts: HostFacts) -> DesiredState:
    """Everything this host keeps in place, given its config and the links present now."""
    b = _Builder(config.tag)
    for role in _ROLE_ORDER:
        if config.has(role):
            _ROLE_COMPILERS[role](config, facts, b)
    return b.build()


def assumed_facts(config: Config) -> HostFacts:
    """Facts for `plan` on any machine: every interface the config names is present and up."""
    names: list[str] = []
    if config.gateway:
        names.append(config.gateway.public_interface)
    if config.vpn_server:
        names += [config.vpn_server.tunnel_interface, config.vpn_server.uplink_interface]
    if config.vpn_client:
        names += [config.vpn_client.tunnel_interface, config.vpn_client.lan_interface]
    if config.service and config.service.tunnel_interface:
        names.append(config.service.tunnel_interface)
    unique = list(dict.fromkeys(names))
    return HostFacts(links=tuple(LinkFacts(n, i + 2) for i, n in enumerate(unique)))


def empty_state(tag: Tag) -> DesiredState:
    """The state that owns nothing: converging to it removes everything we own."""
    return DesiredState(table=tag.table, priority=tag.priority)

