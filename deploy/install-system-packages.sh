#!/usr/bin/env bash
# Installs the Debian packages hashlake's local stack and tests start (redis-server, prometheus/promtool)
# and the C compiler the search extension is built with (gcc), only when one is missing. Needs root or sudo. Called by `make setup`.
set -euo pipefail
missing=0
for exe in redis-server prometheus promtool gcc; do
  command -v "$exe" >/dev/null || missing=1
done
[ "$missing" = 0 ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing redis-server, prometheus and gcc with apt-get"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server prometheus gcc libc6-dev
