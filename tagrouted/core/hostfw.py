"""The host's own firewall, judged against our traffic: what blocks or re-marks it, and the
accepts tagrouted keeps in the host's iptables-style FORWARD chains (issue 11).

Pure: no I/O. The kernel side (kernel/hostfw.py) reads the whole ruleset (nft JSON, iptables-nft
and legacy tables as iptables-save text) into a `Ruleset` with the parsers below, and writes
the accepts `hostfw_rules` renders; this module decides.

Why it exists: in netfilter an `accept` ends only its own chain, a drop in any base chain on
the hook is final. Our accepts in `inet tagrouted` (or our legacy chains) never get a packet
past another tool's drop: Docker's `iptables -P FORWARD DROP`, ufw's forward policy, a
firewalld or nftables.conf `policy drop` forward chain. Nor does our mark or DSCP survive a rule
that runs after ours and sets it again.

Our traffic (`our_flows`), per role and family, on the forward hook:
- gateway: each service and forward, after DNAT: in from public_interface to its home address
  and port (ct state new, ct status dnat), and its replies (established, dnat);
- vpn-server: tunnel <-> uplink (new one way, established back);
- vpn-client: each admitted service, tunnel -> LAN (new), and its replies (established).
Tags (`tag_points`): the service host's ct mark (any hook), its reply mark (output) and DSCP
stamp (postrouting or, on the legacy backend, output); the VPN client's DSCP stamp on what comes
out of the tunnel and its mark on the LAN's tagged replies.

Judgement (`judge`): every base chain at the flow's hook of every table but ours is walked rule
by rule, following jumps and gotos, with each match expression evaluated against the flow:
True, False, or None ("may match") for anything not understood. A rule whose every condition
holds decides; a rule that may match can only make what follows uncertain. A drop that surely
applies is a "fail" conflict; one that may apply is a "warn" (never fail, never ok). Setters of
mark / ct mark / DSCP count when they run after ours (a higher priority number at the hook; an
equal one is order of registration: warn), except a mark change that keeps every bit of
mark_mask. A ct mark write anywhere counts: the connmark outlives the packet.

Traps:
- iptables-nft's tables are nft tables whose matches are `xt` blobs in JSON (conntrack, MARK,
  comment): read them through iptables-nft-save instead (`is_iptables_nft`).
- Our own accepts (chain TAGROUTED-HOSTFW, and the legacy backend's TAGROUTED-FORWARD) are ours:
  the sync checks their content, the judge takes them as accepting our forward flows.
"""

from __future__ import annotations

import functools
import ipaddress
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .nft_rules import MANGLE_AFTER, TABLE_FAMILY, TABLE_NAME, digest
from .state import CHAIN_PREFIX, Exposed, Family, FirewallIntent, FirewallRule, Match

HOSTFW_CHAIN = CHAIN_PREFIX + "HOSTFW"
HOSTFW_COMMENT = "tagrouted"   # the jump's comment, like our other jumps
DOCKER_USER = "DOCKER-USER"
FULL = 0xFFFFFFFF
IPTABLES_TABLES = ("filter", "mangle", "nat", "raw", "security")
LEGACY_PRIORITY = {"raw": -300, "mangle": -150, "nat": -100, "filter": 0, "security": 50}
LEGACY_HOOKS = {"PREROUTING": "prerouting", "INPUT": "input", "FORWARD": "forward",
                "OUTPUT": "output", "POSTROUTING": "postrouting"}
NAT_PRIORITY = {"PREROUTING": -100, "OUTPUT": -100, "INPUT": 100, "POSTROUTING": 100}
MAX_DEPTH = 16
Severity = Literal["fail", "warn"]
Source = Literal["nft", "iptables-nft", "legacy"]
Tri = bool | None  # True: holds, False: does not, None: may (not understood)


# ---- our traffic -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Flow:
    """Packets of ours at one hook; None in a field: any value (not known here)."""

    what: str
    family: Family
    hook: str = "forward"
    iif: str | None = None
    oif: str | None = None
    saddr: str | None = None
    daddr: str | None = None
    proto: str | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None
    ct_state: str | None = None        # new | established
    dnat: bool | None = None
    mark: int | None = None            # our bits of the packet mark, when the packet carries it
    ctmark: int | None = None
    dscp: int | None = None
    mask: int = 0xFF


def _ports(span: tuple[int, int]) -> str:
    return str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"


def _endpoint(e: Exposed) -> str:
    return f"{e.name} ({e.proto} {e.address} port {_ports(e.home_port)})"


@functools.lru_cache(maxsize=4)  # judged and placed on every host-firewall pass
def our_flows(intent: FirewallIntent) -> tuple[Flow, ...]:
    """Everything this host forwards for us, in both directions."""
    out: list[Flow] = []
    for gw in intent.gateways:
        for e in gw.exposed:
            out.append(Flow(f"new connections to {_endpoint(e)}", gw.family, iif=gw.public_interface,
                            daddr=e.address, proto=e.proto, dport=e.home_port, ct_state="new", dnat=True))
            out.append(Flow(f"replies of {_endpoint(e)}", gw.family, oif=gw.public_interface,
                            saddr=e.address, proto=e.proto, sport=e.home_port, ct_state="established",
                            dnat=True))
    # The VPN server's passages come as (tunnel, uplink) then (uplink, tunnel): connections start
    # on the uplink side (the gateway's DNAT) and their replies come out of the tunnel; a VPS
    # keeps only (tunnel, uplink), the replies.
    pairs = {(p.family, p.in_interface, p.out_interface) for p in intent.passages}
    for p in intent.passages:
        reverse = (p.family, p.out_interface, p.in_interface) in pairs
        first = reverse and intent.passages.index(p) < next(
            i for i, q in enumerate(intent.passages)
            if (q.family, q.in_interface, q.out_interface) == (p.family, p.out_interface, p.in_interface))
        state = "established" if first or not reverse else "new"
        out.append(Flow(f"forwarding {p.in_interface} -> {p.out_interface}", p.family,
                        iif=p.in_interface, oif=p.out_interface, ct_state=state))
    for a in intent.admissions:
        for e in a.exposed:
            out.append(Flow(f"new connections to {_endpoint(e)} from {a.tunnel}", a.family, iif=a.tunnel,
                            oif=a.lan, daddr=e.address, proto=e.proto, dport=e.home_port, ct_state="new"))
            out.append(Flow(f"replies of {_endpoint(e)} into {a.tunnel}", a.family, iif=a.lan, oif=a.tunnel,
                            saddr=e.address, proto=e.proto, sport=e.home_port, ct_state="established"))
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class TagPoint:
    """Where our tag must survive: a setter of `field` on `flow` after `priority` at flow.hook
    (None: at any priority) undoes ours."""

    field: str            # mark | ct mark | dscp
    flow: Flow
    priority: int | None
    exempt_nft: str       # the match that exempts our packets, in nft syntax
    exempt_ipt: str       # ... and as iptables options


