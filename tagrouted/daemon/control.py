"""The control socket: RUN_DIR/tagrouted.sock, one JSON line in, one JSON line out.

Owns the socket file and its protocol, both ends: the server the daemon runs (`ControlServer`)
and the client `tagroutectl status|reload|apply|down` uses (`request`, `format_status`). Stdlib only, so
`tagroutectl status` never loads pyroute2 or libiptc. Never touches the kernel: the server
hands each request to a callback of the daemon, which answers status from the worker's last
published snapshot and reload by waiting for the worker.

Rules of the socket:
- AF_UNIX stream, created under umask 0177 so it is 0600 from its first instant (no chmod
  race), and the peer's SO_PEERCRED uid must be 0: anyone else gets an error reply.
- A request is one line of at most MAX_LINE bytes, read within CLIENT_TIMEOUT seconds; garbage,
  an oversized line or a silent client gets a clear error reply (or is dropped) and the daemon
  goes on. At most MAX_CLIENTS connections are served at once.
- JSON is parsed with a depth bound (MAX_JSON_DEPTH), both ways: `[` x 60,000 once raised a
  RecursionError in the server and got no reply.
- The client believes only root: the run directory must pass rundir's checks, the socket file
  must be a socket owned by root, and the process answering on it must run as root
  (SO_PEERCRED of the daemon's end); else `Untrusted` (a socket swapped in by another user once
  answered root's `reload` with "reloaded").
- Replies: {"ok": true, ...} or {"ok": false, "error": "..."} for a refused request;
  reload answers {"ok": false, "errors": [config problems]} when the file is rejected.
- Commands: status; reload and apply (the same pass: re-read the config, converge; apply may
  name the config file it means, refused when the daemon runs another); down (remove everything
  and hold it down until a reload). reload, apply and down answer with the changes made.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

SOCKET_NAME = "tagrouted.sock"
MAX_LINE = 64 * 1024
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 8
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NoDaemon(Exception):
    """Nobody answers on the run directory's control socket (exit 3 in tagroutectl)."""


class Untrusted(Exception):
    """The run directory or whoever answers on its socket is not root's: no answer is believed."""


MAX_JSON_DEPTH = 32
# One token at a time from the left: text without brackets or quotes, then a whole string or one
# bracket. Linear: a string that never ends stops the scan (json.loads then refuses the text).
_JSON_TOKEN = re.compile(rb'[^"\[\]{}]*(?:"(?:[^"\\]|\\.)*"|([\[{])|([\]}]))')


