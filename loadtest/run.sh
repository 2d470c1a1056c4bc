#!/usr/bin/env bash
# Headless, time-bounded locust run against a running zooserve.
#
#   loadtest/run.sh [HOST_URL] [USERS] [DURATION]
#   defaults:        http://127.0.0.1:8000  16  30s
#   loadtest/run.sh --workers 4 [--remote-workers M] [...] [HOST_URL] [USERS] [DURATION]
#
# USERS: concurrent locust users; DURATION: locust's --run-time (30s, 5m, 1h30m). Start the server
# first (`make serve`, or `zooserve serve`).
# Options (distributed load, locust's own master/worker mode; default: one locust process):
#   --workers N           a locust master and N worker processes on this machine; the master spreads
#                         the USERS over the workers and merges their stats, so the CSV, the summary
#                         line and the plot are those of one run. Each local worker logs to
#                         <results>/<stamp>_worker-K.log and ends it with its own request count.
#   --remote-workers M    the master also waits for M workers started on other machines (then it
#                         listens on every interface unless --master-bind-host says otherwise); on
#                         each of those, from a checkout with the same ZOOSERVE_LOADTEST_* variables:
#                           .venv/bin/locust -f loadtest/locustfile.py,loadtest/worker.py \
#                               --worker --master-host MASTER_ADDRESS --master-port 5557
#   --master-port P       the master's port (default 5557)
#   --master-bind-host A  the master's bind address (default 127.0.0.1 with local workers only,
#                         * with remote ones)
#   --workers-wait S      seconds the master waits for every worker before it gives up (default 60;
#                         locust then exits 1 and no load is sent)
# Writes loadtest/results/<UTC timestamp>_{stats,stats_history,failures,exceptions}.csv and, when
# matplotlib is importable (it comes with the dev extra), loadtest/results/<UTC timestamp>.png: requests/s,
# failures/s, users, mean/p50/p95 latency over the whole run, the spawn ramp shaded (loadtest/plot.py).
# The history CSV is written with --csv-full-history: a row per entry per second, and percentiles over
# the last ~10 s instead of since the start. Streaming entries time the whole stream; TTFT and
# inter-token rows are outside "Aggregated" (loadtest/locustfile.py's docstring).
# Exits with locust's status: non-zero when any request failed or locust itself failed (with workers:
# the master's status, or 1 when a local worker failed or had to be killed).
# Knobs: ZOOSERVE_LOADTEST_MODELS, ZOOSERVE_LOADTEST_TOKEN_MODELS, ZOOSERVE_LOADTEST_WAIT (see
#        loadtest/locustfile.py), ZOOSERVE_LOADTEST_OUT (results folder, default loadtest/results),
#        SPAWN_RATE (users started per second; default all at once), LOCUST_ARGS (extra flags, given
#        to the master, or to the single process).
set -euo pipefail

usage="usage: loadtest/run.sh [--workers N] [--remote-workers M] [--master-port P] [--master-bind-host A] \
[--workers-wait S] [HOST_URL] [USERS] [DURATION]; --help for more"
die() { echo "run.sh: $*" >&2; exit 2; }
count() {   # count NAME VALUE: VALUE must be a whole number >= 0
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 takes a whole number, got '$2' ($usage)"
    echo "$((10#$2))"
}

WORKERS=0 REMOTE=0 MASTER_PORT=5557 BIND="" WORKERS_WAIT=60
POSITIONAL=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        -h|--help)     # this file's opening comment, without the '#'
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
            exit 0 ;;
        --workers|--remote-workers|--master-port|--master-bind-host|--workers-wait)
            [ "$#" -ge 2 ] || die "$1 needs a value ($usage)"
            case "$1" in
                --workers) WORKERS="$(count "$1" "$2")" ;;
                --remote-workers) REMOTE="$(count "$1" "$2")" ;;
                --master-port) MASTER_PORT="$(count "$1" "$2")"
                    { [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ]; } \
                        || die "--master-port takes a port 1-65535, got '$2'" ;;
                --master-bind-host) [ -n "$2" ] || die "--master-bind-host needs an address"; BIND="$2" ;;
                --workers-wait) WORKERS_WAIT="$(count "$1" "$2")" ;;
            esac
            shift 2 ;;
        --workers=*|--remote-workers=*|--master-port=*|--master-bind-host=*|--workers-wait=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        -*)
            echo "run.sh: unknown option $1 ($usage)" >&2
            exit 2 ;;
        *)
            POSITIONAL+=("$1"); shift ;;
    esac
