#!/usr/bin/env bash
# bench-relay.sh: one-stream TCP throughput through overlayd to a direct
# neighbour and to a host reached only through a relay. Three namespaces on
# a bridge (in a fourth), overlayd in each (plaintext unless PASSWORD is
# set), h1 and h3 dropping each other's underlay packets so that h2
# relays; iperf3 from h1 to h2 and to h3, RUNS times each, medians. Root;
# a benchmark: run it alone (it takes the lab's lock). Uses bin/.
#   RUNS=3 scripts/bench-relay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(pwd)/bin
RUNS=${RUNS:-3}
T=${IPERF_T:-10}
D=/tmp/bench-relay
SW=brl-sw
exec 9>/tmp/bench.lock
flock 9
cleanup() {
  for i in 1 2 3; do ip netns pids brl-$i 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.5
  for n in brl-1 brl-2 brl-3 $SW; do ip netns del $n 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
rm -rf $D && mkdir -p $D
ip netns add $SW
ip -n $SW link add br0 type bridge && ip -n $SW link set br0 up
for i in 1 2 3; do
  ip netns add brl-$i
  ip link add eth0 netns brl-$i type veth peer name p$i netns $SW
  ip -n $SW link set p$i master br0 up
  ip -n brl-$i addr add 10.233.0.$i/24 dev eth0
  ip -n brl-$i link set eth0 up && ip -n brl-$i link set lo up
done
for pair in "1 3" "3 1"; do
  set -- $pair
  ip netns exec brl-$1 nft -f - <<NFT
table inet relaybench {
  chain out {
    type filter hook output priority 0;
    ip daddr 10.233.0.$2 drop
  }
  chain in {
    type filter hook input priority 0;
    ip saddr 10.233.0.$2 drop
  }
}
NFT
done
extra=()
[ -z "${PASSWORD:-}" ] || { printf '%s\n' "$PASSWORD" >$D/pw; chmod 600 $D/pw; extra=(--password-file $D/pw); }
start() { # i peer
  local peer=()
  [ -z "$2" ] || peer=(--peer 10.233.0.$2)
  ip netns exec brl-$1 "$BIN/overlayd" --iface ovr$1 --range 10.234.0.0/24 --socket $D/h$1.sock --state-dir $D/h$1 \
    --no-dns --no-firewall --log-level warn "${extra[@]}" "${peer[@]}" >$D/h$1.log 2>&1 &
  for _ in $(seq 50); do [ -S $D/h$1.sock ] && break; sleep 0.1; done
  ip netns exec brl-$1 "$BIN/overlayctl" --socket $D/h$1.sock expose 10.234.0.$1/24 >/dev/null
}
start 1 "" && start 2 1 && start 3 2
for i in 2 3; do ip netns exec brl-$i iperf3 -s -D -p 5401; done
for i in 2 3; do
  for _ in $(seq 100); do ip netns exec brl-1 ping -c1 -W1 -q 10.234.0.$i >/dev/null 2>&1 && break; sleep 0.2; done
done
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for i in 2 3; do
  for r in $(seq "$RUNS"); do
    ip netns exec brl-1 iperf3 -c 10.234.0.$i -p 5401 -t "$T" -J | jq '.end.sum_sent.bits_per_second/1e6|floor'
  done >$D/rate$i
done
direct=$(median <$D/rate2) relayed=$(median <$D/rate3)
echo "to a neighbour (h1 -> h2): $direct Mbit/s (runs: $(paste -sd' ' $D/rate2))"
echo "through a relay (h1 -> h2 -> h3): $relayed Mbit/s (runs: $(paste -sd' ' $D/rate3))"
echo "relayed / direct: $(( 100 * relayed / direct )) %"
