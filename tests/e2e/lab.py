"""The end-to-end lab: the seed's hosts as network namespaces, a real OpenVPN (or WireGuard)
tunnel between them, the peer-echo service at home, and tagrouted (or the seed's recipe) on the
hosts of the path. Used by the e2e tests, the demo and the benchmarks.

Owns: every namespace it builds (nslab prefix), the processes it starts in them (ended by PID),
a temporary directory with the PKI copy, configs, run directories and logs. Never touches the
root namespace: no link leads there, every command runs through `ip netns exec`, `nsenter` into
a process of ours, or a forked child (Netns.call). Everything is torn down on exit, also on an
exception or Ctrl-C (and at interpreter exit, as a last resort).

Seed layout (layout="seed"):

    client 198.51.100.10 ── isp ── remote 192.0.2.200 (eth0) ── br0 192.168.200.1 ── vpnserver .2
                             │                                                          ║ tun0
                             └── homerouter 203.0.113.2 (wan0, MASQUERADE) ── br0 192.168.100.1
                                      ├── vpnclient 192.168.100.2 (tun0) ═══════════════╝
                                      ├── web 192.168.100.3   (the service; default via homerouter)
                                      └── lanhost 192.168.100.4 (listens too, but is no service)

IPv6 mirrors it: client 2001:db8:c::10, remote 2001:db8:a::200, br0 fd00:200::/64,
home fd00:100::/64 (homerouter ::1, vpnclient ::2, web ::3, lanhost ::4).

Combined layout (layout="combined"): the remote is a VPS running the VPN server itself
(vps.yaml; there is no vpnserver namespace and no br0), and the VPN client namespace is the home
router of home-router.yaml (vpn-client + service, 192.168.100.2, the service runs there; `web`
is that namespace). The ISP's NAT box stays upstream as `homerouter`. vps.yaml and
home-router.yaml are a pair (services at 192.168.100.2 / fd00:100::2). Every example file
serves the lab unchanged; the lab's copy adds only `metrics.listen` (scraped with `metrics()`).

Multipath layout (layout="multipath", issue 14: two public servers, each reply back through the
tunnel its request came through): the seed's hosts with server A (remote + vpnserver, OpenVPN,
tun0) plus server B, a VPS that is gateway and WireGuard server in one:

    client ── isp ── remote 192.0.2.200 ── vpnserver (OpenVPN)      ║ tun0  (path server-a)
               ├──── vps 198.18.0.200, 2001:db8:d::200 (WireGuard, udp 51820) ║ wg0 (path server-b)
               └──── homerouter ── br0 ── vpnclient (tun0 + wg0), web, lanhost

Configs: remote-server.yaml and vpn-server.yaml (server A, unchanged), vps-wireguard.yaml,
vpn-client-multipath.yaml, web-service-multipath.yaml. The lab's own counters (an nft table
`inet lab`, which no role touches): on the vpn client, the web service's packets leaving through
each tunnel (tunnel_replies); on the home ISP box, its packets leaving through the WAN (leaked).

Tunnel: OpenVPN (TLS, tls-auth, `mode server`, client-config-dir with `iroute`, `route`/`push`)
on udp 1194, or WireGuard through wireguard-go on the same port; the client dials
192.0.2.200:1194 from behind the home MASQUERADE and the remote DNATs it to the VPN server.

Options for the per-service policy tests, each off by default (today's lab): `extra_clients`
more Internet client addresses (198.51.100.11.., 2001:db8:c::11..: a second source to allow or
not, and addresses the service host has never seen, whose path MTU nobody has learned);
`tunnel_mtu` on both tunnel ends, with `tunnel_clamps=False` turning off OpenVPN's own MSS
clamping (`mssfix 0`; WireGuard has none); `pmtu_blackhole` makes the ISP drop ICMP
"fragmentation needed" / "packet too big", as a broken path does. The service also answers plain
TCP exchanges (BULK_PORTS: a length, that many bytes, as many back).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Literal

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent)):  # peer_echo, nslab: also when run as a script
    if _p not in sys.path:
        sys.path.insert(0, _p)

import peer_echo  # noqa: E402 - found through the path set just above
from daemon_harness import scrape  # noqa: E402
from nslab import Netns, veth, wait_for  # noqa: E402

REPO = HERE.parents[1]
EXAMPLES = REPO / "etc" / "tagrouted" / "examples"
VENV_BIN = REPO / ".venv" / "bin"
RECIPE = REPO / "tests" / "bench" / "recipe_up.sh"
PEER_ECHO = HERE / "peer_echo.py"

CLIENT4, CLIENT6 = "198.51.100.10", "2001:db8:c::10"
PUBLIC4, PUBLIC6 = "192.0.2.200", "2001:db8:a::200"
HOME_WAN4, HOME_WAN6 = "203.0.113.2", "2001:db8:b::2"
LANHOST4, LANHOST6 = "192.168.100.4", "fd00:100::4"
VPN_PORT = 1194
TLS_PORT, UDP_PORT = 443, 7000          # configured in the example files
METRICS_LISTEN = "127.0.0.1:9542"       # added to each host's copy of its example
SPARE_TLS_PORT, SPARE_UDP_PORT = 8443, 7001   # the service listens here too; not configured
BULK_PORTS = (9000, 9001, 9002)               # plain-TCP exchanges; configured by the tests that use them


def client_address(family: int, i: int) -> str:
    """The i-th extra Internet client address (i >= 1; see Lab(extra_clients=))."""
    return f"198.51.100.{10 + i}" if family == 4 else f"2001:db8:c::{10 + i}"

# multipath: server B, a VPS with WireGuard on its own public addresses
PUBLIC_B4, PUBLIC_B6 = "198.18.0.200", "2001:db8:d::200"
WG_PORT = 51820
# path name -> (public IPv4, public IPv6, the tunnel at home, what carries it), as the examples say
SERVERS = {"server-a": (PUBLIC4, PUBLIC6, "tun0", "OpenVPN to server A"),
           "server-b": (PUBLIC_B4, PUBLIC_B6, "wg0", "WireGuard to server B, a VPS")}
PATH_MARKS = {"server-a": 42, "server-b": 43}  # the marks the multipath examples give each path
SERVICE4, SERVICE6 = "192.168.100.3", "fd00:100::3"

Variant = Literal["openvpn", "wireguard"]
Layout = Literal["seed", "combined", "multipath"]
Manager = Literal["tagrouted", "apply", "recipe"]

_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


# ---- PKI: once per process ------------------------------------------------------------------
class Pki:
    """A CA, the OpenVPN server and client certificates, the web service's certificate (EC P-256,
    fast) and OpenVPN's tls-auth key, made with openssl at test time."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
        self._openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=tagrouted-lab-ca",
                      "-days", "30", "-out", "ca.crt",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self._leaf("server", "serverAuth", "DNS:server")
        self._leaf("client", "clientAuth", "DNS:client")
        self._leaf("web", "serverAuth", "DNS:web,IP:192.168.100.3,IP:fd00:100::3,IP:192.0.2.200")
        subprocess.run(["openvpn", "--genkey", "secret", str(directory / "ta.key")],
                       check=True, capture_output=True)

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True)

    def _leaf(self, name: str, usage: str, san: str) -> None:
        ext = self.dir / f"{name}.ext"
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
                       f"extendedKeyUsage={usage}\nsubjectAltName={san}\n")
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        self._openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-CAcreateserial", "-days", "30", "-extfile", ext.name, "-out", f"{name}.crt")

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


