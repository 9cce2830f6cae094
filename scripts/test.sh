#!/usr/bin/env bash
# The test suite, as CI runs it on a clean checkout: formatting, lints, then
# every test. Installs what the tests need first (see scripts/ci-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ci-deps.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
