"""The firewall intent rendered for the iptables-legacy backend: our TAGROUTED-<BUILTIN> chains.

Pure: a function of the intent, no I/O. The rules are written the way iptables-save prints them
(the backend compares canonical forms, never this text against the kernel's). One chain per
(family, table, built-in chain), its rules in role order (the gateway's ACL before the VPN
server's accepts before the VPN client's admissions), each rule once.
Marks and connmarks are set, saved, restored and matched within `mark_mask` only, so the bits
other tools keep in the same mark survive (MARK/CONNMARK --set-xmark v/m clears m, then sets v).

Per-service policy in the forward ACL, per exposed endpoint: for each allowed source (`-s`; all
when allow_from is absent) a hashlimit DROP of new connections beyond its rate_limit (srcip mode,
`--ctstate NEW`, the table named after the endpoint and limit, forgotten once a source's bucket
has refilled), then the ACCEPT; then, for a restricted service, a DROP whose counter is what its
allow_from dropped. MSS clamping: TCPMSS in mangle FORWARD on SYNs into and out of a tunnel.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from .state import (
    BUILTIN_CHAINS,
    TABLE_ORDER,
    Exposed,
    Family,
    FirewallIntent,
    FirewallRule,
    Match,
    MssClamp,
    OwnedChain,
    RateLimit,
    ReplyTagging,
    TunnelTagging,
)

FULL_MASK = 0xFFFFFFFF
ESTABLISHED = FirewallRule(
    matches=(Match("conntrack", (("ctstate", "RELATED,ESTABLISHED"),)),), target="ACCEPT"
)
# (family, table, chain name, rule): where a service's packets are counted
CountedRule = tuple[Family, str, str, FirewallRule]


def _hex(value: int) -> str:
    return f"0x{value:02x}"


def _masked(value: int, mask: int) -> str:
    """`0x2a/0xff` as iptables-save prints a masked mark match; the bare value for a full mask."""
    return f"{value:#x}" if mask == FULL_MASK else f"{value:#x}/{mask:#x}"


def _host(address: str, family: Family) -> str:
    return f"{address}/{32 if family == 4 else 128}"


def _ports(span: tuple[int, int]) -> str:
    return str(span[0]) if span[0] == span[1] else f"{span[0]}:{span[1]}"


def _port_match(e: Exposed, public: bool) -> Match:
    return Match(e.proto, (("dport", _ports(e.port if public else e.home_port)),))


def _dnat_target(e: Exposed) -> str:
    if e.to_port is None:
        return e.address
    return f"[{e.address}]:{e.to_port}" if e.family == 6 else f"{e.address}:{e.to_port}"


def dnat_rule(e: Exposed, public_interface: str, public: str) -> FirewallRule:
    return FirewallRule(
        in_interface=public_interface, protocol=e.proto, destination=_host(public, e.family),
        matches=(_port_match(e, public=True),),
        target="DNAT", target_options=(("to-destination", _dnat_target(e)),),
    )


def accept_rule(e: Exposed, in_interface: str, out_interface: str | None = None,
                source: str | None = None) -> FirewallRule:
    return FirewallRule(
        in_interface=in_interface, out_interface=out_interface, protocol=e.proto, source=source,
        destination=_host(e.address, e.family), matches=(_port_match(e, public=False),),
        target="ACCEPT",
    )


def dropped_rule(e: Exposed, in_interface: str, out_interface: str | None = None) -> FirewallRule:
    """What a restricted service's allowed sources did not take: dropped, and counted here."""
    return FirewallRule(
        in_interface=in_interface, out_interface=out_interface, protocol=e.proto,
        destination=_host(e.address, e.family), matches=(_port_match(e, public=False),),
        target="DROP",
    )


def hashlimit_name(e: Exposed, rl: RateLimit) -> str:
    """The kernel's name for the rate table (at most 15 characters, /proc/net/ipt_hashlimit/):
    one per home endpoint and limit, so two rules never share a table with other parameters."""
    text = f"{e.family} {e.address} {e.proto} {_ports(e.home_port)} {rl.rate}/{rl.unit} {rl.burst}"
    return "tr-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def limit_rule(e: Exposed, in_interface: str, source: str | None) -> FirewallRule:
    rl = e.rate_limit
    assert rl is not None
    unit = "sec" if rl.unit == "second" else "min"
    return FirewallRule(
        in_interface=in_interface, protocol=e.proto, source=source,
        destination=_host(e.address, e.family),
        matches=(_port_match(e, public=False),
                 Match("conntrack", (("ctstate", "NEW"),)),
                 Match("hashlimit", (("hashlimit-above", f"{rl.rate}/{unit}"),
                                     ("hashlimit-burst", str(rl.burst)),
                                     ("hashlimit-mode", "srcip"),
                                     ("hashlimit-name", hashlimit_name(e, rl)),
                                     ("hashlimit-htable-expire", str(rl.refill_seconds * 1000))))),
        target="DROP",
    )


