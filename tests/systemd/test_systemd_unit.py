"""tagrouted under a real systemd: the unit, reload, watchdog and the journal, seen from outside.

One Debian bookworm container boots systemd as PID 1 (systemd-nspawn --boot --private-network,
see container.py) for the whole module; a wheel of this checkout, the unit file from
packaging/systemd/ (unchanged), the vpn-client example config and the links it names (eth0 as
a veth pair, tun0 as a tun device) are installed inside. The tests then run, in file order,
what a user would type: systemctl start / reload / stop, journalctl, systemd-analyze security,
and check the kernel state of the container with ip, nft and iptables-legacy-save. The module
runs once per firewall backend (a container each).

A drop-in (tagrouted.service.d/test.conf) adds only test switches: the fault switch that lets
SIGUSR2 stop the watchdog pings, and a short WatchdogSec so the restart comes quickly.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from container import (
    PAYLOAD_MOUNT,
    Container,
    build_project_wheel,
    ensure_rootfs,
    ensure_wheelhouse,
    nspawn_unavailable_reason,
)
from daemon_harness import parse_metrics
from firewall_view import BACKENDS, nft_ruleset, ours, with_backend
from nslab import RUN_PREFIX, kernel_snapshot, wait_for

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "tagrouted.service"
EXAMPLE = REPO / "etc" / "tagrouted" / "examples" / "vpn-client.yaml"
CONFIG = "/etc/tagrouted/tagrouted.yaml"
WATCHDOG_SEC = 3
DROP_IN = f"""\
# Test-only switches; the unit file itself is installed unchanged.
[Service]
# SIGUSR2 makes the daemon stop its watchdog pings (honoured only with this variable set).
Environment=TAGROUTED_TEST_FAULTS=1
WatchdogSec={WATCHDOG_SEC}
# The host's core_pattern is global: a watchdog SIGABRT must not write a core anywhere.
LimitCORE=0
"""
NEW_SERVICE = "  - {name: admin, proto: tcp, port: 2222, address: 192.168.100.3}\n"
BROKEN = "roles: [vpn-client]\nservices:\n  - {name: web, proto: tcp, port: 70000, address: 192.168.100.3}\n"
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.rp_filter",
           "net.ipv4.conf.tun0.rp_filter")
REPORT: dict[str, str] = {}  # numbers for the run's summary line (never asserted on)
PRISTINE: dict[str, str] = {}  # the container's state before tagrouted first started
FIRST_PID: list[str] = []  # the first daemon's PID, whose start records the last test checks
CURRENT: dict[str, str] = {}  # the backend of the container the tests run against now


# ---- the container --------------------------------------------------------------------------
@pytest.fixture(scope="module", params=BACKENDS)
def ct(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    reason = nspawn_unavailable_reason()
    if reason:
        pytest.skip(reason)
    backend = str(request.param)
    CURRENT["backend"] = backend
    PRISTINE.clear()
    FIRST_PID.clear()
    if not UNIT.exists():
        pytest.fail(f"{UNIT} is missing")
    t0 = time.monotonic()
    failed_before = request.session.testsfailed
    rootfs, built = ensure_rootfs()
    REPORT["rootfs"] = f"built in {built:.0f}s" if built is not None else "cached"
    wheels, _ = ensure_wheelhouse(REPO)
    payload = tmp_path_factory.mktemp("systemd-payload")
    shutil.copytree(wheels, payload / "wheels", ignore=shutil.ignore_patterns(".complete"))
    build_project_wheel(REPO, payload / "wheels")
    shutil.copy(UNIT, payload / "tagrouted.service")
    (payload / "tagrouted.yaml").write_text(with_backend(EXAMPLE.read_text(), backend))
    (payload / "test.conf").write_text(DROP_IN)
    REPORT["prepare"] = f"{time.monotonic() - t0:.1f}s"

    tag = "nft" if backend == "nftables" else "ipt"
    container = Container(rootfs, payload, f"{RUN_PREFIX}-sd-{tag}", payload.parent / "console.log")
    try:
        container.boot()
        REPORT["boot"] = f"{container.boot_seconds:.1f}s"
        t1 = time.monotonic()
        install(container)
        REPORT["install"] = f"{time.monotonic() - t1:.1f}s"
        yield container
    finally:
        if request.session.testsfailed > failed_before and container.leader:
            dump_journal(container)
        container.close()
        REPORT[f"module ({backend})"] = f"{time.monotonic() - t0:.0f}s"


def install(c: Container) -> None:
    """What an admin does on a fresh host: links exist, install the package, unit and config."""
    # The example's links: eth0 on the LAN (a veth pair: no dummy driver here) and the tunnel.
    c.run("ip link add eth0 type veth peer name lan0")
    c.run("ip addr add 192.168.100.2/24 dev eth0")
    c.run("ip addr add fd00:100::2/64 dev eth0 nodad")
    c.run("ip link set lan0 up")
    c.run("ip link set eth0 up")
    c.run("ip tuntap add dev tun0 mode tun")
    c.run("ip link set tun0 up")
    # A hardened host (strict reverse-path filtering), as on the seed: the daemon must loosen tun0.
    c.run("sysctl -q -w net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.tun0.rp_filter=1")
    # The container has no network: dependencies come from the wheelhouse bound in read-only.
    c.run(["python3", "-m", "pip", "install", "--quiet", "--no-index", "--break-system-packages",
           "--root-user-action=ignore", "--find-links", f"{PAYLOAD_MOUNT}/wheels", "tagrouted"],
          timeout=180)
    c.run(["install", "-m", "644", f"{PAYLOAD_MOUNT}/tagrouted.service",
           "/etc/systemd/system/tagrouted.service"])
    c.run(["install", "-D", "-m", "644", f"{PAYLOAD_MOUNT}/test.conf",
           "/etc/systemd/system/tagrouted.service.d/test.conf"])
    c.run(["install", "-D", "-m", "644", f"{PAYLOAD_MOUNT}/tagrouted.yaml", CONFIG])
    c.run("systemctl daemon-reload")


def dump_journal(c: Container) -> None:
    res = c.run("journalctl -b -u tagrouted --no-pager -o short-monotonic", check=False)
    print("---- journalctl -u tagrouted ----\n" + res.stdout[-8000:], file=sys.stderr)
    print("---- console ----\n" + c.console(), file=sys.stderr)


# ---- what a user looks at -------------------------------------------------------------------
def show(c: Container, prop: str) -> str:
    return c.out(["systemctl", "show", "-P", prop, "tagrouted"]).strip()


def is_active(c: Container) -> str:
    return c.run("systemctl is-active tagrouted", check=False).stdout.strip()


def snapshot(c: Container) -> dict[str, str]:
    """The container's whole routing and firewall state (nft and legacy) plus our sysctls (no
    counters)."""
    return {**kernel_snapshot(c.out, SYSCTLS), "nft": nft_ruleset(c.out)}


def firewall(c: Container) -> str:
    """What our backend holds in the container now."""
    return ours(lambda argv: c.run(argv, check=False).stdout, CURRENT["backend"])


def vpn_client_state_in_place(c: Container) -> bool:
    """The kernel state the vpn-client example asks for, each piece exactly once."""
    rules = c.out("ip -4 rule show")
    table = c.out("ip -4 route show table 42")
    fw = firewall(c)
    tagging = ('iifname "tun0" ip dscp set 0x2a' if CURRENT["backend"] == "nftables"  # as nft lists it
               else "4 -A TAGROUTED-PREROUTING -i tun0 -j DSCP --set-dscp 0x2a")
    return (
        rules.count("fwmark 0x2a/0xff lookup 42") == 1 and "1042:" in rules
        and re.search(r"^default dev tun0\b", table, re.M) is not None
        and re.search(r"^unreachable default\b", table, re.M) is not None
        and fw.count(tagging) == 1
        and c.out("sysctl -n net.ipv4.conf.tun0.rp_filter").strip() == "2"
        and c.out("sysctl -n net.ipv4.ip_forward").strip() == "1"
    )


def journal(c: Container, *matches: str) -> list[dict[str, str]]:
    """tagrouted's journal records of this boot, as journalctl -o json gives them."""
    out = c.out(["journalctl", "-b", "-u", "tagrouted", "-o", "json", "--no-pager", *matches])
    records = []
    for line in out.splitlines():
        record = json.loads(line)
        if isinstance(record.get("MESSAGE"), list):  # journalctl emits non-UTF-8 text as bytes
            record["MESSAGE"] = bytes(record["MESSAGE"]).decode(errors="replace")
        records.append(record)
    return records


