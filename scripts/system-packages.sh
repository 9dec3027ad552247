#!/usr/bin/env bash
# Debian packages the tests use: Chromium for the dashboard's browser tests, nothing else yet.
# Installs only what is missing; without root (or apt) it says what to install and the browser tests skip.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: install ${missing[*]} (Debian packages) to run the browser tests; they are skipped without it" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
