#!/usr/bin/env bash
# deps.sh: install what building, testing and the demo need on a fresh
# Debian machine (run as root): iproute2, ping, nftables, iptables,
# setpriv, dig, dnsperf, ethtool, tcpdump, wg, busybox-static, Go modules.
# Go itself must be 1.21 or newer; it fetches the toolchain go.mod names.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v nft >/dev/null || need+=(nftables)
command -v setpriv >/dev/null || need+=(util-linux)
command -v dig >/dev/null || need+=(dnsutils)
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v iptables >/dev/null || need+=(iptables)
command -v ethtool >/dev/null || need+=(ethtool)
command -v tcpdump >/dev/null || need+=(tcpdump) # the password test captures the underlay
command -v wg >/dev/null || need+=(wireguard-tools) # wg show, against overlayd's WireGuard device
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static) # a static busybox: the Docker tests' image
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps.sh: missing ${need[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "deps.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "deps.sh: Go is not installed (https://go.dev/doc/install)" >&2; exit 1; }
go mod download
