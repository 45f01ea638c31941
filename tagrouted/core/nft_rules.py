"""The firewall intent rendered for the nftables backend: the one table `inet tagrouted`.

Pure: a function of the intent, no I/O. Services live in sets and maps (one lookup per packet
whatever their number), per-service counters are named counter objects reached through an
object map, so a reload that keeps a service keeps its counts. Each path (the single-path form's
`default` too) counts its requests and replies in two named counters its tagging rules end with.

Base chains and why their priorities (numbers as nft prints them; `mangle` is -150):
- `prerouting`  filter/prerouting  mangle + 10 (-140): the VPN client's DSCP stamp on what leaves
  the tunnel and its mark from the DSCP of LAN replies; after other tools' mangle chains, so a
  mark or DSCP rule of theirs cannot undo ours by load order (at equal priority the chain
  registered later runs first), and before the routing decision that reads the mark.
- `input`       filter/input       mangle + 10: the service host's connmark from the DSCP tag.
- `output`      route/output       mangle + 10: the service host restores our mark from the
  connmark; a `route` chain, so the kernel re-routes the reply when the mark changes.
- `postrouting` filter/postrouting mangle + 10: the service host's DSCP stamp and the VPN client's
  DSCP clear toward the tunnel, after other tools' mangle POSTROUTING (which may clear DSCP).
- `dstnat`      nat/prerouting     dstnat (-100): the gateway's DNAT map.
- `mss`         filter/forward     mangle + 10: TCP SYNs and SYN-ACKs into or out of a tunnel get
  their MSS clamped (`rt mtu`: the smaller of the route's MTU on and the one back to the sender),
  ahead of `forward`, whose established accept would end our part for a SYN-ACK.
- `forward`     filter/forward     filter (0): per-service counters, then the forward ACLs. An
  accept here ends only our chain; our drops are final whatever other tables say.

Per-service policy keeps the per-packet cost flat in the number of services: the allowed sources
are an interval part of the service sets' key (`ip saddr . ip daddr . meta l4proto . th dport`;
0.0.0.0/0 or ::/0 for everyone); what falls through for a restricted service is counted by a
named counter per service (`dropped_<name>`, through a map) and dropped. Rate limits: one rule per
distinct limit, its services in a set, a meter (a dynamic set the kernel fills, one bucket per
source and service, forgotten once idle long enough to have refilled) and `limited_<name>`
counters; `ct state new` only, after the established accept, so no open connection is cut.
Marks and connmarks are set, restored and matched within `mark_mask` only.

Every rule counts its packets (a `counter` before its verdict: `tagroutectl doctor` and the
demo show which of our rules traffic went through), and every rule and element carries a comment
with a digest of its own text: the backend compares those digests with what it reads back, never
rule text (which nft normalises differently from version to version).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from .state import Exposed, Family, FirewallIntent, RateLimit

TABLE_FAMILY = "inet"
TABLE_NAME = "tagrouted"
FULL_MASK = 0xFFFFFFFF
MANGLE_AFTER = -140   # NF_IP_PRI_MANGLE (-150) + 10
DSTNAT = -100
FILTER = 0
MAX_LABEL = 40        # a comment holds a label and a digest (userdata stays far below 256 bytes)

_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_IP = {4: "ip", 6: "ip6"}
_NFPROTO = {4: "ipv4", 6: "ipv6"}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class NftElement:
    """One set or map element: its key (and value) as nft reads them, and the service it is for."""

    key: str
    value: str | None = None
    label: str = ""

    @property
    def text(self) -> str:
        return self.key if self.value is None else f"{self.key} : {self.value}"

    @functools.cached_property
    def comment(self) -> str:  # cached: a diff compares thousands of them (bench_nftables)
        d = digest(self.text)
        return f"{self.label[:MAX_LABEL]} {d}" if self.label else d

    def command_text(self) -> str:
        """As `add element` takes it: the comment sits between key and value."""
        c = f'comment "{self.comment}"'
        return f"{self.key} {c}" if self.value is None else f"{self.key} {c} : {self.value}"


@dataclass(frozen=True)
class NftSet:
    """A named set (value None) or map."""

    name: str
    key: tuple[str, ...]
    value: tuple[str, ...] | None = None
    flags: tuple[str, ...] = ("interval",)
    elements: tuple[NftElement, ...] = ()
    # A meter: the kernel adds the elements (no comments), so only the declaration is ours to
    # compare, and a sync never flushes it.
    timeout: int | None = None   # seconds
    size: int | None = None

    @property
    def kind(self) -> str:
        return "set" if self.value is None else "map"

    @property
    def dynamic(self) -> bool:
        return "dynamic" in self.flags

    def declaration(self) -> str:
        typ = " . ".join(self.key)
        if self.value is not None:
            typ += " : " + " . ".join(self.value)
        flags = f" flags {', '.join(self.flags)};" if self.flags else ""
        timeout = f" timeout {self.timeout}s;" if self.timeout is not None else ""
        size = f" size {self.size};" if self.size is not None else ""
        return f"type {typ};{flags}{timeout}{size}"


@dataclass(frozen=True)
class NftRule:
    text: str

    @functools.cached_property
    def comment(self) -> str:
        return digest(self.text)

    def command_text(self) -> str:
        return f'{self.text} comment "{self.comment}"'


@dataclass(frozen=True)
class NftChain:
    """A base chain of ours (we make no regular chains)."""

    name: str
    type: str
    hook: str
    priority: int
    rules: tuple[NftRule, ...]
    policy: str = "accept"

    def declaration(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy};"


@dataclass(frozen=True)
class NftTable:
    """Everything of ours in `inet tagrouted`; empty means no table at all."""

    counters: tuple[str, ...] = ()
    sets: tuple[NftSet, ...] = ()
    chains: tuple[NftChain, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.counters or self.sets or self.chains)

    def set(self, name: str) -> NftSet | None:
        return next((s for s in self.sets if s.name == name), None)


def counter_name(service: str) -> str:
    """The named counter of a service (service names are letters, digits, '_', '.', '-')."""
    return f"svc_{service}"


PATH_COUNTS = ("requests", "replies")


def path_counter_name(path: str, what: str) -> str:
    """The named counter of a path's `requests` (tagged on the way in) or `replies` (sent back
    through it); path names are letters, digits, '_', '.', '-'."""
    return f"path_{path}_{what}"


def dropped_counter(service: str) -> str:
    """What its allow_from dropped."""
    return f"dropped_{service}"


def limited_counter(service: str) -> str:
    """What its rate_limit dropped."""
    return f"limited_{service}"


METER_SIZE = 65536   # sources x services one meter remembers at once
_MATCH = {4: "ip saddr . ip daddr . meta l4proto . th dport",
          6: "ip6 saddr . ip6 daddr . meta l4proto . th dport"}
_HOME = {4: "ip daddr . meta l4proto . th dport", 6: "ip6 daddr . meta l4proto . th dport"}
SYN = "tcp flags & (syn | rst) == syn"   # SYN and SYN-ACK: the MSS each side announces


def _limit_name(family: Family, rl: RateLimit) -> str:
    return f"{rl.rate}_{rl.unit}_{rl.burst}_{family}"


def _ports(span: tuple[int, int]) -> str:
    return str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"


def _endpoint_key(address: str, e: Exposed, public: bool) -> str:
    return f"{address} . {e.proto} . {_ports(e.port if public else e.home_port)}"


def _counted(text: str) -> str:
    """The rule with a counter: before its verdict (or dnat, also terminal), or after its last
    statement."""
    if text.startswith("counter ") or "counter name " in text:
        return text  # a named counter already counts
    head, dnat, tail = text.partition(" dnat ")
    if dnat:
        return f"{head} counter dnat {tail}"
    for verdict in (" accept", " drop"):
        if text.endswith(verdict):
            return f"{text[:-len(verdict)]} counter{verdict}"
    return f"{text} counter"


def _mark_set(expr: str, mark: int, mask: int) -> str:
    """`meta mark set ...` / `ct mark set ...` writing our bits only."""
    if mask == FULL_MASK:
        return f"{expr} set {mark:#x}"
    return f"{expr} set {expr} and {FULL_MASK & ~mask:#010x} or {mark:#x}"


def _mark_is(expr: str, mark: int, mask: int) -> str:
    return f"{expr} {mark:#x}" if mask == FULL_MASK else f"{expr} and {mask:#x} == {mark:#x}"


class _Builder:
    def __init__(self) -> None:
        self.counters: dict[str, None] = {}
        self.sets: dict[str, NftSet] = {}
        self.elements: dict[str, dict[NftElement, None]] = {}
        self.keys: dict[str, set[str]] = {}
        self.chain_rules: dict[str, dict[str, None]] = {}

    def rule(self, chain: str, text: str) -> None:
        self.chain_rules.setdefault(chain, {}).setdefault(_counted(text), None)

    def path_count(self, path: str, what: str) -> str:
        """` counter name "path_P_what"` to end a rule with (nothing for an unnamed path)."""
        if not path:
            return ""
        name = path_counter_name(path, what)
        self.counters.setdefault(name, None)
        return f' counter name "{name}"'

    def element(self, spec: NftSet, element: NftElement) -> None:
        self.sets.setdefault(spec.name, spec)
        keys = self.keys.setdefault(spec.name, set())
        # One key is one element: the first service to claim a key keeps it (two services
        # forwarded to one home address and port share the home side, e.g. 443 and 8443 -> 443).
        if element.key not in keys:
            keys.add(element.key)
            self.elements.setdefault(spec.name, {})[element] = None


_CHAINS = (  # name, type, hook, priority, in this order in the table
    ("prerouting", "filter", "prerouting", MANGLE_AFTER),
    ("input", "filter", "input", MANGLE_AFTER),
    ("output", "route", "output", MANGLE_AFTER),
    ("postrouting", "filter", "postrouting", MANGLE_AFTER),
    ("mss", "filter", "forward", MANGLE_AFTER),
    ("dstnat", "nat", "prerouting", DSTNAT),
    ("forward", "filter", "forward", FILTER),
)


@functools.lru_cache(maxsize=4)
def nft_table(intent: FirewallIntent) -> NftTable:
    """The whole table the intent needs (every object only when something uses it). Pure, so
    cached: the daemon renders the same intent on every firewall pass (12 ms at 1000 services)."""
    b = _Builder()
    mask = intent.mark_mask
    counted: dict[Family, list[tuple[str, Exposed]]] = {4: [], 6: []}

    # Each path counts its requests (tagged on the way in) and its replies (sent back through
    # it) in named counters at the end of its tagging rules; on a vpn-client + service host the
    # requests are counted where they leave the tunnel only.
    stamped = {t.path for t in intent.tunnel_tags}
    for t in intent.tunnel_tags:
        ip = _IP[t.family]
        b.rule("prerouting", f'iifname "{t.tunnel}" {ip} dscp set {t.dscp}{b.path_count(t.path, "requests")}')
        b.rule("prerouting", f'iifname "{t.lan}" {ip} dscp {t.dscp} {_mark_set("meta mark", t.mark, mask)}'
                             f'{b.path_count(t.path, "replies")}')
        b.rule("postrouting", f'oifname "{t.tunnel}" {ip} dscp set 0')
    for r in intent.reply_tags:
        ip = _IP[r.family]
        requests = "" if r.path in stamped else b.path_count(r.path, "requests")
        b.rule("input", f"{ip} dscp {r.dscp} {_mark_set('ct mark', r.mark, mask)}{requests}")
        # Restore only our bits: other tools' connmarks stay theirs.
        b.rule("output", f"{_mark_is('ct mark', r.mark, mask)} {_mark_set('meta mark', r.mark, mask)}"
                         f"{b.path_count(r.path, 'replies')}")
        if r.stamp_dscp:
            b.rule("postrouting", f"{_mark_is('meta mark', r.mark, mask)} {ip} dscp set {r.dscp}")

    # One chain serves both families: every accept comes before every drop, so a family-neutral
    # drop (`iifname tun0 oifname eth0 drop`) never shadows the other family's accepts.
    limits: list[str] = []
    accepts: list[str] = []
    drops: list[str] = []
    for gw in intent.gateways:
        f, ip, pub = gw.family, _IP[gw.family], gw.public_interface
        addr = _ADDR_TYPE[f]
        dnat = NftSet(f"dnat{f}", (addr, "inet_proto", "inet_service"), (addr,))
        dnat_port = NftSet(f"dnat{f}_port", (addr, "inet_proto", "inet_service"), (addr, "inet_service"))
        allow = NftSet(f"gw_allow{f}", (addr, addr, "inet_proto", "inet_service"))
        for e in gw.exposed:
            for public in gw.publics:
                key = _endpoint_key(public, e, public=True)
                if e.to_port is None:
                    b.element(dnat, NftElement(key, e.address, e.name))
                else:
                    b.element(dnat_port, NftElement(key, f"{e.address} . {e.to_port}", e.name))
            if e.tagged:
                counted[f].append((_endpoint_key(e.address, e, public=False), e))
            _allow_elements(b, allow, e)
            if e.rate_limit is not None:
                cls = _limit_name(f, e.rate_limit)
                _allow_elements(b, NftSet(f"limit_{cls}", allow.key), e)
                b.element(_policy_map(f, "limited"), NftElement(
                    _endpoint_key(e.address, e, public=False), f'"{limited_counter(e.name)}"', e.name))
                b.counters.setdefault(limited_counter(e.name), None)
            if e.restricted:
                _dropped_element(b, f, e)
        for rl in sorted({e.rate_limit for e in gw.exposed if e.rate_limit is not None}):
            cls = _limit_name(f, rl)
            b.sets.setdefault(f"meter_{cls}", NftSet(
                f"meter_{cls}", allow.key, flags=("dynamic", "timeout"), timeout=rl.refill_seconds,
                size=METER_SIZE))
            limits.append(
                f'ct state new iifname "{pub}" {_MATCH[f]} @limit_{cls} update @meter_{cls} '
                f"{{ {_MATCH[f]} limit rate over {rl.rate}/{rl.unit} burst {rl.burst} packets }} "
                f"counter name {_HOME[f]} map @svc_limited{f} drop")
        if dnat.name in b.sets:
            b.rule("dstnat", f'iifname "{pub}" dnat {ip} to {ip} daddr . meta l4proto . th dport '
                             f"map @{dnat.name}")
        if dnat_port.name in b.sets:
            b.rule("dstnat", f'iifname "{pub}" meta l4proto {{ tcp, udp }} '
                             f"dnat {ip} to {ip} daddr . meta l4proto . th dport map @{dnat_port.name}")
        if allow.name in b.sets:
            accepts.append(f'iifname "{pub}" {_MATCH[f]} @{allow.name} accept')
        if any(e.restricted for e in gw.exposed):
            drops.append(f'iifname "{pub}" counter name {_HOME[f]} map @svc_dropped{f} drop')
        home = NftSet(f"gw_home{f}", (addr,))
        for net in gw.home_networks:
            b.element(home, NftElement(net, label="home"))
        for host in gw.outside_hosts:
            b.element(home, NftElement(host.split("/")[0], label="forward"))
        if home.name in b.sets:
            drops.append(f'iifname "{pub}" {ip} daddr @{home.name} drop')
        if gw.via_tunnel:
            drops.append(f'iifname "{pub}" oifname "{gw.via_tunnel}" drop')
    passage_families: dict[tuple[str, str], set[Family]] = {}
    for p in intent.passages:
        passage_families.setdefault((p.in_interface, p.out_interface), set()).add(p.family)
    for (i, o), fams in passage_families.items():
        only = "" if fams == {4, 6} else f"meta nfproto {_NFPROTO[min(fams)]} "
        accepts.append(f'{only}iifname "{i}" oifname "{o}" accept')
    for a in intent.admissions:
        f, addr = a.family, _ADDR_TYPE[a.family]
        admit = NftSet(f"admit{f}", (addr, addr, "inet_proto", "inet_service"))
        for e in a.exposed:
            key = _endpoint_key(e.address, e, public=False)
            _allow_elements(b, admit, e)
            if not intent.gateways:
                counted[f].append((key, e))
            if e.restricted:
                _dropped_element(b, f, e)
        if admit.name in b.sets:
            accepts.append(f'iifname "{a.tunnel}" oifname "{a.lan}" {_MATCH[f]} @{admit.name} accept')
        if any(e.restricted for e in a.exposed):
            drops.append(f'iifname "{a.tunnel}" oifname "{a.lan}" counter name {_HOME[f]} '
                         f"map @svc_dropped{f} drop")
        drops.append(f'iifname "{a.tunnel}" oifname "{a.lan}" drop')

    clamp_families: dict[tuple[str, int | None], set[Family]] = {}
    for m in intent.mss_clamps:
        clamp_families.setdefault((m.interface, m.mss), set()).add(m.family)
    for (interface, mss), fams in clamp_families.items():
        only = "" if fams == {4, 6} else f"meta nfproto {_NFPROTO[min(fams)]} "
        value = "rt mtu" if mss is None else str(mss)
        for side in ("oifname", "iifname"):
            b.rule("mss", f'{only}{side} "{interface}" {SYN} tcp option maxseg size set {value}')

    # Counted first, so every forwarded packet of a service's connections counts, both ways, by
    # its home endpoint (after the gateway's DNAT, before the reverse NAT of replies).
    for f in (4, 6):
        if not counted[f]:
            continue
        ip, addr = _IP[f], _ADDR_TYPE[f]
        cmap = NftSet(f"svc_counters{f}", (addr, "inet_proto", "inet_service"), ("counter",))
        for key, e in counted[f]:
            name = counter_name(e.name)
            b.counters.setdefault(name, None)
            b.element(cmap, NftElement(key, f'"{name}"', e.name))
        b.rule("forward", f"counter name {ip} daddr . meta l4proto . th dport map @{cmap.name}")
        b.rule("forward", f"counter name {ip} saddr . meta l4proto . th sport map @{cmap.name}")
    if intent.gateways or intent.admissions:
        b.rule("forward", "ct state established,related accept")
    for text in (*limits, *accepts, *drops):
        b.rule("forward", text)

    chains = tuple(
        NftChain(name, typ, hook, prio, tuple(NftRule(t) for t in b.chain_rules[name]))
        for name, typ, hook, prio in _CHAINS if b.chain_rules.get(name))
    sets = tuple(
        NftSet(s.name, s.key, s.value, s.flags, tuple(b.elements.get(s.name, {})), s.timeout, s.size)
        for s in b.sets.values())
    return NftTable(counters=tuple(b.counters), sets=sets, chains=chains)


def _allow_elements(b: _Builder, spec: NftSet, e: Exposed) -> None:
    home = _endpoint_key(e.address, e, public=False)
    for source in e.sources:
        b.element(spec, NftElement(f"{source} . {home}", label=e.name))


def _policy_map(family: Family, kind: str) -> NftSet:
    addr = _ADDR_TYPE[family]
    return NftSet(f"svc_{kind}{family}", (addr, "inet_proto", "inet_service"), ("counter",))


def _dropped_element(b: _Builder, family: Family, e: Exposed) -> None:
    b.element(_policy_map(family, "dropped"), NftElement(
        _endpoint_key(e.address, e, public=False), f'"{dropped_counter(e.name)}"', e.name))
    b.counters.setdefault(dropped_counter(e.name), None)


@dataclass
class Script:
    """An nft script of `add`/`flush`/`delete` commands, applied as one transaction."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


