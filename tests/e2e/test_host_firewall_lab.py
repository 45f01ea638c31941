"""End to end with the host's own firewall (issue 11's acceptance), in the seed lab, on both
firewall backends: tagrouted on every host, real OpenVPN, the peer-echo service at home.

- No conflict: `tagroutectl doctor` exits 0 on every host.
- Docker's FORWARD DROP (iptables-nft, with and without DOCKER-USER) on the public server, the
  VPN server or the home VPN client: the path keeps working with no user action, the service
  sees the client's own address; also after a Docker restart and a tunnel restart.
- A native nft forward drop (firewalld / nftables.conf style) on the public server: `doctor`
  there exits 2 naming it, `status` stops claiming in sync; removing it clears the conflict.
- DSCP cleared, connmark or mark overwritten on the service host: the path works, or the
  service host's doctor and status name the rule that breaks it.
Each test undoes its own firewall change, so the lab stays shared by the module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import pytest
from firewall_view import (
    BACKENDS,
    CONNMARK_KILLSWITCH,
    DOCKER,
    DROP_ONLY,
    EARLY_MARK,
    NATIVE_FORWARD_DROP,
    both_families,
)
from lab import CLIENT4, PUBLIC4, Lab
from nslab import wait_for
from support import all_paths, built_lab, expected_paths, require_daemon

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module", params=BACKENDS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with built_lab(variant="openvpn", layout="seed", manager="tagrouted", backend=request.param) as lab:
        require_daemon(lab)
        yield lab


def sh(lab: Lab, host: str, *commands: str) -> None:
    for cmd in commands:
        lab.ns(host).run(cmd)


def undo(lab: Lab, host: str, *tables: str) -> None:
    """Delete whole nft tables (iptables-nft's too: our chain in them goes with them)."""
    for table in tables:
        lab.ns(host).run(f"nft delete table {table}", check=False)


def doctor(lab: Lab, host: str) -> tuple[int, str]:
    res = lab.tagroutectl(host, "doctor")
    return res.returncode, res.stdout + res.stderr


def test_no_conflict_doctor_is_happy_everywhere(lab: Lab) -> None:
    for host in lab.configs:
        code, out = doctor(lab, host)
        assert code == 0, f"{host}:\n{out}"
        assert not re.search(r"^fail ", out, re.M)


@pytest.mark.parametrize("style", ["docker", "drop-only"])
@pytest.mark.parametrize("host", ["remote", "vpnserver", "vpnclient"])
def test_forward_drop_works_without_user_action(lab: Lab, host: str, style: str) -> None:
    commands = DOCKER if style == "docker" else DROP_ONLY
    try:
        sh(lab, host, *both_families(commands))
        assert all_paths(lab) == expected_paths(), lab.diagnostics()
        wait_for(lambda: lab.status(host)["in_sync"], what=f"{host} in sync")  # type: ignore[index]
        code, out = doctor(lab, host)
        assert code == 0, out
        if host == "remote":  # the tunnel itself crosses this FORWARD (the VPN server's port)
            lab.stop_vpn_client()
            lab.start_vpn_client()
            lab.wait_path()
            assert all_paths(lab) == expected_paths()
    finally:
        undo(lab, host, "ip filter", "ip6 filter")
    lab.wait_path()


def test_docker_restart_on_the_public_server(lab: Lab, report: Callable[[str], None]) -> None:
    try:
        sh(lab, "remote", *both_families(DOCKER))
        lab.wait_path()
        ns = lab.ns("remote")
        # dockerd's restart: FORWARD rebuilt, its jump to DOCKER-USER first; DOCKER-USER kept
        sh(lab, "remote", "iptables-nft -F FORWARD", "iptables-nft -P FORWARD DROP",
           "iptables-nft -I FORWARD -j DOCKER-USER")
        wait_for(lambda: ns.out("iptables-nft -S DOCKER-USER").splitlines()[1:2]
                 == ["-A DOCKER-USER -m comment --comment tagrouted -j TAGROUTED-HOSTFW"],
                 what="our jump first in DOCKER-USER")
        wait_for(lambda: lab.request_tcp(PUBLIC4, timeout=1.0) == CLIENT4, what="TLS after the restart")
        assert all_paths(lab) == expected_paths()
        # `iptables -F`: every chain flushed, ours too, and FORWARD no longer reaches DOCKER-USER
        t0 = time.monotonic()
        sh(lab, "remote", "iptables-nft -F")
        wait_for(lambda: lab.request_tcp(PUBLIC4, timeout=0.5) == CLIENT4, interval=0.01,
                 what="TLS after iptables -F")
        report(f"{lab.backend}: TLS through the public address works again {time.monotonic() - t0:.2f} s "
               "after `iptables-nft -F` on the public server (FORWARD DROP)")
        assert ns.out("iptables-nft -S FORWARD").splitlines()[1] == \
            "-A FORWARD -m comment --comment tagrouted -j TAGROUTED-HOSTFW"
    finally:
        undo(lab, "remote", "ip filter", "ip6 filter")
    lab.wait_path()


def test_native_forward_drop_on_the_public_server_is_named(lab: Lab) -> None:
    try:
        lab.ns("remote").run("nft -f -", input=NATIVE_FORWARD_DROP)
        status = wait_for(lambda: (s := lab.status("remote")) and s["conflicts"] and s,
                          what="the conflict in status")
        assert status["in_sync"] is False
        assert status["conflicts"][0]["table"] == "inet filter"
        assert status["conflicts"][0]["rule"] == "policy drop"
        code, out = doctor(lab, "remote")
        assert code == 2, out
        assert re.search(r"^fail +host firewall: inet filter chain forward policy drop: drops new connections",
                         out, re.M), out
        assert "fix: nft insert rule inet filter forward ct status dnat accept" in out
        text = lab.tagroutectl("remote", "status").stdout
        assert re.search(r"^in sync: +no$", text, re.M) and "blocked:" in text, text
        assert lab.tagroutectl("remote", "diff").returncode == 2
        assert any("blocked: inet filter chain forward policy drop" in x for x in lab.journal("remote"))
        assert lab.request_tcp(PUBLIC4, timeout=2.0) is None, "nothing new passes such a drop"
    finally:
        undo(lab, "remote", "inet filter")
    wait_for(lambda: lab.status("remote")["in_sync"], what="in sync once the drop is gone")  # type: ignore[index]
    assert any("conflict cleared: inet filter chain forward policy drop" in x for x in lab.journal("remote"))
    lab.wait_path()


def works_or_named(lab: Lab, what: str) -> str:
    """The path works (the client's own address), or the service host's doctor fails naming
    the rule and its status says blocked; returns which."""
    if all_paths(lab) == expected_paths():
        return "works"
    code, out = doctor(lab, "web")
    assert code == 2 and re.search(rf"^fail +host firewall: .*{what}", out, re.M), out
    wait_for(lambda: lab.status("web")["conflicts"], what="the conflict in status")  # type: ignore[index]
    return "reported"


def test_dscp_cleared_on_the_service_host(lab: Lab, report: Callable[[str], None]) -> None:
    try:
        sh(lab, "web", "iptables-nft -t mangle -A POSTROUTING -j DSCP --set-dscp 0",
           "ip6tables-nft -t mangle -A POSTROUTING -j DSCP --set-dscp 0")
        outcome = works_or_named(lab, "rewrites the DSCP 42 of tagged replies")
        report(f"{lab.backend}: DSCP cleared in mangle POSTROUTING on the service host: {outcome}")
        if lab.backend == "nftables":
            assert outcome == "works", "our stamp runs after mangle POSTROUTING"
    finally:
        undo(lab, "web", "ip mangle", "ip6 mangle")
    lab.wait_path()


@pytest.mark.parametrize("when", ["before the daemon", "after the daemon"])
def test_connmark_killswitch_on_the_service_host_is_reported(lab: Lab, when: str) -> None:
    try:
        if when == "before the daemon":
            lab.stop_tagrouted(["web"], remove_state=True)
            lab.ns("web").run("nft -f -", input=CONNMARK_KILLSWITCH)
            lab.start_tagrouted(["web"])
        else:
            lab.ns("web").run("nft -f -", input=CONNMARK_KILLSWITCH)
        wait_for(lambda: lab.status("web")["conflicts"], what="the conflict in status")  # type: ignore[index]
        code, out = doctor(lab, "web")
        assert code == 2
        assert re.search(r"^fail +host firewall: inet killswitch chain out handle \d+: ct mark set 0x00000001: "
                         r"overwrites the connmark of tagged replies", out, re.M), out
    finally:
        undo(lab, "web", "inet killswitch")
    wait_for(lambda: lab.status("web")["in_sync"], what="in sync once it is gone")  # type: ignore[index]
    lab.wait_path()


def test_mark_set_first_at_boot_on_the_service_host(lab: Lab, report: Callable[[str], None]) -> None:
    try:
        lab.stop_tagrouted(["web"], remove_state=True)
        lab.ns("web").run("nft -f -", input=EARLY_MARK)  # loaded before us, as at boot
        lab.start_tagrouted(["web"])
        if all_paths(lab) == expected_paths():
            outcome = "works"
        else:
            _, out = doctor(lab, "web")
            assert re.search(r"^(fail|warn) +host firewall: inet early chain out", out, re.M), out
            outcome = "reported"
        report(f"{lab.backend}: a mark set on every packet at mangle priority, loaded first: {outcome}")
        if lab.backend == "nftables":
            assert outcome == "works", "our restore runs at mangle + 10"
    finally:
        undo(lab, "web", "inet early")
    lab.wait_path()
