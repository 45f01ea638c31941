"""Shared pieces of the benchmarks: generated configs, statistics, tables, the machine line.

Owns nothing in the kernel. Every benchmark builds its own namespaces with nslab (the per-run
prefix) and removes them, also on Ctrl-C; kernel work runs in Netns.call children or through
`ip netns exec`, never in the benchmark process, which never imports python-iptables (its
Table cache would belong to the root namespace).

Benchmarks print tables; they never fail on a number. Goals are printed next to the numbers.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent
REPO = TESTS.parent
for _p in (str(TESTS), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from nslab import Netns, sweep_run_prefix, veth, wait_for  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
TAGROUTECTL = [PYTHON, "-m", "tagrouted.cli"]
TAGROUTED = ([str(VENV_BIN / "tagrouted")] if (VENV_BIN / "tagrouted").exists()
             else [PYTHON, "-c", "import sys; from tagrouted.daemon.main import main; sys.exit(main())"])
RECIPE_UP = BENCH / "recipe_up.sh"

__all__ = [
    "BENCH",
    "PYTHON",
    "RECIPE_UP",
    "REPO",
    "TAGROUTECTL",
    "TAGROUTED",
    "Daemon",
    "Netns",
    "daemon_available",
    "gateway_config",
    "machine_line",
    "ms",
    "print_table",
    "stats",
    "sweep_run_prefix",
    "veth",
    "vpn_client_config",
    "wait_for",
]


# ---- configs -------------------------------------------------------------------------------

def service_address(i: int) -> str:
    """The i-th home address inside 10.100.0.0/16 (250 hosts per /24, none ending in 0)."""
    return f"10.100.{i // 250}.{i % 250 + 1}"


def gateway_config(n: int, *, public_interface: str = "eth0", resync: str | None = None,
                   proto: str = "tcp") -> str:
    """A gateway config with `n` IPv4 services: unique names, distinct public ports, addresses
    inside home_networks. Each service is one DNAT (nat) and one ACCEPT (filter FORWARD)."""
    lines = ["roles: [gateway]", "services:"]
    for i in range(n):
        lines.append(f"  - {{name: s{i}, proto: {proto}, port: {10000 + i}, "
                     f"address: {service_address(i)}}}")
    if n == 0:
        lines[-1] = "services: []"
    lines += [
        "gateway:",
        f"  public_interface: {public_interface}",
        "  public_addresses: [192.0.2.200]",
        "  home_networks: [10.100.0.0/16]",
        "  via: [192.168.200.2]",
    ]
    if resync:
        lines.append(f"resync_interval: {resync}")
    return "\n".join(lines) + "\n"


def vpn_client_config(n: int = 2, *, tun: str = "tun0", lan: str = "eth0",
                      rp_filter: str = "loose", resync: str | None = None) -> str:
    """A vpn-client config with `n` IPv4 services behind `lan`."""
    lines = ["roles: [vpn-client]", "services:"]
    for i in range(n):
        lines.append(f"  - {{name: s{i}, proto: tcp, port: {10000 + i}, "
                     f"address: 192.168.100.{3 + i % 250}}}")
    lines += ["vpn_client:", f"  tunnel_interface: {tun}", f"  lan_interface: {lan}",
              f"  rp_filter: {rp_filter}"]
    if resync:
        lines.append(f"resync_interval: {resync}")
    return "\n".join(lines) + "\n"


class Daemon:
    """One `tagrouted` in a namespace of ours: JSON records on stderr into a file, ended by PID.

    `ip netns exec` execs the daemon in place, so the Popen PID is the daemon's own (its CPU
    time and RSS are read from /proc/PID)."""

    def __init__(self, ns: Netns, config: Path, run_dir: Path, log: Path,
                 env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        self.ns, self.config, self.run_dir, self.log = ns, config, run_dir, log
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        full_env = {**os.environ, "TAGROUTED_LOG_JSON": "1", "PYTHONDONTWRITEBYTECODE": "1",
                    **(env or {})}
        self._log_file = open(log, "ab")  # noqa: SIM115 - lives as long as the daemon
        self.proc = ns.popen([*(command or TAGROUTED), "--config", str(config), "--run-dir", str(run_dir)],
                             stdout=subprocess.DEVNULL, stderr=self._log_file, env=full_env)
        self.pid = self.proc.pid

    def request(self, command: str, timeout: float = 60) -> dict[str, Any]:
        from tagrouted.daemon.control import request  # stdlib only: no kernel library in this process

        return request(str(self.run_dir), {"command": command}, timeout=timeout)

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        """Until `status` answers and says the first converge is done and in sync."""
        from tagrouted.daemon.control import NoDaemon

        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tagrouted exited {self.proc.returncode}: {self.log_tail()}")
            try:
                status = self.request("status", timeout=5)["status"]
            except NoDaemon:
                return None
            return status if status.get("in_sync") else None

        return wait_for(ready, timeout=timeout, interval=0.05, what="tagrouted ready and in sync")

    def records(self) -> list[dict[str, Any]]:
        import json

        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"MESSAGE": line, "PRIORITY": 3, "LEVEL": "RAW"})
        return out

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon so far (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int | None:
        import signal

        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log_file.close()
        return self.proc.returncode


def daemon_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tagrouted.daemon.main") is not None


def begin(bench: str) -> bool:
    """Common start of a daemon benchmark: root, the machine line; False if no daemon to measure."""
    require_root()
    print(f"# {bench}: {machine_line()}")
    if not daemon_available():
        print("# tagrouted daemon not installed (tagrouted.daemon.main): nothing to measure")
        return False
    return True


def teardown(daemon: Daemon | None, *namespaces: Netns) -> None:
    """Stop the daemon we started (by PID, via Daemon.stop), then remove our namespaces."""
    if daemon is not None:
        daemon.stop()
    for ns in namespaces:
        ns.delete()


def vpn_client_host(name: str) -> tuple[Netns, Netns]:
    """A home VPN client: eth0 (a veth to a peer namespace of ours) and tun0, up."""
    ns = Netns(name)
    peer = Netns(name + "-peer")
    veth(ns, "eth0", peer, "eth1")
    ns.run("ip tuntap add dev tun0 mode tun")
    ns.run("ip link set tun0 up")
    return ns, peer


def gateway_host(name: str) -> tuple[Netns, Netns]:
    """A namespace shaped like the seed's public server: eth0 (a veth to a peer namespace of
    ours) with 192.0.2.200 and 192.168.200.1/24, so the route via 192.168.200.2 is accepted."""
    ns = Netns(name)
    peer = Netns(name + "-peer")
    veth(ns, "eth0", peer, "eth1")
    ns.run("ip addr add 192.0.2.200/24 dev eth0")
    ns.run("ip addr add 192.168.200.1/24 dev eth0")
    return ns, peer


# ---- statistics and output ----------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): p99 of 200 samples is the 198th smallest."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values) if values else math.nan,
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    value = seconds * 1000
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A GitHub-flavoured markdown table (pastes straight into the README)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    sys.stdout.flush()


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ipt = subprocess.run(["iptables-legacy", "-V"], capture_output=True, text=True).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB; Linux {platform.release()}; "
            f"Python {platform.python_version()}; {ipt}; load average {load} at start; "
            f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}")


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("benchmarks need root (network namespaces): sudo tests/bench/run_all.sh")


# ---- raw rtnetlink (used inside a namespace: Netns.call children) ----------------------------
# Plain AF_NETLINK sockets, no pyroute2: a measuring process must add no more than a syscall
# between its clock and the kernel, and must read events from its own subscribed socket.

TABLE, MARK, PRIORITY = 42, 42, 1042
RTM_NEWLINK, RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 16, 24, 25, 32, 33
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x40, 0x80
IFF_UP = 1
RTA_OIF, RTA_PRIORITY, RTA_TABLE = 4, 6, 15
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
RTN_UNICAST = 1
FR_ACT_TO_TBL = 1


def _attr(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)


class Rtnl:
    """A command socket (requests with ack) and an event socket subscribed to IPv4 routes and
    rules, bound before anything is measured."""

    def __init__(self, groups: int = RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE) -> None:
        self.cmd = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.cmd.bind((0, 0))
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.events.bind((0, groups))
        self.events.setblocking(False)
        self.seq = 0

    def close(self) -> None:
        self.cmd.close()
        self.events.close()

    def _request(self, mtype: int, body: bytes, what: str) -> None:
        self.seq += 1
        self.cmd.send(struct.pack("=LHHLL", 16 + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK,
                                  self.seq, 0) + body)
        data = self.cmd.recv(65536)
        if struct.unpack_from("=LH", data)[1] == NLMSG_ERROR:
            err = struct.unpack_from("=i", data, 16)[0]
            if err:
                raise OSError(-err, f"{what}: {os.strerror(-err)}")

    def set_up(self, index: int, up: bool) -> None:
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        self._request(RTM_NEWLINK, body, f"set link {index} {'up' if up else 'down'}")

    def del_rule(self) -> None:
        """`ip rule del fwmark 0x2a lookup 42 pref 1042` (ours, IPv4)."""
        body = (struct.pack("=8BI", socket.AF_INET, 0, 0, 0, TABLE, 0, 0, FR_ACT_TO_TBL, 0)
                + _attr(FRA_PRIORITY, PRIORITY) + _attr(FRA_FWMARK, MARK)
                + _attr(FRA_FWMASK, 0xFFFFFFFF) + _attr(FRA_TABLE, TABLE))
        self._request(RTM_DELRULE, body, "delete rule")

    def del_route(self, oif: int) -> None:
        """`ip route del default dev <oif> table 42` (the unicast one, not the unreachable)."""
        # scope RT_SCOPE_NOWHERE (255): any scope matches (a dev route is scope link)
        body = (struct.pack("=8BI", socket.AF_INET, 0, 0, 0, TABLE, 0, 255, RTN_UNICAST, 0)
                + _attr(RTA_TABLE, TABLE) + _attr(RTA_OIF, oif))
        self._request(RTM_DELROUTE, body, "delete route")

    def drain(self) -> None:
        while True:
            try:
                self.events.recv(1 << 16)
            except BlockingIOError:
                return

    def wait_event(self, match: Callable[[bytes], bool], timeout: float) -> bool:
        """Whether a message for which `match(datagram)` is true arrives within `timeout`."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.events], [], [], left)
            if not ready:
                return False
            try:
                data = self.events.recv(1 << 16)
            except BlockingIOError:
                continue
            if match(data):
                return True

    def route_added(self, oif: int, timeout: float) -> bool:
        return self.wait_event(lambda d: any(_is_our_route(m, oif) for m in _messages(d, RTM_NEWROUTE)),
                               timeout)

    def rule_added(self, timeout: float) -> bool:
        return self.wait_event(lambda d: any(_is_our_rule(m) for m in _messages(d, RTM_NEWRULE)), timeout)


