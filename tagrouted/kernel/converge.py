"""One idempotent entry point: observe the kernel, compute the desired state, apply the minimal
change. `converge(config)` with an equal kernel is a no-op; `converge(None)` is teardown.

Owns the order of work, never the policy (desired.py) nor the kernel details (the adapters).
Order: policy rules and routes are added before stale ones are removed (no gap for tagged
replies), sysctls are set with their first original saved in the run directory, then the
firewall backend the config chooses (kernel/firewall) syncs our firewall state: one nftables
transaction, or one libiptc commit per legacy table; then the host firewall step (kernel/hostfw.py)
keeps our accepts in the host's iptables-style FORWARD chains and judges its whole ruleset
against our traffic (ConvergeResult.conflicts). On a full pass (start, reload) the other
backend's state is removed after ours is in place, so a switch of backend never leaves the host
with neither. A step that fails does not stop the others: the result carries every change that
did happen and every error, joined.

What is ours (issue 16: sweeps once deleted wg-quick's and Tailscale's state):
- rules: by brand, priority + fwmark + table, whatever their mask (an old full-mask rule of
  ours is still recognised and replaced); the brands are the configured one and those the run
  directory records. Any other fwmark rule pointing at our table is foreign, never deleted.
- routing tables: a table is wholly ours once recorded in RUN_DIR/tables.json. Recording it
  (adoption) is refused while it holds routes we did not make (proto != ROUTE_PROTO), with an
  error naming them; after that its whole content is ours. Elsewhere, routes of ROUTE_PROTO only.
- several paths (`paths:`, issue 14): one table and one brand per path, each adopted on its own;
  a refused table leaves its path's rule and routes untouched this pass while the other paths
  go ahead (a tunnel or table of one public server must not take the others down).
- with nothing recorded and no config (`down` on a fresh host), only brand-exact objects of the
  default tag go.
Threading: one Converger per process, used from one thread (the reconcile worker or the CLI).
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.config import RESERVED_TABLES, Config, Service, Tag, TagPath
from ..core.desired import desired_state, empty_state, forwarded_families
from ..core.hostfw import Conflict
from ..core.plan import route_key, route_line, rule_line, sysctl_line
from ..core.state import (
    ROUTE_PROTO,
    Change,
    DesiredState,
    FirewallIntent,
    HostFacts,
    PolicyRule,
    Sysctl,
)
from . import conntrack
from .firewall import BACKENDS, NFTABLES, BackendUnavailable, FirewallBackend, choose, open_backend
from .hostfw import HostFirewall
from .netlink import NetlinkAdapter, NetlinkTransient
from .rundir import RunDir, RunDirError
from .sysctl import SavedSysctls, read_sysctl, write_sysctl

ROUTING = "routing"    # policy rules and routes: netlink announces every change to them
SYSCTLS = "sysctls"    # /proc/sys values: links bring them, nothing announces a reset
FIREWALL = "firewall"  # our firewall state: only config changes or tampering change them
HOSTFW = "hostfw"      # the host's own firewall: our accepts in its FORWARD chains, its conflicts
ALL_PARTS = frozenset({ROUTING, SYSCTLS, FIREWALL, HOSTFW})
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
    backend: str | None = None  # the firewall backend this pass used
    teardown: bool = False  # converge(None): nothing is wanted, nothing will come back
    # the host firewall's conflicts with our traffic, as judged this pass (None: not judged)
    conflicts: tuple[Conflict, ...] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


class Converger:
    """Owns the kernel adapters of one host (one netlink socket, the saved sysctls)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = RunDir(run_dir)  # RunDirError when it is not ours: nothing is touched
        self.netlink = NetlinkAdapter()
        self.saved = SavedSysctls(self.run_dir)
        self.record = RoutingRecord(self.run_dir)
        # This pass's view of what is ours (set by _adopt): whole tables and rule brands.
        self._tables: frozenset[int] = frozenset()
        self._brands: frozenset[Brand] = frozenset()
        self._refused: frozenset[int] = frozenset()  # tables another program fills (not ours)
        self._backends: dict[str, FirewallBackend] = {}
        self.hostfw = HostFirewall()
        # desired_state is pure: the same config object and equal facts give the same state,
        # and compiling 1000 services costs ~25 ms of every periodic pass (bench_scale)
        self._last_compiled: tuple[Config, HostFacts, DesiredState] | None = None
        self._last_view: tuple[Config, Config] | None = None  # config -> its routing view

    def close(self) -> None:
        self.netlink.close()
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        self.hostfw.close()
        self.run_dir.close()

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
        facts = self.netlink.host_facts(ipv6_defaults=config is not None and 6 in forwarded_families(config))
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
                 sweep_other_backend: bool | None = None,
                 paths: tuple[TagPath, ...] | None = None,
                 on_change: Callable[[ConvergeResult, Change], None] | None = None) -> ConvergeResult:
        """Make the kernel hold exactly what `config` wants here (nothing, when None: then both
        backends' state goes; `paths` (or `tag`) then names the brands to sweep besides the
        recorded ones).

        `parts` narrows the work to ROUTING, SYSCTLS and/or FIREWALL: a link event cannot change
        what our firewall should hold (it names interfaces, not indexes), so it needs no
        firewall pass; a timer pass need not re-dump the rules and routes netlink reports
        changes of. `sweep_other_backend` (default: on passes of every part; the daemon's
        firewall lane asks for it on its start, reload and retry passes) removes what the backend
        not in use holds, after ours is in place. `on_change(result, change)` is called as each
        change is made (see ChangeLog)."""
        tag = tag or (config.tag if config else Tag())
        firewalls = {FIREWALL, HOSTFW}  # both need the whole firewall intent
        desired, facts = self.desired(config, tag, firewall_only=parts <= firewalls,
                                      routing_only=not parts & firewalls)
        result = ConvergeResult(desired, facts, notes=list(desired.notes), teardown=config is None)
        if on_change is not None:
            result.changes = ChangeLog(lambda change: on_change(result, change))
        if config is not None:
            result.backend = choose(config.firewall.backend).backend
        if sweep_other_backend is None:
            sweep_other_backend = parts >= ALL_PARTS
        owners = _owners(config, tag, paths)
        brands = frozenset(owners)
        steps: list[tuple[str, str, Callable[[ConvergeResult, bool], None]]] = [
            (ROUTING, "routing tables", lambda r, d: self._adopt(r, d, owners)),
            (ROUTING, "policy rules", self._rules),
            (ROUTING, "routes", self._routes),
            (SYSCTLS, "sysctls", self._sysctls),
            (FIREWALL, result.backend or "firewall", self._firewall),
            (HOSTFW, "host firewall", lambda r, d: self._hostfw(r, d, config)),
        ]
        routing_refused = False
        for part, name, step in steps:
            if part not in parts or (part == ROUTING and routing_refused):
                continue
            try:
                step(result, dry_run)
            except Exception as e:  # one failing step must not stop the others
                result.errors.append(f"{name}: {type(e).__name__}: {e}" if not isinstance(e, Refused)
                                     else f"{name}: {e}")
                # without knowing what is ours, no rule or route is touched
                routing_refused = routing_refused or name == "routing tables"
        if FIREWALL in parts and sweep_other_backend and result.ok:
            self._sweep_other_backends(result, dry_run)
        if ROUTING in parts and result.ok and not dry_run:
            # earlier tables and brands were swept in this pass: only the current ones stay ours
            self.record.write(frozenset(b.table for b in brands if _uses_table(desired, b.table)),
                              _rule_brands(desired) & brands)
        return result

    # ---- steps ---------------------------------------------------------------------------
    def _adopt(self, result: ConvergeResult, dry_run: bool, owners: dict[Brand, str]) -> None:
        """Decide what is ours this pass; record each path's table before we first write into it.

        A table that holds routes we did not make is refused on its own (an error naming them):
        its rule and routes are left alone this pass, the other paths' tables go ahead."""
        tables, recorded = self.record.read()
        desired = result.desired
        self._refused = frozenset()
        new_tables: set[int] = set()
        refused: set[int] = set()
        for brand, key in sorted(owners.items()):
            table = brand.table
            if table in tables or table in new_tables or table in refused or not _uses_table(desired, table):
                continue
            foreign = sorted((r for r in self.netlink.read_routes({table})
                              if r.table == table and r.proto != ROUTE_PROTO), key=route_key)
            if not foreign:
                new_tables.add(table)
                continue
            refused.add(table)
            result.errors.append(
                f"routing tables: table {table} holds routes tagrouted did not make: "
                + "; ".join(f"{r.describe()}{' (IPv6)' if r.family == 6 else ''}" for r in foreign[:5])
                + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
                + f". Another program uses table {table}: pick another {key}, or remove "
                  "those routes if they are stale, so tagrouted can own the table")
        wanted = frozenset(b for b in _rule_brands(desired) & frozenset(owners) if b.table not in refused)
        if new_tables or not wanted <= recorded:
            tables, recorded = tables | new_tables, recorded | wanted
            if not dry_run:
                self.record.write(tables, recorded)  # recorded before we write into it
        self._tables = frozenset(tables)
        self._brands = frozenset(recorded | {b for b in owners if b.table not in refused})
        self._refused = frozenset(refused)

    def _kernel_rules(self) -> frozenset[PolicyRule]:
        """Our rules in the kernel: those of our brands, whatever their mask."""
        by_table: dict[int, set[tuple[int, int]]] = {}
        for b in self._brands:
            by_table.setdefault(b.table, set()).add((b.priority, b.mark))
        return frozenset(r for table, marks in by_table.items() for r in self.netlink.read_rules(table)
                         if (r.priority, r.fwmark) in marks)

    def _rules(self, result: ConvergeResult, dry_run: bool) -> None:
        desired = _outside(result.desired.rules, self._refused)
        kernel = _outside(self._kernel_rules(), self._refused)
        for rule in sorted(desired - kernel):
            if not dry_run:
                self.netlink.add_rule(rule)
            result.changes.append(_change("added", "rule", rule.describe(), rule.family))
        for rule in sorted(kernel - desired):
            if not dry_run:
                self.netlink.del_rule(rule)
            result.changes.append(_change("removed", "rule", rule.describe(), rule.family))

    def _routes(self, result: ConvergeResult, dry_run: bool) -> None:
        desired = _outside(result.desired.routes, self._refused)
        kernel = _outside(self.netlink.read_routes(self._tables), self._refused)
        errors: list[str] = []
        for route in sorted(desired - kernel, key=route_key):
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
        for route in sorted(kernel - desired, key=route_key):
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

    def _firewall(self, result: ConvergeResult, dry_run: bool) -> None:
        if result.backend is None:  # teardown: whatever either backend holds goes
            for name in BACKENDS:
                self._remove_all(name, result, dry_run, required=True)
            return
        self._sync(self.backend(result.backend), result.desired.firewall, result, dry_run)

    def _hostfw(self, result: ConvergeResult, dry_run: bool, config: Config | None) -> None:
        """Our accepts in the host's iptables-style FORWARD chains (or their removal, on
        teardown and in report mode), then the judgement of the host's whole ruleset."""
        intent = result.desired.firewall
        mode = config.firewall.host_firewall if config else "integrate"
        backend = result.backend or NFTABLES
        synced = self.hostfw.sync(intent, mode=mode, backend=backend, dry_run=dry_run,
                                  judge_it=config is not None)
        result.changes += synced.changes
        if config is not None:
            result.conflicts = synced.conflicts
        if synced.errors:
            raise RuntimeError("; ".join(synced.errors))

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


