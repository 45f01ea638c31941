"""Scale: first converge and no-op reconcile of a gateway with N services (one DNAT in nat and one
ACCEPT in filter FORWARD each), side by side with the limit and the seed's way, same ruleset:

- tagroutectl apply       a fresh process (Python start, imports, cold caches) per call
- Converger (in-process)  what the daemon pays: caches cold for the first converge of a process,
                          warm for a re-converge after `down` and for every no-op reconcile
- iptables-legacy-restore the whole ruleset as one restore (the limit for one commit)
- iptables-legacy-save    one read of the table (the floor of any no-op check through a process)
- iptables-legacy -A      one process per rule, the seed's way (libiptc re-reads and rewrites the
                          whole table per call, so it grows with N squared)

The ruleset for the last three is what `tagroutectl apply` left in the kernel (iptables-legacy-save
of that namespace), so all rows write the identical rules. Kernel work runs in forked children
that entered the benchmark's namespaces (Netns.call); this process never imports python-iptables.

    sudo .venv/bin/python tests/bench/bench_scale.py [--sizes 10,100,1000] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

GOAL_CONVERGE_1000 = 0.5
GOAL_NOOP_1000 = 0.050
FLUSH_OURS = "iptables-legacy -t nat -F; iptables-legacy -t nat -X; iptables-legacy -F; iptables-legacy -X"


# ---- run inside the namespace (Netns.call children) -----------------------------------------

def _run(argv: list[str], input: str | None = None) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, input=input, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {res.returncode}: {res.stderr[-500:]}")
    return elapsed


def ctl_trials(config: str, run_dir: str, trials: int) -> dict[str, list[float]]:
    """`tagroutectl apply` on a clean namespace, again (no-op), then `down`; `trials` times."""
    ctl = [*B.TAGROUTECTL, "--config", config, "--run-dir", run_dir]
    out: dict[str, list[float]] = {"first": [], "noop": [], "down": []}
    for _ in range(trials):
        out["first"].append(_run([*ctl, "apply"]))
        out["noop"].append(_run([*ctl, "apply"]))
        out["down"].append(_run([*ctl, "down"]))
    return out


def inproc_trial(config_path: str, run_dir: str, noops: int, profile: bool) -> dict[str, Any]:
    """One process's life: cold first converge, no-op reconciles, down, warm re-converge."""
    from tagrouted.core.config import load_config
    from tagrouted.kernel.converge import Converger
    from tagrouted.kernel.firewall import iptables_legacy as iptables

    iptables._iptc()  # the libraries are loaded; what follows is our own work
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    config = load_config(config_path)
    out["load"] = time.perf_counter() - t0
    prof = cProfile.Profile() if profile else None
    with Converger(run_dir) as conv:
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        res = conv.converge(config)
        if prof:
            prof.disable()
        out["first"] = time.perf_counter() - t0
        assert res.ok and res.changes, res.errors
        out["noop"] = []
        noop_prof = cProfile.Profile() if profile else None
        for i in range(noops):
            t0 = time.perf_counter()
            if noop_prof and i == noops - 1:
                noop_prof.enable()
            res = conv.converge(config)
            if noop_prof and i == noops - 1:
                noop_prof.disable()
            out["noop"].append(time.perf_counter() - t0)
            assert res.ok and not res.changes, (res.errors, res.changes[:3])
        t0 = time.perf_counter()
        res = conv.converge(None, config.tag)
        out["down"] = time.perf_counter() - t0
        assert res.ok, res.errors
        t0 = time.perf_counter()
        res = conv.converge(config)
        out["warm"] = time.perf_counter() - t0
        assert res.ok and res.changes, res.errors
        # the no-op's parts: routing (netlink + sysctls) vs firewall (6 tables read and compared)
        from tagrouted.kernel.converge import FIREWALL, ROUTING, SYSCTLS
        t0 = time.perf_counter()
        conv.converge(config, parts=frozenset({ROUTING, SYSCTLS}))
        out["noop_routing"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conv.converge(config, parts=frozenset({FIREWALL}))
        out["noop_firewall"] = time.perf_counter() - t0
        conv.converge(None, config.tag)
    if prof:
        out["profile_first"] = _profile_text(prof)
        out["profile_noop"] = _profile_text(noop_prof)
    return out


def _profile_text(prof: cProfile.Profile | None, limit: int = 18) -> str:
    if prof is None:
        return ""
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.strip_dirs().sort_stats("tottime").print_stats(limit)
    text = buf.getvalue()
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


def restore_trials(ruleset: str, trials: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"restore": [], "save": []}
    for _ in range(trials):
        _run(["sh", "-c", FLUSH_OURS])
        out["restore"].append(_run(["iptables-legacy-restore"], input=ruleset))
        out["save"].append(_run(["iptables-legacy-save"]))
    _run(["sh", "-c", FLUSH_OURS])
    return out


def per_rule_trials(script: str, trials: int) -> list[float]:
    times = []
    for _ in range(trials):
        _run(["sh", "-c", FLUSH_OURS])
        times.append(_run(["bash", "-e", "-s"], input=script))
    _run(["sh", "-c", FLUSH_OURS])
    return times


# ---- the benchmark process ------------------------------------------------------------------

def per_rule_script(saved: str) -> str:
    """iptables-legacy-save text -> one `iptables-legacy` process per chain and rule."""
    table = ""
    lines = []
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":TAGROUTED-"):
            lines.append(f"iptables-legacy -w -t {table} -N {line[1:].split()[0]}")
        elif line.startswith("-A "):
            lines.append(f"iptables-legacy -w -t {table} {line}")
    return "\n".join(lines) + "\n"


