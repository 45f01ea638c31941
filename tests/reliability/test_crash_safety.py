"""Crash safety: SIGKILL at random points while the daemon applies a large change, then restart,
on both firewall backends.

A gateway switches between two configs of 1000 services each (A: ports 10000+, home network
10.100.0.0/16; B: ports 20000+, home network 10.101.0.0/16), so each pass rewrites ~2000 rules
(iptables-legacy) or ~3000 set and map elements (nftables) and swaps the home route. Each round:
start with X over the kernel state left by Y and SIGKILL it at a random moment of its start;
restart, and check; then write Y, SIGHUP, and SIGKILL the moment the firewall holds Y's DNAT
(legacy: the nat table, with the filter table still X's: a half-applied host; nftables: one
transaction, so all of it); restart, and check. A check is what a user would verify:
`tagroutectl diff` is clean (converged), every chain holds exactly the planned rules in the
planned order (legacy: each built-in chain one jump; nftables: each rule and element of ours
once, none of the other config), only the planned route with our protocol (no leftovers of the
other config). At the end `tagroutectl down` leaves nothing of
ours and puts ip_forward back to the value found before the first start, although the daemon
that recorded that value was killed many times.

TAGROUTED_CRASH_ROUNDS overrides the number of rounds (2: four kills).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from daemon_harness import DaemonProc
from firewall_view import holds_nothing, with_backend
from nslab import Netns, veth, wait_for
from reliability_support import ctl, tracebacks

pytestmark = pytest.mark.kernel

ROUNDS = int(os.environ.get("TAGROUTED_CRASH_ROUNDS", "2"))
SERVICES = 1000


def gateway_config(second: int, port_base: int) -> str:
    lines = ["roles: [gateway]", "services:"]
    lines += [f"  - {{name: s{i}, proto: tcp, port: {port_base + i}, "
              f"address: 10.{second}.{i // 250}.{i % 250 + 1}}}" for i in range(SERVICES)]
    lines += ["gateway:", "  public_interface: eth0", "  public_addresses: [192.0.2.200]",
              f"  home_networks: [10.{second}.0.0/16]", "  via: [192.168.200.2]"]
    return "\n".join(lines) + "\n"


CONFIGS = {"A": gateway_config(100, 10000), "B": gateway_config(101, 20000)}
PORTS = {"A": "1", "B": "2"}  # the first digit of each config's public ports


def chains_of(save_text: str) -> dict[str, list[str]]:
    """iptables-save text -> {table/chain: its -A lines in order} (chain declarations too)."""
    out: dict[str, list[str]] = defaultdict(list)
    table = ""
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":TAGROUTED-"):
            out[f"{table} chains"].append(line.split()[0])
        elif line.startswith("-A "):
            out[f"{table}/{line.split()[1]}"].append(line)
    return {k: sorted(v) if k.endswith(" chains") else v for k, v in out.items()}


def planned(ns: Netns, config: Path, run_dir: Path) -> tuple[dict[str, list[str]], set[str]]:
    res = ctl(ns, config, run_dir, "plan")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    ipt4 = text.split("# iptables-legacy-save", 1)[1].split("# ip6tables-legacy-save", 1)[0]
    routes = {m.group(1) for m in re.finditer(r"^ip -4 route add (\S+) .*proto 142", text, re.M)}
    return chains_of(ipt4), routes


def nft_table(ns: Netns) -> list[dict[str, object]]:
    res = ns.run(["nft", "-j", "list", "table", "inet", "tagrouted"], check=False)
    return json.loads(res.stdout)["nftables"] if res.returncode == 0 else []


def nft_elements(items: list[dict[str, object]], name: str) -> list[object]:
    for item in items:
        for kind in ("set", "map"):
            body = item.get(kind)
            if isinstance(body, dict) and body.get("name") == name:
                return list(body.get("elem", []))  # type: ignore[call-overload]
    return []


def check_nft(ns: Netns, what: str, x: str) -> None:
    """Each rule and element of ours once, the DNAT map holding exactly X's services."""
    items = nft_table(ns)
    comments = Counter(i["rule"].get("comment") for i in items if "rule" in i)  # type: ignore[union-attr]
    assert all(n == 1 for n in comments.values()) and None not in comments, f"{what}: rules {comments}"
    dnat = json.dumps(nft_elements(items, "dnat4"))
    ports = re.findall(r'"tcp", (\d+)', dnat)
    assert len(ports) == SERVICES and all(p.startswith(PORTS[x]) for p in ports), \
        f"{what}: dnat4 holds {len(ports)} elements, {sum(not p.startswith(PORTS[x]) for p in ports)} not of {x}"
    assert len(nft_elements(items, "gw_allow4")) == SERVICES, f"{what}: gw_allow4"


