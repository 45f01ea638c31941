"""`tagroutectl check` and `plan` on large configs: what a user pays for validation (a new process
each: Python start, imports, the YAML walk, the cross-checks). The issue 16 goals: `check` of
10,000 public addresses under 1 s (it took 5 s, 18-20 s on a busy machine), and no quadratic
cross-check (10,000 services with one overlap took 34 s). Pure: no kernel state, no namespace.

    .venv/bin/python tests/bench/bench_check.py [--trials 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CTL = [sys.executable, "-m", "tagrouted.cli"]
SVC = "{name: web, proto: tcp, port: 443, address: 192.168.100.3}"


def gateway(services: str, publics: str) -> str:
    return (f"roles: [gateway]\nservices:\n{services}gateway:\n  public_interface: eth0\n"
            f"  public_addresses: [{publics}]\n  home_networks: [192.168.100.0/24]\n  via: [192.168.200.2]\n")


def cases() -> dict[str, tuple[str, int]]:
    """name -> (config text, the exit status `check` must give)."""
    many_publics = ", ".join(f"198.18.{i // 250}.{i % 250 + 1}" for i in range(10_000))
    many = "".join(f"  - {{name: s{i}, proto: tcp, port: {1000 + i}, address: 192.168.100.3}}\n"
                   for i in range(10_000))
    overlap = many + "  - {name: late, proto: tcp, port: 5000-5001, address: 192.168.100.3}\n"
    thousand = "".join(f"  - {{name: s{i}, proto: tcp, port: {1000 + i}, address: 192.168.100.3}}\n"
                       for i in range(1000))
    publics23 = ", ".join(f"192.0.2.{i}" for i in range(1, 24))
    publics1000 = ", ".join(f"198.18.{i // 250}.{i % 250 + 1}" for i in range(1000))
    return {
        "10,000 public addresses, 1 service": (gateway(f"  - {SVC}\n", many_publics), 0),
        "10,000 services": (gateway(many, "192.0.2.200"), 0),
        "10,000 services, one overlap": (gateway(overlap, "192.0.2.200"), 1),
        "1000 services x 23 addresses (23,001 rules)": (gateway(thousand, publics23), 0),
        "1000 services x 1000 addresses (refused: cap)": (gateway(thousand, publics1000), 1),
    }


def timed(argv: list[str], want: int) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != want:
        raise RuntimeError(f"{' '.join(argv)} -> {res.returncode} (wanted {want}): {res.stderr[-400:]}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args()
    repo = Path(__file__).resolve().parents[2]
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.trials} trials each, "
          "a new tagroutectl process per trial\n")
    print("| config | bytes | check p50 | check max | plan p50 | plan lines |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="tagrouted-bench-check-") as tmp:
        for name, (text, want) in cases().items():
            path = Path(tmp) / "c.yaml"
            path.write_text(text)
            base = [*CTL, "--config", str(path)]
            checks = [timed([*base, "check"], want) for _ in range(args.trials)]
            plans = [timed([*base, "plan"], want) for _ in range(args.trials)]
            res = subprocess.run([*base, "plan"], capture_output=True, text=True, cwd=repo)
            lines = len(res.stdout.splitlines()) if want == 0 else 0
            print(f"| {name} | {len(text.encode())} | {statistics.median(checks) * 1000:.0f} ms | "
                  f"{max(checks) * 1000:.0f} ms | {statistics.median(plans) * 1000:.0f} ms | "
                  f"{lines or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
