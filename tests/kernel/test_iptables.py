"""The iptables adapter against the real (legacy) tables, each test in its own namespace.

What a user would check with iptables-legacy-save: every rule kind the compiler emits lands as
written and a second sync changes nothing (counters included); half-built or tampered state is
put right in one sync without duplicates; rules and chains of other tools stay byte for byte,
also while another tool keeps writing; `remove_all` leaves the table as it was found.
Adapter code runs only in a forked child inside the namespace (Netns.call).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from nslab import Netns, wait_for

from tagrouted.core.state import BUILTIN_CHAINS, Change, FirewallRule, KernelTable, Match, OwnedChain
from tagrouted.kernel.firewall import iptables_legacy as iptables

pytestmark = pytest.mark.kernel

SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
IPT = {4: "iptables-legacy", 6: "ip6tables-legacy"}
TABLES = ("mangle", "nat", "filter")


def rule(*, i: str | None = None, o: str | None = None, p: str | None = None, d: str | None = None,
         m: tuple[Match, ...] = (), j: str = "ACCEPT", **opts: str) -> FirewallRule:
    return FirewallRule(in_interface=i, out_interface=o, protocol=p, destination=d, matches=m,
                        target=j, target_options=tuple((k.replace("_", "-"), v) for k, v in opts.items()))


DSCP42 = Match("dscp", (("dscp", "0x2a"),))
ESTABLISHED = rule(m=(Match("conntrack", (("ctstate", "RELATED,ESTABLISHED"),)),))
RESTORE = rule(m=(Match("connmark", (("mark", "0x2a"),)),), j="CONNMARK",
               restore_mark="", nfmask="0xffffffff", ctmask="0xffffffff")


def tcp(port: str) -> Match:
    return Match("tcp", (("dport", port),))


def udp(port: str) -> Match:
    return Match("udp", (("dport", port),))


# Every kind of rule the compiler emits, in the chains it puts them in.
KINDS: dict[int, dict[str, tuple[OwnedChain, ...]]] = {
    4: {
        "mangle": (
            OwnedChain(4, "mangle", "PREROUTING", (
                rule(i="tun0", j="DSCP", set_dscp="0x2a"),
                rule(i="eth0", m=(DSCP42,), j="MARK", set_xmark="0x2a/0xffffffff"))),
            OwnedChain(4, "mangle", "INPUT", (
                rule(m=(DSCP42,), j="CONNMARK", set_xmark="0x2a/0xffffffff"),)),
            OwnedChain(4, "mangle", "OUTPUT", (
                RESTORE, rule(m=(Match("mark", (("mark", "0x2a"),)),), j="DSCP", set_dscp="0x2a"))),
            OwnedChain(4, "mangle", "POSTROUTING", (rule(o="tun0", j="DSCP", set_dscp="0x00"),)),
        ),
        "nat": (
            OwnedChain(4, "nat", "PREROUTING", (
                rule(d="192.0.2.200/32", i="eth0", p="tcp", m=(tcp("443"),), j="DNAT",
                     to_destination="192.168.100.3"),
                rule(d="192.0.2.200/32", i="eth0", p="udp", m=(udp("27015:27020"),), j="DNAT",
                     to_destination="192.168.100.4"),
                rule(d="192.0.2.200/32", i="eth0", p="tcp", m=(tcp("8443"),), j="DNAT",
                     to_destination="192.168.100.3:443"))),
        ),
        "filter": (
            OwnedChain(4, "filter", "FORWARD", (
                ESTABLISHED,
                rule(d="192.168.100.3/32", i="eth0", p="tcp", m=(tcp("443"),)),
                rule(d="192.168.100.3/32", i="tun0", o="eth0", p="udp", m=(udp("7000"),)),
                rule(d="192.168.100.0/24", i="eth0", j="DROP"),
                rule(i="tun0", o="eth0", j="DROP"),
                rule(i="tun0", o="eth0"))),
        ),
    },
    6: {
        "mangle": (
            OwnedChain(6, "mangle", "PREROUTING", (
                rule(i="tun0", j="DSCP", set_dscp="0x2a"),
                rule(i="eth0", m=(DSCP42,), j="MARK", set_xmark="0x2a/0xffffffff"))),
            OwnedChain(6, "mangle", "INPUT", (
                rule(m=(DSCP42,), j="CONNMARK", set_xmark="0x2a/0xffffffff"),)),
            OwnedChain(6, "mangle", "OUTPUT", (RESTORE,)),
            OwnedChain(6, "mangle", "POSTROUTING", (rule(o="tun0", j="DSCP", set_dscp="0x00"),)),
        ),
        "nat": (
            OwnedChain(6, "nat", "PREROUTING", (
                rule(d="2001:db8:a::200/128", i="eth0", p="tcp", m=(tcp("443"),), j="DNAT",
                     to_destination="[fd00:100::3]:443"),
                rule(d="2001:db8:a::200/128", i="eth0", p="tcp", m=(tcp("80"),), j="DNAT",
                     to_destination="fd00:100::3"))),
        ),
        "filter": (
            OwnedChain(6, "filter", "FORWARD", (
                ESTABLISHED,
                rule(d="fd00:100::3/128", i="eth0", p="tcp", m=(tcp("443"),)),
                rule(d="fd00:100::3/128", i="tun0", o="eth0", p="udp", m=(udp("7000"),)),
                rule(d="fd00:100::/64", i="eth0", j="DROP"),
                rule(i="tun0", o="eth0", j="DROP"))),
        ),
    },
}


# ---- helpers: what a user sees ------------------------------------------------------------------

def save(ns: Netns, family: int, table: str, counters: bool = False) -> list[str]:
    """iptables-legacy-save of one table, without its dated comment lines."""
    out = ns.out([SAVE[family], "-t", table, *(["-c"] if counters else [])])
    return [line for line in out.splitlines() if not line.startswith("#")]


def save_all(ns: Netns, counters: bool = False) -> dict[tuple[int, str], list[str]]:
    return {(f, t): save(ns, f, t, counters) for f in (4, 6) for t in TABLES}


def ours(lines: list[str]) -> list[str]:
    return [line for line in lines if "TAGROUTED-" in line]


def foreign(lines: list[str]) -> list[str]:
    return [line for line in lines if "TAGROUTED-" not in line]


def expected_lines(chains: tuple[OwnedChain, ...]) -> list[str]:
    """Our part of iptables-save, in the order iptables-save prints it."""
    lines = [f":{c.name} - [0:0]" for c in sorted(chains, key=lambda c: c.name)]
    lines += [f"-A {c.builtin} -m comment --comment tagrouted -j {c.name}"
              for c in sorted(chains, key=lambda c: BUILTIN_CHAINS[c.table].index(c.builtin))]
    for c in sorted(chains, key=lambda c: c.name):
        lines += [f"-A {c.name} {r.save_args()}" for r in c.rules]
    return lines


def ipt(ns: Netns, family: int, args: str) -> None:
    ns.run(f"{IPT[family]} -w 10 {args}")


def add_rules(ns: Netns, family: int, table: str, chain: str, rules: tuple[FirewallRule, ...]) -> None:
    for r in rules:
        ipt(ns, family, f"-t {table} -A {chain} {r.save_args()}")


def sync_all(state: dict[int, dict[str, tuple[OwnedChain, ...]]]) -> list[Change]:
    """In the namespace: sync every table of every family; return all changes."""
    changes: list[Change] = []
    for family in (4, 6):
        for table in TABLES:
            changes += iptables.sync_table(family, table, state.get(family, {}).get(table, ()))  # type: ignore[arg-type]
    return changes


def send_udp(n: int) -> None:
    """In the namespace: traffic through OUTPUT/INPUT of both families, so counters move."""
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            for _ in range(n):
                s.sendto(b"x", (addr, 9))


@pytest.fixture
def host(netns: type[Netns]) -> Netns:
    return netns("ipt")  # type: ignore[call-arg]


# ---- round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [(4, 6), (6, 4)], ids=["IPv4 first", "IPv6 first"])
def test_every_rule_kind_is_its_own_canonical_form(host: Netns, order: tuple[int, int]) -> None:
    """The compiler's rules read back from the extensions exactly as it writes them, whichever
    family a process meets first (libxtables 1.8.9 registers targets per family)."""
    def canon() -> dict[int, list[tuple[FirewallRule, FirewallRule]]]:
        return {f: [(r, iptables.canonical(r, f)) for t in TABLES for c in KINDS[f][t] for r in c.rules]
                for f in order}

    for family, pairs in host.call(canon).items():
        for r, c in pairs:
            assert c == r, f"IPv{family}: {r.save_args()} reads back as {c.save_args()}"


def test_every_rule_kind_round_trips(host: Netns) -> None:
    before = save_all(host)
    changes = host.call(sync_all, KINDS)
    n_chains = sum(len(KINDS[f][t]) for f in (4, 6) for t in TABLES)
    assert sorted(c.object for c in changes) == ["chain"] * n_chains + ["jump"] * n_chains
    assert all(c.action == "added" for c in changes)
    for family in (4, 6):
        for table in TABLES:
            lines = save(host, family, table)
            assert ours(lines) == expected_lines(KINDS[family][table]), (family, table)
            assert foreign(lines) == foreign(before[(family, table)])

    host.call(send_udp, 5)
    with_counters = save_all(host, counters=True)
    assert any(re.match(r"\[[1-9]\d*:\d+\] -A OUTPUT .*TAGROUTED-OUTPUT", line)
               for line in with_counters[(4, "mangle")]), "traffic should have moved a counter"
    assert host.call(sync_all, KINDS) == []
    assert save_all(host, counters=True) == with_counters  # nothing written: counters survive


def test_read_table_reports_canonical_chains_and_first_jumps(host: Netns) -> None:
    def sync_then_read() -> list[KernelTable]:
        sync_all(KINDS)
        return [iptables.read_table(f, t) for f in (4, 6) for t in TABLES]  # type: ignore[arg-type]

    for kt in host.call(sync_then_read):
        desired = KINDS[kt.family][kt.table]
        assert kt.chains == {c.name: c.rules for c in desired}
        assert kt.jumps == {c.builtin: (0,) for c in desired}


def test_dry_run_writes_nothing(host: Netns) -> None:
    before = save_all(host)

    def dry() -> list[Change]:
        return [c for f in (4, 6) for t in TABLES
                for c in iptables.sync_table(f, t, KINDS[f][t], dry_run=True)]  # type: ignore[arg-type]

    assert len(host.call(dry)) == 2 * sum(len(KINDS[f][t]) for f in (4, 6) for t in TABLES)
    assert save_all(host) == before


# ---- adoption and repair ------------------------------------------------------------------------

def test_adopts_partial_state_in_one_sync(host: Netns) -> None:
    """A crash left half a chain, a duplicate jump and a jump behind another tool's rule."""
    fwd = KINDS[4]["filter"][0]
    ipt(host, 4, "-N TAGROUTED-FORWARD")
    add_rules(host, 4, "filter", "TAGROUTED-FORWARD", fwd.rules[:3])
    ipt(host, 4, "-A FORWARD -s 10.9.0.1/32 -j ACCEPT")
    ipt(host, 4, "-A FORWARD -m comment --comment tagrouted -j TAGROUTED-FORWARD")
    ipt(host, 4, "-A FORWARD -m comment --comment tagrouted -j TAGROUTED-FORWARD")
    dnat = KINDS[4]["nat"][0]
    ipt(host, 4, "-t nat -N TAGROUTED-PREROUTING")
    add_rules(host, 4, "nat", "TAGROUTED-PREROUTING", dnat.rules + dnat.rules[:1])  # one twice
    ipt(host, 4, "-t nat -A PREROUTING -s 10.9.0.2/32 -j RETURN")
    ipt(host, 4, "-t nat -A PREROUTING -m comment --comment tagrouted -j TAGROUTED-PREROUTING")
    ipt(host, 6, "-N TAGROUTED-FORWARD")  # an empty leftover in IPv6
    ipt(host, 6, "-I FORWARD -m comment --comment tagrouted -j TAGROUTED-FORWARD")

    changes = host.call(sync_all, KINDS)
    assert changes, "partial state must be repaired"
    for family in (4, 6):
        for table in TABLES:
            assert ours(save(host, family, table)) == expected_lines(KINDS[family][table]), (family, table)
    assert foreign(save(host, 4, "filter"))[4:] == ["-A FORWARD -s 10.9.0.1/32 -j ACCEPT", "COMMIT"]
    assert "-A PREROUTING -s 10.9.0.2/32 -j RETURN" in save(host, 4, "nat")
    assert host.call(sync_all, KINDS) == []


