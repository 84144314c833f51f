#!/usr/bin/env bash
# Idle memory of each service as its own process: starts `aimesh <service>` for every service
# and the gateway against the dev servers (`scripts/deps.sh up` first), waits until they idle,
# prints each one's resident set (VmRSS) and peak (VmHWM), and stops them.
# Usage: scripts/idle-rss.sh [path to a release aimesh binary, default target/release/aimesh]
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-target/release/aimesh}
[ -x "$binary" ] || { echo "idle-rss: build it first: cargo build --release -p aimesh" >&2; exit 1; }
set -a
. .dev/env
set +a
secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
export AIMESH_AUTH__SERVICE_TOKEN="amsvc_$(secret)" AIMESH_AUTH__GATEWAY_TOKEN="$(secret)" \
  AIMESH_AUTH__LINK_SIGNING_KEY="$(secret)"
logs=$(mktemp -d)
"$binary" migrate >"$logs/migrate.log" 2>&1
services=(identity chat usage files analytics gateway)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$logs"' EXIT
port=7290
for service in "${services[@]}"; do
  port=$((port + 1))
  "$binary" --metrics-listen "127.0.0.1:$port" "$service" >"$logs/$service.log" 2>&1 &
  pids+=($!)
  sleep 1
done
sleep 15
printf '%-10s %10s %10s\n' process 'rss MiB' 'peak MiB'
for i in "${!services[@]}"; do
  status=/proc/${pids[$i]}/status
  if [ ! -r "$status" ]; then
    echo "idle-rss: ${services[$i]} exited:" >&2
    tail -5 "$logs/${services[$i]}.log" >&2
    exit 1
  fi
  awk -v name="${services[$i]}" '/^VmRSS/ { rss = $2 } /^VmHWM/ { peak = $2 }
    END { printf "%-10s %10.1f %10.1f\n", name, rss / 1024, peak / 1024 }' "$status"
done
