"""The scheduler's lanes and the change log, without a kernel: which lane a poke reaches, and
that a change is handed on the moment a step adds it (issue 15)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path

import pytest

from tagrouted.core.config import PortRange, load_config
from tagrouted.core.desired import assumed_facts, desired_state
from tagrouted.core.state import Change, DesiredState, HostFacts
from tagrouted.daemon.scheduler import (
    FIREWALL_PARTS,
    ROUTING_PARTS,
    Dispatcher,
    Lane,
    ReloadWaiter,
)
from tagrouted.kernel.converge import (
    ALL_PARTS,
    FIREWALL,
    HOSTFW,
    ROUTING,
    SYSCTLS,
    ChangeLog,
    ConvergeResult,
    routing_view,
)


def lanes() -> tuple[Lane, Lane, Dispatcher]:
    routing = Lane("routing", ROUTING_PARTS, 2.0)
    reconcile = Lane("reconcile", FIREWALL_PARTS, 2.0)
    return routing, reconcile, Dispatcher(routing, reconcile)


def pending(lane: Lane) -> tuple[set[str], set[str], int]:
    work = lane.trigger.take(deadline=0.0)
    if work is None:
        return set(), set(), 0
    return work.causes, work.parts, len(work.waiters)


def test_the_lanes_own_disjoint_parts_that_cover_everything() -> None:
    assert not ROUTING_PARTS & FIREWALL_PARTS
    assert ROUTING_PARTS | FIREWALL_PARTS == ALL_PARTS


@pytest.mark.parametrize(("cause", "parts", "to_routing", "to_reconcile"), [
    # a link, route or rule event: the routing lane alone, so it never waits for firewall work
    ("netlink", {ROUTING, SYSCTLS}, {ROUTING, SYSCTLS}, set()),
    # an nf_tables event, a firewall-only poke: the reconcile lane alone
    ("nftables", {FIREWALL}, set(), {FIREWALL}),
    # start and lost events: each lane gets its own parts
    ("nftables", {HOSTFW}, set(), {HOSTFW}),  # another program's table: the host firewall
    ("start", ALL_PARTS, {ROUTING, SYSCTLS}, {FIREWALL, HOSTFW}),
    ("overflow", ALL_PARTS, {ROUTING, SYSCTLS}, {FIREWALL, HOSTFW}),
])
def test_a_poke_reaches_the_lanes_owning_its_parts(cause: str, parts: set[str], to_routing: set[str],
                                                   to_reconcile: set[str]) -> None:
    routing, reconcile, trigger = lanes()
    trigger.poke(cause, parts)
    for lane, wanted in ((routing, to_routing), (reconcile, to_reconcile)):
        causes, got, _ = pending(lane)
        assert got == wanted
        assert causes == ({cause} if wanted else set())


def test_reloads_and_file_edits_go_to_the_reconcile_lane_only() -> None:
    """It reads the config once and hands the routing parts over itself."""
    routing, reconcile, trigger = lanes()
    waiter = ReloadWaiter()
    trigger.poke("reload", ALL_PARTS, waiter=waiter)
    trigger.poke("file", ())
    assert pending(routing) == (set(), set(), 0)
    causes, parts, waiters = pending(reconcile)
    assert causes == {"reload", "file"} and parts == set(ALL_PARTS) and waiters == 1


def test_stop_reaches_both_lanes() -> None:
    routing, reconcile, trigger = lanes()
    trigger.stop()
    for lane in (routing, reconcile):
        work = lane.trigger.take(None)
        assert work is not None and work.stop


def test_the_change_log_hands_each_change_on_as_it_is_added() -> None:
    seen: list[str] = []
    log = ChangeLog(lambda c: seen.append(c.message))
    a, b, c = (Change("added", "route", m) for m in ("a", "b", "c"))
    log.append(a)
    assert seen == ["a"]  # before the step goes on to the next write
    log += [b]
    log.extend([c])
    assert seen == ["a", "b", "c"] and list(log) == [a, b, c]


def test_a_result_without_a_listener_is_a_plain_list() -> None:
    result = ConvergeResult(DesiredState(), HostFacts())
    result.changes += [Change("set", "sysctl", "x")]
    result.changes.append(Change("set", "sysctl", "y"))
    assert [c.message for c in result.changes] == ["x", "y"]


# ---- the firewall lane reuses the last compile: the firewall part never depends on the facts ----
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "etc" / "tagrouted" / "examples").glob("*.yaml"))


def _facts_variants(config_facts: HostFacts) -> list[HostFacts]:
    links = config_facts.links
    out = [config_facts, HostFacts(links=(), rp_filter_all=1)]
    for i in range(len(links)):  # each named link down, then gone, then back with a new index
        down = tuple(replace(link, up=False) if j == i else link for j, link in enumerate(links))
        gone = tuple(link for j, link in enumerate(links) if j != i)
        moved = tuple(replace(link, index=link.index + 100) if j == i else link for j, link in enumerate(links))
        out += [HostFacts(down), HostFacts(gone, rp_filter_all=2), HostFacts(moved)]
    out.append(HostFacts(tuple(replace(link, accept_ra=1) for link in links)))
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_firewall_part_of_the_desired_state_never_depends_on_the_host_facts(path: Path) -> None:
    """Converger.desired(firewall_only=True) relies on it: everything but the routes, rules,
    sysctls and notes is the same whatever links are present, up or renumbered."""
    config = load_config(str(path))

    def firewall_part(facts: HostFacts) -> DesiredState:
        return replace(desired_state(config, facts), routes=frozenset(), rules=frozenset(), sysctls=(), notes=())

    want = firewall_part(assumed_facts(config))
    for variant in _facts_variants(assumed_facts(config)):
        assert firewall_part(variant) == want, variant


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_routing_part_sees_the_services_only_through_their_families(path: Path) -> None:
    """Converger.desired(routing_only=True) compiles routing_view(config): the same routes,
    rules, sysctls and notes as the whole config, whatever the facts, with 1000 services too."""
    config = load_config(str(path))
    family = {4: "192.168.100.", 6: "fd00:100::"}
    many = tuple(replace(config.services[i % len(config.services)], name=f"s{i}", port=PortRange(20000 + i, 20000 + i),
                         address=ip_address(f"{family[config.services[i % len(config.services)].family]}{i % 200 + 3}"))
                 for i in range(1000)) if config.services else ()
    for cfg in (config, replace(config, services=many)):
        view = routing_view(cfg)
        assert len(view.services) <= 2
        for facts in _facts_variants(assumed_facts(cfg)):
            full, seen = desired_state(cfg, facts), desired_state(view, facts)
            assert (seen.routes, seen.rules, seen.sysctls, seen.notes) == (
                full.routes, full.rules, full.sysctls, full.notes), facts
