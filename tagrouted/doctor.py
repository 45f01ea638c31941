"""`tagroutectl doctor`: this host's part of the path, checked role by role from the kernel's own
answers, one line per check (ok / warn / fail, what was seen, the fix).

Owns nothing and changes nothing: it reads sysctls, links, routes (`ip route get` semantics
through netlink: RTM_GETROUTE with and without our mark), our firewall state (the backend's
own diff and counters) and the host's whole ruleset (kernel/hostfw.py, dry run), and asks a
running daemon for its status when there is one. It never opens the run directory for writing
and never creates a legacy table (the readers skip tables the namespace does not have).

Checks: the daemon (one line), forwarding, the tunnel's effective rp_filter, the tunnel up,
routes of tagged and untagged replies (service host, VPN client) and toward the home networks
(gateway), our firewall state present and its counters, our accepts in the host's FORWARD
chains, every conflict of the host's firewall with our traffic, the tunnel's MTU against the
LAN's. Exit: 0 nothing fails, 2 a check fails (warnings alone do not), 1 an invalid config.

Threading: runs in the CLI's one thread.
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .core.config import Config
from .core.desired import desired_state, forwarded_families
from .core.state import FirewallIntent
from .kernel.sysctl import read_sysctl

Status = Literal["ok", "warn", "fail"]
# Where replies to Internet clients go: any address outside the host's own networks will do for
# a route look-up (nothing is sent).
INTERNET = {4: "8.8.8.8", 6: "2001:4860:4860::8888"}


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    seen: str
    fix: str = ""

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.status:<4}  {self.name}: {self.seen}{fix}"


def _tunnels(config: Config) -> list[str]:
    """The tunnels this host's roles use: each path's on a VPN client (or a service host with a
    tunnel), the VPN server's."""
    out = [p.tunnel_interface for p in config.tag_paths()
           if p.tunnel_interface and (config.has("vpn-client") or config.has("service"))]
    if config.vpn_server and config.has("vpn-server"):
        out.append(config.vpn_server.tunnel_interface)
    return list(dict.fromkeys(out))


def _reply_targets(config: Config) -> list[tuple[str, int, int, str | None, str | None]]:
    """(path, mark, family, gateway, device) where each path's tagged replies must go."""
    out: list[tuple[str, int, int, str | None, str | None]] = []
    families = sorted({s.family for s in config.services}) or [4]
    for p in config.tag_paths():
        if config.has("vpn-client") or (config.has("service") and p.tunnel_interface):
            out += [(p.name, p.mark, f, None, p.tunnel_interface) for f in families]
        elif config.has("service") and config.service:
            out += [(p.name, p.mark, v.version, str(v), None) for v in (p.via or config.service.via)]
    return out


