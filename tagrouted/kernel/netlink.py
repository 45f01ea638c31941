"""The routing adapter: reads and writes routes, policy rules and link facts over rtnetlink.

Reads every route of the tables it is asked about (the ones the run directory records as ours),
routes anywhere that carry our protocol number ROUTE_PROTO, and the `ip rule`s that select by
fwmark and look up a given table (which of those are ours, by priority + fwmark + table, the
converger decides). Never decides what should exist (that is desired.py); it reads what is
there as `state` values and adds/deletes exactly the values it is handed.

Threading: one NETLINK_ROUTE socket per adapter, used from one thread (a lane of the daemon,
or the CLI); it is opened on first use, so constructing the adapter elsewhere is fine. Link
names are resolved with if_nametoindex/if_indextoname in the caller's network namespace,
which is the namespace the socket was opened in (the daemon never changes it).

Transport (issue 15): requests go over a plain blocking socket (`_Rtnl`), built with struct and
answered in the caller's thread; pyroute2 decodes the route and rule messages (its message
classes and marshal: the normalisation below reads them). pyroute2 0.9's IPRoute runs an
asyncio loop per call: 0.15-0.25 ms per request in an idle namespace, 0.5-1.2 ms inside the
daemon's pass, where the same request over the plain socket is ~0.01 ms and decoding ~0.05 ms;
a tunnel-up pass made six of them. Links are read from their fixed header and IFLA_IFNAME only
(pyroute2 decodes every nested attribute of a link: 0.4 ms for four links). Route dumps ask
the kernel to filter (NETLINK_GET_STRICT_CHK): table T, and our protocol in any table, so a
host with a large main table is not dumped on every link event.

Normalisation (a route read back equals the `Route` that was added, so a diff is set
arithmetic):
- dst is "default" for /0, else str(ipaddress.ip_network(...)); table comes from RTA_TABLE,
  never the 8-bit rtm_table (which says 252 for tables > 255).
- metric is None when absent or the family default (IPv4 0, IPv6 1024).
- kind is the route type name: "unicast", "unreachable", and the others by their own names
  (blackhole, prohibit, ...) so they differ from anything desired and get swept.
- dev is None for non-unicast kinds (the kernel reports `lo` for IPv6 unreachable routes) and
  for routes via a gateway, because the compiler names a gateway without its device and the
  kernel fills the device in; only a link-local (fe80::/10) gateway keeps its dev, as it means
  nothing without one. Multipath routes read back with neither dev nor gateway.
Traps:
- The kernel ignores the route type on IPv6 deletes but IPv4 matches scope: deletes use
  scope NOWHERE (the wildcard), as `ip route del` does; IPv6 deletes name metric 1024 when the
  value's metric is None, so they never hit a sibling with another metric.
- NLM_F_EXCL answers EEXIST for *any* route with the same dst/metric (IPv4 also tos), not only
  an identical one: EEXIST is swallowed only after re-reading shows the identical route.
- IPv6 cloned/cache routes (RTM_F_CLONED) and kernel-made local/broadcast/multicast/anycast
  routes are skipped; a route whose device index has no name any more (a link vanishing
  mid-dump) is skipped too: the next event triggers another read.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Collection, Iterator
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from ..core.state import ROUTE_PROTO, Family, HostFacts, LinkFacts, PolicyRule, Route

RTPROT_KERNEL = 2
MAIN_TABLE = 254
RTM_F_CLONED = 0x200
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
IFF_UP = 0x1
FULL_MASK = 0xFFFFFFFF

RT_TYPE_TO_KIND: dict[int, str] = {
    0: "unspec", 1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
    6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat", 11: "xresolve",
}
KIND_TO_RT_TYPE = {kind: num for num, kind in RT_TYPE_TO_KIND.items()}
# Types the kernel creates itself for addresses and multicast: never in our care.
KERNEL_MADE_TYPES = frozenset({2, 3, 4, 5})
DEFAULT_METRIC: dict[int, int] = {4: 0, 6: 1024}
FAMILY_TO_AF: dict[int, int] = {4: socket.AF_INET, 6: socket.AF_INET6}
AF_TO_FAMILY: dict[int, Family] = {socket.AF_INET: 4, socket.AF_INET6: 6}

# Races that a retry shortly after can win: a busy kernel object, a link that vanished or went
# down between our read and our write (OpenVPN creates tun0 before it sets it up), a full buffer.
TRANSIENT_ERRNOS = frozenset({
    errno.EBUSY, errno.EAGAIN, errno.ENODEV, errno.ENETDOWN, errno.EINTR, errno.ENOBUFS,
})
# What the bare strerror does not say about a route the kernel refused.
ROUTE_HINTS = {
    errno.ENETDOWN: "its link is down",
    errno.ENETUNREACH: "the gateway is not on any network a link here reaches",
}
GONE_ERRNOS = frozenset({errno.ESRCH, errno.ENOENT})

# Rule attributes that select packets by something other than fwmark: such a rule to table T
# is someone else's (an unknown attribute is a selector newer than pyroute2's map).
FOREIGN_RULE_SELECTORS = frozenset({
    "FRA_DST", "FRA_SRC", "FRA_IIFNAME", "FRA_OIFNAME", "FRA_GOTO", "FRA_FLOW", "FRA_TUN_ID",
    "FRA_L3MDEV", "FRA_UID_RANGE", "FRA_IP_PROTO", "FRA_SPORT_RANGE", "FRA_DPORT_RANGE",
    "UNKNOWN",
})


# ---- the transport ---------------------------------------------------------------------------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
RTM_GETLINK, RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 18, 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x4, 0x10
NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
IFLA_IFNAME, IFLA_EXT_MASK = 3, 29
RTEXT_FILTER_SKIP_STATS = 1 << 3
RT_TABLE_COMPAT = 252
REQUEST_TIMEOUT = 10.0  # s: a kernel that never answers must not hang a lane for ever
DUMP_ATTEMPTS = 3       # a dump the kernel marks interrupted (NLM_F_DUMP_INTR) is read again
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")     # rtmsg; fib_rule_hdr has the same layout
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")


def _nla(kind: int, payload: bytes) -> bytes:
    return _RTATTR.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _nla(kind, struct.pack("=I", value))


NETLINK_NETFILTER = 12
NFT_MSG_GETTABLE = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES
NFT_FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def nft_table_names() -> list[tuple[str, str]]:
    """(family, name) of every nf_tables table in this namespace, by one netlink dump: under a
    millisecond, where libnftables' `list tables` fetches the whole ruleset (~10 ms at 3000
    rules). NetlinkError/OSError when nf_tables is not there."""
    nl = _Rtnl(NETLINK_NETFILTER)
    try:
        parts = nl.dump(NFT_MSG_GETTABLE, struct.pack("=BBH", 0, 0, 0))  # nfgenmsg: every family
    finally:
        nl.close()
    out = []
    for data, off, length in parts:
        body = off + _NLMSGHDR.size
        for kind, start, end in _attrs(data, body + 4, off + length):
            if kind == 1:  # NFTA_TABLE_NAME
                family = NFT_FAMILIES.get(data[body], str(data[body]))
                out.append((family, data[start:end].rstrip(b"\0").decode()))
    return out


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in data[start:end]."""
    off = start
    while off + 4 <= end:
        length, kind = _RTATTR.unpack_from(data, off)
        if length < 4:
            return
        yield kind & 0x3FFF, off + 4, min(off + length, end)
        off += (length + 3) & ~3


