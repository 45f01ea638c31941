"""Both firewall backends, as the tests see them: what each holds of ours, and how to tamper with it.

The same test runs on both backends (parametrized by the `backend` fixture in conftest.py); what
differs is only how the kernel state is read back and how it is disturbed, and that lives here:
- `with_backend(text, backend)`: a config text with `firewall: {backend: ...}` set;
- `firewall_snapshot(out)`: every firewall state of the host (the whole nft ruleset, incl. what
  iptables-nft writes, and the legacy tables) without counters or handles, for before/after
  comparisons of foreign state;
- `ours(out, backend)`: only what tagrouted keeps, for "is it there, once" checks;
- `TAMPERS[backend]`: one disturbance of each kind a user (or another tool) might cause, with
  the line `tagroutectl diff` then prints first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

BACKENDS = ("nftables", "iptables-legacy")
Out = Callable[[list[str]], str]


def with_backend(text: str, backend: str) -> str:
    """The config text with firewall.backend set (appended: the examples have no firewall key)."""
    assert "\nfirewall:" not in "\n" + text, "the text already chooses a backend"
    return text.rstrip("\n") + f"\nfirewall: {{backend: {backend}}}\n"


def config_copy(src: Path, backend: str, dest_dir: Path, name: str | None = None) -> Path:
    dest = dest_dir / (name or src.name)
    dest.write_text(with_backend(src.read_text(), backend))
    return dest


def _no_counters(text: str) -> str:
    text = re.sub(r"counter packets \d+ bytes \d+", "counter", text)
    return re.sub(r"packets \d+ bytes \d+", "", text)


def _canonical(value: Any) -> Any:
    """nft JSON without what changes by itself or by re-insertion: handles and counter values
    go, elements are sorted; rules keep their order within their chain."""
    if isinstance(value, dict):
        return {k: (sorted((_canonical(e) for e in v), key=json.dumps) if k == "elem" else _canonical(v))
                for k, v in value.items() if k not in ("handle", "packets", "bytes")}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def nft_ruleset(out: Out) -> str:
    """The whole nft ruleset (iptables-nft's tables included), as canonical JSON: objects in
    name order, rules in chain order, no handles or counter values."""
    return canonical_nft(out(["nft", "-j", "list", "ruleset"]))


def canonical_nft(json_text: str) -> str:
    """`nft -j list ruleset` output in the canonical form of nft_ruleset()."""
    doc = json.loads(json_text or '{"nftables": []}')
    items = [_canonical(x) for x in doc.get("nftables", []) if "metainfo" not in x]
    objects = sorted((x for x in items if "rule" not in x), key=lambda x: json.dumps(x, sort_keys=True))
    rules = [x for x in items if "rule" in x]
    rules.sort(key=lambda x: (x["rule"].get("family", ""), x["rule"].get("table", ""), x["rule"].get("chain", "")))
    return "\n".join(json.dumps(x, sort_keys=True) for x in (*objects, *rules))


def legacy_save(out: Out, family: int) -> str:
    """A legacy family's rules and user chains without counters; tables merely instantiated
    (reading one creates it, empty) count as absent."""
    cmd = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    text = "\n".join(x for x in out([cmd]).splitlines() if not x.startswith("#"))
    text = re.sub(r"\[\d+:\d+\]", "[0:0]", text)
    return "".join("*" + block for block in text.split("*")[1:]
                   if any(x.startswith(("-A", ":")) and not re.match(r":[A-Z]+ ACCEPT ", x)
                          for x in block.splitlines()))


def without_hostfw(save_text: str) -> str:
    """iptables-save text without counters, comments and what tagrouted keeps in the host's
    FORWARD chains (its chain TAGROUTED-HOSTFW and the one jump to it): what another tool owns."""
    text = re.sub(r"\[\d+:\d+\]", "[0:0]", save_text)
    return "\n".join(x for x in text.splitlines() if "TAGROUTED-HOSTFW" not in x and not x.startswith("#"))


def hostfw(out: Out) -> str:
    """Our accepts in the host's iptables-style FORWARD chains (iptables-nft and legacy, both
    families), as iptables-save lines prefixed by where they are."""
    lines = []
    for cmd in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        # no -t: iptables-legacy-save -t filter would create the table it reads
        text = out(["sh", "-c", f"{cmd} 2>/dev/null || true"])
        lines += [f"{cmd} {x}" for x in text.splitlines() if "TAGROUTED-HOSTFW" in x]
    return "\n".join(lines)


def firewall_snapshot(out: Out) -> dict[str, str]:
    return {"nft": nft_ruleset(out), "ipt4": legacy_save(out, 4), "ipt6": legacy_save(out, 6)}


def nft_ours(out: Out) -> str:
    """Our table as nft lists it (empty when absent), without counter values."""
    text = out(["sh", "-c", "nft list table inet tagrouted 2>/dev/null || true"])
    return _no_counters(text)


def legacy_ours(out: Out) -> str:
    """Our chains, their rules and the jumps to them, both families (iptables-save lines)."""
    lines = []
    for family in (4, 6):
        lines += [f"{family} {x}" for x in legacy_save(out, family).splitlines() if "TAGROUTED" in x]
    return "\n".join(lines)


def ours(out: Out, backend: str) -> str:
    return nft_ours(out) if backend == "nftables" else legacy_ours(out)


def holds_nothing(out: Out) -> bool:
    """Neither backend holds anything of ours."""
    return nft_ours(out) == "" and legacy_ours(out) == ""


def admits(out: Out, backend: str, address: str, proto: str, port: int) -> bool:
    """Whether our firewall admits (forwards to) address proto/port, each piece exactly once."""
    if backend == "nftables":
        text = nft_ours(out)
        return (text.count(f"{address} . {proto} . {port} ") == 2  # the admit set and the counters map
                and text.count("@admit4 ") == 1 and text.count("chain forward {") == 1)
    text = legacy_ours(out)
    rule = f"-d {address}/32 -i tun0 -o eth0 -p {proto} -m {proto} --dport {port} -j ACCEPT"
    # jumps to TAGROUTED-FORWARD: filter's (admission) and mangle's (MSS clamp), in both families
    return (text.count(rule) == 1 and text.count("-j TAGROUTED-FORWARD") == 4
            and text.count("-j TAGROUTED-PREROUTING") == 2)


# kind -> (command, the line `tagroutectl diff` prints first for it), on the vpn-client example.
TAMPERS: dict[str, dict[str, tuple[str, str]]] = {
    "iptables-legacy": {
        "chain flushed": ("iptables-legacy -t mangle -F TAGROUTED-PREROUTING",
                          "+[mangle IPv4] -A TAGROUTED-PREROUTING -i tun0 -j DSCP --set-dscp 0x2a"),
        "jump deleted": ("iptables-legacy -t mangle -D PREROUTING -m comment --comment tagrouted "
                         "-j TAGROUTED-PREROUTING", "+[mangle IPv4] -A PREROUTING"),
        "foreign rule in our chain": ("iptables-legacy -t filter -I TAGROUTED-FORWARD 2 -j ACCEPT",
                                      "-[filter IPv4] -A TAGROUTED-FORWARD -j ACCEPT"),
        "table flushed and chains deleted": ("sh -c 'iptables-legacy -t mangle -F && iptables-legacy -t mangle -X'",
                                             "+[mangle IPv4] :TAGROUTED-PREROUTING - [0:0]"),
    },
    "nftables": {
        "chain flushed": ("nft flush chain inet tagrouted prerouting",
                          '+add rule inet tagrouted prerouting iifname "tun0" ip dscp set 42'),
        "table deleted": ("nft delete table inet tagrouted", "+add table inet tagrouted"),
        "ruleset flushed": ("nft flush ruleset", "+add table inet tagrouted"),
        "foreign rule in our chain": ("nft insert rule inet tagrouted forward accept",
                                      "-rule of chain forward (inet tagrouted), handle"),
        "element deleted": ("nft delete element inet tagrouted admit4 '{ 0.0.0.0/0 . 192.168.100.3 . tcp . 443 }'",
                            "+add element inet tagrouted admit4 { 0.0.0.0/0 . 192.168.100.3 . tcp . 443"),
        "foreign element": ("nft add element inet tagrouted admit4 '{ 0.0.0.0/0 . 192.168.100.9 . tcp . 22 }'",
                            "-element of set admit4 (inet tagrouted): not written by tagrouted"),
        "chain deleted": ("sh -c 'nft flush chain inet tagrouted postrouting && "
                          "nft delete chain inet tagrouted postrouting'",
                          "+add chain inet tagrouted postrouting"),
    },
}


# Other tools' firewalls, as the host-firewall tests (kernel and e2e) load them.
NATIVE_FORWARD_DROP = """
table inet filter {
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
  }
}
"""
CONNMARK_KILLSWITCH = """
table inet killswitch {
  chain out {
    type filter hook output priority 0; policy accept;
    ct mark set 0x1
  }
}
"""
EARLY_MARK = """
table inet early {
  chain out {
    type route hook output priority mangle; policy accept;
    meta mark set 0x1
  }
}
"""
# Docker's filter table as iptables-save prints it (for the pure judgement's tests and benchmark)
DOCKER_SAVE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""
# Docker's filter table (per family: iptables-nft / ip6tables-nft), and a plain drop policy.
DOCKER = ["{ipt} -N DOCKER-USER", "{ipt} -A DOCKER-USER -j RETURN", "{ipt} -A FORWARD -j DOCKER-USER",
          "{ipt} -P FORWARD DROP"]
DROP_ONLY = ["{ipt} -P FORWARD DROP"]


def both_families(commands: list[str]) -> list[str]:
    return [c.format(ipt=ipt) for ipt in ("iptables-nft", "ip6tables-nft") for c in commands]
