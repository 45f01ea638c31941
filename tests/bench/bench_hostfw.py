"""The host firewall (issue 11): what judging the host's ruleset costs, and how long another
firewall's flush keeps our accepts out of its FORWARD chain.

1. The judgement (pure, this process): `judge` and `hostfw_places` for a gateway with N
   services against no other firewall, Docker's FORWARD DROP, and a firewalld-sized forward
   path (31 chains, 181 rules, a jump per zone). Median of several runs.
2. Restore after a flush (a gateway with Docker's FORWARD DROP and the daemon running, default
   resync_interval): `iptables-nft -F` (iptables-nft announces it: an nf_tables event, then the
   250 ms gap that lets a script's burst finish) and `iptables-legacy -F` with the nftables
   backend (legacy tables announce nothing: the resync timer). The clock: t0 when the flush
   command returns, t1 when a poll of FORWARD (every 10 ms, `iptables-*-save` in the namespace)
   shows our jump first again. Goal: within a second for iptables-nft.

    sudo .venv/bin/python tests/bench/bench_hostfw.py [--trials 10] [--legacy-trials 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B
from firewall_view import DOCKER_SAVE

from tagrouted.core.config import parse_config
from tagrouted.core.desired import assumed_facts, desired_state
from tagrouted.core.hostfw import Ruleset, hostfw_places, judge, parse_nft, parse_save

GOAL_NFT = 1.0


def firewalld_sized() -> Ruleset:
    """A forward base chain jumping to 30 zone chains of 5 port accepts each, then a drop."""
    def match(left: dict[str, Any], right: Any) -> dict[str, Any]:
        return {"match": {"op": "==", "left": left, "right": right}}

    items: list[dict[str, Any]] = [{"chain": {"family": "inet", "table": "firewalld", "name": "fwd",
                                              "hook": "forward", "prio": 10, "policy": "accept",
                                              "type": "filter"}}]
    for i in range(30):
        items.append({"chain": {"family": "inet", "table": "firewalld", "name": f"zone{i}"}})
        items.append({"rule": {"family": "inet", "table": "firewalld", "chain": "fwd", "handle": 100 + i,
                               "expr": [match({"meta": {"key": "iifname"}}, f"if{i}"),
                                        {"jump": {"target": f"zone{i}"}}]}})
        for j in range(5):
            items.append({"rule": {"family": "inet", "table": "firewalld", "chain": f"zone{i}",
                                   "handle": 1000 + 10 * i + j,
                                   "expr": [match({"payload": {"protocol": "tcp", "field": "dport"}}, 22 + j),
                                            {"accept": None}]}})
    items.append({"rule": {"family": "inet", "table": "firewalld", "chain": "fwd", "handle": 9999,
                           "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
                                    {"drop": None}]}})
    return Ruleset(tuple(parse_nft({"nftables": items})))


def judge_table(sizes: list[int], runs: int) -> None:
    rulesets = {"none": Ruleset(), "Docker FORWARD DROP": Ruleset(tuple(parse_save(DOCKER_SAVE, "iptables-nft", "ip"))),
                "firewalld-sized (181 rules)": firewalld_sized()}
    rows = []
    for n in sizes:
        config = parse_config(B.gateway_config(n), "bench.yaml")
        intent = desired_state(config, assumed_facts(config)).firewall
        for name, rs in rulesets.items():
            judged = statistics.median(B.timed(lambda rs=rs, i=intent: judge(rs, i, "nftables"))
                                       for _ in range(runs))
            placed = statistics.median(B.timed(lambda rs=rs, i=intent: hostfw_places(rs, i, "nftables", {}))
                                       for _ in range(runs))
            rows.append((n, name, B.ms(judged), B.ms(placed)))
    B.print_table("judging the host's ruleset (ms, median)", ["services", "other firewall", "judge", "places"], rows)


def _first_jump(ns: B.Netns, save: str) -> bool:
    lines = [x for x in ns.run([save], check=False).stdout.splitlines() if x.startswith("-A FORWARD ")]
    return bool(lines) and lines[0] == "-A FORWARD -m comment --comment tagrouted -j TAGROUTED-HOSTFW"


def restore_trials(kind: str, trials: int) -> list[float]:
    ns, peer = B.gateway_host("bhf")
    ns.run("ip link add br0 type veth peer name br1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-hostfw-"))
    config = tmp / "gateway.yaml"
    config.write_text(B.gateway_config(10) + "firewall: {backend: nftables}\n")
    ipt, save = ("iptables-nft", "iptables-nft-save") if kind == "nft" else ("iptables-legacy", "iptables-legacy-save")
    ns.run(f"{ipt} -P FORWARD DROP")
    daemon = B.Daemon(ns, config, tmp / "run", tmp / "tagrouted.log")
    out: list[float] = []
    try:
        daemon.wait_ready()
        B.wait_for(lambda: _first_jump(ns, save), timeout=30, what="our jump first")
        for _ in range(trials):
            ns.run(f"{ipt} -F")
            t0 = time.monotonic()
            B.wait_for(lambda: _first_jump(ns, save), timeout=30, interval=0.01, what="our jump back")
            out.append(time.monotonic() - t0)
            time.sleep(0.3)
    finally:
        B.teardown(daemon, ns, peer)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--legacy-trials", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not B.begin("bench_hostfw"):
        return 0
    judge_table([10, 100, 1000], args.runs)
    rows = []
    for kind, trials, goal in (("nft", args.trials, f"<= {GOAL_NFT:g} s"),
                               ("legacy", args.legacy_trials, "<= resync_interval (2 s) + a pass")):
        s = B.stats(restore_trials(kind, trials))
        what = "iptables-nft -F (nf_tables event)" if kind == "nft" else "iptables-legacy -F (resync timer)"
        rows.append((what, s["n"], B.ms(s["p50"]), B.ms(s["p99"]), B.ms(s["max"]), goal))
    B.print_table("our accepts back after a flush of the host's filter table (ms)",
                  ["flush", "n", "p50", "p99", "max", "goal"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
