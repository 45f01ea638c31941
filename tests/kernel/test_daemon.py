"""The real `tagrouted` daemon in a throw-away namespace, watched the way a user watches it.

Each test starts the installed console script inside a namespace of its own (a vpn-client with
eth0 on a veth pair and tun0 as a real tun device), with JSON records on stderr
(TAGROUTED_LOG_JSON=1: the journal's field names) and a NOTIFY_SOCKET this test owns, then
changes the world from outside (`ip`, `nft`, `iptables-legacy`, `sysctl`, editing the config
file, signals, tagroutectl) and polls the kernel state with a bound until it is what it should
be. Tests that touch the firewall run on both backends (the `backend` fixture); the others on
the default one (`one_backend`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import TAGROUTECTL, TUN_WRITER, DaemonProc, scrape
from firewall_view import admits, firewall_snapshot, ours, with_backend
from nslab import Netns, veth, wait_for

pytestmark = pytest.mark.kernel
one_backend = pytest.mark.parametrize("backend", ["nftables"])  # the test does not touch the firewall

BASE = """\
roles: [vpn-client]
services:
  - {name: web, proto: tcp, port: 443, address: 192.168.100.3}
  - {name: echo, proto: udp, port: 7000, address: 192.168.100.3}
  - {name: web6, proto: tcp, port: 443, address: "fd00:100::3"}
