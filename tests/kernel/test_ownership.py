"""Issue 16 in the real kernel: tagrouted touches only what is its own, trusts only a run directory
that is root's, and never hangs on what it reads. Each test builds its own namespace.

What a user checks: other tools' rules, routes and chains survive `apply` and `down`; a table
another program fills is refused (naming its routes) instead of swept; a planted record changes
nothing; `down` says when it failed; the plan's sysctl lines work with sysctl(8); accept_ra=2 lands
only where the IPv6 default route is; a FIFO config and a swapped socket neither stall nor fool.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import TAGROUTECTL, DaemonProc
from nslab import CLONE_NEWNET, Netns, kernel_snapshot, veth, wait_for

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "etc" / "tagrouted" / "examples"
CTL = [sys.executable, "-m", "tagrouted.cli"]
NOBODY = 65534
SYSCTLS = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.all.disable_ipv6",
           "net.ipv4.conf.tun0.rp_filter"]


def home_router(netns: type[Netns], name: str) -> Netns:
    """eth0 on a LAN (veth to a peer namespace of ours) and tun0 up: the vpn-client example's links."""
    ns = netns(name)
    peer = netns(name + "-lan")
    veth(ns, "eth0", peer, "eth1")
    ns.run("ip addr add 192.168.100.2/24 dev eth0")
    ns.run("ip addr add fd00:100::2/64 dev eth0 nodad")
    ns.run("ip tuntap add dev tun0 mode tun")
    ns.run("ip link set tun0 up")
    return ns


def ctl(ns: Netns, config: Path | str, run_dir: Path, *args: str) -> tuple[int, str, str]:
    res = ns.run([*CTL, "--config", str(config), "--run-dir", str(run_dir), *args], check=False)
    return res.returncode, res.stdout, res.stderr


def rules(ns: Netns) -> str:
    return ns.out("ip -4 rule show") + ns.out("ip -6 rule show")


# ---- rules, routes and chains of others ----------------------------------------------------

FOREIGN = [
    # Tailscale-like rule into our table, and a rule of another priority to it
    "ip -4 rule add fwmark 0x80000/0xff0000 lookup 42 pref 5270",
    "ip -4 rule add fwmark 0x2a lookup 42 pref 2000",
    # a user's chain that shares our prefix, reached from a built-in chain
    "iptables-legacy -t filter -N TAGROUTED-CUSTOM",
    "iptables-legacy -t filter -A TAGROUTED-CUSTOM -j ACCEPT",
    "iptables-legacy -t filter -A FORWARD -j TAGROUTED-CUSTOM",
    # wg-quick's table
    "ip -4 route add default dev tun0 table 51820",
]


def test_down_on_a_fresh_host_removes_only_brand_exact_objects(netns: type[Netns], tmp_path: Path) -> None:
    """No record, no config: foreign rules, routes in table 42, TAGROUTED-CUSTOM all stay; our
    brand (rule pref 1042 fwmark 42 lookup 42 of any mask, proto 142, TAGROUTED-FORWARD) goes."""
    ns = home_router(netns, "fresh")
    for cmd in FOREIGN:
        ns.run(cmd)
    ns.run("ip -4 route add 10.9.0.0/16 dev tun0 table 42")  # someone else's route in table 42
    before = kernel_snapshot(ns.out, [])
    ns.run("ip -4 rule add fwmark 0x2a/0xff lookup 42 pref 1042")     # ours by brand, another mask
    ns.run("ip -4 route add 10.8.0.0/16 dev tun0 proto 142")          # ours by route protocol
    ns.run("iptables-legacy -t filter -N TAGROUTED-FORWARD")
    ns.run("iptables-legacy -t filter -I FORWARD -m comment --comment tagrouted -j TAGROUTED-FORWARD")
    code, out, err = ctl(ns, tmp_path / "no-such.yaml", tmp_path / "run", "down")
    assert code == 0, out + err
    assert "removed rule fwmark 0x2a/0xff lookup 42 pref 1042" in out, out
    assert kernel_snapshot(ns.out, []) == before


