"""Issue 14 in the real kernel: a home VPN client with a tunnel to each of two public servers
(tun0, wg0: `vpn-client-multipath.yaml`), on both firewall backends, in throw-away namespaces.

What a user checks: apply gives each path its rule, its table (with its own unreachable
fallback) and its tagging, once each, and records both tables as its own; one tunnel down leaves
the other path's table as it was; a table another program fills is refused on its own while the
other path goes ahead; a path taken out of the config is swept (rule, table, counters); `down`
leaves the namespace as it found it; the daemon's status shows each path, its tunnel and its
counters, and says which path's tunnel went down.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import TUN_WRITER, DaemonProc
from firewall_view import firewall_snapshot, ours, with_backend
from nslab import Netns, kernel_snapshot, veth, wait_for

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "tagrouted" / "examples" / "vpn-client-multipath.yaml"
CTL = [sys.executable, "-m", "tagrouted.cli"]
SYSCTLS = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.tun0.rp_filter",
           "net.ipv4.conf.wg0.rp_filter"]
PATH_B = "  - {name: server-b, dscp: 43, mark: 43, table: 43, priority: 1043, tunnel_interface: wg0}\n"


class Host:
    """A home VPN client: eth0 on the LAN (a veth to a peer namespace), tun0 and wg0 (tun
    devices standing in for OpenVPN's and WireGuard's), the multipath example as its config."""

    def __init__(self, netns: type[Netns], name: str, tmp: Path, backend: str) -> None:
        self.ns = netns(name)
        peer = netns(name + "-lan")
        veth(self.ns, "eth0", peer, "eth1")
        self.ns.run("ip addr add 192.168.100.2/24 dev eth0")
        self.ns.run("ip addr add fd00:100::2/64 dev eth0 nodad")
        for tun in ("tun0", "wg0"):
            self.tunnel(tun)
        self.backend = backend
        self.config = tmp / "tagrouted.yaml"
        self.config.write_text(with_backend(EXAMPLE.read_text(), backend))
        self.run_dir = tmp / "run"

    def tunnel(self, name: str) -> None:
        self.ns.run(f"ip tuntap add dev {name} mode tun")
        self.ns.run(f"ip link set {name} up")

    def ctl(self, *args: str) -> tuple[int, str, str]:
        res = self.ns.run([*CTL, "--config", str(self.config), "--run-dir", str(self.run_dir), *args],
                          check=False)
        return res.returncode, res.stdout, res.stderr

    def out(self, cmd: str) -> str:
        return self.ns.run(cmd, check=False).stdout

    def table(self, family: int, table: int) -> list[str]:
        """The routes of `table`, each as "default dev X" or "unreachable" (our routes carry proto
        142), others as ip prints them; sorted."""
        out = []
        for line in self.out(f"ip -{family} route show table {table}").splitlines():
            if m := re.match(r"(default dev \S+|unreachable) (default )?.*proto 142", line):
                out.append(m.group(1))
            else:  # a tun device nobody holds open has no carrier: the kernel adds "linkdown"
                out.append(line.replace(" linkdown", "").strip())
        return sorted(out)

    def rules(self, family: int = 4) -> list[str]:
        return [x for x in self.out(f"ip -{family} rule show").splitlines() if "lookup 4" in x]

    def firewall(self) -> str:
        return ours(self.ns.out, self.backend)

    def record(self) -> dict[str, object]:
        return json.loads((self.run_dir / "tables.json").read_text())

    def snapshot(self) -> dict[str, str]:
        return {**kernel_snapshot(self.ns.out, SYSCTLS), "nft": firewall_snapshot(self.ns.out)["nft"]}


@pytest.fixture
def host(netns: type[Netns], tmp_path: Path, backend: str) -> Iterator[Host]:
    yield Host(netns, "mp", tmp_path, backend)


def default_via(tun: str) -> str:
    return f"default dev {tun}"


UNREACHABLE = "unreachable"


def stamps(host: Host, tun: str, dscp: int) -> int:
    """How many rules of ours stamp `dscp` on what comes out of `tun` (both families)."""
    text = host.firewall()
    if host.backend == "nftables":
        return len(re.findall(rf'iifname "{tun}" ip6? dscp set ({dscp}|{dscp:#x})\b', text))
    return text.count(f"-A TAGROUTED-PREROUTING -i {tun} -j DSCP --set-dscp {dscp:#04x}")


def test_each_path_gets_its_rule_table_fallback_and_tagging(host: Host) -> None:
    before = host.snapshot()
    code, out, err = host.ctl("apply")
    assert code == 0, out + err
    for family in (4, 6):
        assert host.table(family, 42) == sorted([default_via("tun0"), UNREACHABLE])
        assert host.table(family, 43) == sorted([default_via("wg0"), UNREACHABLE])
        rules = host.rules(family)
        assert [r.split(":")[0] for r in rules] == ["1042", "1043"], rules
        assert "fwmark 0x2a/0xff lookup 42" in rules[0] and "fwmark 0x2b/0xff lookup 43" in rules[1]
    assert stamps(host, "tun0", 42) == 2 and stamps(host, "wg0", 43) == 2
    assert host.out("sysctl -n net.ipv4.conf.wg0.rp_filter").strip() == "2"
    assert host.record() == {"tables": [42, 43], "rules": [{"mark": 42, "priority": 1042, "table": 42},
                                                            {"mark": 43, "priority": 1043, "table": 43}]}
    assert host.ctl("diff")[:2] == (0, "")
    code, out, _ = host.ctl("apply")
    assert code == 0 and out.strip() == "in sync: nothing to change"

    # One tunnel down: its table keeps only the fallback, the other path is untouched.
    host.ns.run("ip link set wg0 down")  # the kernel drops the routes through it itself
    code, out, err = host.ctl("apply")
    assert code == 0 and "added" not in out, out + err
    for family in (4, 6):
        assert host.table(family, 43) == [UNREACHABLE]
        assert host.table(family, 42) == sorted([default_via("tun0"), UNREACHABLE])
        assert len(host.rules(family)) == 2, "the down path's rule stays: its replies meet the fallback"
    assert stamps(host, "wg0", 43) == 2
    host.ns.run("ip link set wg0 up")
    assert host.ctl("apply")[0] == 0
    assert host.table(4, 43) == sorted([default_via("wg0"), UNREACHABLE])

    code, out, err = host.ctl("down")
    assert code == 0, out + err
    assert host.snapshot() == before, "down must leave the namespace as it found it"
    assert host.record() == {"tables": [], "rules": []}


def test_a_table_another_program_fills_is_refused_alone(host: Host) -> None:
    host.ns.run("ip -4 route add 10.9.0.0/16 dev wg0 table 43")  # someone else's table 43
    code, out, err = host.ctl("apply")
    assert code == 1, out + err
    assert "table 43 holds routes tagrouted did not make: 10.9.0.0/16 dev wg0 table 43" in err, err
    assert "pick another table for path server-b" in err, err
    # path server-a went ahead; nothing of ours went into table 43, and no rule points there
    assert host.table(4, 42) == sorted([default_via("tun0"), UNREACHABLE])
    assert host.table(4, 43) == ["10.9.0.0/16 dev wg0 scope link"]
    assert [r.split(":")[0] for r in host.rules(4)] == ["1042"]
    assert host.record()["tables"] == [42]
    code, _, err = host.ctl("diff")
    assert code == 2 and "table 43 holds routes" in err, err
    # Once the stale route is gone, table 43 is adopted and filled.
    host.ns.run("ip -4 route del 10.9.0.0/16 dev wg0 table 43")
    code, out, err = host.ctl("apply")
    assert code == 0, out + err
    assert host.record()["tables"] == [42, 43]
    assert host.table(4, 43) == sorted([default_via("wg0"), UNREACHABLE])


def test_a_path_taken_out_of_the_config_is_swept(host: Host) -> None:
    assert host.ctl("apply")[0] == 0
    assert "path_server-b" in host.firewall() or host.backend == "iptables-legacy"
    host.config.write_text(host.config.read_text().replace(PATH_B, ""))
    code, out, err = host.ctl("apply")
    assert code == 0, out + err
    assert "removed rule fwmark 0x2b/0xff lookup 43 pref 1043" in out, out
    for family in (4, 6):
        assert host.table(family, 43) == []
        assert [r.split(":")[0] for r in host.rules(family)] == ["1042"]
    assert stamps(host, "wg0", 43) == 0 and stamps(host, "tun0", 42) == 2
    assert "path_server-b" not in host.firewall() and "wg0" not in host.firewall()
    assert host.record()["tables"] == [42]
    assert host.ctl("diff")[:2] == (0, "")


# ---- the daemon ------------------------------------------------------------------------------
def test_status_shows_each_path_its_tunnel_and_its_counters(host: Host) -> None:
    host.config.write_text(host.config.read_text() + "resync_interval: 300ms\n")
    d = DaemonProc(host.ns, host.config, host.run_dir)
    try:
        d.start()
        d.wait_ready()
        status = d.status()
        paths = {p["name"]: p for p in status["paths"]}
        assert list(paths) == ["server-a", "server-b"]
        assert {k: paths["server-b"][k] for k in ("tunnel", "tunnel_up", "dscp", "mark", "table", "priority")} \
            == {"tunnel": "wg0", "tunnel_up": True, "dscp": 43, "mark": 43, "table": 43, "priority": 1043}
        assert paths["server-a"]["requests"] == {"packets": 0, "bytes": 0}
        assert status["tunnel_interface"] is None and status["tunnel_up"] is True
        assert "paths server-a up, server-b up" in [n for n in d.notified() if n.startswith("STATUS=")][-1]

        # A request forwarded home through server A counts on path server-a only.
        host.ns.run("ip neigh add 192.168.100.3 lladdr 02:00:00:00:00:03 dev eth0")
        host.ns.run("ip route add default via 192.168.100.1 dev eth0")  # loose rp_filter's way back
        writer = host.ns.popen([sys.executable, "-c", TUN_WRITER, "tun0"], stdout=subprocess.DEVNULL)
        assert writer.wait(20) == 0

        def counted() -> dict[str, object] | None:
            now = {p["name"]: p for p in d.status()["paths"]}
            requests = now["server-a"]["requests"]
            return now if requests and requests["packets"] >= 3 else None
        now = wait_for(counted, timeout=10, what="path server-a's request counter")
        assert now["server-b"]["requests"] == {"packets": 0, "bytes": 0}  # type: ignore[index]

        # server B's tunnel goes down: its path says so, server A's stays up
        host.ns.run("ip link set wg0 down")
        wait_for(lambda: [p["tunnel_up"] for p in d.status()["paths"]] == [True, False],
                 what="status: server-b's tunnel down")
        assert d.status()["tunnel_up"] is False
        d.wait_record(lambda r: "tunnel wg0 is down: tagged replies of path server-b" in r["MESSAGE"],
                      what="the tunnel-down record naming the path")
        assert host.table(4, 43) == [UNREACHABLE]
        assert host.table(4, 42) == sorted([default_via("tun0"), UNREACHABLE])
        human = d.ctl("status").stdout
        assert re.search(r"server-b\s+dscp 43 mark 0x2b table 43\s+wg0 down", human), human
        host.ns.run("ip link set wg0 up")
        wait_for(lambda: host.table(4, 43) == sorted([default_via("wg0"), UNREACHABLE]),
                 what="table 43 back into wg0")
        wait_for(lambda: d.status()["tunnel_up"] is True, what="status: every tunnel up")
        assert not d.changes("drift"), "a tunnel coming and going is not drift"
    finally:
        d.close()
