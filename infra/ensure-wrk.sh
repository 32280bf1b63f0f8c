#!/usr/bin/env bash
# Make sure wrk (the HTTP load generator of `palette bench`) exists; install Debian's package if
# not. Without it the benchmark still runs, its HTTP figures from Python clients (it says so).
set -uo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "wrk not found: install the Debian package 'wrk' (as root) for the HTTP figures" >&2
  exit 0
fi
echo "installing wrk (Debian package wrk)..." >&2
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } || echo "wrk could not be installed" >&2
exit 0
