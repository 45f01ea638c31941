"""Per-service policy (allow_from, rate_limit, mss_clamp) against the real kernel, on both
firewall backends: what the kernel accepts, that a sync leaves it alone afterwards, and that the
meters the kernel fills are never taken for drift.

What a user checks: apply converges, diff says in sync, a second apply changes nothing, status
counts per service exist, down leaves the namespace as it found it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from firewall_view import holds_nothing, ours, with_backend
from nslab import Netns, kernel_snapshot
from test_apply import ctl, host

pytestmark = pytest.mark.kernel

GATEWAY = """\
roles: [gateway]
services:
  - {name: web, proto: tcp, port: 443, address: 192.168.100.3,
     allow_from: [198.51.100.0/24, 203.0.113.7], rate_limit: 10/s, burst: 20}
  - {name: web6, proto: tcp, port: 443, address: "fd00:100::3", rate_limit: 30/min}
  - {name: guarded6, proto: udp, port: 7000, address: "fd00:100::3", allow_from: ["2001:db8:c::/48"]}
  - {name: echo, proto: udp, port: 7000, address: 192.168.100.3}
gateway:
  public_interface: eth0
  public_addresses: [192.0.2.200, "2001:db8:a::200"]
  home_networks: [192.168.100.0/24, "fd00:100::/64"]
  via: [192.168.200.2, "fd00:200::2"]
  forwards:
    - {name: openvpn, proto: udp, port: 1194, address: 192.168.200.2, allow_from: [203.0.113.0/24]}
"""

VPN_CLIENT = """\
roles: [vpn-client]
services:
  - {name: web, proto: tcp, port: 443, address: 192.168.100.3, allow_from: [198.51.100.0/24]}
  - {name: web6, proto: tcp, port: 443, address: "fd00:100::3"}
vpn_client: {tunnel_interface: tun0, lan_interface: eth0, mss_clamp: 1200}
"""

VPN_SERVER = """\
roles: [vpn-server]
vpn_server: {tunnel_interface: tun0, uplink_interface: eth0, mss_clamp: off}
"""


def write(tmp_path: Path, text: str, backend: str) -> Path:
    path = tmp_path / "tagrouted.yaml"
    path.write_text(with_backend(text, backend))
    return path


def snapshot(ns: Netns) -> dict[str, str]:
    return {**kernel_snapshot(ns.out, ["net.ipv4.ip_forward"]), "nft": ns.out("nft list ruleset")}


@pytest.mark.parametrize("text", [GATEWAY, VPN_CLIENT, VPN_SERVER], ids=["gateway", "vpn-client", "vpn-server"])
def test_policy_round_trip(netns: type[Netns], tmp_path: Path, backend: str, text: str) -> None:
    ns = host(netns, "pol", tun=True)
    config = write(tmp_path, text, backend)
    before = snapshot(ns)
    code, out, err = ctl(ns, config, tmp_path, "apply")
    assert code == 0, out + err
    mine = ours(ns.out, backend)
    if "rate_limit" in text:
        assert ("hashlimit-above 10/sec" in mine if backend == "iptables-legacy"
                else "limit rate over 10/second burst 20 packets" in mine), mine
    if "allow_from" in text:
        assert "198.51.100.0/24" in mine, mine
    if "mss_clamp: 1200" in text:
        assert ("TCPMSS --set-mss 1200" in mine if backend == "iptables-legacy"
                else "maxseg size set 1200" in mine), mine
    if "mss_clamp: off" in text:
        assert "TCPMSS" not in mine and "maxseg" not in mine, mine
    assert ctl(ns, config, tmp_path, "diff")[:2] == (0, "")
    code, out, err = ctl(ns, config, tmp_path, "apply")
    assert (code, out.strip()) == (0, "in sync: nothing to change"), out + err
    assert ctl(ns, config, tmp_path, "down")[0] == 0
    assert snapshot(ns) == before
    assert holds_nothing(ns.out)


@pytest.mark.parametrize("backend", ["nftables"])
def test_meter_entries_are_the_kernels_not_drift(netns: type[Netns], tmp_path: Path, backend: str) -> None:
    """What the kernel adds to a meter carries no comment of ours: a sync neither reports it nor
    flushes it (that would hand every source a fresh burst)."""
    ns = host(netns, "met", tun=True)
    config = write(tmp_path, GATEWAY, backend)
    assert ctl(ns, config, tmp_path, "apply")[0] == 0
    meter = next(line.split()[1] for line in ns.out("nft list sets table inet tagrouted").splitlines()
                 if line.strip().startswith("set meter_") and "_4 " in line)
    ns.run(["nft", "add", "element", "inet", "tagrouted", meter,
            "{ 198.51.100.10 . 192.168.100.3 . tcp . 443 }"])
    assert ctl(ns, config, tmp_path, "diff")[:2] == (0, "")
    code, out, _ = ctl(ns, config, tmp_path, "apply")
    assert out.strip() == "in sync: nothing to change"
    assert "198.51.100.10" in ns.out(["nft", "list", "set", "inet", "tagrouted", meter])
    # a changed limit is a new meter: the old one goes, nothing else is rewritten
    changed = write(tmp_path, GATEWAY.replace("rate_limit: 10/s, burst: 20", "rate_limit: 5/s"), backend)
    code, out, err = ctl(ns, changed, tmp_path, "apply")
    assert code == 0, err
    assert f"removed set {meter}" in out, out
    assert ctl(ns, changed, tmp_path, "diff")[:2] == (0, "")
