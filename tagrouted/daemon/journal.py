"""Where the daemon's records go, and what it tells systemd.

Owns: the handler of the `tagrouted` logger and the sd_notify datagrams. Never touches kernel
networking state; imports only the standard library (systemd.journal lazily, when journald is
the sink), so it is cheap to import anywhere.

Sinks, chosen once at start:
- TAGROUTED_LOG_JSON=1: one JSON object per stderr line with the journal's field names
  (MESSAGE, PRIORITY, TAGROUTED_*), so tests assert fields without a journald;
- journald, when systemd runs us (JOURNAL_STREAM names our stderr, or NOTIFY_SOCKET is set and
  journald's socket exists): systemd.journal.send with MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and
  the TAGROUTED_ACTION / TAGROUTED_OBJECT / TAGROUTED_REASON fields of a change;
- stderr otherwise: one plain line per record.
A record carries its journal fields in `extra={"fields": {...}}` (see `fields()`).

sd_notify: READY=1, RELOADING=1 (+ MONOTONIC_USEC), STATUS=, WATCHDOG=1, STOPPING=1, sent as
datagrams to NOTIFY_SOCKET (a path, or "@name" for an abstract socket); a failed send is
logged once at debug level and never stops the daemon. The watchdog interval is half of
WATCHDOG_USEC, honoured only when WATCHDOG_PID is absent or names this process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any

IDENTIFIER = "tagrouted"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog priorities by logging level
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def fields(**values: str) -> dict[str, dict[str, str]]:
    """`extra=` for a record with journal fields: fields(TAGROUTED_ACTION="added", ...)."""
    return {"fields": values}


def _priority(levelno: int) -> int:
    for level, prio in sorted(PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def _message(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return text


class JsonLineHandler(logging.Handler):
    """One JSON object per line on a stream, with the field names journald would get."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            doc: dict[str, Any] = {
                "MESSAGE": _message(record),
                "PRIORITY": _priority(record.levelno),
                "LEVEL": record.levelname,
                "LOGGER": record.name,
                "TIME": record.created,
                "SYSLOG_IDENTIFIER": IDENTIFIER,
            }
            doc.update(getattr(record, "fields", {}) or {})
            self.stream.write(json.dumps(doc, sort_keys=True) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


class JournalHandler(logging.Handler):
    """Native journald records with our fields; stderr if journald refuses one."""

    def __init__(self) -> None:
        super().__init__()
        from systemd import journal  # systemd-python, only when journald is the sink

        self._send = journal.send
        self._fallback = PlainHandler()

    def emit(self, record: logging.LogRecord) -> None:
        extra = {k: str(v) for k, v in (getattr(record, "fields", {}) or {}).items()}
        try:
            self._send(
                _message(record),
                PRIORITY=str(_priority(record.levelno)),
                SYSLOG_IDENTIFIER=IDENTIFIER,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,  # systemd-python formats it with {:d}: a str raises
                CODE_FUNC=record.funcName,
                TAGROUTED_LOGGER=record.name,
                **extra,
            )
        except Exception:
            self._fallback.emit(record)


class PlainHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """`2024-05-01 12:00:00 warning: added rule ... (drift: it was missing)` on stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        reason = (getattr(record, "fields", {}) or {}).get("TAGROUTED_REASON")
        return f"{text} [{reason}]" if reason else text


def _stderr_is_journal(env: Mapping[str, str]) -> bool:
    """JOURNAL_STREAM is "DEV:INODE" of the stream systemd connected; trust it only if it is
    still our stderr (a child of a systemd service inherits the variable, not the stream)."""
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def choose_sink(env: Mapping[str, str] = os.environ) -> str:
    """"json", "journal" or "stderr"."""
    if env.get("TAGROUTED_LOG_JSON") == "1":
        return "json"
    if _stderr_is_journal(env) or (env.get("NOTIFY_SOCKET") and os.path.exists(JOURNAL_SOCKET)):
        try:
            import systemd.journal  # noqa: F401
        except ImportError:
            return "stderr"
        return "journal"
    return "stderr"


def setup_logging(level: str = "info", env: Mapping[str, str] = os.environ) -> str:
    """Point the `tagrouted` logger at the chosen sink; returns the sink's name."""
    sink = choose_sink(env)
    handler: logging.Handler
    if sink == "json":
        handler = JsonLineHandler()
    elif sink == "journal":
        handler = JournalHandler()
    else:
        handler = PlainHandler()
    root = logging.getLogger("tagrouted")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    return sink


class Notifier:
    """sd_notify without libsystemd: datagrams to NOTIFY_SOCKET; a no-op without one."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.path = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        try:
            if usec and int(usec) > 0 and (not pid or int(pid) == os.getpid()):
                self.watchdog_interval = int(usec) / 2e6
        except ValueError:
            pass
        self._sock: socket.socket | None = None
        self._warned = False
        self._last_status: str | None = None

    def send(self, *assignments: str) -> bool:
        if not self.path:
            return False
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), address)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                logging.getLogger("tagrouted.notify").debug("sd_notify to %s failed: %s", self.path, e)
            return False

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))
        if status:
            self._last_status = status

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, line: str) -> None:
        """STATUS= one line, sent only when it says something new."""
        line = " ".join(line.split())
        if line != self._last_status:
            self._last_status = line
            self.send(f"STATUS={line}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
