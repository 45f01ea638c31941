"""Hostile inputs: a running daemon is handed bad config files and bad control-socket clients.

Each case ends with the same checks: the refusal is clear (exit status and a one-line reason,
or an error reply), the daemon keeps running and answering, and the kernel still holds exactly
the state it held before (the last good config stays applied).

Config files (put in place of the daemon's config, then `tagroutectl reload`): a symlink to
/dev/zero, a 50 MB file, YAML nested 100000 deep (flow) and 1000 deep (block), non-UTF-8 bytes.
Control socket: garbage bytes, JSON that is not a request, an unknown command, a 10 MB line,
half a line then EOF, a silent client (others are still served), 20 idle connections, a
non-root client (refused by the socket's mode, and by its peer credentials when the mode is
opened up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_harness import DaemonProc
from firewall_view import BACKENDS, with_backend
from nslab import Netns, veth, wait_for
from reliability_support import Namespaces, ctl, differences, error_records, snapshot, tracebacks

pytestmark = pytest.mark.kernel

GOOD = """\
roles: [gateway]
services:
  - {name: web, proto: tcp, port: 443, address: 192.168.100.3}
  - {name: echo, proto: udp, port: 7000, address: 192.168.100.3}
gateway:
  public_interface: eth0
  public_addresses: [192.0.2.200]
  home_networks: [192.168.100.0/24]
  via: [192.168.200.2]
"""
NOBODY = 65534


@dataclass
class Host:
    ns: Netns
    daemon: DaemonProc
    config: Path
    run_dir: Path
    reference: dict[str, str]
    good: str  # the config text it runs with

    @property
    def sock(self) -> str:
        return str(self.run_dir / "tagrouted.sock")


@pytest.fixture(scope="module", params=BACKENDS)
def host(module_netns: Namespaces, request: pytest.FixtureRequest) -> Iterator[Host]:
    backend = str(request.param)
    # Under /tmp (not pytest's 0700 tree): the non-root client must be able to reach the socket
    # for the socket's own mode and the daemon's peer check to be what refuses it (as_nobody).
    base = Path(tempfile.mkdtemp(prefix="tgr-hostile-", dir="/tmp"))
    os.chmod(base, 0o711)
    tag = "nft" if backend == "nftables" else "ipt"
    ns = module_netns(f"hostile-{tag}")
    peer = module_netns(f"hostile-{tag}-peer")
    ns.run("sysctl -qw net.ipv6.conf.default.accept_dad=0")
    veth(ns, "eth0", peer, "eth0")
    ns.run("ip addr add 192.0.2.200/24 dev eth0")
    ns.run("ip addr add 192.168.200.1/24 dev eth0")
    config = base / "tagrouted.yaml"
    config.write_text(with_backend(GOOD, backend))
    run_dir = base / "run"
    d = DaemonProc(ns, config, run_dir)
    d.start()
    try:
        d.wait_ready()
        yield Host(ns, d, config, run_dir, snapshot(ns), config.read_text())
    finally:
        d.close()
        shutil.rmtree(base, ignore_errors=True)


def still_fine(h: Host) -> None:
    """The daemon runs, answers, and the kernel holds what it held before."""
    assert h.daemon.alive(), h.daemon.other_lines[-20:]
    status = h.daemon.status()
    assert status["ready"] and status["pid"] == h.daemon.pid
    now = snapshot(h.ns)
    assert now == h.reference, differences(h.reference, now)
    assert tracebacks(h.daemon) == []


# ---- config files -------------------------------------------------------------------------

def _symlink_to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _fifty_megabytes(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"roles: [gateway]\n")
        chunk = b"#" * (1 << 20)
        for _ in range(50):
            f.write(chunk)


def _nested_flow(path: Path) -> None:
    path.write_text("roles: [gateway]\nservices: " + "[" * 100_000 + "]" * 100_000 + "\n")


def _nested_block(path: Path) -> None:
    lines = ["roles: [gateway]", "gateway:"]
    lines += [" " * (i + 1) + f"k{i}:" for i in range(1000)]
    path.write_text("\n".join(lines) + " x\n")


def _not_utf8(path: Path) -> None:
    path.write_bytes(GOOD.encode().replace(b"name: web", b"name: w\xe9b\xff"))


CONFIG_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink-to-dev-zero": (_symlink_to_dev_zero, "not a regular file"),
    "50-MB-file": (_fifty_megabytes, "larger than"),
    "nested-100000-deep-flow": (_nested_flow, "nest"),
    "nested-1000-deep-block": (_nested_block, "nest"),
    "non-UTF-8-bytes": (_not_utf8, "UTF-8"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_config_is_refused_and_the_state_kept(host: Host, case: str) -> None:
    make, reason = CONFIG_CASES[case]
    errors_before = len(error_records(host.daemon))
    try:
        make(host.config)
        res = ctl(host.ns, host.config, host.run_dir, "reload")
        assert res.returncode == 1, res.stdout + res.stderr
        first = res.stderr.splitlines()[0]
        assert first.startswith(f"{host.config}:") and reason in first, res.stderr
        assert "reload rejected: the running state is kept" in res.stderr
        check = ctl(host.ns, host.config, host.run_dir, "check")
        assert check.returncode == 1 and reason in check.stderr, check.stderr
        status = host.daemon.status()
        assert status["config_errors"] and reason in status["config_errors"][0], status
        assert len(error_records(host.daemon)) > errors_before, "the rejection is logged"
        still_fine(host)
    finally:
        with contextlib.suppress(FileNotFoundError):
            host.config.unlink()
        host.config.write_text(host.good)
    res = ctl(host.ns, host.config, host.run_dir, "reload")
    assert res.returncode == 0, res.stderr
    assert host.daemon.status()["config_errors"] == []
    still_fine(host)


# ---- control socket -----------------------------------------------------------------------

def exchange(path: str, data: bytes, *, shutdown: bool = False, timeout: float = 15) -> bytes:
    """Send `data` on a new connection and return what comes back before EOF (maybe b"")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            if shutdown:
                s.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                reply += chunk
                if b"\n" in reply:
                    break
        return reply