def tag_points(intent: FirewallIntent, backend: str) -> tuple[TagPoint, ...]:
    """Where a later rule could undo our mark, connmark or DSCP; `backend` decides where ours run
    (nftables: mangle + 10; iptables-legacy: mangle, first in the built-in chain)."""
    legacy = backend == "iptables-legacy"
    ours = LEGACY_PRIORITY["mangle"] if legacy else MANGLE_AFTER
    mask = intent.mark_mask
    out: list[TagPoint] = []
    for r in intent.reply_tags:
        f = r.family
        mark_nft = f"meta mark and {mask:#x} == {r.mark:#x}"
        mark_ipt = f"-m mark --mark {r.mark:#x}/{mask:#x}"
        what = "tagged replies"
        for hook in ("prerouting", "input", "output", "postrouting", "forward"):
            out.append(TagPoint("ct mark", Flow(f"the connmark of {what}", f, hook, ctmark=r.mark, mask=mask),
                                None, f"ct mark and {mask:#x} == {r.mark:#x}",
                                f"-m connmark --mark {r.mark:#x}/{mask:#x}"))
        out.append(TagPoint("mark", Flow(f"the mark of {what}", f, "output", ct_state="established",
                                         mark=r.mark, ctmark=r.mark, mask=mask), ours, mark_nft, mark_ipt))
        if r.stamp_dscp:
            flow = Flow(f"the DSCP {r.dscp} of {what}", f, "postrouting", ct_state="established",
                        mark=r.mark, ctmark=r.mark, dscp=r.dscp, mask=mask)
            if legacy:  # the legacy backend stamps in mangle OUTPUT: all of postrouting is after
                out.append(TagPoint("dscp", replace(flow, hook="output"), ours, mark_nft, mark_ipt))
                out.append(TagPoint("dscp", flow, None, mark_nft, mark_ipt))
            else:
                out.append(TagPoint("dscp", flow, ours, mark_nft, mark_ipt))
    for t in intent.tunnel_tags:
        f, ip = t.family, "ip" if t.family == 4 else "ip6"
        dscp_nft, dscp_ipt = f"{ip} dscp {t.dscp}", f"-m dscp --dscp {t.dscp:#x}"
        what = f"DSCP {t.dscp} on what comes out of {t.tunnel}"
        out.append(TagPoint("dscp", Flow(f"the {what}", f, "prerouting", iif=t.tunnel, dscp=t.dscp,
                                         mask=mask),
                            ours, dscp_nft, dscp_ipt))
        for hook in ("forward", "postrouting"):
            out.append(TagPoint("dscp", Flow(f"the {what}", f, hook, iif=t.tunnel, oif=t.lan, dscp=t.dscp,
                                             mask=mask), None, dscp_nft, dscp_ipt))
        out.append(TagPoint("mark", Flow(f"the mark of tagged replies from {t.lan}", f, "prerouting",
                                         iif=t.lan, dscp=t.dscp, mark=t.mark, mask=mask), ours,
                            f'iifname "{t.lan}" {dscp_nft}', f"-i {t.lan} {dscp_ipt}"))
    return tuple(dict.fromkeys(out))


# ---- the host's ruleset ----------------------------------------------------------------------

@dataclass(frozen=True)
class Cond:
    """One condition of a rule: `key` compared with `values` (any of them), or negated."""

    key: str           # iifname oifname saddr daddr l4proto sport dport ctstate ctstatus nfproto
    values: tuple[str, ...]  # mark ctmark dscp
    negate: bool = False
    mask: int = FULL   # mark / ctmark: the bits compared


@dataclass(frozen=True)
class Setter:
    field: str         # mark | ct mark | dscp
    changed: int = FULL  # the bits it may change (mark, ct mark)
    value: int | None = None  # dscp: the value set, when known


@dataclass(frozen=True)
class ForeignRule:
    ref: str                           # "handle 7" or "rule 3"
    text: str
    conds: tuple[Cond, ...] = ()
    unknown: tuple[str, ...] = ()      # conditions not understood: the rule may match
    verdict: str | None = None         # accept drop reject return jump goto vmap unknown
    target: str | None = None
    vmap: tuple[tuple[Cond, str, str | None], ...] = ()  # (condition, verdict, target)
    sets: tuple[Setter, ...] = ()


@dataclass(frozen=True)
class ForeignChain:
    source: Source
    family: str          # nft: ip ip6 inet bridge ...; iptables: ip ip6
    table: str
    name: str
    rules: tuple[ForeignRule, ...]
    hook: str | None = None
    priority: int | None = None
    policy: str | None = None
    type: str | None = None

    @property
    def base(self) -> bool:
        return self.hook is not None

    @property
    def where(self) -> str:
        if self.source == "nft":
            return f"table {self.family} {self.table} chain {self.name}"
        cmd = {"iptables-nft": "iptables-nft", "legacy": "iptables-legacy"}[self.source]
        if self.family == "ip6":
            cmd = "ip6" + cmd[2:]
        return f"{cmd} -t {self.table} chain {self.name}"


@dataclass(frozen=True)
class Ruleset:
    chains: tuple[ForeignChain, ...] = ()
    complete: bool = True   # False: part could not be read (said in `problems`)
    problems: tuple[str, ...] = ()

    def chain(self, like: ForeignChain, name: str) -> ForeignChain | None:
        for c in self.chains:
            if (c.source, c.family, c.table, c.name) == (like.source, like.family, like.table, name):
                return c
        return None

    def base_chains(self) -> Iterator[ForeignChain]:
        return (c for c in self.chains if c.base)


def is_iptables_nft(family: str, table: str, chains: Iterable[str]) -> bool:
    """An nft table iptables-nft made: ip/ip6, an iptables table name, built-in chain names."""
    return (family in ("ip", "ip6") and table in IPTABLES_TABLES
            and any(c in LEGACY_HOOKS for c in chains))


# ---- nft JSON -> rules -----------------------------------------------------------------------

def _nft_value(v: Any, sets: dict[str, tuple[str, ...] | None]) -> tuple[str, ...] | None:
    """A match's right-hand side as strings; None: not understood."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, str)):
        if isinstance(v, str) and v.startswith("@"):
            return sets.get(v[1:])
        return (str(v),)
    if isinstance(v, dict):
        if "prefix" in v and isinstance(v["prefix"], dict):
            return (f"{v['prefix'].get('addr')}/{v['prefix'].get('len')}",)
        if "range" in v and isinstance(v["range"], list) and len(v["range"]) == 2:
            a, b = v["range"]
            return (f"{a}-{b}",)
        if "set" in v:
            return _nft_values(v["set"] if isinstance(v["set"], list) else [v["set"]], sets)
        if "elem" in v and isinstance(v["elem"], dict):
            return _nft_value(v["elem"].get("val"), sets)
    if isinstance(v, list):
        return _nft_values(v, sets)
    return None


def _nft_values(items: list[Any], sets: dict[str, tuple[str, ...] | None]) -> tuple[str, ...] | None:
    out: list[str] = []
    for item in items:
        got = _nft_value(item, sets)
        if got is None:
            return None
        out += got
    return tuple(out)


def _nft_left(left: Any) -> tuple[str | None, int, str | None]:
    """(key, mask, implied l4proto) of a match's left side; key None: not understood."""
    mask = FULL
    if isinstance(left, dict) and "&" in left and isinstance(left["&"], list) and len(left["&"]) == 2 \
            and isinstance(left["&"][1], int):
        mask = left["&"][1]
        left = left["&"][0]
    if not isinstance(left, dict):
        return None, mask, None
    if "meta" in left and isinstance(left["meta"], dict):
        key = left["meta"].get("key")
        return ({"iifname": "iifname", "oifname": "oifname", "l4proto": "l4proto", "nfproto": "nfproto",
                 "mark": "mark", "protocol": None}.get(key), mask, None)
    if "payload" in left and isinstance(left["payload"], dict):
        proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
        if proto in ("ip", "ip6") and fld in ("saddr", "daddr", "dscp"):
            return fld, mask, "ipv4" if proto == "ip" else "ipv6"
        if proto in ("tcp", "udp", "th", "sctp", "dccp", "udplite") and fld in ("sport", "dport"):
            return fld, mask, (proto if proto in ("tcp", "udp") else None)
        return None, mask, None
    if "ct" in left and isinstance(left["ct"], dict) and "dir" not in left["ct"]:
        key = left["ct"].get("key")
        return {"state": "ctstate", "status": "ctstatus", "mark": "ctmark"}.get(key), mask, None
    return None, mask, None


