"""The lab's home service and its Internet client: each answer names the peer address seen.

Owns: a TLS listener per TCP port and a UDP listener per UDP port, on IPv4 and IPv6 (separate
v6-only sockets), each answering one line `seen-from <peer address>`; a plain-TCP exchange
listener per bulk port (each request: a 4-byte length and that many bytes; each answer: the
`seen-from` line and as many bytes back, as often as the client asks on one connection); and the
client calls `ask_tcp` / `ask_udp` / `exchange` / `burst` that the lab runs inside the Internet
client's namespace, from a chosen source address if it has several. Never changes
any network state. UDP replies leave from the very address the request came to (IP_PKTINFO),
as a real UDP server on a multi-address host must, or the reply would carry a source the
client never sent to.

Run as a service:  peer_echo.py serve --cert C --key K --tcp 443,8443 --udp 7000,7001 --bulk 9000
Ask once:          peer_echo.py ask tcp|udp ADDRESS PORT [--timeout S]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable

# Linux values; Python's socket module does not export IP_PKTINFO.
IP_PKTINFO = 8
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
GREETING = b"hello\n"


def answer_for(peer: str) -> bytes:
    return f"seen-from {peer}\n".encode()


def parse_answer(data: bytes) -> str | None:
    text = data.decode(errors="replace").strip()
    return text.removeprefix("seen-from ").strip() if text.startswith("seen-from ") else None


# ---- service ---------------------------------------------------------------------------------
def _tls_connection(ctx: ssl.SSLContext, conn: socket.socket, peer: str) -> None:
    with contextlib.suppress(OSError), conn:
        conn.settimeout(10)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(answer_for(peer))
            with contextlib.suppress(OSError):
                tls.unwrap()


def _serve_tcp(family: socket.AddressFamily, port: int, handle: Callable[[socket.socket, str], None]) -> None:
    """Accept on port (this family only) forever; each connection handled in its own thread."""
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        srv.listen(128)
        while True:
            conn, addr = srv.accept()
            threading.Thread(target=handle, args=(conn, addr[0]), daemon=True).start()


def _serve_tls(ctx: ssl.SSLContext, family: socket.AddressFamily, port: int) -> None:
    _serve_tcp(family, port, functools.partial(_tls_connection, ctx))


def _serve_udp(family: socket.AddressFamily, port: int) -> None:
    v6 = family == socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as srv:
        if v6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            srv.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            srv.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        srv.bind(("::" if v6 else "0.0.0.0", port))
        while True:
            _data, ancdata, _flags, addr = srv.recvmsg(2048, socket.CMSG_SPACE(64))
            reply_from: list[tuple[int, int, bytes]] = []
            for level, kind, cdata in ancdata:
                if not v6 and level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    # in_pktinfo {ifindex, spec_dst, addr}: answer from the header's destination
                    reply_from = [(level, kind, struct.pack("=i4s4s", 0, cdata[8:12], b"\0" * 4))]
                elif v6 and level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
                    reply_from = [(level, kind, struct.pack("=16si", cdata[:16], 0))]
            with contextlib.suppress(OSError):
                srv.sendmsg([answer_for(addr[0])], reply_from, 0, addr)


_LEN = struct.Struct("!I")
MAX_EXCHANGE = 1 << 20


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(65536, n - len(data)))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _bulk_connection(conn: socket.socket, peer: str) -> None:
    with contextlib.suppress(OSError), conn:
        conn.settimeout(60)
        while (head := _recv_exactly(conn, _LEN.size)) is not None:
            n = _LEN.unpack(head)[0]
            if n > MAX_EXCHANGE or _recv_exactly(conn, n) is None:
                return
            conn.sendall(answer_for(peer) + _LEN.pack(n) + _payload(n))


def _payload(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def _serve_bulk(family: socket.AddressFamily, port: int) -> None:
    _serve_tcp(family, port, _bulk_connection)


def serve(cert: str, key: str, tcp_ports: list[int], udp_ports: list[int],
          bulk_ports: list[int] | None = None) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    workers = [(_serve_tls, (ctx, fam, p)) for p in tcp_ports for fam in (socket.AF_INET, socket.AF_INET6)]
    workers += [(_serve_udp, (fam, p)) for p in udp_ports for fam in (socket.AF_INET, socket.AF_INET6)]
    workers += [(_serve_bulk, (fam, p)) for p in bulk_ports or () for fam in (socket.AF_INET, socket.AF_INET6)]
    threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, args in workers]
    for t in threads:
        t.start()
    print(f"peer_echo: tls on {tcp_ports}, udp on {udp_ports}", flush=True)
    while all(t.is_alive() for t in threads):
        time.sleep(0.5)
    sys.exit("peer_echo: a listener died")


# ---- client ----------------------------------------------------------------------------------
def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _connect(address: str, port: int, timeout: float, source: str | None) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def ask_tcp(address: str, port: int, timeout: float = 3.0, source: str | None = None) -> str | None:
    """TLS to address:port; the address the service saw, or None if nothing came back in time."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the lab's self-made CA: this checks the path, not the PKI
    try:
        with _connect(address, port, timeout, source) as raw, ctx.wrap_socket(raw) as tls:
            data = b""
            while not data.endswith(b"\n"):
                chunk = tls.recv(256)
                if not chunk:
                    break
                data += chunk
    except (OSError, ssl.SSLError):
        return None
    return parse_answer(data)