WHERE = f"{TABLE_FAMILY} {TABLE_NAME}"


def add_set(script: Script, s: NftSet) -> None:
    script.add(f"add {s.kind} {WHERE} {s.name} {{ {s.declaration()} }}")
    add_elements(script, s, s.elements)


def add_elements(script: Script, s: NftSet, elements: tuple[NftElement, ...] | list[NftElement]) -> None:
    # A few hundred elements per command keeps each line (and its error, if any) readable.
    chunk = 256
    for i in range(0, len(elements), chunk):
        body = ", ".join(e.command_text() for e in elements[i:i + chunk])
        script.add(f"add element {WHERE} {s.name} {{ {body} }}")


def add_chain(script: Script, c: NftChain) -> None:
    script.add(f"add chain {WHERE} {c.name} {{ {c.declaration()} }}")
    add_rules(script, c)


def add_rules(script: Script, c: NftChain) -> None:
    for r in c.rules:
        script.add(f"add rule {WHERE} {c.name} {r.command_text()}")


def creation_script(table: NftTable) -> Script:
    """Every command that builds `table` from nothing."""
    script = Script()
    if table.empty:
        return script
    script.add(f"add table {WHERE}")
    for name in table.counters:
        script.add(f"add counter {WHERE} {name}")
    for s in table.sets:
        add_set(script, s)
    for c in table.chains:
        add_chain(script, c)
    return script


def table_lines(table: NftTable) -> list[str]:
    """The table as `nft list` shows it (what `plan` prints), indented with spaces: readable, and
    loadable by nft -f."""
    if table.empty:
        return []
    out = [f"table {WHERE} {{"]
    for name in table.counters:
        out.append(f"  counter {name} {{ }}")
    for s in table.sets:
        out.append(f"  {s.kind} {s.name} {{ {s.declaration()}")
        if s.elements:
            out.append("    elements = {")
            out += [f"      {e.command_text()}," for e in s.elements]
            out.append("    }")
        out.append("  }")
    for c in table.chains:
        out.append(f"  chain {c.name} {{")
        out.append(f"    {c.declaration()}")
        out += [f"    {r.command_text()}" for r in c.rules]
        out.append("  }")
    out.append("}")
    return out
