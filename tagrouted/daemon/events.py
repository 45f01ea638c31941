"""Event sources that poke the reconcile worker: rtnetlink, nf_tables and the config file.

Owns three watcher threads and their kernel handles: one NETLINK_ROUTE socket bound to the link,
address, route and rule multicast groups, one NETLINK_NETFILTER socket bound to NFNLGRP_NFTABLES
(every ruleset change, by anyone), and a watchdog (inotify) Observer on the config file's
directory and its parent. Never reads or writes routing state itself and never decides
anything: events are pokes, not data (the worker re-reads the kernel); each message is only
classified into an `NlEvent` so the daemon can drop what cannot concern it.

Netlink, and the traps it avoids:
- Subscribe, then dump, then watch: `NetlinkWatcher.start()` returns once the socket is bound,
  before the daemon's first converge dumps the kernel, so no change falls between the two.
- The socket is a plain AF_NETLINK socket read with a blocking recv (pyroute2's constants name
  the groups): pyroute2 0.9's IPRoute reads through an asyncio protocol that turns a receive
  error into a queued error message, where ENOBUFS must instead mean "events were lost".
  Messages are classified from their fixed headers and one attribute (RTA_TABLE/FRA_TABLE,
  IFLA_IFNAME): no full decode on the reader, which must keep up with bursts.
- ENOBUFS (or any receive error): close, reopen and re-bind, then call on_overflow (the daemon
  runs a full resync). A large receive buffer (SO_RCVBUFFORCE as root) makes it rare.

nf_tables: each transaction arrives as its objects' messages (NEWTABLE, DELRULE, NEWSETELEM...;
attribute 1 of each is the table's name) followed by NFT_MSG_NEWGEN, whose NFTA_GEN_PROC_PID
names the process that committed it. `NftBatches` gathers the tables one transaction touched
and hands on a batch per NEWGEN, so the daemon drops the echoes of its own transactions (its
pid) and pokes for anyone else's change to our table. In a PID namespace the kernel reports the
pid as the initial namespace sees it: an echo then reads as foreign and costs one no-op pass.

Config file: editors write in place, or write a temporary file and rename it over, or
(deployment tools) replace the whole directory. Watching the directory sees the first two;
watching its parent sees the directory come back, and the daemon then calls `rewatch()` from
its worker. Anything a watch still misses is caught by the daemon's periodic stat check.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
)

log = logging.getLogger("tagrouted.events")

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
SO_RCVBUFFORCE = 33
RCVBUF = 4 << 20
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE
          | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE)
NLMSG_ERROR, NLMSG_OVERRUN = 2, 4
IFLA_IFNAME, RTA_TABLE, FRA_TABLE = 3, 15, 15
IFF_UP = 0x1
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr share this layout
_RTATTR = struct.Struct("=HH")
_KINDS = {
    RTM_NEWLINK: ("link", True), RTM_DELLINK: ("link", False),
    RTM_NEWADDR: ("addr", True), RTM_DELADDR: ("addr", False),
    RTM_NEWROUTE: ("route", True), RTM_DELROUTE: ("route", False),
    RTM_NEWRULE: ("rule", True), RTM_DELRULE: ("rule", False),
}


@dataclass(frozen=True)
class NlEvent:
    """What one rtnetlink message is about, enough to decide whether to poke."""

    kind: str                    # link | addr | route | rule
    new: bool                    # RTM_NEW* (else RTM_DEL*)
    table: int | None = None     # route/rule: RTA_TABLE/FRA_TABLE, else the 8-bit field
    proto: int | None = None     # route: rtm_protocol
    ifname: str | None = None    # link: IFLA_IFNAME
    index: int | None = None     # link/addr: ifindex
    up: bool | None = None       # link: IFF_UP


def _attr(data: bytes, start: int, end: int, wanted: int) -> bytes | None:
    off = start
    while off + 4 <= end:
        length, kind = _RTATTR.unpack_from(data, off)
        if length < 4:
            return None
        if kind & 0x3FFF == wanted:
            return data[off + 4: off + length]
        off += (length + 3) & ~3
    return None


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, start of body, end) of each whole netlink message of one datagram."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            return
        yield mtype, off + _NLMSGHDR.size, off + length
        off += (length + 3) & ~3


def parse_events(data: bytes) -> list[NlEvent]:
    """Classify every message of one netlink datagram; unknown types are skipped."""
    out: list[NlEvent] = []
    for mtype, body, end in _messages(data):
        kind = _KINDS.get(mtype)
        if kind is not None:
            name, new = kind
            if name == "link" and body + _IFINFOMSG.size <= end:
                _fam, _type, index, ifflags, _change = _IFINFOMSG.unpack_from(data, body)
                raw = _attr(data, body + _IFINFOMSG.size, end, IFLA_IFNAME)
                ifname = raw.split(b"\0", 1)[0].decode(errors="replace") if raw else None
                out.append(NlEvent("link", new, ifname=ifname, index=index, up=bool(ifflags & IFF_UP)))
            elif name == "addr" and body + 8 <= end:
                index = struct.unpack_from("=i", data, body + 4)[0]
                out.append(NlEvent("addr", new, index=index))
            elif name in ("route", "rule") and body + _RTMSG.size <= end:
                fields = _RTMSG.unpack_from(data, body)
                table8, proto = fields[4], fields[5]
                raw = _attr(data, body + _RTMSG.size, end, RTA_TABLE if name == "route" else FRA_TABLE)
                table = struct.unpack("=I", raw[:4])[0] if raw and len(raw) >= 4 else table8
                out.append(NlEvent(name, new, table=table, proto=proto if name == "route" else None))
    return out


@dataclass(frozen=True)
class NftBatch:
    """One committed nf_tables transaction: who committed it, and the tables it touched."""

    pid: int | None
    tables: frozenset[tuple[int, str]]  # (nfproto family: 1 inet, 2 ip, 10 ip6, ...; name)


class NftBatches:
    """Gathers nf_tables messages into transactions (stateful across datagrams)."""

    def __init__(self) -> None:
        self._tables: set[tuple[int, str]] = set()

    def __call__(self, data: bytes) -> list[NftBatch]:
        out: list[NftBatch] = []
        for mtype, body, end in _messages(data):
            if mtype >> 8 == NFNL_SUBSYS_NFTABLES and body + 4 <= end:
                family = data[body]
                attrs = body + 4  # struct nfgenmsg: family, version, res_id
                if mtype & 0xFF == NFT_MSG_NEWGEN:
                    raw = _attr(data, attrs, end, NFTA_GEN_PROC_PID)
                    pid = struct.unpack(">I", raw[:4])[0] if raw and len(raw) >= 4 else None
                    out.append(NftBatch(pid, frozenset(self._tables)))
                    self._tables.clear()
                else:
                    raw = _attr(data, attrs, end, 1)  # NFTA_{TABLE_NAME,CHAIN,RULE,SET,...}_TABLE
                    if raw:
                        self._tables.add((family, raw.split(b"\0", 1)[0].decode(errors="replace")))
        return out


class NetlinkWatcher:
    """Reads one netlink protocol's multicast in its own thread and hands each datagram's
    parsed events on (rtnetlink by default; nf_tables with `netfilter()`)."""

    def __init__(self, on_events: Callable[[list[Any]], None], on_overflow: Callable[[str], None],
                 rcvbuf: int | None = None, *, protocol: int = NETLINK_ROUTE, groups: int = GROUPS,
                 parse: Callable[[bytes], list[Any]] = parse_events, name: str = "netlink-events") -> None:
        self.on_events = on_events
        self.on_overflow = on_overflow
        self.protocol, self.groups, self.parse, self.name = protocol, groups, parse, name
        env_buf = os.environ.get("TAGROUTED_TEST_NL_RCVBUF")  # tests provoke ENOBUFS with a tiny buffer
        self.rcvbuf = rcvbuf or (int(env_buf) if env_buf else RCVBUF)
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.overflows = 0

    @classmethod
    def netfilter(cls, on_batches: Callable[[list[NftBatch]], None],
                  on_overflow: Callable[[str], None]) -> NetlinkWatcher:
        """A watcher of every nf_tables transaction (NFNLGRP_NFTABLES)."""
        return cls(on_batches, on_overflow, protocol=NETLINK_NETFILTER,
                   groups=1 << (NFNLGRP_NFTABLES - 1), parse=NftBatches(), name="nftables-events")

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, self.protocol)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, self.groups))
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self) -> None:
        """Bind (in the caller's thread, before returning) and start reading."""
        self._sock = self._open()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _reopen(self, why: str) -> None:
        """Events were lost: a fresh socket (bound before the resync dumps), then the resync."""
        self.overflows += 1
        pause = 0.05
        while not self._stop.is_set():
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            try:
                self._sock = self._open()
                break
            except OSError as e:
                log.error("netlink: cannot reopen the event socket: %s (retrying in %.1fs)", e, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        self.on_overflow(why)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        registered: int | None = None
        while not self._stop.is_set():
            sock = self._sock
            if sock is None:
                return
            if registered != sock.fileno():
                if registered is not None:
                    with contextlib.suppress(KeyError):
                        poller.unregister(registered)
                poller.register(sock, select.POLLIN)
                registered = sock.fileno()
            try:
                ready = poller.poll()
                if self._stop.is_set():
                    return
                if not any(fd == registered for fd, _ in ready):
                    continue
                data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                with contextlib.suppress(KeyError):
                    poller.unregister(registered)
                registered = None
                if e.errno == errno.ENOBUFS:
                    log.warning("%s: events were lost (ENOBUFS): reopening, full resync", self.name)
                    self._reopen("netlink overflow (ENOBUFS)")
                else:
                    log.warning("%s: receive failed: %s: reopening, full resync", self.name, e)
                    self._reopen(f"netlink receive error: {e}")
                continue
            if not data:
                continue
            try:
                events = self.parse(data)
            except Exception as e:  # a malformed datagram is one lost event: resync
                log.warning("%s: cannot parse a datagram (%s): full resync", self.name, e)
                self.on_overflow(f"netlink parse error: {e}")
                continue
            if events:
                self.on_events(events)


# ---- the config file -------------------------------------------------------------------------

class ConfigWatcher:
    """Pokes when the config file (or its directory) is written, replaced, deleted, recreated."""

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        self.path = os.path.abspath(path)
        self.dir = os.path.dirname(self.path)
        self.parent = os.path.dirname(self.dir)
        self.on_change = on_change
        self._observer: Any = None
        self._dir_watch: Any = None
        self._dir_ino: tuple[int, int] | None = None
        self._parent_watch: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        from watchdog.observers import Observer

        self._observer = Observer(timeout=1.0)  # how often its idle threads wake: keep it rare
        self._observer.daemon = True
        self._observer.start()
        self.rewatch()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None

    def _handler(self) -> Any:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
                if watcher.path in paths or watcher.dir in paths:
                    watcher.on_change()

        return Handler()

    def rewatch(self) -> None:
        """(Re)place the watches: the parent always, the directory whenever it is a new one.
        Called from the worker (never from a watchdog thread: unscheduling joins emitters)."""
        if self._observer is None:
            return
        with self._lock:
            if self._parent_watch is None and self.parent != self.dir and os.path.isdir(self.parent):
                with contextlib.suppress(OSError):
                    self._parent_watch = self._observer.schedule(self._handler(), self.parent,
                                                                 recursive=False)
            try:
                st = os.stat(self.dir)
                ino: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                ino = None
            if ino == self._dir_ino and self._dir_watch is not None and self._alive(self._dir_watch):
                return
            if self._dir_watch is not None:
                with contextlib.suppress(Exception):
                    self._observer.unschedule(self._dir_watch)
                self._dir_watch = None
            self._dir_ino = ino
            if ino is not None:
                try:
                    self._dir_watch = self._observer.schedule(self._handler(), self.dir, recursive=False)
                except OSError as e:
                    log.warning("cannot watch %s: %s (the periodic check still sees changes)", self.dir, e)

    def _alive(self, watch: Any) -> bool:
        emitter = getattr(self._observer, "_emitter_for_watch", {}).get(watch)
        return emitter is None or emitter.is_alive()
