"""The desired-state compiler: (config, observed host facts) -> everything this host keeps.

Pure: no I/O, no edge imports. Each role contributes routes, policy rules, sysctls and its part
of the firewall intent (backend-neutral: core/iptables_rules.py and core/nft_rules.py render it);
combined roles on one host merge into one non-duplicated state (a route, rule or passage wanted
by two roles appears once). The facts it reads are the ones netlink does
not make policy of by itself: which links exist (a route `dev tun0` only while tun0 exists),
`all.rp_filter` (the kernel uses max(all, if)), each link's accept_ra, and which links carry
the host's IPv6 default route (accept_ra=2 goes only there and on links the config names).
The vpn-client and service roles keep their state once per path (Config.tag_paths(): the
single-path form is one path), each with its own tag, rule and table.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, collapse_addresses

from .config import Config, Family, IPAddress, MssSetting, Service, Tag, TagPath
from .state import (
    UNREACHABLE_METRIC,
    ConntrackFlush,
    DesiredState,
    Exposed,
    FirewallIntent,
    GatewayPolicy,
    HostFacts,
    LinkFacts,
    MssClamp,
    Passage,
    PolicyRule,
    ReplyTagging,
    Route,
    Sysctl,
    TunnelAdmission,
    TunnelTagging,
)

MAIN_TABLE = 254


def _host(addr: IPAddress) -> str:
    return f"{addr}/{32 if addr.version == 4 else 128}"


def _family(addr: IPAddress) -> Family:
    return 4 if isinstance(addr, IPv4Address) else 6


def exposed(svc: Service, tagged: bool = True) -> Exposed:
    # Overlapping or adjacent prefixes merged: an interval set refuses overlaps, and the same
    # sources then read the same in both backends.
    allow = tuple(str(n) for n in collapse_addresses(svc.allow_from)) if svc.allow_from else ()  # type: ignore[arg-type]
    return Exposed(svc.name, svc.family, svc.proto, (svc.port.first, svc.port.last),
                   str(svc.address), svc.to_port, tagged, allow, svc.rate_limit)


def _admitted(svc: Service) -> Exposed:
    """A service as the VPN client admits it: allow_from enforced again (the true source is
    there too), rate limits left to the gateway (one bucket per source, not two)."""
    e = exposed(svc)
    return Exposed(e.name, e.family, e.proto, e.port, e.address, e.to_port, e.tagged, e.allow_from)


def _mss_clamp(family: Family, interface: str, setting: MssSetting) -> MssClamp | None:
    if setting == "off":
        return None
    return MssClamp(family, interface, None if setting == "pmtu" else int(setting))


class _Builder:
    """Accumulates one host's state across roles, dropping exact duplicates, keeping order."""

    def __init__(self, tag: Tag, ra_links: frozenset[str] = frozenset()) -> None:
        self.tag = tag
        self.ra_links = ra_links  # where accept_ra=2 may be set (see forwarding)
        self.routes: set[Route] = set()
        self.rules: set[PolicyRule] = set()
        self.sysctls: dict[str, str] = {}
        self.gateways: list[GatewayPolicy] = []
        self.passages: dict[Passage, None] = {}
        self.tunnel_tags: list[TunnelTagging] = []
        self.admissions: list[TunnelAdmission] = []
        self.reply_tags: list[ReplyTagging] = []
        self.mss_clamps: dict[MssClamp, None] = {}
        self.udp: set[ConntrackFlush] = set()
        self.notes: list[str] = []

    def tagged_routing(self, family: Family, route: Route | None, path: TagPath) -> None:
        """The path's table's route for tagged replies and the fwmark rule that leads there."""
        if route is not None:
            self.routes.add(route)
        self.rules.add(PolicyRule(family, path.priority, path.mark, path.table, self.tag.mark_mask))

    def forwarding(self, family: Family, facts: HostFacts) -> None:
        if family == 4:
            self.sysctls["net.ipv4.ip_forward"] = "1"
            return
        self.sysctls["net.ipv6.conf.all.forwarding"] = "1"
        # With forwarding on, accept_ra=1 is ignored: 2 keeps a VPS's RA-learned default route.
        # Only where that route is (or on links the config names): on every link, a rogue RA
        # on the LAN could set the default route.
        for link in facts.links:
            if link.name in self.ra_links and link.name != "lo" and link.accept_ra in (1, 2):
                self.sysctls[f"net.ipv6.conf.{link.name}.accept_ra"] = "2"

    def build(self) -> DesiredState:
        firewall = FirewallIntent(
            mark_mask=self.tag.mark_mask,
            gateways=tuple(self.gateways),
            passages=tuple(self.passages),
            tunnel_tags=tuple(self.tunnel_tags),
            admissions=tuple(self.admissions),
            reply_tags=tuple(self.reply_tags),
            mss_clamps=tuple(self.mss_clamps),
        )
        return DesiredState(
            routes=frozenset(self.routes),
            rules=frozenset(self.rules),
            sysctls=tuple(Sysctl(k, v) for k, v in sorted(self.sysctls.items())),
            firewall=firewall,
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
    vs = config.vpn_server if config.has("vpn-server") else None
    via_tunnel = vs.tunnel_interface if vs else None
    for family in _families_of(gw.public_addresses):
        publics = tuple(str(a) for a in gw.public_addresses if _family(a) == family)
        home = [net for net in gw.home_networks if net.version == family]
        endpoints = (*(exposed(s) for s in config.services if s.family == family),
                     *(exposed(f, tagged=False) for f in gw.forwards if f.family == family))
        for e in endpoints:
            if e.proto == "udp":
                b.udp.update(ConntrackFlush(family, p, e.port[0], e.port[1], e.address, e.to_port)
                             for p in publics)
        outside = tuple(_host(f.address) for f in gw.forwards
                        if f.family == family and not any(f.address in net for net in home))
        b.gateways.append(GatewayPolicy(
            family, gw.public_interface, publics, endpoints, tuple(str(n) for n in home), outside,
            via_tunnel))
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
        b.passages[Passage(family, tun, up)] = None
        if up != public:
            b.passages[Passage(family, up, tun)] = None
        if clamp := _mss_clamp(family, tun, vs.mss_clamp):
            b.mss_clamps[clamp] = None
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
    """Per path (issue 14: one per public server): what comes out of its tunnel is stamped with
    its DSCP, LAN replies carrying that DSCP get its mark, and its table leads into its tunnel,
    with its own unreachable fallback: one tunnel down leaves the others' tables untouched."""
    vc = config.vpn_client
    assert vc is not None
    lan = vc.lan_interface
    families = _service_families(config)
    admitted = {f: tuple(_admitted(s) for s in config.services if s.family == f) for f in families}
    for path in config.tag_paths():
        tun = path.tunnel_interface
        assert tun is not None  # the config check requires it on a vpn-client
        for family in families:
            into_tunnel = Route(family, path.table, "default", dev=tun) if _up(facts, tun) else None
            b.tagged_routing(family, into_tunnel, path)
            # Tagged replies never leak to the ISP while the tunnel is down.
            b.routes.add(Route(family, path.table, "default", kind="unreachable", metric=UNREACHABLE_METRIC))
            b.tunnel_tags.append(TunnelTagging(family, tun, lan, path.dscp, path.mark, path.name))
            b.admissions.append(TunnelAdmission(family, tun, lan, admitted[family]))
            if clamp := _mss_clamp(family, tun, vc.mss_clamp):
                b.mss_clamps[clamp] = None
            b.forwarding(family, facts)
        if _present(facts, tun) and 4 in families:
            b.sysctls[f"net.ipv4.conf.{tun}.rp_filter"] = _rp_filter_value(
                vc.rp_filter, facts.rp_filter_all, b, tun)


def _reply_tunnel(config: Config, path: TagPath) -> str | None:
    """The tunnel a service host sends `path`'s tagged replies straight into (it is also the
    vpn-client), or None: they go via the path's next hop."""
    if config.paths:
        return path.tunnel_interface if config.has("vpn-client") else None
    return config.service.tunnel_interface if config.service else None


def _service(config: Config, facts: HostFacts, b: _Builder) -> None:
    """Per path: the connection remembers the path's DSCP (connmark), its replies get the path's
    mark back and go by the path's rule and table to the path's VPN client (or tunnel)."""
    for path in config.tag_paths():
        tun = _reply_tunnel(config, path)
        if tun:
            families = _service_families(config)
            up = _up(facts, tun)
            routes = {f: Route(f, path.table, "default", dev=tun) if up else None for f in families}
        else:
            families = _families_of(path.via)
            routes = {_family(v): Route(_family(v), path.table, "default", gateway=str(v)) for v in path.via}
        for family in families:
            b.tagged_routing(family, routes.get(family), path)
            # The next hop (the VPN client) routes on the DSCP tag; straight into a tunnel it would
            # only be cleared again.
            b.reply_tags.append(ReplyTagging(family, path.dscp, path.mark, stamp_dscp=not tun,
                                             path=path.name))


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
    b = _Builder(config.tag, frozenset(named_interfaces(config)) | frozenset(facts.ipv6_default_devs))
    for role in _ROLE_ORDER:
        if config.has(role):
            _ROLE_COMPILERS[role](config, facts, b)
    return b.build()


def forwarded_families(config: Config) -> frozenset[Family]:
    """The families whose forwarding the roles switch on (where `_Builder.forwarding` is called):
    the netlink adapter reads the IPv6 default routes' devices only when 6 is among them."""
    families: set[Family] = set()
    if config.has("gateway") and config.gateway:
        families |= set(_families_of(config.gateway.public_addresses))
    if config.has("vpn-server") and config.vpn_server:
        families |= set(config.vpn_server.families)
    if config.has("vpn-client") and config.vpn_client:
        families |= set(_service_families(config))
    return frozenset(families)


def assumed_facts(config: Config) -> HostFacts:
    """Facts for `plan` on any machine: every interface the config names is present and up."""
    unique = named_interfaces(config)
    return HostFacts(links=tuple(LinkFacts(n, i + 2) for i, n in enumerate(unique)))


def named_interfaces(config: Config) -> list[str]:
    """Every interface the config names, once each, in the order of the sections."""
    names: list[str] = []
    if config.gateway:
        names.append(config.gateway.public_interface)
    if config.vpn_server:
        names += [config.vpn_server.tunnel_interface, config.vpn_server.uplink_interface]
    if config.vpn_client:
        tunnels = ([config.vpn_client.tunnel_interface] if config.vpn_client.tunnel_interface else
                   [p.tunnel_interface for p in config.paths if p.tunnel_interface])
        names += [*tunnels, config.vpn_client.lan_interface]
    if config.service and config.service.tunnel_interface:
        names.append(config.service.tunnel_interface)
    return list(dict.fromkeys(names))


def empty_state(tag: Tag) -> DesiredState:
    """The state that owns nothing: converging to it removes everything we own."""
    return DesiredState(table=tag.table, priority=tag.priority,
                        firewall=FirewallIntent(mark_mask=tag.mark_mask))