def _sources(e: Exposed) -> tuple[str | None, ...]:
    return e.allow_from or (None,)


def mss_rules(m: MssClamp) -> tuple[FirewallRule, FirewallRule]:
    """SYNs and SYN-ACKs (SYN set, RST not: TCPMSS refuses rules that may see other packets)."""
    target = (("clamp-mss-to-pmtu", ""),) if m.mss is None else (("set-mss", str(m.mss)),)
    syn = (Match("tcp", (("tcp-flags", "SYN,RST SYN"),)),)
    return (FirewallRule(out_interface=m.interface, protocol="tcp", matches=syn, target="TCPMSS",
                         target_options=target),
            FirewallRule(in_interface=m.interface, protocol="tcp", matches=syn, target="TCPMSS",
                         target_options=target))


class _Chains:
    """An insertion-ordered set of rules per chain: a list's `in` made 1000 services O(N^2)."""

    def __init__(self) -> None:
        self.rules: dict[tuple[Family, str, str], dict[FirewallRule, None]] = defaultdict(dict)

    def add(self, family: Family, table: str, builtin: str, *rules: FirewallRule) -> None:
        chain = self.rules[(family, table, builtin)]
        for rule in rules:
            chain.setdefault(rule, None)

    def build(self) -> tuple[OwnedChain, ...]:
        chains: list[OwnedChain] = []
        for family in (4, 6):
            for table in TABLE_ORDER:
                for builtin in BUILTIN_CHAINS[table]:
                    rules = self.rules.get((family, table, builtin))
                    if rules:
                        chains.append(OwnedChain(family, table, builtin, tuple(rules)))  # type: ignore[arg-type]
        return tuple(chains)


def _stamp_rule(t: TunnelTagging) -> FirewallRule:
    """The VPN client's DSCP stamp on what leaves the path's tunnel."""
    return FirewallRule(in_interface=t.tunnel, target="DSCP", target_options=(("set-dscp", _hex(t.dscp)),))


def _mark_rule(t: TunnelTagging, mask: int) -> FirewallRule:
    """The VPN client's mark on LAN replies carrying the path's DSCP (routed into its tunnel)."""
    return FirewallRule(in_interface=t.lan, matches=(Match("dscp", (("dscp", _hex(t.dscp)),)),),
                        target="MARK", target_options=(("set-xmark", f"{t.mark:#x}/{mask:#x}"),))


def _connmark_rule(r: ReplyTagging, mask: int) -> FirewallRule:
    """The service host's connmark from the path's DSCP on the way in."""
    return FirewallRule(matches=(Match("dscp", (("dscp", _hex(r.dscp)),)),),
                        target="CONNMARK", target_options=(("set-xmark", f"{r.mark:#x}/{mask:#x}"),))


def _restore_rule(r: ReplyTagging, mask: int) -> FirewallRule:
    """The service host's replies get the path's mark back; only our bits: other tools'
    connmarks stay theirs."""
    return FirewallRule(
        matches=(Match("connmark", (("mark", _masked(r.mark, mask)),)),), target="CONNMARK",
        target_options=(("restore-mark", ""), ("nfmask", f"{mask:#x}"), ("ctmask", f"{mask:#x}")))


def legacy_chains(intent: FirewallIntent) -> tuple[OwnedChain, ...]:
    """Every TAGROUTED-* chain the intent needs, in iptables-save order."""
    c = _Chains()
    mask = intent.mark_mask
    for gw in intent.gateways:
        f, pub = gw.family, gw.public_interface
        for e in gw.exposed:
            for public in gw.publics:
                c.add(f, "nat", "PREROUTING", dnat_rule(e, pub, public))
        denies = [FirewallRule(in_interface=pub, destination=dst, target="DROP")
                  for dst in (*gw.home_networks, *gw.outside_hosts)]
        if gw.via_tunnel:
            denies.append(FirewallRule(in_interface=pub, out_interface=gw.via_tunnel, target="DROP"))
        acl: list[FirewallRule] = []
        for e in gw.exposed:
            for source in _sources(e):
                if e.rate_limit is not None:
                    acl.append(limit_rule(e, pub, source))
                acl.append(accept_rule(e, pub, source=source))
            if e.restricted:
                acl.append(dropped_rule(e, pub))
        c.add(f, "filter", "FORWARD", ESTABLISHED, *acl, *denies)
    for p in intent.passages:
        c.add(p.family, "filter", "FORWARD",
              FirewallRule(in_interface=p.in_interface, out_interface=p.out_interface, target="ACCEPT"))
    for t in intent.tunnel_tags:
        c.add(t.family, "mangle", "PREROUTING", _stamp_rule(t), _mark_rule(t, mask))
        c.add(t.family, "mangle", "POSTROUTING",
              FirewallRule(out_interface=t.tunnel, target="DSCP", target_options=(("set-dscp", "0x00"),)))
    for a in intent.admissions:
        admit: list[FirewallRule] = []
        for e in a.exposed:
            admit += [accept_rule(e, a.tunnel, a.lan, source) for source in _sources(e)]
            if e.restricted:
                admit.append(dropped_rule(e, a.tunnel, a.lan))
        c.add(a.family, "filter", "FORWARD", ESTABLISHED, *admit)
    for a in intent.admissions:  # every tunnel's accepts before any tunnel's drop (paths)
        c.add(a.family, "filter", "FORWARD",
              FirewallRule(in_interface=a.tunnel, out_interface=a.lan, target="DROP"))
    for m in intent.mss_clamps:
        c.add(m.family, "mangle", "FORWARD", *mss_rules(m))
    for r in intent.reply_tags:
        c.add(r.family, "mangle", "INPUT", _connmark_rule(r, mask))
        c.add(r.family, "mangle", "OUTPUT", _restore_rule(r, mask))
        if r.stamp_dscp:
            c.add(r.family, "mangle", "OUTPUT", FirewallRule(
                matches=(Match("mark", (("mark", _masked(r.mark, mask)),)),),
                target="DSCP", target_options=(("set-dscp", _hex(r.dscp)),)))
    return c.build()