class Refused(Exception):
    """A step that must not act (its message is the whole story, no exception type)."""


@dataclass(frozen=True, order=True)
class Brand:
    """What makes an `ip rule` ours: priority + fwmark + table, whatever its mask."""

    priority: int
    mark: int
    table: int


def _owners(config: Config | None, tag: Tag, paths: tuple[TagPath, ...] | None) -> dict[Brand, str]:
    """The brands of this pass (one per path) and the config key that names each one's table."""
    if config is not None:
        paths = config.tag_paths()
    if not paths or (config is not None and not config.paths):
        t = paths[0] if paths else tag
        return {Brand(t.priority, t.mark, t.table): "tag.table"}
    return {Brand(p.priority, p.mark, p.table): f"table for path {p.name}" for p in paths}


def _uses_table(desired: DesiredState, table: int) -> bool:
    return any(r.table == table for r in desired.rules) or any(r.table == table for r in desired.routes)


def _rule_brands(desired: DesiredState) -> frozenset[Brand]:
    return frozenset(Brand(r.priority, r.fwmark, r.table) for r in desired.rules)


def _outside(items: frozenset[Any], refused: frozenset[int]) -> frozenset[Any]:
    """Rules or routes not in a refused table (a table we may not own leaves its rule alone too)."""
    return items if not refused else frozenset(x for x in items if x.table not in refused)


