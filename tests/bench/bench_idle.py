"""Idle cost and memory: what the daemon costs a host while nothing happens, and whether tunnel
flaps make it grow.

1. Idle: a gateway with 10 services at the default resync_interval; after the first converge
   and a short settle, the daemon's CPU time (utime + stime from /proc/PID/stat, all threads)
   over --idle seconds, as a share of one core, and its RSS (sampled every second). Two such
   daemons side by side over the same window: one without metrics, one with `metrics.listen`
   set and /metrics scraped every 15 s (the scrape_interval of Prometheus' example config)
   from inside its namespace.
   Goals: <= 0.5 % of one core, <= 50 MB.
2. Flaps: a vpn-client daemon; its RSS before any flap, after the first 50 (warm: caches,
   first-use allocations) and after --flaps down/up cycles of tun0 (each waits until table 42
   routes via tun0 again, so every flap is a full pass). Goal (issue 15): growth from flap 50
   to the last <= 1 MB. RSS is also sampled every --sample flaps, and /proc/PID/smaps_rollup's
   anonymous memory and the heap mapping's size are printed beside it.

    sudo .venv/bin/python tests/bench/bench_idle.py [--idle 120] [--flaps 2000]
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B
from daemon_harness import http_get_metrics

GOAL_CPU = 0.005
GOAL_RSS = 50 * 2**20
GOAL_GROWTH = 1 * 2**20
WARM_FLAPS = 50
SETTLE = 5.0
METRICS_LISTEN = "127.0.0.1:9542"
SCRAPE_EVERY = 15.0


def flap(n: int) -> int:
    """Inside the namespace: n down/up cycles of tun0, each until the daemon routed it again."""
    nl = B.Rtnl()
    index = socket.if_nametoindex("tun0")
    missed = 0
    for _ in range(n):
        nl.set_up(index, False)
        time.sleep(random.uniform(0.002, 0.01))
        nl.drain()
        nl.set_up(index, True)
        if not nl.route_added(index, timeout=5):
            missed += 1
    nl.close()
    return missed


def idle(seconds: float, tmp: Path) -> dict[str, dict[str, Any]]:
    """Both daemons (metrics off, metrics on) side by side over the same window, so the other
    load on the machine weighs on both alike; {"off": figures, "on": figures}."""
    hosts: dict[str, tuple[B.Netns, B.Netns, B.Daemon | None]] = {}
    try:
        for name in ("off", "on"):
            ns, peer = B.gateway_host(f"idle-{name}")
            hosts[name] = (ns, peer, None)
            config = tmp / f"idle-{name}.yaml"
            config.write_text(B.gateway_config(10)
                              + (f'metrics: {{listen: "{METRICS_LISTEN}"}}\n' if name == "on" else ""))
            hosts[name] = (ns, peer, B.Daemon(ns, config, tmp / f"run-idle-{name}", tmp / f"idle-{name}.log"))
        daemons = {name: d for name, (_, _, d) in hosts.items() if d is not None}
        for d in daemons.values():
            d.wait_ready()
        time.sleep(SETTLE)
        rss: dict[str, list[int]] = {name: [] for name in daemons}
        scrapes = 0
        next_scrape = time.monotonic()
        cpu0, t0 = {name: d.cpu_seconds() for name, d in daemons.items()}, time.monotonic()
        while time.monotonic() - t0 < seconds:
            if time.monotonic() >= next_scrape:
                hosts["on"][0].call(http_get_metrics, METRICS_LISTEN, timeout=30)
                scrapes += 1
                next_scrape += SCRAPE_EVERY
            for name, d in daemons.items():
                rss[name].append(d.rss_bytes())
            time.sleep(1)
        cpu1, t1 = {name: d.cpu_seconds() for name, d in daemons.items()}, time.monotonic()
        out = {}
        for name, d in daemons.items():
            status = d.request("status")["status"]
            out[name] = {"cpu": (cpu1[name] - cpu0[name]) / (t1 - t0), "rss_max": max(rss[name]),
                         "rss_end": rss[name][-1], "seconds": t1 - t0, "passes": status.get("passes"),
                         "repairs": status.get("repairs"), "scrapes": scrapes if name == "on" else 0}
        return out
    finally:
        for ns, peer, d in hosts.values():
            B.teardown(d, ns, peer)


def memory_detail(pid: int) -> tuple[int, int]:
    """(anonymous bytes from smaps_rollup, resident bytes of the [heap] mapping)."""
    anon = heap = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                anon = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/smaps") as f:
        in_heap = False
        for line in f:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                in_heap = line.rstrip().endswith("[heap]")
            elif in_heap and line.startswith("Rss:"):
                heap = int(line.split()[1]) * 1024
    return anon, heap


def python_snapshot(prefix: Path, n: int) -> Any:
    """Ask the daemon (run under tailtrace.py) for tracemalloc snapshot n and load it."""
    import tracemalloc

    req = Path(f"{prefix}.{n}.req")
    req.touch()
    B.wait_for(lambda: not req.exists(), timeout=60, what=f"tracemalloc snapshot {n}")
    return tracemalloc.Snapshot.load(f"{prefix}.{n}")


def flaps(n: int, tmp: Path, sample: int = 250, trace_python: bool = False) -> dict[str, Any]:
    ns, peer = B.vpn_client_host("flaps")
    daemon = None
    (tmp / "snapshots").mkdir(exist_ok=True)
    prefix = tmp / "snapshots" / "tracemalloc"
    try:
        # a directory of its own: the daemon watches it, and its log and snapshots are written
        # elsewhere (every log line there was a config-file event, a pass of its own)
        (tmp / "etc").mkdir(exist_ok=True)
        config = tmp / "etc" / "vpn-client.yaml"
        config.write_text(B.vpn_client_config(2))
        daemon = B.Daemon(ns, config, tmp / "run-flaps", tmp / "flaps.log",
                          env={"TAGROUTED_TRACEMALLOC": str(prefix)} if trace_python else None,
                          command=[B.PYTHON, str(B.BENCH / "tailtrace.py")] if trace_python else None)
        daemon.wait_ready()
        time.sleep(1)
        before = daemon.rss_bytes()
        t0 = time.monotonic()
        missed = ns.call(flap, WARM_FLAPS, timeout=600)
        time.sleep(1)
        warm = daemon.rss_bytes()
        first = python_snapshot(prefix, 0) if trace_python else None
        samples = [(WARM_FLAPS, warm, *memory_detail(daemon.pid))]
        done = WARM_FLAPS
        while done < n:
            step = min(sample, n - done)
            missed += ns.call(flap, step, timeout=3600)
            done += step
            samples.append((done, daemon.rss_bytes(), *memory_detail(daemon.pid)))
        elapsed = time.monotonic() - t0
        daemon.wait_ready()
        time.sleep(1)
        after = daemon.rss_bytes()
        errors = [r for r in daemon.records() if int(r.get("PRIORITY", 6)) <= 3]
        python = None
        if first is not None:
            last = python_snapshot(prefix, 1)
            diff = last.compare_to(first, "lineno")
            python = {"growth": sum(d.size_diff for d in diff), "top": [
                (str(d.traceback[0]), d.size_diff, d.count_diff) for d in diff[:12]]}
        return {"before": before, "warm": warm, "after": after, "missed": missed,
                "elapsed": elapsed, "errors": len(errors), "samples": samples, "python": python}
    finally:
        B.teardown(daemon, ns, peer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=float, default=120)
    ap.add_argument("--flaps", type=int, default=2000)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="run the flap daemon under tailtrace.py with tracemalloc: what the Python heap "
                         "gained between flap 50 and the last (tracing makes RSS larger: its own numbers)")
    args = ap.parse_args()
    if not B.begin("bench_idle"):
        return 0
    mb = 2**20
    with tempfile.TemporaryDirectory(prefix="tgr-bench-idle-") as tmpdir:
        try:
            both = idle(args.idle, Path(tmpdir)) if args.idle else None
            f = (flaps(max(args.flaps, WARM_FLAPS + 1), Path(tmpdir), trace_python=args.tracemalloc)
                 if args.flaps else None)
        finally:
            B.sweep_run_prefix()
    if both is not None:
        i, im = both["off"], both["on"]
        B.print_table(f"Idle: gateway, 10 services, resync_interval 2 s, {i['seconds']:.0f} s",
                      ["measure", "metrics off", f"metrics on, scraped every {SCRAPE_EVERY:.0f} s", "goal"], [
                          ["CPU, share of one core", f"{i['cpu'] * 100:.2f} %", f"{im['cpu'] * 100:.2f} %",
                           f"<= {GOAL_CPU * 100:.1f} %"],
                          ["RSS, max over the run", f"{i['rss_max'] / mb:.1f} MB", f"{im['rss_max'] / mb:.1f} MB",
                           f"<= {GOAL_RSS / mb:.0f} MB"],
                          ["RSS at the end", f"{i['rss_end'] / mb:.1f} MB", f"{im['rss_end'] / mb:.1f} MB", ""],
                          ["passes / repairs (status)", f"{i['passes']} / {i['repairs']}",
                           f"{im['passes']} / {im['repairs']}", ""],
                          ["scrapes", "-", str(im["scrapes"]), ""],
                      ])
    if f is not None:
        n = max(args.flaps, WARM_FLAPS + 1)
        B.print_table(f"Memory across tunnel flaps: vpn-client, {n} down/up cycles in {f['elapsed']:.0f} s",
                      ["measure", "value", "goal"], [
                          ["RSS before any flap", f"{f['before'] / mb:.1f} MB", ""],
                          [f"RSS after {WARM_FLAPS} flaps (warm)", f"{f['warm'] / mb:.1f} MB", ""],
                          [f"RSS after {n} flaps", f"{f['after'] / mb:.1f} MB", ""],
                          ["growth vs before", f"{(f['after'] - f['before']) / mb:+.2f} MB", ""],
                          [f"growth from flap {WARM_FLAPS}", f"{(f['after'] - f['warm']) / mb:+.2f} MB",
                           f"<= {GOAL_GROWTH / mb:.0f} MB"],
                          ["flaps not routed again within 5 s", str(f["missed"]), "0"],
                          ["error records in the log", str(f["errors"]), "0"],
                      ])
        B.print_table("RSS along the flaps", ["flaps", "RSS MB", "anonymous MB", "[heap] resident MB"],
                      [[k, f"{r / mb:.2f}", f"{a / mb:.2f}", f"{h / mb:.2f}"] for k, r, a, h in f["samples"]])
        if f.get("python"):
            py = f["python"]
            B.print_table(f"Python heap (tracemalloc) from flap {WARM_FLAPS} to the last: "
                          f"{py['growth'] / 1024:+.1f} KiB in all; the largest gains",
                          ["where", "KiB", "blocks"],
                          [[w, f"{size / 1024:+.1f}", f"{count:+d}"] for w, size, count in py["top"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
