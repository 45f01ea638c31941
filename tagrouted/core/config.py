"""The host's role config: its types, and the strict loader that turns a YAML file into them.

Owns: parsing /etc/tagrouted/tagrouted.yaml into frozen dataclasses and reporting every problem
as one line `FILE:LINE: key.path: what is wrong`. Pure: reads the one file it is handed, touches
no kernel state, imports no edge library. Nothing downstream ever sees a half-valid Config.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Literal

from .state import RATE_UNITS, RateLimit

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Family = Literal[4, 6]
Proto = Literal["tcp", "udp"]

ROLES = ("gateway", "vpn-server", "vpn-client", "service")
DEFAULT_CONFIG_PATH = "/etc/tagrouted/tagrouted.yaml"


@dataclass(frozen=True)
class Tag:
    """The tag that follows a connection home and back: DSCP on the wire, fwmark inside a host."""

    dscp: int = 42
    mark: int = 42
    table: int = 42
    priority: int = 1042
    # The bits of the packet mark and connmark that are ours: set, saved, restored and matched
    # only within them, so other tools' bits (Tailscale 0xff0000, kube-proxy 0x4000) survive.
    mark_mask: int = 0xFF


DEFAULT_PATH = "default"  # the name of the single-path form's one path (status, counters)


@dataclass(frozen=True)
class TagPath:
    """One way home and back (issue 14): a public server's tunnel and the tag its connections carry.

    Each public server runs its own single-path tagrouted; the home hosts list one path per
    server (`paths:`), each with its own DSCP, mark, table and rule priority, so the service host
    remembers per connection which server it came through and its reply goes back there. The
    single-path form (`tag` + `vpn_client.tunnel_interface` + `service.via`) is one such path,
    named `default` (Config.tag_paths)."""

    name: str
    dscp: int
    mark: int
    table: int
    priority: int
    tunnel_interface: str | None = None  # vpn-client: the tunnel to this path's public server
    via: tuple[IPAddress, ...] = ()      # a separate service host: this path's VPN client (one per family)


@dataclass(frozen=True)
class PortRange:
    """An inclusive port range; a single port has first == last."""

    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @property
    def iptables(self) -> str:
        """The form iptables-save prints for --dport."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


@dataclass(frozen=True)
class Service:
    """One exposed endpoint: public `port` on the gateway, reached at `address`:`to_port` at home.

    Also used for `gateway.forwards` (plain DNAT + ACCEPT without tagging)."""

    name: str
    proto: Proto
    port: PortRange
    address: IPAddress
    to_port: int | None = None
    # Only these sources reach it (empty: everyone); new connections per source beyond the limit
    # are dropped (None: no limit).
    allow_from: tuple[IPNetwork, ...] = ()
    rate_limit: RateLimit | None = None

    @property
    def family(self) -> Family:
        return 4 if self.address.version == 4 else 6

    @property
    def home_port(self) -> PortRange:
        """The destination port the packet carries after the gateway's DNAT."""
        return PortRange(self.to_port, self.to_port) if self.to_port else self.port


@dataclass(frozen=True)
class GatewaySection:
    public_interface: str
    public_addresses: tuple[IPAddress, ...]
    home_networks: tuple[IPNetwork, ...]
    via: tuple[IPAddress, ...] = ()
    forwards: tuple[Service, ...] = ()


# mss_clamp: "pmtu" (to the route's MTU), "off", or the MSS to set at most.
MssSetting = Literal["pmtu", "off"] | int
MSS_MIN, MSS_MAX = 536, 65495  # RFC 879's default MSS; the largest a 65535-byte IPv4 packet carries


@dataclass(frozen=True)
class VpnServerSection:
    tunnel_interface: str
    uplink_interface: str
    families: tuple[Family, ...] = (4, 6)
    mss_clamp: MssSetting = "pmtu"


@dataclass(frozen=True)
class VpnClientSection:
    tunnel_interface: str | None  # None with `paths:` (each path names its tunnel)
    lan_interface: str
    rp_filter: Literal["off", "loose"] = "loose"
    mss_clamp: MssSetting = "pmtu"


@dataclass(frozen=True)
class ServiceSection:
    """Where a service host sends tagged replies: `via` (one address per family) or a tunnel."""

    via: tuple[IPAddress, ...] = ()
    tunnel_interface: str | None = None


Backend = Literal["auto", "nftables", "iptables-legacy"]
BACKENDS: tuple[str, ...] = ("auto", "nftables", "iptables-legacy")


@dataclass(frozen=True)
class FirewallSection:
    """Which firewall edge keeps our rules, and what we do about the host's own firewall."""

    backend: Backend = "auto"
    host_firewall: Literal["integrate", "report"] = "integrate"


@dataclass(frozen=True)
class MetricsSection:
    """Where the Prometheus endpoint listens: an IP address and port, or a unix socket path."""

    host: str | None = None  # an IPv4 or IPv6 literal (no names: nothing is resolved)
    port: int | None = None
    path: str | None = None  # an absolute path for an AF_UNIX socket

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in (self.host or "") else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    path: str
    roles: tuple[str, ...]
    tag: Tag = field(default_factory=Tag)
    services: tuple[Service, ...] = ()
    gateway: GatewaySection | None = None
    vpn_server: VpnServerSection | None = None
    vpn_client: VpnClientSection | None = None
    service: ServiceSection | None = None
    on_stop: Literal["keep", "remove"] = "keep"
    resync_interval: float = 2.0
    firewall: FirewallSection = field(default_factory=FirewallSection)
    metrics: MetricsSection | None = None  # off when absent
    # `paths:` (several public servers); empty: the single-path form. Each path's `via` is the
    # effective one (its own, else service.via).
    paths: tuple[TagPath, ...] = ()

    def has(self, role: str) -> bool:
        return role in self.roles

    def tag_paths(self) -> tuple[TagPath, ...]:
        """Every path this host keeps: `paths:`, or the single-path form as one path `default`."""
        if self.paths:
            return self.paths
        tag = self.tag
        tun = (self.vpn_client.tunnel_interface if self.vpn_client
               else self.service.tunnel_interface if self.service else None)
        via = self.service.via if self.service else ()
        return (TagPath(DEFAULT_PATH, tag.dscp, tag.mark, tag.table, tag.priority, tun, via),)


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        # One problem is one line: a key or value with a newline or an ESC sequence must not
        # forge further `FILE:LINE:` lines nor repaint the terminal.
        return escape_controls(f"{self.file}:{self.line}: {self.path}: {self.message}")


# C0/C1 controls, DEL, line/paragraph separators and the invisible format characters (bidi
# overrides, zero-width) that make a line read differently from what it holds.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def escape_controls(text: str) -> str:
    """`text` with every control or invisible format character written as \\xNN / \\uNNNN."""
    return _CONTROLS.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                    else f"\\u{ord(m.group()):04x}"), text)


class ConfigError(Exception):
    """A config file that must not be applied; carries every problem found in it."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# The loader (load_config / parse_config) follows below.
#
# Design of the loader, and the traps it avoids:
# - It walks YAML *events* (yaml.parse machinery) into its own small node tree instead of
#   yaml.compose: the pure-Python composer recurses per nesting level (RecursionError, not a
#   YAMLError, at ~1000 levels), and a composed tree of a hostile file is built in full before
#   any limit could be checked. Events let us stop at depth 32 / 100000 nodes (aliases counted
#   expanded, so a billion-laughs file stops early) with the offending line.
# - Every node keeps its 1-based line, so each problem names FILE:LINE: key.path.
# - YAML 1.1 quirks: bare `off` is false (accepted for rp_filter), bool is never an int, some
#   IPv6 addresses read as base-60 integers (the message says to quote them).
# - Tabs and characters YAML forbids are found by a pre-scan, so the libyaml and the pure-Python
#   parsers (which disagree there, in acceptance and in lines) report them identically.

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_PROBLEMS = 200  # listed per file; a hostile file must not flood the journal
IFNAMSIZ = 16  # the kernel's limit includes the trailing NUL: names are 1..15 bytes

# The kernel's own rules sit at 0 (local) and 32766/32767 (main, default); wg-quick puts its
# `not fwmark 51820 lookup 51820` rule at 32765 (the first free priority below main).
PRIORITY_MAX = 32764
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
# Values other tools own on the same host: sharing them would make our sweeps delete their
# state and their rules route our traffic.
FOREIGN_TABLES = {51820: "wg-quick's routing table (its default table and fwmark are 51820)",
                  52: "Tailscale's routing table"}
FOREIGN_MARKS = {0xCA6C: "wg-quick's fwmark (51820, 0xca6c)"}
TAILSCALE_MARK_BITS = 0xFF0000  # Tailscale marks its own packets in these bits
FOREIGN_PRIORITIES = {32765: "where wg-quick puts its `not fwmark 51820 lookup 51820` rule",
                      32766: "the kernel's own rule (lookup main)",
                      32767: "the kernel's own rule (lookup default)"}
# DSCP values in common use: LAN traffic already carrying one of them would be taken for a tagged
# reply and routed into the tunnel (a VoIP phone's EF packets, say). The default 42 is none.
DSCP_IN_USE = {
    1: "LE (lower effort, RFC 8622)", 8: "CS1", 16: "CS2", 24: "CS3", 32: "CS4", 40: "CS5",
    48: "CS6 (network control)", 56: "CS7 (network control)", 46: "EF (expedited forwarding: voice)",
    44: "VOICE-ADMIT (RFC 5865)",
    10: "AF11", 12: "AF12", 14: "AF13", 18: "AF21", 20: "AF22", 22: "AF23",
    26: "AF31", 28: "AF32", 30: "AF33", 34: "AF41", 36: "AF42", 38: "AF43",
}
MAX_INTERVAL = 3600.0
# What one config may expand to: each service and forward gives one DNAT rule per public address
# of its family, plus one accept each, plus one rule per home network. Above this a file is
# refused (a 75 KB file once planned 1,000,015 lines); 10,000 services on one address fit, or
# 1000 services on 24 addresses.
MAX_EXPANDED_RULES = 25_000
MAX_HOME_NETWORKS = 64
MAX_ALLOW_FROM = 1024  # source prefixes per service (iptables-legacy writes a rule for each)
# rate_limit's N and burst: what every hashlimit revision takes (revision 1 scales per-second
# rates by 10000 and caps the burst at 10000) and far beyond what one client needs.
MAX_RATE = 10_000
MAX_BURST = 10_000
# An integer scalar longer than this is refused before it is converted: Python refuses to print
# (and parse) decimals over 4300 digits, and nothing we take needs more than 32 bits.
MAX_INT_CHARS = 64

_Y = "tag:yaml.org,2002:"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_PORT_RE = re.compile(r"(\d{1,6})(?:-(\d{1,6}))?")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# metrics.listen: "[IPv6]:port" or "IPv4:port" (the address is checked after the match)
_LISTEN_RE = re.compile(r"\[([^\]]*)\]:(\d{1,6})|([^:\[\]/]*):(\d{1,6})")
_LISTEN_EXAMPLES = '"127.0.0.1:9542", "[::1]:9542" or /run/tagrouted/metrics.sock'
UNIX_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the trailing NUL
_RATE_RE = re.compile(r"\s*(\d{1,12})\s*/\s*([a-z]+)\s*")
# Where a comment starts: a '#' at the start of a line or after white space.
_COMMENT = re.compile(r"(?:^|[ \t])#")

# Test hook: False forces the pure-Python parser (the tests run the broken corpus with both).
USE_LIBYAML = True


def load_config(path: str) -> Config:
    """Read and validate the config file at `path`; ConfigError lists every problem in it.

    Refuses what is not a regular file (a directory, /dev/zero behind a symlink, a FIFO) and
    files over 1 MiB without reading them."""
    return parse_config(read_config_bytes(path), path)


def read_config_bytes(path: str) -> bytes:
    """The bytes of the config file, read without ever blocking (ConfigError if not a regular
    file or over MAX_FILE_BYTES): the daemon's identity check uses it too, so a FIFO put in the
    config's place never stalls a pass (it once blocked the worker for over 25 s)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; harmless on a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError([ConfigProblem(path, 1, "file", f"cannot open: {e.strerror}")]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([ConfigProblem(path, 1, "file",
                                             f"not a regular file ({_file_kind(st.st_mode)})")])
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError([_too_large(path)])
        return read_bounded(fd, MAX_FILE_BYTES)
    except OSError as e:
        raise ConfigError([ConfigProblem(path, 1, "file", f"cannot read: {e.strerror}")]) from None
    finally:
        os.close(fd)


