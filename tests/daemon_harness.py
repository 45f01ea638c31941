"""Run the real `tagrouted` inside a test namespace and watch what it says.

Owns one daemon process per `DaemonProc`: started with `ip netns exec` (so it lives in the
namespace, never in the root one), its JSON records (TAGROUTED_LOG_JSON=1: one JSON object per
stderr line, the journal's field names) collected by a reader thread, and the sd_notify
datagrams it sends to a NOTIFY_SOCKET this harness owns. Used by the daemon kernel tests, the
benchmarks and the end-to-end lab:

    with DaemonProc(ns, config, run_dir) as d:
        d.wait_ready()
        d.wait_record(lambda r: r.get("TAGROUTED_REASON") == "drift")
        print(d.status())

Stopping: `stop()` sends SIGTERM and waits (on_stop runs); `kill()` is SIGKILL (a crash).
Both act on the daemon's own PID only.

Metrics: `scrape(ns, listen)` GETs /metrics as Prometheus would, from inside the namespace
(`listen` as in metrics.listen: "127.0.0.1:9542", "[::1]:9542" or a unix socket path), and
parses it with prometheus_client's own parser into {'name{label="v"}': value}.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nslab import Netns, wait_for

VENV_BIN = Path(sys.executable).parent
TAGROUTED = str(VENV_BIN / "tagrouted")
TAGROUTECTL = str(VENV_BIN / "tagroutectl")
Record = dict[str, Any]


# ---- metrics -------------------------------------------------------------------------------
def http_get_metrics(listen: str, timeout: float = 5) -> str:
    """GET /metrics from `listen` (ADDRESS:PORT or a unix socket path) in this namespace."""
    if listen.startswith("/"):
        class UnixConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(listen)
        conn: http.client.HTTPConnection = UnixConnection("localhost", timeout=timeout)
    else:
        host, port = listen.rsplit(":", 1)
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status != 200:
            raise AssertionError(f"GET /metrics on {listen} -> {resp.status}: {body[:200]}")
        return body
    finally:
        conn.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a scrape, parsed by prometheus_client.parser, as {'name{a="x"}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def scrape(ns: Netns, listen: str) -> dict[str, float]:
    """The daemon's metrics as Prometheus sees them, scraped from inside `ns`."""
    return parse_metrics(ns.call(http_get_metrics, listen, timeout=30))


