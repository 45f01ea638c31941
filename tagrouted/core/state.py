"""The host's networking state as tagrouted sees it: what it wants and what the kernel has.

Owns the vocabulary shared by the pure core (desired state, plan, diff) and the kernel adapters:
frozen, hashable, comparable values with no I/O. Both `desired_state` and the adapters' readers
produce these types, so a diff is plain set arithmetic over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Family = Literal[4, 6]

CHAIN_PREFIX = "TAGROUTED-"
JUMP_COMMENT = "tagrouted"
# Routes we put into tables that are not wholly ours carry this protocol number, so we find
# them again and nobody else's (rt_protos leaves 142 unassigned).
ROUTE_PROTO = 142
UNREACHABLE_METRIC = 4294967295  # the highest metric: the fallback only wins when TUN is gone

# Built-in chains per table, in the order iptables-save prints them.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}
TABLE_ORDER = ("mangle", "nat", "filter")


def owned_chain_name(builtin: str) -> str:
    return CHAIN_PREFIX + builtin


@dataclass(frozen=True, order=True)
class Route:
    """One route. `kind` is "unicast" or "unreachable"; `dst` is a prefix or "default"."""

    family: Family
    table: int
    dst: str
    kind: str = "unicast"
    dev: str | None = None
    gateway: str | None = None
    metric: int | None = None
    proto: int = ROUTE_PROTO

    def describe(self) -> str:
        parts = [] if self.kind == "unicast" else [self.kind]
        parts.append(self.dst)
        if self.gateway:
            parts += ["via", self.gateway]
        if self.dev:
            parts += ["dev", self.dev]
        if self.table != 254:
            parts += ["table", str(self.table)]
        parts += ["proto", str(self.proto)]
        if self.metric is not None:
            parts += ["metric", str(self.metric)]
        return " ".join(parts)


@dataclass(frozen=True, order=True)
class PolicyRule:
    """An `ip rule`: ours are identified by priority + fwmark + table."""

    family: Family
    priority: int
    fwmark: int
    table: int
    mask: int = 0xFFFFFFFF

    def describe(self) -> str:
        mark = f"{self.fwmark:#x}" if self.mask == 0xFFFFFFFF else f"{self.fwmark:#x}/{self.mask:#x}"
        return f"fwmark {mark} lookup {self.table} pref {self.priority}"


@dataclass(frozen=True, order=True)
class Sysctl:
    """A value under /proc/sys, named by its dotted key (net.ipv4.conf.tun0.rp_filter)."""

    key: str
    value: str

    def describe(self) -> str:
        return f"{self.key}={self.value}"


@dataclass(frozen=True)
class Match:
    """An iptables match module and its options, as iptables-save prints them."""

    name: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FirewallRule:
    """One rule of an owned chain, in the canonical form iptables-save prints.

    Options are (name, value) pairs without the leading dashes, e.g. ("set-dscp", "0x2a")."""

    in_interface: str | None = None
    out_interface: str | None = None
    protocol: str | None = None
    source: str | None = None
    destination: str | None = None
    matches: tuple[Match, ...] = ()
    target: str = "ACCEPT"
    target_options: tuple[tuple[str, str], ...] = ()

    def save_args(self) -> str:
        """The rule as iptables-save prints it after `-A CHAIN`."""
        out: list[str] = []
        if self.source:
            out += ["-s", self.source]
        if self.destination:
            out += ["-d", self.destination]
        if self.in_interface:
            out += ["-i", self.in_interface]
        if self.out_interface:
            out += ["-o", self.out_interface]
        if self.protocol:
            out += ["-p", self.protocol]
        for m in self.matches:
            out += ["-m", m.name]
            for k, v in m.options:
                out += [f"--{k}", v] if v != "" else [f"--{k}"]
        out += ["-j", self.target]
        for k, v in self.target_options:
            out += [f"--{k}", v] if v != "" else [f"--{k}"]
        return " ".join(out)


@dataclass(frozen=True)
class OwnedChain:
    """Our chain TAGROUTED-<builtin> in one table of one family, reached by one jump from
    `builtin`, inserted first and commented `tagrouted`."""

    family: Family
    table: str
    builtin: str
    rules: tuple[FirewallRule, ...]

    @property
    def name(self) -> str:
        return owned_chain_name(self.builtin)


# ---- the firewall, backend-neutral ----------------------------------------------------------
# What the firewall must do on this host, said once; core/iptables_rules.py renders it as our
# TAGROUTED-* chains (iptables-legacy backend), core/nft_rules.py as the `inet tagrouted` table.

PortSpan = tuple[int, int]  # an inclusive port range; one port is (p, p)
RATE_UNITS = {"s": "second", "min": "minute"}  # as the config writes them -> nft's and our word
UNIT_SECONDS = {"second": 1, "minute": 60}


@dataclass(frozen=True, order=True)
class RateLimit:
    """New connections (UDP: new flows) per source address: `rate` per `unit`, up to `burst` at
    once; what is beyond is dropped and counted. Established connections are never cut."""

    rate: int
    unit: str                  # second | minute
    burst: int

    def __str__(self) -> str:
        short = "s" if self.unit == "second" else "min"
        return f"{self.rate}/{short} burst {self.burst}"

    @property
    def refill_seconds(self) -> int:
        """How long an idle source takes to get its whole burst back: after that long its
        bucket is full anyway, so forgetting it then changes nothing (a meter's timeout)."""
        return max(1, -(-self.burst * UNIT_SECONDS[self.unit] // self.rate))


@dataclass(frozen=True)
class Exposed:
    """A service (tagged) or a gateway forward (untagged), in its one family.

    `allow_from`: the source prefixes admitted (normalised: no overlaps), empty for everyone;
    `rate_limit`: new connections per source, None for no limit."""

    name: str
    family: Family
    proto: str                 # tcp | udp
    port: PortSpan             # the public port(s)
    address: str               # the home address
    to_port: int | None        # the home port when it differs from the public one
    tagged: bool = True
    allow_from: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        """The prefixes the firewall admits: allow_from, or the whole family."""
        return self.allow_from or (("0.0.0.0/0",) if self.family == 4 else ("::/0",))

    @property
    def restricted(self) -> bool:
        return bool(self.allow_from)

    @property
    def home_port(self) -> PortSpan:
        return (self.to_port, self.to_port) if self.to_port else self.port


@dataclass(frozen=True)
class GatewayPolicy:
    """The gateway in one family: DNAT per exposed endpoint, and forwarding from the public
    interface toward home that admits the exposed endpoints only (default-deny)."""

    family: Family
    public_interface: str
    publics: tuple[str, ...]          # this family's public addresses
    exposed: tuple[Exposed, ...]      # services, then forwards
    home_networks: tuple[str, ...]    # denied from outside unless exposed
    outside_hosts: tuple[str, ...]    # forwards' addresses outside the home networks
    via_tunnel: str | None = None     # a VPS: nothing else from the public side into the tunnel


@dataclass(frozen=True)
class Passage:
    """Forwarding accepted from one interface to another (the VPN server's tunnel <-> uplink)."""

    family: Family
    in_interface: str
    out_interface: str


@dataclass(frozen=True)
class TunnelTagging:
    """The VPN client in one family: DSCP stamped on what comes out of `tunnel`, the DSCP of
    replies from `lan` turned into our mark (routed back into the tunnel), the DSCP cleared on
    the way into the tunnel."""

    family: Family
    tunnel: str
    lan: str
    dscp: int
    mark: int
    path: str = ""  # the path's name: its counters (none when empty)


@dataclass(frozen=True)
class TunnelAdmission:
    """The VPN client's forwarding from the tunnel to the LAN: the services only (default-deny)."""

    family: Family
    tunnel: str
    lan: str
    exposed: tuple[Exposed, ...]


@dataclass(frozen=True)
class ReplyTagging:
    """The service host in one family: the connection remembers the DSCP tag (connmark), its
    replies get the mark back (routed by our rule) and, unless they go straight into a tunnel,
    the DSCP stamp the next hop routes on."""

    family: Family
    dscp: int
    mark: int
    stamp_dscp: bool
    path: str = ""  # the path's name: its counters (none when empty)


@dataclass(frozen=True, order=True)
class MssClamp:
    """TCP SYNs (and SYN-ACKs) forwarded into or out of `interface` get their MSS lowered to
    what the path fits: `mss` None clamps to the route's MTU (both the way on and the way back
    to the sender), a number sets at most that. Never raised."""

    family: Family
    interface: str
    mss: int | None = None

    def describe(self) -> str:
        return "to the path MTU" if self.mss is None else f"to {self.mss}"


@dataclass(frozen=True)
class FirewallIntent:
    """Everything our firewall rules do on one host. Empty means: own no firewall state."""

    mark_mask: int = 0xFF
    gateways: tuple[GatewayPolicy, ...] = ()
    passages: tuple[Passage, ...] = ()
    tunnel_tags: tuple[TunnelTagging, ...] = ()
    admissions: tuple[TunnelAdmission, ...] = ()
    reply_tags: tuple[ReplyTagging, ...] = ()
    mss_clamps: tuple[MssClamp, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.gateways or self.passages or self.tunnel_tags or self.admissions
                    or self.reply_tags or self.mss_clamps)

    def families(self) -> tuple[Family, ...]:
        found = {x.family for group in (self.gateways, self.passages, self.tunnel_tags,
                                        self.admissions, self.reply_tags, self.mss_clamps)
                 for x in group}
        return tuple(sorted(found))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ConntrackFlush:
    """Stale UDP conntrack to delete once a DNAT for this public endpoint is (re)written.
    An entry already NATed to `to_address` (and `to_port`, else the port asked for) is the DNAT
    at work, not stale: deleting it cut a live tunnel (the VPN forward) on every reload."""

    family: Family
    address: str
    first_port: int
    last_port: int
    to_address: str | None = None  # None: every entry of the endpoint is stale
    to_port: int | None = None


@dataclass(frozen=True)
class DesiredState:
    """Everything tagrouted keeps in place on one host. Empty means: own nothing."""

    routes: frozenset[Route] = frozenset()
    rules: frozenset[PolicyRule] = frozenset()
    sysctls: tuple[Sysctl, ...] = ()
    firewall: FirewallIntent = field(default_factory=FirewallIntent)
    udp_endpoints: frozenset[ConntrackFlush] = frozenset()
    # Which tables/families we consider ours to sweep: table T (all routes) and the policy
    # rules pointing at it, per family.
    table: int = 42
    priority: int = 1042
    notes: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class LinkFacts:
    """What the compiler needs to know about one present link."""

    name: str
    index: int
    up: bool = True
    accept_ra: int | None = None  # net.ipv6.conf.<if>.accept_ra, None when IPv6 is off there


@dataclass(frozen=True)
class HostFacts:
    """Observed facts the desired state depends on: links present, rp_filter `all`, and the
    devices of the main table's IPv6 default routes (read only when IPv6 forwarding is wanted)."""

    links: tuple[LinkFacts, ...] = ()
    rp_filter_all: int = 0
    ipv6_default_devs: tuple[str, ...] = ()

    def link(self, name: str) -> LinkFacts | None:
        for link in self.links:
            if link.name == name:
                return link
        return None


# What a change record can be about (TAGROUTED_OBJECT): routing and sysctls; the
# iptables-legacy backend's chains and jumps; the nftables backend's table, chains, sets and maps,
# their elements and its named counters.
CHANGE_OBJECTS = ("route", "rule", "sysctl", "chain", "jump", "table", "set", "element", "counter")


@dataclass(frozen=True)
class Change:
    """One change made (or to make) to the kernel, as logged: one record per change."""

    action: Literal["added", "removed", "replaced", "set"]
    object: str  # one of CHANGE_OBJECTS
    message: str


@dataclass(frozen=True)
class KernelTable:
    """What we own in one iptables table of one family, as read from the kernel.

    `chains`: each TAGROUTED-* chain present, with its rules in canonical form.
    `jumps`: for each built-in chain, the positions (0-based) of rules that jump to our
    chain for it; the desired shape is exactly one, at position 0."""

    family: Family
    table: str
    chains: dict[str, tuple[FirewallRule, ...]] = field(default_factory=dict)
    jumps: dict[str, tuple[int, ...]] = field(default_factory=dict)
