"""Sysctl reads/writes inside throw-away namespaces, and the saved-originals file."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from nslab import Netns

from tagrouted.kernel.sysctl import SavedSysctls, conf_key, key_to_path, read_sysctl, write_sysctl

pytestmark = pytest.mark.kernel


def ns_value(ns: Netns, key: str) -> str:
    """What sysctl(8) run inside the namespace says (it wants '/' for dots in names)."""
    return ns.out(["cat", str(key_to_path(key))]).strip()


def test_read_write_in_a_namespace(netns: Callable[[str], Netns]) -> None:
    ns = netns("sc")
    ns.run("ip link add va type veth peer name vb")
    keys = {
        "net.ipv4.ip_forward": "1",
        conf_key(4, "va", "rp_filter"): "2",
        "net.ipv6.conf.all.forwarding": "1",
        conf_key(6, "vb", "accept_ra"): "2",
    }
    before = {key: ns_value(ns, key) for key in keys}

    def run() -> tuple[dict[str, str | None], dict[str, str | None]]:
        read = {key: read_sysctl(key) for key in keys}
        for key, value in keys.items():
            write_sysctl(key, value)
        return read, {key: read_sysctl(key) for key in keys}

    read, after = ns.call(run)
    assert read == before
    assert after == keys
    assert {key: ns_value(ns, key) for key in keys} == keys
    assert ns.out("sysctl -n net.ipv4.conf.va.rp_filter").strip() == "2"


def test_interface_name_with_dots(netns: Callable[[str], Netns]) -> None:
    ns = netns("scdot")
    ns.run("ip link add v0.5 type veth peer name v0.6")
    key = conf_key(4, "v0.5", "rp_filter")
    assert key == "net.ipv4.conf.v0.5.rp_filter"

    def run() -> tuple[str | None, str | None]:
        old = read_sysctl(key)
        write_sysctl(key, "2")
        return old, read_sysctl(key)

    assert ns.call(run) == ("0", "2")
    # sysctl(8) spells a dot inside a name as a slash
    assert ns.out("sysctl -n net.ipv4.conf.v0/5.rp_filter").strip() == "2"
    assert ns.out("sysctl -n net.ipv4.conf.v0/6.rp_filter").strip() == "0"


def test_absent_sysctl_reads_none_and_write_says_which(netns: Callable[[str], Netns]) -> None:
    ns = netns("scabs")

    def run() -> tuple[str | None, str]:
        try:
            write_sysctl(conf_key(4, "nosuch0", "rp_filter"), "2")
        except OSError as e:
            msg = str(e)
        else:
            msg = "no error"
        return read_sysctl(conf_key(4, "nosuch0", "rp_filter")), msg

    value, msg = ns.call(run)
    assert value is None
    assert "cannot set net.ipv4.conf.nosuch0.rp_filter=2" in msg


@pytest.mark.parametrize(("key", "path"), [
    ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
    ("net.ipv4.conf.eth0.100.rp_filter", "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"),
    ("net.ipv6.conf.br.lan.x.accept_ra", "/proc/sys/net/ipv6/conf/br.lan.x/accept_ra"),
    ("net.ipv6.conf.all.forwarding", "/proc/sys/net/ipv6/conf/all/forwarding"),
    ("net.ipv4.neigh.eth0.1.gc_stale_time", "/proc/sys/net/ipv4/neigh/eth0.1/gc_stale_time"),
])
def test_key_to_path(key: str, path: str) -> None:
    assert key_to_path(key) == Path(path)


@pytest.mark.parametrize("key", ["net.ipv4.conf...rp_filter", "net..ipv4", "net.ipv4.conf.a/b.rp_filter", ""])
def test_key_to_path_refuses_what_is_not_a_key(key: str) -> None:
    with pytest.raises(ValueError):
        key_to_path(key)


def test_saved_originals_first_wins_and_survive(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    saved = SavedSysctls(run_dir)
    assert saved.originals() == {}
    saved.remember("net.ipv4.ip_forward", "0")
    saved.remember("net.ipv4.ip_forward", "1")  # a later value is ours, not the original
    saved.remember("net.ipv4.conf.eth0.100.rp_filter", "1")

    again = SavedSysctls(str(run_dir))  # a restarted daemon
    assert again.originals() == {"net.ipv4.ip_forward": "0", "net.ipv4.conf.eth0.100.rp_filter": "1"}
    path = run_dir / "sysctl-originals.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == again.originals()

    again.forget("net.ipv4.ip_forward")
    again.forget("net.ipv4.ip_forward")  # twice is fine
    assert SavedSysctls(run_dir).originals() == {"net.ipv4.conf.eth0.100.rp_filter": "1"}
    again.remember("net.ipv4.ip_forward", "1")  # forgotten, so a new first original
    assert saved.originals()["net.ipv4.ip_forward"] == "1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in run_dir.iterdir()) == ["sysctl-originals.json", "sysctl-originals.lock"]


def test_saved_originals_ignore_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        SavedSysctls(tmp_path).remember("net.ipv4.ip_forward", "0")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sysctl-originals.json").stat().st_mode) == 0o600


def test_corrupt_originals_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sysctl-originals.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"sysctl-originals\.json: not the JSON"):
        SavedSysctls(tmp_path).originals()
