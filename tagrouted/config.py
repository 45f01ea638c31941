"""The host's role config: its types, and the strict loader that turns a YAML file into them.

Owns: parsing /etc/tagrouted/tagrouted.yaml into frozen dataclasses and reporting every problem
as one line `FILE:LINE: key.path: what is wrong`. Pure: reads the one file it is handed, touches
no kernel state, imports no edge library. Nothing downstream ever sees a half-valid Config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

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


@dataclass(frozen=True)
class VpnServerSection:
    tunnel_interface: str
    uplink_interface: str
    families: tuple[Family, ...] = (4, 6)


@dataclass(frozen=True)
class VpnClientSection:
    tunnel_interface: str
    lan_interface: str
    rp_filter: Literal["off", "loose"] = "loose"


@dataclass(frozen=True)
class ServiceSection:
    """Where a service host sends tagged replies: `via` (one address per family) or a tunnel."""

    via: tuple[IPAddress, ...] = ()
    tunnel_interface: str | None = None


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

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(Exception):
    """A config file that must not be applied; carries every problem found in it."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# The loader (load_config / parse_config) follows below.