def counted_rules(intent: FirewallIntent) -> dict[str, tuple[CountedRule, ...]]:
    """For each service, the rules whose counters make up its packets and bytes: on a gateway
    its DNAT rules (one per public address), on a VPN client its ACCEPT toward the LAN; none on
    a plain service host (no rule there is per service)."""
    out: dict[str, list[CountedRule]] = defaultdict(list)
    if intent.gateways:
        for gw in intent.gateways:
            for e in gw.exposed:
                if e.tagged:
                    out[e.name] += [(gw.family, "nat", "TAGROUTED-PREROUTING",
                                     dnat_rule(e, gw.public_interface, p)) for p in gw.publics]
    else:
        for a in intent.admissions:
            for e in a.exposed:
                out[e.name] += [(a.family, "filter", "TAGROUTED-FORWARD",
                                 accept_rule(e, a.tunnel, a.lan, source)) for source in _sources(e)]
    return {name: tuple(rules) for name, rules in out.items()}


def path_counted_rules(intent: FirewallIntent) -> dict[str, dict[str, tuple[CountedRule, ...]]]:
    """For each path, the rules whose counters make up its `requests` (tagged on the way in) and
    `replies` (sent back through it): the VPN client's DSCP stamp and LAN mark, the service
    host's connmark and restore (its connmark only where no VPN client role counts the requests
    already: a home router would count each request twice)."""
    mask = intent.mark_mask
    out: dict[str, dict[str, list[CountedRule]]] = defaultdict(lambda: {"requests": [], "replies": []})
    stamped = {t.path for t in intent.tunnel_tags}
    for t in intent.tunnel_tags:
        if t.path:
            out[t.path]["requests"].append((t.family, "mangle", "TAGROUTED-PREROUTING", _stamp_rule(t)))
            out[t.path]["replies"].append((t.family, "mangle", "TAGROUTED-PREROUTING", _mark_rule(t, mask)))
    for r in intent.reply_tags:
        if r.path:
            kinds = out[r.path]
            if r.path not in stamped:
                kinds["requests"].append((r.family, "mangle", "TAGROUTED-INPUT", _connmark_rule(r, mask)))
            kinds["replies"].append((r.family, "mangle", "TAGROUTED-OUTPUT", _restore_rule(r, mask)))
    return {path: {what: tuple(rules) for what, rules in kinds.items()} for path, kinds in out.items()}


def policy_rules(intent: FirewallIntent) -> dict[str, dict[str, tuple[CountedRule, ...]]]:
    """For each service or forward with a policy, the rules whose counters say what it dropped:
    "dropped" (allow_from: the gateway's and the VPN client's counting DROP) and "limited"
    (rate_limit: the gateway's hashlimit DROPs)."""
    out: dict[str, dict[str, list[CountedRule]]] = defaultdict(lambda: defaultdict(list))
    for gw in intent.gateways:
        for e in gw.exposed:
            if e.restricted:
                out[e.name]["dropped"].append((gw.family, "filter", "TAGROUTED-FORWARD",
                                               dropped_rule(e, gw.public_interface)))
            if e.rate_limit is not None:
                out[e.name]["limited"] += [
                    (gw.family, "filter", "TAGROUTED-FORWARD", limit_rule(e, gw.public_interface, source))
                    for source in _sources(e)]
    for a in intent.admissions:
        for e in a.exposed:
            if e.restricted:
                out[e.name]["dropped"].append((a.family, "filter", "TAGROUTED-FORWARD",
                                               dropped_rule(e, a.tunnel, a.lan)))
    return {name: {kind: tuple(rules) for kind, rules in kinds.items()} for name, kinds in out.items()}