RECORD_FILE = "tables.json"
MAX_RECORD_BYTES = 64 * 1024


def _record_int(value: object, low: int, high: int, what: str, refused: dict[int, str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} {value!r} is not in {low}..{high}")
    if value in refused:
        raise ValueError(f"{what} {value} is the kernel's {refused[value]}")
    return value


class RoutingRecord:
    """RUN_DIR/tables.json: the routing tables wholly ours (adopted) and the rule brands we
    wrote, so a tag changed by a reload or while we were stopped is still swept, and nothing
    else ever is. `{"tables": [42], "rules": [{"priority": 1042, "mark": 42, "table": 42}]}`;
    the list `[42]` of earlier versions reads as tables without brands.

    What is read back is checked whole: table ids in 1..2^32-1 and not 0/253/254/255,
    priorities 1..32765, marks 1..2^32-1; anything else is refused with an error naming the
    file, and no rule or route is touched (a planted [254] once deleted the main table)."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.path = run_dir.file(RECORD_FILE)

    def read(self) -> tuple[frozenset[int], frozenset[Brand]]:
        try:
            raw = self.run_dir.read(RECORD_FILE, MAX_RECORD_BYTES)
        except RunDirError as e:
            raise Refused(f"{e}: no rule or route is touched until it is removed") from None
        if raw is None:
            return frozenset(), frozenset()
        try:
            return self._parse(json.loads(raw))
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise Refused(f"{self.path} is not a record tagrouted wrote ({e}): no rule or route is "
                          "touched until it is removed (check table and rule by hand first)") from None

    @staticmethod
    def _parse(data: object) -> tuple[frozenset[int], frozenset[Brand]]:
        if isinstance(data, list):
            data = {"tables": data, "rules": []}
        if not isinstance(data, dict) or set(data) != {"tables", "rules"}:
            raise ValueError('expected {"tables": [...], "rules": [...]}')
        tables, rules = data["tables"], data["rules"]
        if not isinstance(tables, list) or not isinstance(rules, list) or len(tables) + len(rules) > 1000:
            raise ValueError("tables and rules must be short lists")
        out_tables = frozenset(_record_int(t, 1, 0xFFFFFFFF, "table", RESERVED_TABLES) for t in tables)
        brands: set[Brand] = set()
        for rule in rules:
            if not isinstance(rule, dict) or set(rule) != {"priority", "mark", "table"}:
                raise ValueError("a rule is {priority, mark, table}")
            brands.add(Brand(_record_int(rule["priority"], 1, 32765, "priority", {}),
                             _record_int(rule["mark"], 1, 0xFFFFFFFF, "mark", {}),
                             _record_int(rule["table"], 1, 0xFFFFFFFF, "table", RESERVED_TABLES)))
        return out_tables, frozenset(brands)

    def write(self, tables: frozenset[int], brands: frozenset[Brand]) -> None:
        try:
            if self.read() == (tables, brands):
                return
        except Refused:
            pass  # never reached with a bad record: _adopt refuses before any write
        data = {"tables": sorted(tables),
                "rules": [{"priority": b.priority, "mark": b.mark, "table": b.table} for b in sorted(brands)]}
        self.run_dir.write(RECORD_FILE, (json.dumps(data, sort_keys=True) + "\n").encode())


def _fam(family: int) -> str:
    return "IPv4" if family == 4 else "IPv6"


def drift_lines(converger: Converger, config: Config) -> list[str]:
    """`tagroutectl diff`: +/- lines of what the kernel lacks (+) or has in excess (-)."""
    desired, facts = converger.desired(config, config.tag)
    lines: list[str] = []
    adopted = ConvergeResult(desired, facts)
    try:
        converger._adopt(adopted, True, _owners(config, config.tag, None))
    except Refused as e:
        return [f"!{e}"]
    lines += [f"!{e.removeprefix('routing tables: ')}" for e in adopted.errors]
    refused = converger._refused
    want_rules, kernel_rules = _outside(desired.rules, refused), _outside(converger._kernel_rules(), refused)
    lines += [f"+{rule_line(r)}" for r in sorted(want_rules - kernel_rules)]
    lines += [f"-{rule_line(r)}" for r in sorted(kernel_rules - want_rules)]
    want_routes = _outside(desired.routes, refused)
    kernel_routes = _outside(converger.netlink.read_routes(converger._tables), refused)
    lines += [f"+{route_line(r)}" for r in sorted(want_routes - kernel_routes, key=route_key)]
    lines += [f"-{route_line(r)}" for r in sorted(kernel_routes - want_routes, key=route_key)]
    for s in desired.sysctls:
        current = read_sysctl(s.key)
        if current is not None and current != s.value:
            lines += [f"-{sysctl_line(Sysctl(s.key, current))}", f"+{sysctl_line(s)}"]
    chosen = choose(config.firewall.backend).backend
    lines += converger.backend(chosen).drift_lines(desired.firewall)
    for name in BACKENDS:
        if name == chosen:
            continue
        with contextlib.suppress(BackendUnavailable):
            if converger.backend(name).holds_state():
                lines.append(f"-{name}: state of the backend not in use (removed by the next apply)")
    lines += converger.hostfw.drift_lines(desired.firewall, mode=config.firewall.host_firewall,
                                          backend=chosen)
    return lines