def read_bounded(fd: int, limit: int) -> bytes:
    """At most limit + 1 bytes from `fd` (one more than allowed: the caller sees it is too long),
    bounded even if the file grows while it is read."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(fd, limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def parse_config(text: str | bytes, filename: str) -> Config:
    """Validate YAML text (bytes must be UTF-8) as a tagrouted config named `filename`."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError([_too_large(filename)])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text.count(b"\n", 0, e.start) + 1
            raise ConfigError([ConfigProblem(
                filename, line, "yaml", f"not UTF-8 (byte {text[e.start]:#04x} at offset {e.start})",
            )]) from None
    text = text.removeprefix("\ufeff")
    problems = _prescan(text, filename)
    if problems:
        raise ConfigError(_capped(problems))
    root, problems = _compose(text, filename)
    if problems:
        raise ConfigError(problems)
    checker = _Checker(filename)
    config = checker.check(root)
    if checker.problems or config is None:
        raise ConfigError(_capped(sorted(checker.problems, key=lambda p: p.line)))
    return config


def _capped(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    first_unlisted = problems[MAX_PROBLEMS]
    return [*problems[:MAX_PROBLEMS], ConfigProblem(
        first_unlisted.file, first_unlisted.line, "file",
        f"more problems from here on, not listed (only the first {MAX_PROBLEMS} are)")]


def _too_large(filename: str) -> ConfigProblem:
    return ConfigProblem(filename, 1, "file", f"larger than {MAX_FILE_BYTES} bytes: refused")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def _prescan(text: str, filename: str) -> list[ConfigProblem]:
    # Characters YAML forbids in a stream: PyYAML's own pattern, compiled once when yaml loads
    # (compiling that Unicode class costs ~8 ms, more than parsing a config).
    from yaml.reader import Reader

    problems = []
    m = Reader.NON_PRINTABLE.search(text)
    if m:
        line = text.count("\n", 0, m.start()) + 1
        problems.append(ConfigProblem(filename, line, "yaml",
                                      f"character U+{ord(m.group()):04X} is not allowed in YAML"))
    if "\t" in text:
        # YAML forbids tabs in indentation (even before a comment, even on a blank line), and
        # libyaml and PyYAML disagree about tabs elsewhere (`key:<TAB>value`, `[1,<TAB>2]`); no
        # valid value of ours holds a tab, so refuse every tab that is not inside a comment.
        for number, line in enumerate(text.splitlines(), 1):
            comment = _COMMENT.search(line)
            code = line[:comment.end() - 1] if comment else line  # up to the '#'
            if "\t" in code:
                indent = code[:len(code) - len(code.lstrip(" \t"))]
                what = "in indentation" if "\t" in indent else "outside a comment"
                problems.append(ConfigProblem(filename, number, "yaml",
                                              f"tab {what}: YAML indents with spaces only; use spaces"))
                if len(problems) > MAX_PROBLEMS:
                    break  # enough to see the pattern; _capped() says more follow
    return problems


# --- YAML events -> nodes -------------------------------------------------------------------


class _Other:
    """A scalar of a type the config never takes (timestamp, binary, custom tag...)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


_MERGE = _Other("merge key")


class _Node:
    """A YAML node with its line. `value`: the Python scalar, a list of nodes, or key/value pairs."""

    __slots__ = ("count", "height", "kind", "line", "value")

    def __init__(self, kind: str, value: Any, line: int) -> None:
        self.kind = kind  # "scalar" | "list" | "mapping"
        self.value = value
        self.line = line
        self.count = 1  # nodes below and including this one, aliases expanded
        self.height = 0  # collection levels below and including this one


def _loader_class() -> Any:
    import yaml

    if USE_LIBYAML and getattr(yaml, "__with_libyaml__", False):
        return yaml.CSafeLoader
    return yaml.SafeLoader


def _compose(text: str, filename: str) -> tuple[_Node | None, list[ConfigProblem]]:
    """The document's node tree, or the one problem that stopped reading it."""
    import yaml
    from yaml import events as ev

    loader = _loader_class()(text)
    root: _Node | None = None
    stack: list[tuple[_Node, list[Any]]] = []  # open collections, with a pending mapping key
    anchors: dict[str, _Node] = {}
    total = 0
    documents = 0

    def stop(line: int, message: str) -> tuple[None, list[ConfigProblem]]:
        return None, [ConfigProblem(filename, line, "yaml", message)]

    def attach(node: _Node) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        parent, pending = stack[-1]
        if parent.kind == "list":
            parent.value.append(node)
        elif pending:
            parent.value.append((pending.pop(), node))
        else:
            pending.append(node)

    try:
        while True:
            event = loader.get_event()
            line = event.start_mark.line + 1 if event.start_mark else 1
            if isinstance(event, ev.StreamEndEvent):
                break
            if isinstance(event, ev.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    return stop(line, "a second YAML document: the config is one document")
            elif isinstance(event, ev.ScalarEvent):
                total += 1
                node = _Node("scalar", _scalar(loader, event), line)
                if event.anchor:
                    anchors[event.anchor] = node
                attach(node)
            elif isinstance(event, ev.AliasEvent):
                target = anchors.get(event.anchor)
                if target is None:
                    return stop(line, f"alias *{event.anchor} has no anchor &{event.anchor} before it")
                if any(target is open_node for open_node, _ in stack):
                    return stop(line, f"alias *{event.anchor} refers to a collection that contains it")
                total += target.count
                if len(stack) + target.height > MAX_DEPTH:
                    return stop(line, f"nested deeper than {MAX_DEPTH} levels (through alias "
                                      f"*{event.anchor})")
                attach(target)
            elif isinstance(event, ev.SequenceStartEvent | ev.MappingStartEvent):
                total += 1
                if len(stack) >= MAX_DEPTH:
                    return stop(line, f"nested deeper than {MAX_DEPTH} levels")
                kind = "list" if isinstance(event, ev.SequenceStartEvent) else "mapping"
                node = _Node(kind, [], line)
                if event.anchor:
                    anchors[event.anchor] = node
                stack.append((node, []))
            elif isinstance(event, ev.SequenceEndEvent | ev.MappingEndEvent):
                node, _ = stack.pop()
                children = node.value if node.kind == "list" else [n for kv in node.value for n in kv]
                node.count = 1 + sum(c.count for c in children)
                node.height = 1 + max((c.height for c in children), default=0)
                attach(node)
            if total > MAX_NODES:
                return stop(line, f"more than {MAX_NODES} nodes (aliases counted expanded)")
    except yaml.YAMLError as e:
        return None, [_syntax_problem(e, filename)]
    finally:
        loader.dispose()
    if root is None or (root.kind == "scalar" and root.value is None):
        return stop(1, "the file is empty: expected a mapping with at least `roles`")
    if root.kind != "mapping":
        return stop(root.line, f"the top level must be a mapping (roles: ..., services: ...), "
                               f"not {_type_name(root)}")
    return root, []


def _scalar(loader: Any, event: Any) -> Any:
    import yaml

    tag = event.tag
    if tag is None or tag == "!":
        tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag == _Y + "str":
        return event.value
    if tag == _Y + "null":
        return None
    if tag == _Y + "merge":
        return _MERGE
    construct = {_Y + "int": loader.construct_yaml_int, _Y + "bool": loader.construct_yaml_bool,
                 _Y + "float": loader.construct_yaml_float}.get(tag)
    if construct is None:
        return _Other(tag.removeprefix(_Y))
    if tag == _Y + "int" and len(event.value) > MAX_INT_CHARS:
        return _Other(f"number of more than {MAX_INT_CHARS} characters")
    try:
        return construct(yaml.ScalarNode(tag, event.value))
    except Exception:  # a malformed explicitly tagged scalar, e.g. !!int abc
        return _Other(f"malformed {tag.removeprefix(_Y)}")


def _syntax_problem(e: Exception, filename: str) -> ConfigProblem:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark is not None else 1
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    context_mark = getattr(e, "context_mark", None)
    if context and context_mark is not None and context_mark.line + 1 != line:
        context = f"{context} (started at line {context_mark.line + 1})"
    message = f"{context}: {problem}" if context else problem
    return ConfigProblem(filename, line, "yaml", f"syntax error: {message}")


def _type_name(node: _Node) -> str:
    if node.kind == "list":
        return "a list"
    if node.kind == "mapping":
        return "a mapping"
    v = node.value
    if v is None:
        return "null (nothing)"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, int):
        return f"an integer ({v})"
    if isinstance(v, float):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    return f"a {v.kind}"


# --- validation ----------------------------------------------------------------------------

_TOP_KEYS = {"roles": True, "tag": False, "services": False, "gateway": False, "vpn_server": False,
             "vpn_client": False, "service": False, "on_stop": False, "resync_interval": False,
             "firewall": False, "metrics": False, "paths": False}
_TAG_KEYS = {"dscp": False, "mark": False, "table": False, "priority": False, "mark_mask": False}
_TAG_LIMITS = {  # key -> (lowest, highest, why), for `tag` and each of `paths`
    "dscp": (1, 63, " (6 bits; 0 is untagged traffic)"),
    "mark": (1, 0xFFFFFFFF, " (0 means unmarked)"),
    "table": (1, 0xFFFFFFFF, ""),
    "priority": (1, 32767, " (0, 32766 and 32767 are the kernel's own rules)"),
    "mark_mask": (1, 0xFFFFFFFF, " (the mark bits that are ours)"),
}
_PATH_KEYS = {"name": True, "dscp": True, "mark": True, "table": True, "priority": True,
              "tunnel_interface": False, "via": False}
_PATH_UNIQUE = ("name", "dscp", "mark", "table", "priority", "tunnel_interface")
# A path is a tunnel, a DSCP value, a routing table and a rule: a few per home, not hundreds.
MAX_PATHS = 32
_FIREWALL_KEYS = {"backend": False, "host_firewall": False}
_SERVICE_KEYS = {"name": True, "proto": True, "port": True, "address": True, "to_port": False,
                 "allow_from": False, "rate_limit": False, "burst": False}
_GATEWAY_KEYS = {"public_interface": True, "public_addresses": True, "home_networks": True,
                 "via": False, "forwards": False}
_VPN_SERVER_KEYS = {"tunnel_interface": True, "uplink_interface": True, "families": False,
                    "mss_clamp": False}
# tunnel_interface is required without `paths:` and refused with it (checked by hand)
_VPN_CLIENT_KEYS = {"tunnel_interface": False, "lan_interface": True, "rp_filter": False,
                    "mss_clamp": False}
_SERVICE_SECTION_KEYS = {"via": False, "tunnel_interface": False}
_METRICS_KEYS = {"listen": True}
_ROLE_SECTIONS = {"gateway": "gateway", "vpn-server": "vpn_server", "vpn-client": "vpn_client",
                  "service": "service"}

_Entry = tuple[_Node, _Node]  # (key node, value node)


# Plain classes, not dataclasses: each dataclass costs ~1.5 ms of import time (generated code).
class _Parsed:
    """A valid service or forward, with the nodes cross-checks point at."""

    __slots__ = ("address", "name", "path", "port", "service")

    def __init__(self, service: Service, path: str, name: _Node, port: _Node, address: _Node) -> None:
        self.service, self.path, self.name, self.port, self.address = service, path, name, port, address


class _PathParsed:
    """A valid entry of `paths:`, with the nodes cross-checks point at."""

    __slots__ = ("entries", "node", "path", "tag_path", "via")

    def __init__(self, tag_path: TagPath, path: str, node: _Node, entries: dict[str, _Entry],
                 via: list[_Addr]) -> None:
        self.tag_path, self.path, self.node, self.entries, self.via = tag_path, path, node, entries, via

    def at(self, key: str) -> _Node:
        """The value node of `key`, or the entry itself when the key is not given."""
        return self.entries[key][1] if key in self.entries else self.node


class _Addr:
    __slots__ = ("address", "node", "path")

    def __init__(self, address: IPAddress, node: _Node, path: str) -> None:
        self.address, self.node, self.path = address, node, path


class _Net:
    __slots__ = ("network", "node", "path")

    def __init__(self, network: IPNetwork, node: _Node, path: str) -> None:
        self.network, self.node, self.path = network, node, path


# Interface names: what the kernel accepts as a link name AND what iptables and nft read back
# literally. iptables takes a leading '!' as "not" and '+' as a wildcard (`tun+` is every tun);
# nft and iptables-restore split on quotes and white space; the kernel counts bytes, not
# characters. So: ASCII letters, digits and _ . - @ only.
_IFNAME_CHARS = re.compile(r"[A-Za-z0-9_.@-]+")
_IFNAME_WHY = {
    "!": "iptables reads a leading '!' as 'not': every rule would match all other interfaces",
    "+": "iptables reads '+' as a wildcard, routes and sysctls as a literal name",
    "*": "nft and shells read '*' as a wildcard",
    "/": "the kernel refuses '/' in a link name", ":": "the kernel refuses ':' in a link name",
    '"': "a quote ends the name early in iptables-restore and nft input",
    "'": "a quote ends the name early in iptables-restore and nft input",
    "%": "the kernel reads '%' in a new link's name as a number pattern",
}


def interface_name_problem(name: str) -> str | None:
    """Why `name` is not a link name tagrouted can hand the kernel, iptables and nft; None if fine."""
    if not name:
        return "is empty"
    if not name.isascii():
        return ("is not ASCII: the kernel limits names in bytes and iptables compares bytes; "
                "use an ASCII name")
    if len(name) >= IFNAMSIZ:
        return f"is longer than {IFNAMSIZ - 1} bytes: the kernel refuses it"
    if name in (".", ".."):
        return "is . or ..: the kernel refuses it"
    if name in ("all", "default"):
        return (f"is reserved: net.ipv4.conf.{name} is the kernel's setting for every interface, "
                "and the kernel refuses it as a link name")
    if name == "lo":
        return "is the loopback interface, which carries no tunnel, LAN or public traffic"
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in name):
        return "contains whitespace or a control character: the kernel refuses it"
    if name.startswith("!"):
        return f"starts with '!': {_IFNAME_WHY['!']}"
    bad = next((c for c in name if c in _IFNAME_WHY), None)
    if bad:
        return f"contains {bad!r}: {_IFNAME_WHY[bad]}"
    if not _IFNAME_CHARS.fullmatch(name):
        bad = next(c for c in name if not _IFNAME_CHARS.fullmatch(c))
        return f"contains {bad!r}: use only letters, digits and _ . - @"
    return None