vpn_client: {tunnel_interface: tun0, lan_interface: eth0, rp_filter: loose}
resync_interval: 300ms
"""
RULE = "fwmark 0x2a/0xff lookup 42"
NEW_SERVICE = "  - {name: admin, proto: tcp, port: 2222, address: 192.168.100.3}\n"
SERVICES_END = '  - {name: web6, proto: tcp, port: 443, address: "fd00:100::3"}\n'


def with_service(text: str, line: str) -> str:
    return text.replace(SERVICES_END, SERVICES_END + line, 1)


# ---- the host ------------------------------------------------------------------------------
class Host:
    def __init__(self, ns: Netns, tmp: Path, backend: str) -> None:
        self.ns = ns
        self.backend = backend
        self.base = with_backend(BASE, backend)
        self.cfg_dir = tmp / "etc"
        self.cfg_dir.mkdir()
        self.config = self.cfg_dir / "tagrouted.yaml"
        self.config.write_text(self.base)
        self.run_dir = tmp / "run"
        self.daemons: list[DaemonProc] = []

    def daemon(self, **kw: object) -> DaemonProc:
        d = DaemonProc(self.ns, self.config, self.run_dir, **kw)  # type: ignore[arg-type]
        self.daemons.append(d)
        return d.start()

    def out(self, cmd: str) -> str:
        res = self.ns.run(cmd, check=False)
        if res.returncode != 0 and "table does not exist" not in res.stderr:  # an empty table 42
            raise AssertionError(f"{cmd} -> {res.returncode}: {res.stderr}")
        return res.stdout

    def firewall(self) -> str:
        """What our backend holds now."""
        return ours(lambda argv: self.ns.run(argv, check=False).stdout, self.backend)

    def admits(self, proto: str, port: int) -> bool:
        return admits(lambda argv: self.ns.run(argv, check=False).stdout, self.backend,
                      "192.168.100.3", proto, port)

    def sysctl(self, key: str) -> str:
        return self.ns.run(["sysctl", "-n", key], check=False).stdout.strip()

    def tun_up(self) -> None:
        self.ns.run("ip tuntap add dev tun0 mode tun")
        self.ns.run("ip link set tun0 up")

    def in_place(self) -> bool:
        """The vpn-client state, each piece exactly once."""
        rules4, rules6 = self.out("ip -4 rule show"), self.out("ip -6 rule show")
        t4, t6 = self.out("ip -4 route show table 42"), self.out("ip -6 route show table 42")
        return (rules4.count(RULE) == 1 and rules6.count(RULE) == 1
                and re.search(r"^default dev tun0 ", t4, re.M) is not None
                and re.search(r"^default dev tun0 ", t6, re.M) is not None
                and t4.count("unreachable default") == 1
                and self.admits("tcp", 443)
                and self.sysctl("net.ipv4.conf.tun0.rp_filter") == "2"
                and self.sysctl("net.ipv4.ip_forward") == "1")

    def snapshot(self) -> dict[str, str]:
        return {
            **firewall_snapshot(lambda argv: self.ns.run(argv, check=False).stdout),
            "rules4": self.out("ip -4 rule show"), "rules6": self.out("ip -6 rule show"),
            # Table 42 and our branded routes: the rest of IPv6 changes on its own (DAD, RA).
            "routes4": self.out("ip -4 route show table all proto 142"),
            "routes6": self.out("ip -6 route show table all proto 142"),
            "table4": self.out("ip -4 route show table 42"), "table6": self.out("ip -6 route show table 42"),
            "rp_filter": self.sysctl("net.ipv4.conf.tun0.rp_filter"),
            "forward": self.sysctl("net.ipv4.ip_forward"),
        }


@pytest.fixture
def host(netns: type[Netns], tmp_path: Path, backend: str) -> Iterator[Host]:
    ns = netns("dmn")
    peer = netns("dmn-lan")
    veth(ns, "eth0", peer, "eth1")
    ns.run("ip addr add 192.168.100.2/24 dev eth0")
    ns.run("ip addr add fd00:100::2/64 dev eth0 nodad")
    # A hardened host, as on the seed: strict reverse-path filtering everywhere.
    ns.run("sysctl -q -w net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1")
    h = Host(ns, tmp_path, backend)
    h.tun_up()
    try:
        yield h
    finally:
        for d in h.daemons:
            d.close()


def change_records_are_well_formed(d: DaemonProc) -> None:
    for r in d.changes():
        assert r["TAGROUTED_ACTION"] in ("added", "removed", "replaced", "set"), r
        assert r["TAGROUTED_OBJECT"] in ("route", "rule", "sysctl", "chain", "jump", "table", "set",
                                         "element", "counter", "conflict"), r
        assert r["TAGROUTED_REASON"] in ("start", "reload", "link", "drift", "resync", "stop", "down"), r
        assert r["MESSAGE"].startswith(r["TAGROUTED_ACTION"]), r
        assert r["SYSLOG_IDENTIFIER"] == "tagrouted"


# ---- start, status, notify -----------------------------------------------------------------
def test_start_converges_tells_systemd_and_answers_status(host: Host) -> None:
    d = host.daemon()
    d.wait_ready()
    assert host.in_place(), host.snapshot()
    # READY=1 only after the first converge: by then every change of it was recorded.
    notified = d.notified()
    assert notified.index("READY=1") >= 0
    status_lines = [n for n in notified if n.startswith("STATUS=")]
    assert status_lines and "in sync" in status_lines[0] and "tunnel tun0 up" in status_lines[0]
    start = d.changes("start")
    messages = [r["MESSAGE"] for r in start]
    assert len(messages) == len(set(messages)), "one record per change"
    assert "added rule fwmark 0x2a/0xff lookup 42 pref 1042" in messages
    assert any(r["TAGROUTED_OBJECT"] == "route" and "dev tun0 table 42" in r["MESSAGE"] for r in start)
    assert any(r["TAGROUTED_OBJECT"] == "sysctl" and "tun0.rp_filter=2" in r["MESSAGE"] for r in start)
    chain = "TAGROUTED-FORWARD" if host.backend == "iptables-legacy" else "chain forward"
    assert any(r["TAGROUTED_OBJECT"] == "chain" and chain in r["MESSAGE"] for r in start)
    assert all(r["PRIORITY"] == 6 for r in start)
    change_records_are_well_formed(d)

    status = d.status()
    assert status["pid"] == d.pid
    assert status["roles"] == ["vpn-client"]
    assert status["firewall_backend"] == host.backend
    assert status["config"] == str(host.config)
    assert status["tunnel_interface"] == "tun0" and status["tunnel_up"] is True
    assert status["in_sync"] is True and status["ready"] is True
    assert status["last_error"] is None and status["repairs"] == 0
    assert status["last_change"]["message"] in messages
    assert status["last_change"]["reason"] == "start" and status["last_converge"]["trigger"]
    assert status["version"] and status["started"] > 0
    assert [s["name"] for s in status["services"]] == ["web", "echo", "web6"]
    assert all(s["packets"] == 0 and s["bytes"] == 0 for s in status["services"]), status["services"]
    human = d.ctl("status")
    assert human.returncode == 0 and "tun0 up" in human.stdout and "in sync:" in human.stdout
    assert f"firewall:     {host.backend} (firewall.backend)" in human.stdout
    assert any(f"firewall backend: {host.backend}" in r["MESSAGE"] for r in d.all_records())

    # The socket is root's alone, from its first instant.
    sock = host.run_dir / "tagrouted.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert d.stop() == 0
    assert "STOPPING=1" in d.notified()
    assert host.in_place(), "on_stop: keep (the default) leaves the state in place"
    assert not sock.exists()


def test_counters_count_forwarded_packets(host: Host) -> None:
    """A packet for the web service forwarded from the tunnel into the LAN shows in status."""
    d = host.daemon()
    d.wait_ready()
    # Make the FORWARD accept match: a packet arrives on tun0 for 192.168.100.3:443.
    host.ns.run("ip neigh add 192.168.100.3 lladdr 02:00:00:00:00:03 dev eth0")
    # Loose rp_filter wants a way back to the source and an address on tun0 (as OpenVPN gives it).
    host.ns.run("ip route add default via 192.168.100.1 dev eth0")
    host.ns.run("ip addr add 10.8.0.2/24 dev tun0")
    writer = host.ns.popen([sys.executable, "-c", TUN_WRITER, "tun0"], stdout=subprocess.DEVNULL)
    assert writer.wait(20) == 0

    def counted() -> dict[str, object] | None:
        web = next(s for s in d.status()["services"] if s["name"] == "web")
        return web if web["packets"] and web["packets"] >= 3 else None
    web = wait_for(counted, timeout=10, what="the web service's packet counter")
    assert web["bytes"] >= 3 * 40  # type: ignore[operator]
    if host.backend == "nftables":
        # Named counters survive a reload that keeps the service (a new service is added
        # beside it); the legacy backend rewrites the chain, and its counters with it.
        host.config.write_text(with_service(host.base, NEW_SERVICE))
        assert d.ctl("reload").returncode == 0
        kept = next(s for s in d.status()["services"] if s["name"] == "web")
        assert kept["packets"] >= web["packets"], (web, kept)


# ---- the tunnel comes and goes -------------------------------------------------------------
def test_tunnel_down_gone_and_back_with_a_new_ifindex(host: Host) -> None:
    d = host.daemon()
    d.wait_ready()
    old_index = host.out("cat /sys/class/net/tun0/ifindex").strip()

    host.ns.run("ip link set tun0 down")
    wait_for(lambda: d.status()["tunnel_up"] is False, what="status: tunnel down")
    table = host.out("ip -4 route show table 42")
    assert "dev tun0" not in table and "unreachable default" in table, table
    assert "tunnel tun0 down" in [n for n in d.notified() if n.startswith("STATUS=")][-1]

    host.ns.run("ip link set tun0 up")
    wait_for(host.in_place, what="converged after tun0 came back up")
    wait_for(lambda: d.status()["tunnel_up"] is True, what="status: tunnel up")

    host.ns.run("ip link del tun0")
    wait_for(lambda: d.status()["tunnel_up"] is False, what="status: tunnel gone")
    # The unreachable fallback stays: tagged replies never leak to the ISP meanwhile.
    assert host.out("ip -4 route show table 42").strip().startswith("unreachable default")
    assert RULE in host.out("ip -4 rule show")
    d.wait_record(lambda r: "tunnel tun0 is gone" in r["MESSAGE"], what="the tunnel-gone record")

    host.tun_up()  # a new tun0: new ifindex, rp_filter back to the strict default
    assert host.out("cat /sys/class/net/tun0/ifindex").strip() != old_index
    wait_for(host.in_place, what="converged after tun0 was recreated")
    link = [r for r in d.changes("link") if r["TAGROUTED_OBJECT"] in ("route", "sysctl")]
    assert any("default dev tun0 table 42" in r["MESSAGE"] for r in link), link
    assert any("tun0.rp_filter=2" in r["MESSAGE"] for r in link), link
    assert not d.changes("drift"), "a tunnel coming and going is not drift"
    change_records_are_well_formed(d)


# The legacy backend's xtables lock is the way to stall a firewall pass from outside (nftables
# transactions take no lock another program can hold, and its timer passes read no firewall).
@pytest.mark.parametrize("backend", ["iptables-legacy"])
def test_tunnel_up_never_waits_behind_a_stuck_firewall_pass(host: Host, tmp_path: Path) -> None:
    """Routing has a lane of its own (issue 15): while the firewall part cannot finish (another
    program holds the xtables lock; the daemon waits up to 5 s, then fails and retries), tun0
    going down and up is still routed at once: its record comes before any lock failure."""
    import fcntl

    lock_path = tmp_path / "xtables.lock"
    d = host.daemon(env={"XTABLES_LOCKFILE": str(lock_path)})
    d.wait_ready()

    def daemon_waits_for_the_lock() -> bool:
        fds = Path(f"/proc/{d.pid}/fd")
        return any(os.readlink(fds / fd) == str(lock_path) for fd in os.listdir(fds)
                   if (fds / fd).is_symlink())

    def lock_failures() -> list[int]:
        return [i for i, r in enumerate(d.all_records()) if "xtables.lock" in r.get("MESSAGE", "")
                or str(lock_path) in r.get("MESSAGE", "")]

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # the resync timer (300 ms) starts a firewall pass, which now waits for our lock
        wait_for(daemon_waits_for_the_lock, what="the firewall part waiting for the xtables lock")
        seen = len(d.all_records())
        host.ns.run("ip link set tun0 down")
        wait_for(lambda: "dev tun0" not in host.out("ip -4 route show table 42"), what="tun0's route gone")
        host.ns.run("ip link set tun0 up")
        wait_for(lambda: "default dev tun0" in host.out("ip -4 route show table 42"), what="tun0's route back")
        records = d.all_records()
        added = [i for i, r in enumerate(records) if i >= seen and r.get("TAGROUTED_OBJECT") == "route"
                 and "default dev tun0 table 42" in r["MESSAGE"] and r["TAGROUTED_ACTION"] == "added"]
        assert added, records[seen:]
        assert records[added[0]]["TAGROUTED_REASON"] == "link"
        failures = lock_failures()
        assert not failures or failures[0] > added[0], [records[i]["MESSAGE"] for i in failures]
    finally:
        os.close(fd)  # releases the lock: the firewall part passes again
    wait_for(lambda: d.status()["in_sync"], timeout=30, what="in sync once the lock is free")
    assert host.in_place()


# ---- drift: someone else changes what is ours ----------------------------------------------
def test_drift_is_repaired_and_logged_as_a_warning(host: Host) -> None:
    d = host.daemon()
    d.wait_ready()

    # systemd-networkd deletes foreign rules when it reconfigures a link: back at once.
    host.ns.run("ip rule del pref 1042")
    wait_for(lambda: RULE in host.out("ip -4 rule show"), what="the rule back")
    rec = d.wait_record(lambda r: r.get("TAGROUTED_REASON") == "drift" and r["TAGROUTED_OBJECT"] == "rule",
                        what="the rule's drift record")
    assert rec["MESSAGE"].startswith("added rule fwmark 0x2a/0xff lookup 42 pref 1042") and "drift" in rec["MESSAGE"]
    assert rec["PRIORITY"] == 4 and rec["TAGROUTED_ACTION"] == "added"

    # Our route deleted by hand.
    host.ns.run("ip route del default dev tun0 table 42")
    wait_for(host.in_place, what="the route back")

    # A flushed chain: rewritten by its nf_tables event, or (iptables-legacy: no event) within
    # the resync interval.
    flush, chain = FLUSH[host.backend]
    host.ns.run(flush)
    wait_for(host.in_place, timeout=10, what="the flushed chain rewritten")
    d.wait_record(lambda r: r.get("TAGROUTED_REASON") == "drift" and r["TAGROUTED_OBJECT"] == "chain"
                  and chain in r["MESSAGE"], what="the chain's drift record")

    # Our jump (or our whole table) deleted, and a sysctl reset by someone (no event for that).
    host.ns.run(DELETE[host.backend])
    host.ns.run("sysctl -q -w net.ipv4.conf.tun0.rp_filter=1")
    wait_for(host.in_place, timeout=10, what="jump or table, and rp_filter back")

    status = d.status()
    assert status["repairs"] >= 5, status
    assert status["in_sync"] is True
    assert d.changes("drift") and all(r["PRIORITY"] == 4 for r in d.changes("drift"))
    assert not d.changes("link") and not d.changes("reload")
    change_records_are_well_formed(d)


FLUSH = {"iptables-legacy": ("iptables-legacy -t filter -F TAGROUTED-FORWARD", "TAGROUTED-FORWARD"),
         "nftables": ("nft flush chain inet tagrouted forward", "chain forward")}
DELETE = {"iptables-legacy": "iptables-legacy -t mangle -D PREROUTING -m comment --comment tagrouted "
                             "-j TAGROUTED-PREROUTING",
          "nftables": "nft delete table inet tagrouted"}


@one_backend
def test_lost_netlink_events_mean_a_full_resync(host: Host) -> None:
    """A tiny receive buffer and a burst of route events overflow the daemon's socket
    (ENOBUFS): it reopens it and resyncs everything, and keeps following events after."""
    d = host.daemon(env={"TAGROUTED_TEST_NL_RCVBUF": "1024"})
    d.wait_ready()
    batch = "".join(f"route add 10.{i // 250}.{i % 250}.0/24 dev eth0 table 100\n" for i in range(3000))
    for _ in range(5):
        host.ns.run(["ip", "-batch", "-"], input=batch)
        host.ns.run("ip route flush table 100")
        if d.status()["netlink_overflows"]:
            break
    wait_for(lambda: d.status()["netlink_overflows"] >= 1, what="an overflow seen")
    d.wait_record(lambda r: "ENOBUFS" in r["MESSAGE"], what="the overflow record")
    host.ns.run("ip rule del pref 1042")
    wait_for(host.in_place, what="events followed after the reopen")
    assert d.status()["in_sync"] is True


# ---- config edits, reload ------------------------------------------------------------------
def forward_rules(host: Host) -> str:
    """Our firewall's forward ACL (both backends name the port: `--dport 2222` / `. tcp . 2222`)."""
    text = host.firewall()
    return re.sub(r" \. tcp \. (\d+)", r" --dport \1", text)


