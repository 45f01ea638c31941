"""Run `tagrouted` with a timeline recorder, to find where the tunnel-up tail comes from.

Used as the daemon's entry point by `bench_tunnel.py --trace` (never by the product): it wraps a
few functions of the daemon with time.perf_counter() stamps (CLOCK_MONOTONIC: the measuring
process's t0/t1 are on the same clock) and writes the timeline as JSON to TAGROUTED_TRACE at
exit. Stamps: a netlink datagram handed to the daemon (with the link events in it), every poke,
every `take` by a worker, every pass (causes, parts), each kernel read/write of the pass
(link/rule/route dumps, route writes, sysctls, iptables, counters), and the garbage collector.
The wrappers cost a few microseconds per call; the numbers they give are for attribution,
bench_tunnel's own table stays the measure.

    TAGROUTED_TRACE=/tmp/trace.json python tests/bench/tailtrace.py --config ... --run-dir ...
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# (t, thread, what, detail as JSON); list.append is atomic. Only atomic values in the tuples: the
# collector stops tracking such tuples, so the timeline does not make the collections it measures
# longer (a list per stamp made full collections of the daemon 20-90 ms).
EVENTS: list[tuple[float, str, str, str]] = []


def stamp(what: str, detail: Any = None) -> None:
    EVENTS.append((time.perf_counter(), threading.current_thread().name, what, json.dumps(detail)))


def _span(obj: Any, name: str, label: str, detail: Any = None) -> None:
    """Stamp `label+` before and `label-` after every call of obj.name."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        d = detail(*args, **kwargs) if callable(detail) else detail
        stamp(label + "+", d)
        try:
            return original(*args, **kwargs)
        finally:
            stamp(label + "-", d)

    setattr(obj, name, wrapper)


def install() -> None:
    from tagrouted.daemon import events, scheduler
    from tagrouted.kernel import converge, netlink
    from tagrouted.kernel.firewall import iptables_legacy

    for name in dir(scheduler):
        if name == "Trigger":
            cls = getattr(scheduler, name)
            original_poke = cls.poke

            def poke(self: Any, cause: str, *args: Any, _orig: Any = original_poke, **kwargs: Any) -> Any:
                stamp("poke", cause)
                return _orig(self, cause, *args, **kwargs)

            cls.poke = poke
            original_take = cls.take

            def take(self: Any, *args: Any, _orig: Any = original_take, **kwargs: Any) -> Any:
                work = _orig(self, *args, **kwargs)
                if work is not None:
                    stamp("take", sorted(getattr(work, "causes", ())))
                return work

            cls.take = take

    original_on = scheduler.Daemon.on_netlink

    def on_netlink(self: Any, evs: list[Any]) -> Any:
        stamp("nl", [(e.kind, e.new, e.index, e.up, e.table) for e in evs])
        return original_on(self, evs)

    scheduler.Daemon.on_netlink = on_netlink
    _ = events
    _span(converge.Converger, "converge", "pass",
          lambda self, config, tag=None, **kw: sorted(kw.get("parts", ())))
    for name in ("host_facts", "read_rules", "read_routes", "add_route", "del_route", "add_rule",
                 "del_rule", "link_facts", "read_table_routes", "read_table_rules"):
        if hasattr(netlink.NetlinkAdapter, name):
            _span(netlink.NetlinkAdapter, name, name)
    for name in ("_sysctls", "_iptables", "_firewall"):
        if hasattr(converge.Converger, name):
            _span(converge.Converger, name, name.strip("_"))
    from tagrouted.kernel import sysctl

    for name in ("remember", "forget", "originals"):
        _span(sysctl.SavedSysctls, name, "saved." + name)
    for name in ("read_sysctl", "write_sysctl"):
        _span(converge, name, name)
    _span(converge.RoutingTables, "keep_only", "tables.keep_only")
    _span(converge.RoutingTables, "add", "tables.add")
    _span(iptables_legacy, "sync_table", "sync_table", lambda family, table, *a, **k: f"{table}{family}")
    if hasattr(scheduler.Daemon, "_read_counters"):
        _span(scheduler.Daemon, "_read_counters", "counters")
    gc.callbacks.append(lambda phase, info: stamp("gc+" if phase == "start" else "gc-", info["generation"]))


def dump() -> None:
    path = os.environ.get("TAGROUTED_TRACE")
    if path:
        import collections

        live = collections.Counter(type(o).__name__ for o in gc.get_objects())  # not the frozen
        stamp("gc-live", [len(gc.get_objects()), gc.get_freeze_count(), live.most_common(15)])
        with open(path, "w") as f:
            json.dump([(t, th, what, json.loads(d)) for t, th, what, d in EVENTS], f)


def snapshot_on_request(prefix: str) -> None:
    """TAGROUTED_TRACEMALLOC=PREFIX: trace Python allocations; whenever PREFIX.N.req appears, write
    the snapshot to PREFIX.N (bench_idle --tracemalloc compares two of them)."""
    import tracemalloc

    tracemalloc.start(8)

    def serve() -> None:
        n = 0
        while True:
            req = f"{prefix}.{n}.req"
            if os.path.exists(req):
                tracemalloc.take_snapshot().dump(f"{prefix}.{n}")
                os.unlink(req)
                n += 1
            time.sleep(0.1)

    threading.Thread(target=serve, name="tracemalloc", daemon=True).start()