def our_ruleset(saved: str) -> str:
    """Only the tables that hold something of ours (what a restore of our ruleset writes)."""
    keep, block, out = False, [], []
    for line in saved.splitlines():
        if line.startswith("*"):
            block, keep = [line], False
            continue
        block.append(line)
        if "TAGROUTED-" in line:
            keep = True
        if line == "COMMIT":
            if keep:
                out += block
            block = []
    return "\n".join(out) + "\n"


def run_size(n: int, trials: dict[str, int], profile: bool, tmp: Path) -> dict[str, Any]:
    config = tmp / f"gateway-{n}.yaml"
    config.write_text(B.gateway_config(n))
    run_dir = tmp / f"run-{n}"
    ns, peer = B.gateway_host(f"scale{n}")
    try:
        res: dict[str, Any] = {"n": n}
        res["ctl"] = ns.call(ctl_trials, str(config), str(run_dir), trials["ctl"], timeout=3600)
        # the ruleset, exactly as tagrouted leaves it
        ns.run([*B.TAGROUTECTL, "--config", str(config), "--run-dir", str(run_dir), "apply"])
        saved = our_ruleset(ns.out("iptables-legacy-save"))
        res["rules"] = sum(1 for line in saved.splitlines() if line.startswith("-A "))
        ns.run([*B.TAGROUTECTL, "--config", str(config), "--run-dir", str(run_dir), "down"])
        inproc = [ns.call(inproc_trial, str(config), str(run_dir), trials["noops"],
                          profile and i == 0 and n == max(SIZES), timeout=3600)
                  for i in range(trials["inproc"])]
        res["inproc"] = inproc
        res["restore"] = ns.call(restore_trials, saved, trials["restore"], timeout=3600)
        res["per_rule"] = ns.call(per_rule_trials, per_rule_script(saved), trials["per_rule"],
                                  timeout=3600)
        return res
    finally:
        ns.delete()
        peer.delete()


def report(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        n = r["n"]
        inproc = r["inproc"]
        first = [t["first"] for t in inproc]
        warm = [t["warm"] for t in inproc]
        noop = [x for t in inproc for x in t["noop"]]
        down = [t["down"] for t in inproc]

        def row(what: str, values: list[float], goal: str = "", n: int = n) -> list[str]:
            s = B.stats(values)
            return [str(n), what, str(s["n"]), B.ms(s["p50"]), B.ms(s["p99"]), goal]

        goal_c = f"<= {GOAL_CONVERGE_1000 * 1000:.0f}" if n == 1000 else ""
        goal_n = f"<= {GOAL_NOOP_1000 * 1000:.0f}" if n == 1000 else ""
        rows += [
            row("tagrouted first converge, in-process, cold caches", first, goal_c),
            row("tagrouted first converge, in-process, warm caches", warm, goal_c),
            row("tagrouted no-op reconcile, in-process", noop, goal_n),
            row("tagrouted down, in-process", down),
            row("`tagroutectl apply` (new process), first", r["ctl"]["first"]),
            row("`tagroutectl apply` (new process), no-op", r["ctl"]["noop"]),
            row("`tagroutectl down` (new process)", r["ctl"]["down"]),
            row("iptables-legacy-restore, same ruleset (the limit)", r["restore"]["restore"]),
            row("iptables-legacy-save (one read: no-op floor)", r["restore"]["save"]),
            row(f"iptables-legacy -A per rule ({r['rules']} + chains; the seed's way)", r["per_rule"]),
        ]
    B.print_table("Scale: gateway with N services (DNAT + FORWARD each), times in ms",
                  ["N", "what", "trials", "p50", "p99", "goal"], rows)
    parts = []
    for r in results:
        inproc = r["inproc"]
        parts.append([str(r["n"]), B.ms(B.stats([t["load"] for t in inproc])["p50"]),
                      B.ms(B.stats([t["noop_routing"] for t in inproc])["p50"]),
                      B.ms(B.stats([t["noop_firewall"] for t in inproc])["p50"])])
    B.print_table("Where a no-op reconcile's time goes (p50, ms)",
                  ["N", "config load", "routing part (rules, routes, sysctls)",
                   "firewall part (6 tables read + compared)"], parts)
    for r in results:
        for t in r["inproc"]:
            if t.get("profile_first"):
                print(f"\n#### Profile: first converge, cold caches, N={r['n']} (top by own time)\n")
                print("```\n" + t["profile_first"].rstrip() + "\n```")
                print(f"\n#### Profile: no-op reconcile, N={r['n']} (top by own time)\n")
                print("```\n" + t["profile_noop"].rstrip() + "\n```")


SIZES: tuple[int, ...] = (10, 100, 1000)


def main() -> int:
    global SIZES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--quick", action="store_true", help="few trials (a smoke run)")
    ap.add_argument("--profile", action="store_true", help="cProfile the largest size's converges")
    args = ap.parse_args()
    B.require_root()
    SIZES = tuple(int(s) for s in args.sizes.split(","))
    print(f"# bench_scale: {B.machine_line()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="tgr-bench-scale-") as tmpdir:
        try:
            for n in SIZES:
                if args.quick:
                    trials = {"ctl": 2, "inproc": 2, "noops": 5, "restore": 5, "per_rule": 1}
                else:
                    big = n >= 1000
                    trials = {"ctl": 5 if big else 10, "inproc": 10 if big else 20,
                              "noops": 20, "restore": 30, "per_rule": 3 if big else 10}
                t0 = time.monotonic()
                results.append(run_size(n, trials, args.profile, Path(tmpdir)))
                print(f"# N={n} done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        finally:
            B.sweep_run_prefix()
    report(results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