class DaemonProc:
    def __init__(self, ns: Netns, config: str | Path, run_dir: str | Path, *,
                 env: dict[str, str] | None = None, log_level: str = "info",
                 notify: bool = True, watchdog_usec: int | None = None) -> None:
        self.ns = ns
        self.config = str(config)
        self.run_dir = str(run_dir)
        self.extra_env = env or {}
        self.log_level = log_level
        self.watchdog_usec = watchdog_usec
        self.proc: subprocess.Popen[bytes] | None = None
        self.records: list[Record] = []
        self.other_lines: list[str] = []
        self.notifications: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._notify_dir: str | None = None
        self._notify_sock: socket.socket | None = None
        self.notify_path: str | None = None
        if notify:
            self._notify_dir = tempfile.mkdtemp(prefix="tgr-notify-")
            self.notify_path = os.path.join(self._notify_dir, "notify.sock")
            self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify_sock.bind(self.notify_path)
            self._notify_sock.settimeout(0.2)

    # ---- process ---------------------------------------------------------------------------
    def start(self) -> DaemonProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "JOURNAL_"))}
        env.update({"TAGROUTED_LOG_JSON": "1", "PYTHONUNBUFFERED": "1"})
        if self.notify_path:
            env["NOTIFY_SOCKET"] = self.notify_path
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        env.update(self.extra_env)
        self.records.clear()
        self.proc = self.ns.popen([TAGROUTED, "--config", self.config, "--run-dir", self.run_dir,
                                   "--log-level", self.log_level],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._spawn(self._read_stderr, self.proc)
        if self._notify_sock is not None and not any(t.name == "notify" for t in self._threads if t.is_alive()):
            self._spawn(self._read_notify, None, name="notify")
        return self

    def _spawn(self, fn: Callable[..., None], arg: Any, name: str = "stderr") -> None:
        t = threading.Thread(target=fn, args=(arg,) if arg is not None else (), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _read_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            with self._lock:
                if isinstance(rec, dict):
                    self.records.append(rec)
                else:
                    self.other_lines.append(line)

    def _read_notify(self) -> None:
        sock = self._notify_sock
        while sock is not None and sock.fileno() != -1:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.notifications.append((time.monotonic(), data.decode(errors="replace")))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the exit status (on_stop has run)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._join_readers()
        return code

    def kill(self) -> int:
        """SIGKILL: a crash, nothing cleaned up."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(10)
        self._join_readers()
        return code

    def _join_readers(self) -> None:
        for t in self._threads:
            if t.name == "stderr":
                t.join(timeout=5)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.kill()
        if self._notify_sock is not None:
            self._notify_sock.close()
            self._notify_sock = None
        if self._notify_dir:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._notify_dir, "notify.sock"))
            with contextlib.suppress(OSError):
                os.rmdir(self._notify_dir)

    def __enter__(self) -> DaemonProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what it says ----------------------------------------------------------------------
    def all_records(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def changes(self, reason: str | None = None) -> list[Record]:
        return [r for r in self.all_records() if "TAGROUTED_ACTION" in r
                and (reason is None or r.get("TAGROUTED_REASON") == reason)]

    def wait_record(self, pred: Callable[[Record], bool], timeout: float = 10, what: str = "a record") -> Record:
        def find() -> Record | None:
            self._check_alive()
            return next((r for r in self.all_records() if pred(r)), None)
        return wait_for(find, timeout=timeout, what=what)

    def notified(self) -> list[str]:
        """Every sd_notify assignment received, in order ("READY=1", "STATUS=...", ...)."""
        with self._lock:
            return [line for _, msg in self.notifications for line in msg.split("\n")]

    def wait_notified(self, assignment: str, timeout: float = 20, count: int = 1) -> None:
        wait_for(lambda: self._check_alive() or self.notified().count(assignment) >= count,
                 timeout=timeout, what=f"{assignment} x{count} on NOTIFY_SOCKET")

    def wait_ready(self, timeout: float = 20) -> None:
        self.wait_notified("READY=1", timeout)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"tagrouted exited with {self.proc.returncode}; records:\n"
                                 + "\n".join(r.get("MESSAGE", "") for r in self.all_records()[-30:])
                                 + "\n" + "\n".join(self.other_lines[-30:]))

    # ---- tagroutectl -----------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.ns.run([TAGROUTECTL, "--config", self.config, "--run-dir", self.run_dir, *args],
                           check=False, timeout=timeout)

    def wait_listening(self, timeout: float = 20) -> None:
        """Until the control socket answers (before READY=1 when the first converge fails)."""
        wait_for(lambda: self._check_alive() or self.ctl("status", "--json").returncode == 0,
                 timeout=timeout, interval=0.05, what="the control socket")

    def status(self) -> dict[str, Any]:
        res = self.ctl("status", "--json")
        if res.returncode != 0:
            raise AssertionError(f"tagroutectl status -> {res.returncode}: {res.stderr}")
        return json.loads(res.stdout)


# Writes 3 IPv4 TCP SYNs to 192.168.100.3:443 from 203.0.113.7 into the tun device named argv[1]
# ("from the tunnel side": what a public server forwards home through it). Run it in the host's
# namespace: `ns.popen([sys.executable, "-c", TUN_WRITER, "tun0"])`.
TUN_WRITER = r"""
import fcntl, os, struct, socket, sys
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454ca, 0x0001, 0x1000
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", sys.argv[1].encode(), IFF_TUN | IFF_NO_PI))
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
src, dst = socket.inet_aton("203.0.113.7"), socket.inet_aton("192.168.100.3")
tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
tcp = tcp[:16] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
for _ in range(3):
    os.write(fd, ip + tcp)
"""