_MAPPED = IPv6Network("::ffff:0:0/96")
_COMPATIBLE = IPv6Network("::/96")
_THIS_NETWORK = IPv4Network("0.0.0.0/8")
_RESERVED4 = IPv4Network("240.0.0.0/4")
_SPECIAL_NETWORKS: dict[int, tuple[tuple[Any, str], ...]] = {
    4: ((_THIS_NETWORK, "'this network', never a destination"),
        (IPv4Network("127.0.0.0/8"), "the loopback range"),
        (IPv4Network("169.254.0.0/16"), "the link-local range"),
        (IPv4Network("224.0.0.0/4"), "the multicast range"),
        (_RESERVED4, "reserved space the kernel does not route")),
    6: ((IPv6Network("::/8"), "reserved for special addresses (unspecified, loopback, IPv4-mapped)"),
        (IPv6Network("fe80::/10"), "the link-local range"),
        (IPv6Network("ff00::/8"), "the multicast range")),
}


def address_problem(address: IPAddress) -> str | None:
    """Why `address` is not a routable unicast host address (as "a loopback address..."); None if it is.

    Link-local is left to the caller: it is a fine address, but needs a device as a next hop."""
    if isinstance(address, IPv6Address):
        v4 = address.ipv4_mapped
        if v4 is not None:
            return (f"an IPv4-mapped IPv6 address (it means {v4}): write {v4}; routes and ip6tables "
                    "would take it for IPv6")
        if address in _COMPATIBLE and int(address) > 1:
            v4 = IPv4Address(int(address) & 0xFFFFFFFF)
            return f"an IPv4-compatible IPv6 address (deprecated by RFC 4291): write {v4}"
    if address.is_unspecified:
        return "an unspecified address, not a host address"
    if address.is_loopback:
        return "a loopback address, not a host address"
    if address.is_multicast:
        return "a multicast address, not a host address"
    if isinstance(address, IPv4Address):
        if address in _THIS_NETWORK:
            return "in 0.0.0.0/8 ('this network'), which is never a destination"
        if address == IPv4Address("255.255.255.255"):
            return "a broadcast address, not a host address"
        if address in _RESERVED4:
            return "in 240.0.0.0/4, reserved space the kernel does not route"
    elif address in IPv6Network("::/8"):
        return "in ::/8, reserved for special addresses"
    return None