def test_apply_and_down_leave_other_tools_alone(netns: type[Netns], tmp_path: Path) -> None:
    ns = home_router(netns, "others")
    for cmd in FOREIGN:
        ns.run(cmd)
    before = kernel_snapshot(ns.out, [])
    config = EXAMPLES / "vpn-client.yaml"
    code, out, err = ctl(ns, config, tmp_path / "run", "apply")
    assert code == 0, out + err
    for kept in ("fwmark 0x80000/0xff0000 lookup 42", "2000:\tfrom all fwmark 0x2a lookup 42"):
        assert kept in rules(ns), rules(ns)
    assert "default dev tun0" in ns.out("ip -4 route show table 51820")
    assert ctl(ns, config, tmp_path / "run", "diff")[:2] == (0, "")
    code, out, err = ctl(ns, config, tmp_path / "run", "down")
    assert code == 0, out + err
    assert kernel_snapshot(ns.out, []) == before


def test_an_old_mask_of_our_rule_is_still_ours_and_replaced(netns: type[Netns], tmp_path: Path) -> None:
    ns = home_router(netns, "mask")
    ns.run("ip -4 rule add fwmark 0x2a/0xffff lookup 42 pref 1042")
    config = EXAMPLES / "vpn-client.yaml"
    code, out, err = ctl(ns, config, tmp_path / "run", "apply")
    assert code == 0, out + err
    assert "removed rule fwmark 0x2a/0xffff lookup 42 pref 1042" in out, out
    assert "0x2a/0xffff" not in rules(ns)
    assert [x for x in ns.out("ip -4 rule show").splitlines() if x.startswith("1042:")] != []


def test_a_table_another_program_fills_is_refused_naming_its_routes(netns: type[Netns], tmp_path: Path) -> None:
    ns = home_router(netns, "adopt")
    ns.run("ip -4 route add 10.9.0.0/16 dev tun0 table 42")
    ns.run("ip -6 route add fd00:9::/64 dev tun0 table 42")
    before = kernel_snapshot(ns.out, [])
    config = EXAMPLES / "vpn-client.yaml"
    run_dir = tmp_path / "run"
    code, out, err = ctl(ns, config, run_dir, "apply")
    assert code == 1
    assert "table 42 holds routes tagrouted did not make: 10.9.0.0/16 dev tun0 table 42 proto boot" in err \
        or "10.9.0.0/16 dev tun0 table 42 proto 3" in err, err
    assert "fd00:9::/64" in err and "pick another tag.table" in err, err
    after = kernel_snapshot(ns.out, [])
    for key in ("rules4", "rules6", "routes4", "routes6"):
        assert after[key] == before[key], key  # no rule, no route: the table is not ours
    code, _, err = ctl(ns, config, run_dir, "diff")
    assert code == 2 and "did not make" in err
    # Removed (stale routes of an old tool): adopted, and from then on its content is ours.
    ns.run("ip -4 route del 10.9.0.0/16 dev tun0 table 42")
    ns.run("ip -6 route del fd00:9::/64 dev tun0 table 42")
    assert ctl(ns, config, run_dir, "apply")[0] == 0
    assert json.loads((run_dir / "tables.json").read_text())["tables"] == [42]
    ns.run("ip -4 route add 10.7.0.0/16 dev tun0 table 42")
    code, out, err = ctl(ns, config, run_dir, "apply")
    assert code == 0 and "removed route 10.7.0.0/16 dev tun0 table 42" in out, out + err
    assert ctl(ns, config, run_dir, "down")[0] == 0
    assert json.loads((run_dir / "tables.json").read_text()) == {"rules": [], "tables": []}


def test_a_planted_record_of_the_main_table_changes_nothing(netns: type[Netns], tmp_path: Path) -> None:
    """tables.json = [254] once made apply delete every route of the main table."""
    ns = home_router(netns, "planted")
    ns.run("ip -4 route add default via 192.168.100.1")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    (run_dir / "tables.json").write_text("[254]")
    before = kernel_snapshot(ns.out, [])
    for command in ("apply", "down"):
        code, _, err = ctl(ns, EXAMPLES / "vpn-client.yaml", run_dir, command)
        assert code == 1 and "tables.json is not a record tagrouted wrote" in err, err
        assert "table 254 is the kernel's main" in err, err
        now = kernel_snapshot(ns.out, [])
        assert now["routes4"] == before["routes4"] and now["rules4"] == before["rules4"], command