class Tun:
    """A tun device held open the way OpenVPN holds it: it exists while the descriptor is open
    (no `ip tuntap` process between the clock and the kernel). Created in the caller's network
    namespace (a Netns.call child)."""

    TUNSETIFF = 0x400454CA
    IFF_TUN, IFF_NO_PI = 0x0001, 0x1000

    def __init__(self, name: str = "tun0") -> None:
        import fcntl

        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), self.IFF_TUN | self.IFF_NO_PI)
            fcntl.ioctl(self.fd, self.TUNSETIFF, ifr)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        """Deletes the device (RTM_DELLINK), as an exiting OpenVPN does."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _messages(data: bytes, mtype: int) -> Iterable[tuple[bytes, dict[int, int]]]:
    """(fixed header, u32 attributes) of each message of `mtype` in one datagram."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=LH", data, off)
        if length < 16:
            return
        if kind == mtype:
            fixed = data[off + 16: off + 28]
            attrs: dict[int, int] = {}
            a = off + 28
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if alen == 8:
                    attrs[atype] = struct.unpack_from("=I", data, a + 4)[0]
                a += (alen + 3) & ~3
            yield fixed, attrs
        off += (length + 3) & ~3


def _is_our_route(msg: tuple[bytes, dict[int, int]], oif: int) -> bool:
    fixed, attrs = msg
    family, dst_len, _, _, table, _, _, rtype = struct.unpack_from("=8B", fixed)
    return (family == socket.AF_INET and dst_len == 0 and rtype == RTN_UNICAST
            and attrs.get(RTA_TABLE, table) == TABLE and attrs.get(RTA_OIF) == oif)


def _is_our_rule(msg: tuple[bytes, dict[int, int]]) -> bool:
    fixed, attrs = msg
    return (fixed[0] == socket.AF_INET and attrs.get(FRA_PRIORITY) == PRIORITY
            and attrs.get(FRA_FWMARK) == MARK and attrs.get(FRA_TABLE, fixed[4]) == TABLE)