class _Spans:
    """Sorted integer spans of prefixes of one family: which prefix holds an address, by bisection
    (membership for 10,000 services stays O(N log M), not O(N x M))."""

    def __init__(self, items: list[tuple[IPNetwork, Any]]) -> None:
        self.items = sorted(((int(n.network_address), int(n.broadcast_address), v) for n, v in items),
                            key=lambda t: (t[0], -t[1]))
        # reach[i]: the furthest end among items[0..i], and the item that reaches it
        self.reach: list[tuple[int, Any]] = []
        for _start, end, value in self.items:
            if not self.reach or end > self.reach[-1][0]:
                self.reach.append((end, value))
            else:
                self.reach.append(self.reach[-1])
        self.starts = [t[0] for t in self.items]

    def holder(self, address: IPAddress) -> Any:
        """A prefix value whose span holds `address`, or None."""
        i = bisect.bisect_right(self.starts, int(address)) - 1
        if i < 0:
            return None
        end, value = self.reach[i]
        return value if int(address) <= end else None


def _family(address: IPAddress | IPNetwork) -> Family:
    return 4 if address.version == 4 else 6


def _is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_<?-]+")


def _key(path: str, key: str) -> str:
    """path.key; a key that is not a plain word is written as a JSON string, with ':' escaped
    too, so `FILE:LINE: key: message` reads back unambiguously whatever the key holds."""
    if not _PLAIN_KEY.fullmatch(key):
        return f'{path}[{json.dumps(key).replace(":", chr(92) + "u003a")}]'
    return f"{path}.{key}" if path else key


