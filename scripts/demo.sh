#!/usr/bin/env bash
# demo.sh: three hosts in network namespaces on one machine, overlayd in
# each; the hosts split the range among themselves (IPAM), each takes its
# own address from it, pings cross the overlay.
#
#   ovdemo-h1 192.168.201.1 ─┐
#   ovdemo-h2 192.168.201.2 ─┼─ bridge (in namespace ovdemo-sw)
#   ovdemo-h3 192.168.201.3 ─┘
#   overlay: 172.16.16.0/24, divided among the three by consensus
#
# Run as root from the repository (make demo builds bin/ first). Everything
# is removed at the end, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: run as root (sudo make demo)" >&2; exit 1; }
[ -x bin/overlayd ] && [ -x bin/overlayctl ] || go build -o bin/ ./cmd/overlayd ./cmd/overlayctl

P=ovdemo
RANGE=172.16.16.0/24
WORK=$(mktemp -d /tmp/ovdemo.XXXXXX)
HOSTS=(1 2 3)

cleanup() {
  for i in "${HOSTS[@]}"; do
    for pid in $(ip netns pids "$P-h$i" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  for ns in "$P-h1" "$P-h2" "$P-h3" "$P-sw"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
cleanup 2>/dev/null; WORK=$(mktemp -d /tmp/ovdemo.XXXXXX)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ctl() { local i=$1; shift; ip netns exec "$P-h$i" bin/overlayctl --socket "$WORK/h$i.sock" "$@"; }

step "three hosts on one switch (network namespaces)"
ip netns add "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
for i in "${HOSTS[@]}"; do
  ip netns add "$P-h$i"
  ip -n "$P-h$i" link add eth0 type veth peer name "h$i" netns "$P-sw"
  ip -n "$P-sw" link set "h$i" master br0 up
  ip -n "$P-h$i" addr add "192.168.201.$i/24" dev eth0
  ip -n "$P-h$i" link set eth0 up
  ip -n "$P-h$i" link set lo up
  echo "host$i: 192.168.201.$i"
done

step "overlayd on each host: host2 is given host1 as its peer, host3 only host2 (it discovers host1)"
start() {
  local i=$1; shift
  ip netns exec "$P-h$i" bin/overlayd --range "$RANGE" --nickname "host$i" \
    --socket "$WORK/h$i.sock" --state-dir "$WORK/h$i-state" "$@" >"$WORK/h$i.log" 2>&1 &
  for _ in $(seq 100); do [ -S "$WORK/h$i.sock" ] && return; sleep 0.05; done
  echo "overlayd on host$i did not start:"; cat "$WORK/h$i.log"; exit 1
}
start 1 --init-peer-count 3
start 2 --init-peer-count 3 --peer 192.168.201.1
start 3 --init-peer-count 3 --peer 192.168.201.2
for _ in $(seq 50); do
  ctl 3 status | grep -q 'Connections: 2 (2 established)' && break; sleep 0.1
done

step "IPAM: idle until the first request; then a quorum of the peers agrees how to split the range (a peer left out gets space by donation)"
ctl 1 status | grep -A1 'Service: ipam'
echo "+ overlayctl ring   (on host1: needs the ring, so consensus runs)"
ctl 1 ring
declare -A ADDR
for i in "${HOSTS[@]}"; do
  ADDR[$i]=$(ctl "$i" expose)
  echo "+ overlayctl expose   (on host$i, an address from IPAM)  ->  ${ADDR[$i]}"
done
echo "+ overlayctl alloc web1   (on host1)  ->  $(ctl 1 alloc web1)"
echo "+ overlayctl alloc web1   (again: the same ID gets the same address)  ->  $(ctl 1 alloc web1)"
echo "+ overlayctl claim ext 1.1.1.1/24   (outside the range: a manual address)  ->  $(ctl 1 claim ext 1.1.1.1/24)"
sleep 1.5 # free counts spread by anti-entropy (a round a second)
step "overlayctl status ipam (host3)"
ctl 3 status ipam

step "overlayctl status (host3)"
ctl 3 status
step "overlayctl status connections (host3)"
ctl 3 status connections
step "overlayctl peers (host1)"
ctl 1 peers

step "ping across the overlay (each host's address from IPAM)"
for pair in "1 2" "2 3" "3 1"; do
  set -- $pair
  a=${ADDR[$2]%/*}
  echo "+ host$1: ping -c 3 $a"
  ip netns exec "$P-h$1" ping -c 3 -i 0.2 -W 1 "$a" | sed -n '2,4p;$p'
done

step "host2 stops; host1 sees its connection go within 3 s"
kill "$(ip netns pids "$P-h2" | head -1)"
sleep 3
ctl 1 status connections
step "host2 starts again with the same state directory: same peer name, same address, traffic resumes"
start 2 --init-peer-count 3 --peer 192.168.201.1
echo "+ overlayctl expose   (on host2)  ->  $(ctl 2 expose)   (was ${ADDR[2]})"
a=${ADDR[2]%/*}
for _ in $(seq 100); do ip netns exec "$P-h1" ping -c1 -W1 "$a" >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec "$P-h1" ping -c 3 -i 0.2 -W 1 "$a" | sed -n '2,4p;$p'

step "done: removing the namespaces"