def test_config_edits_in_place_by_rename_and_dir_recreate(host: Host) -> None:
    d = host.daemon()
    d.wait_ready()

    # In place, as `echo >>` or an editor without backup files does.
    with open(host.config, "w") as f:
        f.write(with_service(host.base, NEW_SERVICE))
    wait_for(lambda: "--dport 2222" in forward_rules(host), what="the new service from an in-place edit")
    d.wait_record(lambda r: r.get("TAGROUTED_REASON") == "reload"
                  and r["TAGROUTED_OBJECT"] in ("chain", "element"), what="the reload's firewall record")
    d.wait_notified("READY=1", count=2)  # RELOADING=1 ... READY=1 around it
    notified = d.notified()
    assert "RELOADING=1" in notified and notified.index("RELOADING=1") > notified.index("READY=1")

    # Write-and-rename, as vim, sed -i and configuration tools do.
    tmp = host.cfg_dir / ".tagrouted.yaml.tmp"
    tmp.write_text(with_service(host.base, NEW_SERVICE + "  - {name: ssh, proto: tcp, port: 2200, address: 192.168.100.3}\n"))
    os.replace(tmp, host.config)
    wait_for(lambda: "--dport 2200" in forward_rules(host), what="the new service from a rename")

    # The whole directory replaced (a deployment tool): still followed.
    shutil.rmtree(host.cfg_dir)
    host.cfg_dir.mkdir()
    host.config.write_text(with_service(host.base, "  - {name: git, proto: tcp, port: 9418, address: 192.168.100.3}\n"))
    wait_for(lambda: "--dport 9418" in forward_rules(host) and "--dport 2200" not in forward_rules(host),
             what="the config from a recreated directory")
    assert host.in_place()
    assert [s["name"] for s in d.status()["services"]] == ["web", "echo", "web6", "git"]
    change_records_are_well_formed(d)


