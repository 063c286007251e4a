#!/usr/bin/env bash
# bench-load.sh: what lab.sh does not measure yet, in its namespaces: ping
# across the tunnel idle and under a one-stream iperf3 load, then iperf3
# UDP at each rate in $RATES with its loss, the receiving namespace's UDP
# RcvbufErrors and the receiving tunnel device's tx drops, and the drops
# of overlayd's own sockets (ss). KIND is a lab.sh tunnel kind (overlayd,
# wggo, ...). Root; a benchmark: run it alone (it takes the lab's lock).
#   KIND=overlayd RATES="500M 1000M" scripts/bench-load.sh
set -euo pipefail
L=$(cd "$(dirname "$0")/../../shared/bench" && pwd)
KIND=${KIND:-overlayd}
export NS_A=lab-a NS_B=lab-b UL_DEV_A=veth-laba UL_DEV_B=veth-labb UL_A=10.231.0.1 UL_B=10.231.0.2 UL_PREFIX=24 UL_MTU=1500
export OL_A=10.232.0.1 OL_B=10.232.0.2 OL_PREFIX=24 TUN_MTU=1420 LAB_DIR=$L BIN_DIR=/tmp/bench-bin
export STATE=/tmp/bench-lab/load-$KIND
exec 9>/tmp/bench.lock
flock 9
bash "$L/lab.sh" up >/dev/null
rm -rf "$STATE" && mkdir -p "$STATE"
cd "$(dirname "$0")/.."
trap 'bash "$L/tunnels/$KIND.sh" stop >/dev/null 2>&1; bash "$L/lab.sh" down >/dev/null 2>&1' EXIT
bash "$L/tunnels/$KIND.sh" start >/dev/null
target=$(sed -n "s/^TARGET=//p" "$STATE/tunnel.env")
dev_a=$(sed -n 's/^DEV_A=//p' "$STATE/tunnel.env") dev_b=$(sed -n 's/^DEV_B=//p' "$STATE/tunnel.env")
BIN=$(pwd)/bin
ip netns exec lab-b iperf3 -s -D -p 5301
sleep 1
echo "ping idle: $(ip netns exec lab-a ping -c 100 -i 0.02 -q "$target" | tail -1)"
ip netns exec lab-a iperf3 -c "$target" -p 5301 -t 8 -J >"$STATE/tcp1.json" &
sleep 2
echo "ping under tcp1: $(ip netns exec lab-a ping -c 100 -i 0.02 -q "$target" | tail -1)"
wait
echo "tcp1 meanwhile: $(jq '.end.sum_sent.bits_per_second/1e6|floor' "$STATE/tcp1.json") Mbit/s"
snmp() { # ns field: a field of the Udp line of /proc/net/snmp
  ip netns exec "$1" awk -v f="$2" '/^Udp:/ { if (h) { print $i; exit } for (i = 1; i <= NF; i++) if ($i == f) break; h = 1 }' /proc/net/snmp
}
dev() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/$3"; }
drops() { # side: overlayd's own drop counters, as one JSON object
  "$BIN"/overlayctl --socket "$STATE/$1.sock" status --json |
    jq -c '.router.stats | with_entries(select((.key | startswith("drop")) and .value > 0))'
}
# Every hop of lab-a -> lab-b where a datagram can be lost, read before and
# after each run: lab-a's UDP send buffer (iperf3's socket), its tunnel
# device's queue (the kernel to overlayd), overlayd in lab-a, its socket's
# send buffer, the veths, lab-b's UDP receive buffers (overlayd's and
# iperf3's sockets), overlayd in lab-b, and its tunnel device.
counters() {
  echo "a.SndbufErrors=$(snmp lab-a SndbufErrors) a.tun_tx_dropped=$(dev lab-a "$dev_a" tx_dropped)" \
    "a.veth_tx_dropped=$(dev lab-a veth-laba tx_dropped) b.veth_rx_dropped=$(dev lab-b veth-labb rx_dropped)" \
    "b.RcvbufErrors=$(snmp lab-b RcvbufErrors) b.InErrors=$(snmp lab-b InErrors) b.tun_rx_dropped=$(dev lab-b "$dev_b" rx_dropped)"
}
delta() { # before after: the counters that moved
  local k v b
  for kv in $2; do
    k=${kv%%=*} v=${kv#*=}
    b=$(tr ' ' '\n' <<<"$1" | sed -n "s/^$k=//p")
    [ "$v" = "$b" ] || printf ' %s+%d' "$k" $((v - b))
  done
}
for rate in ${RATES:-500M 1000M 2000M}; do
  c0=$(counters)
  ip netns exec lab-a iperf3 -c "$target" -p 5301 -u -b "$rate" -l 1400 -w 8M -t 5 -J >"$STATE/udp.json" || true
  echo "udp $rate: sent $(jq '.end.sum.bits_per_second/1e6|floor' "$STATE/udp.json") Mbit/s," \
    "lost $(jq '.end.sum.lost_packets' "$STATE/udp.json") of $(jq '.end.sum.packets' "$STATE/udp.json")" \
    "($(jq '.end.sum.lost_percent' "$STATE/udp.json") %); counters moved:$(delta "$c0" "$(counters)")"
done
[ "$KIND" != overlayd ] || echo "overlayd's own drops, a: $(drops a) b: $(drops b)"
echo "overlayd's sockets in lab-b (d = drops):"
ip netns exec lab-b ss -uanmp | grep -A1 overlayd | grep -oE 'd[0-9]+\)' || true
pkill -f "iperf3 -s -D -p 5301" || true
