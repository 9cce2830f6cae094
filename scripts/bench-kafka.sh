#!/usr/bin/env bash
# End-to-end benchmark of `ces-stream run` on the broker the tests use
# (Apache Kafka; CES_TEST_BROKER=tansu for the second broker), in one run:
# a bare consumer, a bare relay (our output volume, no scoring), `run` with
# 2 workers and with 1 (drain rate and CPU seconds per million events),
# `replay`'s CPU per million on the same events, run's CPU against the
# relay's plus replay's, and produce-to-signal latency at 1,000 events/s
# and at half the drain rate against the relay's own.
# See examples/bench_kafka.rs.
# Usage: scripts/bench-kafka.sh [EVENTS] [CUSTOMERS]   (default 1,000,000 over 100,000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ci-deps.sh
cargo build --release --bin ces-stream --example bench_kafka >&2
target/release/examples/bench_kafka "${1:-1000000}" "${2:-100000}"
