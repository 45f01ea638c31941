"""The nftables backend beside the iptables-legacy one and beside the limits, in namespaces:

1. scale: a gateway with N services, first converge (cold and warm caches) and no-op reconcile
   in-process (what the daemon pays), per backend; beside them `nft -f` of the very commands
   tagrouted sends (the limit for one transaction), `nft -j list table` (one read: the floor of
   a no-op) and iptables-legacy-restore of the legacy ruleset;
2. repair: our table flushed, deleted, or the whole ruleset flushed, under a running daemon:
   from the kernel's commit of the tamper to the kernel's commit of the repair, both read off
   the NFNLGRP_NFTABLES events (NFT_MSG_NEWGEN carries the committing pid);
3. idle CPU of the daemon (10 services, resync 2 s), per backend: with nftables the resync timer
   no longer re-reads the firewall;
4. per-packet cost at N services with the matched service last: new UDP flows through a
   gateway namespace (each packet a new connection, so it walks the DNAT and the forward ACL),
   per backend, as packets per second and as the ratio.

Benchmarks print tables; they never fail on a number.

    sudo .venv/bin/python tests/bench/bench_nftables.py [--sizes 100,1000] [--repairs 200]
                                                        [--idle 60] [--packets 60000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B

BACKENDS = ("nftables", "iptables-legacy")
GOAL_REPAIR_P99 = 0.050


def with_backend(text: str, backend: str) -> str:
    return text.rstrip("\n") + f"\nfirewall: {{backend: {backend}}}\n"


# ---- 1. scale (Netns.call children) ----------------------------------------------------------

def inproc(config_path: str, run_dir: str, noops: int) -> dict[str, Any]:
    from tagrouted.core.config import load_config
    from tagrouted.kernel.converge import FIREWALL, Converger

    config = load_config(config_path)
    backend = config.firewall.backend
    out: dict[str, Any] = {}
    with Converger(run_dir) as conv:
        conv.backend(backend)  # the library is loaded; what follows is our own work
        t0 = time.perf_counter()
        res = conv.converge(config)
        out["first"] = time.perf_counter() - t0
        assert res.ok and res.changes, res.errors
        out["noop"] = []
        out["noop_firewall"] = []
        for _ in range(noops):
            t0 = time.perf_counter()
            res = conv.converge(config)
            out["noop"].append(time.perf_counter() - t0)
            assert res.ok and not res.changes, (res.errors, [c.message for c in res.changes[:3]])
            t0 = time.perf_counter()
            conv.converge(config, parts=frozenset({FIREWALL}), sweep_other_backend=False)
            out["noop_firewall"].append(time.perf_counter() - t0)
        conv.converge(None, config.tag)
        t0 = time.perf_counter()
        res = conv.converge(config)
        out["warm"] = time.perf_counter() - t0
        assert res.ok and res.changes, res.errors
        conv.converge(None, config.tag)
    return out


def nft_limit(script: str, trials: int) -> dict[str, list[float]]:
    """`nft -f` of the commands tagrouted sends, on an empty namespace, and one JSON read."""
    out: dict[str, list[float]] = {"load": [], "read": []}
    for _ in range(trials):
        subprocess.run(["nft", "delete", "table", "inet", "tagrouted"], capture_output=True)
        t0 = time.perf_counter()
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)
        out["load"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["nft", "-j", "list", "table", "inet", "tagrouted"], check=True, capture_output=True)
        out["read"].append(time.perf_counter() - t0)
    subprocess.run(["nft", "delete", "table", "inet", "tagrouted"], capture_output=True)
    return out


def legacy_limit(ruleset: str, trials: int) -> list[float]:
    out = []
    for _ in range(trials):
        subprocess.run(["sh", "-c", "iptables-legacy -t nat -F; iptables-legacy -t nat -X; "
                                    "iptables-legacy -F; iptables-legacy -X"], check=True)
        t0 = time.perf_counter()
        subprocess.run(["iptables-legacy-restore"], input=ruleset, text=True, check=True)
        out.append(time.perf_counter() - t0)
    subprocess.run(["sh", "-c", "iptables-legacy -t nat -F; iptables-legacy -t nat -X; "
                                "iptables-legacy -F; iptables-legacy -X"], check=True)
    return out


def creation_commands(config_text: str) -> str:
    from tagrouted.core.config import parse_config
    from tagrouted.core.desired import assumed_facts, desired_state
    from tagrouted.core.nft_rules import creation_script, nft_table

    config = parse_config(config_text, "bench.yaml")
    return creation_script(nft_table(desired_state(config, assumed_facts(config)).firewall)).text


def legacy_ruleset(config_text: str) -> str:
    from tagrouted.core.config import parse_config
    from tagrouted.core.desired import assumed_facts, desired_state
    from tagrouted.core.plan import iptables_blocks

    config = parse_config(config_text, "bench.yaml")
    lines = iptables_blocks(desired_state(config, assumed_facts(config)))
    v4 = lines[lines.index("# iptables-legacy-save") + 1:]
    if "# ip6tables-legacy-save" in v4:
        v4 = v4[:v4.index("# ip6tables-legacy-save")]
    return "\n".join(v4) + "\n"


def scale(n: int, trials: int, noops: int, tmp: Path) -> dict[str, Any]:
    text = B.gateway_config(n)
    res: dict[str, Any] = {"n": n}
    for backend in BACKENDS:
        config = tmp / f"scale-{n}-{backend}.yaml"
        config.write_text(with_backend(text, backend))
        ns, peer = B.gateway_host(f"nsc{n}{backend[:3]}")
        try:
            runs = [ns.call(inproc, str(config), str(tmp / f"run-{n}-{backend}-{i}"), noops, timeout=3600)
                    for i in range(trials)]
        finally:
            ns.delete()
            peer.delete()
        res[backend] = runs
    ns, peer = B.gateway_host(f"nsc{n}lim")
    try:
        res["nft -f"] = ns.call(nft_limit, creation_commands(text), trials * 3, timeout=3600)
        res["restore"] = ns.call(legacy_limit, legacy_ruleset(text), trials * 3, timeout=3600)
    finally:
        ns.delete()
        peer.delete()
    return res


def report_scale(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        n = r["n"]
        for backend in BACKENDS:
            runs = r[backend]
            for what, values in (("first converge (cold)", [x["first"] for x in runs]),
                                 ("first converge (warm, after down)", [x["warm"] for x in runs]),
                                 ("no-op reconcile (all parts)", [v for x in runs for v in x["noop"]]),
                                 ("no-op firewall part only", [v for x in runs for v in x["noop_firewall"]])):
                s = B.stats(values)
                rows.append([str(n), backend, what, str(s["n"]), B.ms(s["p50"]), B.ms(s["p99"])])
        for what, values in (("`nft -f` of the same commands (the limit)", r["nft -f"]["load"]),
                             ("`nft -j list table` (one read: the no-op floor)", r["nft -f"]["read"]),
                             ("iptables-legacy-restore of the legacy ruleset", r["restore"])):
            s = B.stats(values)
            rows.append([str(n), "-", what, str(s["n"]), B.ms(s["p50"]), B.ms(s["p99"])])
    B.print_table("Scale: gateway with N services, times in ms",
                  ["N", "backend", "what", "trials", "p50", "p99"], rows)


# ---- 2. repair latency ------------------------------------------------------------------------

NFNLGRP_NFTABLES, NETLINK_NETFILTER, NFT_MSG_NEWGEN = 7, 12, 15


def _newgens(data: bytes, now: float) -> list[tuple[float, int]]:
    """(now, committing thread id) of each NFT_MSG_NEWGEN in one datagram."""
    out = []
    off = 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if mtype == (10 << 8) | NFT_MSG_NEWGEN:
            a = off + 20
            pid = 0
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x3FFF == 2:  # NFTA_GEN_PROC_PID
                    pid = struct.unpack_from(">I", data, a + 4)[0]
                a += (alen + 3) & ~3
            out.append((now, pid))
        off += (length + 3) & ~3
    return out


def repairs(daemon_pid: int, command: str, trials: int) -> dict[str, Any]:
    """Run `command` `trials` times; each time, the seconds from its commit to the daemon's (the
    kernel names the committing thread: any thread of the daemon's). A reader thread blocked in
    recv timestamps each commit as it arrives."""
    import threading

    tids = {int(t) for t in os.listdir(f"/proc/{daemon_pid}/task")}
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
    sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
    seen: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready:
                data = sock.recv(1 << 20)
                got = _newgens(data, time.perf_counter())
                with lock:
                    seen.extend(got)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    times: list[float] = []
    missed = 0
    for _ in range(trials):
        with lock:
            seen.clear()
        subprocess.run(["sh", "-c", command], check=True, capture_output=True)
        deadline = time.perf_counter() + 2.0
        tamper = repair = None
        while time.perf_counter() < deadline:
            with lock:
                tamper = next((t for t, pid in seen if pid not in tids), None)
                repair = next((t for t, pid in seen if pid in tids and tamper is not None and t >= tamper), None)
            if repair is not None:
                break
            time.sleep(0.001)
        if tamper is None or repair is None:
            missed += 1
            continue
        times.append(repair - tamper)
        time.sleep(0.05)  # the daemon's pass settles
    stop.set()
    thread.join()
    sock.close()
    return {"times": times, "missed": missed}


REPAIR_KINDS = {
    "nft flush table inet tagrouted": "nft flush table inet tagrouted",
    "nft delete table inet tagrouted": "nft delete table inet tagrouted",
    "nft flush ruleset": "nft flush ruleset",
}


def repair_bench(trials: int, tmp: Path) -> dict[str, Any]:
    config = tmp / "repair.yaml"
    config.write_text(with_backend(B.gateway_config(10, resync="2s"), "nftables"))
    ns, peer = B.gateway_host("nrep")
    daemon = None
    try:
        daemon = B.Daemon(ns, config, tmp / "run-repair", tmp / "repair.log")
        daemon.wait_ready()
        return {kind: ns.call(repairs, daemon.pid, cmd, trials, timeout=3600)
                for kind, cmd in REPAIR_KINDS.items()}
    finally:
        B.teardown(daemon, ns, peer)


def report_repairs(r: dict[str, Any]) -> None:
    rows = []
    for kind, data in r.items():
        s = B.stats(data["times"])
        rows.append([kind, str(s["n"]), str(data["missed"]), B.ms(s["p50"]), B.ms(s["p99"]),
                     B.ms(max(data["times"]) if data["times"] else float("nan")),
                     f"p99 <= {GOAL_REPAIR_P99 * 1000:.0f}"])
    B.print_table("Repair by nf_tables event: tamper committed -> repair committed, ms",
                  ["tamper", "trials", "missed", "p50", "p99", "max", "goal"], rows)


# ---- 3. idle CPU ------------------------------------------------------------------------------

def idle_bench(seconds: float, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for backend in BACKENDS:
        config = tmp / f"idle-{backend}.yaml"
        config.write_text(with_backend(B.gateway_config(10, resync="2s"), backend))
        ns, peer = B.gateway_host(f"nidle{backend[:3]}")
        daemon = None
        try:
            daemon = B.Daemon(ns, config, tmp / f"run-idle-{backend}", tmp / f"idle-{backend}.log")
            daemon.wait_ready()
            time.sleep(2)  # past the start
            cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = daemon.cpu_seconds(), time.monotonic()
            out[backend] = {"cpu": (cpu1 - cpu0) / (t1 - t0), "rss": daemon.rss_bytes()}
        finally:
            B.teardown(daemon, ns, peer)
    return out


def report_idle(r: dict[str, Any], seconds: float) -> None:
    rows = [[backend, f"{d['cpu'] * 100:.2f} %", f"{d['rss'] / 1e6:.1f} MB"] for backend, d in r.items()]
    B.print_table(f"Idle daemon, 10 services, resync 2 s, {seconds:.0f} s (CPU of one core, RSS)",
                  ["backend", "CPU", "RSS"], rows)


# ---- 4. per-packet cost -----------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def blast(dst: str, dport: int, packets: int) -> float:
    """Send `packets` UDP packets to dst:dport, each from a new source port and address (a new
    connection each), from a raw socket; the seconds it took (the path runs in this context)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    daddr = socket.inet_aton(dst)
    frames = []
    for i in range(packets):
        src = socket.inet_aton(f"198.51.{100 + (i >> 16) % 50}.{(i >> 8 & 0xFF) % 250 + 1}")
        sport = 1024 + (i & 0xFF) + ((i >> 8) % 200) * 256 % 60000
        udp = struct.pack("!HHHH", sport, dport, 8 + 16, 0) + b"x" * 16
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0, src, daddr)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        frames.append(ip + udp)
    t0 = time.perf_counter()
    for frame in frames:
        sock.sendto(frame, (dst, 0))
    elapsed = time.perf_counter() - t0
    sock.close()
    return elapsed