def change_records(c: Container, pid: str | None = None) -> list[dict[str, str]]:
    records = [r for r in journal(c) if "TAGROUTED_ACTION" in r]
    return [r for r in records if pid is None or r.get("_PID") == pid]


def write_config(c: Container, text: str) -> None:
    c.write(CONFIG, text)


def example_with(extra_services: str = "", on_stop: str | None = None) -> str:
    text = with_backend(EXAMPLE.read_text(), CURRENT["backend"])
    if extra_services:
        text = text.replace("\nvpn_client:", extra_services + "\nvpn_client:", 1)
    if on_stop:
        text += f"\non_stop: {on_stop}\n"
    return text


# ---- the tests, in the order a user meets them ----------------------------------------------
def test_start_brings_the_unit_active_and_the_state_in_place(ct: Container) -> None:
    PRISTINE.update(snapshot(ct))
    res = ct.run("systemctl start tagrouted", check=False, timeout=90)  # Type=notify: after READY=1
    assert res.returncode == 0, res.stderr + ct.run("systemctl status tagrouted --no-pager", check=False).stdout
    FIRST_PID.append(show(ct, "MainPID"))
    assert is_active(ct) == "active"
    assert vpn_client_state_in_place(ct), snapshot(ct)
    status = ct.run("tagroutectl status", check=False)
    assert status.returncode == 0, status.stderr
    assert show(ct, "StatusText"), "the daemon tells systemd a one-line STATUS="


