#!/usr/bin/env bash
# One-time set-up on a fresh machine, safe to re-run: Debian packages the tests and
# the demo run (nginx, wrk, Prometheus, Alertmanager, PgBouncer, Varnish,
# Chromium for the browser tests), then the virtual environment with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[[ -x /usr/sbin/pgbouncer ]] || need+=(pgbouncer)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
[[ -x /usr/bin/prometheus ]] || need+=(prometheus)
[[ -x /usr/bin/prometheus-alertmanager ]] || need+=(prometheus-alertmanager)
[[ -x /usr/sbin/varnishd ]] || need+=(varnish)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
if ((${#need[@]})); then
  echo "bootstrap: installing Debian packages: ${need[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# Re-install only when the project's dependencies changed.
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [[ ! -f $stamp ]]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
