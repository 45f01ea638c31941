"""The kernel edges: netlink (routes, rules, links), sysctls, conntrack, the firewall backends, and
the converger that drives them. They read and write only what they are handed; policy is core's."""
