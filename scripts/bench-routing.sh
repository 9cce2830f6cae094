#!/usr/bin/env bash
# What forwarding a customer-API request to its owner costs: two `run`
# instances on the tests' broker (Apache Kafka), requests to one of
# them, the share forwarded and local vs forwarded latency (p50, p99).
# See examples/bench_routing.rs.
# Usage: scripts/bench-routing.sh [CUSTOMERS] [REQUESTS]   (default 10,000 and 1,000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ci-deps.sh
cargo build --release --bin ces-stream --example bench_routing >&2
target/release/examples/bench_routing "${1:-10000}" "${2:-1000}"
