"""One idempotent entry point: observe the kernel, compute the desired state, apply the minimal
change. `converge(config)` with an equal kernel is a no-op; `converge(None)` is teardown.

Owns the order of work, never the policy (desired.py) nor the kernel details (the adapters).
Order: policy rules and routes are added before stale ones are removed (no gap for tagged
replies), sysctls are set with their first original saved in the run directory, then each
iptables table of each family is synced in one commit. A step that fails does not stop the
others: the result carries every change that did happen and every error, joined.
Threading: one Converger per process, used from one thread (the reconcile worker or the CLI).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from ..core.config import Config, Service, Tag
from ..core.desired import desired_state, empty_state
from ..core.plan import jump_line, route_key, route_line, rule_line
from ..core.state import TABLE_ORDER, Change, DesiredState, HostFacts, OwnedChain, Sysctl
from . import conntrack
from .firewall import iptables_legacy as iptables
from .netlink import NetlinkAdapter, NetlinkTransient
from .sysctl import SavedSysctls, read_sysctl, write_sysctl

ROUTING = "routing"    # policy rules and routes: netlink announces every change to them
SYSCTLS = "sysctls"    # /proc/sys values: links bring them, nothing announces a reset
FIREWALL = "firewall"  # our iptables chains: only config changes or tampering change them
ALL_PARTS = frozenset({ROUTING, SYSCTLS, FIREWALL})
LINK_RACE_ERRNOS = frozenset({errno.ENODEV, errno.ENETDOWN})  # a route's link gone or down mid-pass


class ChangeLog(list[Change]):
    """The changes of one pass, handed to `on_change` the moment a step adds them (append,
    extend, +=): a record follows its kernel write by microseconds, not by the rest of the pass
    (the other tables, a conntrack flush), so whoever sees the repair finds its record."""

    def __init__(self, on_change: Callable[[Change], None] | None = None) -> None:
        super().__init__()
        self.on_change = on_change

    def append(self, change: Change) -> None:
        super().append(change)
        if self.on_change is not None:
            self.on_change(change)

    def extend(self, changes: Iterable[Change]) -> None:
        for change in changes:
            self.append(change)

    def __iadd__(self, changes: Iterable[Change]) -> ChangeLog:  # type: ignore[override,misc]
        self.extend(changes)
        return self


@dataclass
class ConvergeResult:
    desired: DesiredState
    facts: HostFacts
    changes: list[Change] = field(default_factory=ChangeLog)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    teardown: bool = False  # converge(None): nothing is wanted, nothing will come back

    @property
    def ok(self) -> bool:
        return not self.errors


class Converger:
    """Owns the kernel adapters of one host (one netlink socket, the saved sysctls)."""

    def __init__(self, run_dir: str) -> None:
        self.netlink = NetlinkAdapter()
        self.saved = SavedSysctls(run_dir)
        self.tables = RoutingTables(run_dir)
        # desired_state is pure: the same config object and equal facts give the same state,
        # and compiling 1000 services costs ~25 ms of every periodic pass (bench_scale)
        self._last_compiled: tuple[Config, HostFacts, DesiredState] | None = None
        self._last_view: tuple[Config, Config] | None = None  # config -> its routing view

    def close(self) -> None:
        self.netlink.close()

    def __enter__(self) -> Converger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the entry point -----------------------------------------------------------------
    def desired(self, config: Config | None, tag: Tag, firewall_only: bool = False,
                routing_only: bool = False) -> tuple[DesiredState, HostFacts]:
        """The desired state and the facts it was compiled from (issue 15: each lane compiles
        only what it uses; test_lanes checks both invariants on every example).
        `firewall_only`: the chains never depend on the facts (they name interfaces, not
        indexes), so the last compile of this config is reused: a firewall pass after every
        tunnel flap recompiled 1000 services (3.3 ms) for nothing.
        `routing_only`: routes, rules and sysctls depend on the services only through their
        address families, so one service per family compiles them; a tunnel flap at 1000
        services made 7000 firewall rule objects, and their collection (11-22 ms) stalled it."""
        last = self._last_compiled
        if firewall_only and config is not None and last is not None and last[0] is config:
            return last[2], last[1]
        if routing_only and config is not None:
            config = self._routing_view(config)
        facts = self.netlink.host_facts()
        if config is None:
            return empty_state(tag), facts
        last = self._last_compiled
        if last is not None and last[0] is config and last[1] == facts:
            return last[2], facts
        desired = desired_state(config, facts)
        self._last_compiled = (config, facts, desired)
        return desired, facts

    def _routing_view(self, config: Config) -> Config:
        view = self._last_view
        if view is None or view[0] is not config:
            view = (config, routing_view(config))
            self._last_view = view
        return view[1]

    def converge(self, config: Config | None, tag: Tag | None = None, *,
                 dry_run: bool = False, parts: frozenset[str] = ALL_PARTS,
                 on_change: Callable[[ConvergeResult, Change], None] | None = None) -> ConvergeResult:
        """Make the kernel hold exactly what `config` wants here (nothing, when None).

        `parts` narrows the work to ROUTING, SYSCTLS and/or FIREWALL: a link event cannot change
        what our chains should hold (they name interfaces, not indexes), so it needs no iptables
        pass; a timer pass need not re-dump the rules and routes netlink reports changes of.
        `on_change(result, change)` is called as each change is made (see ChangeLog)."""
        desired, facts = self.desired(config, tag or (config.tag if config else Tag()),
                                      firewall_only=parts == {FIREWALL}, routing_only=FIREWALL not in parts)
        result = ConvergeResult(desired, facts, notes=list(desired.notes), teardown=config is None)
        if on_change is not None:
            result.changes = ChangeLog(lambda change: on_change(result, change))
        steps: list[tuple[str, str, Callable[[ConvergeResult, bool], None]]] = [
            (ROUTING, "policy rules", self._rules),
            (ROUTING, "routes", self._routes),
            (SYSCTLS, "sysctls", self._sysctls),
            (FIREWALL, "iptables", self._iptables),
        ]
        for part, name, step in steps:
            if part not in parts:
                continue
            try:
                step(result, dry_run)
            except Exception as e:  # one failing step must not stop the others
                result.errors.append(f"{name}: {type(e).__name__}: {e}")
        if ROUTING in parts and result.ok and not dry_run:
            self.tables.keep_only(desired.table)  # earlier tables are empty now
        return result

    # ---- steps ---------------------------------------------------------------------------
    def _rules(self, result: ConvergeResult, dry_run: bool) -> None:
        desired = result.desired
        if not dry_run:
            self.tables.add(desired.table)  # recorded before we write into it
        kernel = frozenset().union(*(self.netlink.read_rules(t) for t in self.tables.owned(desired.table)))
        for rule in sorted(desired.rules - kernel):
            if not dry_run:
                self.netlink.add_rule(rule)
            result.changes.append(_change("added", "rule", rule.describe(), rule.family))
        for rule in sorted(kernel - desired.rules):
            if not dry_run:
                self.netlink.del_rule(rule)
            result.changes.append(_change("removed", "rule", rule.describe(), rule.family))

    def _routes(self, result: ConvergeResult, dry_run: bool) -> None:
        desired = result.desired
        kernel = frozenset().union(*(self.netlink.read_routes(t) for t in self.tables.owned(desired.table)))
        errors: list[str] = []
        for route in sorted(desired.routes - kernel, key=route_key):
            try:
                if not dry_run:
                    self.netlink.add_route(route)
                result.changes.append(_change("added", "route", route.describe(), route.family))
            except NetlinkTransient as e:
                if e.errno in LINK_RACE_ERRNOS and route.dev and not self._link_up(route.dev):
                    # The link went (or went down) since this pass read the facts: the route is
                    # no longer wanted, and the link's own event brings the next pass.
                    continue
                errors.append(f"{route_line(route)}: {e}")
            except Exception as e:
                errors.append(f"{route_line(route)}: {e}")
        for route in sorted(kernel - desired.routes, key=route_key):
            try:
                if not dry_run:
                    self.netlink.del_route(route)
                result.changes.append(_change("removed", "route", route.describe(), route.family))
            except Exception as e:
                errors.append(f"delete {route.describe()}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))

    def _link_up(self, name: str) -> bool:
        link = self.netlink.host_facts().link(name)
        return link is not None and link.up

    def _sysctls(self, result: ConvergeResult, dry_run: bool) -> None:
        wanted = {s.key: s.value for s in result.desired.sysctls}
        for key, value in wanted.items():
            current = read_sysctl(key)
            if current is None or current == value:
                continue
            if not dry_run:
                self.saved.remember(key, current)
                write_sysctl(key, value)
            result.changes.append(Change("set", "sysctl", f"set sysctl {key}={value} (was {current})"))
        # What we changed and no longer want goes back to the value we found. A value that is
        # gone with its link (tun0 deleted) stays recorded: the link's return finds it there, and
        # an OpenVPN restart costs no rewrite (flock, fsync) of the file on the tunnel's way up.
        for key, original in sorted(self.saved.originals().items()):
            if key in wanted:
                continue
            current = read_sysctl(key)
            if current is None and not result.teardown:
                continue
            if current is not None and current != original:
                if not dry_run:
                    write_sysctl(key, original)
                result.changes.append(
                    Change("set", "sysctl", f"restored sysctl {key}={original} (was {current})"))
            if not dry_run:
                self.saved.forget(key)

    def _iptables(self, result: ConvergeResult, dry_run: bool) -> None:
        errors: list[str] = []
        for family in (4, 6):
            for table in TABLE_ORDER:
                try:
                    changes = iptables.sync_table(
                        family, table, result.desired.chains_of(family, table), dry_run=dry_run)
                except Exception as e:
                    errors.append(f"{table} ({_fam(family)}): {e}")
                    continue
                result.changes += changes
                if table == "nat" and changes and not dry_run:
                    self._flush_stale_udp(result, family)
        if errors:
            raise RuntimeError("; ".join(errors))

    def _flush_stale_udp(self, result: ConvergeResult, family: int) -> None:
        """A UDP client sending since before our DNAT keeps its un-NATed conntrack entry."""
        for ep in sorted(result.desired.udp_endpoints, key=lambda e: (e.address, e.first_port)):
            if ep.family != family:
                continue
            n = conntrack.delete_udp_entries(ep)
            if n:
                last = "" if ep.first_port == ep.last_port else f"-{ep.last_port}"
                result.notes.append(
                    f"deleted {n} stale conntrack entries for udp {ep.address} port {ep.first_port}{last}")


def routing_view(config: Config) -> Config:
    """`config` with one service per address family: what the routes, rules and sysctls see."""
    firsts: dict[int, Service] = {}
    for svc in config.services:
        firsts.setdefault(svc.family, svc)
    return replace(config, services=tuple(firsts.values()))


def _change(action: str, obj: str, what: str, family: int) -> Change:
    """`added rule fwmark 0x2a lookup 42 pref 1042`; IPv6 objects say so."""
    suffix = " (IPv6)" if family == 6 else ""
    return Change(action, obj, f"{action} {obj} {what}{suffix}")  # type: ignore[arg-type]


class RoutingTables:
    """The routing tables T we have written into, kept in RUN_DIR/tables.json, so a tag.table
    changed by a reload or while we were stopped is still swept (its rules and routes are ours)."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, "tables.json")

    def _read(self) -> set[int]:
        try:
            with open(self.path) as f:
                return {int(t) for t in json.load(f)}
        except (OSError, ValueError, TypeError):
            return set()

    def _write(self, tables: set[int]) -> None:
        tmp = f"{self.path}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(sorted(tables), f)
        os.replace(tmp, self.path)

    def owned(self, table: int) -> list[int]:
        return sorted(self._read() | {table})

    def add(self, table: int) -> None:
        tables = self._read()
        if table not in tables:
            self._write(tables | {table})

    def keep_only(self, table: int) -> None:
        if self._read() != {table}:
            self._write({table})