def test_a_planted_original_is_not_restored_and_down_says_it_failed(netns: type[Netns], tmp_path: Path) -> None:
    ns = home_router(netns, "orig")
    run_dir = tmp_path / "run"
    config = EXAMPLES / "vpn-client.yaml"
    assert ctl(ns, config, run_dir, "apply")[0] == 0
    saved = json.loads((run_dir / "sysctl-originals.json").read_text())
    saved["net.ipv6.conf.all.disable_ipv6"] = "1"
    (run_dir / "sysctl-originals.json").write_text(json.dumps(saved))
    code, out, err = ctl(ns, config, run_dir, "down")
    assert code == 1, out + err
    assert "disable_ipv6" in err and "not a sysctl tagrouted changes" in err, err
    assert ns.out("sysctl -n net.ipv6.conf.all.disable_ipv6").strip() == "0"
    assert "lookup 42" not in rules(ns), "the other parts of down still ran"


# ---- the run directory ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["symlink", "mode-0755", "owner-nobody", "parent-0777"])
def test_an_untrusted_run_dir_is_refused_and_nothing_applied(netns: type[Netns], tmp_path: Path, how: str) -> None:
    ns = home_router(netns, "rd")
    run_dir = tmp_path / "run"
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        run_dir.symlink_to(tmp_path / "elsewhere")
    elif how == "parent-0777":
        (tmp_path / "open").mkdir()
        (tmp_path / "open").chmod(0o777)
        run_dir = tmp_path / "open" / "run"
    else:
        run_dir.mkdir(mode=0o700)
        if how == "mode-0755":
            run_dir.chmod(0o755)
        else:
            os.chown(run_dir, NOBODY, NOBODY)
    before = kernel_snapshot(ns.out, SYSCTLS)
    for command in ("apply", "down", "diff"):
        code, _, err = ctl(ns, EXAMPLES / "vpn-client.yaml", run_dir, command)
        assert code == 1 and "run directory refused" in err, (command, err)
    assert kernel_snapshot(ns.out, SYSCTLS) == before
    d = DaemonProc(ns, EXAMPLES / "vpn-client.yaml", run_dir, notify=False).start()
    try:
        assert d.proc is not None and d.proc.wait(30) == 1
    finally:
        d.close()
    assert any("run directory refused" in r.get("MESSAGE", "") for r in d.all_records()), d.all_records()
    assert kernel_snapshot(ns.out, SYSCTLS) == before


def test_a_planted_lock_symlink_never_receives_the_pid(netns: type[Netns], tmp_path: Path) -> None:
    ns = home_router(netns, "lock")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (run_dir / "tagrouted.lock").symlink_to(victim)
    d = DaemonProc(ns, EXAMPLES / "vpn-client.yaml", run_dir, notify=False).start()
    try:
        assert d.proc is not None and d.proc.wait(30) == 1
    finally:
        d.close()
    assert victim.read_text() == "precious\n"
    assert any("is a symlink" in r.get("MESSAGE", "") for r in d.all_records()), d.all_records()


# ---- sysctls -------------------------------------------------------------------------------

def test_plan_prints_sysctl_keys_sysctl_8_accepts(netns: type[Netns], tmp_path: Path) -> None:
    ns = netns("dot")
    ns.run("ip tuntap add dev tun0.100 mode tun")
    config = tmp_path / "dot.yaml"
    config.write_text("roles: [vpn-client]\nvpn_client: {tunnel_interface: tun0.100, lan_interface: eth0}\n")
    code, out, err = ctl(ns, config, tmp_path / "run", "plan")
    assert code == 0, err
    lines = [x for x in out.splitlines() if x.startswith("sysctl -w ") and "tun0" in x]
    assert lines == ["sysctl -w net.ipv4.conf.tun0/100.rp_filter=2"], out
    ns.run(lines[0])  # sysctl(8) refused the dotted form
    assert ns.out("cat /proc/sys/net/ipv4/conf/tun0.100/rp_filter").strip() == "2"