def test_bad_edit_keeps_the_old_state_and_reload_fails(host: Host) -> None:
    d = host.daemon()
    d.wait_ready()
    before = host.snapshot()
    host.config.write_text(host.base.replace("port: 7000", "port: 70000"))
    d.wait_record(lambda r: re.search(rf"{re.escape(str(host.config))}:4: services\[1\]\.port", r["MESSAGE"])
                  is not None, what="the problem line in the log")
    status = d.status()
    assert status["config_errors"] and ":4: services[1].port" in status["config_errors"][0]
    assert "config rejected" in status["last_error"]["message"]
    assert [s["name"] for s in status["services"]] == ["web", "echo", "web6"], "the old config stays"

    res = d.ctl("reload")
    assert res.returncode == 1, res
    assert f"{host.config}:4: services[1].port" in res.stderr and "rejected" in res.stderr
    # After a resync interval or two, still exactly the old state.
    d.wait_record(lambda r: r.get("MESSAGE", "").startswith("config") and "rejected" in r["MESSAGE"],
                  what="the rejection record")
    wait_for(lambda: d.status()["passes"] >= status["passes"] + 2, what="two more passes")
    assert host.snapshot() == before

    # SIGHUP with the good file back: applied; `reload` agrees.
    host.config.write_text(with_service(host.base, NEW_SERVICE))
    d.signal(signal.SIGHUP)
    wait_for(lambda: "--dport 2222" in forward_rules(host), what="the fixed config applied")
    res = d.ctl("reload")
    assert res.returncode == 0 and "reloaded" in res.stdout, res
    assert d.status()["config_errors"] == []


