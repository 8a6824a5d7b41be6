#!/usr/bin/env bash
# Seconds from `make run` to its first /v1/embeddings answer, on an empty store unless one is given:
#     scripts/time_first_answer.sh [STORE]        (run `make venv` first: the install is not timed)
# Stops the server afterwards. The figure goes to docs/measurements.md ("The first hour").
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-$(mktemp -d)/store}
port=${BERTSERVE_PORT:-8000}
log=$(mktemp)
start=$(date +%s.%N)
BERTSERVE_PORT=$port setsid make run STORE="$store" >"$log" 2>&1 &
runner=$!
trap 'kill -- -$runner 2>/dev/null || true' EXIT
until curl -sf "localhost:$port/v1/embeddings" -H 'content-type: application/json' \
        -d '{"input": ["Oil prices rose."]}' -o /dev/null; do
    if ! kill -0 $runner 2>/dev/null; then echo "make run ended without serving; its log: $log" >&2; exit 1; fi
    sleep 0.5
done
echo "first answer $(echo "$(date +%s.%N) - $start" | bc) s after make run (store $store, log $log)"
