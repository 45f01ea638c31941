"""Prometheus metrics: `/metrics` in the text format, served from the worker's published figures.

Owns the exporter of one daemon: a prometheus_client registry holding a custom collector, the
pass-duration histogram, and the listener (TCP over IPv4 or IPv6, or an AF_UNIX socket) that
serves the registry through prometheus_client's own MetricsHandler (content negotiation,
OpenMetrics, gzip and `name[]` filtering come with it: nothing here writes the exposition).
Started only when the config has `metrics.listen`: prometheus_client is not even imported else.
Never touches the kernel: a scrape turns the status snapshot the scheduler publishes (a dict
replaced by one reference swap, the same one `tagroutectl status --json` shows) into metric
families, so it reads no kernel state, takes no lock the worker holds across a pass, and
answers while a pass runs. The per-service counters in that snapshot are the kernel's rule
counters as the worker last read them (every firewall and timer pass: within resync_interval),
not numbers of our own that a long-lived connection could leave stale. With nftables they are
the service's named counter, which every forwarded packet of its connections passes, both ways
(the volume of a long transfer); with iptables-legacy the service's own rules, which see what
comes before the established-connection accept (a connection's opening packets).

Threads: `listen` and `stop` run in one thread at a time (the main thread at start and stop,
the reconcile worker on a reload that changes `metrics.listen`); the listener has one accept
thread and one short thread per request, at most MAX_CLIENTS at once, each with a timeout.
The worker calls `observe_pass` (prometheus_client's histogram takes its own short lock).

Traps:
- http.server.HTTPServer.server_bind calls socket.getfqdn(): a reverse DNS lookup that can hang
  where no resolver answers (a fresh network namespace). The listeners are plain socketserver
  servers; MetricsHandler needs no server name.
- socketserver's serve_forever polls every 0.5 s to notice shutdown(); an idle daemon should
  not wake for nothing, so the accept loop blocks and close() wakes it with shutdown(SHUT_RDWR),
  as the control socket does.
- A series that first appears at 1 loses that increment in increase(): every known object of
  a repair and both reload results are exported from 0.
- A service's kernel counters restart at 0 when its rule is rewritten (a flushed chain put
  back): Prometheus' rate() and increase() treat that as a counter reset, as they should.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, MetricsHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..core.config import MetricsSection
from ..core.state import CHANGE_OBJECTS

log = logging.getLogger("tagrouted.metrics")

MAX_CLIENTS = 8
CLIENT_TIMEOUT = 10.0  # s a scrape connection may take to send its request
# A no-op pass takes a few ms, a first converge of 1000 services ~0.2-0.5 s (bench_scale).
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Every kind of object a change can be about, so each is exported from 0.
REPAIR_OBJECTS: tuple[str, ...] = CHANGE_OBJECTS
DEFAULT_BACKEND = "iptables-legacy"

Snapshot = Callable[[], Mapping[str, Any]]


def families(status: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one status snapshot (what `tagroutectl status --json` prints)."""
    out: list[Metric] = []
    build = GaugeMetricFamily("tagrouted_build_info", "The running tagrouted: version and firewall "
                              "backend (always 1).", labels=["version", "backend"])
    backend = status.get("firewall_backend") or DEFAULT_BACKEND
    build.add_metric([str(status.get("version", "")), str(backend)], 1)
    out.append(build)
    out.append(GaugeMetricFamily("tagrouted_in_sync", "1 when the kernel holds exactly this host's "
                                 "desired state (0 before the first converge, after a failed pass, "
                                 "and while held down).", value=1 if status.get("in_sync") else 0))
    out.append(GaugeMetricFamily("tagrouted_held_down", "1 while `tagroutectl down` holds everything "
                                 "removed (until reload, SIGHUP or a restart).",
                                 value=1 if status.get("held_down") else 0))
    tunnel = status.get("tunnel_interface")
    if tunnel:
        up = GaugeMetricFamily("tagrouted_tunnel_up", "1 while the tunnel interface exists and is up.",
                               labels=["interface"])
        up.add_metric([str(tunnel)], 1 if status.get("tunnel_up") else 0)
        out.append(up)
    seen_by = ("the kernel: nftables, the service's named counter (every forwarded packet of its "
               "connections, both ways); iptables-legacy, its DNAT on a gateway or its FORWARD accept "
               "on a VPN client (each connection's first packets)")
    packets = CounterMetricFamily("tagrouted_service_packets", f"Packets counted by {seen_by}.",
                                  labels=["service"])
    octets = CounterMetricFamily("tagrouted_service_bytes", f"Bytes counted by {seen_by}.",
                                 labels=["service"])
    for svc in status.get("services") or []:
        if svc.get("packets") is not None:  # a plain service host has no rule per service
            packets.add_metric([str(svc.get("name", ""))], svc["packets"])
            octets.add_metric([str(svc.get("name", ""))], svc.get("bytes") or 0)
    out += [packets, octets]
    dropped = CounterMetricFamily("tagrouted_service_dropped_packets", "Packets of sources outside "
                                  "the service's allow_from, dropped here.", labels=["service"])
    limited = CounterMetricFamily("tagrouted_service_limited_packets", "Packets of new connections "
                                  "beyond the service's rate_limit per source, dropped here.",
                                  labels=["service"])
    for entry in [*(status.get("services") or []), *(status.get("forwards") or [])]:
        for family, key in ((dropped, "dropped"), (limited, "limited")):
            if entry.get(key) is not None:  # only services with that policy on this host
                family.add_metric([str(entry.get("name", ""))], entry[key])
    out += [dropped, limited]
    out += _path_families(status.get("paths") or [])
    repairs = CounterMetricFamily("tagrouted_repairs", "Changes made to put back what someone else "
                                  "changed (drift) or what lost netlink events hid (resync), by "
                                  "object.", labels=["object"])
    by_object = dict.fromkeys(REPAIR_OBJECTS, 0) | dict(status.get("repairs_by_object") or {})
    for obj, count in sorted(by_object.items()):
        repairs.add_metric([obj], count)
    out.append(repairs)
    reloads = CounterMetricFamily("tagrouted_reloads", "Config reloads (reload, SIGHUP, apply, a file "
                                  "edit), by result: ok, or rejected (the last good config kept).",
                                  labels=["result"])
    counts = status.get("reloads") or {}
    for result in ("ok", "rejected"):
        reloads.add_metric([result], counts.get(result, 0))
    out.append(reloads)
    out.append(GaugeMetricFamily("tagrouted_conflicts", "Known conflicts with another firewall that "
                                 "blocks or re-marks our traffic.", value=len(status.get("conflicts") or [])))
    out.append(CounterMetricFamily("tagrouted_netlink_overflows", "Netlink event overflows (ENOBUFS), "
                                   "each followed by a full resync.",
                                   value=status.get("netlink_overflows") or 0))
    return out