def test_reload_with_a_new_service_adds_its_rule(ct: Container) -> None:
    pid = show(ct, "MainPID")
    write_config(ct, example_with(NEW_SERVICE))
    res = ct.run("systemctl reload tagrouted", check=False, timeout=90)
    assert res.returncode == 0, res.stderr
    new = "192.168.100.3 . tcp . 2222" if CURRENT["backend"] == "nftables" else "--dport 2222"
    wait_for(lambda: new in firewall(ct), timeout=20, what="the new service's forward accept")
    assert is_active(ct) == "active"
    assert show(ct, "MainPID") == pid, "a reload is not a restart"
    assert vpn_client_state_in_place(ct)


def test_reload_with_a_broken_file_fails_and_keeps_the_old_state(ct: Container) -> None:
    before = snapshot(ct)
    pid = show(ct, "MainPID")
    write_config(ct, BROKEN)
    res = ct.run("systemctl reload tagrouted", check=False, timeout=90)
    assert res.returncode != 0, "systemctl reload must fail on a broken file"
    assert is_active(ct) == "active"
    assert show(ct, "MainPID") == pid
    assert snapshot(ct) == before, "nothing is applied from a bad file"
    # The problem is in the journal, as FILE:LINE: key.path: what is wrong.
    wait_for(lambda: any(re.search(rf"{re.escape(CONFIG)}:3: services\[0\]\.port", str(r.get("MESSAGE")))
                         for r in journal(ct)),
             timeout=20, what="the config problem in the journal")
    # Put the good file back (the daemon's file watch or this reload picks it up).
    write_config(ct, example_with(NEW_SERVICE))
    assert ct.run("systemctl reload tagrouted", check=False, timeout=90).returncode == 0
    assert snapshot(ct) == before


