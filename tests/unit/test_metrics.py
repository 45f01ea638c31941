"""The metrics exporter without a daemon: the families a status snapshot turns into, as
Prometheus' own parser reads them, and the unix-socket listener (a temporary directory: no
network, no root). The TCP listeners and the figures of a live daemon are tested in
tests/kernel/test_daemon.py, inside a namespace."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import http_get_metrics, parse_metrics
from prometheus_client import generate_latest

from tagrouted.core.config import MetricsSection
from tagrouted.daemon.metrics import REPAIR_OBJECTS, MetricsExporter


def status(**changes: Any) -> dict[str, Any]:
    """A status snapshot as the scheduler publishes it (tagroutectl status --json)."""
    base: dict[str, Any] = {
        "version": "0.1.0", "in_sync": True, "held_down": False, "tunnel_interface": "tun0",
        "tunnel_up": True, "repairs": 3, "repairs_by_object": {"rule": 2, "chain": 1},
        "reloads": {"ok": 4, "rejected": 1}, "netlink_overflows": 0,
        "services": [
            {"name": "web", "proto": "tcp", "port": "443", "address": "192.168.100.3",
             "packets": 12, "bytes": 3456},
            {"name": "echo", "proto": "udp", "port": "7000", "address": "192.168.100.3",
             "packets": 0, "bytes": 0},
        ],
    }
    return base | changes


def scraped(snapshot: dict[str, Any], observe: tuple[float, ...] = ()) -> dict[str, float]:
    exporter = MetricsExporter(lambda: snapshot)
    for seconds in observe:
        exporter.observe_pass(seconds)
    return parse_metrics(generate_latest(exporter.registry).decode())


def test_a_snapshot_as_prometheus_reads_it() -> None:
    m = scraped(status(), observe=(0.004, 0.3))
    assert m['tagrouted_build_info{backend="iptables-legacy",version="0.1.0"}'] == 1
    assert m["tagrouted_in_sync"] == 1 and m["tagrouted_held_down"] == 0
    assert m['tagrouted_tunnel_up{interface="tun0"}'] == 1
    assert m['tagrouted_service_packets_total{service="web"}'] == 12
    assert m['tagrouted_service_bytes_total{service="web"}'] == 3456
    assert m['tagrouted_service_packets_total{service="echo"}'] == 0
    assert m['tagrouted_repairs_total{object="rule"}'] == 2
    assert m['tagrouted_repairs_total{object="chain"}'] == 1
    assert m['tagrouted_reloads_total{result="ok"}'] == 4
    assert m['tagrouted_reloads_total{result="rejected"}'] == 1
    assert m["tagrouted_conflicts"] == 0
    assert m["tagrouted_netlink_overflows_total"] == 0
    assert m["tagrouted_pass_duration_seconds_count"] == 2
    assert m["tagrouted_pass_duration_seconds_sum"] == pytest.approx(0.304)
    assert m['tagrouted_pass_duration_seconds_bucket{le="0.005"}'] == 1
    assert m['tagrouted_pass_duration_seconds_bucket{le="+Inf"}'] == 2


def test_every_known_repair_object_and_reload_result_starts_at_zero() -> None:
    """increase() loses the first step of a series that appears at 1."""
    m = scraped(status(repairs_by_object={}, reloads={}))
    assert {"route", "rule", "sysctl", "chain", "jump"} <= set(REPAIR_OBJECTS)
    for obj in REPAIR_OBJECTS:
        assert m[f'tagrouted_repairs_total{{object="{obj}"}}'] == 0
    assert m['tagrouted_reloads_total{result="ok"}'] == m['tagrouted_reloads_total{result="rejected"}'] == 0


def test_gauges_follow_the_snapshot() -> None:
    m = scraped(status(in_sync=False, held_down=True, tunnel_up=False,
                       firewall_backend="nftables", conflicts=[{"table": "ufw"}, {"table": "docker"}]))
    assert m["tagrouted_in_sync"] == 0 and m["tagrouted_held_down"] == 1
    assert m['tagrouted_tunnel_up{interface="tun0"}'] == 0
    assert m['tagrouted_build_info{backend="nftables",version="0.1.0"}'] == 1
    assert m["tagrouted_conflicts"] == 2


def test_no_tunnel_and_no_per_service_rules_export_no_such_series() -> None:
    """A gateway has no tunnel; a plain service host has no rule per service (counters None)."""
    services = [{"name": "web", "proto": "tcp", "port": "443", "address": "192.168.100.3",
                 "packets": None, "bytes": None}]
    m = scraped(status(tunnel_interface=None, tunnel_up=None, services=services))
    assert not any(k.startswith(("tagrouted_tunnel_up", "tagrouted_service_")) for k in m), m


def test_each_path_exports_its_tunnel_and_counts() -> None:
    """Several public servers: each path's tunnel and what its tagging rules counted."""
    paths = [
        {"name": "server-a", "tunnel": "tun0", "tunnel_up": True,
         "requests": {"packets": 27, "bytes": 3407}, "replies": {"packets": 17, "bytes": 5276}},
        {"name": "server-b", "tunnel": "wg0", "tunnel_up": False,
         "requests": {"packets": 5, "bytes": 600}, "replies": {"packets": None, "bytes": None}},
    ]
    m = scraped(status(paths=paths))
    assert m['tagrouted_path_tunnel_up{interface="tun0",path="server-a"}'] == 1
    assert m['tagrouted_path_tunnel_up{interface="wg0",path="server-b"}'] == 0
    assert m['tagrouted_path_packets_total{direction="requests",path="server-a"}'] == 27
    assert m['tagrouted_path_bytes_total{direction="replies",path="server-a"}'] == 5276
    assert m['tagrouted_path_packets_total{direction="requests",path="server-b"}'] == 5
    assert 'tagrouted_path_packets_total{direction="replies",path="server-b"}' not in m


