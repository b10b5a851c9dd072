#!/usr/bin/env bash
# Installs the Debian packages hashlake's local stack and tests start (redis-server, postgresql for the
# lake's catalog, prometheus/promtool, the Pushgateway the retraining job pushes its metrics to) and the C compiler the search extension is built with (gcc), only
# when one is missing. Needs root or sudo. Called by `make setup`.
set -euo pipefail
missing=0
for exe in redis-server prometheus promtool prometheus-pushgateway gcc; do
  command -v "$exe" >/dev/null || missing=1
done
# PostgreSQL's server programs live under /usr/lib/postgresql/<major>/bin, off PATH
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1
[ "$missing" = 0 ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing redis-server, postgresql, prometheus, prometheus-pushgateway and gcc with apt-get"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server postgresql prometheus prometheus-pushgateway gcc libc6-dev
