"""The nftables backend: everything tagrouted keeps in the firewall, in the one table `inet tagrouted`.

Owns: the table `inet tagrouted` and everything in it (base chains, sets, maps, counters); a
rule or element inside it that we did not write is removed. Never touches any other table: it
lists only its own (`list table inet tagrouted`), and every command it sends names that table.
Other tools' tables (iptables-nft's `ip filter`, firewalld's `inet firewalld`, Docker's) stay
byte for byte; what they do to our traffic is the host-firewall check's business, not this one's.

Writes: one libnftables transaction per change (a buffer of commands is one netlink batch: all
or nothing; a failed batch applies nothing), through libnftables' official Python binding, the
`nftables` module. Reads: our table as libnftables JSON, of which only stable schema fields are
used (names, chain hook/type/prio/policy, set type/map/flags, and the `comment` of each rule and
element, which carries the digest of what we wrote: see core/nft_diff.py). Nothing is remembered
between calls: every sync re-reads the table.

Threading: one libnftables context per backend object, used from one thread (the reconcile
worker or the CLI); a context binds to the network namespace it was created in.

Traps:
- The binding is a Debian/Fedora package (python3-nftables), not on PyPI under that name, and
  it is a thin ctypes layer that belongs with the system's libnftables.so.1: a venv or a
  `pip install` that cannot import it loads it from the distribution's dist-packages (only that
  package, not the whole directory); if it is not installed the error names the package.
- JSON shapes move between nft versions (1.1.4 broke netavark, containers/netavark#1303): a
  map's data type is a string "a . b" in 1.0.6 and may be a list elsewhere; chain priorities may
  be named. Both are normalised; anything else the reader does not know reads as "differs",
  which at worst rewrites our own table.
- A table's and a chain's comment are not in 1.0.6's JSON: neither is relied upon.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import json
import logging
import os
import re
import sys
import time
from typing import Any

from ...core.nft_diff import KernelChain, KernelNft, KernelSet, drift_lines, nft_transaction
from ...core.nft_rules import (
    PATH_COUNTS,
    TABLE_FAMILY,
    TABLE_NAME,
    WHERE,
    counter_name,
    dropped_counter,
    limited_counter,
    nft_table,
    path_counter_name,
)
from ...core.state import FirewallIntent
from . import NFTABLES, BackendUnavailable, Counters, FirewallSync

log = logging.getLogger("tagrouted.nftables")

INSTALL_HINT = ("the nftables backend needs libnftables' Python binding, the `nftables` module: "
                "install python3-nftables (Debian, Ubuntu, Fedora, RHEL), or set "
                "`firewall: {backend: iptables-legacy}` on a host with legacy xtables")
# Where distributions put the binding, for interpreters that do not see them (a venv, pyenv).
SYSTEM_SITE_DIRS = ("/usr/lib/python3/dist-packages", "/usr/lib/python3*/site-packages",
                    "/usr/lib64/python3*/site-packages", "/usr/local/lib/python3*/dist-packages")
ATTEMPTS = 3
# Named priorities as nft may print them in JSON (numbers are what 1.0.6 prints).
_NAMED_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
                     "srcnat": 100}
_PRIORITY_RE = re.compile(r"\s*([a-z]+)\s*(?:([+-])\s*(\d+))?\s*")


class NftError(Exception):
    """libnftables refused a command; the message is its error text."""


@functools.cache
def binding() -> Any:
    """The `nftables` module: importable as is, or the distribution's copy loaded by path."""
    try:
        import nftables  # type: ignore[import-not-found]

        return nftables
    except ImportError:
        pass
    for pattern in SYSTEM_SITE_DIRS:
        for base in sorted(glob.glob(pattern)):
            init = os.path.join(base, "nftables", "__init__.py")
            if not os.path.isfile(init):
                continue
            spec = importlib.util.spec_from_file_location(
                "nftables", init, submodule_search_locations=[os.path.dirname(init)])
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules["nftables"] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                sys.modules.pop("nftables", None)
                continue
            return module
    raise BackendUnavailable(INSTALL_HINT)