def _changed_bits(value: Any, self_key: dict[str, Any]) -> int:
    """The bits of a mark a `mangle` statement may change (FULL when not understood)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return FULL
    if value == self_key:
        return 0
    if isinstance(value, dict):
        for op in ("|", "^", "&"):
            args = value.get(op)
            if isinstance(args, list) and len(args) == 2 and isinstance(args[1], int):
                inner = _changed_bits(args[0], self_key)
                return inner | (args[1] if op != "&" else (~args[1] & FULL))
    return FULL


_DSCP_NAMES = {"cs0": 0, "be": 0, "cs1": 8, "cs2": 16, "cs3": 24, "cs4": 32, "cs5": 40, "cs6": 48,
               "cs7": 56, "ef": 46, **{f"af{a}{b}": 8 * a + 2 * b for a in range(1, 5) for b in range(1, 4)}}


def _dscp_number(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        if v in _DSCP_NAMES:
            return _DSCP_NAMES[v]
        try:
            return int(v, 0)
        except ValueError:
            return None
    return None


def parse_nft_rule(ref: str, text: str, exprs: Any, sets: dict[str, tuple[str, ...] | None]) -> ForeignRule:
    conds: list[Cond] = []
    unknown: list[str] = []
    setters: list[Setter] = []
    verdict: str | None = None
    target: str | None = None
    vmap: list[tuple[Cond, str, str | None]] = []
    for ex in exprs if isinstance(exprs, list) else []:
        if not isinstance(ex, dict) or len(ex) != 1:
            unknown.append("?")
            continue
        (kind, body), = ex.items()
        if kind == "match" and isinstance(body, dict):
            key, mask, implied = _nft_left(body.get("left"))
            values = _nft_value(body.get("right"), sets)
            op = body.get("op", "==")
            if key is None or values is None or op not in ("==", "!=", "in"):
                unknown.append(json_hint(body))
                continue
            if implied in ("ipv4", "ipv6"):
                conds.append(Cond("nfproto", (implied,)))
            elif implied:
                conds.append(Cond("l4proto", (implied,)))
            conds.append(Cond(key, values, negate=op == "!=", mask=mask))
        elif kind in ("counter", "comment", "log", "notrack"):
            continue
        elif kind in ("accept", "drop", "return", "continue"):
            verdict = kind if kind != "continue" else None
        elif kind == "reject":
            verdict = "reject"
        elif kind in ("jump", "goto") and isinstance(body, dict):
            verdict, target = kind, str(body.get("target"))
        elif kind == "mangle" and isinstance(body, dict):
            key = body.get("key")
            if isinstance(key, dict) and key.get("meta", {}).get("key") == "mark":
                setters.append(Setter("mark", _changed_bits(body.get("value"), key)))
            elif isinstance(key, dict) and key.get("ct", {}).get("key") == "mark":
                setters.append(Setter("ct mark", _changed_bits(body.get("value"), key)))
            elif isinstance(key, dict) and key.get("payload", {}).get("field") == "dscp":
                setters.append(Setter("dscp", value=_dscp_number(body.get("value"))))
        elif kind == "vmap" and isinstance(body, dict):
            key, mask, implied = _nft_left(body.get("key"))
            data = body.get("data")
            elems = data.get("set") if isinstance(data, dict) else None
            if key is None or not isinstance(elems, list):
                verdict = "unknown"
                continue
            for pair in elems:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], dict) and pair[1]):
                    verdict = "unknown"
                    break
                values = _nft_value(pair[0], sets)
                (v, arg), = pair[1].items()
                if values is None:
                    vmap.append((Cond("?", ()), v, _target_of(arg)))
                    continue
                vmap.append((Cond(key, values, mask=mask), v, _target_of(arg)))
            else:
                verdict = "vmap"
        elif kind == "xt" and isinstance(body, dict):
            name = str(body.get("name"))
            if body.get("type") == "match":
                if name != "comment":
                    unknown.append(f"-m {name}")
            else:
                verdict, setters = _xt_target(name, verdict, setters)
        elif kind in ("limit", "quota", "meter", "set", "dynset", "queue", "synproxy", "flow"):
            if kind == "queue":
                verdict = "unknown"
            elif kind in ("limit", "quota", "meter"):
                unknown.append(kind)
        elif kind in ("snat", "dnat", "masquerade", "redirect", "tproxy", "dup", "fwd", "notrack",
                      "ct helper", "ct timeout", "ct expectation", "objref", "xt"):
            continue
        else:
            continue  # statements that neither match nor decide (e.g. `meta priority set`)
    return ForeignRule(ref, text, tuple(conds), tuple(unknown), verdict, target, tuple(vmap), tuple(setters))


def _target_of(arg: Any) -> str | None:
    return str(arg["target"]) if isinstance(arg, dict) and "target" in arg else None


def _xt_target(name: str, verdict: str | None, setters: list[Setter]) -> tuple[str | None, list[Setter]]:
    if name in ("DROP", "REJECT"):
        return "drop" if name == "DROP" else "reject", setters
    if name == "MARK":
        return verdict, [*setters, Setter("mark")]
    if name == "CONNMARK":
        return verdict, [*setters, Setter("ct mark")]
    if name in ("DSCP", "TOS"):
        return verdict, [*setters, Setter("dscp")]
    return verdict, setters


def json_hint(body: Any) -> str:
    left = body.get("left") if isinstance(body, dict) else None
    if isinstance(left, dict) and left:
        return next(iter(left))
    return "match"


def nft_sets(doc: Any) -> dict[tuple[str, str, str], tuple[str, ...] | None]:
    """(family, table, set) -> its elements as strings; None when they cannot be read."""
    out: dict[tuple[str, str, str], tuple[str, ...] | None] = {}
    for item in doc.get("nftables", []) if isinstance(doc, dict) else []:
        s = item.get("set") if isinstance(item, dict) else None
        if not isinstance(s, dict):
            continue
        key = (str(s.get("family")), str(s.get("table")), str(s.get("name")))
        typ = s.get("type")
        if not isinstance(typ, str) or " . " in typ or "dynamic" in (s.get("flags") or ()):
            out[key] = None
            continue
        out[key] = _nft_value(s.get("elem", []), {}) if s.get("elem") is not None else ()
    return out


def parse_nft(doc: Any, texts: dict[tuple[str, str, str, int], str] | None = None,
              skip: Iterable[tuple[str, str]] = ()) -> list[ForeignChain]:
    """Every chain of every table in `nft -j list ruleset`, but ours and the tables in `skip`
    ((family, name), e.g. the ones iptables-nft owns); `texts` maps (family, table, chain,
    handle) to the rule as nft prints it."""
    texts = texts or {}
    skipped = {(TABLE_FAMILY, TABLE_NAME), *skip}
    sets = nft_sets(doc)
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    for item in doc.get("nftables", []) if isinstance(doc, dict) else []:
        if not isinstance(item, dict):
            continue
        for kind, v in item.items():
            if not isinstance(v, dict) or kind not in ("chain", "rule"):
                continue
            fam, table = str(v.get("family")), str(v.get("table"))
            if (fam, table) in skipped:
                continue
            name = str(v.get("name") if kind == "chain" else v.get("chain"))
            c = chains.setdefault((fam, table, name), {"rules": []})
            if kind == "chain":
                c.update(hook=v.get("hook"), prio=v.get("prio"), policy=v.get("policy"), type=v.get("type"))
            else:
                handle = int(v.get("handle", 0))
                local = {s: e for (f, t, s), e in sets.items() if (f, t) == (fam, table)}
                text = texts.get((fam, table, name, handle), "")
                c["rules"].append(parse_nft_rule(f"handle {handle}", text, v.get("expr"), local))
    out = []
    for (fam, table, name), c in chains.items():
        prio = c.get("prio")
        out.append(ForeignChain("nft", fam, table, name, tuple(c["rules"]), c.get("hook"),
                                _priority(prio), c.get("policy"), c.get("type")))
    return out


_NAMED = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}


def _priority(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        parts = value.replace("+", " + ").replace("-", " - ").split()
        if parts and parts[0] in _NAMED:
            base = _NAMED[parts[0]]
            if len(parts) == 3 and parts[2].isdigit():
                return base + int(parts[2]) if parts[1] == "+" else base - int(parts[2])
            return base
        try:
            return int(value)
        except ValueError:
            return None
    return None


def nft_texts(listing: str) -> dict[tuple[str, str, str, int], str]:
    """(family, table, chain, handle) -> rule text, from `nft -a list ruleset`."""
    out: dict[tuple[str, str, str, int], str] = {}
    fam = table = chain = ""
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("table "):
            parts = line.split()
            if len(parts) >= 3:
                fam, table = parts[1], parts[2]
        elif line.startswith("chain "):
            chain = line.split()[1]
        elif "# handle " in line and chain and not line.startswith(("set ", "map ", "type ")):
            body, _, handle = line.rpartition("# handle ")
            if handle.strip().isdigit():
                out[(fam, table, chain, int(handle))] = body.strip()
    return out


# ---- iptables-save text -> rules ---------------------------------------------------------------

def parse_save(text: str, source: Source, family: str) -> list[ForeignChain]:
    """Chains of one family from iptables-save output (iptables-nft-save, or the legacy tables'
    rules decoded to save form); our own chains (TAGROUTED-*) are there, without their rules."""
    out: list[ForeignChain] = []
    table = ""
    policies: dict[str, str | None] = {}
    rules: dict[str, list[ForeignRule]] = {}

    def flush() -> None:
        for name, pol in policies.items():
            hook = LEGACY_HOOKS.get(name) if pol is not None else None
            prio = (NAT_PRIORITY.get(name, -100) if table == "nat" else LEGACY_PRIORITY.get(table, 0)) \
                if hook else None
            out.append(ForeignChain(source, family, table, name, tuple(rules.get(name, ())), hook, prio,
                                    pol.lower() if pol else None, "filter" if hook else None))

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table, policies, rules = line[1:], {}, {}
        elif line.startswith(":"):
            parts = line[1:].split()
            if parts:
                policies[parts[0]] = parts[1] if len(parts) > 1 and parts[1] != "-" else None
        elif line.startswith("-A "):
            if line.startswith("-A " + CHAIN_PREFIX):
                continue  # our own rules: the walk never enters them (3000 at 1000 services)
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            chain = words[1]
            n = len(rules.setdefault(chain, [])) + 1
            text_args = " ".join(shlex.quote(w) for w in words[2:])
            rules[chain].append(parse_save_rule(f"rule {n}", text_args, words[2:]))
        elif line == "COMMIT":
            flush()
            policies, rules = {}, {}
    return out


def _mark_value(text: str) -> tuple[int, int] | None:
    value, _, mask = text.partition("/")
    try:
        return int(value, 0), (int(mask, 0) if mask else FULL)
    except ValueError:
        return None


def parse_save_rule(ref: str, text: str, words: list[str]) -> ForeignRule:
    """One rule's iptables-save options: the options this judge understands become conditions,
    any other match option makes the rule `may match`."""
    conds: list[Cond] = []
    unknown: list[str] = []
    setters: list[Setter] = []
    verdict: str | None = None
    target: str | None = None
    negate = False
    module = ""
    i = 0
    simple = {"-s": "saddr", "--source": "saddr", "-d": "daddr", "--destination": "daddr",
              "-i": "iifname", "--in-interface": "iifname", "-o": "oifname", "--out-interface": "oifname",
              "-p": "l4proto", "--protocol": "l4proto"}
    while i < len(words):
        w = words[i]
        arg = words[i + 1] if i + 1 < len(words) else ""
        if w == "!":
            negate = True
            i += 1
            continue
        if w in simple:
            value = arg.replace("+", "*") if simple[w] in ("iifname", "oifname") else arg
            conds.append(Cond(simple[w], tuple(value.split(",")), negate))
            i += 2
        elif w in ("-m", "--match"):
            module = arg
            i += 2
        elif w in ("-j", "--jump", "-g", "--goto"):
            name = arg
            i += 2
            opts: list[str] = []
            while i < len(words) and words[i].startswith("--"):
                opts.append(words[i])
                if i + 1 < len(words) and not words[i + 1].startswith("--"):
                    opts.append(words[i + 1])
                    i += 1
                i += 1
            verdict, target, extra = _ipt_target(name, opts, w in ("-g", "--goto"))
            setters += extra
            continue
        elif w.startswith("--"):
            values = arg
            i += 2
            cond = _ipt_option(module, w, values, negate)
            if cond is None:
                if module != "comment":
                    unknown.append(f"-m {module} {w}")
            elif cond.key:
                conds.append(cond)
        else:
            i += 1
        negate = False
    return ForeignRule(ref, text, tuple(conds), tuple(unknown), verdict, target, (), tuple(setters))


def _ipt_option(module: str, opt: str, value: str, negate: bool) -> Cond | None:
    if module in ("tcp", "udp", "multiport", "sctp") and opt in ("--dport", "--sport", "--dports", "--sports",
                                                                 "--destination-port", "--source-port",
                                                                 "--destination-ports", "--source-ports"):
        key = "dport" if "d" in opt[2:4] else "sport"
        return Cond(key, tuple(v.replace(":", "-") for v in value.split(",")), negate)
    if module in ("conntrack", "state") and opt in ("--ctstate", "--state"):
        return Cond("ctstate", tuple(v.lower() for v in value.split(",")), negate)
    if module == "conntrack" and opt == "--ctstatus":
        return Cond("ctstatus", tuple(v.lower() for v in value.split(",")), negate)
    if module == "mark" and opt == "--mark":
        mv = _mark_value(value)
        return Cond("mark", (str(mv[0]),), negate, mv[1]) if mv else None
    if module == "connmark" and opt == "--mark":
        mv = _mark_value(value)
        return Cond("ctmark", (str(mv[0]),), negate, mv[1]) if mv else None
    if module == "dscp" and opt == "--dscp":
        return Cond("dscp", (str(int(value, 0)),), negate)
    if module == "comment":
        return Cond("", ())
    return None


# Target extensions that give no verdict of their own (the packet goes on); queueing ones may drop.
_NO_VERDICT = frozenset({"LOG", "NFLOG", "ULOG", "CT", "TCPMSS", "SNAT", "DNAT", "MASQUERADE", "REDIRECT",
                         "NETMAP", "NOTRACK", "TRACE", "CHECKSUM", "TEE", "CLASSIFY", "SET", "AUDIT",
                         "CONNSECMARK", "SECMARK", "TTL", "HL", "IDLETIMER", "LED", "RATEEST", "HMARK"})
_QUEUEING = frozenset({"NFQUEUE", "QUEUE", "TPROXY", "SYNPROXY"})


def _ipt_target(name: str, opts: list[str], goto: bool) -> tuple[str | None, str | None, list[Setter]]:
    o = dict(zip(opts[::2], opts[1::2], strict=False)) if all(x.startswith("--") for x in opts[::2]) else {}
    if name in ("ACCEPT", "DROP", "RETURN"):
        return name.lower(), None, []
    if name == "REJECT":
        return "reject", None, []
    if name == "MARK":
        return None, None, [Setter("mark", _xmark_changed(o))]
    if name == "CONNMARK":
        if "--restore-mark" in opts:
            return None, None, [Setter("mark", _int(o.get("--nfmask")))]
        if "--save-mark" in opts:
            return None, None, [Setter("ct mark", _int(o.get("--ctmask")))]
        return None, None, [Setter("ct mark", _xmark_changed(o))]
    if name == "DSCP":
        value = o.get("--set-dscp")
        return None, None, [Setter("dscp", value=_int(value, None) if value else None)]
    if name == "TOS":
        return None, None, [Setter("dscp")]
    if name in _QUEUEING:
        return "unknown", None, []
    if name in _NO_VERDICT:
        return None, None, []
    return ("goto" if goto else "jump"), name, []


def _int(text: str | None, default: int | None = FULL) -> int:
    try:
        return int(text, 0) if text else default  # type: ignore[return-value]
    except ValueError:
        return default  # type: ignore[return-value]


def _xmark_changed(o: dict[str, str]) -> int:
    for opt in ("--set-xmark", "--set-mark"):
        if opt in o:
            mv = _mark_value(o[opt])
            if mv is None:
                return FULL
            value, mask = mv
            return (mask | value) & FULL if opt == "--set-xmark" else FULL if mask == FULL else mask
    if "--or-mark" in o:
        return int(o["--or-mark"], 0)
    if "--xor-mark" in o:
        return int(o["--xor-mark"], 0)
    if "--and-mark" in o:
        return ~int(o["--and-mark"], 0) & FULL
    return FULL


# ---- evaluating a rule against a flow ----------------------------------------------------------

def _net_has(net: str, address: str) -> bool | None:
    try:
        return ipaddress.ip_address(address.split("/")[0]) in ipaddress.ip_network(net, strict=False)
    except ValueError:
        return None


def _span(text: str) -> tuple[int, int] | None:
    a, _, b = text.partition("-")
    try:
        return int(a), int(b or a)
    except ValueError:
        return None


def _cond_holds(c: Cond, flow: Flow) -> Tri:
    """Whether the condition holds for the flow (None: cannot tell)."""
    res: Tri
    if c.key in ("iifname", "oifname"):
        dev = flow.iif if c.key == "iifname" else flow.oif
        if dev is None:
            return None
        res = any(dev == v or (v.endswith("*") and dev.startswith(v[:-1])) for v in c.values)
    elif c.key in ("saddr", "daddr"):
        addr = flow.saddr if c.key == "saddr" else flow.daddr
        if addr is None:
            return None
        hits = [_net_has(v, addr) for v in c.values]
        if any(h is None for h in hits) and not any(hits):
            return None
        res = any(bool(h) for h in hits)
    elif c.key == "l4proto":
        if flow.proto is None:
            return None
        numbers = {"tcp": "6", "udp": "17"}
        res = any(v in (flow.proto, numbers.get(flow.proto)) for v in c.values) or "all" in c.values
    elif c.key in ("sport", "dport"):
        span = flow.sport if c.key == "sport" else flow.dport
        if span is None:
            return None
        spans = [_span(v) for v in c.values]
        if any(s is None for s in spans):
            return None
        if any(s[0] <= span[0] and span[1] <= s[1] for s in spans if s):
            res = True
        elif all(s[1] < span[0] or span[1] < s[0] for s in spans if s):
            res = False
        else:
            return None
    elif c.key == "ctstate":
        hits: list[Tri] = []
        for v in c.values:
            if v == "dnat":
                hits.append(flow.dnat)
            elif v in ("new", "established", "related", "invalid", "untracked"):
                hits.append(None if flow.ct_state is None else flow.ct_state == v)
            else:
                hits.append(None)
        if any(h is True for h in hits):
            res = True
        elif all(h is False for h in hits):
            res = False
        else:
            return None
    elif c.key == "ctstatus":
        if c.values == ("dnat",) and flow.dnat is not None:
            res = flow.dnat
        else:
            return None
    elif c.key == "nfproto":
        res = any(v in (f"ipv{flow.family}", str(2 if flow.family == 4 else 10)) for v in c.values)
    elif c.key in ("mark", "ctmark"):
        ours = flow.mark if c.key == "mark" else flow.ctmark
        if ours is None or c.mask & ~flow.mask & FULL:
            return None
        try:
            wanted = [int(v, 0) for v in c.values]
        except ValueError:
            return None
        res = any((ours & c.mask) == (w & c.mask) for w in wanted)
    elif c.key == "dscp":
        if flow.dscp is None:
            return None
        vals = [_dscp_number(v) for v in c.values]
        if any(v is None for v in vals):
            return None
        res = flow.dscp in vals
    else:
        return None
    return (not res) if c.negate else res


def _family_ok(chain: ForeignChain, flow: Flow) -> bool:
    if chain.family in ("ip", "ip6"):
        return (chain.family == "ip") == (flow.family == 4)
    return chain.family == "inet"


def rule_matches(rule: ForeignRule, flow: Flow) -> Tri:
    seen: Tri = True
    for c in rule.conds:
        r = _cond_holds(c, flow)
        if r is False:
            return False
        if r is None:
            seen = None
    if rule.unknown:
        return None
    return seen


# ---- walking the chains ----------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    chain: ForeignChain       # the base chain the packet traverses
    at: ForeignChain          # the chain holding the rule (the base chain for its policy)
    rule: ForeignRule | None  # None: the base chain's policy
    sure: bool


def _ours(chain: ForeignChain, target: str | None) -> bool:
    """A jump into our own accepts: TAGROUTED-HOSTFW, or the legacy backend's TAGROUTED-FORWARD."""
    return target == HOSTFW_CHAIN or (chain.source == "legacy" and target == CHAIN_PREFIX + "FORWARD")


