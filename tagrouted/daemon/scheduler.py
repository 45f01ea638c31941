"""The scheduler: one reconcile worker fed by a one-slot, coalescing trigger.

Owns the daemon's running state: the Config in use (the last good one), the Converger (so the
pyroute2 socket and libiptc handles live in the worker thread only), the status snapshot the
control socket serves, the reasons written into each change record, and what systemd is told.
Never decides policy (desired.py) nor touches the kernel except through `Converger.converge`
and the read-only counters.

Threads and who may do what:
- the worker (this module's `_work`) is the only thread that reads or writes the kernel;
- everything else only pokes the Trigger with a cause and the parts to converge: the netlink
  watcher (events.py), the config file watcher, the main thread (SIGHUP), the control socket
  (reload also waits for the worker's answer; status reads the last published snapshot);
- timers (periodic resync, retry after errors, the systemd watchdog) are deadlines of the
  worker's wait, so a WATCHDOG=1 ping proves the worker loop itself is alive.

Coalescing: a poke sets a due time (now + its gap: a few ms for netlink, longer for file
events, none for reload/timers); every cause that arrives before the worker takes the slot
joins the same pass. Link, address, route and rule events converge ROUTING (rules, routes)
and SYSCTLS (a new tunnel's rp_filter); the resync timer converges what no event announces
(SYSCTLS, FIREWALL), and every ROUTING_SAFETY_EVERY-th timer pass ROUTING too, as a safety net;
start, reload, retries and a netlink overflow converge everything.
Our own route/rule writes echo back as RTM_NEW* events: additions seen while a pass runs or
just after it are dropped, deletions always poke (a repeat pass that finds nothing to do
writes nothing, so echoes cannot loop).

Reasons in the records (TAGROUTED_REASON): start (until the first pass succeeds), reload (a new
config), resync (after lost netlink events), link (the desired state or a named interface
changed), drift (nothing we were told about changed, yet the kernel differed: someone else
changed it; logged as a warning and counted as a repair), stop (on_stop: remove).
Errors: the pass keeps what it did, the error is logged (once per distinct message) and kept
as last_error, and the pass is retried on a timer with doubling backoff up to
resync_interval: health never waits for "something changed".

One owner of the kernel state: `tagroutectl apply` with a daemon running asks it to reload
(the same pass as `reload`), and `tagroutectl down` asks it to remove everything it owns and
hold it down: no pass runs for events, timers or file edits until `reload` (or `apply`),
SIGHUP or a restart, and the status says so (never "in sync"). Its records carry reason down.
Metrics (metrics.py, only when `metrics.listen` is set) serve the published snapshot; the
worker only feeds the pass-duration histogram.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core.config import Config, ConfigError, TagPath, load_config, read_config_bytes
from ..core.state import ROUTE_PROTO, Change, DesiredState, HostFacts
from ..kernel.converge import ALL_PARTS, FIREWALL, ROUTING, SYSCTLS, Converger, ConvergeResult
from ..kernel.firewall import IPTABLES_LEGACY, NFTABLES, Choice, choose
from .events import ConfigWatcher, NetlinkWatcher, NftBatch, NlEvent
from .journal import Notifier, fields

if TYPE_CHECKING:
    from .metrics import MetricsExporter

log = logging.getLogger("tagrouted.daemon")

# The timer re-reads what the kernel does not announce: sysctls, and the legacy firewall (xtables
# announce nothing; nf_tables announces every change, so with nftables events the timer never
# reads the firewall). Rules and routes only as a safety net (netlink reports their every change,
# and a lost event is an overflow, which resyncs all).
ROUTING_SAFETY_EVERY = 10
OUR_NFT_TABLE = (1, "tagrouted")  # (NFPROTO_INET, name)
NETLINK_GAP = 0.001    # s: gathers one burst of rtnetlink events into one pass
FILE_GAP = 0.05        # s: an editor's write-rename-chmod sequence is one change
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


class Daemon:
    """Wires the event sources to the worker; `start()`, then `stop()` from the main thread."""

    def __init__(self, config: Config, config_path: str, run_dir: str,
                 notifier: Notifier | None = None, test_faults: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.run_dir = run_dir
        self.notifier = notifier or Notifier({})
        self.test_faults = test_faults
        self.trigger = Trigger()
        self.started = time.time()
        self.snap = _Snapshot()
        self._status: dict[str, Any] = {}
        self._config_errors: list[str] = []
        self._config_digest, self._file_sig = self._file_identity()
        self._rejected_digest: str | None = None
        self._missing_logged = False
        self._last_desired: DesiredState | None = None
        self._last_links: dict[str, tuple[int, bool] | None] | None = None
        self._last_notes: set[str] = set()
        self._carry_reason: str | None = None
        self._part_ok = dict.fromkeys(ALL_PARTS, False)
        self._timer_passes = 0
        self._backoff = FIRST_RETRY
        self._retry_at: float | None = None
        self._next_resync = time.monotonic() + self._interval(config)
        self._next_ping: float | None = None
        self._last_error_text: str | None = None
        self._echo_until = 0.0
        self._links_seen: dict[int, tuple[str | None, bool] | None] = {}  # netlink thread only
        self._passing = False
        self._stop_watchdog = False
        self._worker: threading.Thread | None = None
        self.exit_code = 0
        self.netlink = NetlinkWatcher(self.on_netlink, self.on_overflow)
        self.nft_events = NetlinkWatcher.netfilter(self.on_nftables, self.on_overflow)
        self._nft_events_live = False
        self._worker_tid = 0  # the reconcile worker's thread id (it commits our transactions)
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
        self.trigger.poke("start", ALL_PARTS)
        self._worker = threading.Thread(target=self._work, name="reconcile", daemon=True)
        self._worker.start()

    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def stop(self, timeout: float = 60.0) -> int:
        """Stop the worker (it applies on_stop), then the event sources; the exit status."""
        self.notifier.stopping()
        self.trigger.stop()
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.error("the reconcile worker did not stop within %.0fs", timeout)
                self.exit_code = 1
        for part in (self.control, self.metrics, self.files, self.netlink, self.nft_events):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        return self.exit_code

    def _serve_metrics(self, config: Config) -> None:
        """Serve /metrics where config.metrics says (nowhere: stop); OSError when it cannot.
        (The main thread at start, then only the worker on reloads.)"""
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
        """(netlink thread) Poke for what can change the desired state or undo ours."""
        tables = {p.table for p in self.config.tag_paths()}
        echo = self._passing or time.monotonic() < self._echo_until
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
            self.trigger.poke("netlink", {ROUTING, SYSCTLS}, NETLINK_GAP)

    def on_nftables(self, batches: list[NftBatch]) -> None:
        """(nftables thread) Poke for anyone else's transaction that touched our table. The kernel
        names the committing thread (task_pid_nr): our transactions come from the worker."""
        ours = {os.getpid(), self._worker_tid}
        if any(b.pid not in ours and OUR_NFT_TABLE in b.tables for b in batches):
            self.trigger.poke("nftables", {FIREWALL}, NETLINK_GAP)

    def timer_parts(self) -> frozenset[str]:
        """What a resync-timer pass re-reads: see TIMER comment above."""
        if self.firewall.backend == NFTABLES and self._nft_events_live:
            return frozenset({SYSCTLS})
        return frozenset({SYSCTLS, FIREWALL})

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

    # ---- the worker ------------------------------------------------------------------------
    def _work(self) -> None:
        self._worker_tid = threading.get_native_id()
        converger = Converger(self.run_dir)
        interval = self.notifier.watchdog_interval
        self._next_ping = time.monotonic() if interval else None
        try:
            while True:
                deadlines = [d for d in (self._next_resync, self._retry_at, self._next_ping) if d is not None]
                work = self.trigger.take(min(deadlines) if deadlines else None)
                now = time.monotonic()
                if self._next_ping is not None and now >= self._next_ping and interval:
                    if not self._stop_watchdog:
                        self.notifier.watchdog()
                    self._next_ping = now + interval
                if work is None:
                    if self._retry_at is not None and now >= self._retry_at:
                        self._retry_at = None
                        self.trigger.poke("retry", ALL_PARTS)
                    if now >= self._next_resync:
                        self._next_resync = now + self._interval(self.config)
                        self._timer_passes += 1
                        safety = self._timer_passes % ROUTING_SAFETY_EVERY == 0
                        parts = self.timer_parts()
                        self.trigger.poke("timer", parts | {ROUTING} if safety else parts)
                    continue
                if work.stop:
                    self._on_stop(converger, work)
                    return
                try:
                    self._pass(converger, work)
                except Exception as e:  # a bug must not end the loop: record, retry
                    log.exception("reconcile pass failed: %s", e)
                    self._failed(f"{type(e).__name__}: {e}")
                    for w in work.waiters:
                        w.resolve({"ok": False, "errors": [f"internal error: {e}"]})
        finally:
            converger.close()

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
            self._next_resync = time.monotonic() + self._interval(config)
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

    def _pass(self, converger: Converger, work: Work) -> None:
        causes, parts = work.causes, set(work.parts)
        explicit = "reload" in causes
        if "down" in causes:
            self._down(converger, work)
            return
        if self.snap.held_down_since is not None and not explicit:
            # Held down: events, timers and file edits change nothing until a reload; the
            # tunnel is still watched (a read), so status and metrics follow it.
            if "file" in causes:
                self.files.rewatch()
            if causes & {"netlink", "overflow"}:
                self._note_tunnels(converger.netlink.host_facts())
                self._publish(None)
            return
        file_moved = "file" in causes or ("timer" in causes and self._file_sig_now() != self._file_sig)
        if "file" in causes:
            self.files.rewatch()  # the directory may be a new one
        outcome = "none"
        problems: list[str] = []
        if explicit or file_moved:
            outcome, problems = self._reload(explicit)
            if outcome in ("applied", "rejected"):
                self.snap.reloads["ok" if outcome == "applied" else "rejected"] += 1
            if outcome == "applied":
                parts |= ALL_PARTS
            elif outcome == "rejected":
                parts -= ALL_PARTS if not (causes - {"reload", "file"}) else set()
                reply = {"ok": False, "errors": problems}
                for w in work.waiters:
                    w.resolve(reply)
                work.waiters = []
        if self.snap.held_down_since is not None:
            if outcome == "applied":
                log.info("the hold of `tagroutectl down` is released by the reload: converging again")
                self.snap.held_down_since = None
            else:
                parts = set()  # a rejected file keeps the host down, as it found it
        if not parts:
            if outcome in ("applied", "rejected") and self.snap.ready:
                self.notifier.ready(self._status_line())  # ends RELOADING=1
                self._publish(None)
            return
        if "overflow" in causes or "retry" in causes:
            parts |= ALL_PARTS
        config = self.config
        t0 = time.perf_counter()
        self._passing = True
        try:
            result = converger.converge(config, parts=frozenset(parts))
        finally:
            self._passing = False
        elapsed = time.perf_counter() - t0
        self._echo_until = time.monotonic() + ECHO_WINDOW
        if self.metrics is not None:
            self.metrics.observe_pass(elapsed)
        reason = self._reason(result, config, outcome == "applied", "overflow" in causes)
        self._record(result, reason, parts, elapsed, causes)
        if result.backend and (FIREWALL in parts or "timer" in causes):
            self._read_counters(converger, result)  # the counters move without events
        log.debug("pass (%s; %s) took %.1f ms (+%.1f ms after), %d changes", "+".join(sorted(causes)),
                  "+".join(sorted(parts)), elapsed * 1000, (time.perf_counter() - t0 - elapsed) * 1000,
                  len(result.changes))
        if parts >= self.timer_parts():
            self._next_resync = time.monotonic() + self._interval(config)
        if outcome == "applied" or explicit:
            reply: dict[str, Any] = {"ok": True, "changes": [c.message for c in result.changes],
                                     "notes": list(result.notes)}
            if result.errors:
                reply["apply_errors"] = list(result.errors)
            for w in work.waiters:
                w.resolve(reply)
        if not self.snap.ready and result.ok and parts >= ALL_PARTS:
            self.snap.ready = True
            self._publish(result)
            log.info("converged: ready (%s)", self._status_line())
            self.notifier.ready(self._status_line())
        else:
            self._publish(result)
            if self.snap.ready and (outcome in ("applied", "rejected") or explicit):
                self.notifier.ready(self._status_line())  # ends RELOADING=1
            else:
                self.notifier.status(self._status_line())

    def _reason(self, result: ConvergeResult, config: Config, reloaded: bool, overflow: bool) -> str:
        links = _link_state(result.facts, named_interfaces(config))
        link_changed = (self._last_desired is not None and result.desired != self._last_desired) or (
            self._last_links is not None and links != self._last_links)
        self._last_desired, self._last_links = result.desired, links
        if not self.snap.ready:
            reason = "start"
        elif reloaded:
            reason = "reload"
        elif overflow:
            reason = "resync"
        elif link_changed:
            reason = "link"
        else:
            reason = self._carry_reason or "drift"
        self._carry_reason = None if result.ok else reason
        return reason

    def _record(self, result: ConvergeResult, reason: str, parts: set[str], elapsed: float,
                causes: set[str]) -> None:
        now = time.time()
        for change in result.changes:
            self._log_change(change, reason)
        if result.changes:
            self.snap.last_change = {"time": now, "message": result.changes[-1].message, "reason": reason}
            if reason in ("drift", "resync"):
                self.snap.repairs += len(result.changes)
                for change in result.changes:
                    by_object = self.snap.repairs_by_object
                    by_object[change.object] = by_object.get(change.object, 0) + 1
        notes = set(result.notes)
        for note in result.notes:
            if note not in self._last_notes:
                log.info("note: %s", note)
        self._last_notes = notes
        self.snap.passes += 1
        # trigger: what woke the worker (start, netlink, file, reload, timer, retry, overflow);
        # the reason of a change is decided from what changed, see _reason.
        self.snap.last_converge = {"time": now, "trigger": "+".join(sorted(causes)),
                                   "reason": reason if result.changes else None,
                                   "duration_ms": round(elapsed * 1000, 3),
                                   "changes": len(result.changes), "parts": sorted(parts)}
        for part in parts:
            self._part_ok[part] = result.ok
        self.snap.in_sync = all(self._part_ok.values())
        self._note_tunnels(result.facts)
        if result.errors:
            self._failed("; ".join(result.errors))
        elif self.snap.in_sync:  # a pass that skipped the failing part has not recovered it
            self._backoff = FIRST_RETRY
            self._retry_at = None
            if self._last_error_text is not None:
                log.info("recovered: in sync again")
            self._last_error_text = None

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

    def _failed(self, message: str) -> None:
        """A pass failed (partly): keep the record, retry with doubling backoff."""
        self._record_error(message)
        if message != self._last_error_text:
            log.error("converge failed: %s (retrying in %.1fs)", message, self._backoff)
        else:
            log.debug("still failing: %s", message)
        self._last_error_text = message
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, max(self._interval(self.config), FIRST_RETRY))
        self.snap.in_sync = False

    def _read_counters(self, converger: Converger, result: ConvergeResult) -> None:
        try:
            assert result.backend is not None
            backend = converger.backend(result.backend)
            self.snap.counters = backend.counters(result.desired.firewall)
            self.snap.path_counters = backend.path_counters(result.desired.firewall)
            self.snap.policy_counters = backend.policy_counters(result.desired.firewall)
        except Exception as e:  # counters are informative: never fail a pass over them
            log.debug("reading counters failed: %s", e)

    def _down(self, converger: Converger, work: Work) -> None:
        """`tagroutectl down`: remove everything we own, restore the sysctls, and stay down."""
        t0 = time.perf_counter()
        result = converger.converge(None, self.config.tag)
        elapsed = time.perf_counter() - t0
        now = time.time()
        for change in result.changes:
            self._log_change(change, "down")
        if result.changes:
            self.snap.last_change = {"time": now, "message": result.changes[-1].message, "reason": "down"}
        self.snap.passes += 1
        self.snap.last_converge = {"time": now, "trigger": "+".join(sorted(work.causes)),
                                   "reason": "down" if result.changes else None,
                                   "duration_ms": round(elapsed * 1000, 3),
                                   "changes": len(result.changes), "parts": sorted(ALL_PARTS)}
        if self.snap.held_down_since is None:
            self.snap.held_down_since = now
        self.snap.counters = {}  # the rules that counted are gone
        self._note_tunnels(result.facts)
        self._part_ok = dict.fromkeys(ALL_PARTS, False)  # the release pass re-checks everything
        self.snap.in_sync = False
        self._retry_at = None  # nothing is retried while held down
        self._backoff = FIRST_RETRY
        self._last_desired = self._last_links = None
        for error in result.errors:
            log.error("tagroutectl down: %s", error)
        if result.errors:
            self._record_error("down: " + "; ".join(result.errors))
        log.warning("held down by `tagroutectl down`: nothing is applied until `tagroutectl apply`, "
                    "`tagroutectl reload`, SIGHUP or a restart")
        reply: dict[str, Any] = {"ok": True, "changes": [c.message for c in result.changes],
                                 "notes": list(result.notes)}
        if result.errors:
            reply["apply_errors"] = list(result.errors)
        for w in work.waiters:
            w.resolve(reply if w.command == "down" else {
                "ok": False, "errors": ["a `tagroutectl down` came at the same time: everything is "
                                        "removed and held down; run this again to bring it back"]})
        self._publish(result)
        self.notifier.status(self._status_line())

    def _on_stop(self, converger: Converger, work: Work) -> None:
        for w in work.waiters:
            w.resolve({"ok": False, "errors": ["the daemon is stopping"]})
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
        if not s.ready:
            head = "starting: first converge " + ("failed, retrying" if s.last_error else "pending")
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
            # one entry per path (issue 14): its tag, its tunnel here and whether it is up, and
            # its counters (requests tagged on the way in, replies sent back through it)
            "paths": paths,
            "forwards": forwards,
            "passes": s.passes,
            "netlink_overflows": self.netlink.overflows,
            "resync_interval": config.resync_interval,
            "on_stop": config.on_stop,
            "status_line": self._status_line(),
        }