@one_backend
def test_a_failing_first_converge_is_retried_and_ready_waits_for_success(host: Host) -> None:
    """IPv6 off on tun0: the kernel refuses table 42's IPv6 route (EACCES). The daemon applies
    what it can, says so in STATUS=, retries on its own timer (nothing else changes), and
    sends READY=1 only once a converge succeeded."""
    host.ns.run("sysctl -q -w net.ipv6.conf.tun0.disable_ipv6=1")
    d = host.daemon()
    d.wait_listening()
    wait_for(lambda: (d.status()["last_error"] or {}).get("message"), what="the first failure")
    status = d.status()
    assert status["ready"] is False and status["in_sync"] is False
    assert "EACCES" in status["last_error"]["message"], status["last_error"]
    assert RULE in host.out("ip -4 rule show"), "what can be applied is applied"
    passes = status["passes"]
    wait_for(lambda: d.status()["passes"] >= passes + 2, what="retries on the timer")
    assert "READY=1" not in d.notified()
    assert any(n.startswith("STATUS=starting") and "EACCES" in n for n in d.notified())
    errors = [r for r in d.all_records() if r["LEVEL"] == "ERROR"]
    assert len(errors) == 1, "one record per distinct error, not one per retry"

    host.ns.run("sysctl -q -w net.ipv6.conf.tun0.disable_ipv6=0")
    d.wait_ready()
    wait_for(host.in_place, what="converged after the fix")
    status = d.status()
    assert status["ready"] is True and status["in_sync"] is True
    assert "EACCES" in status["last_error"]["message"], "the last error stays on record"
    d.wait_record(lambda r: r["MESSAGE"].startswith("recovered"), what="the recovery record")


# ---- crash and restart, stop ---------------------------------------------------------------
def test_sigkill_and_restart_adopts_without_duplicates(host: Host) -> None:
    d1 = host.daemon()
    d1.wait_ready()
    before = host.snapshot()
    assert d1.kill() == -signal.SIGKILL
    assert (host.run_dir / "tagrouted.sock").exists(), "a crash leaves its socket behind"
    assert d1.ctl("status").returncode == 3

    d2 = host.daemon()
    d2.wait_ready()
    assert host.snapshot() == before
    assert host.in_place()
    assert d2.changes() == [], "adopted: nothing added, removed or replaced"
    assert d2.status()["pid"] == d2.pid

    # A second daemon on the same run directory refuses to start.
    d3 = host.daemon()
    assert d3.proc is not None and d3.proc.wait(20) == 1
    assert any("another tagrouted" in r["MESSAGE"] for r in d3.all_records())
    assert d2.alive() and d2.status()["pid"] == d2.pid


def test_on_stop_remove_restores_the_host(host: Host) -> None:
    pristine = host.snapshot()
    host.config.write_text(host.base + "on_stop: remove\n")
    d = host.daemon()
    d.wait_ready()
    assert host.in_place()
    assert d.stop() == 0
    stop = d.changes("stop")
    assert any(r["TAGROUTED_ACTION"] == "removed" and r["TAGROUTED_OBJECT"] == "rule" for r in stop), stop
    assert host.snapshot() == pristine


def test_bad_config_at_start_applies_nothing(host: Host) -> None:
    pristine = host.snapshot()
    host.config.write_text("roles: [vpn-client]\nvpn_client: {tunnel_interface: tun0}\n")
    d = host.daemon()
    assert d.proc is not None and d.proc.wait(30) == 1
    assert any("vpn_client" in r["MESSAGE"] and str(host.config) in r["MESSAGE"] for r in d.all_records())
    assert "READY=1" not in d.notified()
    assert host.snapshot() == pristine


# ---- systemd watchdog ----------------------------------------------------------------------
@one_backend
def test_watchdog_pings_from_the_loop_and_the_test_fault_stops_them(host: Host) -> None:
    d = host.daemon(watchdog_usec=400_000, env={"TAGROUTED_TEST_FAULTS": "1"})
    d.wait_ready()
    d.wait_notified("WATCHDOG=1", count=4, timeout=10)  # every 0.2 s
    d.signal(signal.SIGUSR2)
    d.wait_record(lambda r: "no more watchdog pings" in r["MESSAGE"], what="the fault switch taken")
    pings = d.notified().count("WATCHDOG=1")
    # Five watchdog half-periods later, still no new ping (and the daemon is alive).
    seen = d.status()["passes"]
    wait_for(lambda: d.status()["passes"] >= seen + 3, what="three resync passes")
    assert d.notified().count("WATCHDOG=1") <= pings + 1
    assert d.alive()