def _priority(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _PRIORITY_RE.fullmatch(value)
        if m and m.group(1) in _NAMED_PRIORITIES:
            base = _NAMED_PRIORITIES[m.group(1)]
            delta = int(m.group(3) or 0)
            return base + delta if m.group(2) != "-" else base - delta
        with contextlib.suppress(ValueError):
            return int(value)
    return None


def _types(value: Any) -> tuple[str, ...] | None:
    """A set's key or a map's data type: "a", "a . b" or ["a", "b"] -> ("a", "b")."""
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(" . "))
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return (json.dumps(value, sort_keys=True),)  # unknown shape: compares as different


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _seconds(value: Any) -> int | None:
    """A set's timeout: seconds as 1.0.6 prints them (a number), or "10m"/"1h30s" strings."""
    if isinstance(value, str):
        parts = re.findall(r"(\d+)(ms|d|h|m|s)", value)
        if parts and "".join(n + u for n, u in parts) == value.replace(" ", ""):
            scale = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0}
            return sum(int(n) * scale[u] for n, u in parts)
        return None
    return _int(value)


def _element_comment(entry: Any) -> str | None:
    """The comment of one element as JSON lists it: a map's [key, value] or a set's key, either
    possibly wrapped as {"elem": {"val": ..., "comment": ...}}."""
    if isinstance(entry, list) and entry:
        entry = entry[0]
    if isinstance(entry, dict) and isinstance(entry.get("elem"), dict):
        comment = entry["elem"].get("comment")
        return comment if isinstance(comment, str) else None
    return None


def parse_table(doc: Any) -> KernelNft:
    """Our table from `list table inet tagrouted` JSON."""
    exists = False
    counters: set[str] = set()
    sets: dict[str, KernelSet] = {}
    chains: dict[str, dict[str, Any]] = {}
    for item in doc.get("nftables", []) if isinstance(doc, dict) else []:
        if not isinstance(item, dict):
            continue
        for kind, v in item.items():
            if not isinstance(v, dict):
                continue
            if kind == "table":
                exists = exists or (v.get("name") == TABLE_NAME and v.get("family") == TABLE_FAMILY)
            elif kind == "counter":
                counters.add(str(v.get("name")))
            elif kind in ("set", "map"):
                key = _types(v.get("type")) or ()
                value = _types(v.get("map")) if kind == "map" else None
                flags = tuple(str(f) for f in v.get("flags", ()) or ())
                comments = tuple(_element_comment(e) for e in v.get("elem", ()) or ())
                sets[str(v.get("name"))] = KernelSet(kind, key, value, flags, comments,
                                                     _seconds(v.get("timeout")), _int(v.get("size")))
            elif kind == "chain":
                chains[str(v.get("name"))] = {
                    "type": v.get("type"), "hook": v.get("hook"), "priority": _priority(v.get("prio")),
                    "policy": v.get("policy"), "comments": [], "handles": []}
            elif kind == "rule":
                chain = chains.setdefault(str(v.get("chain")), {
                    "type": None, "hook": None, "priority": None, "policy": None,
                    "comments": [], "handles": []})
                comment = v.get("comment")
                chain["comments"].append(comment if isinstance(comment, str) else None)
                chain["handles"].append(int(v.get("handle", 0)))
    return KernelNft(
        exists=exists, counters=frozenset(counters), sets=sets,
        chains={name: KernelChain(c["type"], c["hook"], c["priority"], c["policy"],
                                  tuple(c["comments"]), tuple(c["handles"])) for name, c in chains.items()})


