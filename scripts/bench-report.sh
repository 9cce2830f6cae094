#!/usr/bin/env bash
# End-to-end benchmark of `ces-stream report` against `replay`, in the same
# run, on the file of bench-replay.sh (default 5M events over 1M customers):
#   - report and report --compare (the default model against one with
#     purchases worth more and 3 points of hysteresis), each as a ratio of
#     replay's time (the median of ROUNDS interleaved runs, default 3);
#   - peak resident memory of each;
#   - the size of the HTML page (it must stay under 2 MB at any size).
# Usage: scripts/bench-report.sh [EVENTS] [CUSTOMERS]
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-5000000}
CUSTOMERS=${2:-1000000}
DATA=target/bench-data
mkdir -p "$DATA"
cargo build --release --bin ces-stream >&2
BIN=target/release/ces-stream
FILE="$DATA/events-$EVENTS-$CUSTOMERS-1d.jsonl"
[ -s "$FILE" ] || "$BIN" generate --output "$FILE" --events "$EVENTS" --customers "$CUSTOMERS" --span 1d
OTHER="$DATA/report-other.toml"
sed -e 's/^purchase = { weight = 10.0/purchase = { weight = 25.0/' \
    -e 's/^tier_hysteresis = .*/tier_hysteresis = 3.0/' config/default.toml > "$OTHER"
cat "$FILE" > /dev/null # warm the page cache
PIN=()
command -v taskset >/dev/null && PIN=(taskset -c 0)
ROUNDS=${ROUNDS:-3}
median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
timed() { { /usr/bin/time -f "%e %M" "${PIN[@]}" "$@" 2>&1 >/dev/null; } | tail -1; }
replays=() reports=() compares=()
for round in $(seq "$ROUNDS"); do
  r=$(timed "$BIN" replay --config config/default.toml --input "$FILE" --output /dev/null --no-progress)
  p=$(timed "$BIN" report --config config/default.toml --input "$FILE" --output "$DATA/report.html" --no-progress)
  c=$(timed "$BIN" report --config config/default.toml --compare "$OTHER" --input "$FILE" --output "$DATA/report-compare.html" --no-progress)
  echo "round $round: replay $r, report $p, report --compare $c (seconds, peak KB)"
  replays+=("${r% *}") reports+=("${p% *}") compares+=("${c% *}")
  rss_replay=${r#* } rss_report=${p#* } rss_compare=${c#* }
done
replay=$(printf '%s\n' "${replays[@]}" | median)
report=$(printf '%s\n' "${reports[@]}" | median)
compare=$(printf '%s\n' "${compares[@]}" | median)
awk -v r="$replay" -v p="$report" -v c="$compare" 'BEGIN {
  printf "report: %.2fx replay'"'"'s time (goal <= 1.3x); with --compare: %.2fx (goal <= 2.2x)\n", p / r, c / r }'
echo "peak memory: replay ${rss_replay} KB, report ${rss_report} KB, report --compare ${rss_compare} KB"
echo "page: $(stat -c %s "$DATA/report.html") bytes, with --compare $(stat -c %s "$DATA/report-compare.html") bytes (goal < 2 MB)"
