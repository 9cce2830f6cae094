#!/usr/bin/env bash
# The test suite, as CI runs it on a clean checkout: formatting, lints, then
# every test. Installs what the tests need first (see scripts/ci-deps.sh).
#
#   scripts/test.sh           everything (CI)
#   scripts/test.sh --quick   for local work: everything but the long broker
#                             soaks (tests/snapshots.rs, tests/exactly_once.rs,
#                             tests/broker_faults.rs), which CI still runs
set -euo pipefail
cd "$(dirname "$0")/.."
quick=false
case "${1:-}" in
  "") ;;
  --quick) quick=true ;;
  *) echo "usage: scripts/test.sh [--quick]" >&2; exit 2 ;;
esac
scripts/ci-deps.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
if ! $quick; then
  cargo test --locked --all-targets
  exit
fi
long=" snapshots exactly_once broker_faults "
targets=(--lib --bins --examples --benches)
for file in tests/*.rs; do
  name=$(basename "$file" .rs)
  [[ "$long" == *" $name "* ]] || targets+=(--test "$name")
done
echo "quick: skipping the broker soaks:$long" >&2
cargo test --locked "${targets[@]}"