class Doctor:
    def __init__(self, config: Config, run_dir: str) -> None:
        from pyroute2 import IPRoute

        self.config = config
        self.run_dir = run_dir
        self.ipr = IPRoute()
        self.checks: list[Check] = []
        self.links: dict[str, dict[str, Any]] = {}
        for msg in self.ipr.link("dump"):
            name = msg.get_attr("IFLA_IFNAME")
            if name:
                self.links[name] = {"index": msg["index"], "up": bool(msg["flags"] & 1),
                                    "mtu": msg.get_attr("IFLA_MTU")}
        self.names = {v["index"]: k for k, v in self.links.items()}

    def close(self) -> None:
        self.ipr.close()

    def add(self, name: str, status: Status, seen: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, seen, fix))

    # ---- the checks ------------------------------------------------------------------------
    def run(self) -> list[Check]:
        from .kernel.netlink import NetlinkAdapter

        config = self.config
        self.daemon()
        with contextlib.closing(NetlinkAdapter()) as nl:
            facts = nl.host_facts(ipv6_defaults=6 in forwarded_families(config))
        intent = desired_state(config, facts).firewall
        self.forwarding()
        self.tunnel()
        self.rp_filter()
        self.routes()
        self.firewall(intent)
        self.host_firewall(intent)
        self.mtu()
        return self.checks

    def daemon(self) -> None:
        from .daemon.control import NoDaemon, Untrusted, request

        try:
            reply = request(self.run_dir, {"command": "status"}, timeout=3)
        except (NoDaemon, Untrusted, OSError) as e:
            self.add("daemon", "warn", f"not running here ({e}): these checks read the kernel directly, "
                                       "and nothing repairs what they find",
                     "systemctl start tagrouted (or tagroutectl apply once)")
            return
        s = reply.get("status") or {}
        sync = "in sync" if s.get("in_sync") else "NOT in sync"
        self.add("daemon", "ok" if s.get("in_sync") else "warn",
                 f"running (pid {s.get('pid')}, {sync}, {s.get('repairs', 0)} repairs)",
                 "" if s.get("in_sync") else "tagroutectl status shows why")

    def forwarding(self) -> None:
        for family in sorted(forwarded_families(self.config)):
            key = "net.ipv4.ip_forward" if family == 4 else "net.ipv6.conf.all.forwarding"
            value = read_sysctl(key)
            if value == "1":
                self.add("forwarding", "ok", f"{key}=1")
            else:
                self.add("forwarding", "fail", f"{key}={value}: IPv{family} is not forwarded",
                         f"sysctl -w {key}=1 (tagrouted keeps it: start the daemon)")

    def tunnel(self) -> None:
        for tun in _tunnels(self.config):
            link = self.links.get(tun)
            if link is None:
                self.add("tunnel", "fail", f"{tun} does not exist",
                         "start the VPN (openvpn, wg-quick) and check its log")
            elif not link["up"]:
                self.add("tunnel", "fail", f"{tun} is down", f"ip link set {tun} up, or restart the VPN")
            else:
                self.add("tunnel", "ok", f"{tun} is up (mtu {link['mtu']})")

    def rp_filter(self) -> None:
        if not self.config.has("vpn-client"):
            return
        for tun in _tunnels(self.config):
            all_v = read_sysctl("net.ipv4.conf.all.rp_filter")
            tun_v = read_sysctl(f"net.ipv4.conf.{tun}.rp_filter")
            if all_v is None or tun_v is None:
                continue  # no tunnel (said above) or no IPv4
            effective = max(int(all_v), int(tun_v))
            name = {0: "off", 1: "strict", 2: "loose"}.get(effective, str(effective))
            seen = f"effective rp_filter on {tun} is {name} (all={all_v}, {tun}={tun_v})"
            if effective == 1:
                self.add("rp_filter", "fail", seen + ": replies to Internet clients arrive through the "
                                                     "tunnel and are dropped",
                         f"sysctl -w net.ipv4.conf.{tun}.rp_filter=2")
            else:
                self.add("rp_filter", "ok", seen)

    def _route(self, family: int, dst: str, mark: int | None) -> tuple[str | None, str | None, str | None]:
        """(gateway, device, error) of `ip route get dst [mark M]`."""
        from pyroute2.netlink.exceptions import NetlinkError

        kw: dict[str, Any] = {"dst": dst, "family": socket.AF_INET if family == 4 else socket.AF_INET6}
        if mark is not None:
            kw["mark"] = mark
        try:
            msg = self.ipr.route("get", **kw)[0]
        except NetlinkError as e:
            return None, None, e.args[1] if len(e.args) > 1 else str(e)
        oif = msg.get_attr("RTA_OIF")
        return msg.get_attr("RTA_GATEWAY"), self.names.get(oif, str(oif) if oif else None), None

    def routes(self) -> None:
        config = self.config
        several = len(config.tag_paths()) > 1
        for path, mark, family, gw, dev in _reply_targets(config):
            label = f" (path {path})" if several else ""
            want = f"via {gw}" if gw else f"dev {dev}"
            dst = INTERNET[family]
            got_gw, got_dev, err = self._route(family, dst, mark)
            cmd = f"ip -{family} route get {dst} mark {mark:#x}"
            if err:
                self.add("tagged route" + label, "fail", f"`{cmd}`: {err}: tagged replies have no way back",
                         "bring the tunnel up" if dev else f"check that {gw} is reachable")
            elif (gw and got_gw == gw) or (dev and got_dev == dev):
                self.add("tagged route" + label, "ok", f"`{cmd}` goes {want}")
            else:
                self.add("tagged route" + label, "fail",
                         f"`{cmd}` goes via {got_gw or '-'} dev {got_dev}, not {want}",
                         f"tagroutectl diff (the rule fwmark {mark:#x} or its table is missing or shadowed)")
            u_gw, u_dev, u_err = self._route(family, dst, None)
            cmd = f"ip -{family} route get {dst}"
            if u_err:
                self.add("untagged route" + label, "ok", f"`{cmd}`: {u_err} (not {want})")
            elif (gw and u_gw == gw) or (dev and u_dev == dev):
                self.add("untagged route" + label, "warn", f"`{cmd}` also goes {want}: untagged traffic "
                                                           "takes the tunnel path too",
                         "check the main table's default route")
            else:
                self.add("untagged route" + label, "ok",
                         f"`{cmd}` goes via {u_gw or '-'} dev {u_dev} (not {want})")
        gwc = config.gateway
        if gwc and config.has("gateway"):
            vs = config.vpn_server if config.has("vpn-server") else None
            vs_tun = vs.tunnel_interface if vs else None
            for net in gwc.home_networks:
                family = net.version
                dst = str(next(iter(net.hosts()), net.network_address))
                got_gw, got_dev, err = self._route(family, dst, None)
                vias = {str(v) for v in gwc.via if v.version == family}
                want = f"dev {vs_tun}" if vs_tun else "via " + " or ".join(sorted(vias))
                cmd = f"ip -{family} route get {dst}"
                if err:
                    self.add("home route", "fail", f"`{cmd}`: {err}",
                             "tagroutectl apply (or start the daemon)")
                elif (vs_tun and got_dev == vs_tun) or (got_gw in vias):
                    self.add("home route", "ok", f"`{cmd}` goes {want}")
                else:
                    self.add("home route", "fail",
                             f"`{cmd}` goes via {got_gw or '-'} dev {got_dev}, not {want}",
                             "tagroutectl diff")

    def firewall(self, intent: FirewallIntent) -> None:
        from .kernel.firewall import BackendUnavailable, choose, open_backend

        choice = choose(self.config.firewall.backend)
        try:
            backend = open_backend(choice.backend)
            lines = backend.drift_lines(intent)
        except BackendUnavailable as e:
            self.add("firewall", "fail", f"{choice.backend}: {e}", "install what it names")
            return
        except Exception as e:
            self.add("firewall", "fail", f"{choice.backend}: cannot read our rules: {e}", "")
            return
        where = "table inet tagrouted" if choice.backend == "nftables" else "TAGROUTED-* chains (legacy)"
        if intent.empty:
            return
        if lines:
            self.add("firewall", "fail", f"{where}: {len(lines)} differences, first: {lines[0]}",
                     "tagroutectl apply (or start the daemon); tagroutectl diff lists them")
        else:
            self.add("firewall", "ok", f"{where} present and as configured ({choice.backend})")
        try:
            counters = backend.counters(intent).services
        except Exception:
            counters = {}
        counted = {k: v for k, v in counters.items() if v is not None}
        if counted:
            moving = sum(1 for v in counted.values() if v[0])
            text = ", ".join(f"{k} {v[0]} packets" for k, v in list(counted.items())[:6])
            more = f" (+{len(counted) - 6} more)" if len(counted) > 6 else ""
            if moving:
                self.add("counters", "ok", f"{text}{more}")
            else:
                self.add("counters", "warn", f"{text}{more}: no packet of a service counted yet",
                         "expected until a client connects; if clients do connect, their packets do not "
                         "reach this host")
        with contextlib.suppress(Exception):
            backend.close()

    def host_firewall(self, intent: FirewallIntent) -> None:
        from .kernel.firewall import choose
        from .kernel.hostfw import HostFirewall

        if intent.empty:
            return
        hf = HostFirewall()
        try:
            result = hf.sync(intent, mode=self.config.firewall.host_firewall,
                             backend=choose(self.config.firewall.backend).backend,
                             dry_run=True, assume_integrated=False)
        except Exception as e:
            self.add("host firewall", "warn", f"cannot read the host's ruleset: {e}", "")
            return
        finally:
            hf.close()
        for change in result.changes:
            self.add("host firewall", "fail", f"our accepts are not in place: {change.message}",
                     "tagroutectl apply (or start the daemon)")
        for e in result.errors:
            self.add("host firewall", "warn", e, "")
        for c in result.conflicts:
            self.add("host firewall", c.severity, f"{c.table} chain {c.chain} {c.rule}: {c.does}", c.fix)
        picture = result.picture
        if picture is not None:
            for problem in picture.ruleset.problems:
                self.add("host firewall", "warn", problem, "")
        if not result.conflicts and not result.changes:
            bases = sum(1 for _ in picture.ruleset.base_chains()) if picture else 0
            places = ", ".join(f"{p.source} IPv{p.family} {p.parent}" for p in result.places)
            kept = f"; our accepts are in place ({places})" if places else ""
            if picture is not None and picture.ruleset.complete:
                self.add("host firewall", "ok", f"nothing in the host's ruleset ({bases} base chains) blocks "
                                                f"or re-marks our traffic{kept}")

    def mtu(self) -> None:
        vc = self.config.vpn_client
        if not (vc and self.config.has("vpn-client")):
            return
        lan = self.links.get(vc.lan_interface)
        for name in _tunnels(self.config):
            tun = self.links.get(name)
            if tun is None or lan is None or not tun["mtu"] or not lan["mtu"]:
                continue
            seen = f"{name} mtu {tun['mtu']}, {vc.lan_interface} mtu {lan['mtu']}"
            if tun["mtu"] >= lan["mtu"]:
                self.add("mtu", "ok", seen)
            else:
                self.add("mtu", "warn", f"{seen}: replies larger than {tun['mtu']} bytes need path MTU "
                                        "discovery (ICMP 'fragmentation needed' must reach the service) "
                                        "or MSS clamping",
                         f"raise the tunnel MTU, or clamp TCP MSS on {name}")


def run(config: Config, run_dir: str) -> list[Check]:
    doctor = Doctor(config, run_dir)
    try:
        return doctor.run()
    finally:
        doctor.close()


def exit_code(checks: list[Check]) -> int:
    return 2 if any(c.status == "fail" for c in checks) else 0


def render(checks: list[Check], as_json: bool) -> str:
    if as_json:
        return json.dumps({"checks": [asdict(c) for c in checks], "exit": exit_code(checks)}, indent=2)
    return "\n".join(c.line() for c in checks)
