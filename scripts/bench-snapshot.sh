#!/usr/bin/env bash
# Snapshot write, pause and restore figures at 1M and 10M customers
# (examples/bench_snapshot.rs). Needs about 5 GB of memory and disk.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --example bench_snapshot -- "${@:-1000000 10000000}"