def _fam(family: int) -> str:
    return "IPv4" if family == 4 else "IPv6"


def drift_lines(converger: Converger, config: Config) -> list[str]:
    """`tagroutectl diff`: +/- lines of what the kernel lacks (+) or has in excess (-)."""
    desired, _ = converger.desired(config, config.tag)
    lines: list[str] = []
    tables = converger.tables.owned(desired.table)
    kernel_rules = frozenset().union(*(converger.netlink.read_rules(t) for t in tables))
    lines += [f"+{rule_line(r)}" for r in sorted(desired.rules - kernel_rules)]
    lines += [f"-{rule_line(r)}" for r in sorted(kernel_rules - desired.rules)]
    kernel_routes = frozenset().union(*(converger.netlink.read_routes(t) for t in tables))
    lines += [f"+{route_line(r)}" for r in sorted(desired.routes - kernel_routes, key=route_key)]
    lines += [f"-{route_line(r)}" for r in sorted(kernel_routes - desired.routes, key=route_key)]
    for s in desired.sysctls:
        current = read_sysctl(s.key)
        if current is not None and current != s.value:
            lines += [f"-sysctl -w {Sysctl(s.key, current).describe()}", f"+sysctl -w {s.describe()}"]
    for family in (4, 6):
        for table in TABLE_ORDER:
            lines += _chain_drift_lines(family, table, desired.chains_of(family, table))
    return lines