class _Walk:
    """One flow through one base chain: the first rule that surely decides, and every `may`."""

    def __init__(self, rs: Ruleset, base: ForeignChain, flow: Flow, hit_on: str,
                 ignore_ours: bool = False) -> None:
        self.rs, self.base, self.flow, self.hit_on = rs, base, flow, hit_on
        self.ignore_ours = ignore_ours  # judge the chain as if our jump were not there
        self.hits: list[Hit] = []

    def is_hit(self, rule: ForeignRule, verdict: str | None) -> bool:
        if self.hit_on == "drop":
            return verdict in ("drop", "reject")
        return any(_clobbers(s, self.hit_on, self.flow) for s in rule.sets)

    def run(self) -> None:
        end, sure = self.chain(self.base, True, 0)
        if self.hit_on == "drop" and end in ("fallthrough", "return") and self.base.policy == "drop":
            self.hits.append(Hit(self.base, self.base, None, sure))

    def chain(self, chain: ForeignChain, sure: bool, depth: int) -> tuple[str, bool]:
        """("accept" | "drop" | "return" | "fallthrough", still sure)."""
        if depth > MAX_DEPTH:
            return "fallthrough", False
        for rule in chain.rules:
            m = rule_matches(rule, self.flow)
            if m is False:
                continue
            certain = sure and m is True
            steps = [(rule.verdict, rule.target)]
            if rule.verdict == "vmap":
                steps = []
                for cond, verdict, target in rule.vmap:
                    hm = _cond_holds(cond, self.flow) if cond.key != "?" else None
                    if hm is False:
                        continue
                    steps.append((verdict, target))
                    if hm is None:
                        certain = False
                    else:
                        break
                else:
                    if rule.vmap:
                        certain = False  # no element surely matched: the packet may go on
            for verdict, target in steps:
                if self.is_hit(rule, verdict):
                    self.hits.append(Hit(self.base, chain, rule, certain))
                    if certain and self.hit_on == "drop":
                        return "drop", True
                if verdict == "accept":
                    if certain:
                        return "accept", True
                    sure = False
                elif verdict in ("drop", "reject"):
                    if certain:
                        return "drop", True
                    sure = False
                elif verdict in ("jump", "goto"):
                    if (target or "").startswith(CHAIN_PREFIX):  # ours: not another tool's doing
                        if self.ignore_ours:
                            continue
                        if self.hit_on == "drop" and _ours(chain, target) and self.flow.hook == "forward":
                            if certain:
                                return "accept", True
                            sure = False
                        continue
                    sub = self.rs.chain(chain, target or "")
                    if sub is None:
                        sure = False
                        continue
                    end, inner_sure = self.chain(sub, certain, depth + 1)
                    if end in ("accept", "drop") and certain and inner_sure:
                        return end, True
                    if verdict == "goto" and certain and inner_sure:
                        return "return", True
                    if end not in ("fallthrough", "return") or not inner_sure:
                        sure = False
                elif verdict == "return":
                    if certain:
                        return "return", sure
                    sure = False
                elif verdict == "unknown":
                    sure = False
                    if self.hit_on == "drop":
                        self.hits.append(Hit(self.base, chain, rule, False))
            if rule.verdict == "vmap" and not certain:
                sure = False
        return "fallthrough", sure


