"""Convergence after the tunnel comes up: from `ip link set tun0 up` to table 42's
`default dev tun0` route and tun0's rp_filter in place, over repeated flaps, side by side:

- tagrouted        the daemon (vpn-client role) reacting to the netlink link event
- seed recipe      an OpenVPN-style up hook: the moment the link is up, recipe_up.sh vpn-client
                   is started (its `iptables-legacy`, `ip` and `sysctl` commands, as OpenVPN's
                   --up runs the seed's script right after it set the device up)
- minimal hook     the floor of any hook: only `ip route add` and `sysctl -w` for tun0

Two kinds of flap: `flap` sets a persistent tun0 down and up (the route dies with the link, the
rp_filter value stays); `recreate` deletes tun0 and creates a new one (a new ifindex, rp_filter
back to the namespace default, 1 here as on a hardened host) before setting it up, as an
OpenVPN restart does.

The clock: t0 is taken right before the RTM_NEWLINK that sets IFF_UP is sent (raw netlink, in
the measuring process); t1 when the RTM_NEWROUTE for table 42 `default dev tun0` has arrived on
a socket subscribed before t0 and /proc/sys/net/ipv4/conf/tun0/rp_filter reads the wanted value.
Between flaps the namespace is left quiet for --gap ms so each side starts from rest.

    sudo .venv/bin/python tests/bench/bench_tunnel.py [--flaps 200] [--gap 60]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

GOAL_P99 = 0.020
TABLE = B.TABLE
MIN_HOOK = "ip route add default dev tun0 table 42 && sysctl -qw net.ipv4.conf.tun0.rp_filter=0"


def _rp_filter(tun: str) -> str | None:
    try:
        with open(f"/proc/sys/net/ipv4/conf/{tun}/rp_filter") as f:
            return f.read().strip()
    except OSError:
        return None


def _route_present(tun: str) -> bool:
    out = subprocess.run(["ip", "-4", "route", "show", "table", str(TABLE), "default", "dev", tun],
                         capture_output=True, text=True).stdout
    return bool(out.strip())


def flap_trials(mode: str, flaps: int, gap: float, hook: list[str] | None,
                rp_value: str, tun: str = "tun0") -> dict[str, Any]:
    """Runs inside the namespace: `flaps` times down (or recreate) -> rest -> up -> measure."""
    nl = B.Rtnl()
    times: list[float] = []
    misses = 0
    hook_env = {**os.environ, "TUN": tun, "LAN_IF": "eth0"}
    for _ in range(flaps):
        if mode == "recreate":
            subprocess.run(["ip", "tuntap", "del", "dev", tun, "mode", "tun"], check=True)
            subprocess.run(["ip", "tuntap", "add", "dev", tun, "mode", "tun"], check=True)
        else:
            nl.set_up(socket.if_nametoindex(tun), False)
        time.sleep(gap)  # rest: the daemon has handled the down (or the new link) and is idle
        if _route_present(tun):
            raise RuntimeError("table 42 still routes via a down tun0")
        index = socket.if_nametoindex(tun)
        nl.drain()
        t0 = time.perf_counter()
        nl.set_up(index, True)
        proc = subprocess.Popen(hook, env=hook_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) if hook else None
        ok = nl.route_added(index, timeout=5.0)
        while ok and _rp_filter(tun) != rp_value:
            if time.perf_counter() - t0 > 5.0:
                ok = False
                break
            time.sleep(0.0002)
        t1 = time.perf_counter()
        if proc is not None:
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"hook failed ({proc.returncode}): {err.decode()[-400:]}")
        if ok:
            times.append(t1 - t0)
        else:
            misses += 1
    counts = {
        "ip rules fwmark 0x2a": subprocess.run(["ip", "-4", "rule"], capture_output=True,
                                               text=True).stdout.count("fwmark 0x2a"),
        "mangle rules": sum(1 for line in subprocess.run(
            ["iptables-legacy-save", "-t", "mangle"], capture_output=True, text=True
        ).stdout.splitlines() if line.startswith("-A ")),
    }
    return {"times": times, "misses": misses, "counts": counts}


# ---- the benchmark process -------------------------------------------------------------------

def tunnel_host(name: str) -> tuple[B.Netns, B.Netns]:
    """A home VPN client: eth0 (veth to a peer of ours), tun0 (down), fresh links strict."""
    ns = B.Netns(name)
    peer = B.Netns(name + "-peer")
    B.veth(ns, "eth0", peer, "eth1")
    ns.run("ip addr add 192.168.100.2/24 dev eth0")
    ns.run("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=1")
    ns.run("ip tuntap add dev tun0 mode tun")
    return ns, peer


def run_side(side: str, mode: str, flaps: int, gap: float, tmp: Path) -> dict[str, Any]:
    ns, peer = tunnel_host(f"tun-{side[:4]}-{mode[:3]}")
    daemon = None
    try:
        if side == "tagrouted":
            config = tmp / f"vpn-client-{mode}.yaml"
            config.write_text(B.vpn_client_config(2, rp_filter="off"))
            daemon = B.Daemon(ns, config, tmp / f"run-{mode}", tmp / f"tagrouted-{mode}.log")
            daemon.wait_ready()
            hook = None
        elif side == "recipe":
            hook = ["bash", str(B.RECIPE_UP), "vpn-client"]
        else:
            hook = ["sh", "-c", MIN_HOOK]
        res = ns.call(flap_trials, mode, flaps, gap, hook, "0", timeout=3600)
        if daemon is not None:
            res["errors"] = [r["MESSAGE"].splitlines()[0] for r in daemon.records()
                             if int(r.get("PRIORITY", 6)) <= 3 or "Traceback" in r.get("MESSAGE", "")]
            res["counts"]["daemon RSS MB"] = f"{daemon.rss_bytes() / 2**20:.1f}"
        return res
    finally:
        B.teardown(daemon, ns, peer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flaps", type=int, default=200)
    ap.add_argument("--gap", type=float, default=60, help="rest between flaps, ms")
    ap.add_argument("--modes", default="flap,recreate")
    ap.add_argument("--sides", default="tagrouted,recipe,minimal-hook")
    args = ap.parse_args()
    B.require_root()
    print(f"# bench_tunnel: {B.machine_line()}")
    sides = args.sides.split(",")
    if "tagrouted" in sides and not B.daemon_available():
        print("# tagrouted daemon not installed yet (tagrouted.daemon.main): its rows are skipped")
        sides.remove("tagrouted")
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="tgr-bench-tunnel-") as tmpdir:
        try:
            for mode in args.modes.split(","):
                for side in sides:
                    r = run_side(side, mode, args.flaps, args.gap / 1000, Path(tmpdir))
                    s = B.stats(r["times"])
                    goal = f"<= {GOAL_P99 * 1000:.0f}" if side == "tagrouted" else ""
                    rows.append([mode, side, s["n"], r["misses"], B.ms(s["p50"]), B.ms(s["p99"]),
                                 B.ms(s["max"]), goal])
                    counts = ", ".join(f"{k}: {v}" for k, v in r["counts"].items())
                    notes.append(f"- {mode} / {side}: after {args.flaps} flaps, {counts}"
                                 + (f"; {len(r['errors'])} error records" if "errors" in r else ""))
                    for e in r.get("errors", [])[:5]:
                        notes.append(f"  - {e}")
        finally:
            B.sweep_run_prefix()
    B.print_table(f"Tunnel up -> table {TABLE} route and rp_filter in place (ms, {args.flaps} flaps)",
                  ["flap", "who", "flaps measured", "missed (> 5 s)", "p50", "p99", "max", "goal p99"],
                  rows)
    print()
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