def test_journal_has_one_record_per_change_with_fields(ct: Container) -> None:
    records = change_records(ct)
    assert records, "no change records in the journal"
    for r in records:
        assert r["TAGROUTED_ACTION"] in ("added", "removed", "replaced", "set"), r
        assert r["TAGROUTED_OBJECT"] in ("route", "rule", "sysctl", "chain", "jump", "table", "set",
                                         "element", "counter"), r
        assert r["TAGROUTED_REASON"] in ("start", "reload", "link", "drift", "resync"), r
        assert r["SYSLOG_IDENTIFIER"] == "tagrouted" and r["_TRANSPORT"] == "journal", r
    start = [r for r in records if r["TAGROUTED_REASON"] == "start"]
    messages = [r["MESSAGE"] for r in start]
    assert len(messages) == len(set(messages)), "one record per change, never twice"
    assert any(r["TAGROUTED_OBJECT"] == "rule" and r["TAGROUTED_ACTION"] == "added"
               and r["MESSAGE"] == "added rule fwmark 0x2a/0xff lookup 42 pref 1042" for r in start), messages
    assert any(r["TAGROUTED_OBJECT"] == "route" and "default dev tun0 table 42" in r["MESSAGE"]
               for r in start), messages
    assert any(r["TAGROUTED_OBJECT"] == "sysctl" and r["TAGROUTED_ACTION"] == "set"
               and "net.ipv4.conf.tun0.rp_filter=2" in r["MESSAGE"] for r in start), messages
    # The reload that added a service changed exactly what a new service needs: legacy, the IPv4
    # FORWARD chain; nftables, its element in the admit set, its counter and its counters-map
    # element (the chains are untouched).
    reload = sorted((r["TAGROUTED_ACTION"], r["TAGROUTED_OBJECT"], r["MESSAGE"])
                    for r in records if r["TAGROUTED_REASON"] == "reload")
    if CURRENT["backend"] == "iptables-legacy":
        assert len(reload) == 1, reload
        assert reload[0][:2] == ("replaced", "chain") and "TAGROUTED-FORWARD (filter, IPv4)" in reload[0][2]
    else:
        assert [r[:2] for r in reload] == [("added", "counter"), ("added", "element"), ("added", "element")], reload
        assert any("admin 0.0.0.0/0 . 192.168.100.3 . tcp . 2222 to set admit4" in r[2] for r in reload), reload


# GET a URL from inside the container (outside the unit's sandbox), as a local Prometheus would.
SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())")


def test_metrics_answer_on_localhost_through_the_sandbox(ct: Container) -> None:
    """The listener works inside the unit's sandbox (address families, system-call filter,
    read-only file system). IPAddressDeny/IPAddressAllow are not enforced in this container:
    its systemd cannot attach the BPF cgroup firewall (a transient unit with IPAddressDeny=any
    still reaches 127.0.0.1 here), so that part of the unit is not proven by this test."""
    write_config(ct, example_with(NEW_SERVICE) + '\nmetrics: {listen: "127.0.0.1:9542"}\n')
    assert ct.run("systemctl reload tagrouted", check=False, timeout=90).returncode == 0
    m = parse_metrics(ct.out(["python3", "-c", SCRAPE, "http://127.0.0.1:9542/metrics", "10"]))
    assert m["tagrouted_in_sync"] == 1 and m['tagrouted_tunnel_up{interface="tun0"}'] == 1, m
    assert m['tagrouted_service_packets_total{service="admin"}'] == 0
    assert m['tagrouted_reloads_total{result="rejected"}'] >= 1, "the broken file of an earlier test"
    assert "metrics:      127.0.0.1:9542" in ct.out("tagroutectl status")
    write_config(ct, example_with(NEW_SERVICE))
    assert ct.run("systemctl reload tagrouted", check=False, timeout=90).returncode == 0


def test_down_is_carried_out_by_the_daemon_and_held_until_reload(ct: Container) -> None:
    before = snapshot(ct)
    pid = show(ct, "MainPID")
    res = ct.run("tagroutectl down", check=False, timeout=90)
    assert res.returncode == 0 and f"held down: tagrouted (pid {pid})" in res.stdout, res
    assert snapshot(ct) == PRISTINE, "everything removed, the sysctls put back"
    assert is_active(ct) == "active" and show(ct, "StatusText").startswith("HELD DOWN")
    status = ct.run("tagroutectl status", check=False)
    assert status.returncode == 0 and "HELD DOWN" in status.stdout, status
    assert ct.run("systemctl reload tagrouted", check=False, timeout=90).returncode == 0
    assert snapshot(ct) == before and show(ct, "MainPID") == pid