class _Checker:
    """Walks the node tree once, collecting every problem; builds the Config only if none."""

    def __init__(self, filename: str) -> None:
        self.file = filename
        self.problems: list[ConfigProblem] = []

    def bad(self, node: _Node, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, node.line, path, message))

    # -- generic shapes --

    def mapping(self, node: _Node, path: str, spec: dict[str, bool]) -> dict[str, _Entry] | None:
        """The mapping's entries by key, after reporting unknown, duplicate and missing keys."""
        if node.kind != "mapping":
            self.bad(node, path, f"expected a mapping, got {_type_name(node)}")
            return None
        entries: dict[str, _Entry] = {}
        for knode, vnode in self.pairs(node, path):
            key = knode.value
            if knode.kind != "scalar" or not isinstance(key, str):
                label = str(key) if isinstance(key, int | float) else "?"
                self.bad(knode, _key(path, label), f"keys must be strings, got {_type_name(knode)}")
                continue
            where = _key(path, key)
            if key not in spec:
                self.bad(knode, where, f"unknown key{_suggest(key, spec)}; known here: {', '.join(spec)}")
            elif key in entries:
                self.bad(knode, where, f"duplicate key (first at line {entries[key][0].line})")
            else:
                entries[key] = (knode, vnode)
        for key, required in spec.items():
            if required and key not in entries:
                self.bad(node, _key(path, key), "required key missing")
        return entries

    def pairs(self, node: _Node, path: str) -> list[_Entry]:
        """Key/value pairs with YAML merge keys (<<: *anchor) folded in; explicit keys win."""
        explicit = [(k, v) for k, v in node.value if k.value is not _MERGE]
        merged: list[_Entry] = []
        for knode, vnode in node.value:
            if knode.value is not _MERGE:
                continue
            sources = vnode.value if vnode.kind == "list" else [vnode]
            for source in sources:
                if source.kind != "mapping":
                    self.bad(source, _key(path, "<<"), f"a merge takes mappings, got {_type_name(source)}")
                    continue
                merged += self.pairs(source, path)
        seen = {k.value for k, _ in explicit if k.kind == "scalar"}
        for knode, vnode in merged:
            if knode.kind == "scalar":
                if knode.value in seen:
                    continue  # the explicit key, or an earlier merge source, wins
                seen.add(knode.value)
            explicit.append((knode, vnode))
        return explicit

    def items(self, node: _Node, path: str, what: str, nonempty: bool = True) -> list[_Node] | None:
        if node.kind != "list":
            self.bad(node, path, f"expected a list of {what}, got {_type_name(node)}")
            return None
        if nonempty and not node.value:
            self.bad(node, path, f"must list at least one of {what}")
            return None
        return list(node.value)

    def capped_items(self, node: _Node, path: str, what: str, limit: int, noun: str) -> list[_Node] | None:
        """A non-empty list of at most `limit` prefixes."""
        nodes = self.items(node, path, what)
        if nodes is not None and len(nodes) > limit:
            self.bad(node, path, f"{len(nodes)} {noun}, more than the limit of {limit}: "
                                 "summarise them into fewer prefixes")
            return None
        return nodes

    def string(self, node: _Node, path: str, what: str = "a string") -> str | None:
        if node.kind == "scalar" and isinstance(node.value, str):
            return node.value
        self.bad(node, path, f"expected {what}, got {_type_name(node)}")
        return None

    def integer(self, node: _Node, path: str, low: int, high: int, why: str = "") -> int | None:
        v = node.value
        if node.kind != "scalar" or isinstance(v, bool) or not isinstance(v, int):
            self.bad(node, path, f"expected an integer, got {_type_name(node)}")
            return None
        if not low <= v <= high:
            self.bad(node, path, f"{v} is out of range {low}..{high}{why}")
            return None
        return v

    def name(self, node: _Node, path: str) -> str | None:
        """A service's or a path's name: letters, digits, '_', '.' or '-' (it names nft counters)."""
        name = self.string(node, path, "a name")
        if name is not None and not _NAME_RE.fullmatch(name):
            self.bad(node, path, f"{name!r}: a name is letters, digits, '_', '.' or '-'")
            return None
        return name

    def choice(self, node: _Node, path: str, choices: tuple[str, ...]) -> str | None:
        v = self.string(node, path, " or ".join(choices))
        if v is not None and v not in choices:
            self.bad(node, path, f"{v!r} is not one of: {', '.join(choices)}")
            return None
        return v

    def interface(self, node: _Node, path: str) -> str | None:
        name = self.string(node, path, "an interface name")
        if name is None:
            return None
        why = interface_name_problem(name)
        if why:
            self.bad(node, path, f"interface name {name!r} {why}")
            return None
        return name

    def address(self, node: _Node, path: str, next_hop: bool = False) -> IPAddress | None:
        if node.kind == "scalar" and isinstance(node.value, int) and not isinstance(node.value, bool):
            self.bad(node, path, f"expected an IP address, got {_type_name(node)}: quote it (YAML 1.1 "
                                 "reads some IPv6 addresses as base-60 numbers)")
            return None
        text = self.string(node, path, "an IP address")
        if text is None:
            return None
        if "/" in text:
            self.bad(node, path, f"{text} is a network: expected a host address (no /prefix)")
            return None
        if "%" in text:
            self.bad(node, path, f"{text}: zone indexes (%...) are not supported")
            return None
        try:
            address = ip_address(text)
        except ValueError:
            self.bad(node, path, f"{text!r} is not an IPv4 or IPv6 address")
            return None
        why = address_problem(address)
        if why is None and address.is_link_local:
            why = ("a link-local address: a next hop there needs a device, which this config cannot "
                   "name; use the neighbour's global or ULA address" if next_hop else
                   "a link-local address, which is never routed beyond its own link")
        if why:
            self.bad(node, path, f"{text} is {why}")
            return None
        return address

    def network(self, node: _Node, path: str) -> IPNetwork | None:
        text = self.string(node, path, "a network prefix (e.g. 192.168.100.0/24)")
        if text is None:
            return None
        if "/" not in text:
            self.bad(node, path, f"{text} has no /prefix length: expected a network like 192.168.100.0/24")
            return None
        network = self.prefix(node, path, text, "network prefix")
        if network is None:
            return None
        if network.prefixlen == 0:
            self.bad(node, path, f"{text} is everything: a home network must be a real prefix")
            return None
        for special, why in _SPECIAL_NETWORKS[network.version]:
            if network.overlaps(special):
                self.bad(node, path, f"{text} overlaps {special}, {why}: a home network is routed "
                                     "unicast space")
                return None
        return network

    def prefix(self, node: _Node, path: str, text: str, what: str) -> IPNetwork | None:
        """`text` as a network without host bits (a bare address is its /32 or /128)."""
        try:
            return ip_network(text, strict=True)
        except ValueError:
            try:
                loose = ip_network(text, strict=False)
            except ValueError:
                self.bad(node, path, f"{text!r} is not an IPv4 or IPv6 {what}")
            else:
                self.bad(node, path, f"{text} has host bits set (the network is {loose})")
            return None

    def addresses(self, node: _Node, path: str, what: str, nonempty: bool,
                  one_per_family: bool = False, next_hop: bool = False) -> list[_Addr] | None:
        nodes = self.items(node, path, what, nonempty)
        if nodes is None:
            return None
        out: list[_Addr] = []
        first: dict[IPAddress, _Addr] = {}  # sets, not scans: 10,000 addresses check in linear time
        by_family: dict[Family, _Addr] = {}
        ok = True
        for i, item in enumerate(nodes):
            where = _index(path, i)
            address = self.address(item, where, next_hop)
            if address is None:
                ok = False
                continue
            earlier = first.get(address)
            same_family = by_family.get(_family(address))
            if earlier:
                self.bad(item, where, f"{address} is listed twice (first at line {earlier.node.line})")
                ok = False
            elif one_per_family and same_family:
                self.bad(item, where, f"a second IPv{_family(address)} address: one address per family "
                                      f"(first at line {same_family.node.line})")
                ok = False
            else:
                parsed = _Addr(address, item, where)
                first[address] = parsed
                by_family.setdefault(_family(address), parsed)
                out.append(parsed)
        return out if ok else None

    # -- the sections --

    def check(self, root: _Node) -> Config | None:
        top = self.mapping(root, "", _TOP_KEYS)
        if top is None:
            return None

        def given(key: str) -> _Node | None:
            return top[key][1] if key in top else None

        def given_collection(key: str) -> _Node | None:
            """An optional list or mapping; `key:` with nothing after it means not given."""
            node = given(key)
            return None if node is None or (node.kind == "scalar" and node.value is None) else node

        tag_paths: list[TagPath] = []
        roles = self.roles(n) if (n := given("roles")) else None
        tag = self.tag(n) if (n := given_collection("tag")) else Tag()
        services = self.service_list(n, "services") if (n := given_collection("services")) else []
        with_paths = "paths" in top
        paths = self.paths(n) if (n := given("paths")) else []
        gateway = self.gateway(n) if (n := given("gateway")) else None
        vpn_server = self.vpn_server(n) if (n := given("vpn_server")) else None
        vpn_client = self.vpn_client(n, with_paths) if (n := given("vpn_client")) else None
        service = self.service_section(n, with_paths) if (n := given("service")) else None
        on_stop = self.choice(n, "on_stop", ("keep", "remove")) if (n := given("on_stop")) else "keep"
        interval = self.interval(n) if (n := given("resync_interval")) else 2.0
        firewall = self.firewall(n) if (n := given_collection("firewall")) else FirewallSection()
        metrics = self.metrics(n) if (n := given_collection("metrics")) else None

        if roles is not None:
            self.check_sections(top, roles)
            role_names = tuple(r for r, _ in roles)
            if services is not None and gateway is not None:
                self.check_gateway(gateway[1], services, gateway[0], role_names)
            if services is not None and service is not None:
                self.check_service(service[1], services, vpn_client, role_names, with_paths)
            if paths is not None and services is not None and tag is not None and with_paths:
                tag_paths = self.check_paths(paths, given_collection("tag"), tag.mark_mask, services,
                                             vpn_client, service, role_names)
        if services is not None:
            self.check_names([*services, *(gateway[1]["forwards"] if gateway else [])])
            self.check_shared_homes([*services, *(gateway[1]["forwards"] if gateway else [])])
        if vpn_client and vpn_client[0].tunnel_interface == vpn_client[0].lan_interface:
            self.bad(vpn_client[1]["lan"], "vpn_client.lan_interface", "must differ from tunnel_interface")
        if vpn_server and vpn_server[0].tunnel_interface == vpn_server[0].uplink_interface:
            self.bad(vpn_server[1]["uplink"], "vpn_server.uplink_interface",
                     "must differ from tunnel_interface")

        if (self.problems or roles is None or tag is None or services is None or paths is None
                or on_stop not in ("keep", "remove") or interval is None or firewall is None):
            return None
        return Config(
            path=self.file,
            roles=tuple(r for r, _ in roles),
            tag=tag,
            services=tuple(p.service for p in services),
            gateway=gateway[0] if gateway else None,
            vpn_server=vpn_server[0] if vpn_server else None,
            vpn_client=vpn_client[0] if vpn_client else None,
            service=service[0] if service else None,
            on_stop=on_stop,  # type: ignore[arg-type]  # one of the two, checked above
            resync_interval=interval,
            firewall=firewall,
            metrics=metrics,
            paths=tuple(tag_paths),
        )

    def roles(self, node: _Node) -> list[tuple[str, _Node]] | None:
        nodes = self.items(node, "roles", "roles (gateway, vpn-server, vpn-client, service)")
        if nodes is None:
            return None
        roles: list[tuple[str, _Node]] = []
        ok = True
        for i, item in enumerate(nodes):
            where = _index("roles", i)
            role = self.string(item, where, "a role name")
            if role is None:
                ok = False
            elif role not in ROLES:
                self.bad(item, where, f"unknown role {role!r}{_suggest(role, ROLES)}; "
                                      f"known: {', '.join(ROLES)}")
                ok = False
            elif any(role == r for r, _ in roles):
                self.bad(item, where, f"role {role} is listed twice")
                ok = False
            else:
                roles.append((role, item))
        return roles if ok else None

    def tag(self, node: _Node) -> Tag | None:
        entries = self.mapping(node, "tag", _TAG_KEYS)
        if entries is None:
            return None
        values: dict[str, int] = {}
        ok = True
        for key, (_, vnode) in entries.items():
            value = self.tag_value(vnode, "tag", key)
            if value is None:
                ok = False
            else:
                values[key] = value
        if ok and "mark_mask" not in values and values.get("mark", Tag.mark) & ~Tag.mark_mask:
            # A mark beyond the default mask's bits was valid before masks existed and owned the
            # whole mark: it keeps that meaning.
            values["mark_mask"] = 0xFFFFFFFF
        if ok:
            mark, mask = values.get("mark", Tag.mark), values.get("mark_mask", Tag.mark_mask)
            if mark & ~mask:
                where = "mark_mask" if "mark_mask" in entries else "mark"
                self.bad(entries[where][1], f"tag.{where}", f"mark {mark:#x} has bits outside "
                         f"mark_mask {mask:#x}: the mark must lie within the mask")
                ok = False
        return Tag(**values) if ok else None

    def tag_value(self, node: _Node, path: str, key: str) -> int | None:
        """One of a tag's numbers (`tag.dscp`, `paths[1].table`...), in range and nobody else's."""
        low, high, why = _TAG_LIMITS[key]
        value = self.integer(node, _key(path, key), low, high, why)
        refused = None if value is None else _foreign_tag_value(key, value)
        if refused:
            self.bad(node, _key(path, key), refused)
            return None
        return value

    def paths(self, node: _Node) -> list[_PathParsed] | None:
        """`paths:`, each entry on its own; cross-checks (unique values, roles) in check_paths."""
        nodes = self.items(node, "paths", "paths ({name, dscp, mark, table, priority, ...})")
        if nodes is None:
            return None
        if len(nodes) > MAX_PATHS:
            self.bad(node, "paths", f"{len(nodes)} paths, more than the limit of {MAX_PATHS}")
            return None
        # The valid entries, so cross-checks still see them (as for services).
        parsed = [self.one_path(item, _index("paths", i)) for i, item in enumerate(nodes)]
        return [p for p in parsed if p is not None]

    def one_path(self, node: _Node, path: str) -> _PathParsed | None:
        entries = self.mapping(node, path, _PATH_KEYS)
        if entries is None:
            return None
        ok = all(k in entries for k, required in _PATH_KEYS.items() if required)
        name = self.name(entries["name"][1], _key(path, "name")) if "name" in entries else None
        numbers: dict[str, int] = {}
        for key in ("dscp", "mark", "table", "priority"):
            if key in entries:
                value = self.tag_value(entries[key][1], path, key)
                if value is None:
                    ok = False
                else:
                    numbers[key] = value
        tun: str | None = None
        if "tunnel_interface" in entries:
            tun = self.interface(entries["tunnel_interface"][1], _key(path, "tunnel_interface"))
            ok = ok and tun is not None
        via: list[_Addr] | None = []
        if "via" in entries:
            via = self.addresses(entries["via"][1], _key(path, "via"), "addresses", nonempty=True,
                                 one_per_family=True, next_hop=True)
        if not ok or name is None or via is None:
            return None
        tag_path = TagPath(name, numbers["dscp"], numbers["mark"], numbers["table"], numbers["priority"],
                           tun, tuple(a.address for a in via))
        return _PathParsed(tag_path, path, node, entries, via)

    def firewall(self, node: _Node) -> FirewallSection | None:
        entries = self.mapping(node, "firewall", _FIREWALL_KEYS)
        if entries is None:
            return None
        backend = (self.choice(entries["backend"][1], "firewall.backend", BACKENDS)
                   if "backend" in entries else "auto")
        host = (self.choice(entries["host_firewall"][1], "firewall.host_firewall", ("integrate", "report"))
                if "host_firewall" in entries else "integrate")
        if backend is None or host is None:
            return None
        return FirewallSection(backend, host)  # type: ignore[arg-type]  # checked choices

    def service_list(self, node: _Node, path: str) -> list[_Parsed] | None:
        if node.kind == "scalar" and node.value is None:
            return []  # `services:` with every entry commented out
        nodes = self.items(node, path, "services", nonempty=False)
        if nodes is None:
            return None
        # The valid entries, so cross-checks still see them; an invalid one has its problem
        # recorded already, which keeps the Config from being built.
        parsed = [self.one_service(item, _index(path, i)) for i, item in enumerate(nodes)]
        return [p for p in parsed if p is not None]

    def one_service(self, node: _Node, path: str) -> _Parsed | None:
        entries = self.mapping(node, path, _SERVICE_KEYS)
        if entries is None:
            return None
        name = proto = port = address = None
        to_port: int | None = None
        ok = True
        if "name" in entries:
            name = self.name(entries["name"][1], _key(path, "name"))
        if "proto" in entries:
            proto = self.choice(entries["proto"][1], _key(path, "proto"), ("tcp", "udp"))
        if "port" in entries:
            port = self.port_range(entries["port"][1], _key(path, "port"))
        if "address" in entries:
            address = self.address(entries["address"][1], _key(path, "address"))
        if "to_port" in entries:
            vnode = entries["to_port"][1]
            to_port = self.integer(vnode, _key(path, "to_port"), 1, 65535)
            if to_port is None:
                ok = False
            elif port is not None and port.first != port.last:
                self.bad(vnode, _key(path, "to_port"),
                         f"only allowed with a single port, not the range {port}")
                ok = False
        allow_from: tuple[IPNetwork, ...] = ()
        if "allow_from" in entries:
            allowed = self.allow_from(entries["allow_from"][1], _key(path, "allow_from"), address)
            ok = ok and allowed is not None
            allow_from = allowed or ()
        rate_limit = None
        if "rate_limit" in entries or "burst" in entries:
            rate_limit = self.rate_limit(entries, path)
            ok = ok and rate_limit is not None
        if not ok or name is None or proto is None or port is None or address is None:
            return None
        service = Service(name, proto, port, address, to_port, allow_from, rate_limit)  # type: ignore[arg-type]
        return _Parsed(service, path, entries["name"][1], entries["port"][1], entries["address"][1])

    def allow_from(self, node: _Node, path: str, address: IPAddress | None) -> tuple[IPNetwork, ...] | None:
        """Source prefixes (a bare address is its /32 or /128), each of the service's family."""
        nodes = self.capped_items(node, path, "source prefixes (omit allow_from to admit everyone)",
                                  MAX_ALLOW_FROM, "prefixes")
        if nodes is None:
            return None
        out: list[IPNetwork] = []
        first: dict[IPNetwork, int] = {}
        ok = True
        for i, item in enumerate(nodes):
            where = _index(path, i)
            network = self.source_prefix(item, where)
            if network is None:
                ok = False
                continue
            if address is not None and network.version != address.version:
                self.bad(item, where, f"an IPv{network.version} prefix, but the service's address "
                                      f"{address} is IPv{address.version}: it would never match")
                ok = False
            elif network in first:
                self.bad(item, where, f"{network} is listed twice (first at line {first[network]})")
                ok = False
            else:
                first[network] = item.line
                out.append(network)
        return tuple(out) if ok else None

    def source_prefix(self, node: _Node, path: str) -> IPNetwork | None:
        if node.kind == "scalar" and isinstance(node.value, int) and not isinstance(node.value, bool):
            self.bad(node, path, f"expected an address or prefix, got {_type_name(node)}: quote it "
                                 "(YAML 1.1 reads some IPv6 addresses as base-60 numbers)")
            return None
        text = self.string(node, path, "an address or prefix (e.g. 198.51.100.0/24)")
        network = None if text is None else self.prefix(node, path, text, "address or prefix")
        if network is None or text is None:
            return None
        if isinstance(network, IPv6Network) and network.network_address.ipv4_mapped is not None:
            self.bad(node, path, f"{text} is IPv4-mapped IPv6: write the IPv4 prefix "
                                 "(ip6tables and nft would take it for IPv6)")
            return None
        return network

    def rate_limit(self, entries: dict[str, _Entry], path: str) -> RateLimit | None:
        if "rate_limit" not in entries:
            self.bad(entries["burst"][0], _key(path, "burst"), "only with rate_limit (the burst of what?)")
            return None
        node = entries["rate_limit"][1]
        where = _key(path, "rate_limit")
        text = self.string(node, where, 'a rate like "10/s" or "30/min"')
        if text is None:
            return None
        m = _RATE_RE.fullmatch(text)
        if m is None or m.group(2) not in RATE_UNITS:
            self.bad(node, where, f'{text!r} is not a rate: write N/s or N/min (new connections per '
                                  'source address), e.g. "10/s"')
            return None
        rate = int(m.group(1))
        if not 1 <= rate <= MAX_RATE:
            why = " (0 would admit nobody: leave the service out instead)" if rate == 0 else ""
            self.bad(node, where, f"{rate} is out of range 1..{MAX_RATE}{why}")
            return None
        burst = rate
        if "burst" in entries:
            value = self.integer(entries["burst"][1], _key(path, "burst"), 1, MAX_BURST,
                                 " (new connections a source may open at once)")
            if value is None:
                return None
            burst = value
        return RateLimit(rate, RATE_UNITS[m.group(2)], burst)

    def mss_clamp(self, node: _Node, path: str) -> MssSetting | None:
        v = node.value
        if node.kind == "scalar" and v is False:
            return "off"  # YAML 1.1 reads a bare off as false
        if node.kind == "scalar" and isinstance(v, int) and not isinstance(v, bool):
            why = f" (an MSS: {MSS_MIN} is the least every host takes, {MSS_MAX} fits a 65535-byte packet)"
            return self.integer(node, path, MSS_MIN, MSS_MAX, why)
        if node.kind == "scalar" and v in ("pmtu", "off"):
            return v  # type: ignore[no-any-return]
        self.bad(node, path, f"expected pmtu, off or an MSS {MSS_MIN}..{MSS_MAX}, got {_type_name(node)}")
        return None

    def port_range(self, node: _Node, path: str) -> PortRange | None:
        v = node.value
        if node.kind == "scalar" and isinstance(v, int) and not isinstance(v, bool):
            first = last = v
        elif node.kind == "scalar" and isinstance(v, str) and _PORT_RE.fullmatch(v):
            m = _PORT_RE.fullmatch(v)
            assert m is not None
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
        else:
            self.bad(node, path, f'expected a port or a range "A-B", got {_type_name(node)}')
            return None
        for p in (first, last):
            if not 1 <= p <= 65535:
                self.bad(node, path, f"port {p} is out of range 1..65535")
                return None
        if first > last:
            self.bad(node, path, f"range {first}-{last} is reversed: write {last}-{first}")
            return None
        return PortRange(first, last)

    def gateway(self, node: _Node) -> tuple[GatewaySection, dict[str, Any]] | None:
        entries = self.mapping(node, "gateway", _GATEWAY_KEYS)
        if entries is None:
            return None
        iface = (self.interface(entries["public_interface"][1], "gateway.public_interface")
                 if "public_interface" in entries else None)
        publics = (self.addresses(entries["public_addresses"][1], "gateway.public_addresses",
                                  "addresses", nonempty=True)
                   if "public_addresses" in entries else None)
        homes = self.networks(entries["home_networks"][1]) if "home_networks" in entries else None
        via: list[_Addr] | None = []
        if "via" in entries and entries["via"][1].value is not None:
            via = self.addresses(entries["via"][1], "gateway.via", "addresses", nonempty=False,
                                 one_per_family=True, next_hop=True)
        forwards: list[_Parsed] | None = []
        if "forwards" in entries:
            forwards = self.service_list(entries["forwards"][1], "gateway.forwards")
        if iface is None or publics is None or homes is None or via is None or forwards is None:
            return None
        section = GatewaySection(
            public_interface=iface,
            public_addresses=tuple(a.address for a in publics),
            home_networks=tuple(n.network for n in homes),
            via=tuple(a.address for a in via),
            forwards=tuple(p.service for p in forwards),
        )
        via_node = entries["via"][1] if "via" in entries else None
        return section, {"publics": publics, "homes": homes, "via": via, "via_node": via_node,
                         "forwards": forwards, "node": node,
                         "publics_node": entries["public_addresses"][1]}

    def networks(self, node: _Node) -> list[_Net] | None:
        path = "gateway.home_networks"
        nodes = self.capped_items(node, path, "network prefixes", MAX_HOME_NETWORKS, "home networks")
        if nodes is None:
            return None
        out: list[_Net] = []
        seen: dict[IPNetwork, _Net] = {}
        ok = True
        for i, item in enumerate(nodes):
            network = self.network(item, _index(path, i))
            if network is None:
                ok = False
                continue
            first = seen.get(network)
            if first:
                self.bad(item, _index(path, i),
                         f"{network} is listed twice (first at line {first.node.line})")
                ok = False
            else:
                seen[network] = _Net(network, item, _index(path, i))
                out.append(seen[network])
        return out if ok else None

    def vpn_server(self, node: _Node) -> tuple[VpnServerSection, dict[str, _Node]] | None:
        entries = self.mapping(node, "vpn_server", _VPN_SERVER_KEYS)
        if entries is None:
            return None
        tun = (self.interface(entries["tunnel_interface"][1], "vpn_server.tunnel_interface")
               if "tunnel_interface" in entries else None)
        up = (self.interface(entries["uplink_interface"][1], "vpn_server.uplink_interface")
              if "uplink_interface" in entries else None)
        families: tuple[Family, ...] | None = (4, 6)
        if "families" in entries:
            families = self.families(entries["families"][1])
        mss: MssSetting | None = "pmtu"
        if "mss_clamp" in entries:
            mss = self.mss_clamp(entries["mss_clamp"][1], "vpn_server.mss_clamp")
        if tun is None or up is None or families is None or mss is None:
            return None
        return VpnServerSection(tun, up, families, mss), {"uplink": entries["uplink_interface"][1]}

    def families(self, node: _Node) -> tuple[Family, ...] | None:
        path = "vpn_server.families"
        nodes = self.items(node, path, "families (4, 6, ipv4 or ipv6)")
        if nodes is None:
            return None
        by_name: dict[Any, Family] = {4: 4, 6: 6, "ipv4": 4, "ipv6": 6}
        seen: set[Family] = set()
        ok = True
        for i, item in enumerate(nodes):
            v = item.value
            family = (by_name.get(v) if item.kind == "scalar" and isinstance(v, int | str)
                      and not isinstance(v, bool) else None)
            if family is None:
                self.bad(item, _index(path, i), f"expected 4, 6, ipv4 or ipv6, got {_type_name(item)}")
                ok = False
            elif family in seen:
                self.bad(item, _index(path, i), f"IPv{family} is listed twice")
                ok = False
            else:
                seen.add(family)
        return tuple(sorted(seen)) if ok else None

    def vpn_client(self, node: _Node, with_paths: bool) -> tuple[VpnClientSection, dict[str, _Node]] | None:
        entries = self.mapping(node, "vpn_client", _VPN_CLIENT_KEYS)
        if entries is None:
            return None
        tun = (self.interface(entries["tunnel_interface"][1], "vpn_client.tunnel_interface")
               if "tunnel_interface" in entries else None)
        if with_paths and "tunnel_interface" in entries:
            self.bad(entries["tunnel_interface"][1], "vpn_client.tunnel_interface",
                     "not used with paths: each path names its own tunnel_interface; remove it")
            return None
        if not with_paths and "tunnel_interface" not in entries:
            self.bad(node, "vpn_client.tunnel_interface", "required key missing")
        lan = (self.interface(entries["lan_interface"][1], "vpn_client.lan_interface")
               if "lan_interface" in entries else None)
        rp_filter: str | None = "loose"
        if "rp_filter" in entries:
            vnode = entries["rp_filter"][1]
            # YAML 1.1 reads a bare `off` as false.
            rp_filter = "off" if vnode.value is False else self.choice(vnode, "vpn_client.rp_filter",
                                                                       ("off", "loose"))
        mss: MssSetting | None = "pmtu"
        if "mss_clamp" in entries:
            mss = self.mss_clamp(entries["mss_clamp"][1], "vpn_client.mss_clamp")
        if (tun is None and not with_paths) or lan is None or rp_filter is None or mss is None:
            return None
        section = VpnClientSection(tun, lan, rp_filter, mss)  # type: ignore[arg-type]
        return section, {"lan": entries["lan_interface"][1]}

    def service_section(self, node: _Node, with_paths: bool) -> tuple[ServiceSection, dict[str, Any]] | None:
        entries = self.mapping(node, "service", _SERVICE_SECTION_KEYS)
        if entries is None:
            return None
        if with_paths and "tunnel_interface" in entries:
            self.bad(entries["tunnel_interface"][1], "service.tunnel_interface",
                     "not used with paths: on a vpn-client + service host each path's replies go "
                     "into that path's tunnel_interface; remove it")
            return None
        via: list[_Addr] | None = []
        if "via" in entries:
            via = self.addresses(entries["via"][1], "service.via", "addresses", nonempty=True,
                                 one_per_family=True, next_hop=True)
        tun: str | None = None
        if "tunnel_interface" in entries:
            tun = self.interface(entries["tunnel_interface"][1], "service.tunnel_interface")
            if tun is None:
                return None
        if via is None:
            return None
        if not via and tun is None and not with_paths:  # with paths, each path may name its via
            self.bad(node, "service", "needs via (one address per family) or tunnel_interface")
            return None
        tun_node = entries["tunnel_interface"][1] if "tunnel_interface" in entries else None
        via_node = entries["via"][1] if "via" in entries else None
        return ServiceSection(tuple(a.address for a in via), tun), {"via": via, "tun": tun_node,
                                                                    "via_node": via_node}

    def interval(self, node: _Node) -> float | None:
        path = "resync_interval"
        v = node.value
        if node.kind == "scalar" and isinstance(v, int | float) and not isinstance(v, bool):
            seconds = float(v) if abs(v) < 1e9 else math.inf  # float() of a huge int overflows
        elif node.kind == "scalar" and isinstance(v, str) and _DURATION_RE.fullmatch(v.strip()):
            m = _DURATION_RE.fullmatch(v.strip())
            assert m is not None
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        else:
            self.bad(node, path, f"expected a duration like 2s, 500ms, 1m or a number of seconds, "
                                 f"got {_type_name(node)}")
            return None
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_INTERVAL):
            self.bad(node, path, f"must be more than 0 and at most {MAX_INTERVAL:g} seconds")
            return None
        return seconds

    def metrics(self, node: _Node) -> MetricsSection | None:
        entries = self.mapping(node, "metrics", _METRICS_KEYS)
        if entries is None or "listen" not in entries:
            return None
        vnode, path = entries["listen"][1], "metrics.listen"
        text = self.string(vnode, path, f"ADDRESS:PORT or a socket path ({_LISTEN_EXAMPLES})")
        if text is None:
            return None
        if text.startswith("/"):
            why = None
            if len(text.encode()) > UNIX_PATH_MAX:
                why = f"is longer than {UNIX_PATH_MAX} bytes, the kernel's limit for a socket path"
            elif text.endswith("/"):
                why = "ends in '/': name the socket file itself"
            elif any(part in (".", "..") for part in text.split("/")):
                why = "has . or .. in it: write the plain absolute path"
            if why:
                self.bad(vnode, path, f"{text} {why}")
                return None
            return MetricsSection(path=text)
        m = _LISTEN_RE.fullmatch(text)
        if m is None:
            if text.count(":") > 1 and not text.startswith("["):
                why = "an IPv6 address goes in brackets, as in [::1]:9542"
            elif _is_ip(text) or (text.startswith("[") and text.endswith("]")):
                why = f"needs a port, as in {text}:9542"
            else:
                why = f"expected ADDRESS:PORT or an absolute socket path ({_LISTEN_EXAMPLES})"
            self.bad(vnode, path, f"{text!r}: {why}")
            return None
        bracketed = m.group(1) is not None
        host, port_text = (m.group(1), m.group(2)) if bracketed else (m.group(3), m.group(4))
        port = int(port_text)
        why = None
        if not host:
            why = "needs an address before the port: 127.0.0.1 for this host only, 0.0.0.0 or [::] for all"
        elif "%" in host:
            why = "zone indexes (%...) are not supported"
        else:
            try:
                address = ip_address(host)
            except ValueError:
                address = None
            if address is None:
                why = f"{host!r} is not an IP address (names are not resolved): e.g. 127.0.0.1:{port}"
            elif bracketed != (address.version == 6):
                why = (f"brackets are for IPv6 addresses: write {host}:{port}" if bracketed
                       else f"an IPv6 address goes in brackets: [{host}]:{port}")
            elif address.is_multicast or address == IPv4Address("255.255.255.255"):
                why = f"{host} is not an address to listen on"
            elif not 1 <= port <= 65535:
                why = f"port {port} is out of range 1..65535"
            else:
                return MetricsSection(host=str(address), port=port)
        self.bad(vnode, path, f"{text!r}: {why}")
        return None

    # -- cross-checks --

    def check_sections(self, top: dict[str, _Entry], roles: list[tuple[str, _Node]]) -> None:
        role_names = {r for r, _ in roles}
        for i, (role, item) in enumerate(roles):
            section = _ROLE_SECTIONS[role]
            if role == "service" and "paths" in top:
                continue  # the paths say where replies go: `service` is optional then
            if section not in top:
                self.bad(item, _index("roles", i), f"role {role} needs a `{section}` section")
        # A section without its role is allowed and unused: one file can serve several hosts
        # that differ only in `roles` (DESIGN.md's own sample is such a file).
        del role_names

    def check_gateway(self, gw: dict[str, Any], services: list[_Parsed], section: GatewaySection,
                      roles: tuple[str, ...]) -> None:
        public_families = {_family(a) for a in section.public_addresses}
        forwards: list[_Parsed] = gw["forwards"]
        for p in [*services, *forwards]:
            f = p.service.family
            if f not in public_families:
                self.bad(p.address, _key(p.path, "address"),
                         f"IPv{f} address but gateway.public_addresses has no IPv{f} address")
        homes: list[_Net] = gw["homes"]
        spans = {f: _Spans([(n.network, n) for n in homes if _family(n.network) == f]) for f in (4, 6)}
        for p in services:
            if spans[p.service.family].holder(p.service.address) is None:
                nets = ", ".join(str(n) for n in section.home_networks)
                self.bad(p.address, _key(p.path, "address"),
                         f"{p.service.address} is outside gateway.home_networks ({nets})")
        publics: list[_Addr] = gw["publics"]
        for a in publics:
            net = spans[_family(a.address)].holder(a.address)
            if net is not None:
                self.bad(net.node, net.path, f"{net.network} covers the public address {a.address} "
                         f"({a.path}): routed home, the gateway's own traffic would loop into the tunnel")
        via: list[_Addr] = gw["via"]
        for a in via:
            net = spans[_family(a.address)].holder(a.address)
            if net is not None:
                self.bad(a.node, a.path, f"{a.address} is inside the home network {net.network}: the "
                                         "route toward it would lead through itself")
        if "vpn-server" in roles:
            if via:
                self.bad(gw["via_node"], "gateway.via", "not used on a host that is also the vpn-server "
                         "(home routes go via vpn_server.tunnel_interface): remove it")
        else:
            via_families = {_family(a.address) for a in via}
            home_families = {_family(n.network) for n in homes}
            for n in homes:
                f = _family(n.network)
                if f not in via_families:
                    self.bad(n.node, n.path, f"IPv{f} home network but gateway.via has no IPv{f} "
                                             "address to route it through")
            for a in via:
                f = _family(a.address)
                if f not in home_families:
                    self.bad(a.node, a.path, f"no IPv{f} home network to route through this address")
        exposed = [*services, *forwards]
        per_family = {f: sum(1 for a in publics if _family(a.address) == f) for f in (4, 6)}
        # per entry: a DNAT per public address; an accept per source (and a limit before each),
        # a counting drop when restricted
        expanded = sum(per_family[p.service.family] + _policy_rules(p.service) for p in exposed) + len(homes)
        if expanded > MAX_EXPANDED_RULES:
            node = gw["publics_node"]
            self.bad(node, "gateway.public_addresses",
                     f"{len(exposed)} services and forwards x {len(publics)} public addresses expand to "
                     f"{expanded} firewall rules, more than the limit of {MAX_EXPANDED_RULES}")
            return
        for p, q in _overlapping_ports(exposed):
            s, t = p.service, q.service
            self.bad(p.port, _key(p.path, "port"),
                     f"{s.proto} port {s.port} overlaps {t.name} ({q.path}, line {q.port.line}): "
                     "a public port can be forwarded to one place only")

    def check_service(self, sv: dict[str, Any], services: list[_Parsed],
                      vpn_client: tuple[VpnClientSection, dict[str, _Node]] | None,
                      roles: tuple[str, ...], with_paths: bool = False) -> None:
        tun_node: _Node | None = sv["tun"]
        if with_paths:
            via_node: _Node | None = sv["via_node"]
            if via_node is not None and "vpn-client" in roles:
                self.bad(via_node, "service.via", "on a host that is also the vpn-client, each path's "
                         "replies go straight into that path's tunnel_interface: remove it")
            return  # the paths' own checks (check_paths) cover the rest
        if tun_node is not None:
            if "vpn-client" not in roles:
                self.bad(tun_node, "service.tunnel_interface",
                         "only with role vpn-client on this host; a separate service host uses via")
            elif vpn_client is not None and vpn_client[0].tunnel_interface != tun_node.value:
                self.bad(tun_node, "service.tunnel_interface",
                         f"must be vpn_client.tunnel_interface ({vpn_client[0].tunnel_interface})")
            return
        via: list[_Addr] = sv["via"]
        if via and "vpn-client" in roles:
            tun = vpn_client[0].tunnel_interface if vpn_client else "the vpn-client's tunnel"
            self.bad(sv["via_node"], "service.via",
                     "on a host that is also the vpn-client, tagged replies go straight into the "
                     f"tunnel: write `service: {{tunnel_interface: {tun}}}` instead of via (with via, "
                     "both roles want the default route of table tag.table and no pass succeeds)")
            return
        families = {_family(a.address) for a in via}
        for p in services:
            f = p.service.family
            if f not in families:
                self.bad(p.address, _key(p.path, "address"),
                         f"IPv{f} service but service.via has no IPv{f} address for its replies")

    def check_paths(self, paths: list[_PathParsed], tag_node: _Node | None, mask: int,
                    services: list[_Parsed], vpn_client: tuple[VpnClientSection, dict[str, _Node]] | None,
                    service: tuple[ServiceSection, dict[str, Any]] | None,
                    roles: tuple[str, ...]) -> list[TagPath]:
        """`paths:` against each other and the host's roles; the paths with their effective via."""
        if tag_node is not None and tag_node.kind == "mapping":
            for knode, _ in self.pairs(tag_node, "tag"):
                if knode.value in ("dscp", "mark", "table", "priority"):
                    self.bad(knode, f"tag.{knode.value}", f"not used with paths: each path has its own "
                             f"{knode.value} (paths[].{knode.value}); remove it (tag keeps only mark_mask)")
        for key in _PATH_UNIQUE:
            first: dict[object, _PathParsed] = {}
            for p in paths:
                value = getattr(p.tag_path, key)
                if value is None:
                    continue
                if value in first:
                    other = first[value]
                    shown = f"{value:#x}" if key == "mark" else value
                    self.bad(p.at(key), _key(p.path, key), f"{shown} is also {other.path}'s {key} "
                             f"(line {other.at(key).line}): each path needs its own")
                else:
                    first[value] = p
        for p in paths:
            if p.tag_path.mark & ~mask:
                self.bad(p.at("mark"), _key(p.path, "mark"),
                         f"mark {p.tag_path.mark:#x} has bits outside tag.mark_mask {mask:#x}: the mark must "
                         "lie within the mask (one mask for all paths)")
        lan = vpn_client[0].lan_interface if vpn_client else None
        if "vpn-client" in roles:
            for p in paths:
                if p.tag_path.tunnel_interface is None:
                    self.bad(p.node, _key(p.path, "tunnel_interface"), "required on a vpn-client host: "
                             "the tunnel to this path's public server")
                elif p.tag_path.tunnel_interface == lan:
                    self.bad(p.at("tunnel_interface"), _key(p.path, "tunnel_interface"),
                             f"must differ from vpn_client.lan_interface ({lan})")
        out = [p.tag_path for p in paths]
        if "service" not in roles:
            return out
        if "vpn-client" in roles:
            for p in paths:
                if "via" in p.entries:
                    self.bad(p.at("via"), _key(p.path, "via"), "on a host that is also the vpn-client, this "
                             "path's replies go straight into its tunnel_interface: remove via")
            return out
        default_via: list[_Addr] = service[1]["via"] if service else []
        wanted = {p.service.family for p in services}
        out = []
        for p in paths:
            via = p.via or default_via
            if not via:
                self.bad(p.node, _key(p.path, "via"), "required on a service host: this path's VPN client "
                         "(one address per family), or service.via for every path")
            elif p.via:
                for f in sorted(wanted - {_family(a.address) for a in via}):
                    self.bad(p.at("via"), _key(p.path, "via"),
                             f"no IPv{f} address for the replies of the IPv{f} services")
            out.append(replace(p.tag_path, via=tuple(a.address for a in via)))
        if default_via and paths and all(p.via for p in paths):
            self.bad(service[1]["via_node"], "service.via",  # type: ignore[index]
                     "not used: every path names its own via; remove it")
        elif default_via:
            for f in sorted(wanted - {_family(a.address) for a in default_via}):
                self.bad(service[1]["via_node"], "service.via",  # type: ignore[index]
                         f"no IPv{f} address for the replies of the IPv{f} services (the paths without "
                         "a via of their own use it)")
        return out

    def check_shared_homes(self, exposed: list[_Parsed]) -> None:
        """Entries whose home endpoints overlap (443 and 8443 both to .3:443) must share allow_from
        and rate_limit: after the DNAT, the forward filter sees only the home endpoint."""
        if not any(p.service.allow_from or p.service.rate_limit for p in exposed):
            return
        spans = sorted(exposed, key=lambda p: (p.service.proto, p.service.family, int(p.service.address),
                                               p.service.home_port.first, p.service.home_port.last))
        reach: _Parsed | None = None
        for p in spans:
            s = p.service
            r = reach.service if reach else None
            if r is not None and (r.proto, r.address) == (s.proto, s.address) \
                    and s.home_port.first <= r.home_port.last:
                if (r.allow_from, r.rate_limit) != (s.allow_from, s.rate_limit):
                    self.bad(p.name, _key(p.path, "name"),
                             f"{s.name} and {r.name} ({reach.path}, line {reach.name.line}) both reach "  # type: ignore[union-attr]
                             f"{s.address} {s.proto} port {s.home_port}: the forward filter sees only "
                             "that home endpoint, so give them the same allow_from and rate_limit")
                if s.home_port.last > r.home_port.last:
                    reach = p
            else:
                reach = p

    def check_names(self, exposed: list[_Parsed]) -> None:
        first: dict[str, _Parsed] = {}
        for p in exposed:
            name = p.service.name
            if name in first:
                self.bad(p.name, _key(p.path, "name"), f"duplicate name {name!r} "
                         f"(first at {first[name].path}, line {first[name].name.line})")
            else:
                first[name] = p


