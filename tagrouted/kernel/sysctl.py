"""Sysctl reads and writes under /proc/sys, and the record of the originals we replaced.

Owns: the file RUN_DIR/sysctl-originals.json (the first value seen for each sysctl tagrouted
changed, so `down` can put it back, across restarts and crashes). Reads and writes only the
keys it is handed; what to set is decided elsewhere (desired.py, converge.py).

Keys are dotted as sysctl(8) prints them, with interface names verbatim: an interface name may
itself contain dots ("eth0.100"), so `key_to_path` knows the per-interface subtrees
(net.ipv4.conf, net.ipv6.conf, net.ipv4.neigh, net.ipv6.neigh) and keeps everything between
the subtree and the last component as the interface name: net.ipv4.conf.eth0.100.rp_filter ->
/proc/sys/net/ipv4/conf/eth0.100/rp_filter. (sysctl(8) itself would want "eth0/100" there.)
Build such keys with `conf_key`. Other keys map every dot to a slash.

Traps: /proc/sys/net is the network namespace of the calling thread, so these functions act on
the namespace the process runs in. Writes to the originals file are atomic (temp file, fsync,
rename, fsync of the directory) and serialised by an flock, since the daemon and a concurrent
`tagroutectl apply/down` may both record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

PROC_SYS = Path("/proc/sys")
ORIGINALS_FILE = "sysctl-originals.json"
LOCK_FILE = "sysctl-originals.lock"
# Subtrees whose next component is an interface name (which may contain dots).
PER_INTERFACE = ("net.ipv4.conf.", "net.ipv6.conf.", "net.ipv4.neigh.", "net.ipv6.neigh.")


def conf_key(family: int, ifname: str, leaf: str) -> str:
    """net.ipv<family>.conf.<ifname>.<leaf>, e.g. conf_key(4, "eth0.100", "rp_filter")."""
    return f"net.ipv{family}.conf.{ifname}.{leaf}"


def key_to_path(key: str) -> Path:
    """The /proc/sys file of a dotted key; interface names with dots are kept whole."""
    parts: list[str]
    for prefix in PER_INTERFACE:
        if key.startswith(prefix):
            middle, sep, leaf = key[len(prefix):].rpartition(".")
            if not sep:
                break  # no leaf after the name: not a per-interface value, fall through
            parts = [*prefix.rstrip(".").split("."), middle, leaf]
            break
    else:
        parts = key.split(".")
    if any(p in ("", ".", "..") or "/" in p for p in parts):
        raise ValueError(f"not a sysctl key: {key!r}")
    return PROC_SYS.joinpath(*parts)


def read_sysctl(key: str) -> str | None:
    """The value, stripped; None when the sysctl does not exist (e.g. the link is gone)."""
    try:
        return key_to_path(key).read_text().strip()
    except FileNotFoundError:
        return None


def write_sysctl(key: str, value: str) -> None:
    path = key_to_path(key)
    try:
        # one write(2): /proc/sys parses each write on its own
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"cannot set {key}={value}: {e.strerror}", str(path)) from e


class SavedSysctls:
    """Original values of sysctls we changed, kept in RUN_DIR/sysctl-originals.json (survives
    restart; down restores). The file is the record: every call re-reads it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ORIGINALS_FILE

    def remember(self, key: str, original: str) -> None:
        """Record `original` for `key` unless a value is already recorded: the first wins."""
        with self._locked():
            saved = self._load()
            if key in saved:
                return
            saved[key] = original
            self._store(saved)

    def originals(self) -> dict[str, str]:
        return self._load()

    def forget(self, key: str) -> None:
        with self._locked():
            saved = self._load()
            if saved.pop(key, None) is None:
                return
            self._store(saved)

    # ---- file handling ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{self.path}: not the JSON tagrouted writes ({e}); "
                             "the original sysctl values in it cannot be trusted") from e
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"{self.path}: expected an object of sysctl key -> original value")
        return data

    def _store(self, saved: dict[str, str]) -> None:
        tmp = self.path.with_name(f".{ORIGINALS_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # also when a stale temp file had other bits
            os.write(fd, (json.dumps(saved, indent=1, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