def packet_bench(n: int, packets: int, trials: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    text = B.gateway_config(n, proto="udp")
    last = n - 1
    for backend in BACKENDS:
        config = tmp / f"pkt-{backend}.yaml"
        config.write_text(with_backend(text, backend))
        gw = B.Netns(f"npk{backend[:3]}")
        src = B.Netns(f"npk{backend[:3]}-src")
        sink = B.Netns(f"npk{backend[:3]}-sink")
        try:
            B.veth(gw, "eth0", src, "eth0")
            B.veth(gw, "eth1", sink, "eth0")
            gw.run("ip addr add 192.0.2.200/24 dev eth0")
            gw.run("ip addr add 192.168.200.1/24 dev eth1")
            src.run("ip addr add 192.0.2.1/24 dev eth0")
            src.run("ip route add default via 192.0.2.200")
            sink.run("ip addr add 192.168.200.2/24 dev eth0")
            sink.run("ip route add default via 192.168.200.1")
            # the sink takes every home address and drops it early (counted)
            sink.run("ip route add local 10.100.0.0/16 dev lo")
            sink.run("nft -f -", input="table ip sink {\n chain pre {\n type filter hook prerouting "
                                       "priority -300; policy accept;\n counter drop\n }\n}\n")
            gw.run("sysctl -qw net.netfilter.nf_conntrack_max=1000000", check=False)
            gw.run([*B.TAGROUTECTL, "--config", str(config), "--run-dir", str(tmp / f"run-pkt-{backend}"),
                    "apply"])
            times = []
            for _ in range(trials):
                gw.run("conntrack -F", check=False)
                times.append(src.call(blast, "192.0.2.200", 10000 + last, packets, timeout=600))
            got = sink.out("nft list chain ip sink pre")
            out[backend] = {"times": times, "sunk": got}
        finally:
            for ns in (src, sink, gw):
                ns.delete()
    return out


def report_packets(r: dict[str, Any], n: int, packets: int) -> None:
    rows = []
    pps = {}
    for backend, d in r.items():
        s = B.stats(d["times"])
        pps[backend] = packets / s["p50"]
        rows.append([backend, str(s["n"]), f"{packets / s['p50']:,.0f}",
                     f"{s['p50'] / packets * 1e6:.2f}"])
    ratio = pps["nftables"] / pps["iptables-legacy"] if pps.get("iptables-legacy") else float("nan")
    B.print_table(f"Per packet, {n} UDP services, the matched service last, every packet a new flow "
                  f"({packets} per trial)", ["backend", "trials", "new flows/s (p50)", "us per packet"], rows)
    print(f"\nnftables / iptables-legacy throughput: {ratio:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--repairs", type=int, default=200)
    ap.add_argument("--idle", type=float, default=60)
    ap.add_argument("--packets", type=int, default=60000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="scale,repair,idle,packets",
                    help="which of scale, repair, idle, packets to run")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.repairs, args.idle, args.packets = 2, 20, 10, 20000
    if not B.begin("bench_nftables"):
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="tgr-bench-nft-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            parts = set(args.parts.split(","))
            if "scale" in parts:
                report_scale([scale(n, args.trials, 10, tmp) for n in sizes])
            if "repair" in parts:
                report_repairs(repair_bench(args.repairs, tmp))
            if "idle" in parts:
                report_idle(idle_bench(args.idle, tmp), args.idle)
            if "packets" in parts:
                n = max(sizes)
                report_packets(packet_bench(n, args.packets, args.trials, tmp), n, args.packets)
        finally:
            B.sweep_run_prefix()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
