"""The firewall edge: one small interface the converger calls, one module per backend.

- nftables.py: everything in the one table `inet tagrouted`, written in one libnftables
  transaction per change (the official `nftables` binding), services in sets and maps.
- iptables_legacy.py: our TAGROUTED-<BUILTIN> chains in the legacy xtables, through
  python-iptables' libiptc bindings, one commit per table under /run/xtables.lock.

A backend is handed the backend-neutral `FirewallIntent` and renders it itself (through the pure
core's renderer for its syntax); it owns only its own objects and never decides policy. This
module stays import-light (no libnftables, no libiptc): `tagroutectl plan` resolves the backend
through it. Threading: a backend object is used from one thread (the reconcile worker or the CLI).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Protocol

from ...core.state import Change, Family, FirewallIntent

NFTABLES = "nftables"
IPTABLES_LEGACY = "iptables-legacy"
BACKENDS = (NFTABLES, IPTABLES_LEGACY)


@dataclass
class FirewallSync:
    """What one sync changed: the change records, and the families whose DNAT changed (their
    stale UDP conntrack entries must go, see DESIGN's "Stale connection tracking")."""

    changes: list[Change] = field(default_factory=list)
    dnat_changed: set[Family] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)  # what failed; the changes above did happen


Count = tuple[int, int]  # (packets, bytes)


@dataclass(frozen=True)
class Counters:
    """services: service name -> its DNAT's count (None: not counted);
    paths: path name -> {"requests": ..., "replies": ...}: what arrived tagged through each path
    and what went back through it (None: not counted yet);
    policy: service name -> {"dropped": ..., "limited": ...}: what its allow_from and its
    rate_limit dropped, for the services that have one (None: not counted yet)."""

    services: dict[str, Count | None] = field(default_factory=dict)
    paths: dict[str, dict[str, Count | None]] = field(default_factory=dict)
    policy: dict[str, dict[str, Count | None]] = field(default_factory=dict)


class FirewallBackend(Protocol):
    name: str

    def sync(self, intent: FirewallIntent, *, dry_run: bool = False) -> FirewallSync:
        """Make our firewall state equal `intent` (an empty intent removes it all); atomic per
        backend unit (nftables: the whole table; legacy: each table of each family)."""
        ...

    def drift_lines(self, intent: FirewallIntent) -> list[str]:
        """`tagroutectl diff` lines: + what the kernel lacks, - what it has in excess."""
        ...

    def counters(self, intent: FirewallIntent) -> Counters:
        """The kernel's counters of our rules, read at once (one read of the table on nftables)."""
        ...

    def holds_state(self) -> bool:
        """Whether anything of ours is in this backend's part of the kernel."""
        ...

    def close(self) -> None: ...


class BackendUnavailable(Exception):
    """The backend's library or kernel support is missing; the message says what to install."""


@dataclass(frozen=True)
class Choice:
    backend: str
    why: str


def iptables_variant() -> str | None:
    """"legacy" or "nf_tables" for the host's `iptables` command (by the multi-binary it links
    to, as update-alternatives sets it), None when there is none. No subprocess: cheap enough
    for `tagroutectl plan`."""
    exe = shutil.which("iptables") or next(
        (p for p in ("/usr/sbin/iptables", "/sbin/iptables") if os.path.exists(p)), None)
    if exe is None:
        return None
    name = os.path.basename(os.path.realpath(exe))
    if "legacy" in name:
        return "legacy"
    if "nft" in name:
        return "nf_tables"
    return None  # an unusual build: treat like a host without the command


def legacy_xtables_available() -> bool:
    """Whether this kernel has legacy xtables (loaded, built in, or a loadable module)."""
    if os.path.exists("/proc/net/ip_tables_names") or os.path.isdir("/sys/module/ip_tables"):
        return True
    release = os.uname().release
    base = f"/lib/modules/{release}/kernel/net/ipv4/netfilter"
    try:
        return any(n.startswith("ip_tables.ko") for n in os.listdir(base))
    except OSError:
        return False


def choose(setting: str) -> Choice:
    """The backend for `firewall.backend`: `auto` is nftables, except on a host whose admin chose
    legacy (its `iptables` is the legacy variant and the kernel has legacy xtables)."""
    if setting in BACKENDS:
        return Choice(setting, "firewall.backend")
    variant = iptables_variant()
    if variant == "legacy" and legacy_xtables_available():
        return Choice(IPTABLES_LEGACY, "auto: this host's iptables is the legacy variant")
    if variant == "nf_tables":
        return Choice(NFTABLES, "auto: this host's iptables is the nf_tables variant")
    return Choice(NFTABLES, "auto")


def open_backend(name: str) -> FirewallBackend:
    """The backend named `name`; BackendUnavailable when its library cannot be loaded."""
    if name == NFTABLES:
        from .nftables import NftablesBackend

        return NftablesBackend()
    if name == IPTABLES_LEGACY:
        from .iptables_legacy import LegacyBackend

        return LegacyBackend()
    raise ValueError(f"unknown firewall backend {name!r}")
