#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries (initdb, postgres) exist; install Debian's package if not.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL server binaries not found: install the Debian package 'postgresql' (as root)" >&2
  exit 1
fi
echo "installing PostgreSQL (Debian package postgresql)..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { echo "postgresql installed but initdb not found" >&2; exit 1; }
