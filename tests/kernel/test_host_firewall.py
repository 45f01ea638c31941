"""The host's own firewall (issue 11), in throw-away namespaces, on both firewall backends.

What a user checks: with Docker's or ufw's forward drop (iptables-nft, or legacy) `apply` puts
one branded jump and our accepts where that firewall wants them (DOCKER-USER, else the top of
FORWARD), `diff` is clean, nothing else in those chains changes, `down` takes them away; with
`host_firewall: report` nothing is written and diff, doctor and apply name the blocker and the
fix; another tool's native nft drop is never edited, only reported (status stops saying in sync,
one journal warning with TAGROUTED_OBJECT=conflict, cleared when it goes); the daemon puts our
accepts back after a Docker restart, `iptables -F` or a ufw reload; overwriters of our mark,
connmark or DSCP are reported.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProc
from firewall_view import (
    CONNMARK_KILLSWITCH,
    DOCKER,
    DROP_ONLY,
    EARLY_MARK,
    NATIVE_FORWARD_DROP,
    both_families,
    config_copy,
    hostfw,
    without_hostfw,
)
from nslab import Netns, veth, wait_for

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "etc" / "tagrouted" / "examples"
CTL = [sys.executable, "-m", "tagrouted.cli"]
ROLES = {"gateway": "remote-server.yaml", "vpn-server": "vpn-server.yaml", "vpn-client": "vpn-client.yaml"}

DOCKER_BOTH = both_families(DOCKER)
DROP_BOTH = both_families(DROP_ONLY)
UFW = ["iptables-nft -N ufw-before-forward", "iptables-nft -N ufw-user-forward",
       "iptables-nft -A FORWARD -j ufw-before-forward",
       "iptables-nft -A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
       "iptables-nft -A ufw-before-forward -j ufw-user-forward", "iptables-nft -P FORWARD DROP"]


class Host:
    """One host of a role: eth0 (the public side, or the LAN), br0 and tun0 as the role needs."""

    def __init__(self, netns: type[Netns], tmp: Path, role: str, backend: str, extra: str = "") -> None:
        self.ns = netns("hf")
        peer = netns("hf-peer")
        veth(self.ns, "eth0", peer, "eth1")
        veth(self.ns, "br0", peer, "br1")
        if role == "gateway":
            self.ns.run("ip addr add 192.0.2.200/24 dev eth0")
            self.ns.run("ip addr add 2001:db8:a::200/64 dev eth0 nodad")
            self.ns.run("ip addr add 192.168.200.1/24 dev br0")
            self.ns.run("ip addr add fd00:200::1/64 dev br0 nodad")
        else:
            self.ns.run("ip addr add 192.168.100.2/24 dev eth0")
            self.ns.run("ip addr add fd00:100::2/64 dev eth0 nodad")
            self.ns.run("ip tuntap add dev tun0 mode tun")
            self.ns.run("ip link set tun0 up")
        self.config = config_copy(EXAMPLES / ROLES[role], backend, tmp)
        if extra:
            self.config.write_text(self.config.read_text() + extra)
        self.run_dir = tmp / "run"
        self.backend = backend

    def sh(self, *commands: str) -> None:
        for cmd in commands:
            self.ns.run(cmd)

    def ctl(self, *args: str) -> tuple[int, str, str]:
        res = self.ns.run([*CTL, "--config", str(self.config), "--run-dir", str(self.run_dir), *args], check=False)
        return res.returncode, res.stdout, res.stderr

    def out(self, argv: list[str]) -> str:
        return self.ns.run(argv, check=False).stdout

    def hostfw(self) -> str:
        return hostfw(self.out)

    def saved(self, family: int = 4, variant: str = "nft") -> str:
        cmd = f"{'ip' if family == 4 else 'ip6'}tables-{variant}-save"
        return without_hostfw(self.out([cmd, "-t", "filter"]))


@pytest.fixture
def make(netns: type[Netns], tmp_path: Path) -> Iterator[object]:
    daemons: list[DaemonProc] = []

    def factory(role: str, backend: str, extra: str = "") -> Host:
        return Host(netns, tmp_path, role, backend, extra)

    factory.daemons = daemons  # type: ignore[attr-defined]
    yield factory
    for d in daemons:
        d.close()


def first_jump(text: str, chain: str) -> bool:
    """Our jump is the first rule of `chain` (iptables-save lines as firewall_view.hostfw shows them)."""
    return f"-A {chain} -m comment --comment tagrouted -j TAGROUTED-HOSTFW" in text


@pytest.mark.parametrize("role", sorted(ROLES))
@pytest.mark.parametrize("style", ["docker", "drop-only"])
def test_forward_drop_gets_our_accepts_and_down_takes_them(make: object, backend: str, role: str, style: str) -> None:
    h = make(role, backend)  # type: ignore[operator]
    h.sh(*(DOCKER_BOTH if style == "docker" else DROP_BOTH))
    before4, before6 = h.saved(4), h.saved(6)
    full_before = h.out(["iptables-nft-save", "-t", "filter"])
    code, out, err = h.ctl("diff")
    assert code == 2 and "+host firewall: added jump" in out, out + err
    assert "blocked:" not in out, "what apply will integrate is a change, not a conflict"
    code, out, err = h.ctl("apply")
    assert code == 0, err
    assert "blocked" not in err, err
    parent = "DOCKER-USER" if style == "docker" else "FORWARD"
    text = h.hostfw()
    for cmd in ("iptables-nft-save", "ip6tables-nft-save"):
        lines = [x for x in text.splitlines() if x.startswith(cmd + " ")]
        assert f"{cmd} -A {parent} -m comment --comment tagrouted -j TAGROUTED-HOSTFW" in lines, text
        assert sum("-j TAGROUTED-HOSTFW" in x for x in lines) == 1, "one jump"
        assert any("-A TAGROUTED-HOSTFW" in x and "-j ACCEPT" in x for x in lines), text
    # first in its chain, and nothing else of that firewall changed
    full = h.out(["iptables-nft-save", "-t", "filter"])
    chain_rules = [x for x in full.splitlines() if x.startswith(f"-A {parent} ")]
    assert chain_rules[0] == f"-A {parent} -m comment --comment tagrouted -j TAGROUTED-HOSTFW"
    assert (h.saved(4), h.saved(6)) == (before4, before6)
    assert "legacy" not in text, "no legacy table was there: none is made"
    code, out, err = h.ctl("diff")
    assert (code, out) == (0, ""), out + err
    code, out, _ = h.ctl("apply")
    assert out.strip() == "in sync: nothing to change"
    code, out, err = h.ctl("doctor")
    assert code == 0, out + err
    assert re.search(r"^ok +host firewall: .*our accepts are in place \(iptables-nft IPv4 " + parent, out, re.M), out
    code, out, err = h.ctl("down")
    assert code == 0, err
    assert h.hostfw() == ""
    assert re.sub(r"^#.*\n", "", h.out(["iptables-nft-save", "-t", "filter"]), flags=re.M) == \
        re.sub(r"^#.*\n", "", full_before, flags=re.M)


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_allow_from_narrows_the_accepts(make: object, backend: str, variant: str) -> None:
    if variant == "legacy" and backend == "iptables-legacy":
        pytest.skip("the legacy backend's own chain is first in legacy FORWARD: no accepts of ours there")
    h = make("gateway", backend)  # type: ignore[operator]
    h.config.write_text(h.config.read_text().replace(
        "address: 192.168.100.3}", "address: 192.168.100.3, allow_from: [198.51.100.0/24, 203.0.113.0/25]}", 1))
    h.sh(f"iptables-{variant} -P FORWARD DROP")
    code, _, err = h.ctl("apply")
    assert code == 0, err
    lines = [x for x in h.hostfw().splitlines() if "192.168.100.3" in x and "--ctreplsrcport 443" in x]
    assert len(lines) == 2, h.hostfw()
    assert "--ctorigsrc 198.51.100.0/24" in lines[0] and "--ctorigsrc 203.0.113.0/25" in lines[1], lines
    assert h.ctl("diff")[:2] == (0, "")


def test_ufw_style_chains_get_one_jump_first_in_forward(make: object, backend: str) -> None:
    h = make("vpn-client", backend)  # type: ignore[operator]
    h.sh(*UFW)
    assert h.ctl("apply")[0] == 0
    full = h.out(["iptables-nft-save", "-t", "filter"])
    assert next(x for x in full.splitlines() if x.startswith("-A FORWARD ")) == \
        "-A FORWARD -m comment --comment tagrouted -j TAGROUTED-HOSTFW"
    assert h.ctl("diff")[:2] == (0, "")


@pytest.mark.parametrize("backend", ["nftables", "iptables-legacy"])
def test_legacy_host_firewall(make: object, backend: str) -> None:
    """Docker on legacy iptables: with the nftables backend our accepts go into the legacy
    table; with the legacy backend its own chain already comes first in FORWARD."""
    h = make("gateway", backend)  # type: ignore[operator]
    h.sh("iptables-legacy -N DOCKER-USER", "iptables-legacy -A FORWARD -j DOCKER-USER",
         "iptables-legacy -P FORWARD DROP")
    before = h.saved(4, "legacy")
    assert h.ctl("apply")[0] == 0
    text = h.hostfw()
    if backend == "nftables":
        assert "iptables-legacy-save -A DOCKER-USER -m comment --comment tagrouted -j TAGROUTED-HOSTFW" in text, text
    else:
        assert text == "", "the legacy backend's TAGROUTED-FORWARD is first in FORWARD already"
    after = [x for x in h.saved(4, "legacy").splitlines() if "TAGROUTED" not in x]
    assert after == [x for x in before.splitlines() if "TAGROUTED" not in x], "nothing else changes"
    code, out, err = h.ctl("diff")
    assert (code, out) == (0, ""), out + err
    assert h.ctl("down")[0] == 0
    assert h.hostfw() == ""
    if backend == "nftables":
        assert "filter" not in h.out(["cat", "/proc/net/ip6_tables_names"]), "no IPv6 legacy table is made"


def test_report_mode_writes_nothing_and_names_the_fix(make: object, backend: str) -> None:
    h = make("gateway", backend, "\n")  # type: ignore[operator]
    h.config.write_text(h.config.read_text().replace(f"firewall: {{backend: {backend}}}",
                                                     f"firewall: {{backend: {backend}, host_firewall: report}}"))
    h.sh(*DOCKER_BOTH)
    full_before = h.out(["iptables-nft-save", "-t", "filter"])
    code, out, err = h.ctl("apply")
    assert code == 0
    assert "blocked: iptables-nft filter (IPv4) chain FORWARD policy drop" in err, err
    assert "iptables-nft -t filter -I DOCKER-USER -m conntrack --ctstate DNAT -j ACCEPT" in err, err
    assert h.hostfw() == ""
    assert re.sub(r"^#.*\n", "", h.out(["iptables-nft-save", "-t", "filter"]), flags=re.M) == \
        re.sub(r"^#.*\n", "", full_before, flags=re.M)
    code, out, err = h.ctl("apply")
    assert code == 0 and "in sync" not in out.replace("NOT in sync", ""), out
    assert out.startswith("nothing to change, but NOT in sync"), out + err
    code, out, _ = h.ctl("diff")
    assert code == 2 and out.startswith("blocked: iptables-nft filter (IPv4) chain FORWARD policy drop"), out
    code, out, _ = h.ctl("doctor")
    assert code == 2
    assert re.search(r"^fail +host firewall: iptables-nft filter \(IPv4\) chain FORWARD policy drop: drops", out,
                     re.M), out


def test_native_nft_drop_is_reported_never_edited(make: object, backend: str) -> None:
    h = make("gateway", backend, "resync_interval: 300ms\n")  # type: ignore[operator]
    h.ns.run("nft -f -", input=NATIVE_FORWARD_DROP)
    theirs = h.out(["nft", "list", "table", "inet", "filter"])
    d = DaemonProc(h.ns, h.config, h.run_dir)
    make.daemons.append(d)  # type: ignore[attr-defined]
    d.start()
    d.wait_listening()
    record = d.wait_record(lambda r: r.get("TAGROUTED_OBJECT") == "conflict", what="the conflict's warning")
    assert record["MESSAGE"].startswith("blocked: inet filter chain forward policy drop: drops new connections")
    assert record["TAGROUTED_ACTION"] == "added"
    status = wait_for(lambda: (s := d.status()) and s["conflicts"] and s, what="a conflict in status")
    assert status["in_sync"] is False
    c = status["conflicts"][0]
    assert (c["table"], c["chain"], c["rule"]) == ("inet filter", "forward", "policy drop")
    assert c["fix"] == "nft insert rule inet filter forward ct status dnat accept"
    text = d.ctl("status").stdout
    assert re.search(r"^blocked: +inet filter chain forward policy drop", text, re.M), text
    assert re.search(r"^in sync: +no$", text, re.M), text
    res = d.ctl("doctor")
    assert res.returncode == 2 and "fail  host firewall: inet filter chain forward policy drop" in res.stdout
    assert d.ctl("diff").returncode == 2
    res = d.ctl("apply")  # carried out by the daemon: it says what still blocks
    assert res.returncode == 0 and "blocked: inet filter chain forward policy drop" in res.stderr, res
    assert "NOT in sync" in res.stdout, res
    assert h.out(["nft", "list", "table", "inet", "filter"]) == theirs, "another tool's table is never edited"
    warnings = [r for r in d.all_records() if r.get("TAGROUTED_OBJECT") == "conflict"]
    assert len(warnings) == 1, "one warning per conflict, not one per pass"
    # the user applies the fix: the conflict goes, and says so once
    h.sh("nft insert rule inet filter forward ct status dnat accept")
    d.wait_record(lambda r: r.get("TAGROUTED_OBJECT") == "conflict" and r.get("TAGROUTED_ACTION") == "removed",
                  what="the conflict cleared")
    wait_for(lambda: d.status()["in_sync"], what="in sync again")
    assert d.ctl("doctor").returncode == 0
    assert d.ctl("diff").returncode == 0


# What dockerd does to the filter table when it restarts: FORWARD rebuilt with its jump to
# DOCKER-USER first; DOCKER-USER itself is kept (rules there are meant to survive restarts).
DOCKER_RESTART = ["iptables-nft -F FORWARD", "iptables-nft -P FORWARD DROP",
                  "iptables-nft -I FORWARD -j DOCKER-USER"]


@pytest.mark.parametrize("disturbance", ["docker restart", "iptables -F", "ufw reload"])
def test_daemon_puts_our_accepts_back(make: object, backend: str, disturbance: str) -> None:
    h = make("gateway", backend, "resync_interval: 300ms\n")  # type: ignore[operator]
    h.sh(*(UFW if disturbance == "ufw reload" else DOCKER_BOTH[:4]))
    parent = "FORWARD" if disturbance == "ufw reload" else "DOCKER-USER"
    d = DaemonProc(h.ns, h.config, h.run_dir)
    make.daemons.append(d)  # type: ignore[attr-defined]
    d.start()
    d.wait_ready()
    wait_for(lambda: first_jump(h.hostfw(), parent), what="our jump first in " + parent)
    if disturbance == "docker restart":
        h.sh(*DOCKER_RESTART)
    elif disturbance == "iptables -F":
        h.sh("iptables-nft -F")  # every chain of filter, ours too
        parent = "FORWARD"  # FORWARD no longer reaches DOCKER-USER: our jump goes first in FORWARD
    else:  # ufw reload: its chains flushed and filled again
        h.sh("iptables-nft -F ufw-before-forward", "iptables-nft -F ufw-user-forward",
             "iptables-nft -A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
             "iptables-nft -A ufw-before-forward -j ufw-user-forward")
    wait_for(lambda: first_jump(h.hostfw(), parent) and h.hostfw().count("-A TAGROUTED-HOSTFW") == 3,
             what="our accepts back")
    wait_for(lambda: d.status()["in_sync"], what="in sync")
    full = h.out(["iptables-nft-save", "-t", "filter"])
    assert next(x for x in full.splitlines() if x.startswith(f"-A {parent} ")) == \
        f"-A {parent} -m comment --comment tagrouted -j TAGROUTED-HOSTFW"
    assert d.ctl("diff").returncode == 0


def test_daemon_restores_legacy_accepts_on_its_timer(make: object, backend: str) -> None:
    """Legacy tables announce nothing: the resync timer finds our accepts gone (with the legacy
    backend, its own chain first in FORWARD is what accepts our traffic there)."""
    h = make("gateway", backend, "resync_interval: 300ms\n")  # type: ignore[operator]
    h.sh("iptables-legacy -P FORWARD DROP")
    d = DaemonProc(h.ns, h.config, h.run_dir)
    make.daemons.append(d)  # type: ignore[attr-defined]
    d.start()
    d.wait_ready()
    chain = "TAGROUTED-HOSTFW" if backend == "nftables" else "TAGROUTED-FORWARD"

    def first_in_forward() -> bool:
        rules = [x for x in h.out(["iptables-legacy-save"]).splitlines() if x.startswith("-A FORWARD ")]
        return bool(rules) and rules[0] == f"-A FORWARD -m comment --comment tagrouted -j {chain}"
    wait_for(first_in_forward, what=f"{chain} first in legacy FORWARD")
    h.sh("iptables-legacy -F")
    wait_for(first_in_forward, what=f"{chain} first in legacy FORWARD again")
    wait_for(lambda: d.status()["in_sync"], what="in sync")
    assert d.status()["conflicts"] == []


def test_doctor_changes_nothing(make: object, backend: str, tmp_path: Path) -> None:
    """Not the firewall (no table made, not even a legacy one by reading it), not the run
    directory, not a sysctl: on a host where nothing is in place, everything fails, nothing moves."""
    h = make("vpn-client", backend)  # type: ignore[operator]
    h.sh(*DOCKER_BOTH)

    def world() -> tuple[str, ...]:
        return (h.out(["nft", "list", "ruleset"]), h.out(["cat", "/proc/net/ip_tables_names"]),
                h.out(["cat", "/proc/net/ip6_tables_names"]), h.out(["sysctl", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
                                                 "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.tun0.rp_filter"]),
                h.out(["ip", "rule"]), h.out(["ip", "route", "show", "table", "all"]))
    before = world()
    code, out, err = h.ctl("doctor")
    assert code == 2, out + err
    assert re.search(r"^warn +daemon: not running here", out, re.M), out
    assert re.search(r"^fail +forwarding: net.ipv4.ip_forward=0", out, re.M), out
    assert re.search(r"^fail +firewall: ", out, re.M), out
    assert re.search(r"^fail +host firewall: our accepts are not in place", out, re.M), out
    assert re.search(r"^fail +host firewall: iptables-nft filter \(IPv4\) chain FORWARD policy drop", out, re.M)
    assert re.search(r"^fail +tagged route: `ip -4 route get 8.8.8.8 mark 0x2a`", out, re.M), out
    code, js, _ = h.ctl("doctor", "--json")
    assert code == 2
    doc = json.loads(js)
    assert doc["exit"] == 2 and {"name", "status", "seen", "fix"} <= set(doc["checks"][0])
    assert world() == before
    assert not h.run_dir.exists()


def test_doctor_refuses_an_invalid_config(make: object, backend: str) -> None:
    h = make("vpn-client", backend)  # type: ignore[operator]
    h.config.write_text(h.config.read_text() + "bogus: 1\n")
    code, _, err = h.ctl("doctor")
    assert code == 1 and "bogus" in err


@pytest.mark.parametrize("when", ["before", "after"])
def test_connmark_overwriter_is_reported(make: object, backend: str, when: str) -> None:
    h = make("vpn-client", backend)  # type: ignore[operator]
    h.config.write_text(h.config.read_text().replace("roles: [vpn-client]", "roles: [vpn-client, service]")
                        + "service: {tunnel_interface: tun0}\n")
    if when == "before":
        h.ns.run("nft -f -", input=CONNMARK_KILLSWITCH)
    assert h.ctl("apply")[0] == 0
    if when == "after":
        h.ns.run("nft -f -", input=CONNMARK_KILLSWITCH)
    code, out, _ = h.ctl("doctor")
    assert code == 2
    assert re.search(r"^fail +host firewall: inet killswitch chain out handle \d+: ct mark set 0x00000001: "
                     r"overwrites the connmark of tagged replies", out, re.M), out
    assert "nft insert rule inet killswitch out ct mark and 0xff == 0x2a accept" in out


def test_mark_set_early_works_with_nftables_and_is_flagged_with_legacy(make: object, backend: str) -> None:
    """A killswitch marking every packet at mangle priority, loaded first: our restore runs after
    it with nftables (mangle + 10); the legacy backend's chain shares its priority (order of
    registration), which doctor can only warn about."""
    h = make("vpn-client", backend)  # type: ignore[operator]
    h.config.write_text(h.config.read_text().replace("roles: [vpn-client]", "roles: [vpn-client, service]")
                        + "service: {tunnel_interface: tun0}\n")
    h.ns.run("nft -f -", input=EARLY_MARK)
    assert h.ctl("apply")[0] == 0
    code, out, _ = h.ctl("doctor")
    assert code == 0, out
    if backend == "nftables":
        assert "inet early" not in out
    else:
        assert re.search(r"^warn +host firewall: inet early chain out .*may overwrite the mark of tagged replies",
                         out, re.M), out