done
[ "${#POSITIONAL[@]}" -le 3 ] || die "at most three arguments, HOST_URL USERS DURATION, got ${#POSITIONAL[@]} ($usage)"

HOST="${POSITIONAL[0]:-http://127.0.0.1:8000}"
USERS="${POSITIONAL[1]:-16}"
DURATION="${POSITIONAL[2]:-30s}"
SPAWN_RATE="${SPAWN_RATE:-$USERS}"
DISTRIBUTED=$((WORKERS + REMOTE))
if [ "$DISTRIBUTED" -gt 0 ] && [[ "$USERS" =~ ^[0-9]+$ ]] && [ "$USERS" -lt "$DISTRIBUTED" ]; then
    echo "run.sh: warning: $USERS users for $DISTRIBUTED workers: some workers get no user and send nothing" >&2
fi
[ -n "$BIND" ] || { if [ "$REMOTE" -gt 0 ]; then BIND="*"; else BIND=127.0.0.1; fi; }

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

COMMON=(--host "$HOST" --csv "$OUT" --csv-full-history --only-summary --exit-code-on-error 1)
WORKER_PIDS=()
stop_workers() {    # the local workers still running (the master's quit normally ends them)
    local pid
    for pid in "${WORKER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_workers EXIT

set +e
if [ "$DISTRIBUTED" -eq 0 ]; then
    echo "run.sh: $USERS users for $DURATION against $HOST -> ${OUT}_*.csv"
    # shellcheck disable=SC2086  # LOCUST_ARGS is a list of flags on purpose
    "$LOCUST" -f loadtest/locustfile.py --headless "${COMMON[@]}" \
        --users "$USERS" --spawn-rate "$SPAWN_RATE" --run-time "$DURATION" --stop-timeout 10 ${LOCUST_ARGS:-}
    RC=$?
else
    echo "run.sh: $USERS users for $DURATION against $HOST from $WORKERS local and $REMOTE remote workers" \
         "(master on $BIND:$MASTER_PORT) -> ${OUT}_*.csv"
    # shellcheck disable=SC2086
    # the master loads worker.py too: it waits for the workers' last reports (loadtest/worker.py, 4.)
    "$LOCUST" -f loadtest/locustfile.py,loadtest/worker.py --headless "${COMMON[@]}" \
        --users "$USERS" --spawn-rate "$SPAWN_RATE" --run-time "$DURATION" --stop-timeout 10 \
        --master --master-bind-host "$BIND" --master-bind-port "$MASTER_PORT" \
        --expect-workers "$DISTRIBUTED" --expect-workers-max-wait "$WORKERS_WAIT" ${LOCUST_ARGS:-} &
    MASTER_PID=$!
    for ((k = 1; k <= WORKERS; k++)); do
        "$LOCUST" -f loadtest/locustfile.py,loadtest/worker.py --worker --host "$HOST" \
            --master-host 127.0.0.1 --master-port "$MASTER_PORT" --exit-code-on-error 1 \
            >"${OUT}_worker-$k.log" 2>&1 &
        WORKER_PIDS+=("$!")
    done
    wait "$MASTER_PID"
    RC=$?
    # a worker quits when its master does: give them a moment, then end the ones left
    for k in "${!WORKER_PIDS[@]}"; do
        pid="${WORKER_PIDS[$k]}"
        for ((t = 0; t < 100; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null
            echo "run.sh: worker $((k + 1)) was still running 10 s after the master ended: killed" \
                 "(${OUT}_worker-$((k + 1)).log)" >&2
            [ "$RC" -ne 0 ] || RC=1
        fi
        wait "$pid"
        WRC=$?
        tally="$(grep -o 'zooserve worker .*' "${OUT}_worker-$((k + 1)).log" | tail -n 1)"
        echo "run.sh: worker $((k + 1)): exit status $WRC; ${tally:-no request tally in its log}"
        if [ "$WRC" -ne 0 ] && [ "$RC" -eq 0 ]; then
            echo "run.sh: worker $((k + 1)) exited with status $WRC (${OUT}_worker-$((k + 1)).log)" >&2
            RC=1
        fi
    done
    WORKER_PIDS=()
fi
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
