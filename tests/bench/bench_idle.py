"""Idle cost and memory: what the daemon costs a host while nothing happens, and whether tunnel
flaps make it grow.

1. Idle: a gateway with 10 services at the default resync_interval; after the first converge
   and a short settle, the daemon's CPU time (utime + stime from /proc/PID/stat, all threads)
   over --idle seconds, as a share of one core, and its RSS (sampled every second).
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

GOAL_CPU = 0.005
GOAL_RSS = 50 * 2**20
GOAL_GROWTH = 1 * 2**20
WARM_FLAPS = 50
SETTLE = 5.0


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


def idle(seconds: float, tmp: Path) -> dict[str, Any]:
    ns, peer = B.gateway_host("idle")
    daemon = None
    try:
        config = tmp / "gateway-10.yaml"
        config.write_text(B.gateway_config(10))
        daemon = B.Daemon(ns, config, tmp / "run-idle", tmp / "idle.log")
        daemon.wait_ready()
        time.sleep(SETTLE)
        rss: list[int] = []
        cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            rss.append(daemon.rss_bytes())
            time.sleep(1)
        cpu1, t1 = daemon.cpu_seconds(), time.monotonic()
        status = daemon.request("status")["status"]
        return {"cpu": (cpu1 - cpu0) / (t1 - t0), "rss_max": max(rss), "rss_end": rss[-1],
                "seconds": t1 - t0, "passes": status.get("passes"), "repairs": status.get("repairs")}
    finally:
        B.teardown(daemon, ns, peer)


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
            i = idle(args.idle, Path(tmpdir)) if args.idle else None
            f = (flaps(max(args.flaps, WARM_FLAPS + 1), Path(tmpdir), trace_python=args.tracemalloc)
                 if args.flaps else None)
        finally:
            B.sweep_run_prefix()
    if i is not None:
        B.print_table(f"Idle: gateway, 10 services, resync_interval 2 s, {i['seconds']:.0f} s",
                      ["measure", "value", "goal"], [
                          ["CPU, share of one core", f"{i['cpu'] * 100:.2f} %", f"<= {GOAL_CPU * 100:.1f} %"],
                          ["RSS, max over the run", f"{i['rss_max'] / mb:.1f} MB", f"<= {GOAL_RSS / mb:.0f} MB"],
                          ["RSS at the end", f"{i['rss_end'] / mb:.1f} MB", ""],
                          ["passes / repairs (status)", f"{i['passes']} / {i['repairs']}", ""],
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