def _clobbers(s: Setter, fld: str, flow: Flow) -> bool:
    if s.field != fld:
        return False
    if fld == "dscp":
        return s.value is None or s.value != flow.dscp
    return bool(s.changed & flow.mask)


# ---- conflicts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conflict:
    """Another firewall blocks or re-marks our traffic: where, what it does, and the fix."""

    severity: Severity
    table: str        # "inet filter", "iptables-nft filter (IPv4)", "legacy mangle (IPv6)"
    chain: str
    rule: str         # "handle 7: <text>", "policy drop", "rule 3: <options>"
    does: str         # what it does to our traffic
    fix: str          # the command that fixes it
    kind: str = "drop"  # drop | mark | ct mark | dscp

    @property
    def key(self) -> str:
        return f"{self.table} {self.chain} {self.rule}"

    def line(self) -> str:
        return f"{self.table} chain {self.chain} {self.rule}: {self.does}; fix: {self.fix}"

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "table": self.table, "chain": self.chain, "rule": self.rule,
                "does": self.does, "fix": self.fix, "kind": self.kind}


def _table_label(c: ForeignChain) -> str:
    if c.source == "nft":
        return f"{c.family} {c.table}"
    fam = "IPv4" if c.family == "ip" else "IPv6"
    return f"{c.source} {c.table} ({fam})"