@one_backend
def test_sigusr2_is_ignored_without_the_test_switch(host: Host) -> None:
    d = host.daemon(watchdog_usec=400_000)
    d.wait_ready()
    d.signal(signal.SIGUSR2)
    pings = d.notified().count("WATCHDOG=1")
    d.wait_notified("WATCHDOG=1", count=pings + 3, timeout=10)
    assert not any("no more watchdog pings" in r["MESSAGE"] for r in d.all_records())


# ---- the control socket --------------------------------------------------------------------
def raw_request(host: Host, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(host.run_dir / "tagrouted.sock"))
        with contextlib.suppress(BrokenPipeError):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@one_backend
def test_control_socket_refuses_garbage_strangers_and_huge_lines(host: Host) -> None:
    d = host.daemon()
    d.wait_ready()
    for data, error in [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"command": "format-disk"}\n', "unknown command"),
        (b'{"command": "status"' + b" " * (70 * 1024) + b"}\n", "longer than"),
    ]:
        reply = json.loads(raw_request(host, data))
        assert reply["ok"] is False and error in reply["error"], reply
    # A client that connects and says nothing does not block others.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(host.run_dir / "tagrouted.sock"))
        assert d.status()["in_sync"] is True
    # Not root: refused by peer credentials even with the file's permission check bypassed.
    res = host.ns.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
                       TAGROUTECTL, "--run-dir", str(host.run_dir), "status"], check=False)
    assert res.returncode == 3 and "uid 65534 is not root" in res.stderr, res
    # Without the capability the socket's 0600 alone keeps it out.
    res = host.ns.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       TAGROUTECTL, "--run-dir", str(host.run_dir), "status"], check=False)
    assert res.returncode == 3 and "permission denied" in res.stderr.lower(), res
    assert d.alive() and d.status()["in_sync"] is True


@one_backend
def test_tagroutectl_without_a_daemon_exits_3(host: Host) -> None:
    host.run_dir.mkdir(mode=0o700)
    d = DaemonProc(host.ns, host.config, host.run_dir, notify=False)
    for cmd in ("status", "reload"):
        res = d.ctl(cmd)
        assert res.returncode == 3 and "not running" in res.stderr, res
    d.close()


# ---- journald ------------------------------------------------------------------------------
@one_backend
def test_journald_records_carry_the_fields(host: Host, tmp_path: Path) -> None:
    """Under systemd (NOTIFY_SOCKET set, journald's socket there) records go to journald with
    MESSAGE, PRIORITY and the TAGROUTED_* fields; a stand-in journald in a private mount
    namespace receives them in journald's native protocol."""
    out = tmp_path / "journal.jsonl"
    helper = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable,
         str(Path(__file__).parent / "daemon_fake_journald.py"), str(out), host.ns.name, "--",
         str(Path(sys.executable).parent / "tagrouted"), "--config", str(host.config),
         "--run-dir", str(host.run_dir)],
        start_new_session=True)
    try:
        def records() -> list[dict[str, str]]:
            if helper.poll() is not None:
                raise AssertionError(f"the journald stand-in exited {helper.returncode}")
            return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

        wait_for(lambda: any(r.get("NOTIFY", "").startswith("READY=1") for r in records()),
                 timeout=30, what="READY=1")
        host.ns.run("ip rule del pref 1042")
        wait_for(lambda: any(r.get("TAGROUTED_REASON") == "drift" for r in records()), what="a drift record")
        journal = [r for r in records() if "MESSAGE" in r]
        assert all(r["SYSLOG_IDENTIFIER"] == "tagrouted" for r in journal), journal
        changes = [r for r in journal if "TAGROUTED_ACTION" in r]
        start = [r for r in changes if r["TAGROUTED_REASON"] == "start"]
        assert any(r["MESSAGE"] == "added rule fwmark 0x2a/0xff lookup 42 pref 1042" and r["PRIORITY"] == "6"
                   and r["TAGROUTED_OBJECT"] == "rule" and r["TAGROUTED_ACTION"] == "added" for r in start), start
        drift = [r for r in changes if r["TAGROUTED_REASON"] == "drift"]
        assert drift[0]["PRIORITY"] == "4" and RULE in drift[0]["MESSAGE"], drift
        for r in changes:
            assert r["MESSAGE"].startswith(r["TAGROUTED_ACTION"]), r
        assert not out.read_text().count('"LEVEL"'), "journald records, not the JSON test lines"
    finally:
        if helper.poll() is None:
            os.killpg(helper.pid, signal.SIGTERM)
        assert helper.wait(30) == 0


# ---- metrics -------------------------------------------------------------------------------
METRICS = 'metrics: {listen: "127.0.0.1:9542"}\n'


