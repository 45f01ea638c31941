"""Deletes stale UDP conntrack entries for a public endpoint, over conntrack netlink.

Owns nothing persistent: it deletes, on request, the entries whose ORIGINAL direction is UDP
to one address and a port range, so that a client that was already sending before our DNAT
existed gets a fresh entry the DNAT applies to (kube-proxy does the same for its UDP services).
An entry whose reply comes from the DNAT's target already goes where it should: it is kept
(deleting it cut the OpenVPN forward's live session on every reload: the server's next packet
to the client left un-NATed and was lost; seen as a failed request right after a reload).
Never touches TCP, other addresses, other ports, or the reply direction. When to flush is
decided by converge.py.

Traps: the dump is filtered by the kernel (CTA_FILTER, Linux >= 5.8) on the protocol only: a
filter on an IPv6 address matched nothing (Linux 6.18, pyroute2 0.9.7), and older kernels
ignore the filter and send everything, so address and ports are matched here; an entry may expire
between dump and delete (ENOENT: not counted, not an error); conntrack that is not active in
this namespace (no ruleset needs it, nf_conntrack_netlink absent) has nothing to delete.
Threading: opens and closes its own socket per call; safe from any thread.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from pyroute2.conntrack import Conntrack, ConntrackEntry
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from ..core.state import ConntrackFlush

# No conntrack netlink here, or nothing tracked: there is nothing to delete.
NOTHING_TO_DELETE = frozenset({errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.ENOSYS})


def delete_udp_entries(flush: ConntrackFlush) -> int:
    """Delete every entry of flush.family whose original direction is UDP to flush.address,
    dport in [first_port, last_port]; return how many were deleted."""
    af = socket.AF_INET if flush.family == 4 else socket.AF_INET6
    address = str(ipaddress.ip_address(flush.address))  # the form the kernel dump uses
    try:
        ct = Conntrack(nfgen_family=af)
    except OSError as e:
        if e.errno in NOTHING_TO_DELETE:
            return 0
        raise
    with ct:
        try:
            stale = [entry for entry in ct.dump_entries(
                         tuple_orig=NFCTAttrTuple(family=af, proto=socket.IPPROTO_UDP))
                     if _matches(entry, af, address, flush)]
        except NetlinkError as e:
            if e.code in NOTHING_TO_DELETE:
                return 0
            raise
        deleted = 0
        for entry in stale:
            try:
                if entry.zone:
                    ct.entry("del", tuple_orig=entry.tuple_orig, zone=entry.zone)
                else:
                    ct.entry("del", tuple_orig=entry.tuple_orig)
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    continue  # expired since the dump
                raise
            deleted += 1
    return deleted


def _matches(entry: ConntrackEntry, af: int, address: str, flush: ConntrackFlush) -> bool:
    """UDP to the endpoint, and not already NATed to where the DNAT sends it now."""
    orig = entry.tuple_orig
    return (
        orig.family == af
        and orig.proto == socket.IPPROTO_UDP
        and orig.daddr is not None
        and str(ipaddress.ip_address(orig.daddr)) == address
        and orig.dport is not None
        and flush.first_port <= orig.dport <= flush.last_port
        and not _natted_to_target(entry, flush)
    )


def _natted_to_target(entry: ConntrackEntry, flush: ConntrackFlush) -> bool:
    reply = entry.tuple_reply
    if flush.to_address is None or reply is None or reply.saddr is None:
        return False
    port = flush.to_port if flush.to_port is not None else entry.tuple_orig.dport
    return (ipaddress.ip_address(reply.saddr) == ipaddress.ip_address(flush.to_address)
            and reply.sport == port)
