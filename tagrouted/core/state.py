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
    chains: tuple[OwnedChain, ...] = ()
    udp_endpoints: frozenset[ConntrackFlush] = frozenset()
    # Which tables/families we consider ours to sweep: table T (all routes) and the policy
    # rules pointing at it, per family.
    table: int = 42
    priority: int = 1042
    notes: tuple[str, ...] = field(default=(), compare=False)

    def chains_of(self, family: Family, table: str) -> tuple[OwnedChain, ...]:
        return tuple(c for c in self.chains if c.family == family and c.table == table)


@dataclass(frozen=True)
class LinkFacts:
    """What the compiler needs to know about one present link."""

    name: str
    index: int
    up: bool = True
    accept_ra: int | None = None  # net.ipv6.conf.<if>.accept_ra, None when IPv6 is off there


@dataclass(frozen=True)
class HostFacts:
    """Observed facts the desired state depends on: links present, rp_filter `all`."""

    links: tuple[LinkFacts, ...] = ()
    rp_filter_all: int = 0

    def link(self, name: str) -> LinkFacts | None:
        for link in self.links:
            if link.name == name:
                return link
        return None


@dataclass(frozen=True)
class Change:
    """One change made (or to make) to the kernel, as logged: one record per change."""

    action: Literal["added", "removed", "replaced", "set"]
    object: Literal["route", "rule", "sysctl", "chain", "jump"]
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