def _round(sock: socket.socket, size: int) -> str | None:
    """One request of `size` bytes on an open exchange connection; the peer address the service
    saw if all `size` bytes came back, else None."""
    sock.sendall(_LEN.pack(size) + _payload(size))
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            return None
        line += chunk
    head = _recv_exactly(sock, _LEN.size)
    if head is None or _LEN.unpack(head)[0] != size:
        return None
    body = _recv_exactly(sock, size)
    return parse_answer(line) if body == _payload(size) else None


def exchange(address: str, port: int, size: int, timeout: float = 10.0,
             source: str | None = None) -> str | None:
    """`size` bytes to a bulk port and as many back, within `timeout`; the address the service
    saw, or None if the exchange did not complete."""
    try:
        with _connect(address, port, timeout, source) as sock:
            sock.settimeout(timeout)
            return _round(sock, size)
    except OSError:
        return None


def burst(address: str, port: int, count: int, timeout: float = 3.0,
          source: str | None = None) -> tuple[str | None, list[str | None], str | None]:
    """`count` new connections at once (one small exchange each), while a connection opened
    before them stays open: (the held connection's answer before, each new one's, the held
    one's after). The new ones run in parallel, so the whole burst takes about one timeout."""
    try:
        held = _connect(address, port, timeout, source)
    except OSError:
        return None, [None] * count, None
    with held:
        held.settimeout(timeout)
        before = _try_round(held)
        results: list[str | None] = [None] * count

        def one(i: int) -> None:
            results[i] = exchange(address, port, 1, timeout, source)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return before, results, _try_round(held)


def _try_round(sock: socket.socket) -> str | None:
    try:
        return _round(sock, 1)
    except OSError:
        return None


def ask_udp(address: str, port: int, timeout: float = 3.0, source: str | None = None) -> str | None:
    """One datagram (resent a few times within the timeout); the answer's peer address or None."""
    deadline = time.monotonic() + timeout
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        if source:
            sock.bind((source, 0))
        sock.connect((address, port))  # only answers from the address we asked are accepted
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(OSError):
                sock.send(GREETING)
            sock.settimeout(min(left, 1.0))
            try:
                return parse_answer(sock.recv(2048))
            except TimeoutError:
                continue
            except OSError:  # ICMP unreachable: the port is closed right now, try again
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    return None


SO_MARK = getattr(socket, "SO_MARK", 36)


def send_marked(address: str, port: int, mark: int, count: int = 3) -> None:
    """`count` datagrams to address:port carrying packet mark `mark` (SO_MARK, needs
    CAP_NET_ADMIN): what the service host's replies of one tagged path look like to routing."""
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        for _ in range(count):
            with contextlib.suppress(OSError):  # an ICMP unreachable from the previous one
                sock.sendto(b"late reply\n", (address, port))


def ask_all(asks: list[tuple[str, str, int]], timeout: float = 3.0) -> list[str | None]:
    """Every (proto, address, port) request at once, each in its own thread; the answers in order."""
    answers: list[str | None] = [None] * len(asks)

    def one(i: int, proto: str, address: str, port: int) -> None:
        answers[i] = (ask_tcp if proto == "tcp" else ask_udp)(address, port, timeout)

    threads = [threading.Thread(target=one, args=(i, *ask), daemon=True) for i, ask in enumerate(asks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--tcp", default="443")
    s.add_argument("--udp", default="7000")
    s.add_argument("--bulk", default="")
    a = sub.add_parser("ask")
    a.add_argument("proto", choices=["tcp", "udp"])
    a.add_argument("address")
    a.add_argument("port", type=int)
    a.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        ports = [[int(x) for x in spec.split(",") if x] for spec in (args.tcp, args.udp, args.bulk)]
        serve(args.cert, args.key, ports[0], ports[1], ports[2])
        return 0
    seen = (ask_tcp if args.proto == "tcp" else ask_udp)(args.address, args.port, args.timeout)
    print(seen if seen else "no answer")
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
