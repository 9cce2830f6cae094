#!/usr/bin/env bash
# End-to-end benchmark of `ces-stream replay` (issue: scoring engine).
#
# Generates a file of EVENTS events over CUSTOMERS customers (default 5M over
# 1M, one day of traffic), then measures in the same run:
#   - the parse-only baseline: serde_json parsing every line into a struct;
#     (every timing: the median of ROUNDS interleaved runs, default 3)
#   - replay of the same file (outputs to /dev/null), on one core;
#   - resident memory of replay, minus that of replaying an empty file,
#     per customer, with the default de-duplication depth and without.
#   - replay of a file of the same size over a tenth of the customers
#     (SMALL, default 100k): its state fits the cache, so the difference
#     is what waiting for memory costs at CUSTOMERS, after prefetching.
# Prints the ratios. Usage: scripts/bench-replay.sh [EVENTS] [CUSTOMERS] [SPAN]
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-5000000}
CUSTOMERS=${2:-1000000}
SPAN=${3:-1d}
DATA=target/bench-data
mkdir -p "$DATA"
cargo build --release --bin ces-stream --example parse_baseline >&2
BIN=target/release/ces-stream
FILE="$DATA/events-$EVENTS-$CUSTOMERS-$SPAN.jsonl"
[ -s "$FILE" ] || "$BIN" generate --output "$FILE" --events "$EVENTS" --customers "$CUSTOMERS" --span "$SPAN"
SMALL=${SMALL:-$((CUSTOMERS / 10))}
SMALL_FILE="$DATA/events-$EVENTS-$SMALL-$SPAN.jsonl"
[ -s "$SMALL_FILE" ] || "$BIN" generate --output "$SMALL_FILE" --events "$EVENTS" --customers "$SMALL" --span "$SPAN"
echo "input: $FILE ($(du -h "$FILE" | cut -f1), $EVENTS events)"
cat "$FILE" "$SMALL_FILE" > /dev/null # warm the page cache for every run

# Pin to one core where taskset exists: the goal is per core.
PIN=()
command -v taskset >/dev/null && PIN=(taskset -c 0)

# The machine is shared: each timing is taken ROUNDS times (default 3),
# the three runs interleaved round by round, and the median reported, so
# that one disturbed run moves no ratio.
ROUNDS=${ROUNDS:-3}
median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
bases=() replays=() smalls=()
for round in $(seq "$ROUNDS"); do
  bases+=("$( { /usr/bin/time -f "%e" "${PIN[@]}" target/release/examples/parse_baseline "$FILE" 2>&1 >/dev/null; } | tail -1)")
  summary=$( { /usr/bin/time -f "time %e rss %M" "${PIN[@]}" "$BIN" replay --config config/default.toml --input "$FILE" --output /dev/null --no-progress 2>&1; } )
  echo "round $round: $(echo "$summary" | head -1)"
  replays+=("$(echo "$summary" | awk '/^time/ {print $2}')")
  smalls+=("$( { /usr/bin/time -f "time %e" "${PIN[@]}" "$BIN" replay --config config/default.toml --input "$SMALL_FILE" --output /dev/null --no-progress 2>&1; } | awk '/^time/ {print $2}')")
done
echo "baseline runs: ${bases[*]} s; replay: ${replays[*]} s; replay, $SMALL customers: ${smalls[*]} s"
base=$(printf '%s\n' "${bases[@]}" | median)
replay=$(printf '%s\n' "${replays[@]}" | median)
small=$(printf '%s\n' "${smalls[@]}" | median)
empty_rss=$( { /usr/bin/time -f "%M" "$BIN" replay --config config/default.toml --input /dev/null --output /dev/null 2>&1; } | tail -1)
rss=$(echo "$summary" | awk '/^time/ {print $4}')
customers=$(echo "$summary" | sed -n "s/.*, \([0-9]*\) customers.*/\1/p")
# Memory without de-duplication (input.dedup_depth = 0): the record
# without remembered event ids.
NODEDUP="$DATA/no-dedup.toml"
sed 's/^dedup_depth = .*/dedup_depth = 0/' config/default.toml > "$NODEDUP"
rss0=$( { /usr/bin/time -f "%M" "$BIN" replay --config "$NODEDUP" --input "$FILE" --output /dev/null --no-progress 2>&1; } | tail -1)
awk -v e="$EVENTS" -v b="$base" -v r="$replay" -v sm="$small" -v smc="$SMALL" -v rss="$rss" -v rss0="$rss0" -v er="$empty_rss" -v c="$customers" 'BEGIN {
  printf "parse-only baseline: %.2fs (%.0f events/s)\n", b, e / b
  printf "replay:              %.2fs (%.0f events/s; goal >= 1.5M)\n", r, e / r
  printf "replay / baseline:   %.2fx (goal <= 1.5x)\n", r / b
  printf "replay, %d customers: %.2fs (%.0f events/s), %.2fx the baseline; %d customers cost %.2fx that\n", smc, sm, e / sm, sm / b, c, r / sm
  m0 = (rss0 - er) * 1024 / c; m = (rss - er) * 1024 / c
  printf "memory, dedup_depth 0: %d KiB resident for %d customers: %.1f bytes/customer (goal <= 150)\n", rss0 - er, c, m0
  printf "memory, dedup_depth 4 (default): %.1f bytes/customer, %+.1f (goal <= +35)\n", m, m - m0
}'