def _path_families(paths: list[Mapping[str, Any]]) -> list[Metric]:
    """Per path (several public servers; a single-path host has one, `default`): its tunnel
    and the packets its tagging rules counted, requests in and replies back."""
    up = GaugeMetricFamily("tagrouted_path_tunnel_up", "1 while the path's tunnel exists and is up "
                           "(VPN client hosts).", labels=["path", "interface"])
    packets = CounterMetricFamily("tagrouted_path_packets", "Packets the path's tagging rules "
                                  "counted: requests (tagged on the way in) and replies (sent back "
                                  "through the path).", labels=["path", "direction"])
    octets = CounterMetricFamily("tagrouted_path_bytes", "Bytes the path's tagging rules counted.",
                                 labels=["path", "direction"])
    for path in paths:
        name = str(path.get("name", ""))
        if path.get("tunnel"):
            up.add_metric([name, str(path["tunnel"])], 1 if path.get("tunnel_up") else 0)
        for direction in ("requests", "replies"):
            counted = path.get(direction)
            if isinstance(counted, Mapping) and counted.get("packets") is not None:
                packets.add_metric([name, direction], counted["packets"])
                octets.add_metric([name, direction], counted.get("bytes") or 0)
    return [up, packets, octets]


class StatusCollector:
    """A prometheus_client collector over the scheduler's published status snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.snapshot()))


class MetricsExporter:
    """The registry of one daemon and the listener serving it (none until `listen`)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(snapshot))  # type: ignore[arg-type]
        self.pass_duration = Histogram(
            "tagrouted_pass_duration_seconds", "Duration of each reconcile pass.",
            buckets=PASS_BUCKETS, registry=self.registry)
        self._listener: _Listener | None = None

    @property
    def where(self) -> MetricsSection | None:
        return self._listener.where if self._listener else None

    def observe_pass(self, seconds: float) -> None:
        """(the worker) One reconcile pass took `seconds`."""
        self.pass_duration.observe(seconds)

    def listen(self, where: MetricsSection | None) -> None:
        """Serve on `where` (None: stop serving). OSError when it cannot: then nothing listens."""
        if self._listener is not None and self._listener.where == where:
            return
        self.stop()
        if where is not None:
            self._listener = _Listener(where, _handler(self.registry))
            log.info("metrics: serving /metrics on %s", where)

    def stop(self) -> None:
        """Stop serving (and remove a unix socket that is still ours)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def _handler(registry: CollectorRegistry) -> type[MetricsHandler]:
    class Handler(MetricsHandler):
        timeout = CLIENT_TIMEOUT  # StreamRequestHandler: a silent client frees its slot

        def handle(self) -> None:
            with contextlib.suppress(OSError):  # the scraper went away mid-answer
                super().handle()

    Handler.registry = registry
    return Handler


class _Bounded(socketserver.ThreadingMixIn):
    """One daemon thread per request, at most MAX_CLIENTS at once (more are closed at once)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a scrape failed", exc_info=True)


class _TCPServer(_Bounded, socketserver.TCPServer):
    allow_reuse_address = True  # a restart must not wait for TIME_WAIT on the port


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    pass


class _Listener:
    """One bound server and its accept thread."""

    def __init__(self, where: MetricsSection, handler: type[MetricsHandler]) -> None:
        self.where = where
        self._ino: int | None = None
        self._stop = threading.Event()
        server: socketserver.BaseServer
        if where.path is not None:
            _clear_stale_socket(where.path)
            server = _UnixServer(where.path, handler)
            # Who may scrape is decided by the socket's directory, as anyone on the host may
            # connect to 127.0.0.1; the unit's run directory is root's alone (0700).
            os.chmod(where.path, 0o666)
            self._ino = os.stat(where.path).st_ino
        else:
            assert where.host is not None and where.port is not None
            cls = _TCP6Server if ":" in where.host else _TCPServer
            server = cls((where.host, where.port), handler)
        self.server = server
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock: socket.socket = self.server.socket  # type: ignore[attr-defined]
        while not self._stop.is_set():
            try:
                conn, addr = sock.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("metrics: accept failed: %s", e)
                self._stop.wait(0.1)
                continue
            self.server.process_request(conn, addr)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._stop.set()
        sock: socket.socket = self.server.socket  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self._thread.join(timeout=2)
        self.server.server_close()
        if self.where.path is not None:
            with contextlib.suppress(OSError):  # only if it is still ours
                if os.stat(self.where.path).st_ino == self._ino:
                    os.unlink(self.where.path)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket nobody answers on (a crashed daemon's); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens
    else:
        raise OSError(f"something already answers on {path}")
    finally:
        probe.close()