def test_watchdog_restarts_a_hung_daemon_which_adopts_the_state(ct: Container) -> None:
    before = snapshot(ct)
    pid = show(ct, "MainPID")
    restarts = int(show(ct, "NRestarts"))
    ct.run(["kill", "-USR2", pid])  # test-only fault switch: stop the watchdog pings
    wait_for(lambda: show(ct, "MainPID") not in ("0", pid) and is_active(ct) == "active"
             and int(show(ct, "NRestarts")) > restarts,
             timeout=WATCHDOG_SEC * 3 + 30, interval=0.2, what="systemd to restart the daemon")
    new_pid = show(ct, "MainPID")
    wait_for(lambda: any("Failed with result 'watchdog'" in str(r.get("MESSAGE")) for r in journal(ct)),
             timeout=20, what="systemd's record that the watchdog (not anything else) killed it")
    # The new daemon adopted what was there: same state, nothing twice, nothing re-added.
    assert snapshot(ct) == before
    assert vpn_client_state_in_place(ct)
    # journald takes datagrams asynchronously: wait for the new daemon's own first-converge
    # record, which it sends after any change record of that converge.
    wait_for(lambda: any(r.get("_PID") == new_pid and "converged" in str(r.get("MESSAGE"))
                         for r in journal(ct)), timeout=20, what="the new daemon's converge record")
    redone = [r["MESSAGE"] for r in change_records(ct, new_pid)]
    assert redone == [], redone


def test_security_exposure_score_and_the_sandbox_in_force(ct: Container) -> None:
    out = ct.out("systemd-analyze security tagrouted --no-pager")
    m = re.search(r"Overall exposure level for tagrouted\.service: (\d+\.\d+)", out)
    assert m, out
    REPORT["exposure"] = m.group(1)
    assert float(m.group(1)) <= 3.0, out
    # The daemon that passed every test above runs inside that sandbox: only CAP_NET_ADMIN
    # (12) and CAP_NET_RAW (13), no new privileges, a seccomp filter, a read-only /usr.
    pid = show(ct, "MainPID")
    proc = dict(line.split(":\t", 1) for line in ct.out(["cat", f"/proc/{pid}/status"]).splitlines()
                if ":\t" in line)
    assert int(proc["CapBnd"], 16) == (1 << 12) | (1 << 13), proc["CapBnd"]
    assert proc["NoNewPrivs"].strip() == "1"
    assert proc["Seccomp"].strip() == "2"
    probe = ct.run(["nsenter", "-t", pid, "-m", "touch", "/usr/tagrouted-probe"], check=False)
    assert probe.returncode != 0, "ProtectSystem=strict: /usr is read-only for the daemon"


def test_stop_honours_on_stop(ct: Container) -> None:
    # on_stop: keep (the default): traffic keeps flowing after the daemon stops.
    before = snapshot(ct)
    assert ct.run("systemctl stop tagrouted", check=False, timeout=90).returncode == 0
    assert is_active(ct) == "inactive"
    assert snapshot(ct) == before
    # Started again, it adopts the kept state without duplicates.
    assert ct.run("systemctl start tagrouted", check=False, timeout=90).returncode == 0
    assert snapshot(ct) == before

    # on_stop: remove: everything tagrouted owns goes, the sysctls it changed come back.
    write_config(ct, example_with(NEW_SERVICE, on_stop="remove"))
    assert ct.run("systemctl reload tagrouted", check=False, timeout=90).returncode == 0
    assert ct.run("systemctl stop tagrouted", check=False, timeout=90).returncode == 0
    assert is_active(ct) == "inactive"
    after = snapshot(ct)
    assert "fwmark 0x2a" not in after["rules4"] + after["rules6"]
    assert "TAGROUTED" not in after["ipt4"] + after["ipt6"]
    assert "tagrouted" not in after["nft"]
    assert after == PRISTINE, "on_stop: remove leaves the host as tagrouted found it"


def test_start_records_are_exactly_the_changes_made(ct: Container) -> None:
    """From the same pristine state, `tagroutectl apply` of the same config makes the changes
    the first daemon logged at start: one journal record per change, none missing, none twice."""
    assert FIRST_PID, "the first start did not run"
    logged = sorted(r["MESSAGE"] for r in change_records(ct, FIRST_PID[0])
                    if r["TAGROUTED_REASON"] == "start")
    run_dir = "/run/tagrouted-apply-check"
    try:
        res = ct.run(["tagroutectl", "--config", f"{PAYLOAD_MOUNT}/tagrouted.yaml", "--run-dir", run_dir,
                      "apply"], check=False, timeout=90)
        assert res.returncode == 0, res.stderr
        applied = sorted(line for line in res.stdout.splitlines() if line.strip())
    finally:
        ct.run(["tagroutectl", "--config", f"{PAYLOAD_MOUNT}/tagrouted.yaml", "--run-dir", run_dir,
                "down"], check=False, timeout=90)
    assert logged == applied
    assert snapshot(ct) == PRISTINE
