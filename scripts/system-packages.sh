#!/usr/bin/env bash
# Debian packages the tests use: Chromium for the dashboard's browser tests, tmux for the terminal dashboard in a
# real 80x24 terminal, redis-server for the shared
# slot ledger's tests (the tests start their own redis-server on a free port; the system service is not used).
# Installs only what is missing; without root (or apt) it says what to install: the browser tests skip, the Redis
# tests fail with that advice.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: install ${missing[*]} (Debian packages) to run the browser and Redis tests" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
