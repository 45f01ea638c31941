"""Shared pieces of the reliability matrix: namespaces per module, kernel snapshots, records.

(A module of its own, not conftest.py: tests/e2e and others have a conftest too, and
`from conftest import ...` would find whichever was imported first.)

Each test module builds its own namespaces (nslab prefix, removed at module end, also on
failure) and runs the real `tagrouted` in them through daemon_harness.DaemonProc. What the
tests compare is what a user would look at: the nft ruleset and iptables-legacy-save /
ip6tables-legacy-save without counters, `ip rule`, `ip route show table all`, and the sysctls
tagrouted keeps.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path

from daemon_harness import TAGROUTECTL, DaemonProc, Record
from firewall_view import canonical_nft
from nslab import Netns

SYSCTLS = (
    "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.tun0.rp_filter", "net.ipv6.conf.eth0.accept_ra", "net.ipv6.conf.eth1.accept_ra",
    "net.ipv6.conf.tun0.accept_ra",
)
_COUNTERS = re.compile(r"\[\d+:\d+\]")

# One shell run per snapshot: a poll must be cheap (the matrix polls it many times).
_SNAPSHOT_SCRIPT = """
for t in mangle nat filter; do echo "## ipt4 $t"; iptables-legacy-save -t $t; done
for t in mangle nat filter; do echo "## ipt6 $t"; ip6tables-legacy-save -t $t; done
echo "## rules4"; ip -4 rule show
echo "## rules6"; ip -6 rule show
echo "## routes4"; ip -4 route show table all
echo "## routes6"; ip -6 route show table all
echo "## sysctls"; for k in {keys}; do printf '%s=' $k; sysctl -n $k 2>/dev/null || echo absent; done
echo "## nft"; nft -j list ruleset
"""


def snapshot(ns: Netns) -> dict[str, str]:
    """Everything tagrouted owns and everything next to it, as a user reads it; no counters."""
    script = _SNAPSHOT_SCRIPT.replace("{keys}", " ".join(SYSCTLS))
    out = ns.run(["sh", "-c", script]).stdout
    sections: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("## "):
            current = line[3:]
            sections[current] = []
        elif not line.startswith("#"):
            sections[current].append(_COUNTERS.sub("[0:0]", line))
    snap = {k: "\n".join(v) for k, v in sections.items()}
    snap["nft"] = canonical_nft(snap.get("nft", ""))
    return snap


def differences(want: dict[str, str], have: dict[str, str]) -> str:
    """A readable account of what differs between two snapshots ("" when equal)."""
    import difflib

    parts = []
    for key in sorted(set(want) | set(have)):
        a, b = want.get(key, "").splitlines(), have.get(key, "").splitlines()
        if a != b:
            parts.append(f"[{key}]\n" + "\n".join(difflib.unified_diff(a, b, "want", "have", lineterm="", n=1)))
    return "\n".join(parts)


def tracebacks(d: DaemonProc) -> list[str]:
    """Exceptions the daemon wrote (records with a traceback, critical records, and stderr
    lines that are not JSON records): a robustness test wants none."""
    bad = [r.get("MESSAGE", "") for r in d.all_records() if int(r.get("PRIORITY", 6)) <= 2
           or "Traceback" in r.get("MESSAGE", "")]
    bad += [line for line in d.other_lines if line.strip()]
    return bad


# A pass that raced the link going down: the kernel refuses `dev tun0` (ENETDOWN) or the link
# is gone (ENODEV); the daemon logs it and passes again. Expected only while links flap.
LINK_RACE = ("its link is down", "ENETDOWN", "ENODEV", "no such device", "is not present")


def error_records(d: DaemonProc, allow: tuple[str, ...] = ()) -> list[str]:
    """Error records, except those naming one of `allow`."""
    return [r.get("MESSAGE", "") for r in d.all_records() if int(r.get("PRIORITY", 6)) <= 3
            and not any(a in r.get("MESSAGE", "") for a in allow)]


def records_since(d: DaemonProc, n: int) -> list[Record]:
    return d.all_records()[n:]


def ctl(ns: Netns, config: Path | str, run_dir: Path | str, *args: str,
        timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return ns.run([TAGROUTECTL, "--config", str(config), "--run-dir", str(run_dir), *args],
                  check=False, timeout=timeout)


class Namespaces:
    """Namespaces made for one module; all removed at its end, pass or fail."""

    def __init__(self) -> None:
        self.made: list[Netns] = []

    def __call__(self, name: str) -> Netns:
        ns = Netns(name)
        self.made.append(ns)
        return ns

    def remove(self) -> None:
        for ns in reversed(self.made):
            with contextlib.suppress(Exception):
                ns.delete()