class _Rtnl:
    """A plain netlink socket (NETLINK_ROUTE unless told): each request is sent and answered in
    the caller's thread."""

    def __init__(self, protocol: int = NETLINK_ROUTE) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            self.sock.bind((0, 0))
            self.sock.settimeout(REQUEST_TIMEOUT)
            try:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                self.strict = True  # the kernel filters dumps by the header (Linux >= 4.20)
            except OSError:
                self.strict = False
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0
        self.buf = bytearray(1 << 16)
        self.marshal = MarshalRtnl()

    def close(self) -> None:
        self.sock.close()

    def _send(self, mtype: int, flags: int, body: bytes) -> int:
        self.seq = self.seq % 0x7FFFFFFF + 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, flags, self.seq, 0) + body)
        return self.seq

    def _replies(self, seq: int) -> Iterator[tuple[bytes, int, int, int, int]]:
        """(datagram, message offset, length, type, flags) of each reply to `seq`, until the ack
        or NLMSG_DONE; an answer to an earlier request (one that timed out) is skipped."""
        while True:
            n = self.sock.recv_into(self.buf)
            data = bytes(self.buf[:n])
            off = 0
            while off + _NLMSGHDR.size <= n:
                length, mtype, flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size or off + length > n:
                    break
                if mseq == seq:
                    if mtype in (NLMSG_ERROR, NLMSG_DONE):
                        code = -struct.unpack_from("=i", data, off + 16)[0] if length >= 20 else 0
                        if code:
                            raise NetlinkError(code, os.strerror(code))
                        return
                    yield data, off, length, mtype, flags
                off += (length + 3) & ~3

    def request(self, mtype: int, flags: int, body: bytes) -> None:
        """Send one change and wait for its ack; NetlinkError(code) when refused."""
        seq = self._send(mtype, NLM_F_REQUEST | NLM_F_ACK | flags, body)
        for _ in self._replies(seq):
            pass

    def dump(self, mtype: int, body: bytes) -> list[tuple[bytes, int, int]]:
        """(datagram, offset, length) of every message of a dump, read again if interrupted."""
        for _attempt in range(DUMP_ATTEMPTS):
            seq = self._send(mtype, NLM_F_REQUEST | NLM_F_DUMP, body)
            out, interrupted = [], False
            for data, off, length, _mtype, flags in self._replies(seq):
                interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                out.append((data, off, length))
            if not interrupted:
                break
        return out

    def decode(self, parts: list[tuple[bytes, int, int]]) -> list[Any]:
        """pyroute2 messages (rtmsg, fibmsg) of dumped parts."""
        return [msg for data, off, length in parts for msg in self.marshal.parse(data[off:off + length])]


