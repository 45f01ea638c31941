"""The one-command demo (run by ./demo): builds the seed's topology in network namespaces with a
real OpenVPN tunnel and tagrouted on each host (or, with --layout multipath, two public servers:
each public address answered `seen-from <client>`, and the tunnel each reply went back through),
shows a request through the public address,
the source address the home service saw, the path the packets took (tagrouted's own rule
counters and route decisions, hop by hop), tagrouted's journal, the control without it and a
repair, then tears everything down (also on Ctrl-C).

Owns only what the lab (lab.py) builds; never touches this machine's own network.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import (
    CLIENT4,
    CLIENT6,
    HOME_WAN4,
    PUBLIC4,
    PUBLIC6,
    PUBLIC_B4,
    PUBLIC_B6,
    SERVERS,
    TLS_PORT,
    UDP_PORT,
    Lab,
)

TTY = sys.stdout.isatty()
T0 = time.monotonic()
PATH_HOSTS = ("remote", "vpnserver", "vpnclient", "web")


def bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if TTY else text


def green(text: str) -> str:
    return f"\033[32m{text}\033[0m" if TTY else text


def red(text: str) -> str:
    return f"\033[31m{text}\033[0m" if TTY else text


def dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if TTY else text


def section(title: str) -> None:
    print(f"\n{bold('== ' + title)}", flush=True)


def progress(message: str) -> None:
    print(dim(f"  [{time.monotonic() - T0:5.1f}s]") + f" {message}", flush=True)


def verdict(seen: str | None, expected: str) -> str:
    if seen == expected:
        return green(f"seen-from {seen}   (the client's own address)")
    return red("no answer" if seen is None else f"seen-from {seen}   (NOT the client's address)")


def counters(lab: Lab, hosts: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """Packet counters of every rule of tagrouted's, IPv4, per (host, rule): the rules of the
    `inet tagrouted` table (nftables) or of the TAGROUTED-* chains (iptables-legacy)."""
    result: dict[tuple[str, str], int] = {}
    for host in hosts:
        ns = lab.ns(host)
        listing = ns.run("nft list table inet tagrouted", check=False)
        if listing.returncode == 0:
            # named counters (a path's requests and replies) hold their packets in their object
            named = {m.group(1): int(m.group(2)) for m in re.finditer(
                r"counter (\S+) \{\s*packets (\d+) bytes \d+", listing.stdout)}
            chain = ""
            for line in listing.stdout.splitlines():
                if m := re.match(r"\s*chain (\S+) \{", line):
                    chain = m.group(1)
                m = re.match(r"\s*(.*?) counter packets (\d+) bytes \d+(.*?)(?: comment \S+)?$", line)
                n = re.match(r'\s*(.*?) counter name "?([\w.-]+)"?(?: comment \S+)?$', line)
                if "ip6" in line:
                    continue
                if m:
                    result[(host, f"{chain}: {m.group(1)}{m.group(3)}")] = int(m.group(2))
                elif n and n.group(2) in named and not n.group(1).startswith("counter"):
                    result[(host, f"{chain}: {n.group(1)}")] = named[n.group(2)]
            continue
        for line in ns.out("iptables-legacy-save -c").splitlines():
            m = re.match(r"\[(\d+):\d+\] (-A TAGROUTED-\S+ .*)", line)
            if m:
                result[(host, m.group(2))] = int(m.group(1))
    return result


RULE_MEANING = [  # (a piece of the rule, nftables or iptables-legacy form; what it does)
    (" dnat ip", "DNAT to the home service, client address kept"),
    ("@gw_allow4 accept", "admitted: a configured service"),
    ("@admit4 accept", "admitted: a configured service"),
    ("established,related", "the connection's other packets"),
    ('iifname "tun0" ip dscp set', "out of the tunnel: stamped DSCP 42"),
    ("ip dscp 0x2a meta mark set", "tagged reply from the LAN: fwmark 42 -> table 42 -> tun0"),
    ('oifname "tun0" ip dscp set cs0', "into the tunnel: DSCP cleared"),
    ("ct mark set", "tagged request: the connection remembers mark 42"),
    ("ct mark & 0x000000ff == 0x0000002a", "reply: mark 42 restored -> table 42"),
    ("meta mark & 0x000000ff == 0x0000002a ip dscp set", "reply stamped DSCP 42 for the VPN client"),
    ('iifname "tun0" oifname "eth0" accept', "tunnel -> uplink"),
    ('iifname "eth0" oifname "tun0" accept', "uplink -> tunnel"),
    ("-j DNAT", "DNAT to the home service, client address kept"),
    ("--dport", "admitted: a configured service"),
    ("RELATED,ESTABLISHED", "the connection's other packets"),
    ("-i tun0 -j DSCP", "out of the tunnel: stamped DSCP 42"),
    ("-j MARK", "tagged reply from the LAN: fwmark 42 -> table 42 -> tun0"),
    ("-o tun0 -j DSCP", "into the tunnel: DSCP cleared"),
    ("CONNMARK --set", "tagged request: the connection remembers mark 42"),
    ("--restore-mark", "reply: mark 42 restored -> table 42"),
    ("--mark 0x2a/0xff -j DSCP", "reply stamped DSCP 42 for the VPN client"),
    ("-i tun0 -o eth0 -j ACCEPT", "tunnel -> uplink"),
    ("-i eth0 -o tun0 -j ACCEPT", "uplink -> tunnel"),
]


def meaning(rule: str) -> str:
    return next((text for key, text in RULE_MEANING if key in rule), "")


def show_path(lab: Lab) -> None:
    hosts = tuple(h for h in PATH_HOSTS if h in lab.configs)
    before = counters(lab, hosts)
    seen = lab.request_tcp(PUBLIC4)
    after = counters(lab, hosts)
    print(f"  One more TLS request to {PUBLIC4}:{TLS_PORT} -> {verdict(seen, CLIENT4)}")
    print("  Rules of tagrouted's that this request's packets went through (IPv4), by host:")
    for host in hosts:
        ns = lab.ns(host)
        print(f"    {bold(host)} {dim('(namespace ' + ns.name + ')')}")
        for (h, rule), count in after.items():
            delta = count - before.get((h, rule), 0)
            if h == host and delta > 0:
                print(f"      {delta:3d} pkts  {rule}")
                if meaning(rule):
                    print(f"                {dim('^ ' + meaning(rule))}")
    print("  Route decisions for the reply to the client:")
    web, vc = lab.web, lab.vpnclient
    s4 = lab.service4
    route_cmds = [(web, f"ip -4 route get {CLIENT4} mark 42", "tagged reply"),
                  (web, f"ip -4 route get {CLIENT4}", "the same reply untagged: the ISP box")]
    if vc is not web:
        route_cmds.insert(1, (vc, f"ip -4 route get {CLIENT4} from {s4} iif eth0 mark 42",
                              "at the VPN client: back into the tunnel"))
    for ns, cmd, why in route_cmds:
        out = ns.out(cmd).splitlines()[0].strip()
        host = "vpnclient" if ns is vc else "web"
        print(f"    {host:9s} $ {cmd}\n              {out}   {dim('<- ' + why)}")
    entries = [line for line in web.out(["conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(TLS_PORT)]).splitlines()
               if "mark=42" in line]
    if entries:
        print("  The connection on the service host (conntrack), carrying the tag:")
        print(f"    {entries[-1].strip()}")


def strip_date(line: str) -> str:
    return re.sub(r"^\d{4}-\d\d-\d\d ", "", line)


def show_journal(lab: Lab) -> None:
    for host in lab.configs:
        lines = [strip_date(line) for line in lab.journal(host)]
        lines = [line for line in lines if "nf_tables variant" not in line]
        print(f"  {bold(host)} ({lab.examples[host]}):")
        for line in lines:
            print(f"    {line}")


def through(lab: Lab, ask: Callable[[], str | None]) -> tuple[str | None, str]:
    """multipath: ask once; what the service saw and which tunnel its reply left through."""
    before = lab.tunnel_replies()
    seen = ask()
    after = lab.tunnel_replies()
    used = [tun for tun in after if after[tun] > before.get(tun, 0)]
    names = {tun: what for _, _, tun, what in SERVERS.values()}
    if len(used) == 1:
        return seen, f"reply back through {used[0]} ({names[used[0]]})"
    return seen, "reply through " + (", ".join(used) if used else "no tunnel")


def run_multipath(lab: Lab) -> None:
    """The multipath part of the demo: each public address, the tunnel of each reply, the
    paths in status, and one tunnel down."""
    section("Requests from the Internet client to each public address")
    print("  (the home service answers each with the source address it saw; the VPN client's "
          "counters show the tunnel the reply left through)")
    for path, (public4, public6, tun, what) in SERVERS.items():
        print(f"  {bold(path)}: {what}, {tun} at home")
        for public, client in ((public4, CLIENT4), (public6, CLIENT6)):
            shown = f"[{public}]" if ":" in public else public
            for proto, port, ask in (("TLS", TLS_PORT, lab.request_tcp), ("UDP", UDP_PORT, lab.request_udp)):
                seen, way = through(lab, lambda ask=ask, public=public: ask(public))
                print(f"    {proto} {f'{shown}:{port}':<24} -> {verdict(seen, client)}   {dim(way)}")

    section("tagroutectl status on the VPN client and on the web service: one line per path")
    for host in ("vpnclient", "web"):
        if lab.manager == "tagrouted":
            lab.fresh_status(host)  # its counters are read on timer passes
        out = lab.tagroutectl(host, "status").stdout.splitlines()
        print(f"  {bold(host)}:")
        start = next((i for i, line in enumerate(out) if line == "paths:"), len(out))
        for line in out[start:]:
            print(f"    {line}")

    if lab.manager == "tagrouted":
        section("Server B's tunnel goes down (its WireGuard client ends)")
        lab.stop_tunnel("server-b")
        leaked = lab.leaked()
        for public, client in ((PUBLIC4, CLIENT4), (PUBLIC_B4, CLIENT4)):
            seen = lab.request_tcp(public, timeout=2.0)
            print(f"  TLS {public}:{TLS_PORT} -> {verdict(seen, client)}")
        lab.late_reply("server-b")
        table = lab.vpnclient.out("ip -4 route show table 43").strip().splitlines()
        print(f"  table 43 on the VPN client: {table[0] if table else '(empty)'}")
        print(f"  replies of server B's path that left through the home ISP: {lab.leaked() - leaked}   "
              f"{dim('(fails closed: its own unreachable fallback)')}")
        t0 = time.monotonic()
        lab.start_tunnel("server-b", wait=False)
        lab.wait_path(timeout=40)
        print(f"  wg0 back: TLS {PUBLIC_B4}:{TLS_PORT} -> {verdict(lab.request_tcp(PUBLIC_B4), CLIENT4)}   "
              f"{dim(f'(after {time.monotonic() - t0:.1f} s)')}")

    section("tagrouted's journal on each host")
    show_journal(lab)


def run(args: argparse.Namespace) -> int:
    shape = (f"the seed's topology in network namespaces, real {args.variant}" if args.layout != "multipath"
             else "two public servers in network namespaces (A: OpenVPN, B: a WireGuard VPS)")
    print(bold("tagrouted demo") + f": {shape}, tagrouted on every host of the path.\nNothing here touches "
          "this machine's own network; everything is removed at the end (also on Ctrl-C).")
    section("Building the lab")
    with Lab(variant=args.variant, layout=args.layout, progress=progress, backend=args.backend) as lab:
        print(f"  firewall backend: {args.backend or 'the default (auto: nftables unless iptables is legacy)'}")
        print(f"  built in {lab.timings['build']:.1f} s "
              f"({'tagrouted daemon' if lab.manager == 'tagrouted' else 'tagroutectl apply: the daemon is not installed'} "
              "on each host)")
        section("The hosts")
        rows = [("client", f"{CLIENT4}, {CLIENT6}", "an Internet client"),
                ("isp", "198.51.100.1, 192.0.2.1, 203.0.113.1", "the ISP core router"),
                ("remote", f"{PUBLIC4}, {PUBLIC6}", "the rented public server"),
                ("homerouter", f"{HOME_WAN4} -> 192.168.100.1", "the home ISP box (MASQUERADE)")]
        if lab.layout == "multipath":
            rows[2] = ("remote", f"{PUBLIC4}, {PUBLIC6}", "server A: the rented public server")
            rows[3:3] = [("vpnserver", "192.168.200.2 (behind remote)", "server A's OpenVPN server"),
                         ("vps", f"{PUBLIC_B4}, {PUBLIC_B6}", "server B: a VPS, gateway + WireGuard")]
            rows += [("vpnclient", "192.168.100.2", "VPN client: tun0 to A, wg0 to B"),
                     ("web", "192.168.100.3, fd00:100::3", "the home service (default via the ISP box)")]
        elif lab.layout == "seed":
            rows[3:3] = [("vpnserver", "192.168.200.2 (behind remote)", f"{args.variant} server")]
            rows += [("vpnclient", "192.168.100.2", f"{args.variant} client, home LAN"),
                     ("web", "192.168.100.3, fd00:100::3", "the home service (default via the ISP box)")]
        else:
            rows[2] = ("remote", f"{PUBLIC4}, {PUBLIC6}", f"a VPS: gateway + {args.variant} server")
            rows += [("vpnclient", "192.168.100.2, fd00:100::2", f"home router: {args.variant} client + the service")]
        for name, addrs, what in rows:
            cfg = f"tagrouted: {lab.examples[name]}" if name in lab.examples else ""
            print(f"  {name:11s} {addrs:40s} {what:45s} {dim(cfg)}")

        if lab.layout == "multipath":
            run_multipath(lab)
            _pause_and_tear_down(lab, args)
            return 0

        section("Requests from the Internet client to the public addresses")
        print("  (the home service answers each with the source address it saw)")
        for public, client in ((PUBLIC4, CLIENT4), (PUBLIC6, CLIENT6)):
            shown = f"[{public}]" if ":" in public else public
            print(f"  TLS {shown}:{TLS_PORT:<5d} -> {verdict(lab.request_tcp(public), client)}")
            print(f"  UDP {shown}:{UDP_PORT:<5d} -> {verdict(lab.request_udp(public), client)}")

        section("The path")
        show_path(lab)

        section("tagrouted's journal on each host")
        show_journal(lab)

        if lab.manager == "tagrouted":
            service_host = "web" if lab.layout == "seed" else "vpnclient"
            section("The control: tagrouted stopped on the service host and its state removed")
            lab.stop_tagrouted([service_host], remove_state=True)
            print(f"  TLS {PUBLIC4}:{TLS_PORT} -> {verdict(lab.request_tcp(PUBLIC4, timeout=2.0), CLIENT4)}"
                  f"   {dim('(the reply left through the home ISP box)')}")
            lab.start_tagrouted([service_host])
            waited = lab.wait_path()
            print(f"  tagrouted started again: TLS {PUBLIC4}:{TLS_PORT} -> "
                  f"{verdict(lab.request_tcp(PUBLIC4), CLIENT4)}   {dim(f'(after {waited:.1f} s)')}")

            flush = ("iptables-legacy -t mangle -F" if lab.backend == "iptables-legacy"
                     else "nft flush table inet tagrouted")
            section(f"Someone flushes tagrouted's rules on the service host: {flush}")
            mark = len(lab.journal(service_host))
            lab.ns(service_host).run(flush)
            print(f"  $ {flush}")
            t0 = time.monotonic()
            lab.wait_path(timeout=30)
            print(f"  TLS {PUBLIC4}:{TLS_PORT} -> {verdict(lab.request_tcp(PUBLIC4), CLIENT4)}   "
                  f"{dim(f'(working again after {time.monotonic() - t0:.1f} s)')}")
            for line in lab.journal(service_host)[mark:]:
                print(f"    {strip_date(line)}")

        _pause_and_tear_down(lab, args)
    progress("done: nothing of the lab is left")
    return 0


def _pause_and_tear_down(lab: Lab, args: argparse.Namespace) -> None:
    """(inside the lab's `with`) --pause, then say what the teardown does."""
    if args.pause:
        section("Paused")
        look = "iptables-legacy-save" if lab.backend == "iptables-legacy" else "nft list ruleset"
        print(f"  Explore with e.g.: ip netns exec {lab.web.name} {look}")
        print("  Namespaces: " + " ".join(ns.name for ns in lab.namespaces))
        input("  Press Enter to tear the lab down... ")
    section("Tearing down")
    progress("stopping tagrouted, the VPN and the service; removing the namespaces")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description="tagrouted end to end, in network namespaces")
    p.add_argument("--variant", choices=["openvpn", "wireguard"], default="openvpn")
    p.add_argument("--layout", choices=["seed", "combined", "multipath"], default="seed",
                   help="combined: a VPS (gateway + VPN server) and a home router (VPN client + service); "
                        "multipath: two public servers (A: OpenVPN, B: a WireGuard VPS), each reply back "
                        "through the tunnel its request came through")
    p.add_argument("--backend", choices=["nftables", "iptables-legacy"], default=None,
                   help="the firewall backend on every host (default: the example files' auto)")
    p.add_argument("--pause", action="store_true", help="wait for Enter before tearing down")
    args = p.parse_args(argv)
    if args.layout == "multipath" and args.variant != "openvpn":
        p.error("--layout multipath sets the tunnels itself (server A: OpenVPN, server B: WireGuard)")
    # Ctrl-C tears down even when started from a shell that made us ignore SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the lab was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