_pki: Pki | None = None


def pki() -> Pki:
    global _pki
    if _pki is None:
        directory = Path(tempfile.mkdtemp(prefix="tagrouted-pki-"))
        atexit.register(shutil.rmtree, directory, True)
        _pki = Pki(directory)
    return _pki


def daemon_available() -> bool:
    """Whether the installed tagrouted has its daemon (the console script alone is not enough)."""
    exe = VENV_BIN / "tagrouted"
    if not exe.exists():
        return False
    res = subprocess.run([str(VENV_BIN / "python"), "-c", "import tagrouted.daemon.main"],
                         capture_output=True)
    return res.returncode == 0


# ---- the lab ---------------------------------------------------------------------------------
class Lab:
    """Lab(variant, layout, manager) as a context manager: builds, yields itself, tears down.

    manager: "tagrouted" runs the daemon on every host of the path ("apply" if it is not
    installed yet), "apply" converges once with `tagroutectl apply`, "recipe" runs the seed's
    one-shot commands (tests/bench/recipe_up.sh). keep_dir (or TAGROUTED_LAB_KEEP=1) keeps the
    directory with the configs and logs after teardown, for a look after a failure. backend
    names the firewall backend of every host (None: the examples' default, auto)."""

    def __init__(self, variant: Variant = "openvpn", layout: Layout = "seed",
                 manager: Manager = "tagrouted",
                 progress: Callable[[str], None] | None = None,
                 keep_dir: bool = bool(os.environ.get("TAGROUTED_LAB_KEEP")),
                 backend: str | None = None, extra_clients: int = 0, tunnel_mtu: int | None = None,
                 tunnel_clamps: bool = True, pmtu_blackhole: bool = False) -> None:
        assert variant in ("openvpn", "wireguard") and layout in ("seed", "combined", "multipath")
        assert manager in ("tagrouted", "apply", "recipe")
        # multipath: server A is the seed's OpenVPN pair, server B WireGuard; no recipe for it
        assert layout != "multipath" or (variant == "openvpn" and manager != "recipe")
        if manager == "tagrouted" and not daemon_available():
            manager = "apply"
        self.variant, self.layout, self.manager = variant, layout, manager
        # the firewall backend every host's config names; None: the example files unchanged
        # (firewall.backend auto, which is nftables on a host whose iptables is iptables-nft)
        self.backend = backend
        assert 0 <= extra_clients <= 200
        self.extra_clients = extra_clients
        self.tunnel_mtu = tunnel_mtu              # None: each tunnel's default MTU
        self.tunnel_clamps = tunnel_clamps        # False: OpenVPN's mssfix off (WireGuard has none)
        self.pmtu_blackhole = pmtu_blackhole      # the ISP drops ICMP fragmentation-needed
        self.progress = progress
        self.keep_dir = keep_dir
        self.namespaces: list[Netns] = []
        self.timings: dict[str, float] = {}
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.vpn_server_proc: subprocess.Popen[bytes] | None = None
        self.vpn_client_proc: subprocess.Popen[bytes] | None = None
        self.wg_b_server_proc: subprocess.Popen[bytes] | None = None  # multipath: server B
        self.wg_b_client_proc: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []
        self.tmp = Path()  # made by build(): a lab never entered leaves nothing behind
        combined = layout == "combined"
        self.service4 = "192.168.100.2" if combined else "192.168.100.3"
        self.service6 = "fd00:100::2" if combined else "fd00:100::3"
        self.tunnel_server4 = "10.8.0.1" if variant == "openvpn" else "10.9.0.1"
        # host -> example file it runs with (the daemon's config is the lab's copy)
        self.examples: dict[str, str] = (
            {"remote": "vps.yaml", "vpnclient": "home-router.yaml"} if combined else
            {"remote": "remote-server.yaml", "vpnserver": "vpn-server.yaml", "vps": "vps-wireguard.yaml",
             "vpnclient": "vpn-client-multipath.yaml", "web": "web-service-multipath.yaml"}
            if layout == "multipath" else
            {"remote": "remote-server.yaml", "vpnserver": "vpn-server.yaml",
             "vpnclient": "vpn-client.yaml", "web": "web-service.yaml"})
        self.configs: dict[str, Path] = {}
        self.run_dirs: dict[str, Path] = {}

    # ---- context manager ---------------------------------------------------------------------
    def __enter__(self) -> Lab:
        _open_labs.add(self)
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    # ---- build -------------------------------------------------------------------------------
    def build(self) -> None:
        t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="tagrouted-lab-"))
        self.say("making the PKI (CA, server, client, web certificates; tls-auth key)")
        self.pki = pki()
        self.say(f"building the {self.layout} topology as network namespaces")
        self._topology()
        self._write_configs()
        self.say("starting the peer-echo service (TLS 443, UDP 7000) on the web host")
        self._start_services()
        self.say(f"starting the {self.variant} server")
        self.start_vpn_server()
        if self.manager == "recipe":
            self.say("applying the seed's recipe on the remote server, VPN server and web host")
            self.recipe_up(before_tunnel=True)
        elif self.manager == "tagrouted":
            self.say("starting tagrouted on " + ", ".join(self.configs))
            self.start_tagrouted()
        else:
            self.say("tagroutectl apply on " + ", ".join(self.configs))
            self.apply_tagrouted()
        t_vpn = time.monotonic()
        self.say(f"starting the {self.variant} client behind the home router's NAT")
        self.start_vpn_client()
        self.timings["tunnel_up"] = time.monotonic() - t_vpn
        if self.manager == "recipe":
            self.say("applying the seed's recipe on the VPN client (its OpenVPN up hook)")
            self.recipe_up(before_tunnel=False)
        elif self.manager == "apply":
            self.apply_tagrouted(["vpnclient"])  # the tunnel exists now: its routes and rp_filter
        self.say("waiting for the first answer through the public address")
        self.wait_path()
        self.timings["build"] = time.monotonic() - t0

    def _host(self, name: str) -> Netns:
        ns = Netns(name)
        self.namespaces.append(ns)
        # Kernel defaults, whatever the root namespace was hardened to (new namespaces copy its
        # IPv4 all/default values); no DAD, so addresses are usable at once.
        ns.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
        return ns

    @staticmethod
    def _addr(ns: Netns, dev: str, *addrs: str) -> None:
        for a in addrs:
            ns.run(["ip", "-6" if ":" in a else "-4", "addr", "add", a, "dev", dev]
                   + (["nodad"] if ":" in a else []))

    @staticmethod
    def _default(ns: Netns, gw4: str, gw6: str) -> None:
        ns.run(["ip", "-4", "route", "add", "default", "via", gw4])
        ns.run(["ip", "-6", "route", "add", "default", "via", gw6])

    def _bridge(self, ns: Netns) -> None:
        ns.run("ip link add br0 type bridge")
        ns.run("ip link set br0 up")
        # a plain switch: bridged frames do not go through this host's iptables (br_netfilter)
        for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
            ns.run(["sysctl", "-qw", f"{key}=0"], check=False)

    def _topology(self) -> None:
        combined = self.layout == "combined"
        self.client = c = self._host("client")
        self.isp = isp = self._host("isp")
        self.remote = r = self._host("remote")
        self.homerouter = h = self._host("homerouter")
        self.vpnclient = vc = self._host("vpnclient")
        self.lanhost = lan = self._host("lanhost")
        if combined:
            self.vpnserver, self.web = r, vc
        else:
            self.vpnserver = self._host("vpnserver")
            self.web = self._host("web")
        # the Internet: the ISP core joins the client, the remote server and the home WAN
        veth(c, "eth0", isp, "c0")
        veth(isp, "r0", r, "eth0")
        veth(isp, "h0", h, "wan0")
        self._addr(c, "eth0", f"{CLIENT4}/24", f"{CLIENT6}/64")
        for i in range(1, self.extra_clients + 1):
            self._addr(c, "eth0", f"{client_address(4, i)}/24", f"{client_address(6, i)}/64")
        self._default(c, "198.51.100.1", "2001:db8:c::1")
        self._addr(isp, "c0", "198.51.100.1/24", "2001:db8:c::1/64")
        self._addr(isp, "r0", "192.0.2.1/24", "2001:db8:a::1/64")
        self._addr(isp, "h0", "203.0.113.1/24", "2001:db8:b::1/64")
        isp.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
        if self.layout == "multipath":  # server B: a VPS on its own link of the ISP core
            self.vps = vps = self._host("vps")
            veth(isp, "v0", vps, "eth0")
            self._addr(isp, "v0", "198.18.0.1/24", "2001:db8:d::1/64")
            self._addr(vps, "eth0", f"{PUBLIC_B4}/24", f"{PUBLIC_B6}/64")
            self._default(vps, "198.18.0.1", "2001:db8:d::1")
        if self.pmtu_blackhole:
            # a PMTU black hole: the signal that a packet was too big never reaches its sender
            isp.run("iptables-legacy -A FORWARD -p icmp --icmp-type fragmentation-needed -j DROP")
            isp.run("ip6tables-legacy -A FORWARD -p ipv6-icmp --icmpv6-type packet-too-big -j DROP")
        # the remote public server (its forwarding is the gateway role's business)
        self._addr(r, "eth0", f"{PUBLIC4}/24", f"{PUBLIC6}/64")
        self._default(r, "192.0.2.1", "2001:db8:a::1")
        if not combined:
            self._bridge(r)
            self._addr(r, "br0", "192.168.200.1/24", "fd00:200::1/64")
            veth(r, "vs0", self.vpnserver, "eth0")
            r.run("ip link set vs0 master br0")
            self._addr(self.vpnserver, "eth0", "192.168.200.2/24", "fd00:200::2/64")
            self._default(self.vpnserver, "192.168.200.1", "fd00:200::1")
        # the home ISP box: NAT out its WAN, like a real one; the LAN is its bridge
        self._addr(h, "wan0", f"{HOME_WAN4}/24", f"{HOME_WAN6}/64")
        self._default(h, "203.0.113.1", "2001:db8:b::1")
        self._bridge(h)
        self._addr(h, "br0", "192.168.100.1/24", "fd00:100::1/64")
        h.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
        h.run("iptables-legacy -t nat -A POSTROUTING -o wan0 -j MASQUERADE")
        lan_hosts = [(vc, "p-vc", "192.168.100.2", "fd00:100::2"), (lan, "p-lan", LANHOST4, LANHOST6)]
        if not combined:
            lan_hosts.append((self.web, "p-web", "192.168.100.3", "fd00:100::3"))
        for ns, port, a4, a6 in lan_hosts:
            veth(h, port, ns, "eth0")
            h.run(f"ip link set {port} master br0")
            self._addr(ns, "eth0", f"{a4}/24", f"{a6}/64")
            # every home host's default is the ISP box: untagged replies leak there
            self._default(ns, "192.168.100.1", "fd00:100::1")
        if self.layout == "multipath":
            self._lab_counters()

    def _lab_counters(self) -> None:
        """The lab's own nft table `inet lab` (no role touches it): the web service's packets
        leaving the VPN client through each tunnel, and leaving home through the ISP box's WAN."""
        tunnels = [tun for _, _, tun, _ in SERVERS.values()]
        rules = "".join(f'    oifname "{tun}" ip saddr {SERVICE4} counter name "{tun}"\n'
                        f'    oifname "{tun}" ip6 saddr {SERVICE6} counter name "{tun}"\n' for tun in tunnels)
        self.vpnclient.run("nft -f -", input="table inet lab {\n"
                           + "".join(f'  counter {tun} {{ }}\n' for tun in tunnels)
                           + "  chain through_tunnels {\n    type filter hook postrouting priority 200; policy accept;\n"
                           + rules + "  }\n}\n")
        self.homerouter.run("nft -f -", input=(
            "table inet lab {\n  counter leaked { }\n  chain through_wan {\n"
            "    type filter hook forward priority 200; policy accept;\n"
            f'    oifname "wan0" ip saddr {SERVICE4} counter name "leaked"\n'
            f'    oifname "wan0" ip6 saddr {SERVICE6} counter name "leaked"\n  }}\n}}\n'))

    @staticmethod
    def _nft_counters(ns: Netns) -> dict[str, int]:
        doc = json.loads(ns.out("nft -j list counters table inet lab"))
        return {c["counter"]["name"]: int(c["counter"]["packets"])
                for c in doc.get("nftables", []) if "counter" in c}

    def tunnel_replies(self) -> dict[str, int]:
        """multipath: packets from the web service that left the VPN client, per tunnel."""
        return self._nft_counters(self.vpnclient)

    def late_reply(self, path: str, count: int = 3) -> None:
        """multipath: what a reply of `path`'s connections looks like to the home network:
        datagrams from the web service to the client carrying the path's mark there (so its
        rule, its table and its DSCP stamp), both families; nothing answers them."""
        for client in (CLIENT4, CLIENT6):
            self.web.call(peer_echo.send_marked, client, 9, PATH_MARKS[path], count)

    def leaked(self) -> int:
        """multipath: packets from the web service that left home through the ISP box's WAN."""
        return self._nft_counters(self.homerouter)["leaked"]

    def _write_configs(self) -> None:
        for d in ("etc", "run", "log", "vpn"):
            (self.tmp / d).mkdir()
        for host, example in self.examples.items():
            # Each host is a namespace of its own: the same loopback port serves on every one.
            text = (EXAMPLES / example).read_text() + f'metrics: {{listen: "{METRICS_LISTEN}"}}\n'
            if self.backend:
                text = text.rstrip("\n") + f"\nfirewall: {{backend: {self.backend}}}\n"
            path = self.tmp / "etc" / f"{host}.yaml"
            path.write_text(text)
            self.configs[host] = path
            self.run_dirs[host] = self.tmp / "run" / host

    def ns(self, host: str) -> Netns:
        ns = getattr(self, host)
        assert isinstance(ns, Netns)
        return ns

    def log(self, name: str) -> Path:
        return self.tmp / "log" / f"{name}.log"

    def _logfile(self, name: str) -> IO[bytes]:
        f = open(self.log(name), "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(f)
        return f

    # ---- the service -------------------------------------------------------------------------
    def _start_services(self) -> None:
        tcp = f"{TLS_PORT},{SPARE_TLS_PORT}"
        udp = f"{UDP_PORT},{SPARE_UDP_PORT}"
        bulk = ",".join(map(str, BULK_PORTS))
        for name, ns in (("web", self.web), ("lanhost", self.lanhost)):
            ns.popen([sys.executable, str(PEER_ECHO), "serve", "--cert", self.pki["web.crt"],
                      "--key", self.pki["web.key"], "--tcp", tcp, "--udp", udp, "--bulk", bulk],
                     stdout=self._logfile(f"{name}-peer-echo"), stderr=subprocess.STDOUT)
        for ns in (self.web, self.lanhost):
            # counters of what arrives (TCP SYNs, datagrams), in the raw table no role touches:
            # "not reachable" means nothing arrived, not merely that no answer came back
            for ipt in ("iptables-legacy", "ip6tables-legacy"):
                for proto, port in (("tcp", TLS_PORT), ("tcp", SPARE_TLS_PORT),
                                    ("udp", UDP_PORT), ("udp", SPARE_UDP_PORT),
                                    *(("tcp", p) for p in BULK_PORTS)):
                    syn = ["--syn"] if proto == "tcp" else []
                    ns.run([ipt, "-t", "raw", "-A", "PREROUTING", "-p", proto, "--dport", str(port),
                            *syn, "-m", "comment", "--comment", "lab-arrivals"])
        for ns in (self.web, self.lanhost):
            wait_for(lambda ns=ns: f":{TLS_PORT} " in ns.out("ss -Htln") and f":{UDP_PORT} " in ns.out("ss -Hln -u"),
                     timeout=10, what=f"peer_echo listening in {ns.name}")

    @staticmethod
    def arrivals(ns: Netns, proto: str, port: int, family: int = 4) -> int:
        """How many TCP SYNs / UDP datagrams for port have arrived at this home host so far."""
        ipt = "iptables-legacy" if family == 4 else "ip6tables-legacy"
        listing = ns.out([ipt, "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"])
        for line in listing.splitlines():
            if "lab-arrivals" in line and f"{proto} dpt:{port} " in line:
                return int(line.split()[0])
        raise LookupError(f"no arrival counter for {proto}/{port} in {ns.name}")

    # ---- the VPN -----------------------------------------------------------------------------
    def start_vpn_server(self) -> None:
        if self.layout == "multipath":
            self._start_wireguard_b_server()
        if self.variant == "openvpn":
            conf = self._openvpn_server_conf()
            self.vpn_server_proc = self.vpnserver.popen(
                ["openvpn", "--config", str(conf)], stdout=self._logfile("openvpn-server"),
                stderr=subprocess.STDOUT)
            wait_for(lambda: "Initialization Sequence Completed" in self.log("openvpn-server").read_text(),
                     timeout=20, what="the OpenVPN server")
        else:
            self._wg_keys()
            self.vpn_server_proc = self._wireguard_go(self.vpnserver, "wireguard-server")
            wg = self.tmp / "vpn"
            self._wg(self.vpn_server_proc, "set", "tun0", "listen-port", str(VPN_PORT),
                     "private-key", str(wg / "server.key"), "peer", (wg / "client.pub").read_text().strip(),
                     "allowed-ips", "10.9.0.2/32,fd00:9::2/128,192.168.100.0/24,fd00:100::/64")
            s = self.vpnserver
            self._addr(s, "tun0", "10.9.0.1/24", "fd00:9::1/64")
            if self.tunnel_mtu:
                s.run(f"ip link set tun0 mtu {self.tunnel_mtu}")
            s.run("ip link set tun0 up")
            # the tunnel's own routes (what OpenVPN's `route` does); no tagrouted role adds them
            s.run("ip -4 route add 192.168.100.0/24 dev tun0")
            s.run("ip -6 route add fd00:100::/64 dev tun0")

    def _start_wireguard_b_server(self) -> None:
        """multipath: server B's WireGuard (wg0) on the VPS itself; the home networks are
        behind the home peer (its allowed-ips), routed into wg0 by the VPS's gateway role."""
        self._wg_keys()
        self.wg_b_server_proc = self._wireguard_go(self.vps, "wireguard-server-b", "wg0")
        wg = self.tmp / "vpn"
        self._wg(self.wg_b_server_proc, "set", "wg0", "listen-port", str(WG_PORT),
                 "private-key", str(wg / "server.key"), "peer", (wg / "client.pub").read_text().strip(),
                 "allowed-ips", "10.9.0.2/32,fd00:9::2/128,192.168.100.0/24,fd00:100::/64")
        self._addr(self.vps, "wg0", "10.9.0.1/24", "fd00:9::1/64")
        self.vps.run("ip link set wg0 up")

    def _start_wireguard_b_client(self, wait: bool = True) -> None:
        """multipath: the home VPN client's second tunnel, wg0 to server B."""
        self.wg_b_client_proc = proc = self._wireguard_go(self.vpnclient, "wireguard-client-b", "wg0")
        wg = self.tmp / "vpn"
        self._wg(proc, "set", "wg0", "private-key", str(wg / "client.key"),
                 "peer", (wg / "server.pub").read_text().strip(),
                 "endpoint", f"{PUBLIC_B4}:{WG_PORT}", "persistent-keepalive", "1",
                 "allowed-ips", "0.0.0.0/0,::/0")  # replies go to arbitrary Internet addresses
        self._addr(self.vpnclient, "wg0", "10.9.0.2/24", "fd00:9::2/64")
        self.vpnclient.run("ip link set wg0 up")
        if wait:
            wait_for(lambda: self._wg_handshake_done(proc, "wg0"), timeout=30,
                     what="the WireGuard handshake with server B")

    def stop_tunnel(self, path: str) -> None:
        """multipath: end the home end of `path`'s tunnel by PID and wait until its link is gone."""
        if path == "server-a":
            self.stop_vpn_client()
            return
        proc = self.wg_b_client_proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        self.wg_b_client_proc = None
        wait_for(lambda: not self.link_exists(self.vpnclient, "wg0"), timeout=10, what="wg0 gone")

    def start_tunnel(self, path: str, wait: bool = True) -> None:
        """multipath: start the home end of `path`'s tunnel again."""
        if path == "server-a":
            self._start_vpn_client_of_variant(wait)
        else:
            self._start_wireguard_b_client(wait)

    def start_vpn_client(self, wait: bool = True) -> None:
        self._start_vpn_client_of_variant(wait)
        if self.layout == "multipath":
            self._start_wireguard_b_client(wait)

    def _start_vpn_client_of_variant(self, wait: bool = True) -> None:
        if self.variant == "openvpn":
            log = self.log("openvpn-client")
            offset = log.stat().st_size if log.exists() else 0
            conf = self._openvpn_client_conf()
            self.vpn_client_proc = self.vpnclient.popen(
                ["openvpn", "--config", str(conf)], stdout=self._logfile("openvpn-client"),
                stderr=subprocess.STDOUT)
            if wait:
                wait_for(lambda: "Initialization Sequence Completed" in log.read_text()[offset:],
                         timeout=30, interval=0.01, what="the OpenVPN client's tunnel")
        else:
            self.vpn_client_proc = self._wireguard_go(self.vpnclient, "wireguard-client")
            wg = self.tmp / "vpn"
            self._wg(self.vpn_client_proc, "set", "tun0", "private-key", str(wg / "client.key"),
                     "peer", (wg / "server.pub").read_text().strip(),
                     "endpoint", f"{PUBLIC4}:{VPN_PORT}", "persistent-keepalive", "1",
                     # replies go to arbitrary Internet addresses: everything may enter the tunnel
                     "allowed-ips", "0.0.0.0/0,::/0")
            self._addr(self.vpnclient, "tun0", "10.9.0.2/24", "fd00:9::2/64")
            if self.tunnel_mtu:
                self.vpnclient.run(f"ip link set tun0 mtu {self.tunnel_mtu}")
            self.vpnclient.run("ip link set tun0 up")
            if wait:
                wait_for(lambda: self._wg_handshake_done(self.vpn_client_proc), timeout=30,
                         what="the WireGuard handshake")

    def stop_vpn_client(self) -> None:
        """End the VPN client by PID and wait until its tun0 is gone."""
        proc = self.vpn_client_proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
        self.vpn_client_proc = None
        wait_for(lambda: not self.link_exists(self.vpnclient, "tun0"), timeout=10, what="tun0 gone")

    def tunnel_up(self) -> bool:
        if self.variant == "wireguard":
            return self.link_exists(self.vpnclient, "tun0") and self._wg_handshake_done(self.vpn_client_proc)
        return self.link_exists(self.vpnclient, "tun0")

    @staticmethod
    def link_exists(ns: Netns, name: str) -> bool:
        return ns.run(["ip", "link", "show", "dev", name], check=False).returncode == 0

    def _openvpn_server_conf(self) -> Path:
        d = self.tmp / "vpn"
        ccd = d / "ccd"
        ccd.mkdir(exist_ok=True)
        # the client behind the home NAT owns the home LAN: the server routes it to that client
        (ccd / "client").write_text("iroute 192.168.100.0 255.255.255.0\niroute-ipv6 fd00:100::/64\n")
        pushes = "" if self.layout == "combined" else (
            'push "route 192.168.200.0 255.255.255.0"\npush "route-ipv6 fd00:200::/64"\n')
        conf = d / "server.conf"
        conf.write_text(f"""# The seed's OpenVPN server: what `server 10.8.0.0 255.255.255.0` expands to, spelled out
# (route-gateway is the helper's hidden default for `route` in topology subnet)
mode server
tls-server
proto udp
port {VPN_PORT}
dev tun0
dev-type tun
topology subnet
ifconfig 10.8.0.1 255.255.255.0
ifconfig-pool 10.8.0.2 10.8.0.200 255.255.255.0
push "topology subnet"
push "route-gateway 10.8.0.1"
route-gateway 10.8.0.2
ifconfig-ipv6 fd00:8::1/64 fd00:8::2
ifconfig-ipv6-pool fd00:8::1000/64
{pushes}client-config-dir {ccd}
route 192.168.100.0 255.255.255.0
route-ipv6 fd00:100::/64
ca {self.pki['ca.crt']}
cert {self.pki['server.crt']}
key {self.pki['server.key']}
dh none
tls-auth {self.pki['ta.key']} 0
keepalive 2 10
disable-dco
{self._openvpn_mtu()}verb 3
""")
        return conf

    def _openvpn_client_conf(self) -> Path:
        conf = self.tmp / "vpn" / "client.conf"
        conf.write_text(f"""# The seed's OpenVPN client: behind the home router's NAT, dials the public address
client
proto udp
remote {PUBLIC4} {VPN_PORT}
nobind
dev tun0
dev-type tun
connect-retry 1 2
ca {self.pki['ca.crt']}
cert {self.pki['client.crt']}
key {self.pki['client.key']}
tls-auth {self.pki['ta.key']} 1
remote-cert-tls server
verify-x509-name server name
explicit-exit-notify 1
disable-dco
{self._openvpn_mtu()}verb 3
""")
        return conf

    def _openvpn_mtu(self) -> str:
        """The tunnel's MTU and OpenVPN's own MSS clamp (`mssfix 0`: off), when the lab sets them."""
        lines = f"tun-mtu {self.tunnel_mtu}\n" if self.tunnel_mtu else ""
        return lines + ("" if self.tunnel_clamps else "mssfix 0\n")

    def _wg_keys(self) -> None:
        d = self.tmp / "vpn"
        for name in ("server", "client"):
            key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
            pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout
            (d / f"{name}.key").write_text(key)
            (d / f"{name}.key").chmod(0o600)
            (d / f"{name}.pub").write_text(pub)

    def _wireguard_go(self, ns: Netns, log: str, dev: str = "tun0") -> subprocess.Popen[bytes]:
        # wireguard-go's control socket is /run/wireguard/<dev>.sock, shared by every namespace:
        # each instance gets its own tmpfs there, in the mount namespace `ip netns exec` made for it
        proc = ns.popen(["sh", "-c", "mkdir -p /run/wireguard && mount -t tmpfs tmpfs /run/wireguard"
                         f" && exec wireguard-go -f {dev}"],
                        env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
                        stdout=self._logfile(log), stderr=subprocess.STDOUT)
        wait_for(lambda: self._in_wg_ns(proc, ["test", "-S", f"/run/wireguard/{dev}.sock"]).returncode == 0,
                 timeout=10, what=f"wireguard-go in {ns.name}")
        return proc

    @staticmethod
    def _in_wg_ns(proc: subprocess.Popen[bytes], argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "-n", *argv],
                              capture_output=True, text=True)

    def _wg(self, proc: subprocess.Popen[bytes], *args: str) -> str:
        res = self._in_wg_ns(proc, ["wg", *args])
        if res.returncode != 0:
            raise RuntimeError(f"wg {' '.join(args)}: {res.stderr}")
        return res.stdout

    def _wg_handshake_done(self, proc: subprocess.Popen[bytes] | None, dev: str = "tun0") -> bool:
        if proc is None or proc.poll() is not None:
            return False
        res = self._in_wg_ns(proc, ["wg", "show", dev, "latest-handshakes"])
        return res.returncode == 0 and any(
            line.split()[-1] != "0" for line in res.stdout.splitlines() if line.strip())

    # ---- the seed's recipe -------------------------------------------------------------------
    def recipe_up(self, before_tunnel: bool) -> None:
        """The seed's one-shot commands; the vpn-client part after the tunnel is up."""
        if self.layout == "seed":
            steps = ([("remote", ["gateway"], {}), ("vpnserver", ["vpn-server"], {}),
                      ("web", ["service"], {})] if before_tunnel
                     else [("vpnclient", ["vpn-client"], {})])
        else:
            s4, s6 = self.service4, self.service6
            gw_env = {"FORWARDS": "", "VIA4": "", "VIA6": "",
                      "SERVICES": f"tcp/443/{s4} tcp/443/{s6} udp/7000/{s4} udp/7000/{s6}"}
            steps = ([("remote", ["gateway", "vpn-server"], gw_env)] if before_tunnel
                     else [("vpnclient", ["vpn-client", "service"], {"SVC_VIA4": "", "SVC_VIA6": ""})])
        for host, roles, env in steps:
            argv = ["env", *(f"{k}={v}" for k, v in env.items()), "bash", str(RECIPE), *roles]
            self.ns(host).run(argv)

    # ---- tagrouted ---------------------------------------------------------------------------
    def tagroutectl(self, host: str, *args: str, check: bool = False,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.ns(host).run(
            [str(VENV_BIN / "tagroutectl"), "--config", str(self.configs[host]),
             "--run-dir", str(self.run_dirs[host]), *args], check=check, timeout=timeout)

    def apply_tagrouted(self, hosts: Iterable[str] | None = None) -> None:
        for host in hosts or self.configs:
            self.tagroutectl(host, "apply", check=True)

    def start_tagrouted(self, hosts: Iterable[str] | None = None, wait: bool = True) -> None:
        """Run the daemon in each host's namespace, foreground, stderr to log/<host>-tagrouted.log."""
        hosts = list(hosts or self.configs)
        for host in hosts:
            if host in self.daemons and self.daemons[host].poll() is None:
                continue
            self.daemons[host] = self.ns(host).popen(
                [str(VENV_BIN / "tagrouted"), "--config", str(self.configs[host]),
                 "--run-dir", str(self.run_dirs[host]), "--log-level", "info"],
                stdout=self._logfile(f"{host}-tagrouted"), stderr=subprocess.STDOUT)
        if wait:
            for host in hosts:
                wait_for(lambda host=host: self._daemon_answers(host), timeout=30,
                         what=f"tagrouted on {host} to answer status")

    def _daemon_answers(self, host: str) -> bool:
        proc = self.daemons[host]
        if proc.poll() is not None:
            raise RuntimeError(f"tagrouted on {host} exited with {proc.returncode}:\n"
                               + self.log(f"{host}-tagrouted").read_text()[-3000:])
        return self.tagroutectl(host, "status", "--json", timeout=10).returncode == 0

    def status(self, host: str) -> dict[str, Any] | None:
        res = self.tagroutectl(host, "status", "--json", timeout=10)
        return json.loads(res.stdout) if res.returncode == 0 else None

    def fresh_status(self, host: str, timeout: float = 15) -> dict[str, Any]:
        """The daemon's status once it holds counters read after this call (the daemon reads
        them on its timer and firewall passes; `counters_time` says when)."""
        asked = time.time()
        assert self.status(host) is not None, f"no daemon answers on {host}"

        def fresh() -> dict[str, Any] | None:
            status = self.status(host)
            if status is None or (status.get("counters_time") or 0) <= asked:
                return None
            return status
        return wait_for(fresh, timeout=timeout, interval=0.1, what=f"a timer pass on {host}")

    def stop_tagrouted(self, hosts: Iterable[str] | None = None, remove_state: bool = False) -> None:
        """SIGTERM each daemon by PID; with remove_state, also `tagroutectl down` there."""
        for host in list(hosts or self.configs):
            proc = self.daemons.pop(host, None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if remove_state:
                self.tagroutectl(host, "down", check=True)

    def metrics(self, host: str) -> dict[str, float]:
        """The host's tagrouted metrics, scraped from inside its namespace and parsed."""
        return scrape(self.ns(host), METRICS_LISTEN)

    def journal(self, host: str) -> list[str]:
        path = self.log(f"{host}-tagrouted")
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    # ---- requests from the Internet client ---------------------------------------------------
    def request_tcp(self, address: str, port: int = TLS_PORT, timeout: float = 3.0,
                    source: str | None = None) -> str | None:
        """TLS from the Internet client; the peer address the service saw, or None."""
        return self.client.call(peer_echo.ask_tcp, address, port, timeout, source, timeout=timeout + 20)

    def request_udp(self, address: str, port: int = UDP_PORT, timeout: float = 3.0,
                    source: str | None = None) -> str | None:
        """A datagram from the Internet client; the peer address the service saw, or None."""
        return self.client.call(peer_echo.ask_udp, address, port, timeout, source, timeout=timeout + 20)

    def exchange(self, address: str, port: int, size: int, timeout: float = 10.0,
                 source: str | None = None) -> str | None:
        """`size` bytes each way over plain TCP from the Internet client (a BULK_PORTS service);
        the peer address the service saw, or None if it did not complete within `timeout`."""
        return self.client.call(peer_echo.exchange, address, port, size, timeout, source,
                                timeout=timeout + 20)

    def burst(self, address: str, port: int, count: int, timeout: float = 3.0,
              source: str | None = None) -> tuple[str | None, list[str | None], str | None]:
        """`count` quick connections at once while an earlier one stays open (peer_echo.burst)."""
        return self.client.call(peer_echo.burst, address, port, count, timeout, source,
                                timeout=3 * timeout + 30)

    def request_all(self, asks: list[tuple[str, str, int]], timeout: float = 3.0) -> list[str | None]:
        """(proto, address, port) requests from the Internet client all at once; what the service
        saw for each, in order."""
        return self.client.call(peer_echo.ask_all, asks, timeout, timeout=timeout + 30)

    def wait_path(self, timeout: float = 30) -> float:
        """Wait until TLS through the public IPv4 address (multipath: each server's) answers with
        the client's address; returns the seconds it took."""
        t0 = time.monotonic()
        publics = [a4 for a4, _, _, _ in SERVERS.values()] if self.layout == "multipath" else [PUBLIC4]
        try:
            for public in publics:
                wait_for(lambda public=public: self.request_tcp(public, TLS_PORT, timeout=1.0) == CLIENT4,
                         timeout=timeout, interval=0.05, what=f"TLS through the public address {public}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.diagnostics()}") from None
        return time.monotonic() - t0

    def diagnostics(self, lines: int = 12) -> str:
        """The tail of every log of the lab (VPN, tagrouted, service), for a failure message."""
        parts = [f"lab {self.variant}/{self.layout} ({self.manager}), files in {self.tmp}"]
        for path in sorted((self.tmp / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ---- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        # SIGTERM to everything we started first, so their exits (OpenVPN's exit notification,
        # tagrouted's on_stop) overlap; then wait for each and remove the namespaces
        for proc in [*self.daemons.values(), *(p for ns in self.namespaces for p in ns.procs)]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.stop_tagrouted()
        for ns in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                ns.delete()
        self.namespaces.clear()
        for f in self._logs:
            with contextlib.suppress(Exception):
                f.close()
        self._logs.clear()
        if not self.keep_dir and self.tmp.name.startswith("tagrouted-lab-"):
            shutil.rmtree(self.tmp, ignore_errors=True)
        _open_labs.discard(self)


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()
