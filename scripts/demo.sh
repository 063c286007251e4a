#!/usr/bin/env bash
# demo.sh: three hosts in network namespaces on one machine, overlayd in
# each; the hosts split the range among themselves (IPAM), each takes its
# own address from it and registers its name in DNS (WeaveDNS); pings
# cross the overlay by address and by name.
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
  for ns in "$P-h1" "$P-h2" "$P-h3" "$P-c1" "$P-c2" "$P-c3" "$P-sw"; do ip netns del "$ns" 2>/dev/null || true; rm -rf "/etc/netns/$ns"; done
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
  # ip netns exec shows this file as the namespace's /etc/resolv.conf:
  # names resolve through the overlayd of the namespace.
  mkdir -p "/etc/netns/$P-h$i"
  printf 'nameserver 127.0.0.1\nsearch weave.local\n' >"/etc/netns/$P-h$i/resolv.conf"
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

step "DNS: each host registers its name for its address; every host resolves every name"
for i in "${HOSTS[@]}"; do
  echo "+ overlayctl dns-add ${ADDR[$i]%/*} host$i   (on host$i)"
  ctl "$i" dns-add "${ADDR[$i]%/*}" "host$i"
done
sleep 0.3
echo "+ overlayctl dns   (on host1: one line per name, as weave status dns)"
ctl 1 dns
echo "+ dig +short host3.weave.local   (on host1, the real dig against host1's overlayd)"
ip netns exec "$P-h1" dig +short +time=2 +tries=1 host3.weave.local
echo "+ dig +short -x ${ADDR[3]%/*}   (on host2)"
ip netns exec "$P-h2" dig +short +time=2 +tries=1 -x "${ADDR[3]%/*}"
echo "+ overlayctl dns-lookup host2   (on host3)  ->  $(ctl 3 dns-lookup host2)"
echo "+ overlayctl dns-args   (on host1)  ->  $(ctl 1 dns-args 2>&1 || true)"

step "containers: a network namespace on each host, attached with a name (overlayctl attach)"
for i in "${HOSTS[@]}"; do
  ip netns add "$P-c$i"
  echo "+ overlayctl attach $P-c$i --name web$i   (on host$i)  ->  $(ctl "$i" attach "$P-c$i" --name "web$i")"
done
echo "+ overlayctl ps   (on host2: weave:expose, then each container: ID, MAC of ethwe0, address)"
ctl 2 ps
echo "+ ip netns exec $P-c1 ip -br addr show ethwe0   (MTU $(ip netns exec "$P-c1" cat /sys/class/net/ethwe0/mtu))"
ip netns exec "$P-c1" ip -br addr show ethwe0
echo "+ cat /etc/netns/$P-c1/resolv.conf   (written by attach: overlayd's DNS, the search domain)"
cat "/etc/netns/$P-c1/resolv.conf"
sleep 0.3
for pair in "1 2" "2 3" "3 1"; do
  set -- $pair
  echo "+ container web$1 (on host$1): ping -c 2 web$2"
  ip netns exec "$P-c$1" ping -c 2 -i 0.2 -W 1 "web$2" | sed -n '1,3p;$p'
done
echo "+ container web1 sends 1 MiB over TCP to web3:8000, by name (bash's /dev/tcp to busybox nc -l); the SHA-256 of both ends:"
head -c 1048576 /dev/urandom >"$WORK/blob"
ip netns exec "$P-c3" busybox nc -l -p 8000 >"$WORK/got" &
sleep 0.3
ip netns exec "$P-c1" bash -c "cat '$WORK/blob' >/dev/tcp/web3/8000"
wait $!
sha256sum "$WORK/blob" "$WORK/got" | sed "s|$WORK/||"
cmp -s "$WORK/blob" "$WORK/got" && echo "same bytes" || { echo "the bytes differ"; exit 1; }

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

step "ping across the overlay by name (host1's resolv.conf points at its overlayd, search weave.local)"
for n in host2 host3; do
  echo "+ host1: ping -c 3 $n"
  ip netns exec "$P-h1" ping -c 3 -i 0.2 -W 1 "$n" | sed -n '1,4p;$p'
done

step "host2 stops; host1 sees its connection go, and host2's name with it, within about 3 s"
kill "$(ip netns pids "$P-h2" | head -1)"
stopped=$(date +%s%N)
for _ in $(seq 100); do [ -z "$(ip netns exec "$P-h1" dig +short +time=1 +tries=1 host2.weave.local)" ] && break; sleep 0.1; done
echo "host2.weave.local is gone on host1 $(( ($(date +%s%N) - stopped) / 1000000 )) ms after the stop"
ctl 1 status connections
step "host2 starts again with the same state directory: same peer name, same address, traffic resumes"
start 2 --init-peer-count 3 --peer 192.168.201.1
echo "+ overlayctl expose   (on host2)  ->  $(ctl 2 expose)   (was ${ADDR[2]})"
a=${ADDR[2]%/*}
for _ in $(seq 100); do ip netns exec "$P-h1" ping -c1 -W1 "$a" >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec "$P-h1" ping -c 3 -i 0.2 -W 1 "$a" | sed -n '2,4p;$p'
echo "+ dig +short host2.weave.local   (on host3: host2 kept its name in its state directory)"
for _ in $(seq 50); do [ -n "$(ip netns exec "$P-h3" dig +short +time=1 +tries=1 host2.weave.local)" ] && break; sleep 0.1; done
ip netns exec "$P-h3" dig +short +time=2 +tries=1 host2.weave.local

step "done: removing the namespaces"