def refused(reply: bytes) -> dict[str, object]:
    doc = json.loads(reply)
    assert doc.get("ok") is False and doc.get("error"), doc
    return doc


SOCKET_CASES: dict[str, tuple[bytes, bool]] = {
    "garbage-bytes": (b"\x00\xff\xfe\x01 not json {{{\n", True),
    "json-not-a-request": (b"[1, 2, 3]\n", True),
    "unknown-command": (b'{"command": "rm -rf /"}\n', True),
    "ten-megabyte-line": (b"a" * (10 << 20) + b"\n", False),  # a reply or a closed connection
    "half-a-line-then-eof": (b'{"command": "sta', False),
    "nested-60000-deep": (b"[" * 60_000 + b"\n", True),  # once a RecursionError and no reply
}


@pytest.mark.parametrize("case", list(SOCKET_CASES))
def test_hostile_control_client_is_refused(host: Host, case: str) -> None:
    data, must_reply = SOCKET_CASES[case]
    reply = exchange(host.sock, data, shutdown=True)
    if must_reply or reply:
        refused(reply)
    still_fine(host)


def test_a_silent_client_does_not_block_others(host: Host) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(host.sock)
        reply = json.loads(exchange(host.sock, b'{"command": "status"}\n'))
        assert reply["ok"] and reply["status"]["pid"] == host.daemon.pid
    still_fine(host)


def test_many_idle_connections_then_a_request(host: Host) -> None:
    idle = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(host.sock)
            idle.append(s)
    finally:
        for s in idle:
            s.close()

    def served() -> dict[str, object] | None:
        # while the daemon drains the closed ones, the listen backlog may still be full (EAGAIN)
        with contextlib.suppress(BlockingIOError):
            return json.loads(exchange(host.sock, b'{"command": "status"}\n'))
        return None

    reply = wait_for(served, timeout=15, interval=0.05, what="a request served after the burst")
    assert reply["ok"]
    still_fine(host)


def as_nobody(path: str) -> str:
    """Connect as uid/gid 65534 from a forked child; what happened, as one line. The run
    directory is opened to others (0711) meanwhile, so that the socket's own mode and the
    daemon's peer check are what refuse; tagroutectl refuses such a run directory."""
    run_dir = os.path.dirname(path)
    os.chmod(run_dir, 0o711)
    try:
        return _as_nobody(path)
    finally:
        os.chmod(run_dir, 0o700)


def _as_nobody(path: str) -> str:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, then talk
        os.close(rfd)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = "reply " + exchange(path, b'{"command": "reload"}\n').decode(errors="replace")
            except PermissionError as e:
                out = f"PermissionError {e.errno}"
            except OSError as e:
                out = f"OSError {e.errno} {e}"
        except BaseException as e:
            out = f"child failed: {e!r}"
        os.write(wfd, out.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        out = r.read().decode()
    os.waitpid(pid, 0)
    return out


def test_non_root_client_is_refused_by_the_socket_mode(host: Host) -> None:
    assert (os.stat(host.sock).st_mode & 0o777) == 0o600
    assert as_nobody(host.sock) == "PermissionError 13"
    still_fine(host)


def test_non_root_client_is_refused_by_peer_credentials(host: Host) -> None:
    """Even if an admin opens the socket's mode up, the daemon checks who is calling."""
    os.chmod(host.sock, 0o666)
    try:
        out = as_nobody(host.sock)
    finally:
        os.chmod(host.sock, 0o600)
    assert out.startswith("reply "), out
    doc = refused(out.removeprefix("reply ").encode())
    assert "root" in str(doc["error"]), doc
    still_fine(host)


def test_no_errors_but_the_rejected_configs(host: Host) -> None:
    """Last: socket abuse is answered, not logged as the daemon's own error."""
    errors = error_records(host.daemon)
    assert all(("rejected" in e or str(host.config) in e) for e in errors), errors