def test_metrics_follow_the_tunnel_repairs_and_reloads(host: Host) -> None:
    host.config.write_text(host.base + METRICS)
    d = host.daemon()
    d.wait_ready()
    m = scrape(host.ns, "127.0.0.1:9542")  # parsed by prometheus_client.parser
    assert m["tagrouted_in_sync"] == 1 and m["tagrouted_held_down"] == 0
    assert m['tagrouted_tunnel_up{interface="tun0"}'] == 1
    assert m[f'tagrouted_build_info{{backend="{host.backend}",version="{d.status()["version"]}"}}'] == 1
    for name in ("web", "echo", "web6"):
        assert m[f'tagrouted_service_packets_total{{service="{name}"}}'] == 0
        assert m[f'tagrouted_service_bytes_total{{service="{name}"}}'] == 0
    assert m['tagrouted_repairs_total{object="rule"}'] == 0
    assert m['tagrouted_reloads_total{result="ok"}'] == m['tagrouted_reloads_total{result="rejected"}'] == 0
    assert m["tagrouted_pass_duration_seconds_count"] >= 1 and m["tagrouted_conflicts"] == 0

    def metric(name: str) -> float:
        return scrape(host.ns, "127.0.0.1:9542")[name]

    host.ns.run("ip link set tun0 down")
    wait_for(lambda: metric('tagrouted_tunnel_up{interface="tun0"}') == 0, what="tunnel_up 0")
    host.ns.run("ip link set tun0 up")
    wait_for(lambda: metric('tagrouted_tunnel_up{interface="tun0"}') == 1, what="tunnel_up 1 again")
    wait_for(lambda: metric("tagrouted_in_sync") == 1, what="in sync after the flap")

    host.ns.run("ip rule del pref 1042")
    wait_for(lambda: metric('tagrouted_repairs_total{object="rule"}') >= 1, what="the rule's repair counted")
    host.ns.run(FLUSH[host.backend][0])
    wait_for(lambda: metric('tagrouted_repairs_total{object="chain"}') >= 1, what="the chain's repair counted")
    assert metric('tagrouted_repairs_total{object="route"}') == 0, "a flap is no repair"

    host.config.write_text(host.base.replace("port: 7000", "port: 70000") + METRICS)
    assert d.ctl("reload").returncode == 1
    m = scrape(host.ns, "127.0.0.1:9542")
    assert m['tagrouted_reloads_total{result="rejected"}'] >= 1, "the file edit or the reload"
    assert m['tagrouted_reloads_total{result="ok"}'] == 0
    host.config.write_text(with_service(host.base, NEW_SERVICE) + METRICS)
    assert d.ctl("reload").returncode == 0
    m = scrape(host.ns, "127.0.0.1:9542")
    assert m['tagrouted_reloads_total{result="ok"}'] >= 1
    assert m['tagrouted_service_packets_total{service="admin"}'] == 0, "the new service is exported"


@one_backend
def test_metrics_listen_on_ipv6_a_unix_socket_and_move_on_reload(host: Host) -> None:
    host.config.write_text(host.base + 'metrics: {listen: "[::1]:9543"}\n')
    d = host.daemon()
    d.wait_ready()
    assert scrape(host.ns, "[::1]:9543")["tagrouted_in_sync"] == 1
    sock = host.run_dir / "metrics.sock"
    host.config.write_text(host.base + f"metrics: {{listen: {sock}}}\n")
    assert d.ctl("reload").returncode == 0
    assert scrape(host.ns, str(sock))["tagrouted_in_sync"] == 1
    assert d.status()["metrics_listen"] == str(sock)
    with pytest.raises(RuntimeError, match="Connection refused"):
        scrape(host.ns, "[::1]:9543")  # the old listener is closed
    host.config.write_text(host.base)  # metrics off
    assert d.ctl("reload").returncode == 0
    assert not sock.exists() and d.status()["metrics_listen"] is None
    assert d.stop() == 0


@one_backend
def test_metrics_address_in_use_stops_the_start(host: Host) -> None:
    host.config.write_text(host.base + METRICS)
    first = host.daemon()
    first.wait_ready()
    second_run = host.run_dir.parent / "run2"
    second = DaemonProc(host.ns, host.config, second_run)
    host.daemons.append(second)
    second.start()
    assert second.proc is not None and second.proc.wait(30) == 1
    assert any("metrics.listen 127.0.0.1:9542" in r["MESSAGE"] and "in use" in r["MESSAGE"]
               for r in second.all_records()), [r["MESSAGE"] for r in second.all_records()]
    assert first.alive() and scrape(host.ns, "127.0.0.1:9542")["tagrouted_in_sync"] == 1