TAMPERS = {
    "chain flushed": (4, "mangle", ["-t mangle -F TAGROUTED-PREROUTING"]),
    "jump deleted": (4, "mangle", ["-t mangle -D PREROUTING -m comment --comment tagrouted "
                                   "-j TAGROUTED-PREROUTING"]),
    "rule deleted": (4, "filter", ["-D TAGROUTED-FORWARD 2"]),
    "foreign rule inside our chain": (4, "filter", ["-I TAGROUTED-FORWARD 2 -s 10.9.9.9/32 -j ACCEPT"]),
    "rule changed in place": (4, "nat", ["-t nat -R TAGROUTED-PREROUTING 1 -d 192.0.2.200/32 -i eth0 "
                                         "-p tcp -m tcp --dport 443 -j DNAT --to-destination 192.168.100.9"]),
    "jump moved behind another rule": (4, "filter", ["-I FORWARD -s 10.9.9.8/32 -j ACCEPT"]),
    "jump without our comment": (4, "filter", ["-R FORWARD 1 -i eth0 -j TAGROUTED-FORWARD"]),
    "whole table flushed and chains deleted": (4, "filter", ["-F", "-X"]),
    "IPv6 chain flushed": (6, "nat", ["-t nat -F TAGROUTED-PREROUTING"]),
    "IPv6 jump deleted": (6, "filter", ["-D FORWARD 1"]),
    "IPv6 whole table flushed and chains deleted": (6, "mangle", ["-t mangle -F", "-t mangle -X"]),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_repairs_tampering(host: Netns, tamper: str) -> None:
    family, table, commands = TAMPERS[tamper]
    host.call(sync_all, KINDS)
    good = save(host, family, table)
    for cmd in commands:
        ipt(host, family, cmd)
    tampered = save(host, family, table)
    assert tampered != good
    changes = host.call(iptables.sync_table, family, table, KINDS[family][table])
    assert changes, f"{tamper}: drift must be reported"
    expected = list(good)
    if tamper.startswith("jump moved"):  # the other tool's rule stays, behind our jump
        jump = expected.index("-A FORWARD -m comment --comment tagrouted -j TAGROUTED-FORWARD")
        expected.insert(jump + 1, "-A FORWARD -s 10.9.9.8/32 -j ACCEPT")
    assert save(host, family, table) == expected
    assert host.call(iptables.sync_table, family, table, KINDS[family][table]) == []


@pytest.mark.parametrize("family", [4, 6])
def test_rules_it_cannot_represent_are_read_and_rewritten(host: Netns, family: int) -> None:
    """A goto, a fragment flag, inverted fields, an extension we never write: read as some rule
    that equals nothing desired, shown in read_table, and replaced by the desired chain."""
    host.call(sync_all, KINDS)
    good = save(host, family, "filter")
    ipt(host, family, "-N OTHER")
    weird = "-f ! -s 10.9.9.9/32 -g OTHER" if family == 4 else "! -i eth1 ! -s fd09::9/128 -g OTHER"
    ipt(host, family, f"-I TAGROUTED-FORWARD 2 {weird}")
    ipt(host, family, "-I TAGROUTED-FORWARD 3 -m limit --limit 5/sec -m tcpmss --mss 1:500 -p tcp -j LOG")
    seen = host.call(iptables.read_table, family, "filter")
    rules = seen.chains["TAGROUTED-FORWARD"]
    desired = KINDS[family]["filter"][0].rules
    assert len(rules) == len(desired) + 2 and rules[1] not in desired and rules[2] not in desired
    assert rules[2].target == "LOG" and [m.name for m in rules[2].matches] == ["limit", "tcpmss"]
    changes = host.call(iptables.sync_table, family, "filter", KINDS[family]["filter"])
    assert [c.action for c in changes] == ["replaced"]
    after = save(host, family, "filter")
    assert ours(after) == ours(good) and ":OTHER - [0:0]" in after


def test_chain_dropped_from_desired_goes_with_its_jump(host: Netns) -> None:
    host.call(sync_all, KINDS)
    fewer = {**KINDS, 4: {**KINDS[4], "mangle": KINDS[4]["mangle"][:1]}}
    changes = host.call(sync_all, fewer)
    assert sorted((c.action, c.object) for c in changes) == [("removed", "chain")] * 3 + [("removed", "jump")] * 3
    assert ours(save(host, 4, "mangle")) == expected_lines(KINDS[4]["mangle"][:1])
    assert host.call(sync_all, fewer) == []


# ---- other tools' state -------------------------------------------------------------------------

def build_foreign(ns: Netns) -> None:
    """Other tools' chains and rules, in built-ins before and after where our jump goes."""
    for family, src in ((4, "10.8.0.0/16"), (6, "fd08::/32")):
        ipt(ns, family, "-N MYCHAIN")
        ipt(ns, family, f"-A MYCHAIN -s {src} -m comment --comment \"someone else's\" -j ACCEPT")
        ipt(ns, family, "-A MYCHAIN -p tcp -m tcp --dport 22 -j DROP")
        ipt(ns, family, "-A FORWARD -j MYCHAIN")
        ipt(ns, family, f"-A FORWARD -d {src} -j DROP")
        ipt(ns, family, "-t mangle -A PREROUTING -p udp -m udp --dport 53 -j DSCP --set-dscp 0x08")
        ipt(ns, family, "-t nat -N DOCKERISH")
        ipt(ns, family, "-t nat -A PREROUTING -j DOCKERISH")
        ipt(ns, family, "-t nat -A OUTPUT -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 80")
        ipt(ns, family, "-A OUTPUT -p udp -m udp --dport 9 -m comment --comment counted -j ACCEPT")
        ipt(ns, family, "-P FORWARD DROP")


def without_policy_counters(lines: list[str]) -> list[str]:
    """Any libiptc commit zeroes the built-in chains' policy counters (iptables-legacy's own
    commits do too); rule counters are carried over."""
    return [re.sub(r" \[\d+:\d+\]$", "", line) if line.startswith(":") else line for line in lines]


def test_foreign_chains_and_rules_stay_byte_identical(host: Netns) -> None:
    build_foreign(host)
    host.call(send_udp, 3)
    before = save_all(host, counters=True)
    assert any(re.match(r"\[[1-9]\d*:\d+\] -A OUTPUT -p udp", line) for line in before[(4, "filter")])
    host.call(sync_all, KINDS)
    # another tool inserts in front of our jump; the next sync puts ours first again
    ipt(host, 4, "-I FORWARD -s 10.7.0.1/32 -j ACCEPT")
    ipt(host, 6, "-I FORWARD -s fd07::1/128 -j ACCEPT")
    host.call(sync_all, KINDS)
    after = save_all(host, counters=True)
    for key in before:
        kept = foreign(after[key])
        if key[1] == "filter":
            addr = "10.7.0.1/32" if key[0] == 4 else "fd07::1/128"
            kept.remove(f"[0:0] -A FORWARD -s {addr} -j ACCEPT")
        # byte for byte, counters of others' rules included
        assert without_policy_counters(kept) == without_policy_counters(foreign(before[key])), key
        assert ours(after[key]) == [re.sub(r"^-A", "[0:0] -A", line) if line.startswith("-A") else line
                                    for line in expected_lines(KINDS[key[0]][key[1]])]


def test_remove_all_leaves_the_table_as_found(host: Netns) -> None:
    build_foreign(host)
    before = save_all(host)

    def sync_then_remove() -> list[Change]:
        sync_all(KINDS)
        return [c for f in (4, 6) for t in TABLES for c in iptables.remove_all(f, t)]  # type: ignore[arg-type]

    removed = host.call(sync_then_remove)
    n_chains = sum(len(KINDS[f][t]) for f in (4, 6) for t in TABLES)
    assert sorted(c.object for c in removed) == ["chain"] * n_chains + ["jump"] * n_chains
    assert save_all(host) == before
    assert host.call(lambda: [c for f in (4, 6) for t in TABLES for c in iptables.remove_all(f, t)]) == []


LOOP = r"""
set -e
i=0
while [ -e "$MARK" ] || [ "$i" -lt 30 ]; do
  i=$((i+1))
  iptables-legacy -w 20 -A FORWARD -s 10.77.$((i/250)).$((i%250+1))/32 -j ACCEPT
  ip6tables-legacy -w 20 -A FORWARD -s fd77::$i/128 -j ACCEPT
  if [ $((i%3)) -eq 0 ]; then
    j=$((i-1))
    iptables-legacy -w 20 -D FORWARD -s 10.77.$((j/250)).$((j%250+1))/32 -j ACCEPT
    ip6tables-legacy -w 20 -D FORWARD -s fd77::$j/128 -j ACCEPT
  fi
done
echo "$i" > "$OUT"
"""


def test_concurrent_iptables_writers_are_never_lost(host: Netns, tmp_path: Path) -> None:
    """Another tool appends and deletes rules (iptables -w) while we sync 200 times."""
    mark, out = tmp_path / "running", tmp_path / "count"
    mark.touch()
    states = {
        "a": {f: {"filter": KINDS[f]["filter"]} for f in (4, 6)},
        "b": {f: {"filter": (OwnedChain(f, "filter", "FORWARD", KINDS[f]["filter"][0].rules[:2]),)}
              for f in (4, 6)},
    }
    proc = host.popen(["sh", "-c", LOOP], env={**os.environ, "MARK": str(mark), "OUT": str(out)},
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: "10.77.0.2/32" in " ".join(save(host, 4, "filter")), what="the loop to start")

    def many() -> int:
        written = 0
        for n in range(200):
            family = 4 if n % 2 == 0 else 6
            state = states["a" if (n // 2) % 2 == 0 else "b"]
            written += bool(iptables.sync_table(family, "filter", state[family]["filter"]))  # type: ignore[arg-type]
        return written

    written = host.call(many, timeout=300)
    mark.unlink()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"another tool's iptables command failed: {err.decode()}"
    assert written == 200, "alternating states: every sync writes"
    last = int(out.read_text())
    kept = [i for i in range(1, last + 1) if not (i % 3 == 2 and i + 1 <= last)]
    for family, fmt in ((4, lambda i: f"10.77.{i // 250}.{i % 250 + 1}/32"), (6, lambda i: f"fd77::{i}/128")):
        lines = save(host, family, "filter")
        loop_rules = [line for line in lines if line.startswith("-A FORWARD -s ")]
        assert loop_rules == [f"-A FORWARD -s {fmt(i)} -j ACCEPT" for i in kept], f"IPv{family}"
        assert ours(lines) == expected_lines(states["b"][family]["filter"])  # the 200th was "b"
    assert host.call(sync_all, states["b"]) == []


def test_commit_racing_an_unlocked_writer_is_redone_on_a_fresh_read(host: Netns) -> None:
    """python-iptables users commit without the xtables lock. When one commits between our read
    and our commit, ours fails with EAGAIN; the whole read-compare-commit is done again, so
    their rule is kept, not overwritten."""
    def race_once() -> tuple[list[Change], int]:
        import iptc  # the other tool: python-iptables with autocommit, no xtables lock

        retried: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = retried.append  # type: ignore[method-assign]
        logging.getLogger("tagrouted.iptables").addHandler(handler)
        logging.getLogger("tagrouted.iptables").setLevel(logging.DEBUG)
        real_commit = iptables._Handle.commit
        raced = []

        def commit(self: iptables._Handle) -> None:
            if not raced:
                raced.append(True)
                other = iptc.Rule()
                other.src = "10.66.0.1"
                other.create_target("ACCEPT")
                iptc.Chain(iptc.Table(iptc.Table.FILTER), "FORWARD").append_rule(other)
            real_commit(self)

        iptables._Handle.commit = commit  # type: ignore[method-assign]
        changes = iptables.sync_table(4, "filter", KINDS[4]["filter"])
        return changes, len(retried)

    ipt(host, 4, "-A FORWARD -s 10.66.0.2/32 -j ACCEPT")
    changes, retried = host.call(race_once)
    assert changes and retried == 1
    lines = save(host, 4, "filter")
    assert ours(lines) == expected_lines(KINDS[4]["filter"])
    assert foreign(lines)[4:] == ["-A FORWARD -s 10.66.0.2/32 -j ACCEPT",
                                  "-A FORWARD -s 10.66.0.1/32 -j ACCEPT", "COMMIT"]


def test_lock_held_by_another_program_gives_transient(host: Netns) -> None:
    """The sync waits for /run/xtables.lock a bounded time, then says: try again later."""
    fd = os.open(iptables.LOCK_PATH, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)

        def blocked() -> str:
            iptables.LOCK_WAIT = 0.3
            t0 = time.monotonic()
            try:
                iptables.sync_table(4, "filter", KINDS[4]["filter"])
            except iptables.IptablesTransient as e:
                return f"transient after {time.monotonic() - t0:.1f}s: {e}"
            return "synced"

        result = host.call(blocked)
    finally:
        os.close(fd)
    assert result.startswith("transient"), result
    assert ours(save(host, 4, "filter")) == []


def test_reads_and_removals_do_not_instantiate_tables(host: Netns) -> None:
    """Opening a legacy table makes the kernel create it in the namespace and hook it into
    every packet's path; nothing of ours can be in one that does not exist."""
    def look() -> list[object]:
        return [*(iptables.read_table(f, t) for f in (4, 6) for t in TABLES),  # type: ignore[arg-type]
                *(iptables.remove_all(f, t) for f in (4, 6) for t in TABLES)]  # type: ignore[arg-type]

    results = host.call(look)
    assert all(r == [] or (isinstance(r, KernelTable) and not r.chains and not r.jumps) for r in results)
    for names in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        assert host.run(["cat", names], check=False).stdout == ""


def test_iptables_command_is_nft_returns_a_bool(host: Netns) -> None:
    assert isinstance(host.call(iptables.iptables_command_is_nft), bool)
