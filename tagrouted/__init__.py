"""tagrouted: keeps tagged policy routing and its iptables chains true on every host of the path."""

__version__ = "0.1.0"
