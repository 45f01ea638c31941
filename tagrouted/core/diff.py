"""Desired state against kernel state: the minimal list of changes, as plain values.

Owns the comparison only; pure (no pyroute2, no iptc). The adapters read kernel state into the
same types the compiler emits, so every comparison here is set or tuple equality.
"""

from __future__ import annotations

from .state import Change, KernelTable, OwnedChain, owned_chain_name

FAMILY_NAME = {4: "IPv4", 6: "IPv6"}


def chain_changes(desired: tuple[OwnedChain, ...], kernel: KernelTable) -> list[Change]:
    """What must change in one table of one family so our chains and jumps match `desired`.

    Chains are compared whole (a chain that differs is rewritten in the same commit); jumps
    must be exactly one, first in their built-in chain."""
    where = f"({kernel.table}, {FAMILY_NAME[kernel.family]})"
    changes: list[Change] = []
    wanted = {c.name: c for c in desired}
    for chain in desired:
        have = kernel.chains.get(chain.name)
        n = len(chain.rules)
        if have is None:
            changes.append(Change("added", "chain", f"added chain {chain.name} {where} with {n} rules"))
        elif have != chain.rules:
            changes.append(
                Change("replaced", "chain",
                       f"replaced chain {chain.name} {where}: {len(have)} rules -> {n} rules")
            )
        if kernel.jumps.get(chain.builtin, ()) != (0,):
            changes.append(
                Change("added", "jump",
                       f"added jump {chain.builtin} -> {chain.name} {where} at position 1")
            )
    for name in sorted(kernel.chains):
        if name not in wanted:
            changes.append(Change("removed", "chain", f"removed chain {name} {where}"))
    for builtin, positions in sorted(kernel.jumps.items()):
        if positions and owned_chain_name(builtin) not in wanted:
            changes.append(
                Change("removed", "jump",
                       f"removed jump {builtin} -> {owned_chain_name(builtin)} {where}")
            )
    return changes