if __name__ == "__main__":
    if os.environ.get("TAGROUTED_TRACEMALLOC"):
        snapshot_on_request(os.environ["TAGROUTED_TRACEMALLOC"])
    if os.environ.get("TAGROUTED_TRACE"):
        install()
    atexit.register(dump)
    from tagrouted.daemon.main import main

    sys.exit(main(sys.argv[1:]))


# ---- analysis (in the benchmark process) -----------------------------------------------------

def _first(events: list[tuple[float, str, str, Any]], after: float, what: str,
           pred: Any = None, before: float | None = None) -> tuple[float, str, str, Any] | None:
    for ev in events:
        if ev[0] < after or ev[2] != what:
            continue
        if before is not None and ev[0] > before:
            return None
        if pred is None or pred(ev):
            return ev
    return None


def gc_summary(events: list[tuple[float, str, str, Any]]) -> dict[int, list[float]]:
    """generation -> durations of every collection in the trace."""
    out: dict[int, list[float]] = {}
    opened: dict[str, tuple[float, int]] = {}
    for t, thread, what, detail in sorted((tuple(e) for e in events), key=lambda e: e[0]):  # type: ignore[misc]
        if what == "gc+":
            opened[thread] = (t, detail)
        elif what == "gc-" and thread in opened:
            start, gen = opened.pop(thread)
            out.setdefault(gen, []).append(t - start)
    return out


def attribute(events: list[tuple[float, str, str, Any]], flaps: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Per flap (t0 = up sent, t1 = route and rp_filter seen): where the time went."""
    events = sorted((tuple(e) for e in events), key=lambda e: e[0])  # type: ignore[misc]
    passes: list[tuple[float, float, str, Any]] = []  # (start, end, thread, parts)
    open_: dict[str, tuple[float, Any]] = {}
    gcs: list[tuple[float, float, int]] = []
    gc_open: dict[str, tuple[float, int]] = {}
    for t, thread, what, detail in events:
        if what == "pass+":
            open_[thread] = (t, detail)
        elif what == "pass-" and thread in open_:
            start, parts = open_.pop(thread)
            passes.append((start, t, thread, parts))
        elif what == "gc+":
            gc_open[thread] = (t, detail)
        elif what == "gc-" and thread in gc_open:
            start, gen = gc_open.pop(thread)
            gcs.append((start, t, gen))
    out = []
    for t0, t1 in flaps:
        row: dict[str, Any] = {"total": t1 - t0}
        busy = [p for p in passes if p[0] < t0 < p[1]]
        row["busy_at_t0"] = [(p[2], "+".join(p[3]) or "?", p[1] - t0) for p in busy]
        nl = _first(events, t0, "nl", lambda e: any(k == "link" and new and up for k, new, _i, up, _t in e[3]),
                    before=t1)
        row["nl"] = nl[0] - t0 if nl else None
        # the pass that wrote the route: the last pass+ before the add_route- that precedes t1
        add = None
        for ev in events:
            if t0 <= ev[0] <= t1 and ev[2] == "add_route-":
                add = ev
        if add is not None:
            row["route_written"] = add[0] - t0
            start = max((p for p in passes if p[0] <= add[0] <= p[1]), key=lambda p: p[0], default=None)
            if start is None:  # the pass has not ended in the trace: find its start
                st = [ev for ev in events if ev[2] == "pass+" and ev[1] == add[1] and ev[0] <= add[0]]
                start_t = st[-1][0] if st else None
            else:
                start_t = start[0]
            row["pass_start"] = None if start_t is None else start_t - t0
            take = [ev for ev in events if ev[2] == "take" and ev[1] == add[1] and ev[0] <= add[0]]
            row["take"] = take[-1][0] - t0 if take else None
            row["take_causes"] = take[-1][3] if take else None
            steps: dict[str, float] = {}
            opened: dict[str, float] = {}
            for ev in events:
                if ev[1] != add[1] or start_t is None or not (start_t <= ev[0] <= add[0]):
                    continue
                if ev[2].endswith("+"):
                    opened[ev[2][:-1]] = ev[0]
                elif ev[2].endswith("-") and ev[2][:-1] in opened:
                    name = ev[2][:-1]
                    steps[name] = steps.get(name, 0.0) + ev[0] - opened.pop(name)
            row["steps"] = steps
        wrote = [ev for ev in events if t0 <= ev[0] <= t1 and ev[2] == "write_sysctl-"]
        row["sysctl_written"] = wrote[-1][0] - t0 if wrote else None
        spans: dict[str, float] = {}
        opened2: dict[tuple[str, str], float] = {}
        for ev in events:
            if not (t0 <= ev[0] <= t1):
                continue
            if ev[2].endswith("+"):
                opened2[(ev[1], ev[2][:-1])] = ev[0]
            elif ev[2].endswith("-") and (ev[1], ev[2][:-1]) in opened2:
                name = ev[2][:-1]
                spans[name] = spans.get(name, 0.0) + ev[0] - opened2.pop((ev[1], name))
        row["spans"] = spans
        row["gc"] = sum(min(e, t1) - max(s, t0) for s, e, _g in gcs if s < t1 and e > t0)
        out.append(row)
    return out
