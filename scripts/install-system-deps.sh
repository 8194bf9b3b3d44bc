#!/usr/bin/env bash
# Debian packages the tests and benchmarks use: netfilter and namespaces (iptables, nft, ip), dig,
# the DNS benchmark peers (dnsperf, dnsmasq), the HTTP load generator (wrk), callgrind (valgrind, for the telemetry
# instruction counts), and the package build and tests (rpm,
# debootstrap, zstd, systemd-nspawn, strip), and a C compiler for the native stats filter (gcc). Installs only what is missing; needs root for that.
set -euo pipefail
declare -A want=(
  [iptables-restore]=iptables [nft]=nftables [ip]=iproute2 [dig]=dnsutils
  [dnsperf]=dnsperf [dnsmasq]=dnsmasq [taskset]=util-linux [wrk]=wrk [callgrind_control]=valgrind
  [rpm]=rpm [debootstrap]=debootstrap [zstd]=zstd [systemd-nspawn]=systemd-container [dash]=dash [strip]=binutils [gcc]=gcc
)
missing=()
for cmd in "${!want[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ]; then
    missing+=("${want[$cmd]}")
  fi
done
# The interop network lab runs vm-agent as the proxy user with Debian's interpreter (the venv's may sit under /root).
[ -x /usr/bin/python3.11 ] || missing+=(python3.11)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "note: not root, cannot install ${missing[*]}; tests that need them will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# dnsmasq's package starts a system service on port 53; the benchmarks run their own instances.
systemctl disable --now dnsmasq >/dev/null 2>&1 || service dnsmasq stop >/dev/null 2>&1 || true
echo "installed: ${missing[*]}"