def test_accept_ra_2_only_where_the_ipv6_default_route_is(netns: type[Netns], tmp_path: Path) -> None:
    """A gateway with IPv6: its uplink (default route) keeps RAs; an unnamed LAN link does not
    start trusting a rogue RA's default route."""
    ns = netns("ra")
    peer = netns("ra-peer")
    ns.run("sysctl -qw net.ipv6.conf.default.accept_dad=0")
    veth(ns, "up0", peer, "p0")
    veth(ns, "eth0", peer, "p1")
    veth(ns, "lan1", peer, "p2")
    for link in ("up0", "eth0", "lan1"):
        ns.run(f"sysctl -qw net.ipv6.conf.{link}.accept_ra=1")
    ns.run("ip -6 addr add 2001:db8:f::2/64 dev up0 nodad")
    ns.run("ip -6 route add default via 2001:db8:f::1 dev up0")
    ns.run("ip addr add 192.168.200.1/24 dev eth0")  # where the example's via is
    ns.run("ip addr add fd00:200::1/64 dev eth0 nodad")
    config = tmp_path / "gw.yaml"
    config.write_text((EXAMPLES / "remote-server.yaml").read_text())
    run_dir = tmp_path / "run"
    code, out, err = ctl(ns, config, run_dir, "apply")
    assert code == 0, out + err

    def ra(link: str) -> str:
        return ns.out(f"sysctl -n net.ipv6.conf.{link}.accept_ra").strip()

    assert (ra("up0"), ra("eth0"), ra("lan1")) == ("2", "2", "1")  # default route, named, neither
    assert ctl(ns, config, run_dir, "down")[0] == 0
    assert (ra("up0"), ra("eth0"), ra("lan1")) == ("1", "1", "1")


# ---- never hang, never be fooled --------------------------------------------------------------

def test_a_fifo_in_the_configs_place_stalls_no_pass(netns: type[Netns], tmp_path: Path) -> None:
    ns = home_router(netns, "fifo")
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "tagrouted.yaml"
    config.write_text((EXAMPLES / "vpn-client.yaml").read_text() + "resync_interval: 200ms\n")
    with DaemonProc(ns, config, tmp_path / "run") as d:
        d.wait_ready()
        config.unlink()
        os.mkfifo(config)
        passes = d.status()["passes"]
        wait_for(lambda: d.status()["passes"] >= passes + 3, timeout=15, what="passes go on")
        ns.run("ip -4 rule del pref 1042")
        wait_for(lambda: "1042:" in ns.out("ip -4 rule show"), timeout=15, what="drift repaired")
        res = d.ctl("reload")
        assert res.returncode == 1 and "not a regular file (a FIFO)" in res.stderr, res
        t0 = time.monotonic()
        assert d.stop(timeout=20) == 0
        stopped_in = time.monotonic() - t0
    assert stopped_in < 20  # bounded by stop(); the FIFO once held SIGTERM for 60 s


def test_deeply_nested_json_on_the_socket_gets_a_reply(netns: type[Netns], tmp_path: Path) -> None:
    ns = home_router(netns, "json")
    with DaemonProc(ns, EXAMPLES / "vpn-client.yaml", tmp_path / "run") as d:
        d.wait_ready()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(tmp_path / "run" / "tagrouted.sock"))
            s.sendall(b"[" * 60_000 + b"\n")
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False and "nested deeper than 32" in reply["error"], reply
        assert d.status()["in_sync"] is True


def _fake_daemon(ns: Netns, path: Path, socket_owner: int, uid: int, reply: bytes) -> int:
    """A process in `ns` answering `reply` on a socket at `path` that root bound and gave to
    `socket_owner`, listening as `uid` (SO_PEERCRED reports the listener's credentials)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
            if ctypes.CDLL(None).setns(fd, CLONE_NEWNET) != 0:  # a path socket is reached only
                raise OSError("setns failed")                    # from its own netns
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chown(path, socket_owner, socket_owner)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock.listen(4)
            os.write(wfd, b"listening")
            while True:
                conn, _ = sock.accept()
                with contextlib.suppress(OSError):  # the client may hang up first
                    conn.recv(65536)
                    conn.sendall(reply)
                conn.close()
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        assert r.read(9) == b"listening"
    return pid


@pytest.mark.parametrize("swap", ["socket-owned-by-nobody", "listener-runs-as-nobody"])
def test_tagroutectl_believes_only_root(netns: type[Netns], tmp_path: Path, swap: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sock = run_dir / "tagrouted.sock"
    ns = netns("fake")
    owner, uid = (NOBODY, 0) if swap == "socket-owned-by-nobody" else (0, NOBODY)
    pid = _fake_daemon(ns, sock, owner, uid, b'{"ok": true, "changes": [], "status": {}}\n')
    try:
        for command in ("reload", "status"):
            res = ns.run([TAGROUTECTL, "--run-dir", str(run_dir), command], check=False)
            assert res.returncode == 1 and "reloaded" not in res.stdout, res
            why = "owned by uid 65534" if swap == "socket-owned-by-nobody" else "runs as uid 65534, not root"
            assert why in res.stderr, res
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
