#!/usr/bin/env bash
# End-to-end benchmark of `ces-stream run` on a local tansu broker: the
# pipeline's drain rate against a bare consumer's in the same run, and the
# produce-to-signal latency at half that rate (examples/bench_kafka.rs).
# Usage: scripts/bench-kafka.sh [EVENTS]   (default 2,000,000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ci-deps.sh
RUST_LOG=${RUST_LOG:-warn} cargo run --release --example bench_kafka -- "${1:-2000000}"