# ---- one owner of the kernel state: apply and down with a daemon running ---------------------
def test_down_with_a_daemon_stays_down_until_apply_or_sighup(host: Host) -> None:
    pristine = host.snapshot()
    host.config.write_text(host.base + METRICS)
    d = host.daemon(watchdog_usec=400_000)
    d.wait_ready()
    assert host.in_place()

    res = d.ctl("down")
    assert res.returncode == 0, res
    assert "removed rule fwmark 0x2a/0xff lookup 42 pref 1042" in res.stdout
    assert f"held down: tagrouted (pid {d.pid})" in res.stdout
    assert host.snapshot() == pristine, "everything removed, sysctls restored"
    down = d.changes("down")
    assert any(r["TAGROUTED_OBJECT"] == "rule" and r["TAGROUTED_ACTION"] == "removed" for r in down), down

    # The world moves: the tunnel flaps, the file is edited, resync timers pass. Nothing comes
    # back, while status and metrics still follow the tunnel.
    host.ns.run("ip link set tun0 down")
    wait_for(lambda: scrape(host.ns, "127.0.0.1:9542")['tagrouted_tunnel_up{interface="tun0"}'] == 0,
             what="tunnel_up 0 while held down")
    host.ns.run("ip link set tun0 up")
    wait_for(lambda: d.status()["tunnel_up"] is True, what="tunnel up again in status while held down")
    host.config.write_text(with_service(host.base, NEW_SERVICE) + METRICS)
    pings = d.notified().count("WATCHDOG=1")
    d.wait_notified("WATCHDOG=1", count=pings + 10, timeout=30)  # >= 2 s: several resync intervals
    assert host.snapshot() == pristine
    assert not d.changes("drift") and not d.changes("link")

    status = d.status()
    assert status["held_down"] is True and status["in_sync"] is False
    assert all(svc["packets"] is None for svc in status["services"]), "the rules that counted are gone"
    human = d.ctl("status").stdout
    assert "HELD DOWN by `tagroutectl down`" in human and "in sync:     yes" not in human, human
    assert any(n.startswith("STATUS=HELD DOWN") for n in d.notified())
    m = scrape(host.ns, "127.0.0.1:9542")
    assert m["tagrouted_held_down"] == 1 and m["tagrouted_in_sync"] == 0
    assert d.ctl("diff").returncode == 2, "diff tells the truth: the state is not there"

    # `apply` brings it back through the daemon, with the edited file.
    res = d.ctl("apply")
    assert res.returncode == 0, res
    assert "added rule fwmark 0x2a/0xff lookup 42 pref 1042" in res.stdout
    assert f"applied by the running tagrouted (pid {d.pid})" in res.stderr
    assert host.in_place() and "--dport 2222" in forward_rules(host)
    status = d.status()
    assert status["held_down"] is False and status["in_sync"] is True

    # Down again; SIGHUP releases it too.
    assert d.ctl("down").returncode == 0
    assert host.snapshot() == pristine
    d.signal(signal.SIGHUP)
    wait_for(host.in_place, what="back after SIGHUP")
    wait_for(lambda: d.status()["in_sync"] is True, what="in sync after SIGHUP")
    assert {r["TAGROUTED_REASON"] for r in d.changes()} == {"start", "down", "reload"}, "no drift, no link"


def test_apply_with_a_daemon_is_carried_out_by_the_daemon(host: Host) -> None:
    d = host.daemon()
    d.wait_ready()
    passes = d.status()["passes"]
    res = d.ctl("apply")
    assert res.returncode == 0 and "in sync: nothing to change" in res.stdout, res
    assert f"applied by the running tagrouted (pid {d.pid})" in res.stderr

    # The file watch may have applied the edit already; either way apply returns once it is in.
    host.config.write_text(with_service(host.base, NEW_SERVICE))
    res = d.ctl("apply")
    assert res.returncode == 0, res
    assert "--dport 2222" in forward_rules(host)
    assert [s["name"] for s in d.status()["services"]][-1] == "admin"
    assert d.status()["passes"] > passes and not d.changes("drift"), "nobody fought anybody"

    # A broken file: refused by the daemon, its state kept.
    before = host.snapshot()
    host.config.write_text(host.base.replace("port: 7000", "port: 70000"))
    res = d.ctl("apply")
    assert res.returncode == 1 and f"{host.config}:4: services[1].port" in res.stderr, res
    assert "apply rejected" in res.stderr and host.snapshot() == before

    # Another file than the daemon's: refused, nothing touched.
    other = host.cfg_dir / "other.yaml"
    other.write_text(host.base)
    res = host.ns.run([TAGROUTECTL, "--config", str(other), "--run-dir", str(host.run_dir), "apply"], check=False)
    assert res.returncode == 1 and f"runs {host.config}, not {other}" in res.stderr, res
    assert host.snapshot() == before


def test_apply_and_down_without_a_running_daemon_work_as_before(host: Host) -> None:
    """A crashed daemon leaves a stale socket: nobody listens, so the command does the work."""
    pristine = host.snapshot()
    d = host.daemon()
    d.wait_ready()
    assert d.kill() == -signal.SIGKILL
    assert (host.run_dir / "tagrouted.sock").exists()
    res = d.ctl("down")
    assert res.returncode == 0 and "removed rule fwmark 0x2a" in res.stdout and "held down" not in res.stdout, res
    assert host.snapshot() == pristine
    res = d.ctl("apply")
    assert res.returncode == 0 and "added rule fwmark 0x2a" in res.stdout and "daemon" not in res.stderr, res
    assert host.in_place()


def test_a_daemon_holding_the_run_directory_without_answering_is_not_fought(host: Host) -> None:
    """Starting or stopping, a daemon holds its run directory's lock before and after its socket
    answers: apply and down refuse rather than write beside it."""
    pristine = host.snapshot()
    host.run_dir.mkdir()
    host.run_dir.chmod(0o700)  # a run directory tagrouted trusts: root's, 0700
    lock = os.open(host.run_dir / "tagrouted.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.write(lock, b"4242\n")
        ctl = DaemonProc(host.ns, host.config, host.run_dir, notify=False)
        for cmd in ("apply", "down"):
            res = ctl.ctl(cmd)
            assert res.returncode == 1 and "tagrouted (pid 4242) holds" in res.stderr, res
        assert host.snapshot() == pristine
    finally:
        os.close(lock)
