"""Per-service packet and byte counters, read from the rules of our chains. Read-only.

Owns nothing in the kernel and writes nothing: it reads one table of one family through a
private libiptc handle (python-iptables' bindings, via the iptables adapter's handle and
entry-building code, under its process-wide lock) and sums the counters of the rules that serve
each service. Which rules those are is derived from the desired state, never parsed from text:
- on a gateway, the service's DNAT rules in nat TAGROUTED-PREROUTING (one per public address);
- on a vpn-client (without the gateway role), its ACCEPT in filter TAGROUTED-FORWARD;
- on a plain service host, no rule is per service: the counters are None.
A kernel rule belongs to a service when its entry key equals the key of the rule we would
write (the comparison sync_table itself uses), so counters survive as long as the rule does.
Called only from the reconcile worker.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ...core.config import Config, Service
from ...core.state import DesiredState, Family, FirewallRule, Match
from . import iptables_legacy as iptables

_COUNTERS = struct.Struct("=QQ")  # struct xt_counters: pcnt, bcnt


@dataclass(frozen=True)
class ServiceRules:
    """The desired rules whose counters make up one service's counters."""

    service: Service
    rules: tuple[tuple[Family, str, str, FirewallRule], ...]  # (family, table, chain, rule)


def _host(svc: Service) -> str:
    return f"{svc.address}/{32 if svc.family == 4 else 128}"


def _dnat_of(rule: FirewallRule, svc: Service) -> bool:
    if rule.target != "DNAT" or rule.protocol != svc.proto:
        return False
    if Match(svc.proto, (("dport", svc.port.iptables),)) not in rule.matches:
        return False
    dest = dict(rule.target_options).get("to-destination", "")
    addr = str(svc.address)
    return dest == addr or dest.startswith(f"{addr}:") or dest.startswith(f"[{addr}]")


def _accept_of(rule: FirewallRule, svc: Service) -> bool:
    return (rule.target == "ACCEPT" and rule.protocol == svc.proto and rule.destination == _host(svc)
            and Match(svc.proto, (("dport", svc.home_port.iptables),)) in rule.matches)


def service_rules(config: Config, desired: DesiredState) -> list[ServiceRules]:
    """For each configured service, the desired rules that count its traffic (maybe none)."""
    if config.has("gateway"):
        where, test, public = ("nat", "PREROUTING"), _dnat_of, True
    elif config.has("vpn-client"):
        where, test, public = ("filter", "FORWARD"), _accept_of, False
    else:
        return [ServiceRules(svc, ()) for svc in config.services]
    # Rules indexed by (family, match): a service's rules carry its port match, so each
    # service tests only those (testing every rule for every service was O(N^2): 1.5-3 s per
    # pass at 1000 services, found by bench_ctl).
    by_match: dict[tuple[Family, Match], list[tuple[Family, str, str, FirewallRule]]] = {}
    for chain in desired.chains:
        if (chain.table, chain.builtin) != where:
            continue
        for r in chain.rules:
            for m in dict.fromkeys(r.matches):
                by_match.setdefault((chain.family, m), []).append((chain.family, chain.table, chain.name, r))
    out = []
    for svc in config.services:
        port = svc.port if public else svc.home_port
        key = (svc.family, Match(svc.proto, (("dport", port.iptables),)))
        found = [item for item in by_match.get(key, ()) if test(item[3], svc)]
        out.append(ServiceRules(svc, tuple(found)))
    return out


def read_counters(wanted: list[ServiceRules]) -> dict[str, tuple[int, int] | None]:
    """service name -> (packets, bytes) summed over its rules in the kernel now; None for a
    service without per-service rules or whose rules are not (yet) in the kernel."""
    by_table: dict[tuple[Family, str], set[str]] = {}
    for sr in wanted:
        for family, table, chain, _ in sr.rules:
            by_table.setdefault((family, table), set()).add(chain)
    # (family, chain, key) -> [packets, bytes], summed over equal rules
    kernel: dict[tuple[Family, str, bytes], list[int]] = {}
    for (family, table), chains in by_table.items():
        _read_table(family, table, chains, kernel)
    out: dict[str, tuple[int, int] | None] = {}
    for sr in wanted:
        if not sr.rules:
            out[sr.service.name] = None
            continue
        packets = nbytes = 0
        seen = False
        for family, _table, chain, rule in sr.rules:
            hit = kernel.get((family, chain, _key(rule, family)))
            if hit is not None:
                seen = True
                packets += hit[0]
                nbytes += hit[1]
        out[sr.service.name] = (packets, nbytes) if seen else None
    return out


def _key(rule: FirewallRule, family: Family) -> bytes:
    return iptables._build(rule, family).key


def _read_table(family: Family, table: str, chains: set[str],
                into: dict[tuple[Family, str, bytes], list[int]]) -> None:
    with iptables._lock:
        fam: Any = iptables._family(family)
        try:
            with iptables._open(fam, table) as h:
                present = set(h.chains())
                off = fam.entry_cls.counters.offset
                for chain in chains & present:
                    for _pos, krule in h.rules(chain):
                        pcnt, bcnt = _COUNTERS.unpack_from(krule.entry, off)
                        slot = into.setdefault((family, chain, krule.key), [0, 0])
                        slot[0] += pcnt
                        slot[1] += bcnt
        except (iptables.IptablesError, iptables._Retry):
            return  # no such table, or it changed under us: no counters this time