class NetlinkFailed(Exception):
    """A netlink request the kernel refused; `errno` is the kernel's error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.errno = code

    def __reduce__(self) -> tuple[type[NetlinkFailed], tuple[str, int]]:
        return type(self), (str(self), self.errno)  # keeps errno across pickling


class NetlinkTransient(NetlinkFailed):
    """A refusal a retry may cure (EBUSY, EAGAIN, a link gone mid-add: ENODEV)."""


class _LinkGone(Exception):
    """The route names a link that is not there (the kernel dropped its routes with it)."""


def _failure(what: str, e: NetlinkError | OSError, hints: dict[int, str] | None = None) -> NetlinkFailed:
    code = e.code if isinstance(e, NetlinkError) else (e.errno or 0)
    cls = NetlinkTransient if code in TRANSIENT_ERRNOS else NetlinkFailed
    name = errno.errorcode.get(code, str(code))
    hint = (hints or {}).get(code)
    return cls(f"{what}: {os.strerror(code)} ({name}){': ' + hint if hint else ''}", code)


class NetlinkAdapter:
    """One NETLINK_ROUTE socket, used from one thread (a lane of the daemon, or the CLI)."""

    def __init__(self) -> None:
        self._sock: _Rtnl | None = None

    @property
    def _nl(self) -> _Rtnl:
        if self._sock is None:
            self._sock = _Rtnl()
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> NetlinkAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- facts -----------------------------------------------------------------------------
    def host_facts(self, ipv6_defaults: bool = False) -> HostFacts:
        """Links, all.rp_filter, and with `ipv6_defaults` the devices of the main table's IPv6
        default routes (one more route dump, so only when IPv6 forwarding is wanted)."""
        links = []
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        try:
            parts = self._nl.dump(RTM_GETLINK, body)
        except NetlinkError as e:
            raise _failure("dump links", e) from e
        for data, off, length in parts:
            start = off + _NLMSGHDR.size
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, start)
            name = None
            for kind, a, b in _attrs(data, start + _IFINFOMSG.size, off + length):
                if kind == IFLA_IFNAME:
                    name = data[a:b].split(b"\0", 1)[0].decode(errors="replace")
                    break
            if not name:
                continue
            accept_ra = _read_int(f"/proc/sys/net/ipv6/conf/{name}/accept_ra")
            links.append(LinkFacts(name, index, bool(flags & IFF_UP), accept_ra))
        links.sort(key=lambda link: link.index)
        rp_all = _read_int("/proc/sys/net/ipv4/conf/all/rp_filter")
        devs = self._ipv6_default_devs() if ipv6_defaults else ()
        return HostFacts(links=tuple(links), rp_filter_all=rp_all or 0, ipv6_default_devs=devs)

    def _ipv6_default_devs(self) -> tuple[str, ...]:
        names = _IndexNames()
        devs: set[str] = set()
        msgs = self._route_dump(6, table=MAIN_TABLE) if self._nl.strict else self._route_dump(6)
        for msg in msgs:
            if msg["header"]["type"] != RTM_NEWROUTE:
                continue
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            if msg["dst_len"] or table != MAIN_TABLE or msg["flags"] & RTM_F_CLONED or msg["type"] != 1:
                continue
            oifs = [msg.get_attr("RTA_OIF")]
            oifs += [nh.get("oif") for nh in msg.get_attr("RTA_MULTIPATH") or ()]
            devs.update(name for name in map(names, filter(None, oifs)) if name)
        return tuple(sorted(devs))

    # ---- routes ----------------------------------------------------------------------------
    def _route_dump(self, family: int, table: int = 0, proto: int = 0) -> list[Any]:
        """RTM_GETROUTE dump; with strict checking the kernel sends only `table` / `proto`."""
        body = _RTMSG.pack(FAMILY_TO_AF[family], 0, 0, 0, 0, proto, 0, 0, 0)
        if table:
            body += _u32(RTA_TABLE, table)
        try:
            return self._nl.decode(self._nl.dump(RTM_GETROUTE, body))
        except NetlinkError as e:
            if table and e.code == errno.ENOENT:
                return []  # the kernel has no such table (yet): it holds no route
            raise _failure(f"dump IPv{family} routes", e) from e

    def read_routes(self, tables: int | Collection[int]) -> frozenset[Route]:
        """Every route in `tables` (both families), plus our branded routes in any table."""
        tables = {tables} if isinstance(tables, int) else set(tables)
        names = _IndexNames()
        out: set[Route] = set()
        for family in (4, 6):
            if self._nl.strict:
                msgs = [m for t in sorted(tables) for m in self._route_dump(family, table=t)]
                msgs += self._route_dump(family, proto=ROUTE_PROTO)
            else:
                msgs = self._route_dump(family)
            for msg in msgs:
                if msg["header"]["type"] != RTM_NEWROUTE:
                    continue
                route = route_from_msg(msg, family, names)
                if route is not None and (route.table in tables or route.proto == ROUTE_PROTO):
                    out.add(route)
        return frozenset(out)

    def add_route(self, route: Route) -> None:
        """Add `route`; an identical route already there is success."""
        try:
            self._nl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, _route_request(route, delete=False))
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                if route in self.read_routes({route.table}):
                    return  # already there, identical: adding twice is not an error
                raise NetlinkFailed(
                    f"add route {route.describe()}: another route with the same destination "
                    f"and metric is in table {route.table}", e.code) from e
            raise _failure(f"add route {route.describe()}", e, ROUTE_HINTS) from e

    def del_route(self, route: Route) -> None:
        """Delete exactly `route` (its protocol, metric, type and device); gone is success."""
        try:
            self._nl.request(RTM_DELROUTE, 0, _route_request(route, delete=True))
        except _LinkGone:
            return  # its link went, and the kernel removed the route with it
        except NetlinkError as e:
            if e.code in GONE_ERRNOS:
                return  # already gone
            raise _failure(f"delete route {route.describe()}", e) from e

    # ---- policy rules ----------------------------------------------------------------------
    def read_rules(self, table: int) -> frozenset[PolicyRule]:
        out: set[PolicyRule] = set()
        for family in (4, 6):
            try:
                msgs = self._nl.decode(self._nl.dump(RTM_GETRULE, _RTMSG.pack(FAMILY_TO_AF[family],
                                                                              0, 0, 0, 0, 0, 0, 0, 0)))
            except NetlinkError as e:
                raise _failure(f"dump IPv{family} rules", e) from e
            for msg in msgs:
                if msg["header"]["type"] != RTM_NEWRULE:
                    continue
                rule = rule_from_msg(msg, family)
                if rule is not None and rule.table == table:
                    out.add(rule)
        return frozenset(out)

    def add_rule(self, rule: PolicyRule) -> None:
        try:
            self._nl.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, _rule_request(rule))
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return  # the kernel says EEXIST only for a rule equal in every attribute
            raise _failure(f"add rule {rule.describe()}", e) from e

    def del_rule(self, rule: PolicyRule) -> None:
        try:
            self._nl.request(RTM_DELRULE, 0, _rule_request(rule))
        except NetlinkError as e:
            if e.code in GONE_ERRNOS:
                return
            raise _failure(f"delete rule {rule.describe()}", e) from e


def _route_request(route: Route, delete: bool) -> bytes:
    """The rtmsg and attributes `ip route add/del` would send for `route`."""
    net = _network(route)
    kind_type = KIND_TO_RT_TYPE.get(route.kind)
    if kind_type is None:
        raise NetlinkFailed(f"route {route.describe()}: unknown route type {route.kind!r}")
    scope = RT_SCOPE_UNIVERSE
    if route.family == 4:
        if delete:
            scope = RT_SCOPE_NOWHERE  # wildcard, as `ip route del`
        elif kind_type == 1 and not route.gateway:
            scope = RT_SCOPE_LINK  # a device route, as `ip route add ... dev X` makes it
    af = FAMILY_TO_AF[route.family]
    header_table = route.table if route.table < 256 else RT_TABLE_COMPAT
    body = _RTMSG.pack(af, net.prefixlen, 0, 0, header_table, route.proto, scope, kind_type, 0)
    body += _u32(RTA_TABLE, route.table)
    if net.prefixlen:
        body += _nla(RTA_DST, net.network_address.packed)
    if route.dev and kind_type == 1:
        try:
            body += _u32(RTA_OIF, socket.if_nametoindex(route.dev))
        except OSError as e:
            if delete:
                raise _LinkGone(route.dev) from e
            raise NetlinkTransient(
                f"add route {route.describe()}: link {route.dev} is not present",
                errno.ENODEV) from e
    if route.gateway:
        body += _nla(RTA_GATEWAY, socket.inet_pton(af, route.gateway))
    metric = route.metric if route.metric is not None else DEFAULT_METRIC[route.family]
    if metric:
        body += _u32(RTA_PRIORITY, metric)
    return body


def _rule_request(rule: PolicyRule) -> bytes:
    """The fib_rule_hdr and attributes of `ip rule add/del fwmark M/MASK lookup T pref P`."""
    header_table = rule.table if rule.table < 256 else RT_TABLE_COMPAT
    return (_RTMSG.pack(FAMILY_TO_AF[rule.family], 0, 0, 0, header_table, 0, 0, FR_ACT_TO_TBL, 0)
            + _u32(FRA_PRIORITY, rule.priority) + _u32(FRA_FWMARK, rule.fwmark)
            + _u32(FRA_FWMASK, rule.mask) + _u32(FRA_TABLE, rule.table))


class _IndexNames:
    """ifindex -> name for one read, cached; None when the link has gone (a race)."""

    def __init__(self) -> None:
        self._names: dict[int, str | None] = {}

    def __call__(self, index: int) -> str | None:
        if index not in self._names:
            try:
                self._names[index] = socket.if_indextoname(index)
            except OSError:
                self._names[index] = None
        return self._names[index]


def route_from_msg(msg: Any, family: Family, name_of: Any) -> Route | None:
    """Normalise one RTM_NEWROUTE message; None for what is never ours to compare."""
    if msg["flags"] & RTM_F_CLONED:
        return None
    rt_type = msg["type"]
    proto = msg["proto"]
    if rt_type in KERNEL_MADE_TYPES and proto == RTPROT_KERNEL:
        return None
    table = msg.get_attr("RTA_TABLE")
    if table is None:
        table = msg["table"]
    dst_len = msg["dst_len"]
    if dst_len == 0:
        dst = "default"
    else:
        dst_addr = msg.get_attr("RTA_DST")
        if dst_addr is None:
            return None
        dst = str(ipaddress.ip_network(f"{dst_addr}/{dst_len}", strict=False))
    kind = RT_TYPE_TO_KIND.get(rt_type, f"type{rt_type}")
    gateway = msg.get_attr("RTA_GATEWAY")
    gateway = str(ipaddress.ip_address(gateway)) if gateway else None
    dev: str | None = None
    oif = msg.get_attr("RTA_OIF")
    if kind == "unicast" and oif is not None:
        dev = name_of(oif)
        if dev is None:
            return None  # the link vanished while we read
        if gateway and not ipaddress.ip_address(gateway).is_link_local:
            dev = None  # the kernel fills in the gateway's device; we never name it
    metric = msg.get_attr("RTA_PRIORITY")
    if metric is None or metric == DEFAULT_METRIC[family]:
        metric = None
    return Route(family, table, dst, kind=kind, dev=dev, gateway=gateway, metric=metric, proto=proto)


def rule_from_msg(msg: Any, family: Family) -> PolicyRule | None:
    """A `fwmark M lookup T` rule as a PolicyRule; None for any other rule."""
    if msg["action"] != FR_ACT_TO_TBL or msg["flags"] & FIB_RULE_INVERT:
        return None
    if msg["src_len"] or msg["dst_len"] or msg["tos"]:
        return None
    names = {name for name, _ in msg["attrs"]}
    if "FRA_FWMARK" not in names or names & FOREIGN_RULE_SELECTORS:
        return None
    table = msg.get_attr("FRA_TABLE")
    if table is None:
        table = msg["table"]
    mask = msg.get_attr("FRA_FWMASK")
    return PolicyRule(
        family=family,
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        fwmark=msg.get_attr("FRA_FWMARK"),
        table=table,
        mask=FULL_MASK if mask is None else mask,
    )


def _network(route: Route) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if route.dst == "default":
        return ipaddress.ip_network("0.0.0.0/0" if route.family == 4 else "::/0")
    net = ipaddress.ip_network(route.dst, strict=False)
    if net.version != route.family:
        raise NetlinkFailed(f"route {route.describe()}: {route.dst} is not IPv{route.family}")
    return net


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