def loads_bounded(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads, after checking that nothing nests deeper than `max_depth` (ValueError if so)."""
    depth, pos, end = 0, 0, len(data)
    while pos < end:
        m = _JSON_TOKEN.match(data, pos)
        if m is None or m.end() == pos:
            break
        if m.group(1):
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
        elif m.group(2):
            depth -= 1
        pos = m.end()
    return json.loads(data)


class NotListening(NoDaemon):
    """No socket, or a stale one: no daemon runs on this run directory (`tagroutectl apply`
    and `down` then do the work themselves)."""


class Refused(NoDaemon):
    """The daemon answered with a refusal (not root, malformed request)."""


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


# ---- client ----------------------------------------------------------------------------------

def request(run_dir: str, payload: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
    """Send one request to the daemon of `run_dir` and return its reply.

    Raises NoDaemon when no daemon listens there (no socket, a stale socket, no answer within
    `timeout`), Refused when the daemon refuses the request, Untrusted when the run directory,
    the socket or the process behind it is not root's."""
    path = socket_path(run_dir)
    _check_socket_file(run_dir, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise NotListening(f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise NotListening(f"nothing listens on {path} (a stale socket)") from None
        except PermissionError:
            raise NoDaemon(f"permission denied on {path}: only root may use it") from None
        except TimeoutError:
            raise NoDaemon(f"{path} did not accept within {timeout:g}s") from None
        except OSError as e:
            raise NoDaemon(f"cannot connect to {path}: {e.strerror or e}") from None
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != 0:
            raise Untrusted(f"the process answering on {path} runs as uid {uid}, not root: "
                            "not tagrouted; its answer is not believed")
        try:
            # A refusal (peer credentials) comes before the request is read, and the daemon may
            # have answered and closed before the request is sent: its answer still waits.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps(payload).encode() + b"\n")
            data = _read_line(sock, MAX_LINE * 64)
        except TimeoutError:
            raise NoDaemon(f"no answer on {path} within {timeout:g}s") from None
        except ValueError as e:
            raise NoDaemon(f"{path}: {e}") from None
        except OSError as e:
            raise NoDaemon(f"{path}: {e.strerror or e}") from None
    finally:
        sock.close()
    if not data:
        raise NoDaemon(f"{path} closed the connection without an answer")
    try:
        reply = loads_bounded(data)
    except ValueError:
        raise NoDaemon(f"{path} answered something that is not JSON (or nested too deep)") from None
    if not isinstance(reply, dict):
        raise NoDaemon(f"{path} answered something that is not a JSON object")
    if "error" in reply and not reply.get("ok"):
        raise Refused(f"the daemon refused the request: {reply['error']}")
    return reply


def _check_socket_file(run_dir: str, path: str) -> None:
    """The run directory is ours and the socket in it is a socket owned by root."""
    from ..kernel.rundir import NoRunDir, RunDirDenied, RunDirError, open_run_dir

    try:
        fd = open_run_dir(run_dir, create=False)
    except NoRunDir:
        raise NotListening(f"no run directory {os.path.abspath(run_dir)}") from None
    except RunDirDenied as e:
        raise NoDaemon(str(e)) from None
    except RunDirError as e:
        raise Untrusted(f"run directory refused: {e}") from None
    try:
        st = os.lstat(SOCKET_NAME, dir_fd=fd)
    except FileNotFoundError:
        raise NotListening(f"no control socket at {path}") from None
    finally:
        os.close(fd)
    if not stat.S_ISSOCK(st.st_mode):
        raise Untrusted(f"{path} is not a socket")
    if st.st_uid != 0:
        raise Untrusted(f"{path} is owned by uid {st.st_uid}, not root: not tagrouted's socket")


def _read_line(sock: socket.socket, limit: int) -> bytes:
    """Bytes up to the first newline (excluded) or EOF; ValueError past `limit`."""
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        nl = chunk.find(b"\n")
        buf += chunk if nl < 0 else chunk[:nl]
        if len(buf) > limit:
            raise ValueError(f"line longer than {limit} bytes")
        if nl >= 0:
            return bytes(buf)


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def format_status(status: dict[str, Any]) -> str:
    """The status snapshot as a person reads it (tagroutectl status)."""
    lines = [f"tagrouted {status.get('version', '?')}, pid {status.get('pid', '?')}, "
             f"running since {_when(status.get('started'))}"]

    def row(label: str, value: object) -> None:
        lines.append(f"{label + ':':<13} {value}")

    row("config", status.get("config", "?"))
    row("roles", ", ".join(status.get("roles") or []) or "none")
    if status.get("firewall_backend"):
        row("firewall", f"{status['firewall_backend']} ({status.get('firewall_backend_why', '?')})")
    tun = status.get("tunnel_interface")
    if tun:
        row("tunnel", f"{tun} {'up' if status.get('tunnel_up') else 'down'}")
    if status.get("held_down"):
        row("in sync", f"no: HELD DOWN by `tagroutectl down` since {_when(status.get('held_down_since'))}")
        lines.append("              everything tagrouted owns is removed and stays so until "
                     "`tagroutectl apply`, `tagroutectl reload`, SIGHUP or a restart")
    elif not status.get("ready"):
        row("in sync", "not yet: the first converge has not succeeded")
    else:
        row("in sync", "yes" if status.get("in_sync") else "no")
    last = status.get("last_converge") or {}
    if last:
        row("last pass", f"{_when(last.get('time'))} ({last.get('trigger', '?')}, "
                         f"{last.get('duration_ms', 0):.1f} ms, {last.get('changes', 0)} changes)")
    change = status.get("last_change") or {}
    row("last change", f"{_when(change.get('time'))}: {change['message']} ({change.get('reason', '?')})"
        if change else "none")
    row("repairs", status.get("repairs", 0))
    err = status.get("last_error")
    if err:
        row("last error", f"{_when(err.get('time'))}: {err.get('message')}")
    else:
        row("last error", "none")
    if status.get("metrics_listen"):
        row("metrics", f"{status['metrics_listen']} (/metrics)")
    for problem in status.get("config_errors") or []:
        lines.append(f"  rejected:   {problem}")
    for c in status.get("conflicts") or []:
        row("blocked", f"{c.get('table')} chain {c.get('chain')} {c.get('rule')}: {c.get('does')}")
        lines.append(f"{'':<13}   fix: {c.get('fix')}")
    for c in status.get("conflict_warnings") or []:
        row("may block", f"{c.get('table')} chain {c.get('chain')} {c.get('rule')}: {c.get('does')}")
        lines.append(f"{'':<13}   fix: {c.get('fix')}")
    services = status.get("services") or []
    if services:
        lines.append("services:")
        width = max(len(s.get("name", "")) for s in services)
        for s in services:
            counters = ("-" if s.get("packets") is None
                        else f"{s['packets']} packets, {s['bytes']} bytes")
            policy = [f"{s[k]} {k}" for k in ("dropped", "limited") if s.get(k) is not None]
            if policy:
                counters += f" ({', '.join(policy)})"
            lines.append(f"  {s.get('name', ''):<{width}}  {s.get('proto', '')}/{s.get('port', '')}"
                         f" -> {s.get('address', '')}  {counters}")
    paths = status.get("paths") or []
    if paths:
        lines.append("paths:")
        width = max(len(str(p.get("name", ""))) for p in paths)
        for p in paths:
            if p.get("tunnel"):
                way = f"{p['tunnel']} {'up' if p.get('tunnel_up') else 'down'}"
            else:
                way = "via " + (", ".join(p.get("via") or []) or "-")
            counts = "; ".join(f"{what} " + ("-" if not isinstance(c := p.get(what), dict)
                                             else f"{c.get('packets')} packets, {c.get('bytes')} bytes")
                               for what in ("requests", "replies"))
            mark = p.get("mark")
            mark = hex(mark) if isinstance(mark, int) else mark
            tag = f"dscp {p.get('dscp')} mark {mark} table {p.get('table')}"
            lines.append(f"  {p.get('name', ''):<{width}}  {tag}  {way}  {counts}")
    forwards = status.get("forwards") or []
    if forwards:
        lines.append("forwards:")
        width = max(len(s.get("name", "")) for s in forwards)
        for s in forwards:
            policy = [f"{s[k]} {k}" for k in ("dropped", "limited") if s.get(k) is not None]
            lines.append(f"  {s.get('name', ''):<{width}}  {s.get('proto', '')}/{s.get('port', '')}"
                         f" -> {s.get('address', '')}  {', '.join(policy) or '-'}")
    return "\n".join(lines)


# ---- server ----------------------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class AlreadyRunning(Exception):
    """A live daemon answers on this run directory's socket."""


class ControlServer:
    """Accepts on RUN_DIR/tagrouted.sock in its own thread; one short thread per client."""

    def __init__(self, run_dir: str, handler: Handler, log: Any) -> None:
        self.path = socket_path(run_dir)
        self.handler = handler
        self.log = log
        self._sock: socket.socket | None = None
        self._ino: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def bind(self) -> None:
        """Create the socket (replacing a stale one); AlreadyRunning if a daemon answers."""
        if os.path.exists(self.path) or os.path.islink(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            probe.settimeout(1)
            try:
                probe.connect(self.path)
            except OSError:
                pass  # nobody listens: a crashed daemon's socket
            else:
                raise AlreadyRunning(f"another tagrouted answers on {self.path}")
            finally:
                probe.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600 from the first instant
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(16)
        self._sock = sock
        self._ino = os.stat(self.path).st_ino

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (EINVAL)
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        # Remove the file only if it is still ours (a successor may have replaced it).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                self.log.warning("control socket: accept failed: %s", e)
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                self._reply(conn, {"ok": False, "error": "busy: too many clients at once"})
                conn.close()
                continue
            threading.Thread(target=self._client, args=(conn,), name="control-client", daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(CLIENT_TIMEOUT)
            reply = self._answer(conn)
            if reply is not None:
                self._reply(conn, reply)
        except Exception as e:  # a client must never take the server down
            self.log.warning("control socket: %s: %s", type(e).__name__, e)
        finally:
            conn.close()
            self._slots.release()

    def _answer(self, conn: socket.socket) -> dict[str, Any] | None:
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != 0:
            self.log.warning("control socket: refused uid %d (pid %d): root only", uid, pid)
            return {"ok": False, "error": f"permission denied: uid {uid} is not root"}
        try:
            line = _read_line(conn, MAX_LINE)
        except ValueError:
            return {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
        except TimeoutError:
            return {"ok": False, "error": f"no complete request line within {CLIENT_TIMEOUT:g}s"}
        try:
            req = loads_bounded(line)
        except ValueError as e:
            return {"ok": False, "error": f"request is not JSON: {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            return {"ok": False, "error": 'request must be a JSON object with a "command"'}
        return self.handler(req)

    @staticmethod
    def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")
