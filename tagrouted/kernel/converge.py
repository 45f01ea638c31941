"""One idempotent entry point: observe the kernel, compute the desired state, apply the minimal
change. `converge(config)` with an equal kernel is a no-op; `converge(None)` is teardown.

Owns the order of work, never the policy (desired.py) nor the kernel details (the adapters).
Order: policy rules and routes are added before stale ones are removed (no gap for tagged
replies), sysctls are set with their first original saved in the run directory, then the
firewall backend the config chooses (kernel/firewall) syncs our firewall state: one nftables
transaction, or one libiptc commit per legacy table. On a full pass (start, reload) the other
backend's state is removed after ours is in place, so a switch of backend never leaves the host
with neither. A step that fails does not stop the others: the result carries every change that
did happen and every error, joined.
Threading: one Converger per process, used from one thread (the reconcile worker or the CLI).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.config import Config, Tag
from ..core.desired import desired_state, empty_state
from ..core.plan import route_key, route_line, rule_line
from ..core.state import Change, DesiredState, FirewallIntent, HostFacts, Sysctl
from . import conntrack
from .firewall import BACKENDS, BackendUnavailable, FirewallBackend, choose, open_backend
from .netlink import NetlinkAdapter
from .sysctl import SavedSysctls, read_sysctl, write_sysctl

ROUTING = "routing"    # policy rules and routes: netlink announces every change to them
SYSCTLS = "sysctls"    # /proc/sys values: links bring them, nothing announces a reset
FIREWALL = "firewall"  # our firewall state: only config changes or tampering change them
ALL_PARTS = frozenset({ROUTING, SYSCTLS, FIREWALL})


@dataclass
class ConvergeResult:
    desired: DesiredState
    facts: HostFacts
    changes: list[Change] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    backend: str | None = None  # the firewall backend this pass used

    @property
    def ok(self) -> bool:
        return not self.errors


class Converger:
    """Owns the kernel adapters of one host (one netlink socket, the saved sysctls)."""

    def __init__(self, run_dir: str) -> None:
        self.netlink = NetlinkAdapter()
        self.saved = SavedSysctls(run_dir)
        self.tables = RoutingTables(run_dir)
        self._backends: dict[str, FirewallBackend] = {}
        # desired_state is pure: the same config object and equal facts give the same state,
        # and compiling 1000 services costs ~25 ms of every periodic pass (bench_scale)
        self._last_compiled: tuple[Config, HostFacts, DesiredState] | None = None

    def close(self) -> None:
        self.netlink.close()
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()

    def backend(self, name: str) -> FirewallBackend:
        """The backend object for `name`, opened once (BackendUnavailable if it cannot be)."""
        if name not in self._backends:
            self._backends[name] = open_backend(name)
        return self._backends[name]

    def __enter__(self) -> Converger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the entry point -----------------------------------------------------------------
    def desired(self, config: Config | None, tag: Tag) -> tuple[DesiredState, HostFacts]:
        facts = self.netlink.host_facts()
        if config is None:
            return empty_state(tag), facts
        last = self._last_compiled
        if last is not None and last[0] is config and last[1] == facts:
            return last[2], facts
        desired = desired_state(config, facts)
        self._last_compiled = (config, facts, desired)
        return desired, facts

    def converge(self, config: Config | None, tag: Tag | None = None, *,
                 dry_run: bool = False, parts: frozenset[str] = ALL_PARTS,
                 sweep_other_backend: bool | None = None) -> ConvergeResult:
        """Make the kernel hold exactly what `config` wants here (nothing, when None: then both
        backends' state goes).

        `parts` narrows the work to ROUTING, SYSCTLS and/or FIREWALL: a link event cannot change
        what our firewall should hold (it names interfaces, not indexes), so it needs no
        firewall pass; a timer pass need not re-dump the rules and routes netlink reports
        changes of. `sweep_other_backend` (default: on full passes) removes what the backend not
        in use holds, after ours is in place."""
        desired, facts = self.desired(config, tag or (config.tag if config else Tag()))
        result = ConvergeResult(desired, facts, notes=list(desired.notes))
        if config is not None:
            result.backend = choose(config.firewall.backend).backend
        if sweep_other_backend is None:
            sweep_other_backend = parts >= ALL_PARTS
        steps: list[tuple[str, str, Callable[[ConvergeResult, bool], None]]] = [
            (ROUTING, "policy rules", self._rules),
            (ROUTING, "routes", self._routes),
            (SYSCTLS, "sysctls", self._sysctls),
            (FIREWALL, result.backend or "firewall", self._firewall),
        ]
        for part, name, step in steps:
            if part not in parts:
                continue
            try:
                step(result, dry_run)
            except Exception as e:  # one failing step must not stop the others
                result.errors.append(f"{name}: {type(e).__name__}: {e}")
        if FIREWALL in parts and sweep_other_backend and result.ok:
            self._sweep_other_backends(result, dry_run)
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
        # What we changed and no longer want goes back to the value we found.
        for key, original in sorted(self.saved.originals().items()):
            if key in wanted:
                continue
            current = read_sysctl(key)
            if current is not None and current != original:
                if not dry_run:
                    write_sysctl(key, original)
                result.changes.append(
                    Change("set", "sysctl", f"restored sysctl {key}={original} (was {current})"))
            if not dry_run:
                self.saved.forget(key)

    def _firewall(self, result: ConvergeResult, dry_run: bool) -> None:
        if result.backend is None:  # teardown: whatever either backend holds goes
            for name in BACKENDS:
                self._remove_all(name, result, dry_run, required=True)
            return
        self._sync(self.backend(result.backend), result.desired.firewall, result, dry_run)

    def _sync(self, backend: FirewallBackend, intent: FirewallIntent, result: ConvergeResult,
              dry_run: bool) -> None:
        synced = backend.sync(intent, dry_run=dry_run)
        result.changes += synced.changes
        if not dry_run:
            for family in sorted(synced.dnat_changed):
                self._flush_stale_udp(result, family)
        if synced.errors:
            raise RuntimeError("; ".join(synced.errors))

    def _remove_all(self, name: str, result: ConvergeResult, dry_run: bool, required: bool) -> None:
        """Take away what backend `name` holds. A backend whose library is missing holds
        nothing we could have written; that is an error only where it must be usable."""
        try:
            backend = self.backend(name)
        except BackendUnavailable:
            if required and name == result.backend:
                raise
            return
        try:
            self._sync(backend, FirewallIntent(mark_mask=result.desired.firewall.mark_mask), result, dry_run)
        except Exception as e:
            result.errors.append(f"removing {name} state: {type(e).__name__}: {e}")

    def _sweep_other_backends(self, result: ConvergeResult, dry_run: bool) -> None:
        for name in BACKENDS:
            if name != result.backend:
                self._remove_all(name, result, dry_run, required=False)

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
    chosen = choose(config.firewall.backend).backend
    lines += converger.backend(chosen).drift_lines(desired.firewall)
    for name in BACKENDS:
        if name == chosen:
            continue
        with contextlib.suppress(BackendUnavailable):
            if converger.backend(name).holds_state():
                lines.append(f"-{name}: state of the backend not in use (removed by the next apply)")
    return lines