def _foreign_tag_value(key: str, value: int) -> str | None:
    """Why a tag value in range is still refused: the kernel's or another tool's own value."""
    if key == "table" and value in RESERVED_TABLES:
        return f"table {value} is the kernel's {RESERVED_TABLES[value]} table: pick another (e.g. 42)"
    if key == "table" and value in FOREIGN_TABLES:
        return (f"table {value} is {FOREIGN_TABLES[value]}: sharing it, each tool would delete the "
                "other's routes; pick another (e.g. 42)")
    if key == "mark" and value in FOREIGN_MARKS:
        return f"{value:#x} is {FOREIGN_MARKS[value]}: pick another (e.g. 42)"
    if key == "mark" and value & TAILSCALE_MARK_BITS:
        return (f"{value:#x} uses the bits {TAILSCALE_MARK_BITS:#x}, where Tailscale keeps its own "
                "marks: pick a mark in the low bits (e.g. 42)")
    if key == "priority" and value in FOREIGN_PRIORITIES:
        return f"priority {value} is {FOREIGN_PRIORITIES[value]}: pick another (e.g. 1042)"
    if key == "dscp" and value in DSCP_IN_USE:
        return (f"{value} is {DSCP_IN_USE[value]}, a value in common use: LAN traffic already marked "
                "with it would be taken for tagged replies and sent into the tunnel; pick an unused "
                "one (e.g. 42)")
    return None


