#!/usr/bin/env bash
# Runs every benchmark and prints their tables (markdown), side by side with the anchors:
#
#     sudo tests/bench/run_all.sh            # the full set (~15 minutes on 2 cores)
#     sudo tests/bench/run_all.sh --quick    # a smoke run with few trials (~2 minutes)
#
# Benchmarks print numbers and never fail on one; they exit non-zero only when they could not
# run. Everything happens in network namespaces of their own (removed at the end, also on
# Ctrl-C); the root namespace is never touched. Needs `./scripts/bootstrap` to have run once.
# Run them on a quiet machine: other load shows up in the tails (the header prints the load).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" -eq 0 ] || { echo "run_all.sh: needs root (network namespaces): sudo $0" >&2; exit 1; }
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run_all.sh: no .venv: run ./scripts/bootstrap first" >&2; exit 1; }
export PYTHONDONTWRITEBYTECODE=1

quick=0
[ "${1:-}" = "--quick" ] && quick=1

run() {  # name, then its arguments (full run) ; quick arguments after --
  local name=$1; shift
  local full=() fast=() seen=0
  for a in "$@"; do
    if [ "$a" = "--" ]; then seen=1; elif [ $seen -eq 0 ]; then full+=("$a"); else fast+=("$a"); fi
  done
  echo
  echo "## $name"
  local started=$SECONDS
  if [ $quick -eq 1 ]; then
    "$PY" "tests/bench/$name.py" "${fast[@]}"
  else
    "$PY" "tests/bench/$name.py" "${full[@]}"
  fi
  echo
  echo "_($name took $((SECONDS - started)) s)_"
}

echo "# tagrouted benchmarks ($(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
run bench_tunnel --flaps 200 --restart-flaps 300 -- --flaps 20 --restart-flaps 20
run bench_drift --trials 200 --iptables-trials 25 -- --trials 20 --iptables-trials 3
run bench_scale --profile -- --quick --profile
run bench_idle --idle 120 --flaps 2000 -- --idle 10 --flaps 200
run bench_ctl --trials 30 -- --trials 3
run bench_check --trials 5 -- --trials 1
run bench_nftables -- --quick
run bench_hostfw --trials 10 --legacy-trials 3 -- --trials 3 --legacy-trials 1
