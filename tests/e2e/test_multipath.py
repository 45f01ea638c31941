"""End to end, issue 14: two public servers, each reply back through the tunnel its request came
through. Server A is the seed's public server with its OpenVPN server behind it (tun0 at home),
server B a VPS that is gateway and WireGuard server in one (wg0 at home); one home with the VPN
client holding both tunnels and the web service. tagrouted on every host; one lab per backend.

What a user checks: through all four public addresses at once, TLS and UDP, the service sees
the client's own address; each reply leaves the VPN client through its own path's tunnel (the
lab's counters on each tunnel, and tagrouted's per-path counters in status); with one tunnel
down the other path keeps working and the down path fails closed (nothing of its replies leaves
through the home ISP); back up, it works again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from firewall_view import BACKENDS
from lab import CLIENT4, CLIENT6, SERVERS, TLS_PORT, UDP_PORT, Lab
from nslab import wait_for
from support import FAIL_TIMEOUT, built_lab, require_daemon

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=BACKENDS)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with built_lab(layout="multipath", manager="tagrouted", backend=request.param) as lab:
        yield lab


def asks(*paths: str) -> list[tuple[str, str, int]]:
    """TLS and UDP to both public addresses of each path's server."""
    return [(proto, public, TLS_PORT if proto == "tcp" else UDP_PORT)
            for path in paths for public in SERVERS[path][:2] for proto in ("tcp", "udp")]


def clients(requests: list[tuple[str, str, int]]) -> list[str]:
    """The answer each request should get: the client's own address of its family."""
    return [CLIENT6 if ":" in address else CLIENT4 for _, address, _ in requests]


def test_the_service_sees_the_client_through_both_servers_at_once(lab: Lab) -> None:
    everything = asks("server-a", "server-b")
    assert lab.request_all(everything) == clients(everything)


def test_every_host_is_in_sync(lab: Lab) -> None:
    for host in lab.configs:
        res = lab.tagroutectl(host, "diff")
        assert res.returncode == 0, f"{host} drifted:\n{res.stdout}{res.stderr}"


def test_doctor_checks_every_path_and_finds_nothing_wrong(lab: Lab) -> None:
    for host in lab.configs:
        res = lab.tagroutectl(host, "doctor")
        assert res.returncode == 0, f"{host}:\n{res.stdout}{res.stderr}"
    out = lab.tagroutectl("vpnclient", "doctor").stdout
    for path, tun in (("server-a", "tun0"), ("server-b", "wg0")):
        assert f"ok    tagged route (path {path}): `ip -4 route get 8.8.8.8 mark" in out, out
        assert f"goes dev {tun}" in out, out


def path_counts(lab: Lab, host: str) -> dict[str, int]:
    """tagrouted's reply counter of each path on `host`, in packets, read after this call."""
    return {p["name"]: (p["replies"] or {}).get("packets", 0) for p in lab.fresh_status(host)["paths"]}


@pytest.mark.parametrize("path", list(SERVERS))
def test_each_reply_leaves_through_its_own_tunnel(lab: Lab, path: str) -> None:
    require_daemon(lab)
    tunnel = SERVERS[path][2]
    others = [tun for name, (_, _, tun, _) in SERVERS.items() if name != path]
    before = lab.tunnel_replies()
    counted = {host: path_counts(lab, host) for host in ("vpnclient", "web")}
    requests = asks(path)
    assert lab.request_all(requests) == clients(requests)
    after = lab.tunnel_replies()
    assert after[tunnel] - before[tunnel] >= len(requests), (before, after)
    assert all(after[tun] == before[tun] for tun in others), (before, after)
    # tagrouted's own per-path counters say the same (read on its next timer pass)
    for host, was in counted.items():
        now = path_counts(lab, host)
        assert now[path] >= was[path] + len(requests), (host, was, now)
        assert all(now[name] == was[name] for name in SERVERS if name != path), (host, was, now)


@pytest.mark.parametrize("down", list(SERVERS))
def test_one_tunnel_down_the_other_path_works_and_the_down_one_fails_closed(
        lab: Lab, down: str, report: Callable[[str], None]) -> None:
    require_daemon(lab)
    (up,) = [name for name in SERVERS if name != down]
    tunnel = SERVERS[down][2]
    lab.stop_tunnel(down)
    try:
        wait_for(lambda: lab.status("vpnclient")["tunnel_up"] is False, timeout=10,  # type: ignore[index]
                 what="status: a tunnel down")
        paths = {p["name"]: p for p in lab.status("vpnclient")["paths"]}  # type: ignore[index]
        assert (paths[down]["tunnel_up"], paths[up]["tunnel_up"]) == (False, True)
        assert lab.request_all(asks(up)) == clients(asks(up)), "the other path keeps working"
        assert lab.request_all(asks(down), timeout=FAIL_TIMEOUT) == [None] * 4
        # Replies of the down path's connections stay home: its table's unreachable fallback.
        table = lab.vpnclient.out(f"ip -4 route show table {lab_table(down)}")
        assert table.startswith("unreachable default") and f"dev {tunnel}" not in table, table
        leaked, through = lab.leaked(), lab.tunnel_replies()
        lab.late_reply(down)
        assert lab.leaked() == leaked, "a reply of the down path left through the home ISP"
        assert lab.tunnel_replies() == through, "a reply of the down path took another tunnel"
    finally:
        t0 = time.monotonic()
        lab.start_tunnel(down, wait=False)
    public = SERVERS[down][0]
    wait_for(lambda: lab.request_tcp(public, timeout=1.0) == CLIENT4, timeout=40, interval=0.02,
             what=f"path {down} working again")
    report(f"multipath ({lab.backend}): {down}'s tunnel back -> its path working again after "
           f"{time.monotonic() - t0:.2f} s (from the client's start)")
    everything = asks("server-a", "server-b")
    assert lab.request_all(everything) == clients(everything)


def lab_table(path: str) -> int:
    return {"server-a": 42, "server-b": 43}[path]


def test_the_control_a_path_the_service_host_does_not_know_leaks(lab: Lab) -> None:
    """Without its path on the service host, server B's replies go out the home ISP: the
    second path is what makes server B work at all."""
    require_daemon(lab)
    original = lab.configs["web"].read_text()
    only_a = "\n".join(line for line in original.splitlines() if "name: server-b" not in line) + "\n"
    try:
        lab.configs["web"].write_text(only_a)
        assert lab.tagroutectl("web", "reload").returncode == 0
        leaked = lab.leaked()
        assert lab.request_all(asks("server-b"), timeout=FAIL_TIMEOUT) == [None] * 4
        assert lab.leaked() > leaked, "the replies left through the home ISP"
        assert lab.request_all(asks("server-a")) == clients(asks("server-a"))
    finally:
        lab.configs["web"].write_text(original)
        assert lab.tagroutectl("web", "reload").returncode == 0
    lab.wait_path()
    everything = asks("server-a", "server-b")
    assert lab.request_all(everything) == clients(everything)
