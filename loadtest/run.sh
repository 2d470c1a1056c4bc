#!/usr/bin/env bash
# Headless, time-bounded locust run against a running zooserve.
#
#   loadtest/run.sh [HOST_URL] [USERS] [DURATION]
#   defaults:        http://127.0.0.1:8000  16  30s
#
# USERS: concurrent locust users; DURATION: locust's --run-time (30s, 5m, 1h30m). Start the server
# first (`make serve`, or `zooserve serve`).
# Writes loadtest/results/<UTC timestamp>_{stats,stats_history,failures,exceptions}.csv and, when
# matplotlib is importable (it comes with the dev extra), loadtest/results/<UTC timestamp>.png: requests/s,
# failures/s, users, mean/p50/p95 latency over the whole run, the spawn ramp shaded (loadtest/plot.py).
# The history CSV is written with --csv-full-history: a row per entry per second, and percentiles over
# the last ~10 s instead of since the start. Streaming entries time the whole stream; TTFT and
# inter-token rows are outside "Aggregated" (loadtest/locustfile.py's docstring).
# Exits with locust's status: non-zero when any request failed or locust itself failed.
# Knobs: ZOOSERVE_LOADTEST_MODELS, ZOOSERVE_LOADTEST_TOKEN_MODELS, ZOOSERVE_LOADTEST_WAIT (see
#        loadtest/locustfile.py), ZOOSERVE_LOADTEST_OUT (results folder, default loadtest/results),
#        SPAWN_RATE (users started per second; default all at once), LOCUST_ARGS (extra flags).
set -euo pipefail

case "${1:-}" in
    -h|--help)     # this file's opening comment, without the '#'
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
        exit 0 ;;
    -*)
        echo "run.sh: unknown option $1 (usage: loadtest/run.sh [HOST_URL] [USERS] [DURATION]; --help for more)" >&2
        exit 2 ;;
esac

HOST="${1:-http://127.0.0.1:8000}"
USERS="${2:-16}"
DURATION="${3:-30s}"
SPAWN_RATE="${SPAWN_RATE:-$USERS}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -x .venv/bin/locust ]; then LOCUST=.venv/bin/locust
elif command -v locust >/dev/null 2>&1; then LOCUST=locust
else echo "run.sh: locust not found (.venv/bin/locust or on PATH); install the dev extra" >&2; exit 2
fi
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS="${ZOOSERVE_LOADTEST_OUT:-loadtest/results}"
OUT="$RESULTS/$STAMP"
mkdir -p "$RESULTS"

echo "run.sh: $USERS users for $DURATION against $HOST -> ${OUT}_*.csv"
set +e
# shellcheck disable=SC2086  # LOCUST_ARGS is a list of flags on purpose
"$LOCUST" -f loadtest/locustfile.py --headless --host "$HOST" \
    --users "$USERS" --spawn-rate "$SPAWN_RATE" --run-time "$DURATION" --stop-timeout 10 \
    --csv "$OUT" --csv-full-history --only-summary --exit-code-on-error 1 ${LOCUST_ARGS:-}
RC=$?
set -e

# The summary line comes from the CSV, which locust rewrites once a second: it can miss the last
# second of the run that locust's own final table above includes.
if [ -f "${OUT}_stats.csv" ]; then
    "$PY" - "${OUT}_stats.csv" <<'PYEOF' || true
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    if row["Name"] == "Aggregated":
        print(f"run.sh: {row['Request Count']} requests, {row['Failure Count']} failures, "
              f"{float(row['Requests/s']):.1f} req/s, p50 {row['50%']} ms, p95 {row['95%']} ms, "
              f"p99 {row['99%']} ms")
PYEOF
fi

if [ -f "${OUT}_stats_history.csv" ]; then
    if "$PY" -c "import matplotlib" >/dev/null 2>&1; then
        "$PY" loadtest/plot.py "${OUT}_stats_history.csv" "${OUT}.png" || echo "run.sh: plot failed (ignored)" >&2
    else
        echo "run.sh: matplotlib is not installed, no plot (pip install -e '.[dev]' to get ${OUT}.png)"
    fi
fi

if [ "$RC" -ne 0 ]; then
    echo "run.sh: locust exited with status $RC (failures, or locust itself failed)" >&2
fi
exit "$RC"