def _rule_label(h: Hit) -> str:
    if h.rule is None:
        return f"policy {h.chain.policy}"
    where = "" if h.at is h.chain else f" (in chain {h.at.name})"
    text = f": {h.rule.text}" if h.rule.text else ""
    return f"{h.rule.ref}{where}{text}"


def _nft_accept(flow: Flow) -> str:
    """An nft match for exactly this flow's packets (the accept a user inserts)."""
    ip = "ip" if flow.family == 4 else "ip6"
    parts = []
    if flow.dnat and flow.ct_state == "new":
        parts.append("ct status dnat")
    elif flow.ct_state == "established":
        parts.append("ct state established,related")
    if flow.iif:
        parts.append(f'iifname "{flow.iif}"')
    if flow.oif:
        parts.append(f'oifname "{flow.oif}"')
    if flow.daddr and flow.ct_state == "new":
        parts.append(f"{ip} daddr {flow.daddr}")
        if flow.proto and flow.dport:
            parts.append(f"{flow.proto} dport {_ports(flow.dport)}")
    return " ".join(parts) + " accept"


def _ipt_accept(flow: Flow) -> str:
    parts = []
    if flow.iif:
        parts.append(f"-i {flow.iif}")
    if flow.oif:
        parts.append(f"-o {flow.oif}")
    if flow.dnat and flow.ct_state == "new":
        parts.append("-m conntrack --ctstate DNAT")
    elif flow.ct_state == "established":
        parts.append("-m conntrack --ctstate RELATED,ESTABLISHED")
    if flow.daddr and flow.ct_state == "new" and flow.proto and flow.dport:
        parts.append(f"-d {flow.daddr} -p {flow.proto} --dport {_ports(flow.dport).replace('-', ':')}")
    return " ".join(parts) + " -j ACCEPT"


