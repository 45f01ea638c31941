"""`tagroutectl status` and `reload` round trips against a running daemon, at 10 and 1000
services (gateway role):

- `tagroutectl status` / `status --json` / `reload`: a new process each (what a user or a
  script pays: Python start and the import of the CLI, then one request on the socket)
- request status / reload:  the control-socket round trip alone (one JSON line each way), from
  a client that is already running
- reload, one service changed: the config alternates between two files that differ in one
  service's port, so every reload re-reads the file, compiles, and applies a real change

    sudo .venv/bin/python tests/bench/bench_ctl.py [--sizes 10,1000] [--trials 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B


def _timed_ctl(argv: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {res.returncode}: {res.stderr[-400:]}")
    return elapsed


def run_size(n: int, trials: int, tmp: Path) -> dict[str, list[float]]:
    ns, peer = B.gateway_host(f"ctl{n}")
    daemon = None
    try:
        config = tmp / f"gateway-{n}.yaml"
        text_a = B.gateway_config(n)
        # the same services, one of them on another public port
        text_b = text_a.replace("port: 10000,", f"port: {10000 + n},")
        assert text_a != text_b
        config.write_text(text_a)
        run_dir = tmp / f"run-{n}"
        daemon = B.Daemon(ns, config, run_dir, tmp / f"ctl-{n}.log")
        daemon.wait_ready(timeout=120)
        ctl = [*B.TAGROUTECTL, "--config", str(config), "--run-dir", str(run_dir)]
        out: dict[str, list[float]] = {k: [] for k in (
            "ctl status", "ctl status --json", "ctl reload", "request status", "request reload",
            "request reload, one service changed")}
        for _ in range(trials):
            out["ctl status"].append(_timed_ctl([*ctl, "status"]))
            out["ctl status --json"].append(_timed_ctl([*ctl, "status", "--json"]))
            out["ctl reload"].append(_timed_ctl([*ctl, "reload"]))
            t0 = time.perf_counter()
            reply: dict[str, Any] = daemon.request("status")
            out["request status"].append(time.perf_counter() - t0)
            assert reply.get("ok"), reply
            t0 = time.perf_counter()
            reply = daemon.request("reload")
            out["request reload"].append(time.perf_counter() - t0)
            assert reply.get("ok") and not reply.get("changes"), reply
        for i in range(trials):
            # the file is written before the clock starts; the file watcher may see it first
            config.write_text(text_b if i % 2 == 0 else text_a)
            t0 = time.perf_counter()
            reply = daemon.request("reload")
            out["request reload, one service changed"].append(time.perf_counter() - t0)
            assert reply.get("ok"), reply
        return out
    finally:
        B.teardown(daemon, ns, peer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,1000")
    ap.add_argument("--trials", type=int, default=30)
    args = ap.parse_args()
    if not B.begin("bench_ctl"):
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="tgr-bench-ctl-") as tmpdir:
        try:
            for n in (int(s) for s in args.sizes.split(",")):
                for what, values in run_size(n, args.trials, Path(tmpdir)).items():
                    s = B.stats(values)
                    label = what.replace("ctl ", "`tagroutectl ", 1) + "`" if what.startswith("ctl ") else what
                    rows.append([n, label, s["n"], B.ms(s["p50"]), B.ms(s["p99"])])
        finally:
            B.sweep_run_prefix()
    B.print_table("Control round trips (ms)", ["services", "what", "trials", "p50", "p99"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