def check(ns: Netns, config: Path, run_dir: Path, what: str, backend: str, x: str) -> None:
    res = ctl(ns, config, run_dir, "diff")
    assert res.returncode == 0, f"{what}: not converged:\n{res.stdout[:3000]}{res.stderr}"
    if backend == "nftables":
        check_nft(ns, what, x)
        assert "TAGROUTED" not in ns.out("iptables-legacy-save"), f"{what}: legacy leftovers"
        return
    want_chains, want_routes = planned(ns, config, run_dir)
    have_chains = chains_of(ns.out("iptables-legacy-save"))
    for key in sorted(set(want_chains) | set(have_chains)):
        want, have = want_chains.get(key, []), have_chains.get(key, [])
        if want != have:
            dups = len(have) - len(set(have))
            raise AssertionError(f"{what}: {key}: {len(have)} lines ({dups} duplicated), "
                                 f"{len(want)} planned; first differences: "
                                 f"{[x for x in have if x not in want][:3]} / {[x for x in want if x not in have][:3]}")
    have_routes = [line.split()[0] for line in
                   ns.out("ip -4 route show table all proto 142").splitlines() if line.strip()]
    assert sorted(have_routes) == sorted(want_routes), f"{what}: routes of ours {have_routes}"
    assert "TAGROUTED" not in ns.out("ip6tables-legacy-save"), f"{what}: IPv6 leftovers"
    assert ns.run("nft list table inet tagrouted", check=False).returncode != 0, f"{what}: nft leftovers"


def dnat_ports(ns: Netns, backend: str) -> list[str]:
    """The public ports the firewall DNATs right now."""
    if backend == "nftables":
        return re.findall(r'"tcp", (\d+)', json.dumps(nft_elements(nft_table(ns), "dnat4")))
    return re.findall(r"--dport (\d+) -j DNAT", ns.out("iptables-legacy-save -t nat"))


def applied(ns: Netns, backend: str) -> str:
    """How much of each config the kernel holds right now (to tell where a kill landed)."""
    ports = dnat_ports(ns, backend)
    a = sum(p.startswith("1") for p in ports)
    return f"the firewall holds {a} DNATs of A, {len(ports) - a} of B"


def start(ns: Netns, config: Path, run_dir: Path) -> DaemonProc:
    return DaemonProc(ns, config, run_dir, notify=True).start()


def kill_at_random(d: DaemonProc, rnd: random.Random, low: float, high: float) -> float:
    delay = rnd.uniform(low, high)
    time.sleep(delay)
    d.kill()
    d.close()
    return delay


def test_sigkill_during_large_applies(netns: type[Netns], tmp_path: Path, backend: str) -> None:
    ns = netns("crash")
    peer = netns("crash-peer")
    veth(ns, "eth0", peer, "eth0")
    ns.run("ip addr add 192.0.2.200/24 dev eth0")
    ns.run("ip addr add 192.168.200.1/24 dev eth0")
    ns.run("sysctl -qw net.ipv4.ip_forward=0")
    config = tmp_path / "tagrouted.yaml"
    run_dir = tmp_path / "run"
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    log: list[str] = [f"seed {seed}"]
    x, y = "A", "B"
    for round_ in range(ROUNDS):
        # 1. a first converge of X over Y's state (or an empty host), killed mid-way
        config.write_text(with_backend(CONFIGS[x], backend))
        d = start(ns, config, run_dir)
        d.wait_record(lambda r: r.get("MESSAGE", "").startswith("tagrouted starting"), timeout=30,
                      what="the daemon starting")
        t0 = time.monotonic()
        log.append(f"round {round_}: start {x}, killed after "
                   f"{kill_at_random(d, rnd, 0.0, 1.2):.3f}s; {len(d.changes())} changes logged; "
                   f"{applied(ns, backend)}")
        assert tracebacks(d) == [], log
        # 2. restart: converged to X, nothing twice, nothing of Y
        d = start(ns, config, run_dir)
        d.wait_ready(timeout=60)
        log.append(f"  restarted and ready at {time.monotonic() - t0:.1f}s")
        check(ns, config, run_dir, f"round {round_}: restart with {x}", backend, x)
        log.append(f"  checked at {time.monotonic() - t0:.1f}s")
        # 3. a reload to Y, killed mid-way: the moment the DNAT holds Y. Legacy: one libiptc
        # commit per table, so the filter table is still X's: a kill there leaves each table
        # whole but the host half. nftables: one transaction, so the whole table is Y's.
        config.write_text(with_backend(CONFIGS[y], backend))
        d.signal(signal.SIGHUP)
        t1 = time.monotonic()
        wait_for(lambda: any(p.startswith(PORTS[y]) for p in dnat_ports(ns, backend)),  # noqa: B023
                 timeout=60, interval=0.001, what=f"the DNAT to hold {y}")
        d.kill()
        d.close()
        log.append(f"round {round_}: reload {x}->{y}, killed {time.monotonic() - t1:.3f}s after "
                   f"SIGHUP, as the DNAT flipped; {applied(ns, backend)}")
        assert tracebacks(d) == [], log
        # 4. restart with Y: converged to Y
        d = start(ns, config, run_dir)
        d.wait_ready(timeout=60)
        log.append(f"  restarted and ready at {time.monotonic() - t0:.1f}s")
        check(ns, config, run_dir, f"round {round_}: restart with {y}", backend, y)
        log.append(f"  checked at {time.monotonic() - t0:.1f}s")
        assert tracebacks(d) == [], log
        d.kill()  # the next round starts over this state, as after a crash
        d.close()
        x, y = y, x
    print("\n".join(log))

    res = ctl(ns, config, run_dir, "down")
    assert res.returncode == 0, res.stderr
    assert holds_nothing(ns.out)
    assert ns.out("ip -4 route show table all proto 142").strip() == ""
    assert ns.out("sysctl -n net.ipv4.ip_forward").strip() == "0", "the original survived the kills"
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp")), list(run_dir.iterdir())
