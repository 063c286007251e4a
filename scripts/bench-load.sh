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
dev_b=$(sed -n 's/^DEV_B=//p' "$STATE/tunnel.env")
ip netns exec lab-b iperf3 -s -D -p 5301
sleep 1
echo "ping idle: $(ip netns exec lab-a ping -c 100 -i 0.02 -q "$OL_B" | tail -1)"
ip netns exec lab-a iperf3 -c "$OL_B" -p 5301 -t 8 -J >"$STATE/tcp1.json" &
sleep 2
echo "ping under tcp1: $(ip netns exec lab-a ping -c 100 -i 0.02 -q "$OL_B" | tail -1)"
wait
echo "tcp1 meanwhile: $(jq '.end.sum_sent.bits_per_second/1e6|floor' "$STATE/tcp1.json") Mbit/s"
rcvbuf() { ip netns exec lab-b awk '/^Udp:/ { if (h) { print $6; exit } h = 1 }' /proc/net/snmp; }
txdrop() { ip netns exec lab-b cat "/sys/class/net/$dev_b/statistics/tx_dropped"; }
for rate in ${RATES:-500M 1000M 2000M}; do
  r0=$(rcvbuf) t0=$(txdrop)
  ip netns exec lab-a iperf3 -c "$OL_B" -p 5301 -u -b "$rate" -l 1400 -w 8M -t 5 -J >"$STATE/udp.json" || true
  echo "udp $rate: sent $(jq '.end.sum.bits_per_second/1e6|floor' "$STATE/udp.json") Mbit/s, lost $(jq '.end.sum.lost_percent' "$STATE/udp.json") %;" \
    "lab-b RcvbufErrors +$(( $(rcvbuf) - r0 )), $dev_b tx_dropped +$(( $(txdrop) - t0 ))"
done
echo "overlayd's sockets in lab-b (d = drops):"
ip netns exec lab-b ss -uanmp | grep -A1 overlayd | grep -oE 'd[0-9]+\)' || true
pkill -f "iperf3 -s -D -p 5301" || true
