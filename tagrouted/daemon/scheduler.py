"""The scheduler: two reconcile lanes, each fed by a one-slot, coalescing trigger.

Owns the daemon's running state: the Config in use (the last good one), the Convergers (so each
netlink socket and libiptc handle lives in one thread only), the status snapshot the control
socket serves, the reasons written into each change record, and what systemd is told.
Never decides policy (desired.py) nor touches the kernel except through `Converger.converge`
and the read-only counters.

Two lanes, and why (issue 15): a tunnel going up must not queue behind firewall work (reading
six iptables tables, a resync, the counters read, an nf_tables-triggered pass), which took
milliseconds to tens of milliseconds per pass, so a routing change gets a lane of its own:
- the routing lane (thread "routing") alone converges ROUTING and SYSCTLS: our policy rules,
  the routes of our tables and our branded routes, and the sysctls (the tunnel's rp_filter,
  forwarding, accept_ra); it alone owns the run directory's tables.json and sysctl-originals.json;
- the reconcile lane (thread "reconcile") alone converges FIREWALL (whichever backend: it only
  calls converge with parts={FIREWALL}), flushes stale conntrack and reads the counters; it
  alone reads the config file, answers reloads and pings the systemd watchdog.
DESIGN's "one reconcile worker" becomes one worker per kind of object: the two never write the
same objects (their parts are disjoint, and each step of converge writes only its part's
objects), each re-reads the kernel for what it writes, so neither acts on the other's memory.
Each lane has its own Converger: its own netlink socket; the firewall lane reads links only for
the desired state. A reload is read once, by the reconcile lane, which hands the routing parts to
the routing lane, converges the firewall meanwhile and answers when both are done.
Python's GIL: a lane in Python code keeps the other waiting up to the switch interval (5 ms by
default), so the daemon sets it to SWITCH_INTERVAL.

Threads and who may do what:
- each lane's thread (`_work`) is the only one that reads or writes its part of the kernel;
- everything else only pokes a lane's Trigger with a cause and the parts to converge: the netlink
  watcher (events.py: the routing lane), the config file watcher, the main thread (SIGHUP), the
  control socket (reload also waits for the answer; status reads the last published snapshot).
  `Daemon.trigger.poke(cause, parts)` hands each lane its parts, reloads to the reconcile lane;
- timers (periodic resync, retry after errors, the systemd watchdog) are deadlines of a lane's
  wait; the reconcile lane pings the watchdog only while the routing lane is alive and not stuck
  in a pass, so WATCHDOG=1 proves both loops alive;
- the status snapshot, the records' bookkeeping and sd_notify are shared, under one lock.

Coalescing: a poke sets a due time (now + its gap: none for netlink and reloads, longer for file
events); every cause that arrives before the lane takes the slot joins the same pass. Link,
address, route and rule events converge ROUTING and SYSCTLS (a new tunnel's rp_filter); the
resync timer converges what no event announces (SYSCTLS on the routing lane, FIREWALL on the
other), and every ROUTING_SAFETY_EVERY-th routing timer pass ROUTING too, as a safety net;
start, reload, retries and a netlink overflow converge every part of a lane.
Our own route/rule writes echo back as RTM_NEW* events: additions seen while a routing pass runs
or just after it are dropped, deletions always poke (a repeat pass that finds nothing to do
writes nothing, so echoes cannot loop).

Host firewall (issue 11): another program's nf_tables transaction that touched any table but
ours pokes HOSTFW on the reconcile lane after a 250 ms gap that lets a script's burst (Docker's
restart, `iptables -F; iptables -X`) finish; legacy tables announce nothing, so the timer reads
them. The conflicts are kept as judged by the last HOSTFW pass: one journal warning each when it
appears (TAGROUTED_OBJECT=conflict), one notice when it goes, and never "in sync" while one that
surely blocks is known.
Records: each change is logged the moment converge makes it (ChangeLog), with the pass's reason,
so a repair is never visible in the kernel long before its record.
nf_tables: another process's transaction that touched our table pokes the reconcile lane (our
own are known by the committing thread: the reconcile lane's, which makes every firewall write).
With the nftables backend and its events, the resync timer no longer reads the firewall: the
reconcile lane's timer pass only reads the counters and checks the config file.
One owner of the kernel state: `tagroutectl apply` with a daemon running asks it to reload
(the same pass as `reload`), and `tagroutectl down` asks it to remove everything it owns and
hold it down: the reconcile lane takes the firewall away and hands the routing parts to the
routing lane; no pass runs for events, timers or file edits until `reload` (or `apply`), SIGHUP
or a restart, and the status says so (never "in sync"). Its records carry reason down.
Metrics (metrics.py, only when `metrics.listen` is set) serve the published snapshot; the lanes
only feed the pass-duration histogram.
Reasons in the records (TAGROUTED_REASON): start (until the first pass succeeds), reload (a new
config), resync (after lost netlink events), link (the desired state or a named interface
changed), drift (nothing we were told about changed, yet the kernel differed: someone else
changed it; logged as a warning and counted as a repair), stop (on_stop: remove).
Errors: the pass keeps what it did, the error is logged (once per distinct message) and kept
as last_error, and the lane's parts are retried on a timer with doubling backoff up to
resync_interval: health never waits for "something changed".
Garbage: after the first converge the heap is frozen (gc.freeze): a full collection then scans
only what came after, where it scanned every imported module's objects (8-13 ms, seen on the
tunnel-up path).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.config import Config, ConfigError, TagPath, load_config, read_config_bytes
from ..core.hostfw import Conflict
from ..core.state import ROUTE_PROTO, Change, DesiredState, HostFacts
from ..kernel.converge import ALL_PARTS, FIREWALL, HOSTFW, ROUTING, SYSCTLS, Converger, ConvergeResult
from ..kernel.firewall import IPTABLES_LEGACY, NFTABLES, Choice, choose
from ..kernel.hostfw import legacy_present
from .events import ConfigWatcher, NetlinkWatcher, NftBatch, NlEvent
from .journal import Notifier, fields

if TYPE_CHECKING:
    from .metrics import MetricsExporter

log = logging.getLogger("tagrouted.daemon")

ROUTING_PARTS = frozenset({ROUTING, SYSCTLS})   # the routing lane's
# the reconcile lane's: our firewall, and the host's own (our accepts in its FORWARD chains, the
# judgement of its whole ruleset: kernel/hostfw.py)
FIREWALL_PARTS = frozenset({FIREWALL, HOSTFW})
# The timer re-reads what the kernel does not announce: sysctls, and the legacy firewall (xtables
# announce nothing; nf_tables announces every change, so with nftables events the timer never
# reads the firewall: see Daemon.timer_parts). Rules and routes only as a safety net (netlink
# reports their every change, and a lost event is an overflow, which resyncs all).
TIMER_PARTS = frozenset({SYSCTLS, FIREWALL})
ROUTING_SAFETY_EVERY = 10
OUR_NFT_TABLE = (1, "tagrouted")  # (NFPROTO_INET, name)
# Causes whose firewall pass also sweeps what the backend not in use holds (a switch of backend).
FULL_CAUSES = frozenset({"start", "reload", "retry", "overflow"})
NETLINK_GAP = 0.0      # s: a routing pass costs ~1 ms; a burst that comes during one is the next
SWITCH_INTERVAL = 0.0005  # s: how long a lane in Python code may keep the other from the GIL
FILE_GAP = 0.05        # s: an editor's write-rename-chmod sequence is one change
# s: a script's burst of iptables commands (Docker's restart, `iptables -F; iptables -X`) is one
# change: writing our jump back in the middle of it would make its `-X` fail (chain not empty)
HOSTFW_GAP = 0.25
ECHO_WINDOW = 0.25     # s after a pass in which RTM_NEW* of our table are our own echo
FIRST_RETRY = 0.5      # s; doubles up to resync_interval
MIN_RESYNC = 0.1       # s: a smaller resync_interval would keep a core busy re-reading
RELOAD_WAIT = 55.0     # s a control client waits for its reload (tagroutectl allows 60)

DRIFT_WHAT = {
    "added": "it was missing",
    "removed": "it was not ours to keep",
    "replaced": "someone changed it",
    "set": "someone changed it",
}


class ReloadWaiter:
    """A control client waiting for the pass that handles its reload (or its `down`)."""

    def __init__(self, command: str = "reload") -> None:
        self.command = command
        self.done = threading.Event()
        self.reply: dict[str, Any] = {}

    def resolve(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.done.set()


@dataclass
class Work:
    causes: set[str] = field(default_factory=set)
    parts: set[str] = field(default_factory=set)
    waiters: list[ReloadWaiter] = field(default_factory=list)
    stop: bool = False


class Trigger:
    """The one slot: causes, parts and reload waiters accumulate until the worker takes them."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._work = Work()
        self._due: float | None = None

    def poke(self, cause: str, parts: frozenset[str] | set[str] = frozenset(), gap: float = 0.0,
             waiter: ReloadWaiter | None = None) -> None:
        with self._cond:
            self._work.causes.add(cause)
            self._work.parts |= set(parts)
            if waiter is not None:
                self._work.waiters.append(waiter)
            due = time.monotonic() + gap
            self._due = due if self._due is None else min(self._due, due)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._work.stop = True
            self._cond.notify()

    def take(self, deadline: float | None) -> Work | None:
        """The pending work once it is due; None when `deadline` comes first."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._work.stop or (self._due is not None and now >= self._due):
                    work, self._work, self._due = self._work, Work(), None
                    if work.stop:
                        self._work.stop = True  # stays stopped
                    return work
                until = self._due if self._due is not None else deadline
                if deadline is not None and until is not None:
                    until = min(until, deadline)
                if until is not None and now >= until:
                    return None
                self._cond.wait(None if until is None else until - now)


@dataclass
class _Snapshot:
    """What the worker knows, published as a dict for the control socket."""

    ready: bool = False
    in_sync: bool = False
    passes: int = 0
    repairs: int = 0
    last_converge: dict[str, Any] | None = None
    last_change: dict[str, Any] | None = None
    last_error: dict[str, Any] | None = None
    tunnel_up: bool | None = None
    counters: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    repairs_by_object: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=lambda: {"ok": 0, "rejected": 0})
    held_down_since: float | None = None  # `tagroutectl down` took everything away at this time
    tunnels_up: dict[str, bool] = field(default_factory=dict)  # each watched tunnel (paths)
    path_counters: dict[str, dict[str, tuple[int, int] | None]] = field(default_factory=dict)
    # service -> {"dropped" (allow_from) | "limited" (rate_limit): (packets, bytes) or None}
    policy_counters: dict[str, dict[str, tuple[int, int] | None]] = field(default_factory=dict)
    # the host firewall's conflicts with our traffic, as last judged: key -> Conflict
    conflicts: dict[str, Conflict] = field(default_factory=dict)
    counters_time: float | None = None  # when the counters above were read from the kernel


def tunnel_interface(config: Config) -> str | None:
    if config.vpn_client:
        return config.vpn_client.tunnel_interface
    if config.service and config.service.tunnel_interface:
        return config.service.tunnel_interface
    if config.vpn_server:
        return config.vpn_server.tunnel_interface
    return None


def path_tunnel(config: Config, path: TagPath) -> str | None:
    """The tunnel of `path` on this host (a vpn-client's; none on a separate service host)."""
    return path.tunnel_interface if config.has("vpn-client") else None


def watched_tunnels(config: Config) -> list[str]:
    """The tunnels whose state status reports: each path's on a vpn-client with `paths:`, else
    the one of tunnel_interface()."""
    if config.paths:
        return list(dict.fromkeys(t for p in config.paths if (t := path_tunnel(config, p))))
    tun = tunnel_interface(config)
    return [tun] if tun else []


def named_interfaces(config: Config) -> set[str]:
    names: set[str | None] = {tunnel_interface(config), *watched_tunnels(config)}
    if config.gateway:
        names.add(config.gateway.public_interface)
    if config.vpn_server:
        names.add(config.vpn_server.uplink_interface)
    if config.vpn_client:
        names.add(config.vpn_client.lan_interface)
    return {n for n in names if n}


def _link_state(facts: HostFacts, names: set[str]) -> dict[str, tuple[int, bool] | None]:
    """(ifindex, up) of each interface the config names: a tunnel recreated under the same
    name is a link change even when the desired state reads the same."""
    out: dict[str, tuple[int, bool] | None] = {}
    for name in sorted(names):
        link = facts.link(name)
        out[name] = (link.index, link.up) if link else None
    return out


class Lane:
    """One worker thread, its one-slot Trigger, the parts it alone converges, and what its passes
    remember (touched only by its own thread, except `passing`/`echo_until`, read by the
    netlink thread, and `busy_since`, read by the watchdog check)."""

    def __init__(self, name: str, parts: frozenset[str], interval: float) -> None:
        self.name = name
        self.parts = parts
        self.trigger = Trigger()
        self.thread: threading.Thread | None = None
        self.backoff = FIRST_RETRY
        self.retry_at: float | None = None
        self.next_resync = time.monotonic() + interval
        self.timer_passes = 0
        self.last_desired: DesiredState | None = None
        self.last_links: dict[str, tuple[int, bool] | None] | None = None
        self.carry_reason: str | None = None
        self.last_error_text: str | None = None
        self.last_notes: set[str] = set()
        self.converged = False      # a pass of every part of this lane has succeeded
        self.passing = False
        self.echo_until = 0.0
        self.busy_since: float | None = None

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Dispatcher:
    """`Daemon.trigger`: pokes go to the lane(s) owning their parts; a reload, a config file
    change and anything a client waits for go to the reconcile lane, which reads the config once
    and hands the routing parts over itself."""

    CONFIG_CAUSES = frozenset({"reload", "file"})

    def __init__(self, routing: Lane, reconcile: Lane) -> None:
        self.routing, self.reconcile = routing, reconcile

    def poke(self, cause: str, parts: frozenset[str] | set[str] = frozenset(), gap: float = 0.0,
             waiter: ReloadWaiter | None = None) -> None:
        parts = frozenset(parts)
        if waiter is not None or cause in self.CONFIG_CAUSES:
            self.reconcile.trigger.poke(cause, parts, gap, waiter)
            return
        if parts & self.routing.parts:
            self.routing.trigger.poke(cause, parts & self.routing.parts, gap)
        if parts & self.reconcile.parts:
            self.reconcile.trigger.poke(cause, parts & self.reconcile.parts, gap)

    def stop(self) -> None:
        self.routing.trigger.stop()
        self.reconcile.trigger.stop()


class Daemon:
    """Wires the event sources to the lanes; `start()`, then `stop()` from the main thread."""

    def __init__(self, config: Config, config_path: str, run_dir: str,
                 notifier: Notifier | None = None, test_faults: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.run_dir = run_dir
        self.notifier = notifier or Notifier({})
        self.test_faults = test_faults
        interval = self._interval(config)
        self.routing = Lane("routing", ROUTING_PARTS, interval)
        self.reconcile = Lane("reconcile", FIREWALL_PARTS, interval)
        self.trigger = Dispatcher(self.routing, self.reconcile)
        self.started = time.time()
        self.snap = _Snapshot()
        self._lock = threading.RLock()  # the snapshot, the records' bookkeeping, sd_notify
        self._status: dict[str, Any] = {}
        self._config_errors: list[str] = []
        self._config_digest, self._file_sig = self._file_identity()
        self._rejected_digest: str | None = None
        self._missing_logged = False
        self._part_ok = dict.fromkeys(ALL_PARTS, False)
        self._next_ping: float | None = None
        self._last_error_text: str | None = None
        self._links_seen: dict[int, tuple[str | None, bool] | None] = {}  # netlink thread only
        self._stop_watchdog = False
        self.exit_code = 0
        self.netlink = NetlinkWatcher(self.on_netlink, self.on_overflow)
        self.nft_events = NetlinkWatcher.netfilter(self.on_nftables, self.on_overflow)
        self._nft_events_live = False
        self._firewall_tid = 0  # the reconcile lane's thread id: it commits our nf_tables transactions
        self.firewall: Choice = choose(config.firewall.backend)
        self.files = ConfigWatcher(config_path, self.on_file_change)
        self.control: Any = None
        self.metrics: MetricsExporter | None = None  # made when metrics.listen is first set
        self._publish(None)

    # ---- lifecycle (main thread) -----------------------------------------------------------
    def start(self) -> None:
        from .control import ControlServer

        self.control = ControlServer(self.run_dir, self.handle_request,
                                     logging.getLogger("tagrouted.control"))
        self.control.bind()  # AlreadyRunning when a live daemon owns the run directory
        try:
            self._serve_metrics(self.config)
        except OSError as e:
            raise OSError(f"metrics.listen {self.config.metrics}: {e.strerror or e}") from None
        self.netlink.start()  # bound before the first converge dumps anything
        try:
            self.nft_events.start()
            self._nft_events_live = True
        except OSError as e:  # no nf_tables here: the timer re-reads the firewall instead
            log.warning("cannot watch nf_tables events (%s): the firewall is re-read every %gs",
                        e, self._interval(self.config))
        try:
            self.files.start()
        except Exception as e:  # inotify limits: the periodic stat check still notices edits
            log.warning("cannot watch %s: %s", self.config_path, e)
        self.control.start()
        self._note_backend(None)
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.trigger.poke("start", ALL_PARTS)
        for lane in (self.routing, self.reconcile):
            lane.thread = threading.Thread(target=self._work, args=(lane,), name=lane.name, daemon=True)
            lane.thread.start()

    def worker_alive(self) -> bool:
        return self.routing.alive() and self.reconcile.alive()

    def stop(self, timeout: float = 60.0) -> int:
        """Stop the lanes (the reconcile lane applies on_stop once the routing lane has ended),
        then the event sources; the exit status."""
        self.notifier.stopping()
        self.trigger.stop()
        deadline = time.monotonic() + timeout
        for lane in (self.routing, self.reconcile):
            if lane.thread is not None:
                lane.thread.join(max(0.0, deadline - time.monotonic()))
                if lane.thread.is_alive():
                    log.error("the %s lane did not stop within %.0fs", lane.name, timeout)
                    self.exit_code = 1
        for part in (self.control, self.metrics, self.files, self.netlink, self.nft_events):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        return self.exit_code

    def _serve_metrics(self, config: Config) -> None:
        """Serve /metrics where config.metrics says (nowhere: stop); OSError when it cannot.
        (The main thread at start, then only the reconcile lane on reloads.)"""
        if config.metrics is None and self.metrics is None:
            return
        if self.metrics is None:
            from .metrics import MetricsExporter  # prometheus_client loads only when asked for

            self.metrics = MetricsExporter(lambda: self._status)
        self.metrics.listen(config.metrics)

    def reload_from_signal(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        self.trigger.poke("reload", ALL_PARTS)

    def fault_stop_watchdog(self) -> None:
        """Test-only (TAGROUTED_TEST_FAULTS=1, SIGUSR2): behave like a hung loop for systemd."""
        if self.test_faults:
            log.warning("test fault: no more watchdog pings")
            self._stop_watchdog = True

    # ---- pokes (any thread) ----------------------------------------------------------------
    def on_netlink(self, events: list[NlEvent]) -> None:
        """(netlink thread) Poke the routing lane for what can change the desired state or
        undo ours."""
        tables = {p.table for p in self.config.tag_paths()}
        echo = self.routing.passing or time.monotonic() < self.routing.echo_until
        relevant = False
        for ev in events:
            if ev.kind == "link":
                # What the compiler reads of a link is its name and IFF_UP; the RTM_NEWLINKs
                # that only report carrier or operstate (linkwatch, ~1 per flap) change nothing.
                seen = (ev.ifname, bool(ev.up)) if ev.new else None
                if ev.index is None or self._links_seen.get(ev.index) != seen:
                    relevant = True
                if ev.index is not None:
                    if seen is None:
                        self._links_seen.pop(ev.index, None)
                    else:
                        self._links_seen[ev.index] = seen
            elif ev.kind == "addr":
                relevant = True  # a gateway may become reachable for a `via` route
            else:
                ours = ev.table in tables or (ev.kind == "route" and ev.proto == ROUTE_PROTO)
                relevant = relevant or (ours and not (ev.new and echo))
        if relevant:
            self.trigger.poke("netlink", ROUTING_PARTS, NETLINK_GAP)

    def on_nftables(self, batches: list[NftBatch]) -> None:
        """(nftables thread) Poke the reconcile lane for anyone else's transaction: one that
        touched our table repairs it; one that touched another table (Docker, ufw, iptables -F
        through iptables-nft, firewalld) re-reads the host firewall, after HOSTFW_GAP: our
        accepts there come back and its conflicts are judged again. The kernel names the
        committing thread (task_pid_nr), not the process; the batches of our own
        iptables-nft-restore come from a child: they cost one pass that finds nothing to do."""
        me = {os.getpid(), self._firewall_tid}
        ours = others = False
        for b in batches:
            if b.pid in me:
                continue
            ours = ours or OUR_NFT_TABLE in b.tables
            others = others or bool(b.tables - {OUR_NFT_TABLE}) or not b.tables
        if ours:
            self.trigger.poke("nftables", {FIREWALL}, NETLINK_GAP)
        if others:
            self.trigger.poke("nftables", {HOSTFW}, HOSTFW_GAP)

    def timer_parts(self, lane: Lane) -> frozenset[str]:
        """What a resync-timer pass of `lane` re-reads: see TIMER_PARTS. The host firewall too
        where legacy tables exist (they announce nothing) or nf_tables events cannot be had."""
        parts = lane.parts & TIMER_PARTS
        if lane is self.reconcile and self.firewall.backend == NFTABLES and self._nft_events_live:
            parts -= {FIREWALL}  # nf_tables announces every change to our table
        if lane is self.reconcile and (not self._nft_events_live or legacy_present()):
            parts |= {HOSTFW}
        return parts

    def on_overflow(self, why: str) -> None:
        self._links_seen.clear()  # events were lost: the next of each link counts again
        self.trigger.poke("overflow", ALL_PARTS)

    def on_file_change(self) -> None:
        self.trigger.poke("file", (), FILE_GAP)

    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        """The control socket's callback (its own threads): never touches the kernel."""
        command = req.get("command")
        if command == "status":
            return {"ok": True, "status": self._status}
        if command not in ("reload", "apply", "down"):
            return {"ok": False, "error": f"unknown command {command!r} (status, reload, apply, down)"}
        if command == "apply":
            # `tagroutectl --config X apply` must not believe X is applied when we run another file.
            named = req.get("config")
            if isinstance(named, str) and os.path.realpath(named) != os.path.realpath(self.config_path):
                return {"ok": False, "error": f"this tagrouted (pid {os.getpid()}) runs {self.config_path}, "
                                              f"not {named}: edit that file and run `tagroutectl apply` "
                                              "again, or stop the daemon first"}
            log.info("tagroutectl apply: re-reading %s and converging", self.config_path)
        elif command == "down":
            log.info("tagroutectl down: removing everything tagrouted owns and holding it down")
        waiter = ReloadWaiter(command)
        self.trigger.poke("down" if command == "down" else "reload",
                          () if command == "down" else ALL_PARTS, waiter=waiter)
        if not waiter.done.wait(RELOAD_WAIT):
            return {"ok": False, "error": f"the {command} did not finish within {RELOAD_WAIT:.0f}s"}
        return {**waiter.reply, "pid": os.getpid()}

    # ---- the lanes -------------------------------------------------------------------------
    def _work(self, lane: Lane) -> None:
        converger = Converger(self.run_dir)
        main = lane is self.reconcile
        if main:
            self._firewall_tid = threading.get_native_id()
        interval = self.notifier.watchdog_interval if main else None
        if interval:
            self._next_ping = time.monotonic()
        try:
            while True:
                deadlines = [d for d in (lane.next_resync, lane.retry_at, self._next_ping if main else None)
                             if d is not None]
                work = lane.trigger.take(min(deadlines) if deadlines else None)
                now = time.monotonic()
                if main and self._next_ping is not None and now >= self._next_ping and interval:
                    if not self._stop_watchdog and self._routing_lane_healthy(now, interval):
                        self.notifier.watchdog()
                    self._next_ping = now + interval
                if work is None:
                    if lane.retry_at is not None and now >= lane.retry_at:
                        lane.retry_at = None
                        lane.trigger.poke("retry", lane.parts)
                    if now >= lane.next_resync:
                        lane.next_resync = now + self._interval(self.config)
                        lane.timer_passes += 1
                        safety = lane.timer_passes % ROUTING_SAFETY_EVERY == 0
                        parts = self.timer_parts(lane)
                        lane.trigger.poke("timer", lane.parts if safety and lane is self.routing else parts)
                    continue
                if work.stop:
                    self._on_stop(lane, converger, work)
                    return
                lane.busy_since = now
                try:
                    if main:
                        self._reconcile_pass(converger, work)
                    else:
                        self._lane_pass(lane, converger, work, set(work.parts))
                except Exception as e:  # a bug must not end the loop: record, retry
                    log.exception("%s pass failed: %s", lane.name, e)
                    self._failed(lane, f"{type(e).__name__}: {e}")
                    for w in work.waiters:
                        w.resolve({"ok": False, "errors": [f"internal error: {e}"]})
                finally:
                    lane.busy_since = None
        finally:
            converger.close()

    def _routing_lane_healthy(self, now: float, interval: float) -> bool:
        """The routing lane runs and no pass of it has taken two watchdog intervals."""
        busy = self.routing.busy_since
        return self.routing.alive() and (busy is None or now - busy < 2 * interval)

    @staticmethod
    def _interval(config: Config) -> float:
        return max(config.resync_interval, MIN_RESYNC)

    def _note_backend(self, previous: Choice | None) -> None:
        """Say which firewall backend keeps our rules (at start and when a reload changes it)."""
        if previous == self.firewall:
            return
        choice = self.firewall
        where = ("table inet tagrouted: see it with `nft list table inet tagrouted`"
                 if choice.backend == NFTABLES else
                 "legacy xtables chains TAGROUTED-*: see them with iptables-legacy-save / "
                 "ip6tables-legacy-save")
        log.info("firewall backend: %s (%s); our rules are in the %s", choice.backend, choice.why, where)
        if choice.backend == IPTABLES_LEGACY:
            with contextlib.suppress(Exception):
                from ..kernel.firewall.iptables_legacy import iptables_command_is_nft

                if iptables_command_is_nft():
                    log.info("`iptables` on this host is the nf_tables variant: it does not show "
                             "tagrouted's legacy rules")

    def _file_identity(self) -> tuple[str | None, tuple[int, ...] | None]:
        """(sha256 of the config file's bytes, its stat signature); Nones if unreadable or not
        a regular file (read without blocking: a FIFO there must not stall the worker)."""
        try:
            st = os.stat(self.config_path)
            data = read_config_bytes(self.config_path)
        except (OSError, ConfigError):
            return None, None
        return hashlib.sha256(data).hexdigest(), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _file_sig_now(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _reload(self, explicit: bool) -> tuple[str, list[str]]:
        """("applied" | "rejected" | "unchanged", problems). An edit whose bytes equal the
        running config (or the last rejected file) is "unchanged" unless asked explicitly."""
        digest, sig = self._file_identity()
        self._file_sig = sig
        if not explicit and digest is None:
            # Mid-replacement (a directory or file being swapped in) or deleted for good: keep
            # the running config; the file's return is seen by the watch or the stat check.
            if not self._missing_logged:
                log.warning("config %s is gone or unreadable: keeping the running config", self.config_path)
                self._missing_logged = True
            return "unchanged", []
        self._missing_logged = False
        if not explicit and digest in (self._config_digest, self._rejected_digest):
            return "unchanged", []
        if self.snap.ready:  # before READY=1 systemd is still waiting for the start
            with self._lock:
                self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            problems = [str(p) for p in e.problems]
            self._rejected_digest = digest
            self._config_errors = problems
            log.error("config %s rejected (%d problems); keeping the last good one in the kernel "
                      "and in memory", self.config_path, len(problems))
            for p in problems:
                log.error("%s", p)
            self._record_error(f"config rejected: {problems[0]}" + (
                f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
            return "rejected", problems
        old = self.config
        self.config = config
        previous, self.firewall = self.firewall, choose(config.firewall.backend)
        self._note_backend(previous)
        self._config_digest, self._rejected_digest, self._config_errors = digest, None, []
        if config.resync_interval != old.resync_interval:
            now = time.monotonic()
            self.reconcile.next_resync = now + self._interval(config)
            self.routing.next_resync = now + self._interval(config)  # a float: read there once
        if config.metrics != old.metrics:
            try:
                self._serve_metrics(config)
            except OSError as e:
                message = f"metrics.listen {config.metrics}: cannot listen: {e.strerror or e}"
                log.error("%s; no metrics until a reload with another address", message)
                self._record_error(message)
        log.info("config %s loaded: roles %s, %d services", self.config_path,
                 ", ".join(config.roles), len(config.services))
        return "applied", []

    def _reconcile_pass(self, converger: Converger, work: Work) -> None:
        """The reconcile lane's pass: (re)read the config when asked, hand the routing parts of
        a reload to the routing lane, converge the firewall, answer the reload once both are done."""
        causes, parts = work.causes, set(work.parts)
        explicit = "reload" in causes
        if "down" in causes:
            self._down(converger, work)
            return
        if self.snap.held_down_since is not None and not explicit:
            # Held down: events, timers and file edits change nothing until a reload.
            if "file" in causes:
                self.files.rewatch()
            return
        file_moved = "file" in causes or ("timer" in causes and self._file_sig_now() != self._file_sig)
        if "file" in causes:
            self.files.rewatch()  # the directory may be a new one
        outcome = "none"
        if explicit or file_moved:
            outcome, problems = self._reload(explicit)
            if outcome in ("applied", "rejected"):
                with self._lock:
                    self.snap.reloads["ok" if outcome == "applied" else "rejected"] += 1
            if outcome == "applied" and self.snap.held_down_since is not None:
                log.info("the hold of `tagroutectl down` is released by the reload: converging again")
                with self._lock:
                    self.snap.held_down_since = None
            if outcome == "rejected":
                reply = {"ok": False, "errors": problems}
                for w in work.waiters:
                    w.resolve(reply)
                work.waiters = []
                if self.snap.ready:
                    with self._lock:
                        self.notifier.ready(self._status_line())  # ends RELOADING=1
                        self._publish(None)
                if not (causes - {"reload", "file"}) or self.snap.held_down_since is not None:
                    return  # (a rejected file keeps a held-down host down, as it found it)
        handoff: ReloadWaiter | None = None
        if outcome == "applied" or (explicit and outcome != "rejected"):
            handoff = ReloadWaiter()
            self.routing.trigger.poke("reload", ROUTING_PARTS, waiter=handoff)
            parts |= FIREWALL_PARTS
        own = parts & FIREWALL_PARTS
        if "timer" in causes and FIREWALL not in own:
            # no firewall read (nf_tables events), yet the counters move: read them before the
            # pass (a host-firewall pass where legacy tables exist) publishes its status
            self._refresh_counters(converger)
        result = self._lane_pass(self.reconcile, converger, work, own, reloaded=outcome == "applied",
                                 answer=False) if own else None
        if handoff is None:
            if outcome == "unchanged" and not own and self.snap.ready and explicit:
                with self._lock:
                    self.notifier.ready(self._status_line())
            return
        if not handoff.done.wait(RELOAD_WAIT):
            handoff.reply = {"ok": False, "errors": ["the routing lane did not answer"]}
        routed = handoff.reply
        mine = result or ConvergeResult(DesiredState(), HostFacts())
        reply: dict[str, Any] = {  # routed["ok"]: False only when the routing lane could not pass
            "ok": bool(routed.get("ok", False)),
            "changes": list(routed.get("changes", [])) + [c.message for c in mine.changes],
            "notes": list(dict.fromkeys([*routed.get("notes", []), *mine.notes])),
        }
        errors = [*routed.get("apply_errors", []), *routed.get("errors", []), *mine.errors]
        if errors:
            reply["apply_errors" if reply["ok"] else "errors"] = errors
        blocked = [f"{'blocked' if c.severity == 'fail' else 'may block'}: {c.line()}"
                   for c in self.snap.conflicts.values()]
        if blocked:  # another firewall stops our traffic: the fix is theirs (tagroutectl prints it)
            reply["blocked"] = blocked
        for w in work.waiters:
            w.resolve(reply)
        with self._lock:
            if self.snap.ready:
                self.notifier.ready(self._status_line())  # ends RELOADING=1
            self._publish(None)

    def _lane_pass(self, lane: Lane, converger: Converger, work: Work, parts: set[str], *,
                   reloaded: bool | None = None, answer: bool = True) -> ConvergeResult | None:
        """Converge `parts` (all of them this lane's) once; log each change as it is made."""
        causes = work.causes
        if "down" in causes:  # the reconcile lane's `tagroutectl down` hands us our parts
            return self._down_routing(lane, converger, work)
        if (lane is self.routing and self.snap.held_down_since is not None
                and not (causes & {"reload"})):
            # Held down: nothing applied; the tunnel is still watched, for status and metrics.
            if causes & {"netlink", "overflow"}:
                with self._lock:
                    self._note_tunnels(converger.netlink.host_facts())
                    self._publish(None)
            return None
        if "overflow" in causes or "retry" in causes:
            parts |= lane.parts
        parts &= lane.parts
        if not parts:
            return None
        if reloaded is None:
            reloaded = "reload" in causes
        config = self.config
        overflow = "overflow" in causes
        reason: list[str] = []

        def on_change(result: ConvergeResult, change: Change) -> None:
            if not reason:
                reason.append(self._reason(lane, result, config, reloaded, overflow))
            self._log_change(change, reason[0])

        t0 = time.perf_counter()
        lane.passing = True
        try:
            result = converger.converge(config, parts=frozenset(parts), on_change=on_change,
                                        sweep_other_backend=FIREWALL in parts and bool(causes & FULL_CAUSES))
        finally:
            lane.passing = False
        elapsed = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.observe_pass(elapsed)
        if ROUTING in parts:
            lane.echo_until = time.monotonic() + ECHO_WINDOW
        if not reason:
            reason.append(self._reason(lane, result, config, reloaded, overflow))
        lane.carry_reason = None if result.ok else reason[0]
        self._record(lane, result, reason[0], parts, elapsed, causes)
        if FIREWALL in parts and result.backend:
            self._read_counters(converger, result.backend, result.desired)
        log.debug("%s pass (%s; %s) took %.1f ms (+%.1f ms after), %d changes", lane.name,
                  "+".join(sorted(causes)), "+".join(sorted(parts)), elapsed * 1000,
                  (time.perf_counter() - t0 - elapsed) * 1000, len(result.changes))
        if parts >= lane.parts & TIMER_PARTS:
            lane.next_resync = time.monotonic() + self._interval(config)
        if answer and work.waiters:
            reply: dict[str, Any] = {"ok": True, "changes": [c.message for c in result.changes],
                                     "notes": list(result.notes)}
            if result.errors:
                reply["apply_errors"] = list(result.errors)
            for w in work.waiters:
                w.resolve(reply)
        with self._lock:
            if result.ok and parts >= lane.parts:
                lane.converged = True
            if not self.snap.ready and self.routing.converged and self.reconcile.converged:
                self.snap.ready = True
                self._publish(result)
                log.info("converged: ready (%s)", self._status_line())
                self.notifier.ready(self._status_line())
                gc.freeze()  # what is alive now (modules, caches) is never garbage: stop rescanning it
            else:
                self._publish(result)
                if self.snap.ready or not result.ok:  # the first lane done is not news for systemd
                    self.notifier.status(self._status_line())
        return result

    def _reason(self, lane: Lane, result: ConvergeResult, config: Config, reloaded: bool,
                overflow: bool) -> str:
        links = _link_state(result.facts, named_interfaces(config))
        link_changed = (lane.last_desired is not None and result.desired != lane.last_desired) or (
            lane.last_links is not None and links != lane.last_links)
        lane.last_desired, lane.last_links = result.desired, links
        if not self.snap.ready:
            return "start"
        if reloaded:
            return "reload"
        if overflow:
            return "resync"
        if link_changed:
            return "link"
        return lane.carry_reason or "drift"

    def _record(self, lane: Lane, result: ConvergeResult, reason: str, parts: set[str], elapsed: float,
                causes: set[str]) -> None:
        now = time.time()
        # The desired state's notes are the same in both lanes: the routing lane says them.
        notes = set(result.notes) - (set(result.desired.notes) if lane is self.reconcile else set())
        for note in result.notes:
            if note in notes and note not in lane.last_notes:
                log.info("note: %s", note)
        lane.last_notes = notes
        with self._lock:
            if result.changes:
                self.snap.last_change = {"time": now, "message": result.changes[-1].message, "reason": reason}
                if reason in ("drift", "resync"):
                    self.snap.repairs += len(result.changes)
                    for change in result.changes:
                        by_object = self.snap.repairs_by_object
                        by_object[change.object] = by_object.get(change.object, 0) + 1
            self.snap.passes += 1
            # trigger: what woke the lane (start, netlink, file, reload, timer, retry, overflow);
            # the reason of a change is decided from what changed, see _reason.
            self.snap.last_converge = {"time": now, "trigger": "+".join(sorted(causes)),
                                       "reason": reason if result.changes else None,
                                       "duration_ms": round(elapsed * 1000, 3),
                                       "changes": len(result.changes), "parts": sorted(parts),
                                       "lane": lane.name}
            for part in parts:
                self._part_ok[part] = result.ok
            if result.conflicts is not None:
                self._note_conflicts(result.conflicts)
            self.snap.in_sync = all(self._part_ok.values()) and not self._blocking()
            if ROUTING in parts:
                self._note_tunnels(result.facts)
        if result.errors:
            self._failed(lane, "; ".join(result.errors))
        elif all(self._part_ok[p] for p in lane.parts):  # a pass that skipped the failing part
            # has not recovered it
            lane.backoff = FIRST_RETRY
            lane.retry_at = None
            if lane.last_error_text is not None:
                log.info("recovered: in sync again")
            lane.last_error_text = None

    def _blocking(self) -> list[Conflict]:
        return [c for c in self.snap.conflicts.values() if c.severity == "fail"]

    def _note_conflicts(self, conflicts: tuple[Conflict, ...]) -> None:
        """One journal warning per conflict when it appears, one notice when it goes (under
        the lock: the snapshot)."""
        now = {c.key: c for c in conflicts}
        for key, c in now.items():
            old = self.snap.conflicts.get(key)
            if old is None or old.severity != c.severity:
                extra = fields(TAGROUTED_ACTION="added", TAGROUTED_OBJECT="conflict",
                               TAGROUTED_REASON="drift")
                label = "blocked" if c.severity == "fail" else "may block"
                log.warning("%s: %s", label, c.line(), extra=extra)
        for key, c in self.snap.conflicts.items():
            if key not in now:
                extra = fields(TAGROUTED_ACTION="removed", TAGROUTED_OBJECT="conflict",
                               TAGROUTED_REASON="drift")
                log.info("conflict cleared: %s chain %s %s", c.table, c.chain, c.rule, extra=extra)
        self.snap.conflicts = now

    def _note_tunnels(self, facts: HostFacts) -> None:
        """Each watched tunnel's state, logged when it changes; tunnel_up: all of them up."""
        config = self.config
        by_tunnel: dict[str, list[str]] = {}
        if config.paths:
            for p in config.paths:
                if (tun := path_tunnel(config, p)) is not None:
                    by_tunnel.setdefault(tun, []).append(p.name)
        was, now = self.snap.tunnels_up, {}
        for tun in watched_tunnels(config):
            link = facts.link(tun)
            up = now[tun] = link is not None and link.up
            if up == was.get(tun) or (was.get(tun) is None and up):
                continue
            if up:
                log.info("tunnel %s is up", tun)
            elif tun in by_tunnel:
                others = len(config.paths) > len(by_tunnel[tun])
                log.warning("tunnel %s is %s: tagged replies of path %s meet its unreachable fallback%s",
                            tun, "down" if link else "gone", ", ".join(by_tunnel[tun]),
                            "; the other paths keep working" if others else "")
            else:
                log.warning("tunnel %s is %s: tagged replies meet the unreachable fallback",
                            tun, "down" if link else "gone")
        self.snap.tunnels_up = now
        if now:
            self.snap.tunnel_up = all(now.values())

    def _log_change(self, change: Change, reason: str) -> None:
        extra = fields(TAGROUTED_ACTION=change.action, TAGROUTED_OBJECT=change.object,
                       TAGROUTED_REASON=reason)
        if reason in ("drift", "resync"):
            what = DRIFT_WHAT.get(change.action, "someone changed it")
            label = "drift" if reason == "drift" else "found after lost netlink events"
            log.warning("%s (%s: %s)", change.message, label, what, extra=extra)
        else:
            log.info("%s", change.message, extra=extra)

    def _record_error(self, message: str) -> None:
        self.snap.last_error = {"time": time.time(), "message": message}

    def _failed(self, lane: Lane, message: str) -> None:
        """A pass failed (partly): keep the record, retry the lane's parts with doubling backoff."""
        self._record_error(message)
        if message != lane.last_error_text:
            log.error("converge failed: %s (retrying in %.1fs)", message, lane.backoff)
        else:
            log.debug("still failing: %s", message)
        lane.last_error_text = message
        lane.retry_at = time.monotonic() + lane.backoff
        lane.backoff = min(lane.backoff * 2, max(self._interval(self.config), FIRST_RETRY))
        self.snap.in_sync = False

    def _read_counters(self, converger: Converger, backend: str, desired: DesiredState) -> None:
        """(the reconcile lane) The kernel's per-service, per-path and policy counters."""
        try:
            counted = converger.backend(backend).counters(desired.firewall)
        except Exception as e:  # counters are informative: never fail a pass over them
            log.debug("reading counters failed: %s", e)
            return
        with self._lock:
            self.snap.counters, self.snap.path_counters = counted.services, counted.paths
            self.snap.policy_counters = counted.policy
            self.snap.counters_time = time.time()

    def _refresh_counters(self, converger: Converger) -> None:
        """A timer pass that reads no firewall (nf_tables events keep it): the counters only,
        for the desired state last compiled (no kernel read for it)."""
        config = self.config
        with contextlib.suppress(Exception):
            desired, _ = converger.desired(config, config.tag, firewall_only=True)
            self._read_counters(converger, self.firewall.backend, desired)
            with self._lock:
                self._publish(None)

    def _down(self, converger: Converger, work: Work) -> None:
        """(the reconcile lane) `tagroutectl down`: hold everything down first, take our firewall
        away, hand the routing parts to the routing lane (it removes our rules and routes and
        restores the sysctls), answer when both are done."""
        config = self.config
        now = time.time()
        with self._lock:
            if self.snap.held_down_since is None:
                self.snap.held_down_since = now
        handoff = ReloadWaiter("down")
        self.routing.trigger.poke("down", ROUTING_PARTS, waiter=handoff)
        t0 = time.perf_counter()
        result = converger.converge(None, config.tag, parts=FIREWALL_PARTS, paths=config.tag_paths(),
                                    on_change=lambda _r, change: self._log_change(change, "down"))
        elapsed = time.perf_counter() - t0
        if not handoff.done.wait(RELOAD_WAIT):
            handoff.reply = {"ok": False, "errors": ["the routing lane did not answer"]}
        routed = handoff.reply
        changes = [*routed.get("changes", []), *(c.message for c in result.changes)]
        errors = [*routed.get("errors", []), *result.errors]
        with self._lock:
            if changes:
                self.snap.last_change = {"time": time.time(), "message": changes[-1], "reason": "down"}
            self.snap.passes += 1
            self.snap.last_converge = {"time": now, "trigger": "+".join(sorted(work.causes)),
                                       "reason": "down" if changes else None,
                                       "duration_ms": round(elapsed * 1000, 3),
                                       "changes": len(changes), "parts": sorted(ALL_PARTS),
                                       "lane": self.reconcile.name}
            self.snap.counters, self.snap.path_counters, self.snap.policy_counters = {}, {}, {}
            self.snap.conflicts = {}  # nothing of ours to block: judged again on the release pass
            self._part_ok = dict.fromkeys(ALL_PARTS, False)  # the release pass re-checks everything
            self.snap.in_sync = False
            for lane in (self.routing, self.reconcile):
                lane.retry_at = None  # nothing is retried while held down
                lane.backoff = FIRST_RETRY
                lane.last_desired = lane.last_links = None
                lane.converged = False
        for error in errors:
            log.error("tagroutectl down: %s", error)
        if errors:
            self._record_error("down: " + "; ".join(errors))
        log.warning("held down by `tagroutectl down`: nothing is applied until `tagroutectl apply`, "
                    "`tagroutectl reload`, SIGHUP or a restart")
        reply: dict[str, Any] = {"ok": True, "changes": changes,
                                 "notes": list(dict.fromkeys([*routed.get("notes", []), *result.notes]))}
        if errors:
            reply["apply_errors"] = errors
        for w in work.waiters:
            w.resolve(reply if w.command == "down" else {
                "ok": False, "errors": ["a `tagroutectl down` came at the same time: everything is "
                                        "removed and held down; run this again to bring it back"]})
        with self._lock:
            self._publish(None)
            self.notifier.status(self._status_line())

    def _down_routing(self, lane: Lane, converger: Converger, work: Work) -> None:
        """(the routing lane) Its part of `tagroutectl down`: our rules and routes go, the
        sysctls we changed come back."""
        config = self.config
        result = converger.converge(None, config.tag, parts=ROUTING_PARTS, paths=config.tag_paths(),
                                    on_change=lambda _r, change: self._log_change(change, "down"))
        with self._lock:
            self._note_tunnels(result.facts)
        reply: dict[str, Any] = {"ok": True, "changes": [c.message for c in result.changes],
                                 "notes": list(result.notes)}
        if result.errors:
            reply["errors"] = list(result.errors)
        for w in work.waiters:
            w.resolve(reply)
        return None

    def _on_stop(self, lane: Lane, converger: Converger, work: Work) -> None:
        for w in work.waiters:
            w.resolve({"ok": False, "errors": ["the daemon is stopping"]})
        if lane is not self.reconcile:
            return
        if self.routing.thread is not None:
            self.routing.thread.join(RELOAD_WAIT)  # it never waits for us: on_stop runs alone
        config = self.config
        if config.on_stop != "remove":
            log.info("stopping; on_stop: keep: the kernel state stays in place")
            return
        log.info("stopping; on_stop: remove: taking away everything tagrouted owns")
        try:
            result = converger.converge(None, config.tag, paths=config.tag_paths())
        except Exception as e:
            log.exception("on_stop: remove failed: %s", e)
            self.exit_code = 1
            return
        for change in result.changes:
            self._log_change(change, "stop")
        for error in result.errors:
            log.error("on_stop: remove: %s", error)
        if result.errors:
            self.exit_code = 1


    # ---- status ----------------------------------------------------------------------------
    def _status_line(self) -> str:
        config, s = self.config, self.snap
        blocking = self._blocking()
        if not s.ready:
            head = "starting: first converge " + ("failed, retrying" if s.last_error else "pending")
        elif blocking:
            head = f"BLOCKED by the host firewall: {blocking[0].table} chain {blocking[0].chain}" + (
                f" (+{len(blocking) - 1} more)" if len(blocking) > 1 else "")
        elif s.in_sync:
            head = "in sync"
        else:
            head = "NOT in sync, retrying"
        parts = [head]
        tun = tunnel_interface(config)
        if config.paths and s.tunnels_up:
            parts.append("paths " + ", ".join(
                f"{p.name} {'up' if s.tunnels_up.get(t) else 'down'}"
                for p in config.paths if (t := path_tunnel(config, p)) is not None))
        elif tun:
            parts.append(f"tunnel {tun} {'up' if s.tunnel_up else 'down'}")
        parts.append(f"{len(config.services)} services")
        parts.append(f"{s.repairs} repairs")
        if s.last_change:
            parts.append("last change " + time.strftime("%H:%M:%S", time.localtime(s.last_change["time"])))
        if self._config_errors:
            parts.append("config on disk rejected")
        if s.held_down_since is not None:
            parts[0] = ("HELD DOWN by tagroutectl down since "
                        + time.strftime("%H:%M:%S", time.localtime(s.held_down_since))
                        + ": nothing applied until reload")
        if s.last_error and (not s.in_sync or self._config_errors):
            parts.append(f"last error: {s.last_error['message']}")
        return "; ".join(parts)[:400]

    def _publish(self, result: ConvergeResult | None) -> None:
        """Replace the snapshot the control socket serves (one reference swap: no locks)."""
        config, s = self.config, self.snap
        services = []
        for svc in config.services:
            counters = s.counters.get(svc.name)
            policy = s.policy_counters.get(svc.name, {})
            dropped, limited = policy.get("dropped"), policy.get("limited")
            services.append({
                "name": svc.name, "proto": svc.proto, "port": str(svc.port), "address": str(svc.address),
                "packets": counters[0] if counters else None, "bytes": counters[1] if counters else None,
                # packets dropped by allow_from / rate_limit here (None: no such policy on this host)
                "dropped": dropped[0] if dropped else None, "limited": limited[0] if limited else None,
            })
        paths = []
        if config.has("vpn-client") or config.has("service"):
            for p in config.tag_paths():
                tun = path_tunnel(config, p)
                counts = s.path_counters.get(p.name) or {}
                paths.append({
                    "name": p.name, "dscp": p.dscp, "mark": p.mark, "table": p.table,
                    "priority": p.priority, "tunnel": tun,
                    "tunnel_up": s.tunnels_up.get(tun) if tun else None,
                    "via": [str(v) for v in p.via] if tun is None else [],
                    **{what: ({"packets": c[0], "bytes": c[1]} if (c := counts.get(what)) else None)
                       for what in ("requests", "replies")},
                })
        # gateway forwards with a policy: what it dropped (they carry no per-service counter)
        forwards = []
        for fwd in config.gateway.forwards if config.gateway and config.has("gateway") else ():
            policy = s.policy_counters.get(fwd.name, {})
            if fwd.allow_from or fwd.rate_limit:
                dropped, limited = policy.get("dropped"), policy.get("limited")
                forwards.append({
                    "name": fwd.name, "proto": fwd.proto, "port": str(fwd.port), "address": str(fwd.address),
                    "dropped": dropped[0] if dropped else None, "limited": limited[0] if limited else None,
                })
        self._status = {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "config": self.config_path,
            "run_dir": self.run_dir,
            "roles": list(config.roles),
            "firewall_backend": self.firewall.backend,
            "firewall_backend_why": self.firewall.why,
            "tunnel_interface": tunnel_interface(config),
            "tunnel_up": s.tunnel_up,
            "ready": s.ready,
            "in_sync": s.in_sync and s.ready and s.held_down_since is None,
            "last_converge": s.last_converge,
            "last_change": s.last_change,
            "repairs": s.repairs,
            "repairs_by_object": dict(s.repairs_by_object),  # copies: the worker goes on counting
            "reloads": dict(s.reloads),
            "held_down": s.held_down_since is not None,
            "held_down_since": s.held_down_since,
            "metrics_listen": str(config.metrics) if config.metrics else None,
            "last_error": s.last_error,
            "config_errors": list(self._config_errors),
            "services": services,
            "counters_time": s.counters_time,  # the kernel's counters as of this time
            # one entry per path (issue 14): its tag, its tunnel here and whether it is up, and
            # its counters (requests tagged on the way in, replies sent back through it)
            "paths": paths,
            "forwards": forwards,
            "passes": s.passes,
            "netlink_overflows": self.netlink.overflows,
            "resync_interval": config.resync_interval,
            "on_stop": config.on_stop,
            "conflicts": [c.as_dict() for c in s.conflicts.values() if c.severity == "fail"],
            "conflict_warnings": [c.as_dict() for c in s.conflicts.values() if c.severity == "warn"],
            "host_firewall": config.firewall.host_firewall,
            "status_line": self._status_line(),
        }