class NftablesBackend:
    """The nftables backend behind the firewall interface."""

    name = NFTABLES

    def __init__(self) -> None:
        self._ctx: Any = None

    @property
    def nft(self) -> Any:
        if self._ctx is None:
            try:
                ctx = binding().Nftables()
            except OSError as e:  # libnftables.so.1 itself is missing
                raise BackendUnavailable(f"{INSTALL_HINT} ({e})") from None
            ctx.set_json_output(True)
            self._ctx = ctx
        return self._ctx

    def close(self) -> None:
        self._ctx = None  # the binding frees its context when the object goes

    # ---- talking to libnftables --------------------------------------------------------------
    def _cmd(self, text: str) -> tuple[int, str, str]:
        rc, out, err = self.nft.cmd(text)
        return rc, out or "", (err or "").strip()

    def run(self, script: str) -> None:
        """One transaction; retried a few times when the kernel's generation moved under it."""
        err = ""
        for attempt in range(ATTEMPTS):
            rc, _, err = self._cmd(script)
            if rc == 0:
                return
            if not any(t in err for t in ("Resource temporarily unavailable", "Interrupted system call")):
                break
            time.sleep(0.02 * (attempt + 1))
        log.debug("refused transaction:\n%s", script)
        raise NftError(f"nft transaction refused (nothing applied): {err}")

    def read(self) -> KernelNft:
        rc, out, err = self._cmd(f"list table {WHERE}")
        if rc != 0:
            if "No such file or directory" in err:
                return KernelNft()
            raise NftError(f"list table {WHERE}: {err}")
        try:
            return parse_table(json.loads(out))
        except ValueError as e:
            raise NftError(f"list table {WHERE}: unreadable JSON ({e})") from None

    # ---- the interface -----------------------------------------------------------------------
    def sync(self, intent: FirewallIntent, *, dry_run: bool = False) -> FirewallSync:
        tx = nft_transaction(nft_table(intent), self.read())
        if tx.script.lines and not dry_run:
            self.run(tx.script.text)
        return FirewallSync(tx.changes, tx.dnat_changed)

    def drift_lines(self, intent: FirewallIntent) -> list[str]:
        return drift_lines(nft_table(intent), self.read())

    def counters(self, intent: FirewallIntent) -> Counters:
        services = {name: counter_name(name) for name in _counted_services(intent)}
        paths = {path: {what: path_counter_name(path, what) for what in PATH_COUNTS}
                 for path in _counted_paths(intent)}
        policy = _policy_services(intent)
        found = self._named_counters() if services or paths or policy else {}
        names = {"dropped": dropped_counter, "limited": limited_counter}
        return Counters(
            {svc: found.get(counter) for svc, counter in services.items()},
            {path: {what: found.get(name) for what, name in kinds.items()} for path, kinds in paths.items()},
            {svc: {kind: found.get(names[kind](svc)) for kind in kinds} for svc, kinds in policy.items()})

    def _named_counters(self) -> dict[str, tuple[int, int]]:
        """Every named counter of our table: name -> (packets, bytes); empty when unreadable."""
        rc, out, _ = self._cmd(f"list counters table {WHERE}")
        found: dict[str, tuple[int, int]] = {}
        if rc == 0:
            with contextlib.suppress(ValueError):
                for item in json.loads(out).get("nftables", []):
                    c = item.get("counter") if isinstance(item, dict) else None
                    if isinstance(c, dict) and c.get("table") == TABLE_NAME:
                        found[str(c.get("name"))] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        return found

    def holds_state(self) -> bool:
        return self.read().exists


def _policy_services(intent: FirewallIntent) -> dict[str, list[str]]:
    """service -> which of its policy counters exist: "dropped" (allow_from, at the gateway and
    the VPN client) and "limited" (rate_limit, at the gateway)."""
    kinds: dict[str, dict[str, None]] = {}
    exposed = [*(e for gw in intent.gateways for e in gw.exposed),
               *(e for a in intent.admissions for e in a.exposed)]
    for e in exposed:
        if e.restricted:
            kinds.setdefault(e.name, {})["dropped"] = None
        if e.rate_limit is not None:
            kinds.setdefault(e.name, {})["limited"] = None
    return {name: list(k) for name, k in kinds.items()}


def _counted_services(intent: FirewallIntent) -> list[str]:
    names: dict[str, None] = {}
    for gw in intent.gateways:
        names.update((e.name, None) for e in gw.exposed if e.tagged)
    for a in intent.admissions:
        names.update((e.name, None) for e in a.exposed)
    return list(names)


def _counted_paths(intent: FirewallIntent) -> list[str]:
    names: dict[str, None] = {}
    for tag in (*intent.tunnel_tags, *intent.reply_tags):
        if tag.path:
            names[tag.path] = None
    return list(names)