def _chain_drift_lines(family: int, table: str, desired: tuple[OwnedChain, ...]) -> list[str]:
    kernel = iptables.read_table(family, table)  # type: ignore[arg-type]
    where = f"[{table} {_fam(family)}]"
    lines: list[str] = []
    wanted = {c.name for c in desired}
    for chain in desired:
        want = tuple(iptables.canonical(r, family) for r in chain.rules)  # type: ignore[arg-type]
        have = kernel.chains.get(chain.name)
        if have is None:
            lines.append(f"+{where} :{chain.name} - [0:0]")
            have = ()
        if have != want:
            lines += [f"-{where} -A {chain.name} {r.save_args()}" for r in have if r not in want]
            lines += [f"+{where} -A {chain.name} {r.save_args()}" for r in want if r not in have]
            if set(have) == set(want):
                lines.append(f"~{where} rules of {chain.name} in the wrong order or duplicated")
        if kernel.jumps.get(chain.builtin, ()) != (0,):
            lines.append(f"+{where} {jump_line(chain)} (exactly once, first)")
    for name, rules in sorted(kernel.chains.items()):
        if name not in wanted:
            lines += [f"-{where} -A {name} {r.save_args()}" for r in rules]
            lines.append(f"-{where} :{name} - [0:0]")
    return lines