def test_policy_drops_are_exported_per_service() -> None:
    services = [{"name": "web", "packets": 12, "bytes": 3456, "dropped": 7, "limited": 2},
                {"name": "echo", "packets": 0, "bytes": 0, "dropped": None, "limited": None}]
    m = scraped(status(services=services, forwards=[{"name": "openvpn", "dropped": 3, "limited": None}]))
    assert m['tagrouted_service_dropped_packets_total{service="web"}'] == 7
    assert m['tagrouted_service_limited_packets_total{service="web"}'] == 2
    assert m['tagrouted_service_dropped_packets_total{service="openvpn"}'] == 3
    assert 'tagrouted_service_dropped_packets_total{service="echo"}' not in m


def test_a_scrape_reads_the_latest_published_snapshot() -> None:
    published = [status()]
    exporter = MetricsExporter(lambda: published[0])
    assert parse_metrics(generate_latest(exporter.registry).decode())["tagrouted_in_sync"] == 1
    published[0] = status(in_sync=False)  # the worker's one reference swap
    assert parse_metrics(generate_latest(exporter.registry).decode())["tagrouted_in_sync"] == 0


# ---- the unix-socket listener ----------------------------------------------------------------
@pytest.fixture
def exporter() -> Any:
    e = MetricsExporter(lambda: status())
    yield e
    e.stop()


def test_unix_socket_serves_and_is_removed_on_stop(exporter: MetricsExporter, tmp_path: Path) -> None:
    path = str(tmp_path / "metrics.sock")
    exporter.listen(MetricsSection(path=path))
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666), "its directory decides who may scrape"
    m = parse_metrics(http_get_metrics(path))
    assert m['tagrouted_service_packets_total{service="web"}'] == 12
    exporter.listen(MetricsSection(path=path))  # unchanged: keeps serving
    assert parse_metrics(http_get_metrics(path))["tagrouted_in_sync"] == 1
    exporter.stop()
    assert not os.path.exists(path)


def test_unix_socket_moves_and_replaces_a_stale_socket(exporter: MetricsExporter, tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a crashed daemon leaves
    first = str(tmp_path / "first.sock")
    exporter.listen(MetricsSection(path=first))
    exporter.listen(MetricsSection(path=str(stale)))
    assert not os.path.exists(first), "the old socket goes when the listener moves"
    assert "tagrouted_in_sync 1.0" in http_get_metrics(str(stale))


def test_unix_socket_never_replaces_a_file_or_a_live_listener(exporter: MetricsExporter, tmp_path: Path) -> None:
    regular = tmp_path / "important.txt"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        exporter.listen(MetricsSection(path=str(regular)))
    assert regular.read_text() == "keep me"
    live = str(tmp_path / "live.sock")
    exporter.listen(MetricsSection(path=live))
    other = MetricsExporter(lambda: status())
    with pytest.raises(OSError, match="already answers"):
        other.listen(MetricsSection(path=live))
    assert "tagrouted_in_sync" in http_get_metrics(live)


def test_a_silent_client_does_not_block_a_scrape(exporter: MetricsExporter, tmp_path: Path) -> None:
    path = str(tmp_path / "metrics.sock")
    exporter.listen(MetricsSection(path=path))
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(path)
        assert "tagrouted_in_sync" in http_get_metrics(path)
