"""Sysctl reads and writes under /proc/sys, and the record of the originals we replaced.

Owns: the file RUN_DIR/sysctl-originals.json (the first value seen for each sysctl tagrouted
changed, so `down` can put it back, across restarts and crashes). Reads and writes only the
keys it is handed; what to set is decided elsewhere (desired.py, converge.py).

Keys are dotted as sysctl(8) prints them, with interface names verbatim: an interface name may
itself contain dots ("eth0.100"), so `key_to_path` knows the per-interface subtrees
(net.ipv4.conf, net.ipv6.conf, net.ipv4.neigh, net.ipv6.neigh) and keeps everything between
the subtree and the last component as the interface name: net.ipv4.conf.eth0.100.rp_filter ->
/proc/sys/net/ipv4/conf/eth0.100/rp_filter. (sysctl(8) itself wants "eth0/100" there: what we
print for a person goes through plan.sysctl_cli_key.)
Build such keys with `conf_key`. Other keys map every dot to a slash.

Traps: /proc/sys/net is the network namespace of the calling thread, so these functions act on
the namespace the process runs in. Writes to the originals file go through rundir.RunDir
(O_NOFOLLOW, O_EXCL temp file, fsync, rename, fsync of the directory) and are serialised by an
flock, since the daemon and a concurrent `tagroutectl apply/down` may both record. What is read
back is checked: only keys of the kinds we write (ip_forward, all.forwarding, <if>.rp_filter,
<if>.accept_ra), for valid interface names, with values those sysctls take; anything else
refuses the whole file (a planted `disable_ipv6=1` was once "restored").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..core.config import interface_name_problem
from ..core.plan import PER_INTERFACE
from .rundir import RunDir

PROC_SYS = Path("/proc/sys")
ORIGINALS_FILE = "sysctl-originals.json"
LOCK_FILE = "sysctl-originals.lock"
MAX_ORIGINALS_BYTES = 256 * 1024


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


# What the originals record may hold: the kinds of sysctl tagrouted writes, each with the values
# the kernel gives it. A planted `disable_ipv6=1` (or any other key) is refused, never "restored".
_GLOBAL_ORIGINALS = {"net.ipv4.ip_forward": ("0", "1"), "net.ipv6.conf.all.forwarding": ("0", "1")}
_PER_INTERFACE_ORIGINALS = {("net.ipv4.conf.", "rp_filter"): ("0", "1", "2"),
                            ("net.ipv6.conf.", "accept_ra"): ("0", "1", "2")}


def original_problem(key: str, value: str) -> str | None:
    """Why (key, value) is not an original tagrouted could have saved; None when it is."""
    allowed = _GLOBAL_ORIGINALS.get(key)
    if allowed is None:
        for (prefix, leaf), values in _PER_INTERFACE_ORIGINALS.items():
            name, sep, last = key.removeprefix(prefix).rpartition(".")
            if key.startswith(prefix) and sep and last == leaf:
                why = interface_name_problem(name)
                if why:
                    return f"{key!r}: the interface name {name!r} {why}"
                allowed = values
                break
    if allowed is None:
        return f"{key!r} is not a sysctl tagrouted changes"
    if value not in allowed:
        return f"{key!r}: {value!r} is not a value it takes ({', '.join(allowed)})"
    return None


class SavedSysctls:
    """Original values of sysctls we changed, kept in RUN_DIR/sysctl-originals.json (survives
    restart; down restores). The file is the record: every call re-reads it, and refuses it
    whole when it holds anything tagrouted would not have written."""

    def __init__(self, run_dir: RunDir | str | Path) -> None:
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(str(run_dir))
        self.path = Path(self.run_dir.file(ORIGINALS_FILE))

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
        fd = self.run_dir.open_lock(LOCK_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, str]:
        raw = self.run_dir.read(ORIGINALS_FILE, MAX_ORIGINALS_BYTES)
        if raw is None:
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{self.path}: not the JSON tagrouted writes ({e}); "
                             "the original sysctl values in it cannot be trusted") from e
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"{self.path}: expected an object of sysctl key -> original value")
        for key, value in data.items():
            why = original_problem(key, value)
            if why:
                raise ValueError(f"{self.path}: {why}: not a record tagrouted wrote, so none of it is "
                                 "restored; check the values by hand and remove the file")
        return data

    def _store(self, saved: dict[str, str]) -> None:
        self.run_dir.write(ORIGINALS_FILE, (json.dumps(saved, indent=1, sort_keys=True) + "\n").encode())
