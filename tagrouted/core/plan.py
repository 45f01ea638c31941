"""Renders states as the lines an administrator already reads: `ip rule`/`ip route` commands,
`sysctl -w`, then the firewall in the backend's own syntax: the `inet tagrouted` table as
`nft list` shows it (nftables), or per family an iptables-save block of our chains and their
jumps (iptables-legacy).

Pure and deterministic: the same state always prints the same text, in a fixed order.
"""

from __future__ import annotations

from .config import Config
from .iptables_rules import legacy_chains
from .nft_rules import nft_table, table_lines
from .state import (
    JUMP_COMMENT,
    TABLE_ORDER,
    DesiredState,
    OwnedChain,
    PolicyRule,
    Route,
    Sysctl,
)

SAVE_COMMAND = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
# Sysctl subtrees whose next component is an interface name (which may itself contain dots).
PER_INTERFACE = ("net.ipv4.conf.", "net.ipv6.conf.", "net.ipv4.neigh.", "net.ipv6.neigh.")


def route_key(r: Route) -> tuple[int, int, str, str, str, str, int]:
    return (r.family, r.table, r.dst, r.kind, r.dev or "", r.gateway or "", r.metric or 0)


def route_line(r: Route) -> str:
    return f"ip -{r.family} route add {r.describe()}"


def rule_line(r: PolicyRule) -> str:
    return f"ip -{r.family} rule add {r.describe()}"


def sysctl_cli_key(key: str) -> str:
    """The key as sysctl(8) reads it: dots in an interface name become '/'
    (net.ipv4.conf.tun0.100.rp_filter -> net.ipv4.conf.tun0/100.rp_filter); sysctl(8) refuses
    the dotted form, which names no file."""
    for prefix in PER_INTERFACE:
        if key.startswith(prefix):
            name, sep, leaf = key[len(prefix):].rpartition(".")
            if sep:
                return f"{prefix}{name.replace('.', '/')}.{leaf}"
    return key


def sysctl_line(s: Sysctl) -> str:
    return f"sysctl -w {sysctl_cli_key(s.key)}={s.value}"


def jump_line(chain: OwnedChain) -> str:
    return f"-A {chain.builtin} -m comment --comment {JUMP_COMMENT} -j {chain.name}"


def chain_lines(chain: OwnedChain) -> list[str]:
    return [f"-A {chain.name} {rule.save_args()}" for rule in chain.rules]


def iptables_blocks(state: DesiredState) -> list[str]:
    lines: list[str] = []
    all_chains = legacy_chains(state.firewall)
    for family in (4, 6):
        if not any(c.family == family for c in all_chains):
            continue
        lines.append(f"# {SAVE_COMMAND[family]}")
        for table in TABLE_ORDER:
            chains = [c for c in all_chains if c.family == family and c.table == table]
            if not chains:
                continue
            lines.append(f"*{table}")
            lines += [f":{c.name} - [0:0]" for c in chains]
            lines += [jump_line(c) for c in chains]
            for chain in chains:
                lines += chain_lines(chain)
            lines.append("COMMIT")
    return lines


def nft_block(state: DesiredState) -> list[str]:
    table = table_lines(nft_table(state.firewall))
    return ["# nft -f - (applied as one transaction)", *table] if table else []


def path_lines(config: Config) -> list[str]:
    """One comment line per path of a `paths:` config (none for the single-path form): its tag,
    and where its replies go on this host."""
    if not config.paths or not (config.has("vpn-client") or config.has("service")):
        return []
    out = []
    for p in config.paths:
        if config.has("vpn-client"):
            way = f"replies into {p.tunnel_interface}"
        else:
            way = "replies via " + ", ".join(str(v) for v in p.via)
        out.append(f"# path {p.name}: dscp {p.dscp}, fwmark {p.mark:#x} -> table {p.table} "
                   f"(rule pref {p.priority}); {way}")
    return out


def plan_lines(state: DesiredState, backend: str = "nftables") -> list[str]:
    """The whole state, routing first, then sysctls, then the firewall in `backend`'s syntax."""
    lines = [rule_line(r) for r in sorted(state.rules)]
    lines += [route_line(r) for r in sorted(state.routes, key=route_key)]
    lines += [sysctl_line(s) for s in state.sysctls]
    lines += nft_block(state) if backend == "nftables" else iptables_blocks(state)
    return lines