def _ipt_cmd(c: ForeignChain) -> str:
    base = "iptables-nft" if c.source == "iptables-nft" else "iptables-legacy"
    return ("ip6" + base[2:]) if c.family == "ip6" else base


def _fix_drop(h: Hit, flow: Flow, parent: str) -> str:
    c = h.chain
    if c.source == "nft":
        fix = f"nft insert rule {c.family} {c.table} {c.name} {_nft_accept(flow)}"
        if flow.dnat:  # every service and forward the gateway DNATs, in one rule (issue 11's fix)
            fix = f"nft insert rule {c.family} {c.table} {c.name} ct status dnat accept"
        if c.table == "firewalld":
            fix += (" (firewalld rewrites its table: make it permanent with a policy, e.g. firewall-cmd "
                    "--permanent --new-policy tagrouted && firewall-cmd --permanent --policy tagrouted "
                    "--add-ingress-zone ANY --add-egress-zone ANY --set-target ACCEPT)")
        return fix
    accept = "-m conntrack --ctstate DNAT -j ACCEPT" if flow.dnat else _ipt_accept(flow)
    return (f"set firewall.host_firewall: integrate (tagrouted keeps this accept), or "
            f"{_ipt_cmd(c)} -t {c.table} -I {parent} {accept}")


def _fix_tag(h: Hit, point: TagPoint) -> str:
    c = h.at
    before = h.rule.ref if h.rule else "it"
    if c.source == "nft":
        return f"nft insert rule {c.family} {c.table} {c.name} {point.exempt_nft} accept (before {before})"
    return f"{_ipt_cmd(c)} -t {c.table} -I {c.name} {point.exempt_ipt} -j ACCEPT (before {before})"


def _after(chain: ForeignChain, point: TagPoint, backend: str) -> Tri:
    """Whether `chain` runs after our setter at this hook (None: equal priority, order unknown)."""
    if point.priority is None or chain.priority is None:
        return True if point.priority is None else None
    if backend == "iptables-legacy" and chain.source == "legacy" and chain.table == "mangle":
        return True  # our jump is first in the built-in chain: everything there runs after it
    if chain.priority == point.priority:
        return None
    return chain.priority > point.priority


def judge(rs: Ruleset, intent: FirewallIntent, backend: str) -> tuple[Conflict, ...]:
    """Every conflict of the host's ruleset with our traffic, fails first. (rp_filter and
    forwarding are the routing lane's to keep, and doctor's to check: not judged here, where
    a pass of the other lane would race them.)"""
    found: dict[str, Conflict] = {}
    whats: dict[str, list[str]] = {}

    def add(c: Conflict, what: str = "") -> None:
        old = found.get(c.key)
        if old is None or (old.severity == "warn" and c.severity == "fail"):
            found[c.key] = c
        if what and what not in whats.setdefault(c.key, []):
            whats[c.key].append(what)

    flows = our_flows(intent)
    bases = list(rs.base_chains())
    for flow in flows:
        for chain in bases:
            if chain.hook != flow.hook or not _family_ok(chain, flow) or chain.type == "nat":
                continue
            parent = chain.name
            if chain.source != "nft" and chain.name == "FORWARD":
                parent = _parent(chain, (c for c in rs.chains if (c.source, c.family, c.table) ==
                                         (chain.source, chain.family, chain.table)))
            walk = _Walk(rs, chain, flow, "drop")
            walk.run()
            for h in walk.hits:
                add(Conflict("fail" if h.sure else "warn", _table_label(chain),
                             h.at.name if h.rule else chain.name,
                             _rule_label(h), f"{'drops' if h.sure else 'may drop'}",
                             _fix_drop(h, flow, parent)), flow.what)
    for point in tag_points(intent, backend):
        for chain in bases:
            if chain.hook != point.flow.hook or not _family_ok(chain, point.flow) or chain.type == "nat":
                continue
            after = _after(chain, point, backend)
            if after is False:
                continue
            walk = _Walk(rs, chain, point.flow, point.field)
            walk.run()
            for h in walk.hits:
                sure = h.sure and after is True
                verb = {"mark": "overwrites", "ct mark": "overwrites", "dscp": "rewrites"}[point.field]
                when = "" if after is True else " (same priority as ours: runs after it if loaded first)"
                add(Conflict("fail" if sure else "warn", _table_label(chain), h.at.name, _rule_label(h),
                             f"{verb if sure else 'may ' + verb.rstrip('s')} {point.flow.what}{when}",
                             _fix_tag(h, point), point.field))
    out = []
    for key, c in found.items():
        what = whats.get(key, [])
        if what:  # one conflict per rule, naming the first flows it stops
            more = f" (+{len(what) - 2} more)" if len(what) > 2 else ""
            c = replace(c, does=f"{c.does} {' and '.join(what[:2])}{more}")
        out.append(c)
    return tuple(sorted(out, key=lambda c: (c.severity != "fail", c.table, c.chain, c.rule)))


# ---- the accepts we keep in the host's FORWARD chains ------------------------------------------

def _comment(label: str, rule: FirewallRule) -> FirewallRule:
    d = digest(rule.save_args())
    # no spaces: the comment reads back unquoted and goes into a restore batch as one word
    text = f"tagrouted:{label[:40]}:{d}" if label else f"tagrouted:{d}"
    return replace(rule, matches=(*rule.matches, Match("comment", (("comment", text),))))


@functools.lru_cache(maxsize=4)  # every host-firewall pass asks (19 ms at 1000 services)
def hostfw_rules(intent: FirewallIntent) -> dict[Family, tuple[FirewallRule, ...]]:
    """Per family, the accepts for exactly our traffic (each carries a comment with the digest
    of its own text: what the sync compares)."""
    out: dict[Family, dict[FirewallRule, None]] = {4: {}, 6: {}}
    host = {4: 32, 6: 128}
    for gw in intent.gateways:
        for e in gw.exposed:
            port = _ports(e.home_port).replace("-", ":")
            for src in e.allow_from or (None,):  # the service's allow_from: one accept per prefix
                origin = (("ctorigsrc", src),) if src else ()
                rule = FirewallRule(matches=(Match("conntrack", (
                    ("ctstate", "DNAT"), ("ctproto", e.proto), *origin,
                    ("ctreplsrc", f"{e.address}/{host[e.family]}"), ("ctreplsrcport", port))),))
                out[gw.family].setdefault(_comment(e.name, rule), None)
    for p in intent.passages:
        rule = FirewallRule(in_interface=p.in_interface, out_interface=p.out_interface)
        out[p.family].setdefault(_comment("vpn-server", rule), None)
    for a in intent.admissions:
        for e in a.exposed:
            port = _ports(e.home_port).replace("-", ":")
            for src in e.allow_from or (None,):
                origin = (("ctorigsrc", src),) if src else ()
                fwd = FirewallRule(in_interface=a.tunnel, out_interface=a.lan, protocol=e.proto, source=src,
                                   destination=f"{e.address}/{host[e.family]}",
                                   matches=(Match(e.proto, (("dport", port),)),))
                back = FirewallRule(in_interface=a.lan, out_interface=a.tunnel, matches=(Match("conntrack", (
                    ("ctstate", "RELATED,ESTABLISHED"), ("ctproto", e.proto), *origin,
                    ("ctorigdst", f"{e.address}/{host[e.family]}"), ("ctorigdstport", port))),))
                out[a.family].setdefault(_comment(e.name, fwd), None)
                out[a.family].setdefault(_comment(e.name, back), None)
    return {f: tuple(rules) for f, rules in out.items() if rules}