def _policy_rules(s: Service) -> int:
    sources = max(1, len(s.allow_from))
    return sources * (2 if s.rate_limit else 1) + (1 if s.allow_from else 0)


def _overlapping_ports(exposed: list[_Parsed]) -> list[tuple[_Parsed, _Parsed]]:
    """(later-listed, earlier-listed) pairs of entries of one proto and family sharing a public
    port, found by sort and sweep: every entry that overlaps the one reaching furthest before it.
    Linear after the sort (a pairwise search took 34 s for 10,000 services with one overlap)."""
    order = {id(p): i for i, p in enumerate(exposed)}
    spans = sorted(exposed, key=lambda p: (p.service.proto, p.service.family, p.service.port.first,
                                           p.service.port.last))
    pairs: list[tuple[_Parsed, _Parsed]] = []
    reach: _Parsed | None = None
    for p in spans:
        s = p.service
        if reach is not None and (reach.service.proto, reach.service.family) == (s.proto, s.family) \
                and s.port.first <= reach.service.port.last:
            later, earlier = (p, reach) if order[id(p)] > order[id(reach)] else (reach, p)
            pairs.append((later, earlier))
            if s.port.last > reach.service.port.last:
                reach = p
        else:
            reach = p
    return pairs


def _suggest(word: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
