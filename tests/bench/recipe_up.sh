#!/usr/bin/env bash
# The seed's original recipe ("the seed's way"): one-shot `iptables -A`, `ip rule/route add` and
# sysctl lines per role, run once inside one host's network namespace:
#
#     ip netns exec NS tests/bench/recipe_up.sh ROLE [ROLE...]
#
# It is what tagrouted replaces, kept as the end-to-end baseline and the benchmark's: re-running
# it duplicates rules; a flush, a tunnel flap (the `dev tun0` route dies with tun0) or
# all.rp_filter=1 (the kernel uses max(all, tun0), so tun0's 0 is ignored) silently breaks it.
# The vpn-client role needs its tunnel up (the seed ran it from OpenVPN's up hook).
#
# Knobs (environment; the seed's values by default):
#   TAG_DSCP TAG_MARK TAG_TABLE                       42 42 42
#   gateway:    PUB_IF PUBLIC4 PUBLIC6                eth0 192.0.2.200 2001:db8:a::200
#               SERVICES FORWARDS                     "proto/port/address ..." (IPv6 by its colons)
#               HOME4 HOME6 VIA4 VIA6                 home networks routed via the VPN server;
#                                                     empty VIA4/VIA6: no route (a VPN on this
#                                                     host routes them into its tunnel itself)
#   vpn-server: (forwarding only)
#   vpn-client: TUN LAN_IF                            tun0 eth0
#   service:    SVC_VIA4 SVC_VIA6                     192.168.100.2 fd00:100::2; empty: the
#                                                     vpn-client role on this host routes table T
set -euo pipefail

DSCP=${TAG_DSCP:-42} MARK=${TAG_MARK:-42} TABLE=${TAG_TABLE:-42}
PUB_IF=${PUB_IF:-eth0} PUBLIC4=${PUBLIC4:-192.0.2.200} PUBLIC6=${PUBLIC6:-2001:db8:a::200}
SERVICES=${SERVICES:-tcp/443/192.168.100.3 tcp/443/fd00:100::3 udp/7000/192.168.100.3 udp/7000/fd00:100::3}
FORWARDS=${FORWARDS-udp/1194/192.168.200.2}
HOME4=${HOME4:-192.168.100.0/24} HOME6=${HOME6:-fd00:100::/64}
VIA4=${VIA4-192.168.200.2} VIA6=${VIA6-fd00:200::2}
TUN=${TUN:-tun0} LAN_IF=${LAN_IF:-eth0}
SVC_VIA4=${SVC_VIA4-192.168.100.2} SVC_VIA6=${SVC_VIA6-fd00:100::2}

both() { iptables-legacy "$@"; ip6tables-legacy "$@"; }

gateway() {
  sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
  local entry proto port addr ipt public
  for entry in $SERVICES $FORWARDS; do
    IFS=/ read -r proto port addr <<<"$entry"
    if [[ $addr == *:* ]]; then ipt=ip6tables-legacy public=$PUBLIC6; else ipt=iptables-legacy public=$PUBLIC4; fi
    $ipt -t nat -A PREROUTING -i "$PUB_IF" -d "$public" -p "$proto" --dport "$port" \
      -j DNAT --to-destination "$addr"
    $ipt -A FORWARD -i "$PUB_IF" -d "$addr" -p "$proto" --dport "$port" -j ACCEPT
  done
  both -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  [ -z "$VIA4" ] || ip -4 route add "$HOME4" via "$VIA4"
  [ -z "$VIA6" ] || ip -6 route add "$HOME6" via "$VIA6"
}

vpn_server() {
  sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
}

vpn_client() {
  both -t mangle -A PREROUTING -i "$TUN" -j DSCP --set-dscp "$DSCP"
  both -t mangle -A PREROUTING -i "$LAN_IF" -m dscp --dscp "$DSCP" -j MARK --set-mark "$MARK"
  both -t mangle -A POSTROUTING -o "$TUN" -j DSCP --set-dscp 0
  ip -4 route add default dev "$TUN" table "$TABLE"
  ip -6 route add default dev "$TUN" table "$TABLE"
  ip -4 rule add fwmark "$MARK" lookup "$TABLE"
  ip -6 rule add fwmark "$MARK" lookup "$TABLE"
  sysctl -qw "net.ipv4.conf.$TUN.rp_filter=0" net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
}

service() {
  both -t mangle -A INPUT -m dscp --dscp "$DSCP" -j CONNMARK --set-mark "$MARK"
  both -t mangle -A OUTPUT -j CONNMARK --restore-mark
  both -t mangle -A OUTPUT -m mark --mark "$MARK" -j DSCP --set-dscp "$DSCP"
  [ -z "$SVC_VIA4" ] || { ip -4 route add default via "$SVC_VIA4" table "$TABLE"
                          ip -4 rule add fwmark "$MARK" lookup "$TABLE"; }
  [ -z "$SVC_VIA6" ] || { ip -6 route add default via "$SVC_VIA6" table "$TABLE"
                          ip -6 rule add fwmark "$MARK" lookup "$TABLE"; }
}

[ $# -gt 0 ] || { echo "usage: $0 gateway|vpn-server|vpn-client|service ..." >&2; exit 2; }
for role in "$@"; do
  case $role in
    gateway) gateway ;;
    vpn-server) vpn_server ;;
    vpn-client) vpn_client ;;
    service) service ;;
    *) echo "recipe_up.sh: unknown role $role" >&2; exit 2 ;;
  esac
done