def rule_comment(rule: FirewallRule) -> str:
    """The comment `hostfw_rules` put on a rule (what iptables-nft-save shows back)."""
    for m in rule.matches:
        if m.name == "comment":
            return dict(m.options).get("comment", "")
    return ""


def jump_rule() -> FirewallRule:
    return FirewallRule(matches=(Match("comment", (("comment", HOSTFW_COMMENT),)),), target=HOSTFW_CHAIN)


@dataclass(frozen=True)
class HostfwPlace:
    """Where our accepts go in one family's iptables-style filter table."""

    source: Source          # iptables-nft | legacy
    family: Family
    parent: str             # DOCKER-USER or FORWARD


@dataclass
class HostfwView:
    """Our part of one iptables-style filter table, as read: our chain's rule comments in order,
    and each rule that jumps to our chain (chain, position among that chain's rules)."""

    exists: bool = False
    chain_present: bool = False
    comments: list[str] = field(default_factory=list)
    jumps: list[tuple[str, int, bool]] = field(default_factory=list)  # chain, position, exact jump
    chains: tuple[str, ...] = ()


def hostfw_places(ruleset: Ruleset, intent: FirewallIntent, backend: str,
                  legacy_filter: dict[int, bool]) -> list[HostfwPlace]:
    """Where our traffic's forward path runs through iptables-style filter chains that could drop
    it (a drop policy, a drop or reject rule that surely or maybe matches, judged without our own
    jump): iptables-nft's `ip filter` / `ip6 filter`, and the legacy filter table where it exists
    and the legacy backend does not already put its accepts first there."""
    out = []
    flows = our_flows(intent)
    families: tuple[tuple[Family, str], ...] = ((4, "ip"), (6, "ip6"))
    for family, fam in families:
        for source in ("iptables-nft", "legacy"):
            if source == "legacy" and (backend == "iptables-legacy" or not legacy_filter.get(family)):
                continue
            chains = [c for c in ruleset.chains
                      if c.source == source and c.family == fam and c.table == "filter"]
            forward = next((c for c in chains if c.name == "FORWARD" and c.base), None)
            if forward is None:
                continue
            blocked = False
            for flow in flows:
                if flow.family != family:
                    continue
                walk = _Walk(ruleset, forward, flow, "drop", ignore_ours=True)
                walk.run()
                if walk.hits:
                    blocked = True
                    break
            if blocked:
                out.append(HostfwPlace(source, family, _parent(forward, chains)))  # type: ignore[arg-type]
    return out


def _parent(forward: ForeignChain, chains: Iterable[ForeignChain]) -> str:
    """DOCKER-USER when FORWARD jumps to it (Docker's layout: rules there survive its restarts),
    else FORWARD itself (an `iptables -F` leaves DOCKER-USER behind, unreachable)."""
    if any(c.name == DOCKER_USER for c in chains) and any(
            r.target == DOCKER_USER and r.verdict in ("jump", "goto") for r in forward.rules):
        return DOCKER_USER
    return "FORWARD"


def with_integration(rs: Ruleset, places: Iterable[HostfwPlace]) -> Ruleset:
    """The ruleset as it will be once our jump is first in each place (what `diff` and a dry
    run judge: the integration is shown as a change, not as a conflict)."""
    wanted = {("ip" if p.family == 4 else "ip6", p.source, p.parent) for p in places}
    jump = ForeignRule("(tagrouted's jump)", "-m comment --comment tagrouted -j " + HOSTFW_CHAIN,
                       verdict="jump", target=HOSTFW_CHAIN)
    chains = tuple(
        replace(c, rules=(jump, *c.rules))
        if (c.family, c.source, c.name) in wanted and c.table == "filter"
        and not (c.rules and c.rules[0].target == HOSTFW_CHAIN) else c
        for c in rs.chains)
    return replace(rs, chains=chains)


def hostfw_in_sync(view: HostfwView, rules: tuple[FirewallRule, ...], parent: str) -> bool:
    want = [rule_comment(r) for r in rules]
    if not rules:
        return not view.chain_present and not view.jumps
    return (view.chain_present and view.comments == want
            and view.jumps == [(parent, 0, True)])


def restore_batch(view: HostfwView, rules: tuple[FirewallRule, ...], parent: str) -> list[str]:
    """An iptables-nft-restore --noflush batch making the table hold exactly our chain with
    `rules` and one jump first in `parent` (or, with no rules, neither). `-D` by position: the
    batch is one transaction, refused whole if the table changed since `view` was read."""
    keep = (parent, 0, True) if rules and (parent, 0, True) in view.jumps else None
    lines = ["*filter"]
    for chain, pos, exact in sorted(view.jumps, key=lambda x: (x[0], -x[1])):
        if (chain, pos, exact) != keep:
            lines.append(f"-D {chain} {pos + 1}")  # iptables counts from 1
    if rules:
        lines.append(f":{HOSTFW_CHAIN} - [0:0]")  # declared: created, or flushed when it exists
        lines += [f"-A {HOSTFW_CHAIN} {r.save_args()}" for r in rules]
        if keep is None:
            lines.append(f"-I {parent} 1 {jump_rule().save_args()}")
    elif view.chain_present:
        lines += [f"-F {HOSTFW_CHAIN}", f"-X {HOSTFW_CHAIN}"]
    lines.append("COMMIT")
    return lines


def parse_save_view(text: str) -> HostfwView:
    """Our chain and the jumps to it, from `iptables-nft-save -t filter`."""
    view = HostfwView()
    positions: dict[str, int] = {}
    chains: list[str] = []
    jump_args = jump_rule().save_args()
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*filter"):
            view.exists = True
        elif line.startswith(":"):
            name = line[1:].split()[0]
            chains.append(name)
            view.chain_present = view.chain_present or name == HOSTFW_CHAIN
        elif line.startswith("-A "):
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            chain, args = words[1], words[2:]
            pos = positions.get(chain, 0)
            positions[chain] = pos + 1
            if chain == HOSTFW_CHAIN:
                comment = next((args[i + 1] for i, w in enumerate(args[:-1]) if w == "--comment"), "")
                view.comments.append(comment)
                continue
            target = next((args[i + 1] for i, w in enumerate(args[:-1]) if w in ("-j", "-g")), None)
            if target == HOSTFW_CHAIN:
                view.jumps.append((chain, pos, " ".join(shlex.quote(a) for a in args) == jump_args))
    view.chains = tuple(chains)
    return view
